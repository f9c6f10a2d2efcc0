"""`decodetune worker`: one of many processes cooperating on a shared study (PostgreSQL or journal file)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from decodetune.cli.backend_options import backend_options, with_model_flags
from decodetune.cli.tune_cmd import SEARCH_HELP, run_tune
from decodetune.errors import UserError


@backend_options
def worker_command(
    storage: str = typer.Option(..., "--storage", help="shared storage: postgresql://... or a *.journal file"),
    study_name: str = typer.Option(..., "--study-name", help="the study all workers share"),
    task: str = typer.Option(..., "--task", "-t", help="builtin task name or a .jsonl/.csv file"),
    model: str = typer.Option("smollm2-135m", "--model", "-m", help="builtin name, HF folder, .gguf or hub id"),
    search: str = typer.Option("tpe", "--search", "-s", help=SEARCH_HELP),
    n_trials: Optional[int] = typer.Option(  # noqa: UP045
        None, "--n-trials", "--trials", help="trials THIS worker runs (default 10; grid: until done)"),
    space: Optional[Path] = typer.Option(None, "--space", help="search space YAML (default: built-in)"),  # noqa: UP045
    objective: Optional[list[str]] = typer.Option(None, "--objective", help="metric[:max|min]"),  # noqa: UP045
    repeats: int = typer.Option(1, "--repeats", "-r", help="seeds per item for sampling configs"),
    seed: int = typer.Option(0, "--seed", help="base of the row seeds (the same for every worker)"),
    limit: Optional[int] = typer.Option(None, "--limit", help="items per split"),  # noqa: UP045
    out: Path = typer.Option(Path("decodetune-out"), "--out", "--output", metavar="FOLDER",
                             help="folder for this machine's generation cache"),
    batch_trials: Optional[int] = typer.Option(None, "--batch-trials", help="trials per generate batch"),  # noqa: UP045
    prune: bool = typer.Option(True, "--prune/--no-prune", help="WilcoxonPruner on per-item scores"),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch CPU threads for this worker"),  # noqa: UP045
    quiet: bool = typer.Option(True, "--quiet/--verbose", help="no per-worker summary table"),
    *,
    backend: Any,
) -> None:
    """Run trials of a shared study. Start any number of these, on any machines, with the same arguments."""
    if storage.startswith("sqlite"):
        raise UserError("--storage: SQLite is not safe for parallel workers ('database is locked'); use "
                        "postgresql://... across machines or a *.journal file on one machine")
    if n_trials is not None and n_trials < 1:
        raise UserError(f"--n-trials: must be >= 1, got {n_trials}")
    if threads is not None:
        if threads < 1:
            raise UserError(f"--threads: must be >= 1, got {threads}")
        import torch

        torch.set_num_threads(threads)
    trials = n_trials if n_trials is not None else (10**9 if search == "grid" else 10)
    # every worker derives the same sampler seed: distinct ones would only matter for RandomSampler, and
    # Optuna's samplers already see the other workers' trials through the storage
    run_tune(task=task, model=model, search=search, trials=trials, space=space, objective=objective,
             storage=storage, study_name=study_name, timeout=None, budget_tokens=None, repeats=repeats,
             seed=seed, limit=limit, out=out, batch_trials=batch_trials, prune=prune, test=False,
             report=False, quiet=quiet, per_worker=True, fresh=None, backend=with_model_flags(backend, threads=threads))


def register(app: typer.Typer) -> None:
    """Add the command to the CLI."""
    app.command("worker", help="Run trials of a shared study (many processes / machines).")(worker_command)
