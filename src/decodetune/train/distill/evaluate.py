"""Compare a student with its teacher on held-out text: perplexity, top-1 agreement, KL, speed.

All measures are per completion token (the same positions the student was trained on):

* ``perplexity`` = exp(mean next-token cross-entropy) of each model on the held-out completions;
* ``top1_agreement`` = fraction of positions where the student's argmax equals the teacher's;
* ``kl_teacher_student`` = mean KL(T || S) at temperature 1 (nats per token);
* ``forward_tokens_per_s`` = tokens (prompt + completion) scored per second by a full forward pass;
* ``generate_tokens_per_s`` (:func:`generation_speed`) = new tokens per second of greedy decoding.

:func:`causal_leak` measures the BatchNorm problem directly: how much a change to the *last* token of
one sequence moves the logits at earlier positions and in other sequences (0 for a causal model).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from decodetune.config import DecodingConfig
from decodetune.models.norms import MaskedBatchNorm
from decodetune.train.distill.data import (
    Example,
    TeacherLogitCache,
    collate,
    completion_logits,
    sample_completions,
)
from decodetune.train.distill.losses import forward_kl


class _BatchStatsMode:
    """Context: BatchNorm layers use batch statistics (train mode) without touching running stats."""

    def __init__(self, model: nn.Module, enabled: bool):
        self.model, self.enabled = model, enabled
        self.saved: list[tuple[MaskedBatchNorm, dict[str, torch.Tensor]]] = []

    def __enter__(self) -> None:
        if not self.enabled:
            return
        for m in self.model.modules():
            if isinstance(m, MaskedBatchNorm):
                self.saved.append((m, {k: v.clone() for k, v in m.named_buffers()}))
                m.train()

    def __exit__(self, *exc: Any) -> None:
        for m, buffers in self.saved:
            for k, v in buffers.items():
                getattr(m, k).copy_(v)
            m.eval()


@torch.no_grad()
def compare_to_teacher(student: Any, teacher: Any, examples: Sequence[Example], batch_size: int = 8,
                       batch_statistics: bool = False, progress: bool = False,
                       teacher_cache: TeacherLogitCache | None = None) -> dict[str, Any]:
    """Held-out metrics of ``student`` vs ``teacher`` (LoadedModels) on tokenised ``examples``.

    ``batch_statistics=True`` evaluates BatchNorm students with the statistics of each eval batch (as in
    training) instead of their running statistics, to measure the train/eval gap. With a
    ``teacher_cache`` the teacher's logits are reused (its forward speed is then not measured: None).
    """
    from tqdm.auto import tqdm

    student.model.eval()
    teacher.model.eval()
    pad = teacher.tokenizer.pad_token_id if teacher.tokenizer.pad_token_id is not None else 0
    device_s, device_t = student.device, teacher.device
    totals = {"tokens": 0, "scored": 0, "s_nll": 0.0, "t_nll": 0.0, "agree": 0, "kl": 0.0, "s_time": 0.0,
              "t_time": 0.0}
    starts = range(0, len(examples), batch_size)
    for start in tqdm(starts, desc="distill-eval", disable=not progress, leave=False):
        chunk = list(examples[start:start + batch_size])
        batch = collate(chunk, pad, device_s)
        t0 = time.perf_counter()
        with _BatchStatsMode(student.model, batch_statistics):
            s = completion_logits(student.model, batch).float()
        t1 = time.perf_counter()
        t_batch = batch if device_t == device_s else collate(chunk, pad, device_t)
        if teacher_cache is not None:
            t = teacher_cache.logits(teacher.model, t_batch, chunk).float().to(s.device)
        else:
            t = completion_logits(teacher.model, t_batch).float().to(s.device)
        t2 = time.perf_counter()
        labels = batch["labels"]
        totals["s_nll"] += float(torch.nn.functional.cross_entropy(s, labels, reduction="sum"))
        totals["t_nll"] += float(torch.nn.functional.cross_entropy(t, labels, reduction="sum"))
        totals["agree"] += int((s.argmax(-1) == t.argmax(-1)).sum())
        totals["kl"] += float(forward_kl(s, t).sum())
        totals["tokens"] += int(labels.numel())
        totals["scored"] += int(batch["attention_mask"].sum())
        totals["s_time"] += t1 - t0
        totals["t_time"] += t2 - t1
    n = max(1, totals["tokens"])
    return {
        "completion_tokens": totals["tokens"],
        "top1_agreement": totals["agree"] / n,
        "kl_teacher_student": totals["kl"] / n,
        "student": {"perplexity": math.exp(totals["s_nll"] / n),
                    "forward_tokens_per_s": totals["scored"] / max(totals["s_time"], 1e-9)},
        "teacher": {"perplexity": math.exp(totals["t_nll"] / n),
                    "forward_tokens_per_s": None if teacher_cache is not None
                    else totals["scored"] / max(totals["t_time"], 1e-9)},
    }


def generation_speed(loaded: Any, prompts: Sequence[Any], max_new_tokens: int = 32, batch_size: int = 8,
                     engine: str = "auto") -> dict[str, float]:
    """Greedy decoding speed: generated tokens per second over ``prompts`` (after one warm-up prompt)."""
    config = DecodingConfig(strategy="greedy", max_new_tokens=max_new_tokens)
    sample_completions(loaded, list(prompts[:1]), config.replace(max_new_tokens=2), [0], engine=engine)
    t0 = time.perf_counter()
    out = sample_completions(loaded, list(prompts), config, list(range(len(prompts))), engine=engine,
                             batch_size=batch_size)
    elapsed = time.perf_counter() - t0
    tokens = sum(len(o) for o in out)
    return {"generated_tokens": tokens, "seconds": elapsed, "generate_tokens_per_s": tokens / max(elapsed, 1e-9)}


@torch.no_grad()
def causal_leak(model: nn.Module, examples: Sequence[Example], pad_id: int, batch_statistics: bool = True,
                replacement_token: int | None = None) -> dict[str, float]:
    """Change the last token of the first sequence and measure how much logits move elsewhere.

    Returns the max absolute logit change at the *earlier* positions of that sequence (``past``, a
    causal model gives 0) and anywhere in the *other* sequences (``other_sequences``, an independent-
    sequence model gives 0). Measured with batch statistics (training behaviour) by default.
    """
    batch = collate(list(examples), pad_id, next(model.parameters()).device)
    ids = batch["input_ids"]
    last = int(batch["attention_mask"][0].sum()) - 1
    changed = ids.clone()
    vocab = model.get_input_embeddings().weight.shape[0]
    changed[0, last] = replacement_token if replacement_token is not None else (int(ids[0, last]) + 1) % vocab
    model.eval()
    with _BatchStatsMode(model, batch_statistics):
        a = model(input_ids=ids, attention_mask=batch["attention_mask"]).logits
    with _BatchStatsMode(model, batch_statistics):
        b = model(input_ids=changed, attention_mask=batch["attention_mask"]).logits
    diff = (a - b).abs()
    real = batch["attention_mask"].bool()
    past = float(diff[0, :last].max()) if last > 0 else 0.0
    others = float(diff[1:][real[1:]].max()) if len(examples) > 1 else 0.0
    return {"past": past, "other_sequences": others, "scale": float(a[real].abs().mean())}


def task_scores(models: dict[str, Any], task: str, config: DecodingConfig | None, limit: int | None,
                split: str = "test", seed: int = 0) -> dict[str, Any]:
    """The task's primary metric for each model through ``decodetune.eval.evaluate``."""
    from decodetune.eval import evaluate

    out: dict[str, Any] = {}
    for name, model in models.items():
        res = evaluate(model, task, config, split=split, limit=limit, seed=seed)
        out[name] = {"metric": res.primary, "score": res.score, "tokens": res.num_tokens, "wall_s": res.wall_s,
                     "metrics": {k: v.value for k, v in res.metrics.items()}}
    return out
