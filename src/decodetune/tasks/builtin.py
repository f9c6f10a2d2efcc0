"""The builtin tasks: data shipped in ``tasks/data`` (see :mod:`decodetune.tasks.builtin_data`)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from decodetune.tasks.base import Task, TaskItem

DATA_DIR = Path(__file__).parent / "data"


def _loader(task: str, split: str) -> Callable[[], list[TaskItem]]:
    def load() -> list[TaskItem]:
        from decodetune.tasks.loader import load_task_file

        return load_task_file(DATA_DIR / f"{task}_{split}.jsonl").items("all")

    return load


def _splits(task: str) -> dict[str, list[TaskItem] | Callable[[], list[TaskItem]]]:
    return {split: _loader(task, split) for split in ("dev", "test")}


def _arith() -> Task:
    return Task(
        name="arith", kind="closed", metrics=["numeric_match", "length"], splits=_splits("arith"),
        extract="last_number", defaults={"max_new_tokens": 12},
        description="integer a + b and a - b with operands 0..20 (smollm2-135m greedy: 33% on 100 test items)",
        prompt_format="What is {a} {op} {b}? Answer with just the number.")


def _story() -> Task:
    return Task(
        name="story", kind="open",
        metrics=["diversity", "repetition", "self_bleu", "distinct-2", "rep-2", "zipf", "gen_ppl", "length"],
        splits=_splits("story"), extract="none", defaults={"max_new_tokens": 128},
        description="continue a templated story opening (open-ended: diversity and repetition)",
        prompt_format="Continue this story:\n\n{name} was {character} who lived {place}. One day, {name} {event}.")


def _describe() -> Task:
    return Task(
        name="describe", kind="reference", metrics=["chrf", "rougeL", "rouge1", "rouge2", "bleu", "length"],
        splits=_splits("describe"), extract="first_line", defaults={"max_new_tokens": 48},
        description="one sentence from restaurant fields (data-to-text, 3 references each)",
        prompt_format="Write one sentence describing this restaurant.\nName: ...\nFood: ...\nArea: ...\nPrice: ...")


BUILTIN_TASKS: dict[str, Callable[[], Task]] = {"arith": _arith, "story": _story, "describe": _describe}
