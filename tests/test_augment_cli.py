"""`decodetune augment`: output file, summary, and bad input (one line, exit 2, nothing written)."""

from __future__ import annotations

import json

import pytest

from decodetune.cli.main import main

ROWS = [
    {"id": "q1", "prompt": "What is 12 plus 7? Answer with one number.", "answer": "19"},
    {"id": "q2", "prompt": "Compute 30 minus 4, and give only the final result.", "answer": "26"},
]


@pytest.fixture()
def data(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8")
    return path


def read(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_augment_writes_rows(data, tmp_path, capsys):
    out = tmp_path / "aug.jsonl"
    table = tmp_path / "syn.tsv"
    table.write_text("answer\treply\nfinal\tlast\ncompute\tcalculate\n", encoding="utf-8")
    code = main(["augment", "--input", str(data), "--out", str(out), "--ops", "swap,delete,synonym", "--n", "3",
                 "--seed", "5", "--rate", "swap=0.2,delete=0.2", "--synonyms", str(table), "--preserve", "numbers"])
    assert code == 0
    rows = read(out)
    assert [r["id"] for r in rows if r["aug_op"] == "original"] == ["q1", "q2"]
    assert {r["aug_op"] for r in rows} == {"original", "swap", "delete", "synonym"}
    for r in rows:
        assert r["answer"] == ROWS[r["aug_source"]]["answer"]
        assert [t for t in r["prompt"].split() if t.strip("?,.").isdigit()] == \
               [t for t in ROWS[r["aug_source"]]["prompt"].split() if t.strip("?,.").isdigit()]
    err = capsys.readouterr().err
    assert f"wrote {len(rows)} rows" in err
    # same seed, same file
    out2 = tmp_path / "aug2.jsonl"
    assert main(["augment", "-i", str(data), "-o", str(out2), "--ops", "swap,delete,synonym", "--n", "3",
                 "--seed", "5", "--rate", "swap=0.2,delete=0.2", "--synonyms", str(table),
                 "--preserve", "numbers"]) == 0
    assert out2.read_bytes() == out.read_bytes()


def test_no_keep_original(data, tmp_path):
    out = tmp_path / "aug.jsonl"
    assert main(["augment", "-i", str(data), "-o", str(out), "--ops", "delete", "--n", "2",
                 "--no-keep-original"]) == 0
    assert all(r["aug_op"] == "delete" for r in read(out))


@pytest.mark.parametrize(("args", "content", "message"), [
    (["--ops", "swap,explode"], None, "--ops: unknown op 'explode'"),
    (["--ops", "swap", "--rate", "1.5"], None, "--rate: swap=1.5 is outside [0, 1]"),
    (["--ops", "swap", "--rate", "delete=-0.2"], None, "--rate: delete=-0.2 is outside [0, 1]"),
    (["--ops", "swap"], "", "no rows (empty input)"),
    (["--ops", "swap"], "\n\n", "no rows (empty input)"),
    (["--ops", "swap"], '{"prompt": "fine text here"}\n{"question": "no prompt"}\n',
     "data.jsonl:2: row has no 'prompt' (or 'messages') field"),
    (["--ops", "swap", "--field", "text"], '{"text": "ok"}\n\n{"prompt": "x"}\n',
     "data.jsonl:3: row has no 'text' field"),
    (["--ops", "swap"], '{"prompt": "ok"}\nnot json\n', "data.jsonl:2: malformed JSON"),
    (["--ops", "synonym", "--synonyms", "missing.tsv"], None, "--synonyms: missing.tsv: file not found"),
    (["--ops", "swap", "--max-overlap", "2"], None, "--max-overlap: must be in [0, 1]"),
    (["--ops", "swap", "--n", "0"], None, "--n: must be >= 1"),
    (["--ops", "paraphrase", "--temperature", "-1"], None, "temperature: must be >= 0"),
])
def test_bad_input_one_line_exit_2_nothing_written(tmp_path, capsys, args, content, message):
    data = tmp_path / "data.jsonl"
    data.write_text(content if content is not None else json.dumps(ROWS[0]) + "\n", encoding="utf-8")
    out = tmp_path / "aug.jsonl"
    out.write_text("previous\n", encoding="utf-8")
    code = main(["augment", "--input", str(data), "--out", str(out), *args])
    err = capsys.readouterr().err
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err
    assert "Traceback" not in err
    assert out.read_text(encoding="utf-8") == "previous\n"  # untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["aug.jsonl", "data.jsonl"]  # no temp file left


def test_distill_augment_trains_on_originals_and_variants(tmp_path, tiny_tokenizer):
    """`decodetune distill --augment OPS` expands the prompt rows (completions kept) before training."""
    from conftest import CORPUS, build_tiny_model
    from decodetune.io import read_jsonl
    from decodetune.train.augment import row_augmenter

    teacher = tmp_path / "teacher"
    build_tiny_model(len(tiny_tokenizer), num_hidden_layers=2).save_pretrained(str(teacher))
    tiny_tokenizer.save_pretrained(str(teacher))
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": c[:30], "completion": c[30:50]}) + "\n" for c in CORPUS))
    (tmp_path / "student.yaml").write_text("num_layers: 1\n")
    out = tmp_path / "student"
    args = ["distill", "--teacher", str(teacher), "--student", str(tmp_path / "student.yaml"), "--data", str(data),
            "--out", str(out), "--steps", "1", "--batch-size", "2", "--seed", "3"]
    assert main([*args, "--augment", "swap,delete", "--augment-n", "2"]) == 0
    expected = row_augmenter("swap,delete", n=2, seed=3)([{k: v for k, v in r.items()} for r in read_jsonl(data)])
    assert len(expected) > len(CORPUS)
    meta = json.loads((out / "distill.json").read_text())
    assert meta["info"]["examples"] == len(expected)
    assert main([*args, "--augment", "swap,teleport", "--overwrite"]) == 2


def test_lm_config_flags_override_the_sampling_default_or_the_config_file(tmp_path):
    from decodetune.cli.augment_cmd import lm_config
    from decodetune.train.augment.lm_ops import DEFAULT_LM_CONFIG

    cfg = lm_config({"__file__": None, "temperature": 0.3})
    assert cfg.strategy == DEFAULT_LM_CONFIG["strategy"] and cfg.temperature == 0.3
    assert cfg.top_p == DEFAULT_LM_CONFIG["top_p"]
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps({"strategy": "beam", "num_beams": 3}))
    cfg = lm_config({"__file__": path, "max_new_tokens": 20})
    assert cfg.strategy == "beam" and cfg.num_beams == 3 and cfg.max_new_tokens == 20


def test_paraphrase_from_the_cli_with_a_local_model(tmp_path, tiny_tokenizer, capsys):
    from conftest import build_tiny_model

    model_dir = tmp_path / "tiny"
    build_tiny_model(len(tiny_tokenizer)).save_pretrained(str(model_dir))
    tiny_tokenizer.save_pretrained(str(model_dir))
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8")
    out = tmp_path / "aug.jsonl"
    args = ["augment", "-i", str(data), "-o", str(out), "--ops", "paraphrase", "--n", "2", "--model", str(model_dir),
            "--temperature", "1.0", "--max-new-tokens", "8", "--no-progress", "--seed", "4"]
    assert main(args) == 0
    first = out.read_bytes()
    rows = read(out)
    assert [r["aug_op"] for r in rows].count("original") == 2
    assert all(r["answer"] == ROWS[r["aug_source"]]["answer"] for r in rows)
    assert "paraphrase" in capsys.readouterr().err
    assert main(args) == 0 and out.read_bytes() == first


def test_eval_augment_reports_paired_robustness(tmp_path, tiny_tokenizer, capsys):
    from conftest import build_tiny_model

    model_dir = tmp_path / "tiny"
    build_tiny_model(len(tiny_tokenizer)).save_pretrained(str(model_dir))
    tiny_tokenizer.save_pretrained(str(model_dir))
    task = tmp_path / "add.jsonl"
    task.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"What is {i} plus 7? Answer with the number.",
                                        "answer": str(i + 7)}) + "\n" for i in range(5)), encoding="utf-8")
    base = ["eval", "--task", str(task), "--model", str(model_dir), "--max-new-tokens", "4", "--json",
            "--bootstrap", "50"]
    assert main([*base, "--augment", "swap,delete", "--augment-n", "2"]) == 0
    out = json.loads(capsys.readouterr().out)
    r = out["robustness"]
    assert r["original"] == pytest.approx(out["score"]) and r["items"] == 5
    assert 5 <= r["variants"] <= 20 and set(r["per_op"]) <= {"swap", "delete"}
    assert main([*base, "--augment", "swap,melt"]) == 2
    assert "unknown op 'melt'" in capsys.readouterr().err
