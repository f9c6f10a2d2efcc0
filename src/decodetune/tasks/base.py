"""`Task` and `TaskItem`: what to prompt, how to read the answer, how to score it."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from decodetune.errors import UserError

KINDS = ("closed", "open", "reference")


@dataclass
class TaskItem:
    """One prompt with its references. ``data`` keeps the source row; ``source`` is ``file:line``."""

    id: str
    prompt: str | list[dict[str, str]]
    references: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)
    source: str = ""


def _extract_none(text: str) -> str:
    return text


def _extract_strip(text: str) -> str:
    return text.strip()


def _extract_first_line(text: str) -> str:
    for line in text.strip().splitlines():
        if line.strip():
            return line.strip()
    return ""


def _extract_first_number(text: str) -> str:
    from decodetune.metrics.answer import find_number

    return find_number(text) or ""


def _extract_last_number(text: str) -> str:
    from decodetune.metrics.answer import find_numbers

    numbers = find_numbers(text)
    return numbers[-1] if numbers else ""


def _extract_first_word(text: str) -> str:
    m = re.search(r"[^\W_]+(?:['\-][^\W_]+)*", text)
    return m.group(0) if m else ""


#: Answer extraction: how a generation becomes the prediction that answer/reference metrics score.
EXTRACTORS: dict[str, Callable[[str], str]] = {
    "none": _extract_none,
    "strip": _extract_strip,
    "first_line": _extract_first_line,
    "first_number": _extract_first_number,
    "last_number": _extract_last_number,
    "first_word": _extract_first_word,
}


@dataclass
class Task:
    """A set of prompts with their scoring recipe.

    ``kind``: closed (checkable answer), open (no reference; diversity metrics) or reference (overlap
    metrics). ``metrics`` lists metric names, the primary (the one a tuner optimises by default) first;
    each metric's direction comes from the metric itself. ``extract`` names the answer extraction
    (see :data:`EXTRACTORS`). ``defaults`` are DecodingConfig fields the task suggests (e.g. a small
    ``max_new_tokens`` for short answers). ``splits`` maps split names to items, or to a zero-argument
    loader so builtin data is read only when used.
    """

    name: str
    kind: str
    metrics: list[str]
    splits: dict[str, list[TaskItem] | Callable[[], list[TaskItem]]]
    extract: str = "none"
    defaults: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    prompt_format: str = ""
    source: str = "builtin"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"task {self.name!r}: kind must be one of {KINDS}")
        if self.extract not in EXTRACTORS:
            raise UserError(f"task {self.name!r}: unknown extraction {self.extract!r}; "
                            f"known: {', '.join(EXTRACTORS)}")
        if not self.metrics:
            raise ValueError(f"task {self.name!r} has no metric")

    @property
    def primary(self) -> str:
        """The metric a tuner optimises unless told otherwise."""
        return self.metrics[0]

    @property
    def split_names(self) -> list[str]:
        """Names of the splits, in definition order."""
        return list(self.splits)

    def items(self, split: str = "dev") -> list[TaskItem]:
        """Items of a split. A file task has one split, ``all``, which every split name selects."""
        if split not in self.splits:
            if list(self.splits) == ["all"]:
                split = "all"
            else:
                raise UserError(f"task {self.name!r} has no split {split!r}; splits: {', '.join(self.splits)}")
        value = self.splits[split]
        if callable(value):
            value = value()
            self.splits[split] = value
        if not value:
            raise UserError(f"task {self.name!r}: split {split!r} is empty")
        return value

    def extract_answer(self, text: str) -> str:
        """The prediction scored by answer and reference metrics."""
        return EXTRACTORS[self.extract](text)

    def describe(self) -> dict[str, Any]:
        """A JSON-able summary (what ``decodetune tasks`` prints)."""
        from decodetune.metrics import get_metric

        sizes = {}
        for s in self.splits:
            try:
                sizes[s] = len(self.items(s))
            except UserError:
                sizes[s] = 0
        return {
            "name": self.name,
            "kind": self.kind,
            "description": self.description,
            "prompt_format": self.prompt_format,
            "extract": self.extract,
            "metrics": [{"name": m, "direction": get_metric(m).direction} for m in self.metrics],
            "defaults": dict(self.defaults),
            "splits": sizes,
            "source": self.source,
        }
