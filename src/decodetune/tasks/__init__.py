"""Tasks: builtin ones (``arith``, ``story``, ``describe``) and JSONL/CSV files.

``load_task(spec)`` takes a builtin name, a ``.jsonl``/``.csv`` path or a :class:`Task`.
"""

from __future__ import annotations

from pathlib import Path

from decodetune.errors import UserError
from decodetune.tasks.base import EXTRACTORS, KINDS, Task, TaskItem
from decodetune.tasks.builtin import BUILTIN_TASKS
from decodetune.tasks.loader import load_task_file

__all__ = ["EXTRACTORS", "KINDS", "Task", "TaskItem", "list_tasks", "load_task", "load_task_file"]


def list_tasks() -> list[Task]:
    """The builtin tasks, in registry order."""
    return [make() for make in BUILTIN_TASKS.values()]


def load_task(spec: str | Path | Task) -> Task:
    """A builtin task by name, a task file, or a :class:`Task` passed through."""
    if isinstance(spec, Task):
        return spec
    text = str(spec)
    if text in BUILTIN_TASKS:
        return BUILTIN_TASKS[text]()
    path = Path(text)
    if path.suffix.lower() in (".jsonl", ".json", ".csv", ".tsv") or path.exists():
        return load_task_file(path)
    raise UserError(f"unknown task {text!r}; builtin tasks: {', '.join(BUILTIN_TASKS)}, or a .jsonl/.csv file")
