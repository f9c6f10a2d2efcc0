"""The tuning loop against a deterministic evaluator stand-in: batching, resume, pruning, failures, bad input."""

from __future__ import annotations

import json

import optuna
import pytest
from optuna.trial import TrialState

from decodetune.config import DecodingConfig
from decodetune.errors import UserError
from decodetune.tasks.base import Task, TaskItem
from decodetune.tuning import tune
from decodetune.tuning.study import resolve_storage
from test_tuning_fakes import FakeEval, make_fake_compare, toy_task

NUMERIC = {"strategy": "sample", "temperature": {"low": 0.1, "high": 2.0, "log": True},
           "top_p": {"low": 0.5, "high": 1.0}}
GRID6 = {"strategy": ["greedy", "sample"], "temperature": [0.3, 0.5], "top_p": [0.9, 1.0]}  # 1 + 4 = 5 points


@pytest.fixture()
def run(tiny_pair, tmp_path):
    def _run(ev=None, **kw):
        ev = ev or FakeEval()
        kw.setdefault("out_dir", tmp_path / "out")
        kw.setdefault("task", toy_task())
        return tune(tiny_pair, kw.pop("task"), evaluate_many=ev, compare=make_fake_compare(ev), **kw), ev
    return _run


def load(tmp_path, name):
    info = resolve_storage(None, tmp_path / "out")
    return optuna.load_study(study_name=name, storage=info.storage)


def test_random_search_batches_trials_into_one_call_and_stores_ci(run, tmp_path):
    res, ev = run(search="random", n_trials=8, batch_trials=4, seed=1, prune=False)
    dev_calls = [c for c in ev.calls if c["split"] == "dev"]
    assert [c["n_configs"] for c in dev_calls] == [4, 4]  # two batches of 4 configs, one call each
    study = load(tmp_path, res.study_name)
    done = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(done) == 8
    for t in done:
        m = t.user_attrs["metrics"]["exact_match"]
        assert m["ci_low"] <= m["value"] <= m["ci_high"] and m["value"] == t.values[0]
        assert t.user_attrs["n_items"] == 40 and t.user_attrs["pruned"] is False
    best = max(done, key=lambda t: t.values[0])
    assert res.best_trial.number == best.number
    saved = json.loads((tmp_path / "out" / "best_config.json").read_text())
    assert DecodingConfig.from_dict(saved) == res.best_config
    final = study.user_attrs["final"]
    assert final["split"] == "test" and final["rows"][0]["name"] == "greedy (default)"
    assert final["dev_to_test_gap"] and final["examples"]
    changes = json.loads((tmp_path / "out" / "exports" / "changes.json").read_text())
    vllm = changes["vllm"]  # in exports/ when exact, in exports/approximate/ with the changes named
    assert vllm["file"].endswith("vllm_sampling_params.json") and (tmp_path / "out" / "exports").exists()
    assert ("approximate" in vllm["file"]) == bool(vllm["changes"])


def test_grid_is_exhaustive_and_rerun_adds_nothing(run, tmp_path):
    res, ev = run(search="grid", space=GRID6, n_trials=50, prune=False)
    study = load(tmp_path, res.study_name)
    done = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(done) == 5 and res.stats.stop_reason == "grid exhausted"
    assert len({json.dumps(t.params, sort_keys=True) for t in done}) == 5
    # optimum of the stand-in on this grid: sample, T=0.5, top_p=0.9
    assert res.best_trial.params == {"strategy": "sample", "temperature": 0.5, "top_p": 0.9}
    res2, ev2 = run(search="grid", space=GRID6, n_trials=50, prune=False)
    assert [c for c in ev2.calls if c["split"] == "dev"] == []
    assert len(load(tmp_path, res.study_name).get_trials(states=(TrialState.COMPLETE,))) == 5


def test_interrupt_leaves_storage_usable_and_rerun_completes(run, tmp_path):
    ev = FakeEval(interrupt_after=1)  # first batch completes, second raises Ctrl-C
    with pytest.raises(KeyboardInterrupt):
        run(ev, search="random", n_trials=8, batch_trials=4, prune=False, study_name="s")
    study = load(tmp_path, "s")
    states = [t.state for t in study.trials]
    assert states.count(TrialState.COMPLETE) == 4 and states.count(TrialState.FAIL) == 4
    assert TrialState.RUNNING not in states
    assert all(t.user_attrs["error"] == "interrupted" for t in study.trials if t.state == TrialState.FAIL)
    res, ev2 = run(search="random", n_trials=8, batch_trials=4, prune=False, study_name="s")
    study = load(tmp_path, "s")
    assert len(study.get_trials(states=(TrialState.COMPLETE,))) == 8  # completed ones count toward --trials
    assert sum(c["n_configs"] for c in ev2.calls if c["split"] == "dev") == 4


def test_wilcoxon_pruning_stops_bad_trials_and_never_picks_them(run, tmp_path):
    res, ev = run(search="random", n_trials=16, batch_trials=4, seed=3)
    study = load(tmp_path, res.study_name)
    done = study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))
    assert len(done) == 16  # pruned trials count toward --trials
    pruned = [t for t in done if t.state == TrialState.PRUNED]
    assert pruned, "expected some pruned trials on a space with clearly bad configs"
    assert all(t.user_attrs["pruned"] for t in pruned)
    assert not any(t.user_attrs["pruned"] for t in done if t.state == TrialState.COMPLETE)
    assert res.stats.trials_pruned == len(pruned) and res.stats.tokens_saved_by_pruning > 0
    for t in pruned:
        n = t.user_attrs["items_evaluated"]
        assert n < 40 and len(t.intermediate_values) == n
        # the running mean is kept where decodetune reads it; Optuna's value is only its last step's
        mean = t.user_attrs["metrics"]["exact_match"]["value"]
        assert mean == pytest.approx(sum(t.intermediate_values.values()) / n)
        assert mean < res.best_trial.values[0]
        assert "per_item" not in t.user_attrs  # only fully evaluated trials are paired by importance
    assert res.best_trial.state == TrialState.COMPLETE and not res.best_trial.user_attrs["pruned"]
    assert study.best_trial.state == TrialState.COMPLETE  # Optuna (and its pruner) pair against a full one
    assert study.best_trial.values[0] == res.best_trial.values[0]
    full = [t for t in done if t.state == TrialState.COMPLETE]
    assert all(len(t.intermediate_values) == 40 for t in full)  # what the pruner pairs against
    for t in full:  # per-item scores in dev order: what the step-indexed intermediate values say
        assert t.user_attrs["per_item"] == [int(t.intermediate_values[i]) for i in range(40)]
    # items are visited in a shuffled order that differs between batches; chunks of one batch are disjoint
    chunks = [c["indices"] for c in ev.calls if c["split"] == "dev" and c["n_items"] < 40]
    assert chunks[0] != sorted(chunks[0]) and set(chunks[0]).isdisjoint(chunks[1])
    assert len({tuple(c) for c in chunks}) == len(chunks)
    assert study.user_attrs["totals"]["tokens_saved_by_pruning"] == round(res.stats.tokens_saved_by_pruning)


GRID_BAD = {"strategy": ["greedy", "sample"], "temperature": [0.02, 0.03, 8.0], "top_p": [0.9]}  # greedy + 3 hopeless


def test_pruned_grid_points_count_as_explored(run, tmp_path):
    res, _ = run(search="grid", space=GRID_BAD, n_trials=50, batch_trials=1)
    study = load(tmp_path, res.study_name)
    states = [t.state for t in study.trials]
    assert states.count(TrialState.PRUNED) >= 2 and len(states) == 4, states
    assert res.stats.stop_reason == "grid exhausted" and res.best_trial.params["strategy"] == "greedy"
    res2, ev2 = run(search="grid", space=GRID_BAD, n_trials=50, batch_trials=1)
    assert [c for c in ev2.calls if c["split"] == "dev"] == []  # a pruned point is not run again
    assert len(load(tmp_path, res.study_name).trials) == 4


def test_status_and_report_count_pruned_trials(run, tmp_path):
    from decodetune.cli.status_cmd import study_status
    from decodetune.tuning.report import collect

    res, _ = run(search="grid", space=GRID_BAD, n_trials=50, batch_trials=1)
    study = load(tmp_path, res.study_name)
    n_pruned = len(study.get_trials(states=(TrialState.PRUNED,)))
    info = study_status(study)
    assert info["pruned"] == n_pruned and info["complete"] == 4 - n_pruned
    d = collect(study)
    assert (d["n_complete"], d["n_pruned"]) == (4 - n_pruned, n_pruned)
    assert d["ranked"][0].number == res.best_trial.number and d["ranked"][-1].state == TrialState.PRUNED


def test_failing_trial_is_marked_failed_and_study_goes_on(run, tmp_path):
    ev = FakeEval(fail_when=lambda c: c.strategy == "greedy")
    res, _ = run(ev, search="grid", space=GRID6, n_trials=10, prune=False)
    study = load(tmp_path, res.study_name)
    failed = study.get_trials(states=(TrialState.FAIL,))
    assert len(failed) == 1 and failed[0].params["strategy"] == "greedy"
    assert failed[0].user_attrs["error"] == "RuntimeError: boom for greedy"
    assert len(study.get_trials(states=(TrialState.COMPLETE,))) == 4


def test_budget_tokens_stops_the_search(run):
    res, ev = run(search="random", n_trials=40, batch_trials=2, prune=False, budget_tokens=1000)
    # each trial generates 40 items x 10 tokens = 400; the budget is reached after 3 trials (1200)
    assert res.stats.stop_reason == "token budget"
    assert res.stats.trials_told == 4  # checked between batches of 2
    assert res.stats.tokens_generated >= 1000


@pytest.mark.parametrize("search", ["tpe", "gp", "cmaes", "nsga2"])
def test_model_based_searches_run_on_numeric_space(run, search):
    res, ev = run(search=search, space=NUMERIC, n_trials=6, batch_trials=3, prune=False, final_test=False)
    assert res.stats.trials_told == 6 and res.best_trial is not None
    assert all(c["n_configs"] == 3 for c in ev.calls)


def test_multi_objective_gives_pareto_front(run, tmp_path):
    res, _ = run(search="nsga2", objectives=["exact_match:max", "length:min"], space=NUMERIC, n_trials=8)
    study = load(tmp_path, res.study_name)
    assert len(study.directions) == 2 and not study.user_attrs["pruning"]
    front = {t.number for t in study.best_trials}
    assert {t.number for t in res.best_trials} == front
    assert res.test["rows"] and "length" in res.test["rows"][-1]["metrics"]


def test_bad_objectives_fail_before_generation(run):
    ev = FakeEval()
    with pytest.raises(UserError, match="--objective blue: unknown metric 'blue'"):
        run(ev, objectives=["blue"], n_trials=2)
    with pytest.raises(UserError, match="direction must be max or min"):
        run(ev, objectives=["exact_match:up"], n_trials=2)
    with pytest.raises(UserError, match="gen_ppl has no natural direction"):
        run(ev, objectives=["gen_ppl"], n_trials=2)
    open_task = Task(name="story", kind="open", metrics=["distinct-2"],
                     splits={"dev": [TaskItem("a", "Once")], "test": [TaskItem("b", "Then")]})
    with pytest.raises(UserError, match="exact_match needs references, but task story"):
        run(ev, task=open_task, objectives=["exact_match:max"], n_trials=2)
    assert ev.calls == []


def test_bad_space_and_storage_fail_before_generation(run, tmp_path):
    ev = FakeEval()
    bad = tmp_path / "space.yaml"
    bad.write_text("strategy: sample\ntop_p: {low: 0.9, high: 0.1}\n")
    with pytest.raises(UserError, match=r"space.yaml:2: top_p: low \(0.9\) > high \(0.1\)"):
        run(ev, space=str(bad), n_trials=2)
    with pytest.raises(UserError, match=r"storage: cannot open 'postgresql://u:\*\*\*@127.0.0.1:9/db'"):
        run(ev, storage="postgresql://u:secret@127.0.0.1:9/db", n_trials=2)
    (tmp_path / "afile").write_text("a file where a folder should be\n")
    with pytest.raises(UserError, match="cannot create the folder, .*afile is a file"):
        run(ev, storage=f"sqlite:///{tmp_path}/afile/x.db", n_trials=2)
    with pytest.raises(UserError, match="neither an Optuna storage URL"):
        run(ev, storage=str(tmp_path / "x.txt"), n_trials=2)
    with pytest.raises(UserError, match="CMA-ES needs a numeric-only space"):
        run(ev, search="cmaes", n_trials=2)
    assert ev.calls == []


def test_resumed_study_must_match(run):
    run(search="random", n_trials=2, prune=False, study_name="s", final_test=False)
    with pytest.raises(UserError, match="created with a different space"):
        run(search="random", n_trials=2, prune=False, study_name="s", space=NUMERIC)
    with pytest.raises(UserError, match="optimises 1 objective"):
        run(search="random", n_trials=2, study_name="s", objectives=["exact_match", "length:min"])


def test_journal_storage_and_parallel_style_resume(run, tmp_path):
    journal = str(tmp_path / "j" / "study.journal")
    run(search="random", n_trials=3, storage=journal, study_name="j", prune=False, final_test=False)
    res, ev = run(search="random", n_trials=5, storage=journal, study_name="j", prune=False, final_test=False)
    assert res.stats.trials_told == 2
    info = resolve_storage(journal, tmp_path)
    assert len(optuna.load_study(study_name="j", storage=info.storage).trials) == 5


def test_model_generation_config_becomes_a_default_to_beat():
    from types import SimpleNamespace

    from transformers import GenerationConfig

    from decodetune.tuning.final import model_generation_config

    def lm(**kw):
        return SimpleNamespace(model=SimpleNamespace(generation_config=GenerationConfig(**kw)))

    assert model_generation_config(lm(do_sample=True, temperature=0.6, top_p=0.9)) == DecodingConfig(
        strategy="sample", temperature=0.6, top_p=0.9)
    assert model_generation_config(lm(num_beams=4)) == DecodingConfig(strategy="beam", num_beams=4)
    # sampling knobs without do_sample are ignored by transformers: that is greedy, no extra baseline
    assert model_generation_config(lm(temperature=0.6)) is None
    assert model_generation_config(lm()) is None


def test_report_of_a_study_with_failures_and_no_test_check(run, tmp_path):
    from decodetune.tuning.report import render_html

    ev = FakeEval(fail_when=lambda c: c.strategy == "greedy")
    res, _ = run(ev, search="grid", space=GRID6, n_trials=10, prune=False, final_test=False)
    page = render_html(load(tmp_path, res.study_name))
    assert "No test-split check stored" in page
    assert "Failed trials" in page and "RuntimeError: boom for greedy" in page
    assert page.count("plotly.js v") == 1
