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
from typing import Any

import typer

from decodetune.errors import UserError

try:  # typer >= 0.2x vendors click; older typer raises click's own exceptions
    from typer._click import exceptions as click_errors
except ImportError:  # pragma: no cover - depends on the installed typer
    from click import exceptions as click_errors

#: Command modules, in the order ``--help`` lists them. Missing ones are skipped.
COMMAND_MODULES = ["generate", "models", "tasks", "eval", "compare", "compare_samplers", "tune", "report", "demo",
                   "status", "worker", "verify", "distill", "augment"]

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


def _no_type_for_switches() -> None:
    """Help shows ``<bool>`` next to plain switches (``--json``), as if they took a value; drop it."""
    option = getattr(typer.core, "TyperOption", None)
    original = getattr(option, "display_type_rich", None)
    if original is None or getattr(original, "_decodetune", False):
        return

    def display_type_rich(self: Any, ctx: Any) -> str | None:
        return None if getattr(self, "is_flag", False) else original(self, ctx)

    display_type_rich._decodetune = True  # type: ignore[attr-defined]
    option.display_type_rich = display_type_rich


_register_all()
_no_type_for_switches()

#: pydantic error types (typer's value coercion) -> what the value should have been
_EXPECTED = {"float_parsing": "a number", "float_type": "a number", "int_parsing": "an integer",
             "int_from_float": "an integer", "int_type": "an integer", "bool_parsing": "true or false"}


def _param_name(e: Any) -> str:
    """The flag as the user types it: the first ``--long`` spelling, else any."""
    param = getattr(e, "param", None)
    opts = list(getattr(param, "opts", None) or [])
    longs = [o for o in opts if o.startswith("--")]
    if longs or opts:
        return (longs or opts)[0]
    return (getattr(e, "param_hint", None) or getattr(param, "name", None) or "value").strip("'\"")


def _bad_value(e: Any) -> str:
    """'abc' is not a number: from the coercion error behind typer's BadParameter, or click's text."""
    errors = getattr(e.__cause__, "errors", None)
    if callable(errors):
        try:
            first = errors()[0]
        except Exception:  # noqa: BLE001 - any odd validation error falls back to the plain message
            first = None
        if first and first.get("type") in _EXPECTED:
            return f"{first.get('input')!r} is not {_EXPECTED[first['type']]}"
    msg = e.message.rstrip(".")
    for word, what in (("float", "a number"), ("integer", "an integer")):
        msg = msg.replace(f"is not a valid {word}", f"is not {what}")
    return msg


#: short flags a command used to give another meaning: ``-n`` was --trials and ``-o`` --objective in these.
#: Refused with the spelling to use rather than reused at once, so that ``tune -n 20`` (20 trials) does not
#: quietly become 20 items. Everywhere else ``-n`` is ``--limit`` and ``-o`` is ``--output`` / ``--out``.
RETIRED_SHORT = {("tune", "-n"): "--trials", ("worker", "-n"): "--trials", ("demo", "-n"): "--trials",
                 ("tune", "-o"): "--objective", ("worker", "-o"): "--objective"}


def usage_error_line(e: Any) -> str:
    """One line for a click/typer usage error (bad value, unknown or missing option, extra argument)."""
    command = getattr(getattr(e, "ctx", None), "info_name", None)
    if isinstance(e, click_errors.NoSuchOption) and (command, e.option_name) in RETIRED_SHORT:
        return (f"{e.option_name}: no such option in {command}; use {RETIRED_SHORT[command, e.option_name]} "
                "(elsewhere -n means --limit and -o --output)")
    if isinstance(e, click_errors.NoSuchOption):
        close = ", ".join(getattr(e, "possibilities", None) or [])
        return f"{e.option_name}: no such option" + (f" (did you mean {close}?)" if close else "")
    if isinstance(e, click_errors.MissingParameter):
        return f"{_param_name(e)}: missing; this option is required"
    if isinstance(e, click_errors.BadParameter):
        return f"{_param_name(e)}: {_bad_value(e)}"
    if isinstance(e, click_errors.BadOptionUsage) and "requires an argument" in e.message:
        return f"{e.option_name}: needs a value"
    msg = " ".join(e.format_message().split()).rstrip(".")
    if msg.startswith("No such command"):
        msg += f" (commands: {', '.join(c.name for c in app.registered_commands if c.name)})"
    prefix = f"{command}: " if command and command != "decodetune" and not msg.startswith("No such command") else ""
    return prefix + msg[:1].lower() + msg[1:]


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; bad input exits 2 with one line, never a traceback. ``--help`` is typer's own."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        # standalone_mode=False: usage errors come back as exceptions instead of typer's usage box
        rv = app(args=argv, standalone_mode=False, prog_name="decodetune")
    except SystemExit as e:
        return int(e.code or 0) if not isinstance(e.code, str) else 1
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except click_errors.NoArgsIsHelpError as e:  # the help is the answer (typer's rich help prints itself)
        if e.format_message().strip():
            print(e.format_message(), file=sys.stderr)
        return 2
    except click_errors.UsageError as e:
        print(f"error: {usage_error_line(e)}", file=sys.stderr)
        return 2
    except click_errors.ClickException as e:
        print(f"error: {' '.join(e.format_message().split())}", file=sys.stderr)
        return e.exit_code
    except typer.Abort:
        print("aborted", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return rv if isinstance(rv, int) and not isinstance(rv, bool) else 0  # typer.Exit(n) comes back as n


def entry() -> None:  # pragma: no cover - console script wrapper
    sys.exit(main())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
