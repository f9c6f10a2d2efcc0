"""What `tune` hands the user (issue 15): best_config.json with only the fields that matter, and a CLI
summary whose tables never cut a number or a ``k=v`` item in two at 80 columns."""

from __future__ import annotations

import json
import re

import optuna
import pytest
from optuna.distributions import FloatDistribution
from rich.console import Console

from decodetune.config import DecodingConfig
from decodetune.tuning import report
from decodetune.tuning.core import TuneResult
from decodetune.tuning.final import essential_fields, write_outputs
from decodetune.tuning.importance import KnobVerdict
from decodetune.tuning.objectives import Objective
from decodetune.tuning.runner import RunStats

optuna.logging.set_verbosity(optuna.logging.WARNING)

#: winners with fields their strategy never reads (a beam config's temperature and top_k, a greedy seed)
WINNERS = [
    DecodingConfig(strategy="beam", num_beams=4, length_penalty=0.8, max_new_tokens=12, temperature=0.7,
                   top_k=20, top_p=0.9, seed=3),
    DecodingConfig(strategy="greedy", max_new_tokens=10, repetition_penalty=1.2, seed=5, top_k=7,
                   length_penalty=2.0),
    DecodingConfig(strategy="sample", temperature=0.8, top_p=0.95, max_new_tokens=9, seed=11, num_beams=1,
                   length_penalty=1.5),
]


def _result(best: DecodingConfig, out) -> TuneResult:
    study = optuna.create_study(direction="maximize", study_name="s")
    study.set_user_attr("backend", "torch")
    return TuneResult(study, "s", "sqlite://", out, [Objective("exact_match", "max")], [], best, RunStats())


@pytest.mark.parametrize("best", WINNERS, ids=[c.strategy for c in WINNERS])
def test_best_config_lists_only_the_fields_that_matter(best, tmp_path):
    result = _result(best, tmp_path)
    write_outputs(result)
    saved = json.loads((tmp_path / "best_config.json").read_text())
    assert saved == essential_fields(best)
    assert saved["strategy"] == best.strategy
    assert not set(saved) & set(best.ignored_fields())  # nothing the strategy ignores
    defaults = DecodingConfig().to_dict()
    assert all(saved[k] != defaults[k] for k in saved if k != "strategy")  # nothing a load fills in anyway
    loaded = DecodingConfig.load(tmp_path / "best_config.json")
    assert loaded.ignored_fields() == [] and loaded == result.best_config
    # the same config otherwise: put the ignored fields back and it is the tuned one
    assert loaded.replace(**{k: getattr(best, k) for k in best.ignored_fields()}) == best
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["best_config"] == saved


def test_beam_best_config_has_no_sampling_fields(tmp_path):
    write_outputs(_result(WINNERS[0], tmp_path))
    saved = json.loads((tmp_path / "best_config.json").read_text())
    assert saved == {"strategy": "beam", "max_new_tokens": 12, "num_beams": 4, "length_penalty": 0.8}


def test_best_config_generates_the_same_tokens(tiny_pair, tmp_path):
    from decodetune.decoding import generate
    from decodetune.models.handle import LoadedModel

    lm = LoadedModel(*tiny_pair, name="tiny")
    prompts = ["What is 12 plus 7?", "The quick brown fox"]
    for i, best in enumerate(WINNERS):
        write_outputs(_result(best, tmp_path / str(i)))
        loaded = DecodingConfig.load(tmp_path / str(i) / "best_config.json")
        seeds = [best.seed] * len(prompts) if best.is_sampling else None
        ours = [g.token_ids for g in generate(lm, prompts, loaded, seeds=seeds)]
        assert ours == [g.token_ids for g in generate(lm, prompts, best, seeds=seeds)], best.strategy


# ---------------------------------------------------------------- the summary at 80 columns

CONFIGS = [
    {"strategy": "sample", "temperature": 0.7123456, "top_p": 0.91234, "repetition_penalty": 1.19412,
     "max_new_tokens": 12, "min_p": 0.0512},
    {"strategy": "beam", "num_beams": 4, "length_penalty": 1.23456, "repetition_penalty": 1.0876,
     "no_repeat_ngram_size": 3, "max_new_tokens": 12},
    {"strategy": "greedy", "max_new_tokens": 12},
]


def _study(n_objectives: int) -> optuna.Study:
    names = ["exact_match:max", "length:min"][:n_objectives]
    study = optuna.create_study(directions=["maximize", "minimize"][:n_objectives], study_name="arith-tiny-tpe")
    study.set_user_attr("objectives", names)
    for i, cfg in enumerate(CONFIGS):
        v = 0.5 + 0.1 * i
        metrics = {"exact_match": {"value": v, "ci_low": v - 0.123456, "ci_high": v + 0.1234},
                   "length": {"value": 10.51234 + i, "ci_low": 9.012345, "ci_high": 12.34567}}
        study.add_trial(optuna.trial.create_trial(
            params={"temperature": 0.1 + i / 10}, distributions={"temperature": FloatDistribution(0.1, 1.5)},
            values=[v, 10.5 + i][:n_objectives],
            user_attrs={"config": cfg, "metrics": metrics, "tokens_generated": 1234567, "pruned": False,
                        "items_evaluated": 16, "baseline": i == 2}))
    rows = [{"name": "greedy (default)", "config": {"strategy": "greedy"}, "vs": None, "paired": {},
             "metrics": {"exact_match": {"value": 0.41234, "ci_low": 0.31234, "ci_high": 0.51234}}},
            {"name": "tuned (trial 1)", "config": CONFIGS[1], "vs": "greedy (default)",
             "metrics": {"exact_match": {"value": 0.61234, "ci_low": 0.51234, "ci_high": 0.71234}},
             "paired": {"exact_match": {"diff": 0.2234, "ci_low": 0.06123, "ci_high": 0.41234, "p_value": 0.01234,
                                        "p_holm": 0.02468}}}]
    study.set_user_attr("final", {"split": "test", "n_items": 32, "held_out": True, "rows": rows})
    return study


KNOBS = [KnobVerdict("repetition_penalty", 0.41234, "matters", diff=0.12345, p_diff=0.01234, p_tost=0.51234,
                     margin=0.02, trial_a=0, trial_b=1, value_a=1.19412, value_b=1.0876, n_items=40),
         KnobVerdict("temperature", 0.11234, "no effect within ±0.02", diff=0.001234, p_diff=0.81234,
                     p_tost=0.01234, margin=0.02, trial_a=0, trial_b=2, value_a=0.7123456, value_b=1.0,
                     n_items=40)]


def _cells(study: optuna.Study) -> list[str]:
    """Every cell the summary's tables show, as print_summary formats them."""
    d = report.collect(study)
    cells = [c for t in d["ranked"] for c in report._trial_row(t, d["objectives"])]
    cells += [c for r in report._knob_rows(KNOBS) for c in r]
    for row in study.user_attrs["final"]["rows"]:
        p = row["paired"].get("exact_match", {})
        cells += [report._ci(row["metrics"]["exact_match"]), report._diff(p), report._p_cell(p)]
    return cells


@pytest.mark.parametrize("n_objectives", [1, 2])
def test_summary_at_80_columns_never_cuts_a_value(n_objectives, monkeypatch):
    monkeypatch.setattr(report, "_knobs", lambda study: KNOBS)
    study = _study(n_objectives)
    console = Console(width=80, record=True, color_system=None)
    report.print_summary(study, console=console)
    text = console.export_text()
    assert max(len(line) for line in text.splitlines()) <= 80
    flat = " ".join(text.replace("│", " ").replace("┃", " ").split())  # words as a reader sees them
    words = {w for c in _cells(study) for w in c.split()}
    assert {"repetition_penalty=1.19,", "temperature=0.712,", "no_repeat_ngram_size=3,", "1234567",
            "[0.377,", "0.623]", "[+0.0612,", "0.0247"} <= words
    for w in words:  # each number and k=v item appears whole, on one line (a stacked row adds ":" and ";")
        assert re.search(rf"(^|\s){re.escape(w)}([\s;:]|$)", flat), w
    for line in text.splitlines():  # no cell ends mid-value ("temperature=0." / "712")
        assert not re.search(r"[=.]\s*[│┃]", line), line
        assert not re.search(r"[=.]$", line.rstrip()), line
    assert "which knobs matter" in text and "test split (32 items)" in text


def test_summary_keeps_a_table_where_it_fits(monkeypatch):
    monkeypatch.setattr(report, "_knobs", lambda study: [])
    console = Console(width=80, record=True, color_system=None)
    report.print_summary(_study(1), console=console)
    text = console.export_text()
    assert "┃ config" in text and "│ 0.5 [0.377, 0.623] │" in text  # numbers on one line when there is room
    wide = Console(width=200, record=True, color_system=None)
    report.print_summary(_study(2), console=wide)
    assert "strategy=sample, temperature=0.712, top_p=0.912, repetition_penalty=1.19" in wide.export_text()
