"""Distillation benchmark (CPU): smollm2-135m teacher -> 7-layer student (<= 1/4 of its non-embedding
parameters), every arm on the same teacher generations, the same examples in the same order (same
token budget), evaluated on held-out teacher generations for prompts about *unseen* subjects.

Arms: (a) cross-entropy on teacher generations (sequence KD), (b) forward KL, (c) generalized JSD(0.5),
each with RMSNorm; then forward KL with LayerNorm and with BatchNorm (the norm comparison, (b) is the
RMSNorm arm). Reported per arm: held-out student perplexity (on the teacher's text), top-1 agreement
with the teacher, KL(teacher||student); for BatchNorm also the same with batch statistics (training
behaviour) and the causal leak; tokens/s of student vs teacher. The anchor is the teacher itself and
the untrained (layer-extracted) student, measured in the same run.

    python benchmarks/distill.py                 # about 15 min on 2 shared cores (load ~13)
    python benchmarks/distill.py --quick         # a smoke run (minutes)

Teacher generations are cached in $DECODETUNE_CACHE/bench-distill (or ~/.cache/decodetune/...), so
only the first run pays for them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import time
from pathlib import Path
from typing import Any

import torch

SUBJECTS = [
    "the moon", "bicycles", "bread", "the ocean", "a rainy day", "honey bees", "the piano", "mountains",
    "coffee", "libraries", "volcanoes", "trains", "gardening", "the desert", "snow", "chess", "rivers",
    "the first computer", "owls", "football", "a small village", "clocks", "the sun", "forests", "paper",
    "lighthouses", "tea", "the internet", "dinosaurs", "a birthday party", "bridges", "whales", "maps",
    "the wind", "cats", "a old castle", "kites", "music", "the night sky", "islands",
]
TEMPLATES = [
    "Here is a short paragraph about {s}:", "Some interesting facts about {s}.", "A story about {s}. Once upon a time,",
    "Why do people like {s}? Because",
]
ARMS = [  # name, loss, norm, extra config
    ("a: CE on teacher text", "ce", "rmsnorm", {}),
    ("b: forward KL", "fkl", "rmsnorm", {}),
    ("c: JSD(0.5)", "jsd", "rmsnorm", {"beta": 0.5}),
    ("b + LayerNorm", "fkl", "layernorm", {}),
    ("b + BatchNorm", "fkl", "batchnorm", {}),
]


def cache_dir() -> Path:
    root = Path(os.environ.get("DECODETUNE_CACHE", Path.home() / ".cache" / "decodetune"))
    path = root / "bench-distill"
    path.mkdir(parents=True, exist_ok=True)
    return path


def make_rows(n_train: int, n_heldout: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Prompts from subjects x templates; held-out prompts use subjects never seen in training."""
    rng = random.Random(seed)
    subjects = SUBJECTS[:]
    rng.shuffle(subjects)
    n_held_subjects = max(1, len(subjects) // 5)
    held_s, train_s = subjects[:n_held_subjects], subjects[n_held_subjects:]
    def rows(subs: list[str], n: int) -> list[dict]:
        pairs = [(s, t) for s in subs for t in TEMPLATES]
        rng.shuffle(pairs)
        return [{"prompt": t.format(s=s), "_line": i + 1} for i, (s, t) in enumerate(pairs[:n])]
    return rows(train_s, n_train), rows(held_s, n_heldout)


def teacher_generations(teacher: Any, rows: list[dict], config: Any, seed: int, tag: str) -> tuple[list, float]:
    """Teacher completions (token ids) for rows, cached on disk; returns (ids, seconds spent now)."""
    import hashlib

    from decodetune.train.distill.data import sample_completions

    key = hashlib.sha256(json.dumps([teacher.name, config.to_dict(), seed, [r["prompt"] for r in rows]],
                                    sort_keys=True).encode()).hexdigest()[:16]
    path = cache_dir() / f"{tag}-{key}.json"
    if path.exists():
        return json.loads(path.read_text()), 0.0
    t0 = time.perf_counter()
    ids: list[list[int]] = []
    for start in range(0, len(rows), 16):
        part = rows[start:start + 16]
        ids += sample_completions(teacher, [r["prompt"] for r in part], config,
                                  [seed * 100_003 + start + i for i in range(len(part))], batch_size=16)
        print(f"  {tag}: {len(ids)}/{len(rows)} generations", flush=True)
    from decodetune.io import write_json

    write_json(path, ids)
    return ids, time.perf_counter() - t0


def evaluate_arm(student: Any, teacher: Any, heldout: list, cache: Any, pad: int, bn: bool) -> dict[str, Any]:
    from decodetune.models.handle import LoadedModel
    from decodetune.train.distill.evaluate import causal_leak, compare_to_teacher

    view = LoadedModel(student, teacher.tokenizer, name="student", chat=teacher.chat)
    res = compare_to_teacher(view, teacher, heldout, batch_size=8, teacher_cache=cache)
    out = {"perplexity": res["student"]["perplexity"], "agreement": res["top1_agreement"],
           "kl": res["kl_teacher_student"], "tokens": res["completion_tokens"],
           "teacher_perplexity": res["teacher"]["perplexity"]}
    out["leak"] = causal_leak(student, heldout[:4], pad)
    if bn:
        b = compare_to_teacher(view, teacher, heldout, batch_size=8, teacher_cache=cache, batch_statistics=True)
        out["batch_stats"] = {"perplexity": b["student"]["perplexity"], "agreement": b["top1_agreement"],
                              "kl": b["kl_teacher_student"]}
        b1 = compare_to_teacher(view, teacher, heldout, batch_size=1, teacher_cache=cache, batch_statistics=True)
        out["batch_stats_bs1"] = {"perplexity": b1["student"]["perplexity"], "agreement": b1["top1_agreement"]}
    return out


def speed(student: Any, teacher: Any, heldout: list, prompts: list[str], new_tokens: int) -> dict[str, Any]:
    """Forward tokens/s on held-out batches and greedy generation tokens/s, student vs teacher."""
    from decodetune.models.handle import LoadedModel
    from decodetune.train.distill.evaluate import compare_to_teacher, generation_speed

    view = LoadedModel(student, teacher.tokenizer, name="student", chat=teacher.chat)
    fwd = compare_to_teacher(view, teacher, heldout[:16], batch_size=8)
    gen_s = generation_speed(view, prompts, max_new_tokens=new_tokens, batch_size=len(prompts))
    gen_t = generation_speed(teacher, prompts, max_new_tokens=new_tokens, batch_size=len(prompts))
    return {"student_forward_tok_s": fwd["student"]["forward_tokens_per_s"],
            "teacher_forward_tok_s": fwd["teacher"]["forward_tokens_per_s"],
            "student_generate_tok_s": gen_s["generate_tokens_per_s"],
            "teacher_generate_tok_s": gen_t["generate_tokens_per_s"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train", type=int, default=64, help="training prompts")
    ap.add_argument("--heldout", type=int, default=24, help="held-out prompts (unseen subjects)")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--layers", type=int, default=7, help="student layers extracted from the teacher's 30")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: the CPU is shared; 2 thrashes)")
    ap.add_argument("--arms", default="all", help="comma-separated arm indices (0-4) or 'all'")
    ap.add_argument("--quick", action="store_true", help="tiny smoke run")
    ap.add_argument("--generate-only", action="store_true", help="only fill the teacher-generation cache")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args()
    if args.quick:
        args.train, args.heldout, args.max_new_tokens = 8, 8, 8
    torch.set_num_threads(args.threads)
    t_all = time.perf_counter()

    from decodetune.config import DecodingConfig
    from decodetune.models import load_model
    from decodetune.train.distill.data import TeacherLogitCache
    from decodetune.train.distill.student import StudentSpec, build_student, check_param_budget
    from decodetune.train.distill.trainer import DistillConfig, build_examples, distill

    teacher = load_model("smollm2-135m", raw=True)  # raw: no chat template, so prompts stay short
    gen_cfg = DecodingConfig(strategy="sample", temperature=0.7, top_p=0.9, max_new_tokens=args.max_new_tokens)
    train_rows, held_rows = make_rows(args.train, args.heldout, args.seed)
    train_ids, t_gen1 = teacher_generations(teacher, train_rows, gen_cfg, args.seed, "train")
    held_ids, t_gen2 = teacher_generations(teacher, held_rows, gen_cfg, args.seed + 1, "heldout")
    heldout = build_examples(teacher, held_rows, held_ids, 256)
    pad = teacher.tokenizer.pad_token_id if teacher.tokenizer.pad_token_id is not None else 0
    cache = TeacherLogitCache()
    steps = max(1, args.epochs * len(train_rows) // args.batch_size)
    print(f"teacher generations: {len(train_ids)} train, {len(held_ids)} held-out "
          f"({t_gen1 + t_gen2:.0f} s now, cached in {cache_dir()}); {steps} steps x {args.batch_size} per arm")

    results: dict[str, Any] = {}
    spec0 = StudentSpec(num_hidden_layers=args.layers, norm="rmsnorm")
    base_student, base_info = build_student(teacher.model, spec0, seed=args.seed)  # the arms' common init
    check_param_budget(base_info, 0.25)
    if args.generate_only:
        return
    t0 = time.perf_counter()
    results["untrained student"] = evaluate_arm(base_student.eval(), teacher, heldout, cache, pad, False)
    results["untrained student"]["train_s"] = 0.0
    print(f"  untrained student evaluated in {time.perf_counter() - t0:.0f} s", flush=True)
    chosen = range(len(ARMS)) if args.arms == "all" else [int(i) for i in args.arms.split(",")]
    trained: dict[str, Any] = {}
    for i in chosen:
        name, loss, norm, extra = ARMS[i]
        cfg = DistillConfig(loss=loss, steps=steps, batch_size=args.batch_size, lr=args.lr, warmup_steps=2,
                            source="teacher", seed=args.seed, **extra)
        t0 = time.perf_counter()
        run = distill(teacher, StudentSpec(num_hidden_layers=args.layers, norm=norm), train_rows, cfg,
                      teacher_cache=cache, completions=train_ids, progress=True)
        train_s = time.perf_counter() - t0
        res = evaluate_arm(run.student.eval(), teacher, heldout, cache, pad, norm == "batchnorm")
        res.update(train_s=train_s, train_tokens=sum(h["tokens"] for h in run.history),
                   first_loss=run.history[0]["loss"], last_loss=run.history[-1]["loss"])
        results[name] = res
        trained[name] = run.student
        print(f"  {name}: ppl {res['perplexity']:.2f} agreement {res['agreement']:.4f} "
              f"({train_s:.0f} s train)", flush=True)
    t0 = time.perf_counter()
    any_student = next(iter(trained.values()), base_student)
    spd = speed(any_student, teacher, heldout, [r["prompt"] for r in held_rows[:8]], 16)
    print(f"  speed measured in {time.perf_counter() - t0:.0f} s", flush=True)
    report(results, spd, base_info, steps, args, time.perf_counter() - t_all)
    if args.json is not None:
        args.json.write_text(json.dumps({"results": results, "speed": spd, "args": vars(args) | {"json": None},
                                         "student": base_info}, indent=2, default=str))


def report(results: dict[str, Any], spd: dict[str, Any], info: dict[str, Any], steps: int, args: Any,
           total_s: float) -> None:
    print()
    print(f"machine: {platform.machine()} {os.cpu_count()} cores; load {os.getloadavg()}; total {total_s:.0f} s")
    ratio = info["non_embedding_params"] / info["teacher_non_embedding_params"]
    print(f"student: {args.layers} of 30 layers, {info['non_embedding_params']:,} non-embedding params "
          f"= {ratio:.3f} of the teacher; {steps} steps x {args.batch_size} examples per arm")
    first = next(iter(results.values()))
    print(f"held-out: {first['tokens']} completion tokens; teacher perplexity on them "
          f"{first['teacher_perplexity']:.2f}")
    print(f"{'arm':24}{'ppl':>11}{'agree':>8}{'KL':>8}{'tokens':>8}{'loss first->last':>18}{'train s':>9}")
    for name, r in results.items():
        loss = f"{r['first_loss']:.3f}->{r['last_loss']:.3f}" if "first_loss" in r else "-"
        print(f"{name:24}{r['perplexity']:>11.2f}{r['agreement']:>8.4f}{r['kl']:>8.3f}"
              f"{r.get('train_tokens', 0):>8}{loss:>18}{r['train_s']:>9.0f}")
    for name, r in results.items():
        leak = r["leak"]
        print(f"causal leak {name:24} past {leak['past']:.2e}  other sequences {leak['other_sequences']:.2e}"
              f"  (mean |logit| {leak['scale']:.2f})")
        if "batch_stats" in r:
            b, b1 = r["batch_stats"], r["batch_stats_bs1"]
            print(f"  {name} eval with batch statistics: batch 8 ppl {b['perplexity']:.2f} agree "
                  f"{b['agreement']:.4f}; batch 1 ppl {b1['perplexity']:.2f} agree {b1['agreement']:.4f} "
                  f"(running statistics: ppl {r['perplexity']:.2f})")
    print(f"speed: forward student {spd['student_forward_tok_s']:.0f} tok/s vs teacher "
          f"{spd['teacher_forward_tok_s']:.0f}"
          f" ({spd['student_forward_tok_s'] / spd['teacher_forward_tok_s']:.2f}x); greedy generation student "
          f"{spd['student_generate_tok_s']:.1f} tok/s vs teacher {spd['teacher_generate_tok_s']:.1f} "
          f"({spd['student_generate_tok_s'] / spd['teacher_generate_tok_s']:.2f}x)")


if __name__ == "__main__":
    main()
