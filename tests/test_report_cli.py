"""`decodetune tune / report / demo` end to end on a tiny model saved as a local HF folder; the HTML report;
optuna-dashboard opening the same storage; bad input as one `error:` line with exit code 2."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from wsgiref.util import setup_testing_defaults

import pytest
import torch

from decodetune.cli.main import main


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_dir(model_dir):
    return str(model_dir)  # conftest's tiny model folder, as a CLI argument


@pytest.fixture(scope="module")
def tuned(tiny_dir, tmp_path_factory):
    """One CLI tune run shared by the report / dashboard tests."""
    out = tmp_path_factory.mktemp("tune-out")
    code = main(["tune", "--model", tiny_dir, "--task", "arith", "--limit", "10", "--trials", "4",
                 "--search", "random", "--out", str(out), "--batch-trials", "2", "--quiet"])
    assert code == 0
    return out


def test_tune_cli_writes_outputs_and_rerun_continues(tuned, tiny_dir, capsys):
    best = json.loads((tuned / "best_config.json").read_text())
    assert best["max_new_tokens"] == 12  # arith's default, part of the exported config
    assert json.loads((tuned / "exports" / "generation_config.json").read_text())["max_new_tokens"] == 12
    changes = json.loads((tuned / "exports" / "changes.json").read_text())
    llama = changes["llamacpp"]  # exact unless the tuned config uses what llama.cpp does differently
    assert Path(llama["file"]).read_text().startswith("-n 12")
    assert ("approximate" in llama["file"]) == (not llama["exact"]) == bool(llama["changes"])
    summary = json.loads((tuned / "summary.json").read_text())
    assert summary["test"]["split"] == "test" and summary["run"]["trials_told"] == 4
    # the same command again: the study has its 4 trials, nothing new runs, and the first line says so
    capsys.readouterr()
    code = main(["tune", "--model", tiny_dir, "--task", "arith", "--limit", "10", "--trials", "4",
                 "--search", "random", "--out", str(tuned), "--batch-trials", "2", "--quiet", "--no-report"])
    assert code == 0
    assert json.loads((tuned / "summary.json").read_text())["run"]["trials_told"] == 0
    err = capsys.readouterr().err.splitlines()
    assert re.fullmatch(r"resuming study arith-.+-random: 4 trials already done; add --fresh to start over",
                        err[0]), err


def test_tune_cli_fresh_deletes_the_study_and_starts_over(tuned, tiny_dir, tmp_path, capsys):
    out = tmp_path / "copy"
    shutil.copytree(tuned, out)  # the shared study stays as it is
    capsys.readouterr()
    code = main(["tune", "--model", tiny_dir, "--task", "arith", "--limit", "10", "--trials", "1",
                 "--search", "random", "--out", str(out), "--no-test", "--no-report", "--fresh"])
    err = capsys.readouterr().err.splitlines()
    assert code == 0, err
    assert re.fullmatch(r"--fresh: deleted study arith-.+-random \(4 trials\) from sqlite:///.+/study\.db; "
                        r"starting over \(cached generations are kept\)", err[0]), err
    assert not any(line.startswith("resuming") for line in err)
    # without a terminal: a plain progress line per trial, not nothing
    assert sum(1 for line in err if re.match(r"trial 0 \(1/1 this run\): numeric_match=", line)) == 1, err
    import optuna

    [summary] = optuna.get_all_study_summaries(f"sqlite:///{out / 'study.db'}")
    assert summary.n_trials == 1


def test_report_is_one_self_contained_page(tuned, tmp_path, capsys):
    out = tmp_path / "r.html"
    assert main(["report", "--storage", f"sqlite:///{tuned / 'study.db'}", "--out", str(out)]) == 0
    page = out.read_text()
    assert page.count("plotly.js v") == 1  # the library's banner: inlined exactly once
    assert "<script src=" not in page  # nothing fetched from a CDN
    for section in ("Optimisation history", "Parameter importances", "Slice plot",
                    "Held-out test split", "Dev-to-test gap", "Example generations", "greedy (default)"):
        assert section in page, section
    assert page.count("Plotly.newPlot") >= 3
    assert "best trials on dev" in capsys.readouterr().out  # the terminal summary table
    # tune wrote the same report next to the study
    assert (tuned / "report.html").read_text().count("plotly.js v") == 1


def test_optuna_dashboard_opens_the_study(tuned):
    import optuna_dashboard

    from decodetune.tuning.study import resolve_storage

    app = optuna_dashboard.wsgi(resolve_storage(f"sqlite:///{tuned / 'study.db'}", tuned).storage)

    def get(path):
        env, status = {}, {}
        setup_testing_defaults(env)
        env.update(PATH_INFO=path, REQUEST_METHOD="GET")
        body = b"".join(app(env, lambda s, h, e=None: status.setdefault("s", s)))
        return status["s"], json.loads(body)

    status, listing = get("/api/studies")
    assert status.startswith("200")
    [summary] = listing["study_summaries"]
    assert summary["study_name"].startswith("arith-") and summary["study_name"].endswith("-random")
    status, detail = get(f"/api/studies/{summary['study_id']}")
    assert status.startswith("200") and len(detail["trials"]) == 4
    assert {a["key"] for a in detail["union_user_attrs"]} >= {"metrics", "config", "tokens_generated"}


@pytest.mark.parametrize("args, message", [
    (["--space", "{space}"], "space.yaml:2: top_p: low (0.9) > high (0.1)"),
    (["--objective", "bleuu"], "--objective bleuu: unknown metric 'bleuu'"),
    (["--objective", "chrf"], "--objective chrf: metric chrf needs references"),
    (["--search", "cmaes"], "--search cmaes: CMA-ES needs a numeric-only space"),
    (["--search", "annealing"], "--search: unknown search 'annealing'"),
    (["--storage", "postgresql://u:pw@127.0.0.1:9/x"], "storage: cannot open 'postgresql://u:***@127.0.0.1:9/x'"),
    (["--trials", "0"], "--trials: must be >= 1"),
])
def test_bad_input_is_one_error_line(tiny_dir, tmp_path, capsys, args, message):
    space = tmp_path / "space.yaml"
    space.write_text("strategy: sample\ntop_p: {low: 0.9, high: 0.1}\n")
    task = "story" if "chrf" in args else "arith"
    argv = ["tune", "--model", tiny_dir, "--task", task, "--out", str(tmp_path / "o"), "--quiet"]
    code = main(argv + [a.replace("{space}", str(space)) for a in args])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: ") and message in err and "Traceback" not in err
    assert not (tmp_path / "o" / "study.cache.sqlite").exists() or "storage" in message  # nothing generated


def test_report_bad_input(tmp_path, tuned, capsys):
    assert main(["report", "--storage", str(tmp_path / "none.journal")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["report", "--storage", f"sqlite:///{tuned / 'study.db'}", "--study-name", "nope"]) == 2
    assert "no study 'nope' in the storage; it has arith-" in capsys.readouterr().err


def test_demo_runs_end_to_end(tiny_dir, tmp_path, capsys):
    code = main(["demo", "--model", tiny_dir, "--out", str(tmp_path), "--trials", "4", "--limit", "10",
                 "--threads", "1"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "test split (10 items never seen by the search): tuned numeric_match" in captured.out
    assert "demo finished in" in captured.err
    assert (tmp_path / "report.html").exists() and (tmp_path / "best_config.json").exists()
    assert len([line for line in captured.err.splitlines() if re.match(r"trial \d+ \(\d/4 this run\)", line)]) == 4
    assert not captured.err.startswith("resuming")
    # again: the study is reused, said on the first line, before the banner
    code = main(["demo", "--model", tiny_dir, "--out", str(tmp_path), "--trials", "4", "--limit", "10",
                 "--threads", "1"])
    err = capsys.readouterr().err.splitlines()
    assert code == 0
    assert err[0] == "resuming study demo-arith: 4 trials already done; add --fresh to start over", err
    assert err[1].startswith("decodetune demo: ") and sum(line.startswith("resuming") for line in err) == 1
    # --fresh: the demo's study is deleted and the search starts over
    code = main(["demo", "--model", tiny_dir, "--out", str(tmp_path), "--trials", "1", "--limit", "10",
                 "--threads", "1", "--fresh"])
    err = capsys.readouterr().err
    assert code == 0
    assert "--fresh: deleted study demo-arith (4 trials) from sqlite:///" in err and "resuming" not in err
    assert len([line for line in err.splitlines() if re.match(r"trial \d+ \(1/1 this run\)", line)]) == 1
