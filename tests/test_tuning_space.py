"""Search spaces: YAML parsing, conditions, grids, and errors that name file:line before any generation."""

from __future__ import annotations

import math

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from decodetune.config import DecodingConfig
from decodetune.errors import UserError
from decodetune.tuning.space import default_space, load_space, parse_space
from decodetune.tuning.study import make_sampler

SPACE_YAML = """\
strategy: [greedy, beam, sample]
max_new_tokens: 16
num_beams: {low: 2, high: 6, step: 2}
temperature: {low: 0.1, high: 2.0, log: true}
top_p: {choices: [0.8, 0.9, 1.0]}
length_penalty: {value: 0.5, when: {strategy: beam}}
repetition_penalty: {low: 1.0, high: 1.4, step: 0.2}
"""


def write(tmp_path, text, name="space.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def test_yaml_space_distributions_and_implicit_conditions(tmp_path):
    space = load_space(write(tmp_path, SPACE_YAML))
    assert space["strategy"].distribution() == CategoricalDistribution(["greedy", "beam", "sample"])
    assert space["num_beams"].distribution() == IntDistribution(2, 6, step=2)
    assert space["temperature"].distribution() == FloatDistribution(0.1, 2.0, log=True)
    assert space["repetition_penalty"].distribution() == FloatDistribution(1.0, 1.4, step=0.2)
    assert space["max_new_tokens"].kind == "fixed" and space["max_new_tokens"].value == 16
    # beam knobs only under beam, sampling knobs only under sample (added because strategy is searched)
    assert space["num_beams"].when == {"strategy": ("beam",)}
    assert space["temperature"].when == {"strategy": ("sample",)}
    assert space["top_p"].when == {"strategy": ("sample",)}
    assert space["repetition_penalty"].when == {}


@pytest.mark.parametrize("strategy, present, absent", [
    ("greedy", {"repetition_penalty"}, {"num_beams", "temperature", "top_p"}),
    ("beam", {"num_beams", "repetition_penalty"}, {"temperature", "top_p"}),
    ("sample", {"temperature", "top_p", "repetition_penalty"}, {"num_beams"}),
])
def test_conditional_suggestions(tmp_path, strategy, present, absent):
    space = load_space(write(tmp_path, SPACE_YAML))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    study.enqueue_trial({"strategy": strategy})
    trial = study.ask()
    values = space.suggest(trial)
    assert set(trial.params) == {"strategy"} | present
    assert not absent & set(trial.params)
    cfg = space.config(values)
    assert cfg.strategy == strategy and cfg.max_new_tokens == 16
    if strategy == "beam":
        assert cfg.length_penalty == 0.5 and cfg.num_beams in (2, 4, 6)
    else:
        assert cfg.length_penalty == 1.0 and cfg.num_beams == 1


def test_grid_enumerates_conditional_space_exactly(tmp_path):
    text = "strategy: [greedy, beam, sample]\nnum_beams: [2, 4]\ntemperature: [0.5, 1.0]\ntop_p: [0.9, 1.0]\n" \
           "repetition_penalty: {low: 1.0, high: 1.2, step: 0.1}\n"
    space = load_space(write(tmp_path, text))
    grid = space.grid()
    # greedy: 3 penalties; beam: 2 widths x 3; sample: 2 x 2 x 3
    assert len(grid) == 3 + 6 + 12
    assert len({tuple(sorted(p.items())) for p in grid}) == len(grid)
    assert {p["repetition_penalty"] for p in grid} == {1.0, 1.1, 1.2}
    assert all(set(p) == {"strategy", "repetition_penalty"} for p in grid if p["strategy"] == "greedy")
    # every point makes a valid config
    for p in grid:
        space.config(p)
    assert sorted(map(str, space.grid(seed=3))) == sorted(map(str, grid))


def test_default_space_is_conditional_and_default_grid_finite():
    space = default_space()
    assert space["temperature"].log and space["temperature"].when == {"strategy": ("sample",)}
    assert space["num_beams"].when == {"strategy": ("beam",)}
    assert space["repetition_penalty"].when == {} and space["no_repeat_ngram_size"].when == {}
    for name in ("top_p", "top_k", "min_p"):
        assert space[name].when == {"strategy": ("sample",)}
    with pytest.raises(UserError, match="length_penalty: grid search needs a finite space"):
        space.grid()
    assert len(default_space(grid=True).grid()) == 2 + 8 + 12


@pytest.mark.parametrize("text, pattern", [
    ("strategy: [greedy, sample]\ntemprature: {low: 0.1, high: 1.0}\n",
     r"space.yaml:2: unknown parameter 'temprature'"),
    ("top_p: {low: 0.9, high: 0.5}\n", r"space.yaml:1: top_p: low \(0.9\) > high \(0.5\)"),
    ("strategy: sample\ntop_k: {choices: []}\n", r"space.yaml:2: top_k: choices must be a non-empty list"),
    ("strategy: sample\ntop_k: []\n", r"space.yaml:2: top_k: choices must be a non-empty list"),
    ("strategy: sample\ntemperature: {low: 0.0, high: 1.0, log: true}\n", r":2: temperature: a log-scale range"),
    ("strategy: sample\ntop_p: {low: 0.5, high: 1.5}\n", r":2: top_p: value 1.5 is invalid \(top_p: must be in"),
    ("strategy: sample\ntop_p: {low: 0.5, high: 1.0, step: 0.3}\n", r":2: top_p: step 0.3 does not divide"),
    ("num_beams: {low: 2, high: 4, when: {strategy: beam}}\n", r":1: num_beams: condition on 'strategy', which is"),
    ("strategy: [greedy, sample]\nnum_beams: {low: 2, high: 4}\n", r":2: num_beams: is only used by strategies"),
    ("strategy: [greedy, sample]\ntop_p: {low: 0.5}\n", r":2: top_p: a range needs both low and high"),
    ("strategy: [greedy, sample]\ntop_p: {lo: 0.5, high: 1}\n", r":2: top_p: unknown key 'lo'"),
    ("strategy: [greedy, bogus]\n", r":1: strategy: value 'bogus' is invalid"),
    ("num_beams: 4\nbeam_size: [2, 4]\n", r":2: beam_size is given twice"),
    ("strategy: [greedy\n", r"space.yaml:\d+: malformed YAML"),
    ("- a\n- b\n", r"space.yaml:1: a search space is a mapping"),
    ("", r"space.yaml: the search space is empty"),
])
def test_invalid_space_files_name_file_and_line(tmp_path, text, pattern):
    with pytest.raises(UserError, match=pattern):
        load_space(write(tmp_path, text))


def test_missing_space_file_is_user_error(tmp_path):
    with pytest.raises(UserError, match="file not found"):
        load_space(str(tmp_path / "nope.yaml"))


def test_cmaes_refuses_categorical_space_with_reason():
    with pytest.raises(UserError, match="CMA-ES needs a numeric-only space, but strategy is categorical"):
        make_sampler("cmaes", 0, default_space(), 1, 10)
    numeric = parse_space({"strategy": "sample", "temperature": {"low": 0.1, "high": 2.0, "log": True},
                           "top_p": {"low": 0.5, "high": 1.0}})
    assert numeric.is_numeric_only()
    assert isinstance(make_sampler("cmaes", 0, numeric, 1, 10), optuna.samplers.CmaEsSampler)
    with pytest.raises(UserError, match="one objective"):
        make_sampler("cmaes", 0, numeric, 2, 10)
    with pytest.raises(UserError, match="unknown search 'bayes'"):
        make_sampler("bayes", 0, numeric, 1, 10)


def test_fixed_strategy_resolves_conditions_statically():
    space = parse_space({"strategy": "beam_sample", "num_beams": {"low": 2, "high": 4},
                         "temperature": {"low": 0.5, "high": 1.5}})
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    trial = study.ask()
    cfg = space.config(space.suggest(trial))
    assert cfg.strategy == "beam_sample" and 2 <= cfg.num_beams <= 4 and 0.5 <= cfg.temperature <= 1.5
    assert set(trial.params) == {"num_beams", "temperature"}
    assert cfg == DecodingConfig(strategy="beam_sample", num_beams=cfg.num_beams, temperature=cfg.temperature)
    assert math.isclose(space["temperature"].low, 0.5)


def test_check_space_against_task_defaults_names_the_line(tmp_path):
    from decodetune.tasks import load_task
    from decodetune.tuning.space import check_space_against

    path = write(tmp_path, "strategy: [greedy, sample]\nmin_new_tokens: {low: 0, high: 20}\n")
    space = load_space(path)
    check_space_against(space, {})  # fine against DecodingConfig() (max_new_tokens 64)
    arith = load_task("arith").defaults  # max_new_tokens: 12
    with pytest.raises(UserError, match=r"space.yaml:2: min_new_tokens: the point .*min_new_tokens=20 is invalid "
                                        r"with the task's defaults \(max_new_tokens=12\)"):
        check_space_against(space, arith)
    check_space_against(load_space(write(tmp_path, "min_new_tokens: {low: 0, high: 12}\n")), arith)


def test_check_space_against_combinations_and_the_default_spaces():
    from decodetune.tasks import list_tasks, load_task
    from decodetune.tuning.space import check_space_against

    both = parse_space({"max_new_tokens": {"low": 4, "high": 32}, "min_new_tokens": {"low": 0, "high": 8}})
    with pytest.raises(UserError, match="min_new_tokens=8"):  # only the corner max 4 / min 8 clashes
        check_space_against(both, {})
    for task in list_tasks():
        defaults = load_task(getattr(task, "name", task)).defaults
        for space in (default_space(), default_space(grid=True)):
            check_space_against(space, defaults)
