"""Augmentation benchmark (CPU, smollm2-135m), two parts.

1. ``distill``: distil the teacher into a 7-layer student from a fixed small prompt set, at an equal
   training-token budget (same steps x batch, and every teacher completion is exactly
   ``--max-new-tokens`` long, so the same number of completion tokens), with and without augmented
   prompts. Arms: (a) the original prompts, one teacher completion each, repeated; (b) the original prompts
   with several teacher samples each (the control: more completions, no new prompts); (c) originals + EDA
   variants (swap, delete, and synonym replacement from the model's own suggestions); (d) originals +
   paraphrases written by the teacher. Reported: held-out student perplexity on teacher text (prompts about
   unseen subjects), top-1 agreement with the teacher, KL, and the training tokens each arm actually used.
   The anchor is the untrained student, measured in the same run.
2. ``robust``: prompt robustness on the closed-ended ``arith`` task: numeric_match on the original test
   prompts against their augmented versions (swap, delete, synonym from a small table, paraphrase; numbers
   are protected and must survive), for greedy decoding and for a config tuned by ``decodetune.tune``
   on the dev split (or ``--tuned-config FILE``); when the tuner's best is the default itself, the best
   other trial is used and the output says so. Item-paired drop with a 95% bootstrap CI.

    python benchmarks/augment.py                 # both parts: ~5 min on 2 idle cores, 30+ min under load
    python benchmarks/augment.py --part distill --seeds 0,1,2,3,4
    python benchmarks/augment.py --part robust --tuned-config best_config.json
    python benchmarks/augment.py --quick         # a smoke run

Teacher generations are cached in $DECODETUNE_CACHE/bench-augment (or ~/.cache/decodetune/...).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

TRAIN_SUBJECTS = ["the moon", "bread", "honey bees", "mountains", "libraries", "trains", "chess", "owls",
                  "clocks", "forests", "tea", "bridges"]
HELDOUT_SUBJECTS = ["volcanoes", "the desert", "rivers", "whales", "kites", "islands", "maps", "the wind"]
TEMPLATES = ["Here is a short paragraph about {s}:", "Some interesting facts about {s}.",
             "Why do people like {s}? Because", "A story about {s}. Once upon a time,"]
#: A user-supplied synonym table for the arith prompts ("What is 3 + 9? Answer with just the number.").
ARITH_SYNONYMS = {"answer": ["reply", "respond"], "just": ["only", "simply"], "number": ["figure", "value"],
                  "what": ["which"]}


def cache_dir() -> Path:
    root = Path(os.environ.get("DECODETUNE_CACHE", Path.home() / ".cache" / "decodetune"))
    path = root / "bench-augment"
    path.mkdir(parents=True, exist_ok=True)
    return path


def teacher_generations(teacher: Any, prompts: list[str], config: Any, seeds: list[int], tag: str) -> list:
    """Teacher completions (token ids), one per (prompt, seed), cached on disk per pair: a row's tokens do
    not depend on the rest of its batch, so arms that share prompts share generations."""
    from decodetune.io import write_json
    from decodetune.train.distill.data import sample_completions

    key = hashlib.sha256(json.dumps([teacher.name, config.to_dict()]).encode()).hexdigest()[:16]
    path = cache_dir() / f"{tag}-{key}.json"
    store: dict[str, list[int]] = json.loads(path.read_text()) if path.exists() else {}
    pairs = list(dict.fromkeys(f"{s}|{p}" for p, s in zip(prompts, seeds, strict=True)))
    missing = [pk for pk in pairs if pk not in store]
    if missing:
        t0 = time.perf_counter()
        todo_seeds = [int(pk.split("|", 1)[0]) for pk in missing]
        todo_prompts = [pk.split("|", 1)[1] for pk in missing]
        for pk, ids in zip(missing, sample_completions(teacher, todo_prompts, config, todo_seeds, batch_size=16),
                           strict=True):
            store[pk] = ids
        write_json(path, store)
        print(f"  {tag}: {len(missing)} teacher generations in {time.perf_counter() - t0:.0f} s", flush=True)
    return [store[f"{s}|{p}"] for p, s in zip(prompts, seeds, strict=True)]


def fill(rows: list[dict], budget: int) -> list[dict]:
    """Exactly ``budget`` rows: cycle through ``rows`` (originals first) when filtering left fewer."""
    return [rows[i % len(rows)] for i in range(budget)]


def part_distill(args: Any) -> dict[str, Any]:
    from decodetune.config import DecodingConfig
    from decodetune.models import load_model
    from decodetune.models.handle import LoadedModel
    from decodetune.train.augment import Filters, augment
    from decodetune.train.distill.data import TeacherLogitCache
    from decodetune.train.distill.evaluate import compare_to_teacher
    from decodetune.train.distill.student import StudentSpec, build_student
    from decodetune.train.distill.trainer import DistillConfig, build_examples, distill

    teacher = load_model("smollm2-135m", raw=True)
    # min_new_tokens = max_new_tokens: every completion has the same length, so an equal number of
    # examples is an equal number of training tokens whatever the prompts
    gen = DecodingConfig(strategy="sample", temperature=0.7, top_p=0.9, max_new_tokens=args.max_new_tokens,
                         min_new_tokens=args.max_new_tokens)
    rng = random.Random(args.seed)
    train = [TEMPLATES[i % len(TEMPLATES)].format(s=s) for i, s in enumerate(TRAIN_SUBJECTS[: args.train])]
    held = [t.format(s=s) for s in HELDOUT_SUBJECTS for t in TEMPLATES]
    rng.shuffle(held)
    held = held[: args.heldout]
    k = args.copies  # examples per original prompt in the budget
    budget = len(train) * k
    steps = budget // args.batch_size
    base_rows = [{"prompt": p, "id": f"p{i}"} for i, p in enumerate(train)]

    t0 = time.perf_counter()
    filt = Filters(min_len_ratio=0.5, max_len_ratio=2.0)
    eda = augment(base_rows, "swap,delete,synonym", n=max(1, (k - 1 + 2) // 3), seed=args.seed,
                  model=teacher, synonyms="lm", rates=0.15, filters=filt, progress=True)
    para = augment(base_rows, "paraphrase", n=k - 1, seed=args.seed, model=teacher, filters=filt, progress=True)
    aug_s = time.perf_counter() - t0

    def grouped(res: Any) -> list[dict]:
        """Per original: itself then up to k-1 variants; all originals come first in the cycle order."""
        per = {i: [r for r in res.rows if r["aug_source"] == i] for i in range(len(train))}
        return [r for j in range(k) for i in range(len(train)) for r in per[i][j:j + 1]]

    arms: dict[str, list[dict]] = {
        "a: originals, repeated": [{"prompt": p, "seed": 0} for p in train],
        "b: originals, k samples": [{"prompt": p, "seed": j} for j in range(k) for p in train],
        "c: + EDA variants": [{"prompt": r["prompt"], "seed": 0} for r in grouped(eda)],
        "d: + paraphrases": [{"prompt": r["prompt"], "seed": 0} for r in grouped(para)],
    }
    held_ids = teacher_generations(teacher, held, gen, [10_000 + i for i in range(len(held))], "heldout")
    held_examples = build_examples(teacher, [{"prompt": p} for p in held], held_ids, 256)
    cache = TeacherLogitCache()
    spec = StudentSpec(num_hidden_layers=7, norm="rmsnorm")
    base_student, info = build_student(teacher.model, spec, seed=args.seed)
    view = LoadedModel(base_student.eval(), teacher.tokenizer, name="student", chat=False)
    untrained = compare_to_teacher(view, teacher, held_examples, batch_size=8, teacher_cache=cache)
    results: dict[str, Any] = {"untrained student": {
        "perplexity": untrained["student"]["perplexity"], "agreement": untrained["top1_agreement"],
        "kl": untrained["kl_teacher_student"], "distinct_prompts": 0, "train_tokens": 0}}
    for name, rows in arms.items():
        rows = fill(rows, budget)
        prompts = [r["prompt"] for r in rows]
        seeds = [hash_seed(r["prompt"], r["seed"]) for r in rows]
        comps = teacher_generations(teacher, prompts, gen, seeds, "train")
        cfg = DistillConfig(loss="fkl", steps=steps, batch_size=args.batch_size, lr=args.lr, warmup_steps=1,
                            source="teacher", seed=args.seed)
        t1 = time.perf_counter()
        run = distill(teacher, spec, [{"prompt": p, "_line": i + 1} for i, p in enumerate(prompts)], cfg,
                      teacher_cache=cache, completions=comps, progress=False)
        view = LoadedModel(run.student.eval(), teacher.tokenizer, name="student", chat=False)
        res = compare_to_teacher(view, teacher, held_examples, batch_size=8, teacher_cache=cache)
        results[name] = {"perplexity": res["student"]["perplexity"], "agreement": res["top1_agreement"],
                         "kl": res["kl_teacher_student"], "distinct_prompts": len(set(prompts)),
                         "train_tokens": sum(h["tokens"] for h in run.history), "train_s": time.perf_counter() - t1}
        print(f"  {name}: ppl {results[name]['perplexity']:.2f} agreement {results[name]['agreement']:.4f}",
              flush=True)
    return {"results": results, "steps": steps, "budget": budget, "augment_s": aug_s,
            "teacher_ppl": untrained["teacher"]["perplexity"], "counts": {"eda": eda.counts, "para": para.counts},
            "examples": {"eda": [r["prompt"] for r in eda.rows[:6]], "para": [r["prompt"] for r in para.rows[:6]]},
            "student_fraction": info["non_embedding_params"] / info["teacher_non_embedding_params"]}


def hash_seed(prompt: str, j: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{prompt}|{j}".encode()).digest()[:4], "big") & 0x7FFFFFFF


def part_robust(args: Any) -> dict[str, Any]:
    from decodetune.config import DecodingConfig
    from decodetune.models import load_model
    from decodetune.train.augment import robustness

    model = load_model("smollm2-135m")
    greedy = DecodingConfig(strategy="greedy", max_new_tokens=12)
    tune_s = 0.0
    if args.tuned_config is not None:
        tuned = DecodingConfig.load(args.tuned_config)
        tuned_from = str(args.tuned_config)
    else:
        from decodetune.tuning import tune

        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as out:
            res = tune(model, "arith", search="tpe", n_trials=args.trials, limit=args.tune_limit, seed=args.seed,
                       out_dir=out, final_test=False, prune=False)
        tune_s = time.perf_counter() - t0
        tuned, tuned_from = pick_tuned(res, args)
    with tempfile.TemporaryDirectory() as tmp:
        table = Path(tmp) / "synonyms.json"
        table.write_text(json.dumps(ARITH_SYNONYMS))
        t0 = time.perf_counter()
        out = robustness(model, "arith", [greedy, tuned], "swap,delete,synonym,paraphrase", n=1, seed=args.seed,
                         split="test", limit=args.limit, augment_kwargs={"synonyms": str(table), "model": model,
                                                                         "rates": 0.15, "progress": True})
        eval_s = time.perf_counter() - t0
    return {"configs": [r.to_dict() for r in out], "tuned_from": tuned_from, "tune_s": tune_s, "eval_s": eval_s}


def pick_tuned(res: Any, args: Any) -> tuple[Any, str]:
    """The tuner's best config; when that is the default (greedy) baseline, the best other trial, said so."""
    from decodetune.config import DecodingConfig

    where = f"tune(tpe, {args.trials} trials, dev[:{args.tune_limit}])"
    done = [t for t in res.study.trials if t.values is not None and "config" in t.user_attrs]
    base = next((t for t in done if t.user_attrs.get("baseline")), None)
    best = res.best_trial
    if best is None or not best.user_attrs.get("baseline"):
        return res.best_config, f"{where}, dev numeric_match {best.values[0]:.3f}" if best else where
    others = sorted((t for t in done if not t.user_attrs.get("baseline")), key=lambda t: -t.values[0])
    if not others:
        return res.best_config, f"{where}: only the default completed"
    pick = others[0]
    return (DecodingConfig.from_dict(pick.user_attrs["config"]),
            f"{where}: the default won on dev ({base.values[0]:.3f}); using the best other trial "
            f"(#{pick.number}, dev {pick.values[0]:.3f})")


def summarise(runs: list[dict[str, Any]]) -> None:
    """Across seeds: geometric-mean perplexity, mean agreement (+- sd), and wins against arm (a)."""
    import math
    import statistics

    names = list(runs[0]["results"])
    print(f"\nover {len(runs)} seeds (each: its own student init order, held-out draw, variants, batch order)")
    print(f"{'arm':26}{'geo-mean ppl':>14}{'agree mean':>12}{'sd':>8}{'ppl < (a)':>11}")
    base = "a: originals, repeated"
    for name in names:
        ppl = [x["results"][name]["perplexity"] for x in runs]
        agree = [x["results"][name]["agreement"] for x in runs]
        wins = sum(x["results"][name]["perplexity"] < x["results"][base]["perplexity"] for x in runs)
        print(f"{name:26}{math.exp(statistics.mean(math.log(p) for p in ppl)):>14.1f}"
              f"{statistics.mean(agree):>12.4f}{statistics.stdev(agree):>8.4f}{wins:>8}/{len(runs)}")


def report(d: dict[str, Any] | None, r: dict[str, Any] | None, args: Any, total_s: float) -> None:
    print()
    print(f"machine: {platform.machine()} {os.cpu_count()} cores; load {os.getloadavg()}; total {total_s:.0f} s")
    if d is not None:
        print(f"distill: 7-layer student ({d['student_fraction']:.3f} of the teacher's non-embedding params), "
              f"{d['steps']} steps x {args.batch_size} = {d['budget']} examples per arm, forward KL; "
              f"augmentation took {d['augment_s']:.0f} s; teacher held-out ppl {d['teacher_ppl']:.2f}")
        print(f"{'arm':26}{'ppl':>9}{'agree':>8}{'KL':>8}{'prompts':>9}{'tokens':>8}")
        for name, x in d["results"].items():
            print(f"{name:26}{x['perplexity']:>9.2f}{x['agreement']:>8.4f}{x['kl']:>8.3f}"
                  f"{x['distinct_prompts']:>9}{x['train_tokens']:>8}")
        print(f"augment counts: {json.dumps(d['counts'])}")
        for key, ex in d["examples"].items():
            print(f"  {key} examples: {ex}")
    if r is not None:
        print(f"robustness on arith test (tuned config from {r['tuned_from']}, {r['tune_s']:.0f} s; "
              f"eval {r['eval_s']:.0f} s)")
        for c in r["configs"]:
            lo, hi = c["drop_ci"]
            ops = ", ".join(f"{k} {v:.3f}" for k, v in c["per_op"].items())
            print(f"  {json.dumps(c['config'])}: original {c['original']:.3f}, augmented {c['augmented']:.3f}, "
                  f"drop {c['drop']:+.3f} [{lo:+.3f}, {hi:+.3f}] over {c['items']} items / {c['variants']} "
                  f"variants; per op: {ops}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", choices=["distill", "robust", "all"], default="all")
    ap.add_argument("--train", type=int, default=8, help="original training prompts")
    ap.add_argument("--copies", type=int, default=4, help="examples per original prompt in the budget")
    ap.add_argument("--heldout", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--limit", type=int, default=30, help="arith test items for the robustness part")
    ap.add_argument("--trials", type=int, default=6, help="tuning trials for the tuned config")
    ap.add_argument("--tune-limit", type=int, default=20, help="dev items per tuning trial")
    ap.add_argument("--tuned-config", type=Path, default=None, help="use this config instead of tuning")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--seeds", default=None, help="distill part: comma-separated seeds (replicates), e.g. 0,1,2")
    ap.add_argument("--quick", action="store_true", help="tiny smoke run")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args()
    if args.quick:
        args.train, args.copies, args.heldout, args.max_new_tokens = 2, 2, 4, 8
        args.limit, args.trials, args.tune_limit = 4, 2, 4
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    t0 = time.perf_counter()
    runs = []
    if args.part in ("distill", "all"):
        for seed in [int(x) for x in args.seeds.split(",")] if args.seeds else [args.seed]:
            print(f"distill, seed {seed}", flush=True)
            runs.append(part_distill(argparse.Namespace(**{**vars(args), "seed": seed})))
            report(runs[-1], None, args, time.perf_counter() - t0)
    r = part_robust(args) if args.part in ("robust", "all") else None
    if len(runs) > 1:
        summarise(runs)
    report(None, r, args, time.perf_counter() - t0)
    if args.json is not None:
        args.json.write_text(json.dumps({"distill": runs, "robust": r,
                                         "args": {k: str(v) for k, v in vars(args).items()}}, indent=2, default=str))


if __name__ == "__main__":
    main()
