"""`decodetune verify`: re-score a config in the engine that will serve it, paired against the study's engine."""

from __future__ import annotations

import json
import sys
from typing import Any, Optional

import typer

from decodetune.cli.backend_options import backend_options, with_model_flags
from decodetune.errors import UserError


@backend_options
def verify_command(
    config: str = typer.Option(..., "--config", "-c", help="config file (e.g. OUT/best_config.json) or inline JSON"),
    task: str = typer.Option(..., "--task", "-t", help="builtin task name or a .jsonl/.csv file"),
    model: str = typer.Option("smollm2-135m", "--model", "-m", help="builtin name, HF folder, .gguf or hub id"),
    against: str = typer.Option("torch", "--against", help="the engine the config was tuned in: torch | llamacpp"),
    against_model: Optional[str] = typer.Option(  # noqa: UP045
        None, "--against-model", help="model for --against (default --model)"),
    split: str = typer.Option("test", "--split", help="dev | test"),
    repeats: int = typer.Option(1, "--repeats", "-r", help="samples per item for sampling configs"),
    limit: Optional[int] = typer.Option(None, "--limit", "-n", help="only the first N items"),  # noqa: UP045
    seed: int = typer.Option(0, "--seed", help="base of the row seeds (the same in both engines)"),
    raw: bool = typer.Option(False, "--raw", help="send prompts as-is, without the chat template"),
    as_json: bool = typer.Option(False, "--json", help="print machine-readable JSON"),
    *,
    backend: Any,
) -> None:
    """Is the tuned config as good in the serving engine? Same items and seeds, paired difference."""
    from decodetune.backends import BackendOptions, open_backend
    from decodetune.cli.compare_cmd import parse_config_arg
    from decodetune.evaluation.portability import verify

    if against not in ("torch", "llamacpp", "vllm"):
        raise UserError(f"--against: must be torch, llamacpp or vllm, got {against!r}")
    if repeats < 1:
        raise UserError(f"--repeats: must be >= 1, got {repeats}")
    _, cfg = parse_config_arg(config)
    target_opts = with_model_flags(backend, raw=raw)
    if target_opts.name == against and against_model is None:
        raise UserError(f"--backend: the config is verified in another engine than --against ({against})")
    reference = open_backend(against_model or model, BackendOptions(name=against, raw=raw))
    target = open_backend(model, target_opts)
    result = verify(cfg, task, reference, target, split=split, repeats=repeats, limit=limit, seed=seed,
                    progress=not as_json)
    if as_json:
        print(json.dumps(result.to_dict(), ensure_ascii=False))
        return
    print(result.sentence())
    for d in result.differences[1:]:
        print(f"  {d.metric}: {d.value_a:.4g} -> {d.value_b:.4g}, {d.diff:+.3f} [{d.ci_low:+.3f}, {d.ci_high:+.3f}], "
              f"p = {d.p_value:.2g}", file=sys.stdout)


def register(app: typer.Typer) -> None:
    """Add the command to the CLI."""
    app.command("verify", help="Re-score a config in another backend, paired against the one it was tuned in.")(
        verify_command)
