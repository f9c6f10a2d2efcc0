"""docs/cli.md is the CLI reference generated from the typer app; it must be current (issue 15)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import typer.main

from decodetune.cli.docs import render
from decodetune.cli.main import app

DOC = Path(__file__).parents[1] / "docs" / "cli.md"


def test_cli_reference_is_current():
    assert DOC.read_text(encoding="utf-8") == render(), (
        "docs/cli.md is out of date with the CLI: run `python -m decodetune.cli.docs > docs/cli.md`")


def test_reference_has_every_command_option_default_and_help():
    text = render()
    group = typer.main.get_command(app)
    assert len(group.commands) >= 15
    for name, command in group.commands.items():
        section = text.split(f"\n## {name}\n", 1)[1].split("\n## ", 1)[0]
        assert command.help.split(".")[0] in section, name
        assert f"decodetune {name} [OPTIONS]" in section
        for param in command.params:
            if param.param_type_name == "argument":
                assert f"`{param.name.upper()}`" in section, (name, param.name)
                continue
            row = next((ln for ln in section.splitlines() if ln.startswith(f"| `{param.opts[0]}`")), None)
            assert row is not None, (name, param.opts)
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", row)[1:-1]]
            assert all(f"`{o}`" in cells[0] for o in (*param.opts, *param.secondary_opts)), (name, row)
            if param.help:
                assert cells[3] == " ".join(param.help.split()).replace("|", "\\|").replace("*", "\\*").replace(
                    "<", "\\<").replace(">", "\\>"), (name, row)
            if param.required:
                assert cells[2] == "required", (name, row)
            elif isinstance(param.default, int | float | str) and not isinstance(param.default, bool) \
                    and not param.name.startswith("cfg_"):
                assert cells[2] == f"`{param.default}`", (name, row)
    tune = text.split("\n## tune\n", 1)[1].split("\n## ", 1)[0]
    assert "| `--trials`, `--n-trials` | `<int>` | `20` |" in tune
    assert "| `--prune`, `--no-prune` |  | `--prune` |" in tune
    assert "| `--max-new-tokens` | `<int>` | `64` |" in text  # a decoding flag shows DecodingConfig's default
    assert "**Decoding config (overrides every --config)**" in text.split("\n## compare\n", 1)[1]


def test_the_module_prints_the_reference():
    out = subprocess.run([sys.executable, "-m", "decodetune.cli.docs"], capture_output=True, text=True,
                         check=True).stdout
    assert out == render()
