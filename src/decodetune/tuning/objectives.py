"""Objectives: ``metric[:max|min]`` strings checked against what the task can compute, before any generation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from decodetune.errors import UserError

#: Names that mean "the task's primary metric" (the issue's examples say ``accuracy``).
PRIMARY_ALIASES = ("accuracy", "primary", "score")


@dataclass(frozen=True)
class Objective:
    """One optimisation target: a metric name and a direction (``max`` or ``min``)."""

    metric: str
    direction: str  # "max" | "min"
    corpus: bool = False  # corpus-level metrics have no per-item scores to prune on

    @property
    def optuna_direction(self) -> str:
        """``maximize`` or ``minimize``."""
        return "maximize" if self.direction == "max" else "minimize"

    def __str__(self) -> str:
        return f"{self.metric}:{self.direction}"


def parse_objectives(specs: list[str] | None, task: Any) -> list[Objective]:
    """Parse ``--objective`` values; the default is the task's primary metric.

    A metric the task can't compute (unknown name, or it needs references the task lacks) is a UserError.
    """
    from decodetune.metrics import get_metric

    specs = list(specs or [])
    if not specs:
        specs = [task.metrics[0]]
    out: list[Objective] = []
    for spec in specs:
        # split at the LAST colon, so a user metric `pkg.module:function:max` keeps its own colon
        head, sep, tail = str(spec).rpartition(":")
        if sep and (tail.strip().lower() in ("max", "min", "maximize", "minimize") or ":" not in head
                    and not _unknown(head.strip())):
            name, direction = head.strip(), tail.strip().lower()  # metric:direction (maybe a bad one)
        else:
            name, direction = str(spec).strip(), ""
        if direction and direction not in ("max", "min", "maximize", "minimize"):
            raise UserError(f"--objective {spec}: direction must be max or min, got {direction!r}")
        if name.lower() in PRIMARY_ALIASES and _unknown(name):
            name = task.metrics[0]
        try:
            metric = get_metric(name)
        except UserError as e:
            raise UserError(f"--objective {spec}: {e}") from None
        if getattr(metric, "needs_references", False) and not _has_references(task):
            raise UserError(f"--objective {spec}: metric {metric.name} needs references, but task "
                            f"{task.name} ({task.kind}) has none; use one of {', '.join(task.metrics)}")
        d = direction[:3] if direction else getattr(metric, "direction", "none")
        if d not in ("max", "min"):
            raise UserError(f"--objective {spec}: {metric.name} has no natural direction; write "
                            f"{metric.name}:max or {metric.name}:min")
        obj = Objective(metric.name, d, bool(getattr(metric, "corpus", False)))
        if any(o.metric == obj.metric for o in out):
            raise UserError(f"--objective {spec}: {obj.metric} is given twice")
        out.append(obj)
    return out


def _unknown(name: str) -> bool:
    from decodetune.metrics import get_metric

    try:
        get_metric(name)
    except UserError:
        return True
    return False


def _has_references(task: Any) -> bool:
    try:
        items = task.items("dev")
    except Exception:  # a file task has one split
        items = task.items("all")
    return any(getattr(it, "references", None) for it in items[:20])
