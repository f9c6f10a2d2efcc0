"""Search efficiency: what each search strategy costs to find the optimum of a fixed finite space.

1. **Grid (the anchor).** Every config of a fixed finite space is evaluated on the dev items of a builtin
   closed-ended task, all in one config-batched call, into a generation cache. Its best score is the
   optimum; its generated tokens are the grid's cost.
2. **Strategies, replayed.** ``decodetune.tune`` runs random, TPE with pruning, and GP (5 seeds each) over
   the same space with the same cache, so nothing is generated again; every row they evaluate is one the
   grid produced. For each run we count the tokens it *would* have generated (the grid's tokens of the
   distinct (config, item) rows it evaluated, pruned trials included up to where they stopped) and the
   trials, until a fully evaluated trial reaches >= 99% of the grid optimum. Target: TPE with pruning
   within 25% of the grid's tokens.
3. **Config batching.** A subset of the configs evaluated in one ``evaluate_many`` call against one
   ``evaluate`` call per config (the same rows, no cache): wall time ratio (target >= 3x) and whether
   the generations are identical.

    python benchmarks/search_efficiency.py                   # smollm2-135m on arith
    python benchmarks/search_efficiency.py --limit 16 --seeds 2 --model tiny   # quick smoke run

Results go to benchmarks/results/search_efficiency.json (and a cache next to it, so a re-run replays).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

#: 2 greedy + 8 beam + 24 sampling configs = 34 points
SPACE = {
    "strategy": ["greedy", "beam", "sample"],
    "num_beams": [2, 4],
    "length_penalty": [0.5, 1.0],
    "temperature": [0.1, 0.3, 0.6, 1.0],
    "top_p": [0.8, 0.95, 1.0],
    "repetition_penalty": [1.0, 1.2],
}
STRATEGIES = [("random", False), ("tpe", True), ("gp", False)]


def tiny_model() -> Any:
    """The tests' tiny random Llama (for smoke runs only)."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import build_tiny_model, build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    return build_tiny_model(len(tok)), tok


def config_key(cfg: Any) -> str:
    from decodetune.cache import config_key_fields

    return json.dumps(config_key_fields(cfg), sort_keys=True)


def run_grid(lm: Any, task: str, limit: int, cache: Path, space: Any) -> dict[str, Any]:
    """Evaluate every grid point in one batched call; per (config, item) score and tokens."""
    from decodetune.eval import evaluate_many

    points = space.grid()
    configs = [space.config(p) for p in points]
    t0 = time.perf_counter()
    results = evaluate_many(lm, task, configs, split="dev", limit=limit, cache=str(cache), progress=True)
    wall = time.perf_counter() - t0
    table = {}
    for p, res in zip(points, results, strict=True):
        tokens = [0] * len(res.item_ids)
        for row in res.rows:  # repeats = 1
            tokens[row["item_index"]] += row["num_tokens"]
        table[config_key(res.config)] = {"params": p, "score": res.score, "per_item": res.per_item(),
                                         "tokens": tokens}
    total = sum(sum(v["tokens"]) for v in table.values())
    generated = sum(r.num_tokens_generated for r in results)
    return {"points": len(points), "table": table, "tokens": total, "generated_now": generated,
            "wall_s": wall, "optimum": max(v["score"] for v in table.values())}


def replay(lm: Any, task: str, limit: int, cache: Path, space: Any, grid: dict[str, Any], search: str,
           prune: bool, seed: int, n_trials: int) -> dict[str, Any]:
    """One tune() run against the grid's cache; tokens it would have generated and trials to 99%."""
    from optuna.trial import TrialState

    from decodetune.config import DecodingConfig
    from decodetune.tuning import tune

    with tempfile.TemporaryDirectory() as tmp:
        res = tune(lm, task, search=search, n_trials=n_trials, space=space, limit=limit, seed=seed,
                   prune=prune, final_test=False, out_dir=tmp, storage=f"sqlite:///{tmp}/s.db",
                   study_name="bench", cache=cache, eval_seed=0)  # the grid's row seeds: all cached
        trials = sorted(res.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)),
                        key=lambda t: t.number)
    target = 0.99 * grid["optimum"]
    seen: set[tuple[str, int]] = set()
    tokens = 0
    reached = None
    for i, t in enumerate(trials, start=1):
        key = config_key(DecodingConfig.from_dict(t.user_attrs["config"]))
        row = grid["table"][key]
        items = sorted(t.intermediate_values) if t.user_attrs.get("pruned") else range(len(row["tokens"]))
        for j in items:
            if (key, j) not in seen:
                seen.add((key, j))
                tokens += row["tokens"][j]
        if not t.user_attrs.get("pruned"):
            assert math.isclose(t.values[0], row["score"], abs_tol=1e-9), (t.values[0], row["score"])
        if reached is None and not t.user_attrs.get("pruned") and t.values[0] >= target - 1e-12:
            reached = {"trials": i, "tokens": tokens}
    return {"search": search, "prune": prune, "seed": seed, "trials": len(trials), "tokens_total": tokens,
            "pruned": sum(1 for t in trials if t.user_attrs.get("pruned")), "reached": reached,
            "best": max((t.values[0] for t in trials if not t.user_attrs.get("pruned")), default=None),
            "tokens_generated_now": res.stats.tokens_generated}


def batching(lm: Any, task: str, limit: int, space: Any, n_configs: int) -> dict[str, Any]:
    """The same configs evaluated in one call vs one call per config (no cache)."""
    from decodetune.eval import evaluate, evaluate_many

    points = space.grid(seed=1)[:n_configs]
    configs = [space.config(p) for p in points]
    t0 = time.perf_counter()
    together = evaluate_many(lm, task, configs, split="dev", limit=limit, bootstrap=0)
    t_batched = time.perf_counter() - t0
    t0 = time.perf_counter()
    alone = [evaluate(lm, task, c, split="dev", limit=limit, bootstrap=0) for c in configs]
    t_single = time.perf_counter() - t0
    same = all([r["prediction"] for r in a.rows] == [r["prediction"] for r in b.rows]
               for a, b in zip(together, alone, strict=True))
    return {"configs": [c.to_dict(only_set=True) for c in configs], "rows": sum(len(r.rows) for r in together),
            "batched_s": t_batched, "one_at_a_time_s": t_single, "speedup": t_single / t_batched,
            "identical_generations": same,
            "same_scores": all(a.score == b.score for a, b in zip(together, alone, strict=True))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="model spec, or 'tiny' for a smoke run")
    ap.add_argument("--task", default="arith")
    ap.add_argument("--limit", type=int, default=40, help="dev items")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--trials", type=int, default=0, help="trials per strategy run (default: the grid size)")
    ap.add_argument("--batch-configs", type=int, default=8, help="configs in the batching comparison")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: idle cores)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "search_efficiency.json"))
    args = ap.parse_args()

    from decodetune.cli.demo_cmd import set_threads
    from decodetune.models import load_model
    from decodetune.tuning.space import parse_space

    threads = set_threads(args.threads)
    lm = load_model(tiny_model() if args.model == "tiny" else args.model)
    space = parse_space(SPACE, source="benchmark space")
    out = Path(args.out)
    cache = out.with_name(out.stem + f"_{args.model.replace('/', '_')}_{args.limit}.cache.sqlite")
    started = time.time()
    load_before = os.getloadavg()

    grid = run_grid(lm, args.task, args.limit, cache, space)
    print(f"grid: {grid['points']} configs x {args.limit} items, optimum {grid['optimum']:.4f}, "
          f"{grid['tokens']} tokens ({grid['generated_now']} generated in this run, {grid['wall_s']:.0f} s)")
    n_trials = args.trials or grid["points"]

    runs = []
    for search, prune in STRATEGIES:
        for seed in range(args.seeds):
            r = replay(lm, args.task, args.limit, cache, space, grid, search, prune, seed, n_trials)
            runs.append(r)
            reached = r["reached"]
            print(f"{search:6s}{' +prune' if prune else '       '} seed {seed}: best {r['best']:.4f}, "
                  + (f"reached 99% at trial {reached['trials']} with {reached['tokens']} tokens "
                     f"({reached['tokens'] / grid['tokens']:.1%} of grid)" if reached else "did not reach 99%")
                  + f"; {r['trials']} trials, {r['pruned']} pruned, {r['tokens_total']} tokens in all"
                  + (f" [generated {r['tokens_generated_now']}!]" if r["tokens_generated_now"] else ""))

    summary = {}
    for search, prune in STRATEGIES:
        rs = [r for r in runs if r["search"] == search]
        hit = [r for r in rs if r["reached"]]
        summary[search + ("+prune" if prune else "")] = {
            "reached": f"{len(hit)}/{len(rs)}",
            "median_trials": statistics.median([r["reached"]["trials"] for r in hit]) if hit else None,
            "median_tokens_frac": (statistics.median([r["reached"]["tokens"] for r in hit]) / grid["tokens"]
                                   if hit else None),
            "max_tokens_frac": max(r["reached"]["tokens"] for r in hit) / grid["tokens"] if hit else None,
        }
    near = sum(1 for v in grid["table"].values() if v["score"] >= 0.99 * grid["optimum"] - 1e-12)
    print(f"\n{near} of the grid's {grid['points']} configs score >= 99% of the optimum "
          f"(random sampling without replacement needs {(grid['points'] + 1) / (near + 1):.1f} trials on average)")
    print("summary (fraction of the grid's tokens to reach >= 99% of the grid optimum):")
    for name, s in summary.items():
        print(f"  {name:11s} reached {s['reached']}, median trials {s['median_trials']}, "
              f"median tokens {s['median_tokens_frac'] if s['median_tokens_frac'] is None else round(s['median_tokens_frac'], 3)}, "  # noqa: E501
              f"worst {s['max_tokens_frac'] if s['max_tokens_frac'] is None else round(s['max_tokens_frac'], 3)}")

    b = batching(lm, args.task, args.limit, space, args.batch_configs)
    print(f"\nconfig batching: {len(b['configs'])} configs, {b['rows']} rows: one call {b['batched_s']:.1f} s, "
          f"one call per config {b['one_at_a_time_s']:.1f} s -> {b['speedup']:.2f}x; identical generations: "
          f"{b['identical_generations']}, same scores: {b['same_scores']}")

    record = {"model": args.model, "task": args.task, "limit": args.limit, "seeds": args.seeds,
              "space": SPACE, "threads": threads, "torch": torch.__version__, "machine": platform.platform(),
              "cpus": os.cpu_count(), "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
              "wall_s": time.time() - started,
              "grid": {k: v for k, v in grid.items() if k != "table"}, "near_optimal_configs": near,
              "grid_scores": {k: v["score"] for k, v in grid["table"].items()},
              "runs": runs, "summary": summary, "batching": b}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2, default=str))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
