"""Entry point of the `decodetune` CLI.

Each command lives in its own module ``decodetune.cli.<name>`` exposing ``register(app)``. Modules import
heavy dependencies (torch, transformers, optuna) inside their command functions, so ``--help`` stays fast.
A :class:`~decodetune.errors.UserError` anywhere becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys

import typer

from decodetune.errors import UserError

#: Command modules, in the order ``--help`` lists them. Missing ones are skipped.
COMMAND_MODULES = ["generate", "models", "tasks", "eval", "compare", "tune", "report", "demo", "status",
                   "worker", "distill", "augment"]

app = typer.Typer(
    name="decodetune",
    help="Choose how a language model decodes: generate, evaluate and tune decoding hyperparameters.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _register_all() -> None:
    for name in COMMAND_MODULES:
        modname = f"decodetune.cli.{name}_cmd"
        if importlib.util.find_spec(modname) is None:
            continue
        importlib.import_module(modname).register(app)


_register_all()


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; bad input exits 2 with one line, never a traceback."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        app(args=argv, standalone_mode=True)
    except SystemExit as e:
        return int(e.code or 0) if not isinstance(e.code, str) else 1
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


def entry() -> None:  # pragma: no cover - console script wrapper
    sys.exit(main())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
