"""Backends side by side: the same 40-item eval on smollm2-135m through torch, llamacpp and openai, in one run.

The anchor is bare llama-cpp-python (``Llama`` on the same GGUF, the same rendered prompts, greedy, one row
at a time). Printed per line: generated tokens, wall seconds, tokens/s, and the ratio of tokens/s to the
anchor. Then:

* llamacpp at batch 1 (``--parallel 1``, rows one by one): target >= 0.9 x the anchor;
* the 40-item eval on llamacpp vs on torch: target >= 2x;
* a ``tune`` (random search, same trials, same task, test check included) on llamacpp vs torch: >= 2x.

The openai line runs the eval against ``python -m llama_cpp.server`` on loopback (same GGUF), so it
measures the HTTP path on top of the same engine. No cache is used anywhere; every figure is generated.
Each measurement runs in a fresh process (engines' idle thread pools would otherwise compete).

    python benchmarks/bench_backends.py [--task arith] [--items 40] [--trials 6] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from decodetune import DecodingConfig
from decodetune.backends import BackendOptions, Request, open_backend
from decodetune.eval import evaluate
from decodetune.tasks import load_task


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bare_anchor(gguf: Path, rendered: list[list[int]], n_new: int, threads: int, n_ctx: int) -> tuple[int, float]:
    """Bare llama-cpp-python: each prompt alone, greedy, until EOS or ``n_new`` tokens."""
    from llama_cpp import Llama

    llm = Llama(str(gguf), n_ctx=n_ctx, n_threads=threads, verbose=False)
    eos = llm.token_eos()
    t0, n = time.perf_counter(), 0
    for ids in rendered:
        k = 0
        for tok in llm.generate(ids, temp=0, top_k=1, reset=True):
            k += 1
            if tok == eos or k >= n_new:
                break
        n += k
    return n, time.perf_counter() - t0


def batch1(engine: object, rendered_prompts: list[str], cfg: DecodingConfig) -> tuple[int, float]:
    """The llamacpp backend one row at a time (no batching)."""
    t0, n = time.perf_counter(), 0
    for p in rendered_prompts:
        n += engine.generate([Request(p, cfg)])[0].num_tokens  # type: ignore[attr-defined]
    return n, time.perf_counter() - t0


def eval_run(engine: object, task: str, items: int) -> tuple[int, float, float]:
    """One evaluate() of the task's default greedy config: (tokens, wall s, score)."""
    t0 = time.perf_counter()
    res = evaluate(engine, task, None, limit=items, bootstrap=0)
    return res.num_tokens_generated, time.perf_counter() - t0, res.score


def tune_run(engine: object, task: str, items: int, trials: int) -> float:
    """Wall seconds of a random-search tune with its test-split check, in a fresh folder (no cache).

    Both engines search the same space, the default one cut down to what llama.cpp can run (no beams),
    so the trials are the same configs.
    """
    from decodetune.backends.capabilities import LLAMACPP
    from decodetune.tuning import tune
    from decodetune.tuning.space import default_space

    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        tune(engine, task, search="random", n_trials=trials, limit=items, out_dir=out, prune=False, seed=0,
             space=default_space(capabilities=LLAMACPP))
        return time.perf_counter() - t0


def start_server(gguf: Path, threads: int, n_ctx: int) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1",
                             "--port", str(port), "--n_ctx", str(n_ctx), "--n_threads", str(threads)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(120):
        try:
            urllib.request.urlopen(url + "/v1/models", timeout=1).read()
            return proc, url
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("llama_cpp.server did not start")


def line(name: str, tokens: int, secs: float, anchor_tps: float) -> None:
    tps = tokens / secs if secs > 0 else float("nan")
    print(f"{name:<44} {tokens:>6} tok {secs:>8.2f} s {tps:>8.1f} tok/s  {tps / anchor_tps:>5.2f}x anchor", flush=True)


def stage(args: argparse.Namespace) -> dict:
    """One measurement, run in a process of its own: thread pools of other engines never compete."""
    import torch

    torch.set_num_threads(args.threads)
    task = load_task(args.task)
    cfg = DecodingConfig.from_dict({**task.defaults, "strategy": "greedy"})
    prompts = [it.prompt for it in task.items("dev")[:args.items]]
    n_ctx = 1024

    def llama(parallel: int) -> object:
        return open_backend("smollm2-135m", BackendOptions(name="llamacpp", n_threads=args.threads,
                                                          n_seq_max=parallel, n_ctx=n_ctx))
    name = args.stage
    if name == "anchor":
        engine = llama(1)
        rendered = [engine.render(p) for p in prompts]
        path = engine.path
        engine.close()
        tok, secs = bare_anchor(path, rendered, cfg.max_new_tokens, args.threads, n_ctx)
        return {"tokens": tok, "secs": secs}
    if name == "batch1":
        tok, secs = batch1(llama(1), prompts, cfg)
        return {"tokens": tok, "secs": secs}
    if name.startswith("eval-") or name.startswith("tune-"):
        kind = name.split("-", 1)[1]
        proc = None
        if kind == "llamacpp":
            engine = llama(args.parallel)
        elif kind == "torch":
            engine = open_backend("smollm2-135m", BackendOptions(name="torch"))
        else:
            path = llama(1).path
            proc, url = start_server(path, args.threads, n_ctx * 4)
            engine = open_backend("smollm2-135m", BackendOptions(name="openai", base_url=url, concurrency=4))
        try:
            if name.startswith("eval-"):
                tok, secs, score = eval_run(engine, args.task, args.items)
                return {"tokens": tok, "secs": secs, "score": score}
            return {"secs": tune_run(engine, args.task, args.items, args.trials)}
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait(10)
    raise SystemExit(f"unknown stage {name}")


def run_stage(name: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--stage", name, "--task", args.task, "--items", str(args.items),
           "--trials", str(args.trials), "--threads", str(args.threads), "--parallel", str(args.parallel)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    last = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode != 0 or not last:
        raise RuntimeError(f"stage {name} failed: {out.stderr.strip().splitlines()[-3:]}")
    return json.loads(last[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="arith")
    ap.add_argument("--items", type=int, default=40)
    ap.add_argument("--trials", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--parallel", type=int, default=8, help="llamacpp sequence slots")
    ap.add_argument("--skip-tune", action="store_true")
    ap.add_argument("--stage", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.stage:
        print(json.dumps(stage(args)))
        return
    print(f"load average {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f}; threads {args.threads}; "
          f"task {args.task}; {args.items} items; llamacpp --parallel {args.parallel}", flush=True)
    a = run_stage("anchor", args)
    anchor = a["tokens"] / a["secs"]
    line("anchor: bare llama-cpp-python, 1 by 1", a["tokens"], a["secs"], anchor)
    b = run_stage("batch1", args)
    line("llamacpp backend, batch 1, 1 by 1", b["tokens"], b["secs"], anchor)
    evals = {}
    for kind in ("llamacpp", "torch", "openai"):
        r = evals[kind] = run_stage(f"eval-{kind}", args)
        line(f"{args.task} eval on {kind} (score {r['score']:.3f})", r["tokens"], r["secs"], anchor)
    print(f"eval wall time torch / llamacpp: {evals['torch']['secs'] / evals['llamacpp']['secs']:.2f}x "
          "(target >= 2)")
    if not args.skip_tune:
        t_llama = run_stage("tune-llamacpp", args)["secs"]
        t_torch = run_stage("tune-torch", args)["secs"]
        print(f"tune ({args.trials} random trials + test check): torch {t_torch:.1f} s, llamacpp {t_llama:.1f} s, "
              f"{t_torch / t_llama:.2f}x (target >= 2)")
    print(f"load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
