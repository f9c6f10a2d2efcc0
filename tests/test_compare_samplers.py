"""`compare-samplers`: every family gets the same trials over a space of the same size; the winners meet on
test against greedy and against the best family, Holm-corrected (deterministic evaluator stand-in)."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import optuna
import pytest

from decodetune.cli.main import main
from decodetune.config import DecodingConfig
from decodetune.evaluation.result import PairedDifference
from decodetune.metrics.stats import holm, wilcoxon_p
from decodetune.tuning import tune
from decodetune.tuning.samplers import FAMILIES, TEMPERATURES, compare_samplers, family_space, parse_families
from test_tuning_fakes import FakeEval, toy_task


def fake_compare(ev):
    """evaluate with the stand-in, then the paired Wilcoxon test and Holm, as compare() does."""
    def compare(model, task, configs, **kw):
        results = ev(model, task, [DecodingConfig.from_dict(c) for c in configs], **kw)
        diffs = []
        for j, r in enumerate(results[1:], start=1):
            for m in r.metrics:
                a, b = np.array(results[0].per_item(m)), np.array(r.per_item(m))
                diffs.append(PairedDifference(m, a.mean(), b.mean(), b.mean() - a.mean(), math.nan, math.nan,
                                              wilcoxon_p(b - a), "wilcoxon", len(a), config_index=j))
        for d, p in zip(diffs, holm([d.p_value for d in diffs]), strict=True):
            d.p_holm = float(p)
        return SimpleNamespace(results=results, differences=diffs)
    return compare


def test_every_family_gets_the_same_budget_and_space_size():
    sizes = {f: len(family_space(f)["temperature"]) * len(family_space(f)[knob]) for f, (knob, _) in FAMILIES.items()}
    assert set(sizes.values()) == {25}
    assert family_space("min_p") == {"strategy": "sample", "temperature": TEMPERATURES,
                                     "min_p": [0.02, 0.05, 0.1, 0.2, 0.3]}
    assert parse_families("top_p, min_p") == ["top_p", "min_p"]


def test_winners_are_compared_on_test_against_greedy_and_the_best(tiny_pair, tmp_path):
    from decodetune.backends import as_backend

    ev = FakeEval()
    backend = as_backend(tiny_pair)
    summary = compare_samplers(backend, toy_task(), ["top_p", "min_p", "top_k"], 6, out_dir=tmp_path, seed=1,
                               tune_fn=lambda *a, **kw: tune(*a, evaluate_many=ev, **kw),
                               compare_fn=fake_compare(ev))
    json.dumps(summary)  # what compare_samplers.json holds
    fams = {f["family"]: f for f in summary["families"]}
    assert set(fams) == {"top_p", "min_p", "top_k"} and summary["space_size"] == 25
    storage = f"sqlite:///{tmp_path / 'samplers.db'}"
    for f in fams.values():
        study = optuna.load_study(study_name=f["study_name"], storage=storage)
        finished = study.get_trials(states=(optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED))
        assert len(finished) == 6 == f["n_trials"]  # the same budget for every family
        assert f["vs_greedy"]["p_holm"] >= f["vs_greedy"]["p_value"]
    # the best family on test is the baseline of the second comparison; the others are paired against it
    best = max(fams.values(), key=lambda f: f["test_value"])
    assert summary["best_family"] == best["family"] and best["vs_best"] == {}
    assert all(f["vs_best"]["diff"] <= 0 for f in fams.values() if f is not best)
    # the stand-in ignores min_p and top_k, and the same seed draws the same temperatures: a tie
    assert fams["min_p"]["test_value"] == fams["top_k"]["test_value"]
    assert summary["n_test_items"] == 20 and summary["metric"] == "exact_match"


@pytest.mark.parametrize("args, message", [
    (["--families", "top_p,top_n_sigma"], "--families: unknown family 'top_n_sigma'"),
    (["--families", "top_p"], "at least two different families"),
    (["--budget", "0"], "--budget: must be >= 1"),
    (["--search", "grid"], "--search: 'grid' cannot give every family the same trials"),
])
def test_bad_input_is_one_line_before_the_model_loads(args, message, tmp_path, capsys):
    code = main(["compare-samplers", "--task", "arith", "--model", str(tmp_path / "no-model"),
                 "--out", str(tmp_path / "o"), *args])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "o").exists()
