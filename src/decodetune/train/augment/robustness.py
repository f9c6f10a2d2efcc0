"""Prompt robustness: a task's metric on its original prompts against augmented versions of them.

:func:`augment_task` turns a task split into a task whose items are augmented prompts (ids suffixed,
references kept), and :func:`robustness` evaluates configs on both, item-paired: for each original item,
the mean metric over its variants minus its own metric. ``decodetune eval --augment`` and the
augmentation benchmark use these.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from decodetune.errors import UserError
from decodetune.train.augment.filters import Filters, compile_preserve
from decodetune.train.augment.pipeline import augment, parse_ops


def augment_task(task: Any, ops: str | Sequence[str], n: int = 1, seed: int = 0, *, split: str = "dev",
                 limit: int | None = None, keep_original: bool = False, filters: Filters | None = None,
                 **kwargs: Any) -> Any:
    """A copy of ``task`` with one split, ``all``, holding augmented items of ``split``.

    Items keep their references; ids become ``<id>~<op><k>``; ``item.data`` gains ``aug_op`` and
    ``aug_source`` (the original id). For closed tasks the default filter keeps the original's numbers,
    in order (``preserve="numbers"``), since the answer depends on them. ``backgen`` writes new
    prompts with unknown answers, so it is refused for tasks with references. ``kwargs`` go to
    :func:`~decodetune.train.augment.pipeline.augment`.
    """
    from decodetune.tasks import Task, TaskItem, load_task

    task = load_task(task)
    op_list = parse_ops(ops)
    items = task.items(split)[: limit if limit is not None else None]
    if "backgen" in op_list and any(it.references for it in items):
        raise UserError(f"--augment: backgen writes new prompts whose answers are unknown; task {task.name!r} "
                        "has references, so use swap, delete, insert, synonym or paraphrase")
    if filters is None:
        filters = Filters(preserve=compile_preserve("numbers")) if task.kind == "closed" else Filters()
    rows = [{"id": it.id, "prompt": it.prompt} for it in items]
    res = augment(rows, op_list, n, seed, field="prompt", filters=filters, keep_original=keep_original,
                  source=f"task {task.name}", **kwargs)
    new_items = []
    for row in res.rows:
        src = items[row["aug_source"]]
        data = {**src.data, "aug_op": row["aug_op"], "aug_source": src.id}
        new_items.append(TaskItem(id=str(row["id"]), prompt=row["prompt"], references=list(src.references),
                                  data=data, source=src.source))
    if not new_items:
        raise UserError(f"--augment: every augmented prompt of task {task.name!r} was filtered out")
    aug = Task(name=f"{task.name}+{'+'.join(op_list)}", kind=task.kind, metrics=list(task.metrics),
               splits={"all": new_items}, extract=task.extract, defaults=dict(task.defaults),
               description=f"{len(new_items)} augmented items from {task.name} [{split}]",
               prompt_format=task.prompt_format, source=task.source)
    aug.augment_counts = res.counts  # type: ignore[attr-defined]
    return aug


@dataclass
class Robustness:
    """One config's metric on original and augmented prompts.

    ``drop`` is the mean over original items (that kept at least one variant) of
    ``metric(original) - mean metric(variants)``; positive means the augmented prompts score worse.
    ``drop_ci`` is a 95% paired bootstrap interval of it.
    """

    config: dict[str, Any]
    metric: str
    original: float
    augmented: float
    drop: float
    drop_ci: tuple[float, float]
    items: int
    variants: int
    per_op: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able view."""
        return {"config": self.config, "metric": self.metric, "original": self.original,
                "augmented": self.augmented, "drop": self.drop, "drop_ci": list(self.drop_ci),
                "items": self.items, "variants": self.variants, "per_op": self.per_op}


def robustness(model: Any, task: Any, configs: Sequence[Any], ops: str | Sequence[str], n: int = 1, seed: int = 0,
               *, split: str = "dev", limit: int | None = None, metric: str | None = None,
               augment_kwargs: dict[str, Any] | None = None, bootstrap: int = 1000,
               **eval_kwargs: Any) -> list[Robustness]:
    """Evaluate each config on the original items and on their augmented versions (same ``seed``)."""
    from decodetune.eval import evaluate_many
    from decodetune.tasks import load_task

    base = load_task(task)
    aug = augment_task(base, ops, n, seed, split=split, limit=limit, **(augment_kwargs or {}))
    orig = evaluate_many(model, base, list(configs), split=split, limit=limit, seed=seed, bootstrap=0, **eval_kwargs)
    augr = evaluate_many(model, aug, list(configs), split="all", seed=seed, bootstrap=0, **eval_kwargs)
    return [paired_robustness(o, a, aug, metric=metric, bootstrap=bootstrap, seed=seed)
            for o, a in zip(orig, augr, strict=True)]


def paired_robustness(original: Any, augmented: Any, aug_task: Any, metric: str | None = None,
                      bootstrap: int = 1000, seed: int = 0) -> Robustness:
    """Pair an EvalResult on original items with one on ``aug_task`` (from :func:`augment_task`, split
    ``all``): per original item, its metric minus the mean over its variants."""
    name = metric or original.primary
    o_scores = dict(zip(original.item_ids, original.per_item(name), strict=True))
    items = {it.id: it for it in aug_task.items("all")}
    by_source: dict[str, list[float]] = {}
    by_op: dict[str, list[float]] = {}
    for item_id, score in zip(augmented.item_ids, augmented.per_item(name), strict=True):
        if math.isnan(score):
            continue
        data = items[item_id].data
        by_source.setdefault(data["aug_source"], []).append(score)
        by_op.setdefault(data["aug_op"], []).append(score)
    diffs = [o_scores[src] - sum(v) / len(v) for src, v in by_source.items()
             if src in o_scores and not math.isnan(o_scores[src])]
    return Robustness(
        config=original.config.to_dict(only_set=True), metric=name, original=original.metrics[name].value,
        augmented=augmented.metrics[name].value, drop=_mean(diffs), drop_ci=_bootstrap_ci(diffs, bootstrap, seed),
        items=len(diffs), variants=sum(len(v) for v in by_source.values()),
        per_op={op: _mean(v) for op, v in by_op.items()})


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _bootstrap_ci(values: list[float], resamples: int, seed: int) -> tuple[float, float]:
    """Percentile bootstrap 95% interval of the mean (NaN when there is nothing to resample)."""
    if not values or resamples < 1:
        return (float("nan"), float("nan"))
    rng = random.Random(seed)
    k = len(values)
    means = sorted(sum(values[rng.randrange(k)] for _ in range(k)) / k for _ in range(resamples))
    return (means[int(0.025 * (resamples - 1))], means[int(math.ceil(0.975 * (resamples - 1)))])
