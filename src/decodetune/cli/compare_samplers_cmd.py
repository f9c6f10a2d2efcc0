"""`decodetune compare-samplers`: truncation families tuned with the same budget, winners compared on test."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Optional

import typer

from decodetune.cli.backend_options import backend_options, with_model_flags
from decodetune.errors import UserError


@backend_options
def compare_samplers_command(
    task: str = typer.Option(..., "--task", "-t", help="builtin task name or a .jsonl/.csv file"),
    families: str = typer.Option("top_p,min_p,top_k", "--families",
                                 help="comma-separated: top_p, min_p, top_k, typical_p, epsilon, eta"),
    budget: int = typer.Option(12, "--budget", help="trials per family (the same for every family)"),
    model: str = typer.Option("smollm2-135m", "--model", "-m", help="builtin name, HF folder, .gguf or hub id"),
    search: str = typer.Option("random", "--search", "-s", help="random | tpe | gp (grid ignores --budget)"),
    seed: int = typer.Option(0, "--seed", help="sampler seed and base of the row seeds (shared by all families)"),
    limit: Optional[int] = typer.Option(None, "--limit", "-n", help="items per split (dev and test)"),  # noqa: UP045
    repeats: int = typer.Option(1, "--repeats", "-r", help="seeds per item"),
    out: Path = typer.Option(Path("decodetune-samplers"), "--out", "--output", "-o", metavar="FOLDER",
                             help="folder for the studies, cache and compare_samplers.json"),
    as_json: bool = typer.Option(False, "--json", help="print machine-readable JSON"),
    *,
    backend: Any,
) -> None:
    """Tune each sampler family with the same trials over a space of the same size; compare the winners."""
    from decodetune.io import check_output_dir
    from decodetune.tuning.samplers import compare_samplers, parse_families

    names = parse_families(families)
    if budget < 1:
        raise UserError(f"--budget: must be >= 1, got {budget}")
    if search not in ("random", "tpe", "gp"):
        raise UserError(f"--search: {search!r} cannot give every family the same trials; use random, tpe or gp")
    if limit is not None and limit < 1:
        raise UserError(f"--limit: must be >= 1, got {limit}")
    if repeats < 1:
        raise UserError(f"--repeats: must be >= 1, got {repeats}")
    check_output_dir(out, "--out")
    from decodetune.tasks import load_task

    task_obj = load_task(task)  # before the model loads
    from decodetune.backends import open_backend

    engine = open_backend(model, with_model_flags(backend))
    summary = compare_samplers(engine, task_obj, names, budget, out_dir=out, search=search, seed=seed,
                               limit=limit, repeats=repeats)
    from decodetune.io import write_json

    write_json(Path(out) / "compare_samplers.json", summary)
    if as_json:
        print(json.dumps(summary, ensure_ascii=False))
        return
    print_table(summary)
    print(f"wrote {Path(out) / 'compare_samplers.json'}", file=sys.stderr)


def print_table(summary: dict[str, Any]) -> None:
    """The families' winners on the test split: vs greedy and vs the best family, Holm-corrected."""
    from rich.console import Console
    from rich.table import Table

    from decodetune.tuning.headline import short_config

    metric = summary.get("metric") or "score"
    table = Table(title=f"{summary['task']}: {summary['budget']} {summary['search']} trials per family over "
                        f"{summary['space_size']} points each; {summary['n_test_items']} test items")
    cols = ("family", f"dev {metric}", "winner", f"test {metric}", "Δ vs greedy [95% CI]", "p vs greedy (Holm)",
            f"Δ vs {summary.get('best_family', 'best')}", "p vs best (Holm)")
    for col in cols:
        table.add_column(col, overflow="fold")
    for fam in summary["families"]:
        table.add_row(fam["family"], _n(fam["dev_value"]), short_config(fam["best_config"]), _n(fam["test_value"]),
                      _d(fam["vs_greedy"]), _n(fam["vs_greedy"].get("p_holm")),
                      _d(fam["vs_best"]) if fam["vs_best"] else "(best)", _n(fam["vs_best"].get("p_holm")))
    console = Console(width=160)
    console.print(table)
    k = sum(1 for f in summary["families"] if f["vs_greedy"])
    console.print(f"greedy scores {_n(summary.get('greedy_test'))} on test. Holm-corrected over {k} comparisons "
                  f"vs greedy and {max(0, k - 1)} vs the best family.", highlight=False)


def _n(v: Any) -> str:
    return "–" if v is None else f"{v:.3g}"


def _d(p: dict[str, Any]) -> str:
    if not p or p.get("diff") is None:
        return "–"
    ci = f" [{p['ci_low']:+.3g}, {p['ci_high']:+.3g}]" if p.get("ci_low") is not None and \
        p.get("ci_high") is not None else ""
    return f"{p['diff']:+.3g}{ci}"


def register(app: typer.Typer) -> None:
    """Add the command to the CLI."""
    app.command("compare-samplers", help="Tune sampler families with equal budgets; compare winners on test.")(
        compare_samplers_command)
