"""vLLM's token-level controls in the flat loop: ignore_eos, stop_token_ids, top_logprobs."""

from __future__ import annotations

import pytest

from decodetune import DecodingConfig
from decodetune.decoding import generate

PROMPTS = ["The quick brown fox", "Once upon a time there was a small robot", "Paris", "What is 12 plus"]
from conftest import TINY_EOS as EOS  # noqa: E402
from conftest import assert_raw_top_logprobs  # noqa: E402


def test_ignore_eos_runs_to_max_new_tokens(lm):
    plain = generate(lm, PROMPTS, DecodingConfig(max_new_tokens=25))
    ended = [i for i, g in enumerate(plain) if g.finish_reason == "eos"]
    assert ended  # EOS 116 is frequent
    gens = generate(lm, PROMPTS, DecodingConfig(max_new_tokens=25, ignore_eos=True), batch_size=2)
    for g, p in zip(gens, plain, strict=True):
        assert len(g.token_ids) == 25 and g.finish_reason == "length"
        assert g.token_ids[:len(p.token_ids)] == p.token_ids  # greedy: the same tokens up to and past the EOS
        assert g.text == lm.decode(g.token_ids)
    assert any(set(gens[i].token_ids) & set(EOS) for i in ended)


def test_stop_token_ids_end_the_row_keep_the_token_and_drop_its_text(lm):
    full = generate(lm, [PROMPTS[1]], DecodingConfig(max_new_tokens=30, ignore_eos=True))[0]
    k = next(k for k in range(3, 30) if full.token_ids[k] not in full.token_ids[:k] and full.token_ids[k] not in EOS)
    stop = full.token_ids[k]
    g = generate(lm, [PROMPTS[1], PROMPTS[0]], DecodingConfig(max_new_tokens=30, ignore_eos=True,
                                                               stop_token_ids=[stop, 319]))[0]
    assert g.finish_reason == "stop"
    assert g.token_ids == full.token_ids[:k + 1]
    assert g.text == lm.decode(full.token_ids[:k])


def test_stop_token_ids_are_banned_before_min_new_tokens(lm):
    full = generate(lm, [PROMPTS[1]], DecodingConfig(max_new_tokens=30, ignore_eos=True))[0]
    stop = full.token_ids[2]
    g = generate(lm, [PROMPTS[1]], DecodingConfig(max_new_tokens=30, min_new_tokens=8, stop_token_ids=[stop]))[0]
    assert stop not in g.token_ids[:8]
    assert g.finish_reason != "stop" or (g.token_ids[-1] == stop and len(g.token_ids) > 8)


@pytest.mark.parametrize("cfg", [
    DecodingConfig(max_new_tokens=10, top_logprobs=5),
    DecodingConfig(strategy="sample", temperature=0.7, top_k=8, repetition_penalty=1.5, seed=4, max_new_tokens=10,
                   top_logprobs=3),
])
def test_top_logprobs_are_the_raw_model_distribution(lm, cfg):
    other = DecodingConfig(max_new_tokens=7, top_logprobs=1)  # another N in the same batch
    gens = generate(lm, PROMPTS[:3] + [PROMPTS[3]], [cfg] * 3 + [other], logprobs=True)
    for g in gens:
        assert_raw_top_logprobs(lm, PROMPTS[g.prompt_index], g, cfg.top_logprobs if g.prompt_index < 3 else 1)
        for step, top in enumerate(g.top_logprobs):
            if g.token_ids[step] in top:
                assert top[g.token_ids[step]] == pytest.approx(g.logprobs[step], abs=1e-6)
    assert generate(lm, PROMPTS[:1], DecodingConfig(max_new_tokens=3))[0].top_logprobs is None
