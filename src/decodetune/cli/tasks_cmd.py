"""`decodetune tasks`: list the builtin tasks, or show one (prompt format, metrics, example items)."""

from __future__ import annotations

import json
from typing import Optional

import typer

_ARROW = {"max": "↑", "min": "↓", "none": "·"}


def tasks_command(
    name: Optional[str] = typer.Argument(None, help="a builtin task or a .jsonl/.csv file to show"),  # noqa: UP045
    examples: int = typer.Option(3, "--examples", "--limit", "-n", help="show the first N items of NAME"),
    as_json: bool = typer.Option(False, "--json", help="print machine-readable JSON"),
) -> None:
    """List builtin tasks: kind, metrics (primary first, ↑ higher is better), splits, default config."""
    from rich.console import Console
    from rich.table import Table

    from decodetune.tasks import list_tasks, load_task

    tasks = [load_task(name)] if name else list_tasks()
    info = [t.describe() for t in tasks]
    if as_json:
        if name:
            info[0]["examples"] = [{"id": it.id, "prompt": it.prompt, "references": it.references}
                                   for it in tasks[0].items(tasks[0].split_names[0])[:examples]]
        print(json.dumps(info if not name else info[0], ensure_ascii=False, indent=2))
        return
    console = Console(width=160)
    table = Table(title="tasks" if not name else f"task {tasks[0].name}")
    for col in ("name", "kind", "metrics (primary first)", "extract", "splits", "defaults", "description"):
        table.add_column(col, overflow="fold")
    for d in info:
        table.add_row(d["name"], d["kind"],
                      ", ".join(f"{m['name']} {_ARROW.get(m['direction'], '')}" for m in d["metrics"]),
                      d["extract"], ", ".join(f"{k} {v}" for k, v in d["splits"].items()),
                      ", ".join(f"{k}={v}" for k, v in d["defaults"].items()), d["description"])
    console.print(table)
    if name:
        task = tasks[0]
        if task.prompt_format:
            console.print(f"[bold]prompt format[/bold]: {task.prompt_format!r}")
        for it in task.items(task.split_names[0])[:examples]:
            console.print(f"[bold]{it.id}[/bold]: {it.prompt!r}  ->  {it.references[:3]!r}")


def register(app: typer.Typer) -> None:
    """Add the command to the CLI."""
    app.command("tasks", help="List builtin tasks (or show one) with their metrics and splits.")(tasks_command)
