"""The report's deploy commands for the llama-server JSON body and the Ollama Modelfile exports."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from decodetune.config import DecodingConfig
from decodetune.tuning.exports import write_exports
from decodetune.tuning.report import LLAMA_SERVER_URL, OLLAMA_NAME, _what_next_html, deploy_steps

CFG = DecodingConfig(strategy="sample", temperature=0.7, top_p=0.9, max_new_tokens=12)


def steps_for(tmp_path, model):
    table = write_exports(CFG, tmp_path, "torch")
    attrs = {"model": model, "task": "arith", "backend": "torch",
             "exports": {"backend": "torch", "targets": table, "out": str(tmp_path)}}
    return {s["target"]: s for s in deploy_steps(attrs)}, attrs


def test_llama_server_gets_a_server_line_and_a_curl_of_its_body(tmp_path):
    steps, _ = steps_for(tmp_path, "/models/smol.gguf")
    body = tmp_path / "exports" / "llamacpp_server_params.json"
    serve, request = steps["llamacpp_server"]["commands"]
    assert serve == "llama-server -m /models/smol.gguf &"
    assert f"{LLAMA_SERVER_URL}/completion" in request and str(body) in request and request.endswith("-d @-")
    assert json.loads(body.read_text())["temperature"] == pytest.approx(0.7)


@pytest.mark.skipif(shutil.which("jq") is None, reason="no jq")
def test_the_curl_body_is_the_export_plus_the_prompt(tmp_path):
    steps, _ = steps_for(tmp_path, "m.gguf")
    jq = steps["llamacpp_server"]["commands"][1].split(" | curl")[0]
    out = subprocess.run(["bash", "-c", jq], env={"PROMPT": "2+2=", "PATH": "/usr/bin:/bin"},
                         capture_output=True, text=True, check=True).stdout
    body = json.loads((tmp_path / "exports" / "llamacpp_server_params.json").read_text())
    assert json.loads(out) == {**body, "prompt": "2+2="}


def test_ollama_modelfile_is_pointed_at_the_gguf_then_created(tmp_path):
    steps, attrs = steps_for(tmp_path, "/models/smol.gguf")
    point, create, run = steps["ollama"]["commands"]
    subprocess.run(["bash", "-c", point], check=True)  # the sed line, as a user would paste it
    tuned = (tmp_path / "exports" / "Modelfile.tuned").read_text().splitlines()
    original = (tmp_path / "exports" / "Modelfile").read_text().splitlines()
    assert original[0] == "FROM MODEL" and tuned[0] == "FROM /models/smol.gguf" and tuned[1:] == original[1:]
    assert create == f"ollama create {OLLAMA_NAME} -f {tmp_path / 'exports' / 'Modelfile.tuned'}"
    assert run == f"ollama run {OLLAMA_NAME}"
    page = "\n".join(_what_next_html(attrs))
    assert "ollama create" in page and "/completion" in page


def test_ollama_without_a_gguf_says_to_edit_the_from_line(tmp_path):
    steps, _ = steps_for(tmp_path, "/models/qwen")
    note, create, _ = steps["ollama"]["commands"]
    assert note.startswith("# edit the FROM MODEL line")
    assert create == f"ollama create {OLLAMA_NAME} -f {tmp_path / 'exports' / 'Modelfile'}"
    assert steps["llamacpp_server"]["commands"][0] == "llama-server -m MODEL.gguf &"
