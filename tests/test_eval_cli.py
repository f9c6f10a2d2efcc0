"""`decodetune eval`, `compare` and `tasks` through the CLI entry point (fake engine, tiny saved model)."""

from __future__ import annotations

import json

from decodetune.cli.main import main


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *needles):
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], (n, lines[0])


def test_eval_json_and_table(capsys, model_dir, engine, tmp_path):
    code, out, err = run(capsys, "eval", "--model", model_dir, "--task", "arith", "--limit", 5, "--json",
                         "--bootstrap", 100)
    assert code == 0, err
    d = json.loads(out)
    assert d["score"] == 1.0 and d["n_items"] == 5 and d["metrics"]["numeric_match"]["per_item"] == [1.0] * 5
    code, out, err = run(capsys, "eval", "-m", model_dir, "-t", "arith", "-n", 4, "--strategy", "sample",
                         "--temperature", 0.8, "--repeats", 2, "--max-new-tokens", 64,
                         "--output", tmp_path / "g.jsonl")
    assert code == 0, err
    flat = " ".join(out.split())  # the table title wraps at the table's width, which the tmp path sets
    assert "numeric_match" in out and "95% CI" in out and "4 items x 2 repeats" in flat
    cfg = engine.calls[-1]["configs"][0]
    assert (cfg.strategy, cfg.temperature, cfg.max_new_tokens) == ("sample", 0.8, 64)  # explicit beats task default
    assert len((tmp_path / "g.jsonl").read_text().splitlines()) == 8


def test_eval_config_file(capsys, model_dir, engine, tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"strategy": "sample", "top_k": 3}))
    code, _, err = run(capsys, "eval", "-m", model_dir, "-t", "arith", "-n", 2, "--config", tmp_path / "c.json",
                       "--json")
    assert code == 0, err
    cfg = engine.calls[-1]["configs"][0]
    assert (cfg.top_k, cfg.max_new_tokens) == (3, 12)


def test_eval_config_inline_json_as_compare_takes_it(capsys, model_dir, engine):
    code, _, err = run(capsys, "eval", "-m", model_dir, "-t", "arith", "-n", 2, "--json", "--top-k", 5,
                       "--config", '{"strategy": "sample", "top_k": 3, "max_new_tokens": 64}')
    assert code == 0, err
    cfg = engine.calls[-1]["configs"][0]
    # the inline fields are explicit (64 beats the task default), and a flag still beats --config
    assert (cfg.strategy, cfg.top_k, cfg.max_new_tokens) == ("sample", 5, 64)


def test_bad_task_files_exit_2_naming_file_and_line(capsys, model_dir, engine, tmp_path):
    missing = tmp_path / "missing_field.jsonl"
    missing.write_text('{"prompt": "a"}\n{"answer": "1"}\n', encoding="utf-8")
    code, _, err = run(capsys, "eval", "-m", model_dir, "-t", missing)
    assert_one_line_error(code, err, f"{missing}:2", "missing field 'prompt'")

    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes('{"prompt": "ok"}\n{"prompt": "café"}\n'.encode("latin-1"))
    code, _, err = run(capsys, "eval", "-m", model_dir, "-t", latin1)
    assert_one_line_error(code, err, f"{latin1}:2", "not valid UTF-8")

    empty = tmp_path / "empty.jsonl"
    empty.write_text("", encoding="utf-8")
    code, _, err = run(capsys, "eval", "-m", model_dir, "-t", empty)
    assert_one_line_error(code, err, str(empty), "empty task")
    assert engine.calls == []


def test_unknown_and_failing_metrics_exit_2(capsys, model_dir, engine, tmp_path, monkeypatch):
    code, _, err = run(capsys, "eval", "-m", model_dir, "-t", "arith", "-n", 2, "--metric", "bleurt")
    assert_one_line_error(code, err, "unknown metric 'bleurt'")
    assert engine.calls == []

    (tmp_path / "cli_user_metrics.py").write_text(
        "def crash(predictions, references, items):\n    raise KeyError('oops')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "kept.jsonl"
    code, _, err = run(capsys, "eval", "-m", model_dir, "-t", "arith", "-n", 3, "--metric",
                       "cli_user_metrics:crash", "--output", out)
    assert_one_line_error(code, err, "metric 'cli_user_metrics:crash' raised KeyError")
    assert len(out.read_text().splitlines()) == 3  # generations survived the failing metric

    code, _, err = run(capsys, "eval", "-m", model_dir, "-t", "story", "-n", 2, "--metric", "chrf")
    assert_one_line_error(code, err, "'chrf' needs references")


def test_bad_options_exit_2(capsys, model_dir, engine):
    code, _, err = run(capsys, "eval", "-m", model_dir, "-t", "arith", "--top-p", 3)
    assert_one_line_error(code, err, "top_p")
    code, _, err = run(capsys, "eval", "-m", model_dir, "-t", "arith", "--repeats", 0)
    assert_one_line_error(code, err, "--repeats")
    code, _, err = run(capsys, "eval", "-m", model_dir, "-t", "arith", "--split", "train")
    assert_one_line_error(code, err, "no split 'train'")


def test_compare_cli(capsys, model_dir, engine, tmp_path):
    (tmp_path / "greedy.json").write_text('{"strategy": "greedy"}')
    code, out, err = run(capsys, "compare", "-m", model_dir, "-t", "arith", "-n", 20, "-r", 2,
                         "-c", tmp_path / "greedy.json", "-c", '{"strategy": "sample"}', "--json",
                         "--bootstrap", 200)
    assert code == 0, err
    d = json.loads(out)
    assert d["labels"] == ["greedy", '{"strategy": "sample"}']
    assert len(engine.calls) == 1 and len(engine.calls[0]["prompts"]) == 20 + 40
    diff = next(x for x in d["differences"] if x["metric"] == "numeric_match")
    assert diff["config_index"] == 1 and diff["test"] == "wilcoxon" and diff["diff"] < 0
    code, out, err = run(capsys, "compare", "-m", model_dir, "-t", "arith", "-n", 20,
                         "-c", tmp_path / "greedy.json", "-c", '{"strategy": "sample"}')
    assert code == 0, err
    assert "paired differences" in out and "worse" in out


def test_compare_bad_input(capsys, model_dir, engine, tmp_path):
    code, _, err = run(capsys, "compare", "-m", model_dir, "-t", "arith", "-c", '{"strategy": "greedy"}')
    assert_one_line_error(code, err, "at least two configs")
    code, _, err = run(capsys, "compare", "-m", model_dir, "-t", "arith", "-c", "{bad", "-c", "{}")
    assert_one_line_error(code, err, "malformed inline JSON")
    code, _, err = run(capsys, "compare", "-m", model_dir, "-t", "arith", "-c", tmp_path / "nope.json", "-c", "{}")
    assert_one_line_error(code, err, "nope.json", "file not found")
    code, _, err = run(capsys, "compare", "-m", model_dir, "-t", "arith", "-c", "{}", "-c", '{"top_k": -1}')
    assert_one_line_error(code, err, "top_k")


def test_tasks_command(capsys):
    code, out, _ = run(capsys, "tasks")
    assert code == 0 and all(n in out for n in ("arith", "story", "describe"))
    code, out, _ = run(capsys, "tasks", "describe", "--json", "-n", 2)
    d = json.loads(out)
    assert d["kind"] == "reference" and len(d["examples"]) == 2 and d["metrics"][0]["name"] == "chrf"
    code, _, err = run(capsys, "tasks", "nope")
    assert_one_line_error(code, err, "unknown task 'nope'")
