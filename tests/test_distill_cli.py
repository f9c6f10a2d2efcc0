"""`decodetune distill` / `distill-eval` end to end on a tiny teacher saved as a HF folder, bad input,
and the torchrun (2 gloo processes) entry point."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import CORPUS, build_tiny_model
from decodetune.cli.main import main


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, tiny_tokenizer):
    path = tmp_path_factory.mktemp("teacher") / "tiny"
    build_tiny_model(len(tiny_tokenizer), num_hidden_layers=4).save_pretrained(str(path))
    tiny_tokenizer.save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def data_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    rows = [{"prompt": c[:14], "completion": c[14:44]} for c in CORPUS * 2]
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": c[:14]}) + "\n" for c in CORPUS))
    (root / "student.yaml").write_text("num_layers: 2\nnorm: layernorm\n")
    (root / "bad.jsonl").write_text('{"prompt": "a", "completion": "b"}\n{"prompt": oops}\n')
    (root / "bad_student.yaml").write_text("num_layers: 2\nhidden: 12\n")
    return root


def _args(teacher_dir, data_files, out, *extra: str, data: str = "train.jsonl") -> list[str]:
    return ["distill", "--teacher", str(teacher_dir), "--student", str(data_files / "student.yaml"),
            "--data", str(data_files / data), "--out", str(out), "--steps", "3", "--batch-size", "2",
            "--lr", "1e-3", *extra]


def test_distill_writes_a_loadable_model_and_distill_eval_reports(tmp_path, teacher_dir, data_files, capsys):
    out = tmp_path / "student"
    assert main(_args(teacher_dir, data_files, out, "--checkpoint-every", "2")) == 0
    for name in ("config.json", "model.safetensors", "tokenizer.json", "loss.png", "metrics.jsonl", "distill.json"):
        assert (out / name).exists(), name
    assert (tmp_path / "student.checkpoints" / "latest").read_text().strip() == "step-000002"
    assert "step 3: loss" in capsys.readouterr().out

    from decodetune.models import load_model

    lm = load_model(str(out), reuse=False)
    assert type(lm.model.model.norm).__name__ == "LayerNorm"  # the loader swapped the norms back
    meta = json.loads((out / "distill.json").read_text())
    assert meta["info"]["norm"] == "layernorm" and meta["info"]["steps_done"] == 3

    report = tmp_path / "report.json"
    code = main(["distill-eval", "--student", str(out), "--teacher", str(teacher_dir), "--data",
                 str(data_files / "train.jsonl"), "--output", str(report), "--task", "arith", "--limit", "4"])
    assert code == 0
    r = json.loads(report.read_text())
    assert 0.0 <= r["top1_agreement"] <= 1.0 and r["kl_teacher_student"] >= 0.0
    assert r["student"]["perplexity"] > 1.0 and r["teacher"]["generate_tokens_per_s"] > 0
    assert r["completion_tokens"] > 0 and r["source"] == "data" and r["rows"] == 4
    for who in ("student", "teacher"):  # the task metric through decodetune's evaluate
        assert r["task"][who]["metric"] == "numeric_match" and 0.0 <= r["task"][who]["score"] <= 1.0


def test_sequence_kd_and_on_policy(tmp_path, teacher_dir, data_files):
    out = tmp_path / "seqkd"
    cfg = tmp_path / "teacher.json"
    cfg.write_text(json.dumps({"strategy": "sample", "temperature": 0.8, "max_new_tokens": 6}))
    args = _args(teacher_dir, data_files, out, "--loss", "jsd", "--teacher-config", str(cfg), "--on-policy", "0.5",
                 "--max-new-tokens", "6", data="prompts.jsonl")
    assert main(args) == 0
    meta = json.loads((out / "distill.json").read_text())
    assert meta["info"]["source"] == "teacher"
    history = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert sum(h["on_policy_examples"] for h in history) > 0  # student samples via the decoding engine
    cached = list((tmp_path / "seqkd.checkpoints").glob("teacher-*.json"))
    assert len(cached) == 1 and all(0 < len(c) <= 6 for c in json.loads(cached[0].read_text()))


@pytest.mark.parametrize("changes, message", [
    ({"--data": "missing.jsonl"}, "missing.jsonl: file not found"),
    ({"--data": "bad.jsonl"}, "bad.jsonl:2: malformed JSON"),
    ({"--student": "bad_student.yaml"}, "unknown field 'hidden'"),
    ({"--loss": "kl"}, "loss: must be one of"),
    ({"--batch-size": "3", "--grad-accum": "2"}, "batch_size: 3 must be a positive multiple"),
])
def test_bad_input_is_one_line_exit_2_and_no_output(tmp_path, teacher_dir, data_files, capsys, changes, message):
    args = _args(teacher_dir, data_files, tmp_path / "out")
    for flag, value in changes.items():
        value = str(data_files / value) if value.endswith((".jsonl", ".yaml")) else value
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


def test_existing_output_needs_overwrite(tmp_path, teacher_dir, data_files, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert main(_args(teacher_dir, data_files, out)) == 2
    assert "already exists" in capsys.readouterr().err
    assert (out / "keep.txt").exists()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_processes(tmp_path, teacher_dir, data_files):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           "-m", "decodetune", *_args(teacher_dir, data_files, out, "--steps", "2")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "2 process(es)" in proc.stdout
    assert (out / "model.safetensors").exists()
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
