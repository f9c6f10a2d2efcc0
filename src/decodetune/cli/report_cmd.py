"""`decodetune report`: one self-contained HTML page for a stored study (plots, test-split table, examples)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer


def report_command(
    storage: str = typer.Option(..., "--storage", help="Optuna storage URL or *.journal file of the study"),
    study_name: Optional[str] = typer.Option(  # noqa: UP045
        None, "--study-name", help="study to report (default: the storage's only study)"),
    out: Path = typer.Option(Path("report.html"), "--output", "--out", "-o", metavar="FILE", help="HTML file to write"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="don't print the summary tables"),
) -> None:
    """Write an HTML report of a study from its storage alone."""
    from decodetune.io import check_output_path
    from decodetune.tuning.report import load_study, print_summary, write_report
    from decodetune.tuning.study import check_storage_exists

    check_output_path(out, "--output")
    check_storage_exists(storage)  # opening a missing sqlite:/// file would create an empty database

    study = load_study(storage, study_name)
    if not quiet:
        from rich.console import Console

        print_summary(study, console=Console())
    path = write_report(study, out)
    print(f"wrote {path}", file=sys.stderr)


def register(app: typer.Typer) -> None:
    """Add the command to the CLI."""
    app.command("report", help="HTML report of a tuning study (from its storage alone).")(report_command)
