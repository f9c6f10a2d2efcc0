"""Per-step cost of each issue-11 sampler against plain top-p, as ratios measured in the same run.

One decoding step without the model: the processors, the sampler chain, the seeded draw and the token
state's bookkeeping (``TokenState.append``, where DRY extends its suffix-match table), on the same random
logits batch for every config. Batch 1 and 16, smollm2's vocabulary (49152), a context of ``--history``
tokens (DRY and the penalty window look back over it). Anchors from the issue: DRY costs llama.cpp users
about 13% throughput; XTC about 1.2 ms/token in exllamav2.

    python benchmarks/sampler_cost.py                                   # the lead's run
    python benchmarks/sampler_cost.py --vocab 4096 --steps 3 --history 64 --batches 1   # smoke

Results go to ``benchmarks/results/sampler_cost.json`` (``--tag`` adds a suffix) and a markdown table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"

#: label -> config fields on top of strategy=sample (the baseline first).
CONFIGS: dict[str, dict] = {
    "top-p 0.95 (baseline)": {"top_p": 0.95},
    "DRY 0.8 + top-p": {"top_p": 0.95, "dry_multiplier": 0.8},
    "XTC 0.5/0.1 + top-p": {"top_p": 0.95, "xtc_probability": 0.5, "xtc_threshold": 0.1},
    "top-nσ 1.0": {"top_n_sigma": 1.0},
    "mirostat v1": {"mirostat": 1},
    "mirostat v2": {"mirostat": 2},
    "adaptive-p 0.3, min-p 0.05": {"adaptive_target": 0.3, "min_p": 0.05},
    "dynatemp 0.5 + top-p": {"top_p": 0.95, "dynatemp_range": 0.5},
    "penalties, window 64 + top-p": {"top_p": 0.95, "repetition_penalty": 1.1, "frequency_penalty": 0.2,
                                     "penalty_last_n": 64},
    "logit_bias (8 ids) + top-p": {"top_p": 0.95, "logit_bias": {i * 97: 1.5 for i in range(8)}},
    "bad_words (3) + top-p": {"top_p": 0.95, "bad_words": ["the end", "suddenly", "However"]},
}


def step_seconds(fields: dict, batch: int, vocab: int, history: int, steps: int, tokenizer, seed: int) -> float:
    """Median seconds of one step (processors + chain + draw + state update) over ``steps`` steps."""
    import torch

    from decodetune import DecodingConfig
    from decodetune.decoding.processors import RowParams, TokenState, apply_processors
    from decodetune.decoding.sampler import make_generator, sample_tokens

    gen = torch.Generator().manual_seed(seed)
    config = DecodingConfig(strategy="sample", max_new_tokens=steps + 2, **fields)
    rows = RowParams.from_configs([config] * batch, "cpu", tokenizer=tokenizer)
    prompts = torch.randint(0, min(vocab, len(tokenizer)), (batch, history), generator=gen).tolist()
    state = TokenState(prompts, steps + 2, vocab, rows, [], "cpu")
    gens = [make_generator(seed + i, torch.device("cpu")) for i in range(batch)]
    logits = torch.randn(batch, vocab, generator=gen) * 3
    times = []
    with torch.inference_mode():
        for _ in range(steps + 1):  # the first step warms caches (breaker masks, tensors) and is dropped
            t0 = time.perf_counter()
            tokens = sample_tokens(apply_processors(logits, state), rows, gens, state)
            state.append(tokens)
            times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, nargs="*", default=[1, 16])
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--history", type=int, default=512, help="context tokens before the measured steps")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = leave as is)")
    ap.add_argument("--tag", default="")
    args = ap.parse_args()

    import torch
    from transformers import AutoTokenizer

    from decodetune.models.builtin import ensure_builtin

    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(str(ensure_builtin("smollm2-135m")))
    rows = []
    for batch in args.batches:
        base = None
        for label, fields in CONFIGS.items():
            s = step_seconds(fields, batch, args.vocab, args.history, args.steps, tokenizer, seed=0)
            base = s if base is None else base
            rows.append({"batch": batch, "sampler": label, "ms_per_step": s * 1e3, "ratio_vs_top_p": s / base})
            print(f"batch {batch:2d}  {label:30s} {s * 1e3:8.3f} ms/step  x{s / base:.2f}", flush=True)
    out = {"vocab": args.vocab, "history": args.history, "steps": args.steps, "threads": torch.get_num_threads(),
           "rows": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"sampler_cost{'_' + args.tag if args.tag else ''}.json").write_text(json.dumps(out, indent=2) + "\n")
    print()
    print(markdown(out))


def markdown(out: dict) -> str:
    """One row per sampler: ms per step and the ratio to top-p, per batch size."""
    batches = sorted({r["batch"] for r in out["rows"]})
    head = "| sampler | " + " | ".join(f"batch {b}: ms/step | x top-p" for b in batches) + " |"
    lines = [head, "|---|" + "---|---|" * len(batches)]
    for label in CONFIGS:
        cells = []
        for b in batches:
            r = next(r for r in out["rows"] if r["batch"] == b and r["sampler"] == label)
            cells.append(f"{r['ms_per_step']:.3f} | {r['ratio_vs_top_p']:.2f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
