"""`decodetune tune`: search decoding hyperparameters with Optuna, resumable, with a held-out check."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any, Optional

import typer

from decodetune.cli.backend_options import backend_options, with_model_flags
from decodetune.errors import UserError

SEARCH_HELP = "grid | random | tpe | gp | cmaes | nsga2"


@backend_options
def tune_command(
    task: str = typer.Option(..., "--task", "-t", help="builtin task name or a .jsonl/.csv file"),
    model: str = typer.Option("smollm2-135m", "--model", "-m", help="builtin name, HF folder, .gguf or hub id"),
    search: str = typer.Option("tpe", "--search", "-s", help=SEARCH_HELP),
    trials: int = typer.Option(20, "--trials", "--n-trials",
                               help="completed trials wanted in the study (earlier runs count)"),
    space: Optional[Path] = typer.Option(None, "--space", help="search space YAML (default: built-in)"),  # noqa: UP045
    objective: Optional[list[str]] = typer.Option(  # noqa: UP045
        None, "--objective", help="metric[:max|min], repeatable (several = Pareto front); "
        "default: the task's primary metric"),
    storage: Optional[str] = typer.Option(  # noqa: UP045
        None, "--storage", help="Optuna storage URL or *.journal file (default: OUT/study.db)"),
    study_name: Optional[str] = typer.Option(None, "--study-name", help="default: TASK-MODEL-SEARCH"),  # noqa: UP045
    timeout: Optional[float] = typer.Option(None, "--timeout", help="stop starting trials after S seconds"),  # noqa: UP045
    budget_tokens: Optional[int] = typer.Option(  # noqa: UP045
        None, "--budget-tokens", help="stop once the study has generated N tokens"),
    repeats: int = typer.Option(1, "--repeats", "-r", help="seeds per item for sampling configs"),
    seed: int = typer.Option(0, "--seed", help="sampler seed and base of the row seeds"),
    limit: Optional[int] = typer.Option(None, "--limit", help="items per split (dev and test)"),  # noqa: UP045
    out: Path = typer.Option(Path("decodetune-out"), "--out", "--output", metavar="FOLDER",
                             help="folder for study, cache and outputs"),
    batch_trials: Optional[int] = typer.Option(  # noqa: UP045
        None, "--batch-trials", help="trials evaluated together in one generate batch"),
    prune: bool = typer.Option(True, "--prune/--no-prune", help="WilcoxonPruner on per-item scores"),
    test: bool = typer.Option(True, "--test/--no-test", help="re-check the winner on the test split"),
    report: bool = typer.Option(True, "--report/--no-report", help="write OUT/report.html"),
    raw: bool = typer.Option(False, "--raw", help="send prompts as-is, without the chat template"),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="allow model code from the hub"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar or tables"),
    fresh: bool = typer.Option(False, "--fresh", help="delete the stored study of that name first and start over"),
    threads: Optional[int] = typer.Option(  # noqa: UP045
        None, "--threads", help="torch CPU threads (0: the idle cores; default: torch's)"),
    *,
    backend: Any,
) -> None:
    """Tune decoding hyperparameters; re-running the same command continues the study."""
    if threads is not None:
        from decodetune.cli.demo_cmd import set_threads

        set_threads(threads)
    run_tune(task=task, model=model, search=search, trials=trials, space=space, objective=objective,
             storage=storage, study_name=study_name, timeout=timeout, budget_tokens=budget_tokens,
             repeats=repeats, seed=seed, limit=limit, out=out, batch_trials=batch_trials, prune=prune,
             test=test, report=report, raw=raw, trust_remote_code=trust_remote_code, quiet=quiet, fresh=fresh,
             backend=with_model_flags(backend, raw=raw, trust_remote_code=trust_remote_code, threads=threads))


def run_tune(*, task: str, model: str, search: str, trials: int, space: Path | None, objective: list[str] | None,
             storage: str | None, study_name: str | None, timeout: float | None, budget_tokens: int | None,
             repeats: int, seed: int, limit: int | None, out: Path, batch_trials: int | None, prune: bool,
             test: bool, report: bool, raw: bool = False, trust_remote_code: bool = False,
             quiet: bool = False, per_worker: bool = False, backend: Any = None, fresh: bool | None = False,
             resume_said: bool = False) -> object:
    """Shared by ``tune``, ``demo`` and ``worker``: run, print the summary, write the report.

    A resumed study is said on stderr before any trial runs ("resuming study S: 12 trials already done; add
    --fresh to start over", the hint left out where ``fresh`` is None: a command without the flag), unless
    ``resume_said`` (the demo said it before its banner). Progress: a bar on a terminal, else a line per trial.
    """
    from rich.console import Console

    from decodetune.io import check_output_dir
    from decodetune.tuning.study import SEARCHES

    check_output_dir(out, "--out")  # a regular file there would fail only after the model loaded
    search = search.lower()
    if search not in SEARCHES:
        raise UserError(f"--search: unknown search {search!r}; choose one of {', '.join(SEARCHES)}")
    if batch_trials is not None and batch_trials < 1:
        raise UserError(f"--batch-trials: must be >= 1, got {batch_trials}")
    if timeout is not None and timeout <= 0:
        raise UserError(f"--timeout: must be > 0, got {timeout}")
    if budget_tokens is not None and budget_tokens < 1:
        raise UserError(f"--budget-tokens: must be >= 1, got {budget_tokens}")
    _log_warnings()
    console = Console(stderr=True)
    from decodetune.tuning import tune
    from decodetune.tuning.space import load_space

    space_obj = load_space(str(space)) if space is not None else None  # errors before the model loads
    try:
        result = tune(model, task, search=search,
                      n_trials=trials, space=space_obj, objectives=objective, storage=storage,
                      study_name=study_name, timeout=timeout, budget_tokens=budget_tokens, repeats=repeats,
                      seed=seed, limit=limit, out_dir=out, batch_trials=batch_trials, prune=prune,
                      final_test=test, progress=not quiet, console=console,
                      model_options={"raw": raw, "trust_remote_code": trust_remote_code},
                      per_worker=per_worker, backend=backend, fresh=bool(fresh),
                      announce=lambda line: _announce(line, fresh, resume_said))
    except KeyboardInterrupt:
        print("interrupted: in-flight trials were marked failed; re-run the same command to continue",
              file=sys.stderr)
        raise typer.Exit(130) from None
    except Exception as e:
        from decodetune.tuning.distributed import storage_failure

        failure = storage_failure(e, storage)
        if failure is None:
            raise
        raise UserError(failure) from None
    if not quiet:
        from decodetune.tuning.report import print_summary

        print_summary(result.study, console=Console())
    if report:
        from decodetune.tuning.report import write_report

        path = write_report(result.study, Path(out) / "report.html")
        result.files["report"] = str(path)
    stats = result.stats
    print(f"study {result.study_name}: {stats.trials_told} trials this run ({stats.trials_pruned} pruned, "
          f"{stats.trials_failed} failed), stop: {stats.stop_reason}; storage {result.storage_url}",
          file=sys.stderr)
    for kind, path in result.files.items():
        print(f"  {kind}: {path}", file=sys.stderr)
    if quiet:  # the summary table says it otherwise
        from decodetune.tuning.report import export_lines

        for line in export_lines(result.study.user_attrs):
            print(f"warning: {line}", file=sys.stderr)
    if result.best_config is None:
        print("no trial completed; nothing to export", file=sys.stderr)
    print(f"open it in optuna-dashboard: optuna-dashboard {result.storage_url}", file=sys.stderr)
    return result


def _announce(line: str, fresh: bool | None, resume_said: bool) -> None:
    if line.startswith("resuming"):
        if resume_said:
            return
        if fresh is not None:
            line += "; add --fresh to start over"
    print(line, file=sys.stderr, flush=True)


def resume_line(out: Path, study_name: str) -> str | None:
    """'resuming study S: N trials already done; add --fresh to start over' for the default storage
    OUT/study.db, read without creating anything; None when there is no such study."""
    from decodetune.tuning.study import resolve_storage

    if not (Path(out) / "study.db").is_file():
        return None
    import optuna

    from decodetune.tuning.core import resume_text

    info = resolve_storage(None, Path(out))
    if study_name not in {s.study_name for s in optuna.get_all_study_summaries(info.storage,
                                                                                include_best_trial=False)}:
        return None
    study = optuna.load_study(study_name=study_name, storage=info.storage)
    return resume_text(study) + "; add --fresh to start over" if study.trials else None


def _log_warnings() -> None:
    log = logging.getLogger("decodetune.tuning")
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("warning: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.WARNING)
        log.propagate = False


def register(app: typer.Typer) -> None:
    """Add the command to the CLI."""
    app.command("tune", help="Tune decoding hyperparameters with Optuna (resumable).")(tune_command)
