"""Quality cost of reduced-precision weights: one config's held-out score at fp32, bf16 and int8, paired.

The config is the demo's tuned winner (``--config OUT/best_config.json`` from ``decodetune demo``; without
it, greedy decoding). Every dtype decodes the same test items with the same seeds, and each reduced
precision is compared with fp32 item by item (:func:`decodetune.metrics.stats.paired_compare`: Wilcoxon
signed-rank on per-item metrics, a paired-bootstrap CI). The issue's bar: the difference's CI contains 0
(held-out quality "within the paired CI of fp32").

    python benchmarks/dtype_quality.py [--config demo-out/best_config.json] [--task arith] [--limit 100]
"""

from __future__ import annotations

import argparse
import subprocess
import time

import torch

from decodetune import DecodingConfig
from decodetune.evaluation.runner import evaluate
from decodetune.metrics.stats import paired_compare
from decodetune.models import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=None, help="DecodingConfig JSON/YAML (default: greedy)")
    ap.add_argument("--task", default="arith")
    ap.add_argument("--limit", type=int, default=None, help="first N test items (default: all)")
    ap.add_argument("--dtypes", default="fp32,bf16,int8")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = args.config  # a path (or None: greedy), so that the task's defaults fill the rest as in eval
    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    shown = DecodingConfig.load(cfg).to_dict(only_set=True) if cfg else "greedy"
    print(f"# {args.task} test split, config {shown}\n# load: {load}")
    results = {}
    for dtype in args.dtypes.split(","):
        t0 = time.perf_counter()
        lm = load_model("smollm2-135m", dtype=dtype)
        res = evaluate(lm, args.task, cfg, split="test", limit=args.limit, seed=0)
        results[dtype] = res
        print(f"# {dtype}: {res.primary} {res.metrics[res.primary].value:.4f} "
              f"({res.num_tokens} tokens, {time.perf_counter() - t0:.0f} s)")
    base = results["fp32"]
    name = base.primary
    print(f"| dtype | {name} | diff vs fp32 | 95% CI | p | test | CI holds 0 |")
    print("|---|---:|---:|---|---:|---|---|")
    print(f"| fp32 | {base.metrics[name].value:.3f} | | | | | |")
    for dtype, res in results.items():
        if dtype == "fp32":
            continue
        p = paired_compare(name, base.scores[name], base.grid, res.scores[name], res.grid)
        holds = p.ci_low <= 0 <= p.ci_high
        print(f"| {dtype} | {p.value_b:.3f} | {p.diff:+.3f} | [{p.ci_low:+.3f}, {p.ci_high:+.3f}] | "
              f"{p.p_value:.3f} | {p.test} | {'yes' if holds else 'no'} |")


if __name__ == "__main__":
    main()
