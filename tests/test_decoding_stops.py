"""Stop strings, finish reasons, min_new_tokens, logprobs, scores, timings and bad input."""

from __future__ import annotations

import pytest
import torch

import decodetune
from decodetune import DecodingConfig, UserError
from decodetune.decoding import generate
from decodetune.models.handle import LoadedModel

PROMPTS = ["The quick brown fox", "Once upon a time there was a small robot", "Paris", "What is 12 plus"]
from conftest import TINY_EOS as EOS  # noqa: E402


@pytest.fixture(scope="module")
def plain(tiny_pair):
    """The tiny model with its only real EOS (rarely generated): sequences run to max_new_tokens."""
    model, tok = tiny_pair
    return LoadedModel(model, tok, name="tiny")


def long_greedy(plain, i=1, n=30):
    return generate(plain, [PROMPTS[i]], DecodingConfig(max_new_tokens=n))[0]


def test_stop_string_cuts_text_before_it_and_ends_only_that_row(plain):
    full = long_greedy(plain)
    assert full.finish_reason == "length"
    stop = full.text[12:15]
    at = full.text.index(stop)
    gens = generate(plain, [PROMPTS[0], PROMPTS[1]], [DecodingConfig(max_new_tokens=30),
                                                      DecodingConfig(max_new_tokens=30, stop=[stop, "zzzz"])])
    g = gens[1]
    assert g.finish_reason == "stop"
    assert g.text == full.text[:at]
    assert g.token_ids == full.token_ids[:len(g.token_ids)]
    assert stop in plain.decode(g.token_ids)  # the tokens spelling the stop string are kept
    assert stop not in plain.decode(g.token_ids[:-1])  # and it ended on the first token completing it
    # the other row went on
    assert gens[0].token_ids == generate(plain, [PROMPTS[0]], DecodingConfig(max_new_tokens=30))[0].token_ids


def test_stop_string_across_token_boundary(plain):
    full = long_greedy(plain)
    pieces = [plain.decode(full.token_ids[:k]) for k in range(len(full.token_ids) + 1)]
    k = next(k for k in range(5, 30) if len(pieces[k]) - len(pieces[k - 1]) >= 1
             and len(pieces[k + 1]) - len(pieces[k]) >= 1)
    stop = pieces[k][-1] + pieces[k + 1][len(pieces[k])]  # last char of token k, first of token k+1
    g = generate(plain, [PROMPTS[1]], DecodingConfig(max_new_tokens=30, stop=[stop]))[0]
    assert g.finish_reason == "stop"
    assert g.text == full.text[:full.text.index(stop)]


def test_stop_strings_ignored_before_min_new_tokens(plain):
    full = long_greedy(plain)
    stop = full.text[2:4]
    first = full.text.index(stop)
    assert first < len(plain.decode(full.token_ids[:10]))
    g = generate(plain, [PROMPTS[1]], DecodingConfig(max_new_tokens=30, min_new_tokens=10, stop=[stop]))[0]
    assert len(g.token_ids) >= 10
    boundary = len(plain.decode(full.token_ids[:10]))
    if g.finish_reason == "stop":
        assert len(g.text) + len(stop) > boundary  # the occurrence it cut at ends after the min_new_tokens text
    else:
        assert stop not in full.text[boundary:]


def test_beam_stop_strings(plain):
    cfg = DecodingConfig(strategy="beam", num_beams=3, num_return_sequences=3, max_new_tokens=20)
    full = generate(plain, [PROMPTS[2]], cfg)
    stop = full[0].text[6:8]
    gens = generate(plain, [PROMPTS[2]], cfg.replace(stop=[stop]))
    assert "stop" in {g.finish_reason for g in gens}
    for g in gens:
        if g.finish_reason == "stop":
            assert stop not in g.text and stop in plain.decode(g.token_ids)
            assert g.text == plain.decode(g.token_ids)[:len(g.text)]


def test_eos_finish_and_min_new_tokens(lm):
    gens = generate(lm, PROMPTS, DecodingConfig(max_new_tokens=25))
    eos_rows = [g for g in gens if g.finish_reason == "eos"]
    assert eos_rows and all(g.token_ids[-1] in EOS for g in eos_rows)
    assert all(g.text == lm.decode(g.token_ids[:-1]) for g in eos_rows)
    assert all(len(g.token_ids) == 25 for g in gens if g.finish_reason == "length")
    short = min(len(g.token_ids) for g in eos_rows)
    forced = generate(lm, PROMPTS, DecodingConfig(max_new_tokens=25, min_new_tokens=short + 3))
    for g in forced:
        assert len(g.token_ids) >= short + 3
        assert not any(t in EOS for t in g.token_ids[:short + 3])


def teacher_forced_logprobs(lm, prompt, token_ids):
    ids = torch.tensor([lm.encode(prompt) + token_ids])
    with torch.no_grad():
        logp = lm.model(ids).logits[0].float().log_softmax(-1)
    n = len(lm.encode(prompt))
    return [logp[n - 1 + i, t].item() for i, t in enumerate(token_ids)]


@pytest.mark.parametrize("cfg", [
    DecodingConfig(max_new_tokens=12, repetition_penalty=1.5),
    DecodingConfig(strategy="sample", temperature=0.6, top_k=10, seed=3, max_new_tokens=12),
    DecodingConfig(strategy="beam", num_beams=3, num_return_sequences=2, max_new_tokens=12),
])
def test_logprobs_are_raw_model_logprobs(lm, cfg):
    gens = generate(lm, PROMPTS[:3], cfg, logprobs=True)
    for g in gens:
        ref = teacher_forced_logprobs(lm, PROMPTS[g.prompt_index], g.token_ids)
        assert g.logprobs == pytest.approx(ref, abs=2e-4)
        if not cfg.is_beam:
            assert g.score == pytest.approx(sum(g.logprobs), abs=1e-4)
    assert all(g.logprobs is None for g in generate(lm, PROMPTS[:2], cfg))


def test_generation_fields(lm):
    gens = generate(lm, PROMPTS, DecodingConfig(max_new_tokens=6))
    for i, g in enumerate(gens):
        assert (g.prompt_index, g.sequence_index) == (i, 0)
        assert g.num_prompt_tokens == len(lm.encode(PROMPTS[i]))
        assert set(g.timings) == {"prefill_s", "decode_s", "total_s"}
        assert g.timings["total_s"] == pytest.approx(g.timings["prefill_s"] + g.timings["decode_s"])
        assert min(g.timings.values()) >= 0
        assert g.seed is None  # greedy, no seed given


def test_public_reexport_and_model_specs(tiny_pair, lm):
    assert decodetune.generate is generate
    a = decodetune.generate(tiny_pair, PROMPTS[:2], DecodingConfig(max_new_tokens=4))
    b = generate(LoadedModel(*tiny_pair), PROMPTS[:2], DecodingConfig(max_new_tokens=4))
    assert [g.token_ids for g in a] == [g.token_ids for g in b]
    chat = [{"role": "user", "content": "Paris"}]
    assert generate(lm, [chat], {"max_new_tokens": 3})[0].num_prompt_tokens == len(lm.encode(chat))


def test_progress_bar_runs(lm, capsys):
    gens = generate(lm, PROMPTS, [DecodingConfig(max_new_tokens=3), DecodingConfig(max_new_tokens=3),
                                  DecodingConfig(strategy="beam", num_beams=2, max_new_tokens=3),
                                  DecodingConfig(max_new_tokens=3)], progress=True)
    assert len(gens) == 4


@pytest.mark.parametrize("args, kwargs, message", [
    (([], DecodingConfig()), {}, "prompts: empty prompt list"),
    ((PROMPTS, [DecodingConfig()] * 3), {}, "configs: got 3 configs for 4 prompts"),
    ((PROMPTS, DecodingConfig()), {"seeds": [1, 2]}, "seeds: got 2 seeds for 4 prompts"),
    ((PROMPTS, DecodingConfig()), {"seeds": [1, 2, -1, None]}, "seeds[2]: must be a non-negative integer"),
    ((PROMPTS, DecodingConfig()), {"batch_size": 0}, "batch_size: must be a positive integer"),
    (([3], DecodingConfig()), {}, "prompts[0]: expected a string or a list of chat messages"),
    ((PROMPTS, {"temprature": 1}), {}, "temprature: unknown config key"),
])
def test_bad_input_is_one_line_user_error(lm, args, kwargs, message):
    with pytest.raises(UserError) as e:
        generate(lm, *args, **kwargs)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)
