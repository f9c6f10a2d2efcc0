"""Sampling: the right distribution end to end, and per-row seeds independent of batch composition."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats
from transformers.generation import logits_process as hf

from decodetune import DecodingConfig
from decodetune.decoding import generate
from decodetune.models.handle import LoadedModel

PROMPTS = ["The quick brown fox", "Once upon a time there was a small robot", "Paris", "What is 12 plus",
           "She sells sea shells"]


@pytest.fixture(scope="module")
def lm(tiny_pair):
    model, tok = tiny_pair
    handle = LoadedModel(model, tok, name="tiny")
    handle.eos_token_ids = [2, 116]
    return handle


def first_token_distribution(lm, prompt, warpers):
    ids = torch.tensor([lm.encode(prompt)])
    with torch.no_grad():
        logits = lm.model(ids).logits[:, -1, :].float()
    for w in warpers:
        logits = w(ids, logits)
    return logits.softmax(-1)[0].double().numpy()


def chi_square_p(observed: np.ndarray, probs: np.ndarray) -> float:
    """Pearson chi-square p-value, pooling categories with expected count < 5 (none of them observed)."""
    n = observed.sum()
    expected = probs * n
    big = expected >= 5
    obs = np.append(observed[big], observed[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    exp = exp * obs.sum() / exp.sum()
    return float(stats.chisquare(obs, exp).pvalue)


@pytest.mark.parametrize("cfg, warpers", [
    (dict(temperature=1.5, top_k=8), [hf.TemperatureLogitsWarper(1.5), hf.TopKLogitsWarper(8)]),
    (dict(temperature=0.8, top_p=0.9), [hf.TemperatureLogitsWarper(0.8), hf.TopPLogitsWarper(0.9)]),
    (dict(temperature=1.0, min_p=0.05), [hf.MinPLogitsWarper(0.05)]),
])
def test_first_token_follows_processed_distribution(lm, cfg, warpers):
    n = 3000
    prompt = PROMPTS[2]
    gens = generate(lm, [prompt] * n, DecodingConfig(strategy="sample", max_new_tokens=1, **cfg), seeds=range(n))
    vocab = lm.model.config.vocab_size
    observed = np.bincount([g.token_ids[0] for g in gens], minlength=vocab).astype(float)
    probs = first_token_distribution(lm, prompt, warpers)
    assert observed[probs == 0].sum() == 0  # truncated tokens never appear
    assert chi_square_p(observed, probs) > 1e-3
    untruncated = first_token_distribution(lm, prompt, [])  # power: the raw distribution is rejected
    assert chi_square_p(observed, untruncated) < 1e-6


TARGET = DecodingConfig(strategy="sample", temperature=0.9, top_p=0.95, repetition_penalty=1.1, seed=7,
                        max_new_tokens=20)
OTHERS = [
    DecodingConfig(max_new_tokens=5),
    DecodingConfig(strategy="sample", temperature=1.3, min_p=0.05, sampler_order=["min_p", "temperature"],
                   seed=3, max_new_tokens=12, num_return_sequences=2),
    DecodingConfig(strategy="beam", num_beams=3, max_new_tokens=6),
    DecodingConfig(strategy="sample", temperature=0.0, max_new_tokens=30),
    DecodingConfig(strategy="sample", top_k=5, no_repeat_ngram_size=2, presence_penalty=0.5, seed=11,
                   max_new_tokens=3),
]


def test_same_seed_same_tokens_whatever_the_batch(lm):
    alone = generate(lm, [PROMPTS[0]], TARGET)[0]
    assert alone.seed == 7 and len(alone.token_ids) > 1
    for pos in (0, 2, 4):
        configs = OTHERS[:4]
        configs.insert(pos, TARGET)
        prompts = PROMPTS[1:]
        prompts.insert(pos, PROMPTS[0])
        gens = generate(lm, prompts, configs)
        mine = [g for g in gens if g.prompt_index == pos]
        assert len(mine) == 1 and mine[0].token_ids == alone.token_ids, pos
    # same row 5 times with other seeds around it, and with a batch_size that splits the batch
    gens = generate(lm, [PROMPTS[0]] * 5, TARGET, seeds=[1, 2, 7, 4, 5], batch_size=2)
    assert gens[2].token_ids == alone.token_ids
    assert len({tuple(g.token_ids) for g in gens}) > 1  # different seeds, different samples


def test_seed_override_and_recorded_random_seed(lm):
    cfg = TARGET.replace(seed=None)
    assert generate(lm, [PROMPTS[0]], cfg, seeds=[7])[0].token_ids == \
        generate(lm, [PROMPTS[0]], TARGET)[0].token_ids
    fresh = generate(lm, [PROMPTS[1], PROMPTS[1]], cfg)
    assert all(isinstance(g.seed, int) for g in fresh) and fresh[0].seed != fresh[1].seed
    again = generate(lm, [PROMPTS[1]], cfg, seeds=[fresh[1].seed])[0]
    assert again.token_ids == fresh[1].token_ids


def test_return_sequences_differ_and_reproduce(lm):
    cfg = DecodingConfig(strategy="sample", temperature=1.2, seed=5, num_return_sequences=3, max_new_tokens=10)
    a = generate(lm, [PROMPTS[3]], cfg)
    assert [g.sequence_index for g in a] == [0, 1, 2]
    assert len({tuple(g.token_ids) for g in a}) == 3
    b = generate(lm, [PROMPTS[0], PROMPTS[3]], [OTHERS[1], cfg])
    assert [g.token_ids for g in b if g.prompt_index == 1] == [g.token_ids for g in a]


def test_temperature_zero_is_greedy(lm):
    greedy = generate(lm, PROMPTS, DecodingConfig(max_new_tokens=15))
    cold = generate(lm, PROMPTS, DecodingConfig(strategy="sample", temperature=0.0, top_p=0.5, max_new_tokens=15))
    assert [g.token_ids for g in greedy] == [g.token_ids for g in cold]


def test_beam_sample_seeded_and_independent_of_batch(lm):
    cfg = DecodingConfig(strategy="beam_sample", num_beams=3, num_return_sequences=3, temperature=1.2, top_k=20,
                         seed=9, max_new_tokens=10)
    alone = generate(lm, [PROMPTS[1]], cfg)
    assert [g.score for g in alone] == sorted((g.score for g in alone), reverse=True)
    mixed = generate(lm, PROMPTS[:3], [cfg.replace(seed=1), cfg, DecodingConfig(strategy="beam", num_beams=3)])
    assert [g.token_ids for g in mixed if g.prompt_index == 1] == [g.token_ids for g in alone]
    other_seed = generate(lm, [PROMPTS[1]], cfg.replace(seed=10))
    assert [g.token_ids for g in other_seed] != [g.token_ids for g in alone]
    beam = generate(lm, [PROMPTS[1]], DecodingConfig(strategy="beam", num_beams=3, num_return_sequences=3,
                                                     max_new_tokens=10))
    assert [g.token_ids for g in beam] != [g.token_ids for g in alone]
