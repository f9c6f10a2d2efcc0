"""The tuner on a tiny random Llama with the real engine, evaluator and cache: every search kind, pruning,
cache hits, resume.

The task's references are transformers' own greedy continuations (an independent reference), so our
greedy config must score exactly 1.0 on it and hot sampling must score less: a known optimum.
"""

from __future__ import annotations

import json

import optuna
import pytest
import torch
from optuna.trial import TrialState

import decodetune.evaluation.runner as eval_runner
from decodetune.config import DecodingConfig
from decodetune.eval import evaluate
from decodetune.models import load_model
from decodetune.tasks.base import Task, TaskItem
from decodetune.tuning import tune
from decodetune.tuning.study import resolve_storage

WORDS = ["The quick", "Once upon", "What is", "Paris is", "She sells", "The lazy", "a small robot", "12 plus",
         "Berlin is", "sea shells", "count numbers", "the capital", "brown fox", "loved to", "the answer",
         "over the", "jumps", "by the sea", "time there", "of France", "1 2 3", "shore and", "surely", "robot who"]
NEW = 5


@pytest.fixture(scope="module")
def echo(tiny_pair):
    """(LoadedModel, Task): 16 dev + 8 test prompts whose reference is HF greedy's continuation."""
    model, tok = tiny_pair
    lm = load_model(tiny_pair)
    items = []
    for i, text in enumerate(WORDS):
        ids = torch.tensor([lm.encode(text)])
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=NEW,
                                 min_new_tokens=NEW, pad_token_id=0)
        ref = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        items.append(TaskItem(id=f"e{i}", prompt=text, references=[ref]))
    task = Task(name="echo", kind="closed", metrics=["exact_match"], extract="none",
                splits={"dev": items[:16], "test": items[16:]},
                defaults={"max_new_tokens": NEW, "min_new_tokens": NEW})
    return lm, task


def study_of(out, name):
    return optuna.load_study(study_name=name, storage=resolve_storage(None, out).storage)


def test_greedy_reference_is_exact(echo):
    lm, task = echo
    assert evaluate(lm, task, DecodingConfig(strategy="greedy")).score == 1.0
    assert evaluate(lm, task, {"strategy": "sample", "temperature": 3.0}).score < 0.5


GRID = {"strategy": ["greedy", "sample"], "temperature": [2.0, 4.0], "top_k": [0]}
NUMERIC = {"strategy": "sample", "temperature": {"low": 0.05, "high": 4.0, "log": True},
           "top_p": {"low": 0.3, "high": 1.0}}


@pytest.mark.parametrize("search, space, objectives", [
    ("grid", GRID, None),
    ("random", None, None),
    ("tpe", None, None),
    ("gp", NUMERIC, None),
    ("cmaes", NUMERIC, None),
    ("nsga2", NUMERIC, ["exact_match:max", "length:min"]),
])
def test_every_search_kind(echo, tmp_path, search, space, objectives):
    lm, task = echo
    res = tune(lm, task, search=search, n_trials=4, space=space, objectives=objectives, out_dir=tmp_path,
               batch_trials=2, seed=0, repeats=2 if search == "gp" else 1)
    study = study_of(tmp_path, res.study_name)
    done = study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))  # pruned ones count too
    assert len(done) == (3 if search == "grid" else 4)  # the grid has 3 points
    # the first trial is the default config (greedy / T=1 sampling), it scores what evaluate() says
    first = done[0]
    ref = evaluate(lm, task, DecodingConfig.from_dict(first.user_attrs["config"]),
                   repeats=2 if search == "gp" else 1)
    assert first.values[0] == pytest.approx(ref.score)
    if space is None or space is GRID:
        assert first.params["strategy"] == "greedy" and first.values[0] == 1.0
        assert res.best_trial.values[0] == 1.0
    best = json.loads((tmp_path / "best_config.json").read_text())
    assert DecodingConfig.from_dict(best) == res.best_config
    assert res.best_config.max_new_tokens == NEW  # task defaults are part of the exported config
    final = study.user_attrs["final"]
    assert final["split"] == "test" and final["n_items"] == 8
    tuned = [r for r in final["rows"] if r["name"].startswith("tuned")]
    assert tuned and all(r["vs"] == "greedy (default)" for r in tuned)
    if objectives:
        assert len(study.best_trials) >= 1 and len(res.best_trials) == len(study.best_trials)
        from decodetune.tuning.report import render_html

        page = render_html(study)
        assert "Pareto front" in page and "Pareto-optimal configs" in page
    if search == "gp":  # sampling configs were evaluated over 2 seeds: mean and CI over items
        for t in done:
            assert t.user_attrs["n_rows"] == 2 * 16
            m = t.user_attrs["metrics"]["exact_match"]
            assert m["ci_low"] <= m["value"] <= m["ci_high"]


def test_pruning_and_cache_on_real_generations(echo, tmp_path):
    lm, task = echo
    space = {"strategy": ["greedy", "sample"], "temperature": [2.0, 3.0, 4.0, 6.0], "top_k": [0]}
    res = tune(lm, task, search="grid", space=space, n_trials=10, out_dir=tmp_path, batch_trials=1,
               final_test=False)
    study = study_of(tmp_path, res.study_name)
    done = study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))
    pruned = [t for t in done if t.state == TrialState.PRUNED]
    assert all(t.user_attrs["pruned"] for t in pruned)
    assert done[0].params["strategy"] == "greedy" and not done[0].user_attrs["pruned"]
    assert pruned, [t.values for t in done]
    assert res.stats.tokens_saved_by_pruning > 0
    for t in pruned:
        n = t.user_attrs["items_evaluated"]
        assert n < 16 and t.user_attrs["tokens_evaluated"] == n * NEW  # min_new_tokens = max_new_tokens
        # what it reported is what an independent evaluation of those items gives
        items = sorted(t.intermediate_values)
        ref = evaluate(lm, task, DecodingConfig.from_dict(t.user_attrs["config"]), item_indices=items)
        assert [t.intermediate_values[i] for i in items] == ref.per_item()
    # same space in a new study next to the same cache: nothing is generated again
    res2 = tune(lm, task, search="grid", space=space, n_trials=10, out_dir=tmp_path, batch_trials=5,
                prune=False, final_test=False, study_name="again")
    assert res2.stats.tokens_generated < res.stats.tokens_generated
    again = study_of(tmp_path, "again").get_trials(states=(TrialState.COMPLETE,))
    assert len(again) == 5 and res2.stats.cache_hits > 0
    for a in again:  # unpruned trials came back from the cache unchanged
        b = next(t for t in done if t.params == a.params)
        if not b.user_attrs["pruned"]:
            assert a.values == b.values and a.user_attrs["tokens_generated"] == 0


def test_interrupted_real_run_resumes(echo, tmp_path, monkeypatch):
    lm, task = echo
    calls = {"n": 0}
    real = eval_runner._generate

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(eval_runner, "_generate", flaky)
    with pytest.raises(KeyboardInterrupt):
        tune(lm, task, search="random", n_trials=4, out_dir=tmp_path, batch_trials=2, prune=False,
             study_name="r", seed=1)
    study = study_of(tmp_path, "r")
    assert [t.state for t in study.trials].count(TrialState.COMPLETE) == 2
    assert {t.user_attrs.get("error") for t in study.trials if t.state == TrialState.FAIL} == {"interrupted"}
    res = tune(lm, task, search="random", n_trials=4, out_dir=tmp_path, batch_trials=2, prune=False,
               study_name="r", seed=1, final_test=False)
    assert res.stats.trials_told == 2
    assert len(study_of(tmp_path, "r").get_trials(states=(TrialState.COMPLETE,))) == 4


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny matrices: one thread is faster, and much faster when other jobs share the 2 cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
