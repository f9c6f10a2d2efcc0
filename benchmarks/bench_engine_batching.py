"""Batching speed (issue 13): config-batched trials and continuous batching, against transformers, one run.

1. A config-batched trial: 8 configs x 40 items of the builtin ``arith`` task (dev split) in one
   ``evaluate_many`` call (each prompt prefilled once for its 8 configs) vs the same configs one
   ``evaluate`` call at a time; both must give the same predictions. transformers' ``generate()`` on the
   same rendered prompts, one config at a time (40 prompts batched), is the anchor.
2. Continuous batching: 16 prompts x 4 samples (T 0.8, top-p 0.95, natural lengths, so rows end at
   different steps) with ``batch_size=16``, continuous vs static (each chunk of 16 runs to its longest row),
   and transformers on the same chunks of 4 prompts x 4 samples.

Every figure is tokens/s with its ratio to transformers measured in the same run; each case is timed
``--repeats`` times, engines alternating, best time kept.

    python benchmarks/bench_engine_batching.py [--repeats 3] [--threads N] [--items 40] [--new-tokens 32]

``bench_generate.py`` runs this too (``--skip-batching`` leaves it out).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from decodetune import DecodingConfig

#: 8 configs of the kind a tuner's trial batches together: greedy, and samplers around the usual defaults
TRIAL_CONFIGS = [
    DecodingConfig(),
    DecodingConfig(strategy="sample", temperature=0.7, top_p=0.95),
    DecodingConfig(strategy="sample", temperature=1.0, top_p=0.9),
    DecodingConfig(strategy="sample", temperature=0.5, top_k=40),
    DecodingConfig(strategy="sample", temperature=0.8, min_p=0.05),
    DecodingConfig(strategy="sample", temperature=0.9, top_k=50, top_p=0.95),
    DecodingConfig(strategy="sample", temperature=1.2, min_p=0.1),
    DecodingConfig(strategy="sample", temperature=0.6, top_p=0.8, repetition_penalty=1.1),
]


def _time(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def hf_generate_ids(model: Any, prompts: Sequence[Sequence[int]], cfg: DecodingConfig, pad: int,
                    eos: Sequence[int]) -> int:
    """transformers' generate on left-padded token ids; returns the tokens it generated (through each EOS)."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(list(p))
        mask[i, width - len(p):] = 1
    kwargs = cfg.to_hf()
    kwargs.pop("seed", None)
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, pad_token_id=pad, eos_token_id=list(eos), **kwargs)
    return sum(_until_eos(row, eos) for row in out[:, width:].tolist())


def _until_eos(row: list[int], eos: Sequence[int]) -> int:
    return next((i + 1 for i, t in enumerate(row) if t in eos), len(row))


def config_batched_trial(lm: Any, repeats: int, n_items: int) -> None:
    """8 configs x ``n_items`` arith items: one evaluate_many call vs one evaluate per config vs transformers."""
    from decodetune.eval import evaluate, evaluate_many
    from decodetune.evaluation.runner import resolve_config, resolve_items
    from decodetune.tasks import load_task

    task = load_task("arith")
    items = resolve_items(task, "dev", n_items, None)
    prompts = [lm.encode(it.prompt) for it in items]
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else lm.eos_token_ids[0]
    kw = dict(limit=n_items, metrics=["numeric_match"], bootstrap=0)
    best = {"batched": float("inf"), "one_by_one": float("inf"), "transformers": float("inf")}
    tokens = {}
    for _ in range(repeats):
        s, together = _time(lambda: evaluate_many(lm, task, TRIAL_CONFIGS, **kw))
        best["batched"] = min(best["batched"], s)
        s, alone = _time(lambda: [evaluate(lm, task, c, **kw) for c in TRIAL_CONFIGS])
        best["one_by_one"] = min(best["one_by_one"], s)
        assert [r["prediction"] for res in together for r in res.rows] == \
            [r["prediction"] for res in alone for r in res.rows], "config batching changed a row"
        tokens["batched"] = tokens["one_by_one"] = sum(res.num_tokens_generated for res in together)
        s, n_hf = _time(lambda: sum(hf_generate_ids(lm.model, prompts, resolve_config(c, task), pad,
                                                    lm.eos_token_ids) for c in TRIAL_CONFIGS))
        best["transformers"], tokens["transformers"] = min(best["transformers"], s), n_hf
    rate = {k: tokens[k] / best[k] for k in best}
    print(f"\n# config-batched trial: {len(TRIAL_CONFIGS)} configs x {n_items} arith dev items "
          f"({tokens['batched']} tokens), best of {repeats}")
    print(f"{'':34s} {'seconds':>8s} {'tok/s':>8s} {'vs transformers':>16s}")
    for k, label in (("batched", "decodetune, one evaluate_many"), ("one_by_one", "decodetune, one config at a time"),
                     ("transformers", "transformers generate, per config")):
        print(f"{label:34s} {best[k]:8.2f} {rate[k]:8.1f} {rate[k] / rate['transformers']:16.2f}")
    print(f"# batched / one by one = {best['one_by_one'] / best['batched']:.2f} (target >= 1.5; was 0.72)")


def continuous_sampling(lm: Any, repeats: int, new_tokens: int) -> None:
    """16 prompts x 4 samples at natural lengths, batch_size 16: continuous vs static vs transformers."""
    from bench_generate import PROMPTS
    from decodetune.decoding import engine, generate

    cfg = DecodingConfig(strategy="sample", temperature=0.8, top_p=0.95, seed=0, max_new_tokens=new_tokens,
                         num_return_sequences=4)
    pad = lm.tokenizer.pad_token_id
    ids = [lm.encode(p) for p in PROMPTS]
    best = {"continuous": float("inf"), "static": float("inf"), "transformers": float("inf")}
    tokens = {}
    for _ in range(repeats):
        for mode in ("continuous", "static"):
            engine.CONTINUOUS_BATCHING = mode == "continuous"
            try:
                s, gens = _time(lambda: generate(lm, PROMPTS, cfg, batch_size=16))
            finally:
                engine.CONTINUOUS_BATCHING = True
            best[mode], tokens[mode] = min(best[mode], s), sum(len(g.token_ids) for g in gens)
        s, n_hf = _time(lambda: sum(hf_generate_ids(lm.model, ids[i:i + 4], cfg, pad, lm.eos_token_ids)
                                    for i in range(0, len(ids), 4)))
        best["transformers"], tokens["transformers"] = min(best["transformers"], s), n_hf
    rate = {k: tokens[k] / best[k] for k in best}
    print(f"\n# sampling, 16 prompts x 4 samples, batch_size 16, up to {new_tokens} tokens, best of {repeats}")
    print(f"{'':34s} {'tokens':>8s} {'tok/s':>8s} {'vs transformers':>16s}")
    for k in best:
        print(f"{k:34s} {tokens[k]:8d} {rate[k]:8.1f} {rate[k] / rate['transformers']:16.2f}")


def report(lm: Any, repeats: int, n_items: int = 40, new_tokens: int = 32) -> None:
    """Both measurements (what bench_generate.py calls)."""
    config_batched_trial(lm, repeats, n_items)
    continuous_sampling(lm, repeats, new_tokens)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    ap.add_argument("--items", type=int, default=40, help="arith items per config in the trial")
    ap.add_argument("--new-tokens", type=int, default=32, help="max_new_tokens of the sampling case")
    ap.add_argument("--model", default="smollm2-135m")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from decodetune.models import load_model

    lm = load_model(args.model)
    print(f"# {args.model}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"# load: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")
    report(lm, args.repeats, args.items, args.new_tokens)
    print(f"# load: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
