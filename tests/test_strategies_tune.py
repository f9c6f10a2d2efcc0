"""Every issue-12 strategy through the CLI (`eval`, a one-trial `tune`) on the tiny model, and the
``tokens:min`` objective (every candidate counted) that makes a quality-vs-cost Pareto front."""

from __future__ import annotations

import json

import pytest
import yaml

from decodetune import DecodingConfig
from decodetune.cli.main import main
from decodetune.evaluation import evaluate
from decodetune.models.handle import LoadedModel

STRATEGIES = {
    "self_consistency": ("arith", {"strategy": "self_consistency", "num_candidates": 3, "temperature": 0.8}),
    "mbr": ("describe", {"strategy": "mbr", "num_candidates": 3, "temperature": 0.8}),
    "best_of_n": ("arith", {"strategy": "best_of_n", "num_candidates": 3, "temperature": 0.8}),
    "contrastive": ("arith", {"strategy": "contrastive", "penalty_alpha": 0.6, "top_k": 4}),
    "diverse_beam": ("describe", {"strategy": "diverse_beam", "num_beams": 4, "num_beam_groups": 2,
                                  "diversity_penalty": 0.5}),
}


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_eval_cli(strategy, model_dir, capsys):
    task, cfg = STRATEGIES[strategy]
    code = main(["eval", "--model", str(model_dir), "--task", task, "--limit", "2", "--json", "--bootstrap", "0",
                 "--config", json.dumps({**cfg, "max_new_tokens": 5})])
    out, err = capsys.readouterr()
    assert code == 0, err
    d = json.loads(out)
    assert d["config"]["strategy"] == strategy
    assert all(k in d["config"] for k in cfg)


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_one_trial_tune_cli(strategy, model_dir, tmp_path, capsys):
    task, cfg = STRATEGIES[strategy]
    space = tmp_path / "space.yaml"
    searched = ({"temperature": {"low": 0.5, "high": 1.0}} if "temperature" in cfg
                else {"penalty_alpha": {"low": 0.2, "high": 0.8}} if strategy == "contrastive"
                else {"diversity_penalty": {"low": 0.1, "high": 2.0}})
    space.write_text(yaml.safe_dump({**{k: v for k, v in cfg.items() if k not in searched}, **searched,
                                     "max_new_tokens": 4}))
    code = main(["tune", "--model", str(model_dir), "--task", task, "--limit", "3", "--trials", "1",
                 "--search", "random", "--space", str(space), "--out", str(tmp_path / "out"), "--no-test",
                 "--no-report", "--quiet"])
    _, err = capsys.readouterr()
    assert code == 0, err
    best = json.loads((tmp_path / "out" / "best_config.json").read_text())
    assert best["strategy"] == strategy
    name = next(iter(searched))
    value = getattr(DecodingConfig.from_dict(best), name)  # best_config.json leaves out default values
    assert searched[name]["low"] <= value <= searched[name]["high"]


@pytest.fixture(scope="module")
def lm(tiny_pair):
    return LoadedModel(*tiny_pair, name="tiny")


def test_tokens_objective_counts_every_candidate(lm, tmp_path):
    from decodetune.tuning import tune

    space = {"strategy": ["greedy", "self_consistency"], "num_candidates": 4, "temperature": 0.9,
             "max_new_tokens": 6}
    res = tune(lm, "arith", search="grid", n_trials=2, space=space, out_dir=tmp_path, limit=3, seed=0,
               objectives=["numeric_match", "tokens:min"])
    trials = {t.user_attrs["config"]["strategy"]: t for t in res.study.trials}
    assert set(trials) == {"greedy", "self_consistency"}
    for strategy, trial in trials.items():
        cfg = DecodingConfig.from_dict(trial.user_attrs["config"])
        again = evaluate(lm, "arith", cfg, limit=3, bootstrap=0)
        assert trial.values[1] == pytest.approx(again.num_tokens / 3)  # mean tokens per item
        if strategy == "self_consistency":  # all 4 candidates: each row costs more than its selected text
            assert all(r["num_tokens"] >= len(r["token_ids"]) for r in again.rows)
            assert any(r["num_tokens"] > len(r["token_ids"]) for r in again.rows)
    assert trials["self_consistency"].values[1] > trials["greedy"].values[1]
    # both are on the front unless one is better in quality *and* cheaper
    front = {t.number for t in res.study.best_trials}
    assert front, "a two-objective study has a Pareto front"


def test_tune_searches_the_tasks_default_space(lm, tmp_path):
    """Without --space, tune searches default_space_for(task): arith gets self-consistency."""
    from decodetune.tuning import tune

    res = tune(lm, "arith", search="random", n_trials=1, out_dir=tmp_path, limit=2, seed=0, final_test=False)
    params = {p["name"]: p for p in res.study.user_attrs["space"]["params"]}
    assert "self_consistency" in params["strategy"]["choices"]
    assert params["num_candidates"]["when"] == {"strategy": ["self_consistency"]}


def test_open_tasks_get_dry_and_xtc_only_where_honoured():
    from decodetune.backends.capabilities import LLAMACPP, VLLM
    from decodetune.tasks import load_task
    from decodetune.tuning.space_caps import default_space_for

    story = load_task("story")
    llama = default_space_for(story, capabilities=LLAMACPP)
    assert llama["dry_multiplier"].choices == (0.0, 0.8)
    assert llama["xtc_threshold"].when == {"xtc_probability": (0.5,)}
    assert set(llama["dry_multiplier"].when["strategy"]) <= {"sample", "beam_sample", "self_consistency", "mbr",
                                                             "best_of_n"}
    assert "dry_multiplier" not in default_space_for(story, capabilities=VLLM)  # vLLM has no DRY
    assert "dry_multiplier" not in default_space_for(load_task("arith"), capabilities=LLAMACPP)  # closed task
