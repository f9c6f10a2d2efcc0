"""Regression tests for the correctness holes of issue 11 (each failed before its fix)."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import build_tiny_model
from decodetune.cli.options import build_config
from decodetune.config import DEFAULT_SAMPLER_ORDER, DecodingConfig
from decodetune.decoding import sampler as S
from decodetune.decoding.beam import BeamRequest, beam_search
from decodetune.decoding.processors import RowParams
from decodetune.decoding.runner import ModelRunner
from decodetune.errors import ConfigError
from decodetune.tuning.estimator import DecodingEstimator
from decodetune.tuning.space import default_space


def config_error(**kwargs) -> ConfigError:
    """The ConfigError that ``DecodingConfig(**kwargs)`` raises."""
    with pytest.raises(ConfigError) as e:
        DecodingConfig(**kwargs)
    assert "\n" not in str(e.value)
    return e.value


# ---------------------------------------------------------------- beams need num_beams >= 2
@pytest.mark.parametrize("strategy", ["beam", "beam_sample"])
def test_beam_strategies_with_one_beam_are_refused(strategy):
    err = config_error(strategy=strategy, num_beams=1, temperature=0.7)
    assert err.field == "num_beams" and ">= 2" in str(err)
    assert config_error(strategy=strategy).field == "num_beams"  # the default num_beams is 1
    assert config_error(strategy=strategy, num_beams=0).field == "num_beams"


def test_default_spaces_and_estimator_still_build_beam_configs():
    for grid in (True, False):
        space = default_space(grid=grid)
        cfg = space.config({"strategy": "beam"})
        assert cfg.num_beams >= 2
    grid_space = default_space(grid=True)
    for point in grid_space.grid():
        grid_space.config(point)  # every point of the default grid is a valid config
    assert DecodingEstimator(beam_size=1).config().strategy == "greedy"
    assert DecodingEstimator(beam_size=1, temperature=0.5).config().strategy == "sample"
    assert DecodingEstimator(beam_size=3).config().num_beams == 3
    with pytest.raises(ConfigError, match="^num_beams"):
        DecodingEstimator(strategy="beam").config()


# ---------------------------------------------------------------- top-p: same kept set whatever the batch
def boundary_rows(vocab: int = 4096, seeds: range = range(6)) -> list[tuple[torch.Tensor, float]]:
    """Peaked rows, each with a top_p equal to the float32 mass of its m most likely tokens (ties at p)."""
    cases = []
    for seed in seeds:
        g = torch.Generator().manual_seed(seed)
        logits = torch.randn(1, vocab, generator=g)
        logits[0, :8] += torch.tensor([9.0, 8.5, 8.0, 7.5, 7.0, 6.5, 6.0, 5.5])
        mass = logits.softmax(dim=1).sort(dim=1, descending=True).values.cumsum(dim=1)
        cases += [(logits, float(mass[0, m - 1])) for m in range(2, 8)]
    return cases


def sampling_rows(**per_row: list) -> RowParams:
    n = len(next(iter(per_row.values())))
    return RowParams.from_configs(
        [DecodingConfig(strategy="sample", **{k: v[i] for k, v in per_row.items()}) for i in range(n)], "cpu")


@pytest.mark.parametrize("min_keep", [1, 2])
def test_top_p_row_keeps_the_same_set_alone_or_batched(min_keep):
    flat = torch.zeros(1, 4096)  # its top 256 hold 6% of the mass: it needs a full sort
    mismatches = 0
    for logits, p in boundary_rows():
        alone = S.top_p(logits, sampling_rows(top_p=[p]), min_keep)
        batch = torch.cat([flat, logits, flat * 0.5])
        batched = S.top_p(batch, sampling_rows(top_p=[0.9, p, 0.5]), min_keep)[1:2]
        full_sort = S._top_p_keep(logits.softmax(dim=1), sampling_rows(top_p=[p]), min_keep, depths=())
        mismatches += not torch.equal(alone, batched)
        mismatches += not torch.equal(alone, logits.masked_fill(~full_sort, -math.inf))
    assert mismatches == 0


def test_top_p_row_draws_the_same_tokens_alone_or_batched():
    flat = torch.zeros(1, 4096)
    for logits, p in boundary_rows(seeds=range(3)):
        alone_rows = sampling_rows(top_p=[p])
        alone = S.apply_samplers(logits, alone_rows).softmax(dim=1)
        batch_rows = sampling_rows(top_p=[p, 0.95], temperature=[1.0, 1.3], min_p=[0.0, 0.01])
        batched = S.apply_samplers(torch.cat([logits, flat]), batch_rows).softmax(dim=1)[:1]
        assert torch.equal(alone, batched)
        gens = [S.make_generator(7, torch.device("cpu")) for _ in range(2)]
        for _ in range(20):
            assert torch.equal(S.draw(alone, gens[:1]), S.draw(batched, gens[1:]))


# ---------------------------------------------------------------- early_stopping: bools by identity
@pytest.mark.parametrize("value", [1, 0, 1.0, "true", None])
def test_early_stopping_refuses_numbers_and_strings(value):
    assert config_error(strategy="beam", num_beams=2, early_stopping=value).field == "early_stopping"


@pytest.mark.parametrize("value", [True, False, "never"])
def test_early_stopping_accepts_bools_and_never(value):
    assert DecodingConfig(strategy="beam", num_beams=2, early_stopping=value).early_stopping is value


# ---------------------------------------------------------------- non-finite and unbounded floats
@pytest.mark.parametrize("name, value", [
    ("presence_penalty", math.inf), ("frequency_penalty", -math.inf), ("presence_penalty", 2.5),
    ("frequency_penalty", -2.01), ("temperature", math.inf), ("repetition_penalty", math.inf),
    ("length_penalty", math.inf), ("length_penalty", -math.inf), ("temperature", "inf"),
])
def test_non_finite_or_out_of_range_floats_are_refused(name, value):
    assert config_error(strategy="sample", **{name: value}).field == name


def test_penalties_accept_vllm_range():
    cfg = DecodingConfig(presence_penalty=-2, frequency_penalty=2.0)
    assert (cfg.presence_penalty, cfg.frequency_penalty) == (-2.0, 2.0)


# ---------------------------------------------------------------- None in int fields
@pytest.mark.parametrize("name", ["max_new_tokens", "min_new_tokens", "top_k", "no_repeat_ngram_size",
                                  "num_beams", "num_return_sequences"])
def test_int_field_none_is_a_config_error(name):
    assert config_error(**{name: None}).field == name


def test_seed_none_stays_valid_and_big_seeds_stay_exact():
    assert DecodingConfig(seed=None).seed is None
    assert DecodingConfig(seed=2**62 + 1).seed == 2**62 + 1  # not rounded through a float
    assert config_error(sampler_order=None).field == "sampler_order"


# ---------------------------------------------------------------- replace() with the alias
def test_replace_accepts_the_beam_size_alias():
    base = DecodingConfig(strategy="beam", num_beams=2)
    assert base.replace(beam_size=4).num_beams == 4
    assert base.replace(num_beams=3).num_beams == 3
    with pytest.raises(ConfigError, match="given twice"):
        base.replace(beam_size=4, num_beams=4)
    with pytest.raises(ConfigError) as e:
        base.replace(beam_width=4)
    assert e.value.field == "beam_width"


# ---------------------------------------------------------------- sampler_order must place every sampler used
def test_partial_sampler_order_omitting_a_used_sampler_is_refused():
    err = config_error(strategy="sample", temperature=0.7, top_p=0.9, sampler_order=["top_p"])
    assert err.field == "sampler_order" and "temperature" in str(err)
    with pytest.raises(ConfigError, match="^sampler_order"):
        DecodingConfig(strategy="sample", top_p=0.9, sampler_order=["top_p"]).replace(top_k=40)


def test_partial_sampler_order_naming_every_used_sampler_is_kept():
    cfg = DecodingConfig(strategy="sample", temperature=0.7, top_p=0.9, sampler_order=["top_p", "temperature"])
    assert cfg.full_sampler_order[:2] == ["top_p", "temperature"]
    only = DecodingConfig(strategy="sample", top_p=0.9, sampler_order=["top_p"])  # the only sampler in use
    assert sorted(only.full_sampler_order) == sorted(DEFAULT_SAMPLER_ORDER)
    # a config that does not sample runs no sampler, so its order cannot be ambiguous
    DecodingConfig(strategy="greedy", temperature=0.7, sampler_order=["top_p"])


# ---------------------------------------------------------------- beam_sample without an EOS id
def test_beam_sample_keeps_two_candidates_per_beam_without_eos():
    """transformers keeps min_tokens_to_keep = 2 when there is no EOS; top_k = 1 must not leave one token.

    With one token per beam, the second beam is a copy of the first scored -1e9 (transformers' "never"):
    its hypothesis is returned with a score near -1e9 / length.
    """
    model = build_tiny_model(64, seed=3)
    cfg = DecodingConfig(strategy="beam_sample", num_beams=2, num_return_sequences=2, temperature=1.0, top_k=1,
                         max_new_tokens=4)
    runner = ModelRunner(model)
    with torch.inference_mode():
        results, _ = beam_search(runner, [BeamRequest(0, [5, 6, 7], cfg, seed=1)], pad_token_id=0,
                                 eos_token_ids=[], decode=lambda ids: " ".join(map(str, ids)))
    hyps = results[0]
    assert len(hyps) == 2
    assert all(h.score > -1e6 for h in hyps), [h.score for h in hyps]
    assert hyps[0].token_ids != hyps[1].token_ids


# ---------------------------------------------------------------- fields the strategy ignores
def test_ignored_fields_by_strategy():
    assert DecodingConfig(strategy="greedy", temperature=0.7, top_k=5).ignored_fields() == ["temperature", "top_k"]
    assert DecodingConfig(strategy="sample", temperature=0.7, length_penalty=0.5).ignored_fields() == [
        "length_penalty"]
    assert DecodingConfig(strategy="sample", temperature=0.0, top_p=0.5, seed=3).ignored_fields() == [
        "top_p", "seed"]
    assert DecodingConfig(strategy="beam", num_beams=2, seed=1, early_stopping=True).ignored_fields() == ["seed"]
    assert DecodingConfig(strategy="sample", temperature=0.7, top_p=0.9, seed=1).ignored_fields() == []
    assert DecodingConfig().ignored_fields() == []


def test_build_config_warns_once_per_ignored_flag_on_stderr(capsys):
    cfg = build_config({"__file__": None, "strategy": "greedy", "temperature": 0.7})
    assert cfg.temperature == 0.7
    err = capsys.readouterr().err
    assert err == "warning: temperature is ignored by strategy greedy\n"
    build_config({"__file__": None, "strategy": "sample", "temperature": 0.0, "top_p": 0.5})
    assert capsys.readouterr().err == "warning: top_p is ignored by strategy sample at temperature 0\n"
    build_config({"__file__": None, "strategy": "sample", "temperature": 0.7})
    assert capsys.readouterr().err == ""
