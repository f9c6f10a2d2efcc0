"""Holtzman et al. 2020 Table 1, in shape: how decoding strategies degenerate on open-ended generation.

Runs smollm2-135m on the builtin ``story`` task (continuation prompts) with greedy, beam search, pure
sampling, temperature 0.7, top-k 40, top-k 40 with t = 0.7 and nucleus p = 0.95, and llama.cpp's samplers
(DRY on greedy and on nucleus, XTC with min-p, top-nσ, mirostat v2), then reports repetition %
(Holtzman's definition), Self-BLEU-4, Zipf coefficient, distinct-2, SimCTG diversity and generation
perplexity under the model itself. Ratios are against greedy decoding measured in the same run.

    python benchmarks/degeneration.py --prompts 100 --max-new-tokens 128          # the issue's size
    python benchmarks/degeneration.py --prompts 40 --max-new-tokens 96 --threads 1  # what fits 2 busy cores
    python benchmarks/degeneration.py --quick --only "DRY 0.8, p=0.95"             # a smoke run (tag quick)

Every config runs on the same prompts with the same per-row seeds; a generation cache under
``benchmarks/results/`` makes a rerun (or a resumed run) free. Results go to
``benchmarks/results/degeneration.json`` and a markdown table is printed.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"

# Holtzman et al. 2020, Table 1 (GPT-2 Large, WebText continuations): repetition %, Self-BLEU-4.
PAPER = {
    "greedy": (73.66, 0.50),
    "beam 16": (28.94, 0.44),
    "pure sampling": (0.22, 0.28),
    "top-k 40": (0.78, 0.39),
    "top-k 40, t=0.7": (8.86, 0.44),
    "nucleus p=0.95": (0.36, 0.32),
}

METRICS = ["repetition", "self_bleu", "zipf", "distinct-2", "diversity", "gen_ppl", "length"]


def configs(beams: list[int]) -> dict[str, dict]:
    """The decoding configs of the table, by row label."""
    out: dict[str, dict] = {"greedy": {"strategy": "greedy"}}
    for b in beams:
        out[f"beam {b}"] = {"strategy": "beam", "num_beams": b}
    out.update({
        "pure sampling": {"strategy": "sample", "temperature": 1.0},
        "temperature 0.7": {"strategy": "sample", "temperature": 0.7},
        "top-k 40": {"strategy": "sample", "top_k": 40},
        "top-k 40, t=0.7": {"strategy": "sample", "top_k": 40, "temperature": 0.7},
        "nucleus p=0.95": {"strategy": "sample", "top_p": 0.95},
        # llama.cpp's samplers (issue 11), at their common settings; same prompts and seeds as above
        "greedy + DRY 0.8": {"strategy": "greedy", "dry_multiplier": 0.8},
        "DRY 0.8, p=0.95": {"strategy": "sample", "top_p": 0.95, "dry_multiplier": 0.8},
        "XTC 0.5/0.1, min-p 0.05": {"strategy": "sample", "min_p": 0.05, "xtc_probability": 0.5,
                                    "xtc_threshold": 0.1},
        "top-nσ 1.0": {"strategy": "sample", "top_n_sigma": 1.0},
        "mirostat v2 (tau 5)": {"strategy": "sample", "mirostat": 2, "mirostat_tau": 5.0, "mirostat_eta": 0.1},
    })
    return out


def fmt(v: float | None, digits: int = 2) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=100, help="story prompts (test split)")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--beams", type=int, nargs="*", default=[4], help="beam widths to include (e.g. 4 16)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = leave as is)")
    ap.add_argument("--bootstrap", type=int, default=500)
    ap.add_argument("--split", default="test")
    ap.add_argument("--only", nargs="*", default=None, help="run only these row labels (e.g. greedy)")
    ap.add_argument("--tag", default="", help="suffix of the results file (degeneration_<tag>.json)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 3 prompts, 16 tokens, tag 'quick'")
    args = ap.parse_args()
    if args.quick:
        args.prompts, args.max_new_tokens, args.bootstrap, args.tag = 3, 16, 20, args.tag or "quick"

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from decodetune.eval import evaluate
    from decodetune.models import load_model

    RESULTS.mkdir(parents=True, exist_ok=True)
    cache = RESULTS / "degeneration_cache.sqlite"
    lm = load_model("smollm2-135m")
    rows = {}
    t_all = time.perf_counter()
    for label, cfg in configs(args.beams).items():
        if args.only is not None and label not in args.only:
            continue
        cfg = {**cfg, "max_new_tokens": args.max_new_tokens}
        t0 = time.perf_counter()
        # One config per call so an interrupted run keeps what it finished (in the cache).
        res = evaluate(lm, "story", cfg, split=args.split, limit=args.prompts, metrics=METRICS, seed=0,
                       batch_size=args.batch_size, cache=cache, bootstrap=args.bootstrap, progress=True)
        rows[label] = {
            "config": cfg,
            **{m: {"value": res.metrics[m].value, "ci": [res.metrics[m].ci_low, res.metrics[m].ci_high]}
               for m in METRICS},
            "generated_tokens": res.num_tokens_generated, "wall_s": round(time.perf_counter() - t0, 1),
            "cache_hits": res.cache_hits,
        }
        r = rows[label]
        print(f"{label:18s} rep {fmt(r['repetition']['value'])}%  self-BLEU {fmt(r['self_bleu']['value'], 3)}  "
              f"zipf {fmt(r['zipf']['value'])}  distinct-2 {fmt(r['distinct-2']['value'], 3)}  "
              f"ppl {fmt(r['gen_ppl']['value'])}  ({r['wall_s']} s)", flush=True)
    out = {"model": "smollm2-135m", "task": "story", "split": args.split, "prompts": args.prompts,
           "max_new_tokens": args.max_new_tokens, "threads": torch.get_num_threads(),
           "wall_s": round(time.perf_counter() - t_all, 1), "rows": rows, "paper": PAPER}
    (RESULTS / f"degeneration{'_' + args.tag if args.tag else ''}.json").write_text(json.dumps(out, indent=2) + "\n")
    print()
    print(markdown(out))


def markdown(out: dict) -> str:
    """The BENCHMARKS.md table: ours beside the paper's GPT-2 Large numbers; ratios vs greedy."""
    g = out["rows"].get("greedy") or next(iter(out["rows"].values()))
    lines = ["| decoding | repetition % [95% CI] | Self-BLEU-4 | Zipf | distinct-2 | diversity | gen-ppl | "
             "rep / greedy | paper rep % | paper Self-BLEU-4 |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for label, r in out["rows"].items():
        paper_key = label if label in PAPER else None
        p_rep, p_sb = PAPER.get(paper_key, (None, None)) if paper_key else (None, None)
        rep = r["repetition"]
        ratio = rep["value"] / g["repetition"]["value"] if g["repetition"]["value"] else float("nan")
        lines.append(
            f"| {label} | {fmt(rep['value'])} [{fmt(rep['ci'][0])}, {fmt(rep['ci'][1])}] | "
            f"{fmt(r['self_bleu']['value'], 3)} | {fmt(r['zipf']['value'])} | {fmt(r['distinct-2']['value'], 3)} | "
            f"{fmt(r['diversity']['value'], 3)} | {fmt(r['gen_ppl']['value'])} | {fmt(ratio)} | "
            f"{fmt(p_rep)} | {fmt(p_sb)} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
