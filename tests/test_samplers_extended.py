"""The issue-11 samplers inside the engine: per-row, seeded, batch-independent, and their own semantics
where no llama.cpp reference exists (vLLM's bad_words, the XTC coin, mirostat's mu bookkeeping).

The equality with llama.cpp's own samplers is in tests/test_llama_reference.py.
"""

from __future__ import annotations

import math

import pytest
import torch

from decodetune import DecodingConfig
from decodetune.decoding import generate
from decodetune.decoding import llama_samplers as LS
from decodetune.decoding.processors import RowParams, TokenState, apply_processors
from decodetune.decoding.sampler import make_generator, sample_tokens
from decodetune.decoding.token_rules import bad_word_sequences, dry_breakers, use_tokenizer
from decodetune.errors import UserError
from decodetune.models.handle import LoadedModel

PROMPTS = ["The quick brown fox", "Once upon a time there was a small robot", "Paris", "What is 12 plus"]
NEW = {
    "dry": dict(dry_multiplier=0.8, dry_allowed_length=2),
    "xtc": dict(xtc_probability=0.5, xtc_threshold=0.05),
    "top_n_sigma": dict(top_n_sigma=1.0),
    "mirostat1": dict(mirostat=1, mirostat_tau=3.0),
    "mirostat2": dict(mirostat=2, mirostat_tau=3.0, mirostat_eta=0.2),
    "adaptive_p": dict(adaptive_target=0.3, adaptive_decay=0.8, min_p=0.05),
    "dynatemp": dict(temperature=0.9, dynatemp_range=0.5, dynatemp_exponent=1.5),
    "window": dict(repetition_penalty=1.4, frequency_penalty=0.5, penalty_last_n=6),
    "bias": dict(logit_bias={5: 3.0, 7: -50.0}),
    "bad_words": dict(bad_words=["the", "sea shells"]),
}


@pytest.fixture(scope="module")
def lm(tiny_pair):
    model, tok = tiny_pair
    handle = LoadedModel(model, tok, name="tiny")
    handle.eos_token_ids = [2]
    return handle


def cfg(name: str, **kw) -> DecodingConfig:
    return DecodingConfig(**{"strategy": "sample", "max_new_tokens": 12, "seed": 3, **NEW[name], **kw})


@pytest.mark.parametrize("name", list(NEW))
def test_same_seed_same_tokens_whatever_the_batch(lm, name):
    """A row's tokens depend on its prompt, config and seed only: alone, or beside rows with other samplers
    and shorter lengths (rows finish and leave; DRY's table, XTC's coins and mirostat's mu follow)."""
    target = cfg(name)
    alone = generate(lm, [PROMPTS[1]], target)[0].token_ids
    others = [cfg("mirostat2", max_new_tokens=3), cfg("xtc", max_new_tokens=5), DecodingConfig(max_new_tokens=2)]
    mixed = generate(lm, [PROMPTS[0], PROMPTS[1], PROMPTS[2], PROMPTS[3]], [others[0], target, others[1], others[2]])
    assert mixed[1].token_ids == alone
    assert len(alone) == 12 or alone[-1] in lm.eos_token_ids


@pytest.mark.parametrize("name", ["dry", "window", "bias", "bad_words"])
def test_processors_also_shape_greedy_rows(lm, name):
    plain = generate(lm, PROMPTS, DecodingConfig(max_new_tokens=20))
    first, banned = _a_produced_word(lm, plain)
    shaped = generate(lm, PROMPTS, DecodingConfig(max_new_tokens=20, **{"dry": dict(dry_multiplier=2.0),
                                                                          "window": dict(repetition_penalty=3.0),
                                                                          "bias": dict(logit_bias={9: 100.0}),
                                                                          "bad_words": dict(bad_words=[first])}[name]))
    assert [g.token_ids for g in plain] != [g.token_ids for g in shaped]
    if name == "bias":
        assert all(set(g.token_ids) == {9} for g in shaped)  # +100 wins every step
    if name == "bad_words":
        assert not any(banned in g.token_ids for g in shaped)


def _a_produced_word(lm, gens) -> tuple[str, int]:
    """A word that greedy decoding produced as one token, which bad_words then bans as that token."""
    for g in gens:
        for t in g.token_ids:
            word = lm.tokenizer.decode([t]).strip()
            if word.isalpha() and [t] in bad_word_sequences(lm.tokenizer, [word]):
                return word, t
    raise AssertionError("no one-token word in the greedy outputs")


def test_penalty_window_zero_turns_the_penalties_off(lm):
    plain = generate(lm, PROMPTS, DecodingConfig(max_new_tokens=15))
    off = generate(lm, PROMPTS, DecodingConfig(max_new_tokens=15, repetition_penalty=3.0, presence_penalty=2.0,
                                               penalty_last_n=0))
    assert [g.token_ids for g in plain] == [g.token_ids for g in off]


def test_bad_words_follow_vllm_tokenization(tiny_tokenizer):
    tok = tiny_tokenizer
    enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    seqs = bad_word_sequences(tok, ["sea shells", " fox"])
    # as is (lstripped) and with a leading space when that gives another first token of the same length
    expected = [enc("sea shells")]
    if enc(" sea shells")[0] != expected[0][0] and len(enc(" sea shells")) == len(expected[0]):
        expected.append(enc(" sea shells"))
    expected.append(enc("fox"))
    if enc(" fox")[0] != enc("fox")[0] and len(enc(" fox")) == len(enc("fox")):
        expected.append(enc(" fox"))
    assert seqs == expected


def test_bad_words_ban_the_completing_token_only_after_the_prefix_in_the_output(tiny_tokenizer):
    tok = tiny_tokenizer
    seqs = bad_word_sequences(tok, ["sea shells"])
    # vLLM's rule taken literally: " sea shells" tokenizes to another length, so only "sea shells" is kept
    assert seqs == [tok.encode("sea shells", add_special_tokens=False)]
    word = seqs[0]
    assert len(word) >= 2
    config = DecodingConfig(strategy="sample", bad_words=["sea shells"])
    vocab = len(tok)
    rows = RowParams.from_configs([config, config], "cpu", tokenizer=tok)
    # row 0 generated the prefix; row 1 has it in the prompt only (vLLM looks at the output only)
    state = TokenState([[1], [1] + word[:-1]], len(word), vocab, rows, [], "cpu")
    for t in word[:-1]:
        state.append(torch.tensor([t, 5]))
    out = apply_processors(torch.zeros(2, vocab), state)
    assert {(r, c) for r, c in torch.nonzero(torch.isinf(out)).tolist()} == {(0, word[-1])}
    state.append(torch.tensor([word[-1], 5]))  # one more token: the prefix is no longer the output's tail
    assert torch.isfinite(apply_processors(torch.zeros(2, vocab), state)).all()


def test_bad_words_and_dry_need_a_tokenizer():
    rows = RowParams.from_configs([DecodingConfig(bad_words=["x"])], "cpu")
    state = TokenState([[1, 2]], 2, 10, rows, [], "cpu")
    state.append(torch.tensor([3]))
    with pytest.raises(UserError, match="bad_words: needs the model's tokenizer"):
        apply_processors(torch.zeros(1, 10), state)


def test_use_tokenizer_is_the_default_of_row_params(tiny_tokenizer):
    with use_tokenizer(tiny_tokenizer):
        assert RowParams.from_configs([DecodingConfig()], "cpu").tokenizer is tiny_tokenizer
    assert RowParams.from_configs([DecodingConfig()], "cpu").tokenizer is None


def test_dry_breakers_spanning_tokens(tiny_tokenizer):
    tok = tiny_tokenizer
    processed = dry_breakers(tok, ["sea shells"])
    pieces = tok.convert_ids_to_tokens(list(range(len(tok))))
    # every token containing the whole breaker is a one-token breaker; " sea"'s tail is the rest's tokens
    sea = tok.encode(" sea", add_special_tokens=False)
    assert len(sea) == 1 and tuple(tok.encode(" shells", add_special_tokens=False)) in processed[sea[0]]
    assert all(() in processed[i] for i, p in enumerate(pieces) if "seaĠshells" in p)


def test_xtc_coin_comes_from_the_row_generator_one_per_step():
    config = DecodingConfig(strategy="sample", xtc_probability=0.5, xtc_threshold=0.05)
    rows = RowParams.from_configs([config, DecodingConfig(strategy="sample")], "cpu")
    gens = [make_generator(11, torch.device("cpu")), make_generator(12, torch.device("cpu"))]
    coins = [float(LS.xtc_coins(rows, gens, torch.device("cpu"))[0]) for _ in range(400)]
    fresh = make_generator(11, torch.device("cpu"))
    assert coins == [float(torch.rand(1, generator=fresh)[0]) for _ in range(400)]
    assert torch.equal(gens[1].get_state(), make_generator(12, torch.device("cpu")).get_state())  # untouched
    fired = sum(c <= 0.5 for c in coins)
    assert 150 < fired < 250  # Binomial(400, 0.5): sd 10


def test_mirostat_mu_moves_by_the_surprise_of_the_drawn_token():
    config = DecodingConfig(strategy="sample", mirostat=2, mirostat_tau=2.0, mirostat_eta=0.5)
    rows = RowParams.from_configs([config], "cpu")
    state = TokenState([[1]], 4, 50, rows, [], "cpu")
    assert float(state.per_row["mirostat_mu"][0]) == 4.0  # 2 tau
    logits = torch.randn(1, 50, generator=torch.Generator().manual_seed(0)) * 2
    kept = LS.mirostat_truncate(logits, rows, state.per_row["mirostat_mu"]).softmax(dim=1)
    token = sample_tokens(logits, rows, [make_generator(5, torch.device("cpu"))], state)
    surprise = -math.log2(float(kept[0, token[0]]))
    assert float(state.per_row["mirostat_mu"][0]) == pytest.approx(4.0 - 0.5 * (surprise - 2.0), rel=1e-6)


def test_mirostat_ignores_the_truncations_it_replaces():
    """llama.cpp's mirostat chain is temperature -> mirostat: top-k / top-p on the config do nothing."""
    rows = RowParams.from_configs([DecodingConfig(strategy="sample", mirostat=2, top_k=1, top_p=0.1)], "cpu")
    assert rows.values["top_k"] == [0] and rows.values["top_p"] == [1.0]


def test_mirostat_v1_keeps_every_token_where_llama_cpp_casts_an_infinite_k():
    """Deviation: on a flat distribution v1's k is infinite; llama.cpp's int cast of it is undefined (INT_MIN
    on x86, then max(k, 1) = 1 token); we keep every token, as the formula means."""
    rows = RowParams.from_configs([DecodingConfig(strategy="sample", mirostat=1)], "cpu")
    out = LS.mirostat_truncate(torch.zeros(1, 300), rows, torch.tensor([10.0]))
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("field", [dict(mirostat=2), dict(xtc_probability=0.5), dict(adaptive_target=0.3)])
def test_beam_sample_refuses_samplers_that_need_a_row_draw(lm, field):
    config = DecodingConfig(strategy="beam_sample", num_beams=2, max_new_tokens=3, **field)
    with pytest.raises(UserError, match="beam"):
        generate(lm, PROMPTS[:1], config)


def test_beam_search_runs_the_processors(lm):
    plain = generate(lm, PROMPTS[:2], DecodingConfig(strategy="beam", num_beams=3, max_new_tokens=10))
    biased = generate(lm, PROMPTS[:2], DecodingConfig(strategy="beam", num_beams=3, max_new_tokens=10,
                                                       logit_bias={9: 100.0}, dry_multiplier=1.0))
    assert [g.token_ids for g in plain] != [g.token_ids for g in biased]
