"""The flat loop's scheduling: shared prefills, continuous batching, and the cache surgery under them.

Every scheduling choice must leave a row's tokens alone: the same (prompt, config, seed) gives the same
tokens in one call with other configs, alone, statically batched or continuously batched (fp32).
"""

from __future__ import annotations

import pytest
import torch

from decodetune import DecodingConfig
from decodetune.decoding import engine, generate
from decodetune.decoding.kvcache import fit, join, layers_of, take
from decodetune.decoding.runner import ModelRunner

PROMPTS = ["The quick brown fox", "Once upon a time there was a small robot", "Paris", "What is 12 plus",
           "She sells sea shells"]

SAMPLE = DecodingConfig(strategy="sample", temperature=0.9, top_p=0.9, max_new_tokens=14)
CONFIGS = [
    DecodingConfig(max_new_tokens=14),
    SAMPLE,
    DecodingConfig(strategy="sample", temperature=1.2, top_k=20, repetition_penalty=1.3, max_new_tokens=9),
    DecodingConfig(strategy="sample", temperature=0.7, min_p=0.05, presence_penalty=0.5, frequency_penalty=0.3,
                   no_repeat_ngram_size=2, min_new_tokens=6, max_new_tokens=16),
    DecodingConfig(max_new_tokens=11, repetition_penalty=1.4, no_repeat_ngram_size=3),
]


@pytest.fixture()
def static(monkeypatch):
    """Run generate() with static batching (each chunk runs down to its longest row)."""
    def run(*args, **kwargs):
        monkeypatch.setattr(engine, "CONTINUOUS_BATCHING", False)
        try:
            return generate(*args, **kwargs)
        finally:
            monkeypatch.setattr(engine, "CONTINUOUS_BATCHING", True)
    return run


@pytest.fixture()
def calls(monkeypatch):
    """Record every prefill (its prompts) and every step (its batch size) the engine runs."""
    seen: dict[str, list] = {"prefill": [], "step": [], "events": []}
    prefill, step = ModelRunner.prefill, ModelRunner.step

    def spy_prefill(self, prompts, pad):
        seen["prefill"].append([tuple(p) for p in prompts])
        seen["events"].append(("prefill", len(prompts)))
        return prefill(self, prompts, pad)

    def spy_step(self, tokens, mask, pos, cache):
        seen["step"].append(tokens.shape[0])
        seen["events"].append(("step", tokens.shape[0]))
        return step(self, tokens, mask, pos, cache)

    monkeypatch.setattr(ModelRunner, "prefill", spy_prefill)
    monkeypatch.setattr(ModelRunner, "step", spy_step)
    return seen


def key(gens):
    return [(g.token_ids, g.finish_reason, g.text) for g in gens]


def assert_same(a, b):
    assert key(a) == key(b)
    for x, y in zip(a, b, strict=True):
        assert x.logprobs == pytest.approx(y.logprobs, abs=1e-4)


# ---- shared prefill


def test_configs_of_one_prompt_prefill_it_once_and_match_separate_calls(lm, calls):
    prompts = [p for p in PROMPTS[:3] for _ in CONFIGS]
    configs = [c for _ in PROMPTS[:3] for c in CONFIGS]
    seeds = list(range(len(prompts)))
    together = generate(lm, prompts, configs, seeds=seeds, logprobs=True)
    assert len(calls["prefill"]) == 1 and len(calls["prefill"][0]) == 3  # one row per distinct prompt
    alone = [generate(lm, [p], c, seeds=[s], logprobs=True)[0] for p, c, s in zip(prompts, configs, seeds, strict=True)]
    assert_same(together, alone)
    assert len({tuple(g.token_ids) for g in together[:len(CONFIGS)]}) > 1  # the configs really differ


def test_n_samples_and_repeats_share_the_prefill(lm, calls):
    cfg = SAMPLE.replace(num_return_sequences=4)
    gens = generate(lm, [PROMPTS[1], PROMPTS[1], PROMPTS[3]], cfg, seeds=[5, 6, 5], logprobs=True)
    assert [len(p) for p in calls["prefill"]] == [2]
    assert len({tuple(g.token_ids) for g in gens}) == 12  # every sample its own stream
    for g in gens:
        one = generate(lm, [[PROMPTS[1], PROMPTS[1], PROMPTS[3]][g.prompt_index]], cfg,
                       seeds=[[5, 6, 5][g.prompt_index]], logprobs=True)[g.sequence_index]
        assert_same([g], [one])


def test_a_prompt_split_over_admissions_keeps_its_prefill(lm, calls):
    # 5 configs of one prompt and batch_size 2: its rows join in three rounds, its prompt prefills once
    gens = generate(lm, [PROMPTS[0]] * 5 + [PROMPTS[2]] * 5, CONFIGS * 2, seeds=list(range(10)), batch_size=2)
    prefilled = [p for batch in calls["prefill"] for p in batch]
    assert sorted(prefilled) == sorted({tuple(lm.encode(PROMPTS[0])), tuple(lm.encode(PROMPTS[2]))})
    alone = [generate(lm, [PROMPTS[0] if i < 5 else PROMPTS[2]], c, seeds=[i])[0]
             for i, c in enumerate(CONFIGS * 2)]
    assert key(gens) == key(alone)


# ---- continuous batching


@pytest.mark.parametrize("batch_size", [1, 2, 3, 7])
def test_continuous_equals_static_and_one_by_one(lm, static, batch_size):
    prompts = [p for p in PROMPTS for _ in range(3)]
    configs = [CONFIGS[(i + j) % len(CONFIGS)] for i in range(len(PROMPTS)) for j in range(3)]
    seeds = [100 + i for i in range(len(prompts))]
    cont = generate(lm, prompts, configs, seeds=seeds, batch_size=batch_size, logprobs=True)
    stat = static(lm, prompts, configs, seeds=seeds, batch_size=batch_size, logprobs=True)
    one = [generate(lm, [p], c, seeds=[s], logprobs=True)[0] for p, c, s in zip(prompts, configs, seeds, strict=True)]
    assert_same(cont, stat)
    assert_same(cont, one)
    assert len({g.finish_reason for g in cont}) > 1 and len({len(g.token_ids) for g in cont}) > 3


def test_continuous_batching_keeps_the_slots_full(lm, static, calls):
    # lengths 2..16: static chunks run down to their longest row, continuous ones refill
    configs = [DecodingConfig(max_new_tokens=2 + i, min_new_tokens=2 + i) for i in range(15)]
    prompts = [f"{PROMPTS[i % len(PROMPTS)]} {i}" for i in range(15)]  # distinct: one prefill row per row
    cont = generate(lm, prompts, configs, batch_size=4)
    cont_steps, events = list(calls["step"]), list(calls["events"])
    calls["step"].clear()
    stat = static(lm, prompts, configs, batch_size=4)
    assert key(cont) == key(stat)
    assert all(len(g.token_ids) == 2 + i for i, g in enumerate(cont))
    assert max(cont_steps) == 4
    # every generated token but each row's first (from its prefill) is one row of one step
    assert sum(cont_steps) == sum(len(g.token_ids) - 1 for g in cont) == sum(calls["step"])
    assert len(cont_steps) < len(calls["step"])  # fuller steps, so fewer of them
    # each admission but the last fills the batch: the rows that stepped plus the rows that just joined
    admissions = [(events[i - 1][1], n) for i, (kind, n) in enumerate(events) if kind == "prefill" and i]
    assert len(admissions) > 3 and all(ran + joined == 4 for ran, joined in admissions[:-1])


def test_stop_strings_and_finish_reasons_under_continuous_batching(lm, static):
    full = generate(lm, PROMPTS, DecodingConfig(max_new_tokens=20))
    stops = [g.text[3:5] or "zz" for g in full]
    configs = [DecodingConfig(max_new_tokens=20, stop=[s], min_new_tokens=i % 3) for i, s in enumerate(stops)]
    cont = generate(lm, PROMPTS * 2, configs * 2, batch_size=3)
    assert key(cont) == key(static(lm, PROMPTS * 2, configs * 2, batch_size=3))
    assert key(cont[:5]) == key([generate(lm, [p], c)[0] for p, c in zip(PROMPTS, configs, strict=True)])
    assert "stop" in {g.finish_reason for g in cont}


def test_a_row_that_cannot_join_mid_way_makes_the_call_static(lm, static, calls, monkeypatch):
    # parameters outside batching.JOIN_SAFE (windows over the last n tokens, state carried over steps)
    # cannot be rebuilt for rows at different steps: pretend repetition_penalty were one of them
    from decodetune.decoding import batching

    configs = [DecodingConfig(max_new_tokens=2 + i, min_new_tokens=2 + i) for i in range(9)]
    configs[4] = configs[4].replace(repetition_penalty=1.3)
    static(lm, PROMPTS[:3] * 3, configs, batch_size=4)
    static_steps = list(calls["step"])
    calls["step"].clear()
    generate(lm, PROMPTS[:3] * 3, configs, batch_size=4)
    assert calls["step"] != static_steps  # it joins while every parameter is safe
    calls["step"].clear()
    monkeypatch.setattr(batching, "JOIN_SAFE", batching.JOIN_SAFE - {"repetition_penalty"})
    assert not batching.joins_safely(configs[4]) and batching.joins_safely(configs[3])
    generate(lm, PROMPTS[:3] * 3, configs, batch_size=4)
    assert calls["step"] == static_steps


# ---- the cache surgery


def test_join_right_aligns_caches_of_different_widths(tiny_pair):
    model, tok = tiny_pair
    runner = ModelRunner(model)
    short, long_ = tok("Paris")["input_ids"], tok("Once upon a time there was")["input_ids"]
    with torch.inference_mode():
        _, c1, m1, _ = runner.prefill([short], 0)
        _, c2, m2, _ = runner.prefill([long_, short], 0)
        _, ref, mref, _ = runner.prefill([short, long_, short, short], 0)
    width = len(long_)
    kv, mask = join([(layers_of(c1), m1), (take(layers_of(c2), torch.tensor([0, 1, 1])), m2[[0, 1, 1]])], width)
    assert torch.equal(mask, mref)
    for (k, v), (rk, rv) in zip(kv, layers_of(ref), strict=True):
        real = mask.bool()[:, None, :, None].expand_as(k)
        assert torch.allclose(k[real], rk[real], atol=1e-5) and torch.allclose(v[real], rv[real], atol=1e-5)
        assert not k[~real].any()  # padding columns are zeros
    cut, cut_mask = fit(kv, mask, len(short))
    assert cut_mask.shape == (4, len(short)) and cut_mask[[0, 2, 3]].all()
    assert torch.equal(cut[0][0][0], kv[0][0][0, :, width - len(short):])


def test_a_cache_that_cannot_be_joined_is_refused():
    class Sliding:
        def __init__(self):
            self.keys = self.values = torch.zeros(1, 1, 2, 1)

    class Cache:
        layers = [Sliding()]

    assert layers_of(Cache()) is None


# ---- rows that join mid-way with per-row state (penalty windows, DRY, bad words, mirostat, stop ids, ...)

JOINING = {
    "penalty_last_n": DecodingConfig(strategy="sample", temperature=0.9, penalty_last_n=4, repetition_penalty=1.6,
                                     presence_penalty=0.6, frequency_penalty=0.4, max_new_tokens=12),
    "dry": DecodingConfig(max_new_tokens=13, dry_multiplier=0.9, dry_allowed_length=1, dry_base=2.0),
    "dry_window": DecodingConfig(dry_multiplier=1.5, dry_allowed_length=1, dry_penalty_last_n=6,
                                 dry_sequence_breakers=["e"], max_new_tokens=10),
    "bad_words": DecodingConfig(max_new_tokens=12, bad_words=["ro", "is is", "Pa"]),
    "mirostat": DecodingConfig(strategy="sample", temperature=0.9, mirostat=2, mirostat_tau=2.0, mirostat_eta=0.3,
                               max_new_tokens=15),
    "mirostat_v1": DecodingConfig(strategy="sample", mirostat=1, mirostat_tau=3.0, max_new_tokens=11),
    "stop_token_ids": DecodingConfig(strategy="sample", temperature=1.1, stop_token_ids=[116, 30], min_new_tokens=5,
                                     max_new_tokens=14),
    "xtc": DecodingConfig(strategy="sample", xtc_probability=0.7, xtc_threshold=0.05, max_new_tokens=9),
    "top_n_sigma": DecodingConfig(strategy="sample", temperature=1.3, top_n_sigma=1.0, max_new_tokens=12),
    "dynatemp": DecodingConfig(strategy="sample", dynatemp_range=0.6, dynatemp_exponent=1.5, max_new_tokens=10),
    "adaptive_p": DecodingConfig(strategy="sample", adaptive_target=0.2, adaptive_decay=0.7, min_p=0.02,
                                 max_new_tokens=13),
}


@pytest.mark.parametrize("name", sorted(JOINING))
def test_rows_with_per_row_state_join_mid_way_and_match_static_and_one_by_one(lm, static, calls, name):
    from decodetune.decoding import batching

    special = JOINING[name]
    assert batching.joins_safely(special)
    # the special config on rows that join while others (and earlier rows of it) are at other steps
    configs = [CONFIGS[0].replace(max_new_tokens=3), special, CONFIGS[1].replace(max_new_tokens=5), special,
               CONFIGS[3], special.replace(max_new_tokens=7), CONFIGS[2], special]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(configs))]
    seeds = [40 + i for i in range(len(configs))]
    cont = generate(lm, prompts, configs, seeds=seeds, batch_size=3, logprobs=True)
    cont_steps = list(calls["step"])
    calls["step"].clear()
    stat = static(lm, prompts, configs, seeds=seeds, batch_size=3, logprobs=True)
    assert cont_steps != calls["step"]  # rows really joined mid-way
    one = [generate(lm, [p], c, seeds=[s], logprobs=True)[0] for p, c, s in zip(prompts, configs, seeds, strict=True)]
    assert_same(cont, stat)
    assert_same(cont, one)
    # the field really acts on these rows (else the comparison proves nothing about it)
    plain = [generate(lm, [prompts[i]], _neutral(configs[i], name), seeds=[seeds[i]])[0] for i in (1, 3, 5, 7)]
    assert [g.token_ids for g in plain] != [cont[i].token_ids for i in (1, 3, 5, 7)]


def _neutral(config: DecodingConfig, name: str) -> DecodingConfig:
    """The config with the field under test back at its default."""
    fields = {"penalty_last_n": ["penalty_last_n"], "dry": ["dry_multiplier"], "dry_window": ["dry_multiplier"],
              "bad_words": ["bad_words"], "mirostat": ["mirostat"], "mirostat_v1": ["mirostat"],
              "stop_token_ids": ["min_new_tokens"], "xtc": ["xtc_probability"], "top_n_sigma": ["top_n_sigma"],
              "dynatemp": ["dynatemp_range"], "adaptive_p": ["adaptive_target"]}[name]
    return config.replace(**{f: getattr(DecodingConfig(), f) for f in fields})
