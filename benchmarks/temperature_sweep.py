"""Accuracy vs temperature on the closed-ended ``arith`` task: plain temperature, top-p 0.9, min-p 0.1.

The min-p paper (Nguyen et al. 2024) found that accuracy falls slowest with temperature under min-p
truncation. This sweeps T from 0 to 2 for smollm2-135m on the same items with the same per-row seeds
(common random numbers), so the three curves differ only by the truncation rule. T = 0 is greedy for all
three, and the anchor: every accuracy is also reported as a ratio to it.

    python benchmarks/temperature_sweep.py --items 100 --repeats 1 --threads 1

Writes ``benchmarks/results/temperature_sweep.{json,png}`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
TEMPERATURES = [0.0, 0.25, 0.5, 1.0, 1.5, 2.0]
SAMPLERS = {"temperature only": {}, "top-p 0.9": {"top_p": 0.9}, "min-p 0.1": {"min_p": 0.1}}


def config(sampler: dict, t: float) -> dict:
    """The decoding config of one curve at one temperature (greedy at T = 0)."""
    return {"strategy": "greedy"} if t == 0 else {"strategy": "sample", "temperature": t, **sampler}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=1, help="samples per item at T > 0")
    ap.add_argument("--split", default="test")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--bootstrap", type=int, default=1000)
    args = ap.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from decodetune.eval import evaluate_many
    from decodetune.models import load_model

    RESULTS.mkdir(parents=True, exist_ok=True)
    lm = load_model("smollm2-135m")
    curves: dict[str, list[dict]] = {name: [] for name in SAMPLERS}
    t_all = time.perf_counter()
    for t in TEMPERATURES:
        t0 = time.perf_counter()
        # The three samplers at one temperature go through one generate() call (rows batched together).
        results = evaluate_many(lm, "arith", [config(s, t) for s in SAMPLERS.values()], split=args.split,
                                limit=args.items, repeats=args.repeats, metrics=["numeric_match"], seed=0,
                                batch_size=args.batch_size, cache=RESULTS / "temperature_sweep_cache.sqlite",
                                bootstrap=args.bootstrap, progress=True)
        for name, res in zip(SAMPLERS, results, strict=True):
            m = res.metrics["numeric_match"]
            curves[name].append({"temperature": t, "accuracy": m.value, "ci": [m.ci_low, m.ci_high]})
        print(f"T={t:<5} " + "  ".join(f"{n}: {c[-1]['accuracy']:.3f}" for n, c in curves.items())
              + f"  ({time.perf_counter() - t0:.0f} s)", flush=True)
    out = {"model": "smollm2-135m", "task": "arith", "split": args.split, "items": args.items,
           "repeats": args.repeats, "threads": torch.get_num_threads(),
           "wall_s": round(time.perf_counter() - t_all, 1), "curves": curves}
    (RESULTS / "temperature_sweep.json").write_text(json.dumps(out, indent=2) + "\n")
    plot(out, RESULTS / "temperature_sweep.png")
    print()
    print(markdown(out))


def plot(out: dict, path: Path) -> None:
    """Accuracy vs temperature with 95% CI bands, one line per sampler."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, pts in out["curves"].items():
        ts = [p["temperature"] for p in pts]
        acc = [p["accuracy"] for p in pts]
        ax.plot(ts, acc, marker="o", label=name)
        lo = [p["ci"][0] for p in pts]
        hi = [p["ci"][1] for p in pts]
        ax.fill_between(ts, lo, hi, alpha=0.15)
    ax.set_xlabel("temperature")
    ax.set_ylabel("accuracy (numeric match)")
    ax.set_ylim(0, 1)
    ax.set_title(f"{out['model']} on {out['task']} ({out['split']}, {out['items']} items, "
                 f"{out['repeats']} sample(s) per item)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def markdown(out: dict) -> str:
    """Accuracy per temperature per sampler, with the ratio to greedy (T = 0)."""
    names = list(out["curves"])
    greedy = out["curves"][names[0]][0]["accuracy"]
    head = "| T | " + " | ".join(f"{n} acc [95% CI]" for n in names) + " | " + \
        " | ".join(f"{n} / greedy" for n in names) + " |"
    lines = [head, "|" + "---|" * (1 + 2 * len(names))]
    for k, t in enumerate(TEMPERATURES):
        cells = []
        ratios = []
        for n in names:
            p = out["curves"][n][k]
            cells.append(f"{p['accuracy']:.3f} [{p['ci'][0]:.2f}, {p['ci'][1]:.2f}]")
            ratios.append(f"{p['accuracy'] / greedy:.2f}" if greedy else "-")
        lines.append(f"| {t:g} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")
    return "\n".join(lines).replace("nan", "-") if not math.isnan(greedy) else "\n".join(lines)


if __name__ == "__main__":
    main()
