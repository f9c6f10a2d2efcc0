"""Processors and samplers against hand-computed references and transformers' LogitsProcessor classes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats
from transformers.generation import logits_process as hf

from decodetune import DecodingConfig
from decodetune.decoding import sampler as S
from decodetune.decoding.processors import RowParams, TokenState, apply_processors
from decodetune.decoding.sampler import apply_samplers, draw, make_generator

INF = float("-inf")


def rows_of(**per_row) -> RowParams:
    """RowParams of sampling rows with the given per-row values (lists of equal length)."""
    n = len(next(iter(per_row.values())))
    configs = [DecodingConfig(strategy="sample", **{k: v[i] for k, v in per_row.items()}) for i in range(n)]
    return RowParams.from_configs(configs, "cpu")


def kept(logits: torch.Tensor) -> list[list[int]]:
    return [torch.nonzero(torch.isfinite(r)).flatten().tolist() for r in logits]


PROBS = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
LOGITS = PROBS.log()


# ---------------------------------------------------------------- hand-computed references
def test_temperature_divides_logits_per_row():
    logits = torch.tensor([[1.0, 2.0, -3.0], [1.0, 2.0, -3.0]])
    out = S.temperature(logits, rows_of(temperature=[0.5, 2.0]), 1)
    assert torch.equal(out, torch.tensor([[2.0, 4.0, -6.0], [0.5, 1.0, -1.5]]))
    # softmax(logits / T): T = 1 is the model's distribution
    assert torch.allclose(S.temperature(logits, rows_of(temperature=[1.0]), 1)[:1].softmax(1), logits[:1].softmax(1))


def test_top_k_keeps_ties_with_the_kth_score():
    logits = torch.tensor([[5.0, 4.0, 4.0, 3.0, 1.0]] * 4)
    out = S.top_k(logits, rows_of(top_k=[1, 2, 4, 0]), 1)
    assert kept(out) == [[0], [0, 1, 2], [0, 1, 2, 3], [0, 1, 2, 3, 4]]
    assert kept(S.top_k(logits[:1], rows_of(top_k=[1]), 3)) == [[0, 1, 2]]  # min_keep wins over k


@pytest.mark.parametrize("p, expected", [(0.4, [0]), (0.75, [0, 1]), (0.85, [0, 1, 2]), (0.99, [0, 1, 2, 3])])
def test_top_p_keeps_smallest_prefix_with_mass_at_least_p(p, expected):
    assert kept(S.top_p(LOGITS, rows_of(top_p=[p]), 1)) == [expected]


@pytest.mark.parametrize("m, expected", [(0.0, [0, 1, 2, 3]), (0.2, [0, 1, 2]), (0.4, [0, 1]), (0.7, [0]),
                                         (1.0, [0])])
def test_min_p_keeps_tokens_above_scaled_max(m, expected):
    assert kept(S.min_p(LOGITS, rows_of(min_p=[m]), 1)) == [expected]


def typical_reference(probs: np.ndarray, mass: float) -> list[int]:
    """Meister et al.: sort by |surprisal - entropy|, keep the shortest prefix with mass >= typical_p."""
    logp = np.log(probs)
    entropy = -(probs * logp).sum()
    order = np.argsort(np.abs(-logp - entropy), kind="stable")
    cum = np.cumsum(probs[order])
    n = int(np.searchsorted(cum, mass, side="left")) + 1
    return sorted(order[:n].tolist())


@pytest.mark.parametrize("mass", [0.2, 0.5, 0.7, 0.9])
def test_typical_p_against_reference(mass):
    probs = np.array([0.4, 0.25, 0.2, 0.1, 0.05])
    logits = torch.tensor(np.log(probs), dtype=torch.float32).unsqueeze(0)
    assert kept(S.typical_p(logits, rows_of(typical_p=[mass]), 1)) == [typical_reference(probs, mass)]


@pytest.mark.parametrize("eps, expected", [(0.1, [0, 1, 2]), (0.2, [0, 1]), (0.6, [0])])
def test_epsilon_cutoff(eps, expected):
    assert kept(S.epsilon_cutoff(LOGITS, rows_of(epsilon_cutoff=[eps]), 1)) == [expected]
    assert kept(S.epsilon_cutoff(LOGITS, rows_of(epsilon_cutoff=[0.6]), 3)) == [[0, 1, 2]]


@pytest.mark.parametrize("eta", [0.04, 0.1, 0.2, 0.5, 0.9])
def test_eta_cutoff_hewitt(eta):
    probs = PROBS[0].double().numpy()
    entropy = -(probs * np.log(probs)).sum()
    threshold = min(eta, math.sqrt(eta) * math.exp(-entropy))
    expected = [i for i, p in enumerate(probs) if p >= threshold] or [0]
    assert kept(S.eta_cutoff(LOGITS, rows_of(eta_cutoff=[eta]), 1)) == [expected]


def test_draw_is_exact_sampling_chi_square():
    probs = torch.tensor([[0.4, 0.3, 0.15, 0.1, 0.05, 0.0]])
    gen = make_generator(1234, torch.device("cpu"))
    n = 20000
    draws = torch.cat([draw(probs.expand(100, -1), [gen] * 100) for _ in range(n // 100)])
    counts = torch.bincount(draws, minlength=6).double().numpy()
    assert counts[5] == 0  # a zero-probability token is never drawn
    expected = np.array([0.4, 0.3, 0.15, 0.1, 0.05]) * n
    assert stats.chisquare(counts[:5], expected).pvalue > 1e-3
    # the test has power: the same draws are far from a slightly different distribution
    wrong = np.array([0.37, 0.33, 0.15, 0.1, 0.05]) * n
    assert stats.chisquare(counts[:5], wrong).pvalue < 1e-6


def test_exponential_race_top2_is_sampling_without_replacement():
    """Stochastic beam search's draw: top-k of probs / Exponential(1) = sequential draws without replacement."""
    probs = torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05])
    n = 20000
    gens = [make_generator(s, torch.device("cpu")) for s in range(8)]
    picks = []
    for _ in range(n // 8):
        keys = probs / S.exponential_noise((8, 5), gens, torch.device("cpu"))
        picks += [tuple(r) for r in torch.topk(keys, 2, dim=1).indices.tolist()]
    pairs = [(i, j) for i in range(5) for j in range(5) if i != j]
    observed = np.array([picks.count(pr) for pr in pairs], dtype=float)
    p = probs.double().numpy()
    expected = np.array([p[i] * p[j] / (1 - p[i]) for i, j in pairs]) * n
    assert stats.chisquare(observed, expected * observed.sum() / expected.sum()).pvalue > 1e-3


# ---------------------------------------------------------------- transformers' classes, per-row parameters
def random_logits(rows: int, vocab: int = 40, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=g) * 3
    logits[:, 7] = logits[:, 3]  # ties
    return logits


def hf_rowwise(logits: torch.Tensor, warpers: list) -> torch.Tensor:
    return torch.cat([w(None, logits[i:i + 1]) if w is not None else logits[i:i + 1] for i, w in enumerate(warpers)])


def same_support(a: torch.Tensor, b: torch.Tensor) -> None:
    assert torch.equal(torch.isfinite(a), torch.isfinite(b))
    assert torch.allclose(a[torch.isfinite(a)], b[torch.isfinite(b)], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("min_keep", [1, 3])
def test_stages_match_transformers_with_per_row_params(min_keep):
    logits = random_logits(6)
    cases = {
        "temperature": ([0.3, 0.7, 1.0, 1.5, 2.0, 0.9], lambda v: hf.TemperatureLogitsWarper(v) if v != 1 else None),
        "top_k": ([1, 2, 5, 0, 40, 3], lambda v: hf.TopKLogitsWarper(v, min_tokens_to_keep=min_keep) if v else None),
        "top_p": ([0.1, 0.5, 0.9, 1.0, 0.95, 0.3],
                  lambda v: hf.TopPLogitsWarper(v, min_tokens_to_keep=min_keep) if v < 1 else None),
        "min_p": ([0.0, 0.05, 0.1, 0.5, 0.9, 1.0], lambda v: hf.MinPLogitsWarper(v, min_tokens_to_keep=min_keep)),
        "typical_p": ([0.2, 0.5, 0.9, 1.0, 0.95, 0.05],
                      lambda v: hf.TypicalLogitsWarper(v, min_tokens_to_keep=min_keep) if v < 1 else None),
        "epsilon_cutoff": ([0.0, 0.001, 0.01, 0.05, 0.2, 0.5],
                           lambda v: hf.EpsilonLogitsWarper(v, min_tokens_to_keep=min_keep) if v else None),
        "eta_cutoff": ([0.0, 0.001, 0.01, 0.05, 0.2, 0.5],
                       lambda v: hf.EtaLogitsWarper(v, min_tokens_to_keep=min_keep) if v else None),
    }
    for name, (values, make) in cases.items():
        ours = S.STAGES[name][0](logits, rows_of(**{name: values}), min_keep)
        same_support(ours, hf_rowwise(logits, [make(v) for v in values]))


def test_rows_with_different_sampler_orders_in_one_batch():
    logits = random_logits(4, seed=3)
    orders = [["temperature", "top_p"], ["top_p", "temperature"], ["min_p", "top_k", "temperature"], []]
    params = dict(temperature=[3.0, 3.0, 0.5, 2.0], top_p=[0.6, 0.6, 1.0, 0.8], top_k=[0, 0, 3, 5],
                  min_p=[0.0, 0.0, 0.2, 0.0])
    configs = [DecodingConfig(strategy="sample", sampler_order=o, **{k: v[i] for k, v in params.items()})
               for i, o in enumerate(orders)]
    ours = apply_samplers(logits, RowParams.from_configs(configs, "cpu"))
    hf_by_name = {"temperature": lambda c: hf.TemperatureLogitsWarper(c.temperature),
                  "top_k": lambda c: hf.TopKLogitsWarper(c.top_k) if c.top_k else None,
                  "top_p": lambda c: hf.TopPLogitsWarper(c.top_p) if c.top_p < 1 else None,
                  "min_p": lambda c: hf.MinPLogitsWarper(c.min_p)}
    for i, c in enumerate(configs):
        row = logits[i:i + 1]
        for name in c.full_sampler_order:
            w = hf_by_name.get(name, lambda c: None)(c)
            row = w(None, row) if w is not None else row
        same_support(ours[i:i + 1], row)
    # temperature before top-p keeps a different set than after it: the order matters
    assert not torch.equal(torch.isfinite(ours[0]), torch.isfinite(ours[1]))


def test_greedy_rows_get_neutral_sampler_params():
    params = RowParams.from_configs([DecodingConfig(temperature=0.1, top_k=3),
                                     DecodingConfig(strategy="sample", temperature=0.0, top_p=0.5)], "cpu")
    assert params.sampling == [False, False]
    assert not any(params.active(n) for n in S.STAGES)


# ---------------------------------------------------------------- penalties, n-grams, min_new_tokens
def state_for(prompts, configs, generated=(), vocab=20, eos=(2,)):
    params = RowParams.from_configs(configs, "cpu")
    state = TokenState(prompts, 8, vocab, params, list(eos), "cpu")
    for step in generated:
        state.append(torch.tensor(step))
    return state


def test_repetition_penalty_matches_transformers_and_ignores_padding():
    prompts = [[5, 6, 7], [9], [3, 3, 4]]
    configs = [DecodingConfig(repetition_penalty=p) for p in (1.5, 0.7, 1.0)]
    state = state_for(prompts, configs, generated=[[8, 1, 1]])
    logits = random_logits(3, vocab=20, seed=5)
    ours = apply_processors(logits, state)
    for i, (p, c) in enumerate(zip(prompts, configs, strict=True)):
        ids = torch.tensor([p + [[8, 1, 1][i]]])
        ref = hf.RepetitionPenaltyLogitsProcessor(c.repetition_penalty)(ids, logits[i:i + 1].clone()) \
            if c.repetition_penalty != 1 else logits[i:i + 1]
        assert torch.equal(ours[i:i + 1], ref)
    # the padding of row 1 (left of token 9) did not penalise anything else
    assert torch.equal(torch.isclose(ours[1], logits[1]).logical_not().nonzero().flatten(), torch.tensor([1, 9]))


def test_presence_and_frequency_penalties_count_output_only():
    configs = [DecodingConfig(presence_penalty=0.5, frequency_penalty=0.25), DecodingConfig()]
    state = state_for([[4, 4, 5], [4]], configs, generated=[[4, 6], [4, 6], [9, 6]])
    logits = torch.zeros(2, 20)
    out = apply_processors(logits, state)
    expected = torch.zeros(2, 20)
    expected[0, 4] = -(0.5 + 0.25 * 2)   # generated twice (prompt occurrences do not count)
    expected[0, 9] = -(0.5 + 0.25)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_no_repeat_ngram_matches_transformers(n):
    seqs = [[1, 2, 3, 1, 2, 5, 1, 2], [4, 4, 4, 4, 6, 4, 4, 4], [7, 8, 9, 10, 11, 12, 7, 8]]
    state = state_for(seqs, [DecodingConfig(no_repeat_ngram_size=n)] * 3)
    logits = random_logits(3, vocab=20, seed=9)
    ours = apply_processors(logits, state)
    ref = hf.NoRepeatNGramLogitsProcessor(n)(torch.tensor(seqs), logits.clone())
    assert torch.equal(ours, ref)


def test_no_repeat_ngram_per_row_sizes_and_padding():
    seqs = [[1, 2, 3, 1, 2], [3, 1, 2], [1, 2, 1]]
    state = state_for(seqs, [DecodingConfig(no_repeat_ngram_size=n) for n in (3, 3, 2)])
    out = apply_processors(torch.zeros(3, 20), state)
    assert kept_banned(out) == [[3], [], [2]]  # row 1: prefix (1, 2) never continued; padding bans nothing


def kept_banned(logits):
    return [torch.nonzero(torch.isinf(r)).flatten().tolist() for r in logits]


def test_min_new_tokens_bans_every_eos_until_reached():
    configs = [DecodingConfig(min_new_tokens=2), DecodingConfig(min_new_tokens=0), DecodingConfig(min_new_tokens=1)]
    state = state_for([[5], [5], [5]], configs, eos=(2, 3))
    logits = random_logits(3, vocab=20, seed=1)
    assert kept_banned(apply_processors(logits, state)) == [[2, 3], [], [2, 3]]
    ref = hf.MinNewTokensLengthLogitsProcessor(1, 2, [2, 3])(torch.tensor([[5]]), logits[:1])
    assert torch.equal(apply_processors(logits, state)[:1], ref)
    state.append(torch.tensor([7, 7, 7]))
    assert kept_banned(apply_processors(logits, state)) == [[2, 3], [], []]
    state.append(torch.tensor([7, 7, 7]))
    assert kept_banned(apply_processors(logits, state)) == [[], [], []]


def test_inactive_processors_are_skipped():
    state = state_for([[1, 2]], [DecodingConfig()])
    logits = random_logits(1, vocab=20)
    assert apply_processors(logits, state) is logits  # nothing ran, not even a copy
    assert apply_samplers(logits, RowParams.from_configs([DecodingConfig(strategy="sample")], "cpu")) is logits


@pytest.mark.parametrize("scale", [8.0, 2.5, 0.05])  # peaky: top-256 suffices; flatter: 2048; flat: full sort
@pytest.mark.parametrize("min_keep", [1, 2])
def test_top_p_partial_sort_path_matches_transformers(scale, min_keep):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(5, 6000, generator=g) * scale
    values = [0.1, 0.5, 0.9, 1.0, 0.97]
    ours = S.top_p(logits, rows_of(top_p=values), min_keep)
    ref = hf_rowwise(logits, [hf.TopPLogitsWarper(v, min_tokens_to_keep=min_keep) if v < 1 else None
                              for v in values])
    same_support(ours, ref)
    # ranking only as deep as needed keeps exactly what a full sort keeps
    full_sort = S._top_p_keep(logits.softmax(dim=1), rows_of(top_p=values), min_keep, depths=())
    assert torch.equal(ours, logits.masked_fill(~full_sort, INF))
