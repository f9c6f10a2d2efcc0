"""`decodetune generate`: output files, JSON, and bad input (one line, exit 2, nothing half-written)."""

from __future__ import annotations

import json

import pytest

from decodetune.cli.main import main


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tiny_pair):
    model, tok = tiny_pair
    path = tmp_path_factory.mktemp("tiny") / "model"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def run(capsys, *args):
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_generate_jsonl_in_and_out(tmp_path, tiny_dir, capsys):
    src = tmp_path / "prompts.jsonl"
    src.write_text(json.dumps({"id": "a", "prompt": "The quick", "answer": 3}) + "\n\n"
                   + json.dumps({"id": "b", "messages": [{"role": "user", "content": "Paris is"}]}) + "\n")
    out = tmp_path / "out.jsonl"
    code, _, err = run(capsys, "generate", "--model", tiny_dir, "--input", str(src), "--output", str(out),
                       "--strategy", "sample", "--seed", "3", "--max-new-tokens", "5", "--logprobs")
    assert code == 0, err
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["a", "b"]
    assert rows[0]["answer"] == 3  # input fields are kept
    assert all(len(r["logprobs"]) == r["num_tokens"] <= 5 for r in rows)
    assert all(r["finish_reason"] in ("eos", "stop", "length") for r in rows)


def test_generate_json_is_deterministic_for_a_seed(tiny_dir, capsys):
    args = ["generate", "--model", tiny_dir, "--prompt", "The quick", "--prompt", "Paris", "--strategy",
            "sample", "--temperature", "0.9", "--top-k", "20", "--seed", "11", "--max-new-tokens", "6", "--json"]
    code1, out1, _ = run(capsys, *args)
    code2, out2, _ = run(capsys, *args)
    assert code1 == code2 == 0
    a, b = json.loads(out1), json.loads(out2)
    assert [g["token_ids"] for g in a["generations"]] == [g["token_ids"] for g in b["generations"]]
    assert a["config"]["top_k"] == 20


def test_generate_beam_n_best(tiny_dir, capsys):
    code, out, err = run(capsys, "generate", "--model", tiny_dir, "--prompt", "The quick", "--beam-size", "3",
                         "--strategy", "beam", "--num-return-sequences", "2", "--max-new-tokens", "4", "--json")
    assert code == 0, err
    gens = json.loads(out)["generations"]
    assert [g["sequence_index"] for g in gens] == [0, 1]


@pytest.mark.parametrize("flags, message", [
    (["--temperature", "-1"], "error: temperature: must be >= 0"),
    (["--top-p", "1.5"], "error: top_p: must be in (0, 1]"),
    (["--top-p", "0"], "error: top_p: must be in (0, 1]"),
    (["--top-k", "-3"], "error: top_k: must be >= 0"),
    (["--strategy", "beam", "--num-beams", "0"], "error: num_beams: must be >= 1"),
    (["--strategy", "beam", "--num-beams", "2", "--num-return-sequences", "3"], "error: num_return_sequences"),
])
def test_bad_config_flags(tmp_path, tiny_dir, capsys, flags, message):
    out = tmp_path / "out.jsonl"
    code, _, err = run(capsys, "generate", "--model", tiny_dir, "--prompt", "hi", "--output", str(out), *flags)
    assert code == 2
    assert err.startswith(message) and err.count("\n") == 1
    assert not out.exists()


def test_unknown_config_key_in_file(tmp_path, tiny_dir, capsys):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"temperature": 0.5, "nucleus": 0.9}))
    code, _, err = run(capsys, "generate", "--model", tiny_dir, "--prompt", "hi", "--config", str(cfg))
    assert code == 2 and err.startswith("error: nucleus: unknown config key in ") and str(cfg) in err


def test_malformed_jsonl_names_the_line(tmp_path, tiny_dir, capsys):
    src = tmp_path / "p.jsonl"
    src.write_text('{"prompt": "ok"}\n{"prompt": "ok"}\n{"prompt": broken}\n')
    out = tmp_path / "out.jsonl"
    out.write_text("previous results\n")
    code, _, err = run(capsys, "generate", "--model", tiny_dir, "--input", str(src), "--output", str(out))
    assert code == 2 and err.startswith(f"error: {src}:3: malformed JSON")
    assert out.read_text() == "previous results\n"  # untouched


def test_missing_prompt_field_names_the_line(tmp_path, tiny_dir, capsys):
    src = tmp_path / "p.jsonl"
    src.write_text('{"prompt": "ok"}\n{"text": "no prompt"}\n')
    code, _, err = run(capsys, "generate", "--model", tiny_dir, "--input", str(src))
    assert code == 2 and f"{src}:2: missing or empty 'prompt'" in err


def test_non_utf8_input(tmp_path, tiny_dir, capsys):
    src = tmp_path / "p.jsonl"
    src.write_bytes('{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n'.encode("latin-1"))
    code, _, err = run(capsys, "generate", "--model", tiny_dir, "--input", str(src))
    assert code == 2 and err.startswith(f"error: {src}:2: not valid UTF-8")


def test_empty_prompt_list(tmp_path, tiny_dir, capsys):
    src = tmp_path / "p.jsonl"
    src.write_text("\n\n")
    code, _, err = run(capsys, "generate", "--model", tiny_dir, "--input", str(src))
    assert code == 2 and err.startswith("error: prompts: empty prompt list")
    code, _, err = run(capsys, "generate", "--model", tiny_dir)
    assert code == 2 and "empty prompt list" in err


@pytest.mark.slow
def test_embedded_model_answers_paris(capsys):
    code, out, err = run(capsys, "generate", "--prompt", "What is the capital of France?", "--max-new-tokens", "12")
    assert code == 0, err
    assert out.strip() == "The capital of France is Paris."
