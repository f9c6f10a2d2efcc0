"""vLLM's token controls in beam search (and contrastive search): ignore_eos, stop_token_ids, top_logprobs."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from decodetune import DecodingConfig, UserError
from decodetune.decoding import generate
from decodetune.models.handle import LoadedModel

PROMPTS = ["The quick brown fox", "Once upon a time there was a small robot", "Paris", "What is 12 plus"]
from conftest import TINY_EOS as EOS  # noqa: E402
from conftest import assert_raw_top_logprobs  # noqa: E402

BEAM = DecodingConfig(strategy="beam", num_beams=3, max_new_tokens=20)


@pytest.fixture()
def lm(tiny_pair):
    model, tok = tiny_pair
    handle = LoadedModel(model, tok, name="tiny")
    handle.eos_token_ids = list(EOS)
    return handle


def a_stop_token(lm, prompt, cfg):
    """A token of the ignore_eos best beam, first seen at position >= 3, not an EOS id."""
    full = generate(lm, [prompt], cfg.replace(ignore_eos=True))[0]
    return next(t for k, t in enumerate(full.token_ids) if k >= 3 and t not in full.token_ids[:k] and t not in EOS)


@pytest.mark.parametrize("cfg", [BEAM, BEAM.replace(strategy="beam_sample", temperature=0.8, seed=3)])
def test_ignore_eos_gives_max_new_tokens_like_a_model_without_eos(lm, cfg):
    plain = generate(lm, PROMPTS, cfg.replace(num_return_sequences=2))
    assert any(g.finish_reason == "eos" for g in plain)  # EOS 116 is frequent on the tiny model
    gens = generate(lm, PROMPTS, cfg.replace(num_return_sequences=2, ignore_eos=True))
    assert all(len(g.token_ids) == 20 and g.finish_reason == "length" for g in gens)
    lm.eos_token_ids = []  # ignore_eos: EOS is an ordinary token, as for a model that has none
    without = generate(lm, PROMPTS, cfg.replace(num_return_sequences=2))
    assert [g.token_ids for g in gens] == [g.token_ids for g in without]
    assert [g.text for g in gens] == [lm.decode(g.token_ids) for g in gens]


@pytest.mark.parametrize("cfg", [BEAM, BEAM.replace(strategy="beam_sample", temperature=0.8, seed=5),
                                 BEAM.replace(min_new_tokens=6, length_penalty=0.5)])
def test_stop_token_ids_end_beams_like_an_eos_id(lm, cfg):
    stop = a_stop_token(lm, PROMPTS[1], cfg)
    gens = generate(lm, PROMPTS, cfg.replace(stop_token_ids=[stop], num_return_sequences=3), logprobs=True)
    lm.eos_token_ids = [*EOS, stop]
    as_eos = generate(lm, PROMPTS, cfg.replace(num_return_sequences=3), logprobs=True)
    assert any(g.finish_reason == "stop" for g in gens)
    for g, ref in zip(gens, as_eos, strict=True):
        assert g.token_ids == ref.token_ids and g.score == pytest.approx(ref.score)
        assert g.text == ref.text  # the stop token stays in the ids and out of the text, as EOS
        ended_on_stop = ref.finish_reason == "eos" and ref.token_ids[-1] == stop
        assert g.finish_reason == ("stop" if ended_on_stop else ref.finish_reason)
        if cfg.min_new_tokens:
            assert stop not in g.token_ids[:cfg.min_new_tokens]


def test_stop_token_ids_do_not_change_the_other_requests_of_the_batch(lm):
    stop = a_stop_token(lm, PROMPTS[1], BEAM)
    sampled = BEAM.replace(strategy="beam_sample", temperature=0.8)
    alone = generate(lm, PROMPTS[:2], sampled, seeds=[1, 2])
    mixed = generate(lm, PROMPTS[:2], [sampled, sampled.replace(stop_token_ids=[stop])], seeds=[1, 2])
    assert mixed[0].token_ids == alone[0].token_ids  # its draws did not see the other's extra candidates


@pytest.mark.parametrize("cfg", [BEAM.replace(top_logprobs=4, repetition_penalty=1.6, num_return_sequences=2),
                                 BEAM.replace(strategy="beam_sample", temperature=0.7, top_k=6, seed=2,
                                              top_logprobs=2)])
def test_top_logprobs_follow_the_beam_and_are_the_raw_distribution(lm, cfg):
    other = BEAM.replace(max_new_tokens=6, top_logprobs=1)  # another N in the same batch
    gens = generate(lm, PROMPTS, [cfg] * 3 + [other], logprobs=True)
    for g in gens:
        # most likely first, before the repetition penalty / top_k
        ref = assert_raw_top_logprobs(lm, PROMPTS[g.prompt_index], g, cfg.top_logprobs if g.prompt_index < 3 else 1)
        assert g.logprobs == pytest.approx(ref.gather(1, torch.tensor(g.token_ids).unsqueeze(1)).squeeze(1).tolist(),
                                           abs=2e-4)
    assert generate(lm, PROMPTS[:1], BEAM)[0].top_logprobs is None


def test_diverse_beam_still_refuses_them(lm):
    cfg = BEAM.replace(strategy="diverse_beam", num_beams=4, num_beam_groups=2, diversity_penalty=1.0)
    for field, value in (("ignore_eos", True), ("stop_token_ids", [5]), ("top_logprobs", 2)):
        with pytest.raises(UserError, match=field):
            generate(lm, PROMPTS[:1], dataclasses.replace(cfg, **{field: value}))


CONTRASTIVE = DecodingConfig(strategy="contrastive", penalty_alpha=0.6, top_k=4, max_new_tokens=18)


def test_contrastive_token_controls(lm):
    plain = generate(lm, PROMPTS, CONTRASTIVE.replace(ignore_eos=True, top_logprobs=3), logprobs=True)
    assert all(len(g.token_ids) == 18 and g.finish_reason == "length" for g in plain)
    for g in plain:
        assert_raw_top_logprobs(lm, PROMPTS[g.prompt_index], g, 3)
    g = plain[1]
    k = next(k for k in range(3, 18) if g.token_ids[k] not in g.token_ids[:k])
    stopped = generate(lm, [PROMPTS[1]], CONTRASTIVE.replace(ignore_eos=True, stop_token_ids=[g.token_ids[k]]))[0]
    assert stopped.finish_reason == "stop" and stopped.token_ids == g.token_ids[:k + 1]
    assert stopped.text == lm.decode(g.token_ids[:k])
