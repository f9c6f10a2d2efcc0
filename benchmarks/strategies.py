"""Candidate strategies vs single-sequence decoding on smollm2-135m, in one run (issue 12).

* ``arith`` (closed, numeric match): self-consistency with k = 5 and k = 10 vs greedy vs the single-sample
  config the candidates are drawn with (a fixed, reasonable one, not tuned: ``sample``, temperature 0.7,
  top-p 0.95), so the vote is the only difference between "sample" and "self-consistency";
* ``describe`` (reference, chrF): MBR with the chrF utility over k = 8 samples (the same sampler) vs beam
  search with 4 beams vs greedy.

Every row: the score with its bootstrap CI, a paired test against greedy on the same items (Wilcoxon on
per-item scores; chrF is per sentence here, so it is per-item too) and its token cost per item with every
candidate counted (beam search decodes 4 beams; its cost column multiplies the returned length by 4 and
says so). Sampling rows use one seed per item (the same for every sampled config: common random numbers).

Lengths: arith keeps its task default ``max_new_tokens`` 12 (its answers are a few tokens); describe
uses 32 instead of its default 48 (the references are one short sentence; 32 keeps the 8-sample MBR row,
the largest, at ~40k tokens on 150 items). The full run (both 150-item test splits, ~95k generated tokens,
one prefill per prompt) is estimated at 8-10 minutes on 2 quiet CPU cores; a 6-item smoke run took 126 s
on 2 shared, loaded cores (small batches, so it does not scale linearly).

    python benchmarks/strategies.py                         # full size: both test splits, 150 items each
    python benchmarks/strategies.py --items 4 --threads 2   # smoke run
    python benchmarks/strategies.py --model tests/data/tiny-llama --items 3   # smoke run, tiny random model

Writes ``benchmarks/results/strategies.json`` (with ``--out``, elsewhere) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"
SAMPLER = {"temperature": 0.7, "top_p": 0.95}
ARITH = {
    "greedy": {"strategy": "greedy"},
    "sample (T 0.7, top-p 0.95)": {"strategy": "sample", **SAMPLER},
    "self-consistency k=5": {"strategy": "self_consistency", "num_candidates": 5, **SAMPLER},
    "self-consistency k=10": {"strategy": "self_consistency", "num_candidates": 10, **SAMPLER},
}
DESCRIBE = {
    "greedy": {"strategy": "greedy", "max_new_tokens": 32},
    "beam 4": {"strategy": "beam", "num_beams": 4, "max_new_tokens": 32},
    "MBR chrF k=8": {"strategy": "mbr", "num_candidates": 8, "mbr_utility": "chrf", "max_new_tokens": 32,
                     **SAMPLER},
}


def run_task(lm: Any, task: str, configs: dict[str, dict], metric: str, args: argparse.Namespace) -> list[dict]:
    """Every config of one task in one evaluate_many call; one table row each, greedy first."""
    from decodetune.eval import evaluate_many
    from decodetune.metrics.stats import paired_compare

    t0 = time.perf_counter()
    results = evaluate_many(lm, task, list(configs.values()), split=args.split, limit=args.items,
                            metrics=[metric, "tokens"], seed=0, batch_size=args.batch_size,
                            cache=args.cache, bootstrap=args.bootstrap, progress=not args.quiet)
    wall = time.perf_counter() - t0
    greedy = results[0]
    rows = []
    for name, res in zip(configs, results, strict=True):
        m = res.metrics[metric]
        row = {"task": task, "config": name, "metric": metric, "score": m.value, "ci": [m.ci_low, m.ci_high],
               "n_items": len(res.item_ids), "tokens_per_item": res.metrics["tokens"].value,
               "config_fields": configs[name]}
        if res.config.strategy == "beam":
            row["decoded_tokens_per_item"] = row["tokens_per_item"] * res.config.num_beams
        if res is not greedy:
            cmp = paired_compare(name, greedy.scores[metric], greedy.grid, res.scores[metric], res.grid,
                                 n_boot=args.bootstrap, seed=0)
            row["vs_greedy"] = {"diff": cmp.diff, "ci": [cmp.ci_low, cmp.ci_high], "p": cmp.p_value,
                                "test": cmp.test}
        rows.append(row)
    rows[0]["task_wall_s"] = wall
    return rows


def _fmt(v: float, digits: int = 3) -> str:
    return "n/a" if v is None or not math.isfinite(v) else f"{v:.{digits}f}"


def markdown(rows: list[dict]) -> str:
    """The results as one markdown table."""
    lines = ["| task | config | score (95% CI) | vs greedy (95% CI) | p | tokens / item |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        vs = r.get("vs_greedy")
        cost = _fmt(r["tokens_per_item"], 1)
        if "decoded_tokens_per_item" in r:
            cost = f"{cost} returned, ~{_fmt(r['decoded_tokens_per_item'], 1)} decoded (4 beams)"
        lines.append(
            f"| {r['task']} ({r['metric']}) | {r['config']} | {_fmt(r['score'])} "
            f"({_fmt(r['ci'][0])}-{_fmt(r['ci'][1])}) | "
            + (f"{vs['diff']:+.3f} ({_fmt(vs['ci'][0])}-{_fmt(vs['ci'][1])}) | {vs['p']:.2g}" if vs else "- | -")
            + f" | {cost} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m", help="builtin name or HF folder")
    ap.add_argument("--items", type=int, default=None, help="first N items of each split (default: all 150)")
    ap.add_argument("--split", default="test")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--cache", default=None, help="generation cache (sqlite path); off by default")
    ap.add_argument("--out", type=Path, default=RESULTS / "strategies.json")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from decodetune.models import load_model

    lm = load_model(args.model)
    t0 = time.perf_counter()
    rows = run_task(lm, "arith", ARITH, "numeric_match", args) + run_task(lm, "describe", DESCRIBE, "chrf", args)
    wall = time.perf_counter() - t0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"model": args.model, "split": args.split, "items": args.items,
                                    "wall_s": wall, "threads": torch.get_num_threads(), "rows": rows},
                                   indent=1) + "\n")
    print(markdown(rows))
    print(f"\n{wall:.0f} s on {torch.get_num_threads()} threads; wrote {args.out}")


if __name__ == "__main__":
    main()
