"""`decodetune status`: trial counts by state, the best so far, and throughput of a (shared) study."""

from __future__ import annotations

import json
from typing import Any, Optional

import typer


def status_command(
    storage: str = typer.Option(..., "--storage", help="Optuna storage URL or *.journal file"),
    study_name: Optional[str] = typer.Option(None, "--study-name", help="default: the storage's only study"),  # noqa: UP045
    as_json: bool = typer.Option(False, "--json", help="print machine-readable JSON"),
) -> None:
    """Show completed, running, failed and pruned trials, the best so far and throughput."""
    from decodetune.tuning.report import load_study
    from decodetune.tuning.study import check_storage_exists

    check_storage_exists(storage)  # opening a missing sqlite:/// file would create an empty database
    study = load_study(storage, study_name)
    info = study_status(study)
    if as_json:
        print(json.dumps(info, default=str))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"study {info['study']}")
    table.add_column("what")
    table.add_column("value", overflow="fold")
    for key in ("complete", "pruned", "running", "waiting", "failed", "best_value", "best_trial",
                "best_params", "trials_per_min", "tokens_generated", "tokens_per_s", "elapsed_s"):
        table.add_row(key, str(info.get(key, "")))
    Console(width=140).print(table)


def study_status(study: Any) -> dict[str, Any]:
    """Counts by state, best so far and throughput.

    Pruned trials are PRUNED; studies written before that stored them COMPLETE with ``pruned`` set, and
    count as pruned too.
    """
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    by = {s: [t for t in trials if t.state == s] for s in TrialState}
    complete = [t for t in by[TrialState.COMPLETE] if not t.user_attrs.get("pruned")]
    info: dict[str, Any] = {
        "study": study.study_name, "complete": len(complete),
        "pruned": len(by[TrialState.COMPLETE]) - len(complete) + len(by[TrialState.PRUNED]),
        "running": len(by[TrialState.RUNNING]), "waiting": len(by[TrialState.WAITING]),
        "failed": len(by[TrialState.FAIL]),
    }
    if complete and len(study.directions) == 1:
        sign = 1 if study.direction.name == "MAXIMIZE" else -1
        best = max(complete, key=lambda t: sign * t.values[0])
        info.update(best_value=best.values[0], best_trial=best.number,
                    best_params=best.user_attrs.get("config") or best.params)
    elif complete:
        info["best_trial"] = f"{len(study.best_trials)} Pareto-optimal trials"
    finished = [t for t in by[TrialState.COMPLETE] + by[TrialState.PRUNED] if t.datetime_start and t.datetime_complete]
    if finished:
        start = min(t.datetime_start for t in finished)
        end = max(t.datetime_complete for t in finished)
        elapsed = max(1e-9, (end - start).total_seconds())
        tokens = sum(int(t.user_attrs.get("tokens_generated", 0) or 0) for t in finished)
        info.update(elapsed_s=round(elapsed, 1), trials_per_min=round(len(finished) * 60 / elapsed, 2),
                    tokens_generated=tokens, tokens_per_s=round(tokens / elapsed, 1))
    return info


def register(app: typer.Typer) -> None:
    """Add the command to the CLI."""
    app.command("status", help="Trial counts, best so far and throughput of a study.")(status_command)
