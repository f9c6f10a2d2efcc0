"""`decodetune models`: list builtin models and what is cached; `--download` prepares one."""

from __future__ import annotations

from typing import Optional

import typer

from decodetune.errors import UserError


def models_command(
    download: Optional[str] = typer.Option(None, "--download", help="fetch and convert this builtin now"),  # noqa: UP045
) -> None:
    """List builtin models, whether each is cached, and where."""
    from rich.console import Console
    from rich.table import Table

    from decodetune.models.builtin import BUILTIN_MODELS, cache_root, ensure_builtin, is_cached, model_dir

    if download is not None:
        if download not in BUILTIN_MODELS:
            raise UserError(f"--download: unknown builtin model {download!r}; known: {', '.join(BUILTIN_MODELS)}")
        ensure_builtin(download)
    table = Table(title=f"builtin models (cache: {cache_root()})")
    for col in ("name", "description", "source", "license", "cached", "size"):
        table.add_column(col, overflow="fold")
    for name, spec in BUILTIN_MODELS.items():
        cached = is_cached(name)
        size = ""
        if cached:
            size = f"{sum(p.stat().st_size for p in model_dir(name).iterdir()) / 1e6:.0f} MB"
        table.add_row(name, spec.description, f"PyPI {spec.package}=={spec.version}", spec.license,
                      str(model_dir(name)) if cached else "no (fetched on first use, ~30 s)", size)
    Console(width=160).print(table)


def register(app: typer.Typer) -> None:
    """Add the command to the CLI."""
    app.command("models", help="List builtin models and what is cached.")(models_command)
