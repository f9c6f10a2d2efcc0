"""Generation speed: decodetune.generate vs transformers' model.generate on smollm2-135m, in one run.

Both decode the same prompts for the same number of tokens (``min_new_tokens = max_new_tokens`` on both
sides, so that neither stops early), with the same number of torch threads. Each case is timed
``--repeats`` times, alternating the two engines (so that a change in machine load hits both), and the best
time of each is kept. Prints tokens/s for both and their ratio (decodetune / transformers; >= 1.0 is the
target), and ``paired``: the median over repeats of the ratio within each back-to-back pair, the figure to
read when the machine's load moves during the run. Then the memory-bandwidth bound of batch-1 greedy
decoding: measured read bandwidth (best time of a sum over a 512 MiB tensor) divided by the bytes of weights
one token reads (every parameter once); the speed of a bare forward loop (model + KV cache + argmax) timed
alongside, to separate the model's own speed from the loop's overhead; and finished rows dropped from the
batch vs kept and masked (16 greedy rows of different lengths); then ``bench_engine_batching.py``'s
config-batched trial and continuous-batching figures.

    python benchmarks/bench_generate.py [--new-tokens 32] [--repeats 3] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import time
from collections.abc import Callable

import torch

from decodetune import DecodingConfig
from decodetune.decoding import generate
from decodetune.models import load_model

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "The three primary colors are",
    "Water boils at",
    "import numpy as np\nimport torch\n\n# load the dataset and",
    "The best way to learn a new language is",
    "In 1969, the first humans",
    "Photosynthesis is the process by which plants",
    "Q: What is 12 plus 7?\nA:",
    "My favourite recipe for a quick dinner is",
    "The stock market today",
    "Machine learning models are trained by",
    "Dear team, I am writing to let you know that the meeting on Friday",
    "The tallest mountain in the world",
    "To install the package, run",
]


def _time(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def read_bandwidth(repeats: int = 5) -> float:
    """Bytes per second of a streaming read (sum over a 512 MiB float32 tensor, best of ``repeats``)."""
    x = torch.ones(512 * 2**20 // 4)
    x.sum()
    best = min(_time(x.sum) for _ in range(repeats))
    return x.numel() * 4 / best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    ap.add_argument("--skip-drop", action="store_true", help="skip the dropped-vs-masked rows measurement")
    ap.add_argument("--skip-dtypes", action="store_true", help="skip the bf16 / int8 rows")
    ap.add_argument("--skip-batching", action="store_true",
                    help="skip bench_engine_batching.py (config-batched trial, continuous batching)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    n = args.new_tokens
    lm = load_model("smollm2-135m", raw=True)
    model, tok = lm.model, lm.tokenizer
    print(f"# smollm2-135m ({model.dtype}), torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{n} new tokens, best of {args.repeats}")
    print(f"# load: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")

    sample = dict(strategy="sample", temperature=0.8, top_p=0.95, seed=0)
    cases = [
        ("greedy, batch 1", PROMPTS[:1], DecodingConfig(max_new_tokens=n, min_new_tokens=n)),
        ("greedy, batch 16", PROMPTS, DecodingConfig(max_new_tokens=n, min_new_tokens=n)),
        ("beam search 4 beams, batch 1", PROMPTS[:1],
         DecodingConfig(strategy="beam", num_beams=4, max_new_tokens=n, min_new_tokens=n)),
        ("sample T=0.8 top_p=0.95, batch 16", PROMPTS, DecodingConfig(max_new_tokens=n, min_new_tokens=n, **sample)),
    ]
    # warm up both engines (first calls allocate and initialise kernels)
    generate(lm, PROMPTS[:2], DecodingConfig(max_new_tokens=4))
    _hf(model, tok, PROMPTS[:2], DecodingConfig(max_new_tokens=4))

    print(f"{'case':38s} {'decodetune tok/s':>17s} {'transformers tok/s':>19s} {'ratio':>6s} {'paired':>7s}")
    batch1_decode_rate = None
    ceiling = 0.0
    for name, prompts, cfg in cases:
        ours, theirs = [], []
        for _ in range(args.repeats):
            gens: list = []
            ours.append(_time(lambda prompts=prompts, cfg=cfg, gens=gens: gens.extend(generate(lm, prompts, cfg))))
            theirs.append(_time(lambda prompts=prompts, cfg=cfg: _hf(model, tok, prompts, cfg)))
            assert all(len(g.token_ids) == n for g in gens)
            if name == "greedy, batch 1":
                rate = (n - 1) / gens[0].timings["decode_s"]  # first token comes from the prefill
                batch1_decode_rate = max(rate, batch1_decode_rate or 0.0)
                ceiling = max(ceiling, bare_forward_rate(lm, prompts[0], n))
        tokens = len(prompts) * n
        a, b = tokens / min(ours), tokens / min(theirs)
        paired = statistics.median(t / o for o, t in zip(ours, theirs, strict=True))
        print(f"{name:38s} {a:17.1f} {b:19.1f} {a / b:6.2f} {paired:7.2f}")

    if not args.skip_dtypes:
        dtype_rows(model, tok, cases[0], cases[3], n, args.repeats)

    drop, mask = drop_vs_mask(lm, n, args.repeats) if not args.skip_drop else (float("nan"), float("nan"))

    bandwidth = read_bandwidth()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    bound = bandwidth / weight_bytes
    print(f"# read bandwidth {bandwidth / 1e9:.1f} GB/s, weights {weight_bytes / 1e6:.0f} MB per token -> "
          f"batch-1 bound {bound:.1f} tok/s")
    print(f"# decodetune batch-1 greedy decode rate (after prefill) {batch1_decode_rate:.1f} tok/s = "
          f"{100 * batch1_decode_rate / bound:.0f}% of the bound (target >= 80%)")
    print(f"# bare forward loop (model + KV cache + argmax, nothing else) {ceiling:.1f} tok/s: decodetune's "
          f"loop runs at {100 * batch1_decode_rate / ceiling:.0f}% of the model's own forward speed")
    print(f"# finished rows, greedy batch 16 with max_new_tokens 2..{n}: dropped from the batch {drop:.2f} s, "
          f"kept and masked {mask:.2f} s (drop/mask = {drop / mask:.2f})")
    if not args.skip_batching:
        from bench_engine_batching import report

        report(lm, args.repeats, new_tokens=n)
    print(f"# load: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")


def dtype_rows(model, tok, greedy_case: tuple, sample_case: tuple, n: int, repeats: int) -> None:
    """decodetune at bf16 and int8 against transformers fp32 (the issue's anchor) and at the same dtype.

    transformers at int8 is the same ``torch.ao`` dynamic quantisation of the Linear layers (its plain
    per-tensor activation scale: decodetune's int8 adds per-token scales for quality, which costs a little).
    """
    import copy

    from decodetune.models.precision import to_bf16

    print(f"{'case':38s} {'decodetune tok/s':>17s} {'tf fp32 tok/s':>14s} {'vs fp32':>8s} "
          f"{'tf same dtype':>14s} {'vs same':>8s}")
    for dtype in ("bf16", "int8"):
        lm_d = load_model("smollm2-135m", raw=True, dtype=dtype)
        hf_same = copy.deepcopy(model)
        if dtype == "bf16":
            hf_same = to_bf16(hf_same)
        else:
            hf_same = torch.ao.quantization.quantize_dynamic(hf_same, {torch.nn.Linear}, dtype=torch.qint8)
        generate(lm_d, PROMPTS[:2], DecodingConfig(max_new_tokens=4))
        _hf(hf_same, tok, PROMPTS[:2], DecodingConfig(max_new_tokens=4))
        for name, prompts, cfg in (greedy_case, sample_case):
            ours, fp32, same = [], [], []
            for _ in range(repeats):  # interleaved, so that load changes hit all three
                ours.append(_time(lambda prompts=prompts, cfg=cfg, lm_d=lm_d: generate(lm_d, prompts, cfg)))
                fp32.append(_time(lambda prompts=prompts, cfg=cfg: _hf(model, tok, prompts, cfg)))
                same.append(_time(lambda prompts=prompts, cfg=cfg, m=hf_same: _hf(m, tok, prompts, cfg)))
            tokens = len(prompts) * n
            a, b, c = tokens / min(ours), tokens / min(fp32), tokens / min(same)
            print(f"{name + ', ' + dtype:38s} {a:17.1f} {b:14.1f} {a / b:8.2f} {c:14.1f} {a / c:8.2f}")


def bare_forward_rate(lm, prompt: str, n: int) -> float:
    """Decode tokens/s of the model's forward pass alone: prefill, then n - 1 steps of argmax feeding."""
    from decodetune.decoding.runner import ModelRunner

    runner = ModelRunner(lm.model)
    with torch.inference_mode():
        logits, cache, mask, pos = runner.prefill([lm.encode(prompt)], lm.tokenizer.pad_token_id)
        t0 = time.perf_counter()
        for _ in range(n - 1):
            logits, mask = runner.step(logits.argmax(dim=1), mask, pos, cache)
            pos = pos + 1
        return (n - 1) / (time.perf_counter() - t0)


def drop_vs_mask(lm, n: int, repeats: int) -> tuple[float, float]:
    """Seconds for 16 greedy rows of different lengths, finished rows dropped vs kept (masked)."""
    from decodetune.decoding import engine

    configs = [DecodingConfig(max_new_tokens=max(2, n * (i + 1) // 16), min_new_tokens=max(2, n * (i + 1) // 16))
               for i in range(16)]
    times: dict[bool, float] = {True: float("inf"), False: float("inf")}
    for _ in range(repeats):
        for compact in (True, False):  # interleaved, so that load changes hit both
            engine.COMPACT_FINISHED_ROWS = compact
            times[compact] = min(times[compact], _time(lambda: generate(lm, PROMPTS, configs)))
    engine.COMPACT_FINISHED_ROWS = True
    return times[True], times[False]


def _hf(model, tok, prompts: list[str], cfg: DecodingConfig) -> torch.Tensor:
    enc = tok(prompts, return_tensors="pt", padding=True, padding_side="left")
    kwargs = cfg.to_hf()
    kwargs.pop("seed", None)
    with torch.inference_mode():
        return model.generate(**enc, pad_token_id=tok.pad_token_id, **kwargs)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
