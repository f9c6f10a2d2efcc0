"""Speculative decoding (issue 13): greedy is token-exact against plain greedy; sampling is exact in
distribution (chi-square of the first two tokens over many seeds against the target's exact distribution,
computed here from the raw logits, not through the engine's samplers)."""

from __future__ import annotations

import collections
import copy

import pytest
import torch
from scipy.stats import chisquare

from decodetune.decoding import generate, speculative
from decodetune.errors import UserError
from decodetune.models import load_model

EOS = 2  # the tiny tokenizer's </s>
PROMPTS = ["The quick brown", "Once upon a time there", "She sells sea shells. She sells"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and two threads on a loaded 2-core machine spin for ms."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _noisy(model: torch.nn.Module, scale: float, seed: int = 5) -> torch.nn.Module:
    """A copy with Gaussian noise on every weight: a draft that agrees with the target only sometimes."""
    twin = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in twin.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)
    return twin


@pytest.fixture(scope="module")
def models(tiny_pair, tiny_tokenizer):
    from conftest import build_tiny_model

    model, tok = tiny_pair
    return {"target": load_model(tiny_pair), "near": load_model((_noisy(model, 0.01), tok)),
            "other": load_model((build_tiny_model(len(tiny_tokenizer), seed=1), tok))}


GREEDY_CONFIGS = [
    {"max_new_tokens": 24},
    {"max_new_tokens": 24, "repetition_penalty": 1.3, "no_repeat_ngram_size": 3, "min_new_tokens": 6,
     "frequency_penalty": 0.5},
    {"max_new_tokens": 24, "stop": ["e"]},
]


def _same(ref, got):
    for a, b in zip(ref, got, strict=True):
        assert (b.token_ids, b.text, b.finish_reason) == (a.token_ids, a.text, a.finish_reason)
        assert b.logprobs == pytest.approx(a.logprobs, abs=1e-4)


@pytest.mark.parametrize("cfg", GREEDY_CONFIGS, ids=["plain", "penalties", "stop"])
@pytest.mark.parametrize("draft, k", [("near", 3), ("near", 1), ("other", 4), ("target", 6)])
def test_greedy_with_a_draft_model_is_token_exact(models, cfg, draft, k):
    lm = models["target"]
    ref = generate(lm, PROMPTS, cfg, logprobs=True)
    got = generate(lm, PROMPTS, cfg, logprobs=True, draft_model=models[draft], num_draft_tokens=k)
    _same(ref, got)
    rates = [g.extra["speculative"]["acceptance_rate"] for g in got]
    if draft == "target":
        assert rates == [1.0] * len(PROMPTS)  # a draft that is the target is always right
    if draft == "near" and k == 3 and cfg is GREEDY_CONFIGS[0]:
        assert 0 < sum(rates) / len(rates) < 1  # both paths (accept and replace) were taken


@pytest.mark.parametrize("cfg", GREEDY_CONFIGS, ids=["plain", "penalties", "stop"])
def test_greedy_with_prompt_lookup_is_token_exact(models, cfg):
    lm = models["target"]
    _same(generate(lm, PROMPTS, cfg, logprobs=True), generate(lm, PROMPTS, cfg, logprobs=True,
                                                             prompt_lookup_num_tokens=3))


def test_greedy_point_mass_drafts_right_and_wrong_are_token_exact(models, monkeypatch):
    """A lookup that proposes the true continuation with every third token wrong: accepts and rejects."""
    lm = models["target"]
    cfg = {"max_new_tokens": 20}
    ref = generate(lm, PROMPTS[:1], cfg)[0]
    prompt_len = ref.num_prompt_tokens

    def propose(self, seq, k):
        done = len(seq) - prompt_len
        out = ref.token_ids[done:done + k]
        return [t if (done + i) % 3 else (t + 1) % 300 for i, t in enumerate(out)]

    monkeypatch.setattr(speculative.PromptLookup, "propose", propose)
    got = generate(lm, PROMPTS[:1], cfg, prompt_lookup_num_tokens=4)[0]
    assert got.token_ids == ref.token_ids
    assert 0.4 < got.extra["speculative"]["acceptance_rate"] < 0.9


def test_prompt_lookup_takes_the_latest_match_of_the_longest_ngram():
    look = speculative.PromptLookup(3)
    seq = [5, 6, 7, 1, 2, 9, 5, 6, 8, 4, 6]
    assert look.propose(seq, 3) == [8, 4, 6]  # unigram 6: its latest earlier occurrence is followed by 8, 4, 6
    # the trigram 1 2 3 matched at the start wins over the later match of the bigram 2 3 (followed by 7 1)
    assert look.propose([1, 2, 3, 9, 2, 3, 7, 1, 2, 3], 2) == [9, 2]
    assert look.propose([1, 2, 3], 4) == []  # nothing repeats
    assert look.propose([4, 4], 5) == [4]  # the continuation runs up to the end of the sequence


# ------------------------------------------------------------------------------------------ sampling
T, K, N = 1.5, 4, 2000
SAMPLE = {"strategy": "sample", "temperature": T, "top_k": K, "max_new_tokens": 2, "min_new_tokens": 2}


def _target_two_token_distribution(lm, prompt):
    """Exact P(t1, t2) for SAMPLE: EOS banned (min_new_tokens), logits / T, the top K, softmax."""
    def dist(ids):
        with torch.no_grad():
            logits = lm.model(torch.tensor([ids])).logits[0, -1].double()
        logits[EOS] = float("-inf")
        logits = logits / T
        logits[logits < logits.topk(K).values[-1]] = float("-inf")
        return logits.softmax(-1)

    ids = lm.encode(prompt)
    p1 = dist(ids)
    return {(a, b): float(p1[a] * p2b) for a in p1.nonzero().flatten().tolist()
            for p2 in [dist([*ids, a])] for b in p2.nonzero().flatten().tolist() for p2b in [p2[b]]}


def _chi_square(gens, exact):
    counts = collections.Counter(tuple(g.token_ids) for g in gens)
    assert set(counts) <= set(exact), f"outcomes the target cannot produce: {set(counts) - set(exact)}"
    keys = sorted(exact)
    total = sum(exact.values())
    expected = [exact[k] / total * len(gens) for k in keys]
    assert min(expected) >= 5  # the chi-square approximation holds
    return chisquare([counts[k] for k in keys], expected).pvalue


def test_sampling_with_a_draft_model_matches_the_target_distribution(models):
    """Fixed seeds, so deterministic. Measured: p = 0.94 here; accepting every draft token puts mass
    outside the target's top-k, sampling the replacement from p instead of norm(max(0, p - q)) gives
    p = 1e-85, and accepting with probability p(x) instead of min(1, p(x)/q(x)) p = 0."""
    lm, prompt = models["target"], PROMPTS[0]
    gens = [generate(lm, [prompt], SAMPLE, seeds=[s], draft_model=models["near"], num_draft_tokens=2)[0]
            for s in range(N)]
    proposed = sum(g.extra["speculative"]["proposed"] for g in gens)
    accepted = sum(g.extra["speculative"]["accepted"] for g in gens)
    assert 0.3 < accepted / proposed < 0.95  # both the acceptance and the residual draw are exercised
    assert _chi_square(gens, _target_two_token_distribution(lm, prompt)) > 1e-3


def test_sampling_with_point_mass_drafts_matches_the_target_distribution(models, monkeypatch):
    """Prompt lookup's q is a point mass: accept x with probability p(x), else draw from p without x. The
    proposals here are each step's second most likely token, so both branches happen often."""
    lm, prompt = models["target"], PROMPTS[0]
    exact = _target_two_token_distribution(lm, prompt)
    first = collections.defaultdict(float)
    for (a, _), v in exact.items():
        first[a] += v
    second_best = sorted(first, key=first.get)[-2]
    after = sorted((v, b) for (a, b), v in exact.items() if a == second_best)[-2][1]
    prompt_len = len(lm.encode(prompt))
    monkeypatch.setattr(speculative.PromptLookup, "propose",
                        lambda self, seq, k: [second_best, after][len(seq) - prompt_len:][:k])
    gens = [generate(lm, [prompt], SAMPLE, seeds=[s], prompt_lookup_num_tokens=2)[0] for s in range(N)]
    rate = sum(g.extra["speculative"]["accepted"] for g in gens) / sum(g.extra["speculative"]["proposed"]
                                                                      for g in gens)
    assert 0.1 < rate < 0.9
    assert _chi_square(gens, exact) > 1e-3


def test_sampling_is_reproducible_by_seed_and_records_stats(models):
    lm = models["target"]
    cfg = {"strategy": "sample", "temperature": 0.8, "top_p": 0.9, "max_new_tokens": 12, "num_return_sequences": 2}
    a = generate(lm, PROMPTS, cfg, seeds=[1, 2, 3], draft_model=models["near"])
    b = generate(lm, PROMPTS, cfg, seeds=[1, 2, 3], draft_model=models["near"])
    assert [g.token_ids for g in a] == [g.token_ids for g in b]
    assert [(g.prompt_index, g.sequence_index) for g in a] == [(i, j) for i in range(3) for j in range(2)]
    assert a[0].token_ids != a[1].token_ids  # sequence j draws from (seed, j)
    for g in a:
        s = g.extra["speculative"]
        assert s["acceptance_rate"] == pytest.approx(s["accepted"] / s["proposed"])
        assert s["target_forwards"] <= len(g.token_ids) and s["draft_forwards"] >= s["proposed"] - s["target_forwards"]


def test_refusals_name_the_field(models, tiny_pair):
    lm, draft = models["target"], models["near"]
    cases = [
        (dict(config={"strategy": "beam", "num_beams": 2}, draft_model=draft), "^strategy: speculative"),
        (dict(config={"strategy": "sample", "mirostat": 2}, draft_model=draft), "^mirostat: not"),
        (dict(config={"top_logprobs": 2}, prompt_lookup_num_tokens=2), "^top_logprobs: not supported"),
        (dict(draft_model=draft, prompt_lookup_num_tokens=2), "^draft_model: give a draft model or"),
        (dict(num_draft_tokens=3), "^draft_model: speculative decoding needs"),
        (dict(draft_model=draft, num_draft_tokens=0), "^num_draft_tokens: must be a positive integer"),
        (dict(prompt_lookup_num_tokens=2, num_draft_tokens=2), "^num_draft_tokens: is for draft_model"),
    ]
    for kwargs, message in cases:
        with pytest.raises(UserError, match=message):
            generate(lm, PROMPTS[:1], **kwargs)
    from conftest import build_tiny_model, build_tiny_tokenizer

    other_tok = build_tiny_tokenizer()  # the same tokenizer plus one token: another vocabulary
    other_tok.add_tokens(["<extra>"])
    foreign = load_model((build_tiny_model(len(other_tok)), other_tok))
    with pytest.raises(UserError, match="^draft_model: .* another tokenizer"):
        generate(lm, PROMPTS[:1], draft_model=foreign)


def test_reduced_precision_draft(tiny_pair):
    """The draft's precision never changes greedy tokens (an int8 draft of an fp32 target). A bf16 or int8
    *target* is not token-exact: its rounding depends on how many tokens a forward has (int8: activation
    scales; bf16: accumulation order), so a (k+1)-token verification and one-token steps can differ."""
    target, int8 = load_model(tiny_pair), load_model(tiny_pair, dtype="int8")
    cfg = {"max_new_tokens": 16}
    got = generate(target, PROMPTS, cfg, draft_model=int8, num_draft_tokens=3)
    assert [g.token_ids for g in got] == [g.token_ids for g in generate(target, PROMPTS, cfg)]
    assert min(g.extra["speculative"]["acceptance_rate"] for g in got) > 0.2  # the int8 copy is often right


def test_smollm2_prompt_lookup_accepts_and_is_token_exact(smollm2):
    prompt = ["Repeat this sentence exactly: the cat sat on the mat and looked at the dog."]
    cfg = {"max_new_tokens": 24}
    ref = generate(smollm2, prompt, cfg)[0]
    got = generate(smollm2, prompt, cfg, prompt_lookup_num_tokens=4)[0]
    assert got.token_ids == ref.token_ids
    assert got.extra["speculative"]["acceptance_rate"] > 0.3
