"""`decodetune eval`: generate a task's answers with one config, score them, print mean and 95% CI."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any, Optional

import typer

from decodetune.cli.backend_options import backend_options, engine_for
from decodetune.cli.options import build_config, config_options
from decodetune.errors import UserError

ARROW = {"max": "↑", "min": "↓", "none": "·"}


def explicit_config(config_flags: dict[str, Any]) -> dict[str, Any]:
    """The config fields the user set (in ``--config`` or as flags), validated, so task defaults fill
    only the others (``--max-new-tokens 64`` must win over a task default even though 64 is the class
    default)."""
    config_flags = inline_config(config_flags)
    cfg = build_config(config_flags)
    explicit = {k for k in config_flags if k != "__file__"}
    path = config_flags.get("__file__")
    if path:
        import yaml

        from decodetune.config import ALIASES
        from decodetune.io import read_text

        try:
            raw = yaml.safe_load(read_text(path)) or {}
        except yaml.YAMLError:
            raw = {}
        if isinstance(raw, dict):
            explicit |= {ALIASES.get(k, k) for k in raw}
    full = cfg.to_dict()
    return {**cfg.to_dict(only_set=True), **{k: full[k] for k in explicit if k in full}}


def inline_config(config_flags: dict[str, Any]) -> dict[str, Any]:
    """``--config '{"strategy": "sample"}'``: inline JSON as ``compare --config`` takes it, as flags.

    The JSON's fields go under the explicit flags (which still win), so every command reads ``--config``
    the same way: a JSON/YAML file, or inline JSON.
    """
    path = config_flags.get("__file__")
    if path is None or not str(path).lstrip().startswith(("{", "[")):
        return config_flags
    import dataclasses

    from decodetune.config import ALIASES, DecodingConfig

    try:
        data = json.loads(str(path))
    except json.JSONDecodeError as e:
        raise UserError(f"--config {str(path)!r}: malformed inline JSON ({e.msg})") from None
    if not isinstance(data, dict):
        raise UserError(f"--config {str(path)!r}: inline JSON must be an object of config fields")
    known = {f.name for f in dataclasses.fields(DecodingConfig)}
    for key in data:
        if ALIASES.get(key, key) not in known:
            raise UserError(f"{key}: unknown config key in --config (inline JSON); known keys: "
                            f"{', '.join(sorted(known))}")
    # validated once merged with the flags (build_config): `{"strategy": "beam"}` plus --num-beams 4 is fine
    flags = {k: v for k, v in config_flags.items() if k != "__file__"}
    return {"__file__": None, **{ALIASES.get(k, k): v for k, v in data.items()}, **flags}


def check_outputs(output: Path | None, cache: Path | None) -> None:
    """``--output`` and ``--cache`` must be writable file paths: refused before any generation."""
    from decodetune.io import check_output_path

    check_output_path(output, "--output")
    check_output_path(cache, "--cache")


def fmt(v: float | None, digits: int = 4) -> str:
    """A number for a table: NaN/None as '-', else up to ``digits`` significant decimals."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if abs(v) >= 1e4 or (v != 0 and abs(v) < 1e-3):
        return f"{v:.{digits}g}"
    return f"{v:.{digits}f}".rstrip("0").rstrip(".")


def check_common(repeats: int, limit: int | None, batch_size: int | None, bootstrap: int) -> None:
    """One-line errors for bad numeric options."""
    if repeats < 1:
        raise UserError(f"--repeats: must be >= 1, got {repeats}")
    if limit is not None and limit < 1:
        raise UserError(f"--limit: must be >= 1, got {limit}")
    if batch_size is not None and batch_size < 1:
        raise UserError(f"--batch-size: must be >= 1, got {batch_size}")
    if bootstrap < 0:
        raise UserError(f"--bootstrap: must be >= 0, got {bootstrap}")


def result_table(result: Any, title: str) -> Any:
    """A rich table of one EvalResult's metrics."""
    from rich.table import Table

    table = Table(title=title)
    for col in ("metric", "", "value", "95% CI", "items"):
        table.add_column(col, justify="right" if col in ("value", "95% CI", "items") else "left")
    for name, m in result.metrics.items():
        n = sum(1 for v in m.per_item if not math.isnan(v)) if not m.corpus else len(m.per_item)
        table.add_row(name + (" (corpus)" if m.corpus else ""), ARROW.get(m.direction, ""), fmt(m.value),
                      f"[{fmt(m.ci_low)}, {fmt(m.ci_high)}]", str(n))
    return table


@config_options
@backend_options
def eval_command(
    task: str = typer.Option(..., "--task", "-t", help="builtin task name or a .jsonl/.csv file"),
    model: str = typer.Option("smollm2-135m", "--model", "-m", help="builtin name, HF folder, .gguf or hub id"),
    split: str = typer.Option("dev", "--split", help="dev | test (a file task has one split)"),
    repeats: int = typer.Option(1, "--repeats", "-r", help="samples per item for sampling configs"),
    limit: Optional[int] = typer.Option(None, "--limit", "-n", help="only the first N items"),  # noqa: UP045
    metric: Optional[list[str]] = typer.Option(None, "--metric", help="metric name or pkg.module:function (repeatable; default: the task's)"),  # noqa: E501,UP045
    output: Optional[Path] = typer.Option(  # noqa: UP045
        None, "--output", "--out", "-o", metavar="FILE", help="write generations and scores as JSONL"),
    cache: Optional[Path] = typer.Option(None, "--cache", help="SQLite generation cache to read and fill"),  # noqa: UP045
    scorer: Optional[str] = typer.Option(None, "--scorer", help="model scoring gen_ppl (default: --model)"),  # noqa: UP045
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="rows per forward batch"),  # noqa: UP045
    bootstrap: int = typer.Option(1000, "--bootstrap", help="bootstrap resamples for the CIs (0 = none)"),
    as_json: bool = typer.Option(False, "--json", help="print machine-readable JSON"),
    augment: Optional[str] = typer.Option(  # noqa: UP045
        None, "--augment", help="also score augmented prompts (ops of `decodetune augment`) and report the drop"),
    augment_n: int = typer.Option(1, "--augment-n", help="variants per item and op (with --augment)"),
    *,
    config_flags: dict[str, Any],
    backend: Any,
) -> None:
    """Evaluate one decoding config on a task: each metric's mean and 95% bootstrap CI."""
    check_common(repeats, limit, batch_size, bootstrap)
    check_outputs(output, cache)
    config = explicit_config(config_flags)
    if augment:
        from decodetune.train.augment import parse_ops

        parse_ops(augment)
    from decodetune.eval import evaluate

    engine = engine_for(model, backend)
    result = evaluate(engine, task, config, split=split, repeats=repeats, limit=limit, metrics=metric or None,
                      batch_size=batch_size, cache=cache, scorer=scorer, bootstrap=bootstrap,
                      output=output, progress=not as_json)
    if output is not None:
        print(f"wrote {len(result.rows)} rows to {output}", file=sys.stderr)
    robust = None
    if augment:  # the same config on augmented prompts, paired with the originals (decodetune.train.augment)
        from decodetune.train.augment import augment_task, paired_robustness

        aug_task = augment_task(task, augment, n=augment_n, split=split, limit=limit, model=model)
        aug_result = evaluate(engine, aug_task, config, split="all", repeats=repeats, metrics=metric or None,
                              batch_size=batch_size, cache=cache, scorer=scorer, bootstrap=0, progress=not as_json)
        robust = paired_robustness(result, aug_result, aug_task, bootstrap=bootstrap).to_dict()
    if as_json:
        print(json.dumps({**result.to_dict(), **({"robustness": robust} if robust else {})}, ensure_ascii=False))
        return
    from rich.console import Console

    console = Console(width=120)
    title = (f"{result.task} \\[{result.split}] · {result.model} · {len(result.item_ids)} items"
             + (f" x {result.repeats} repeats" if result.repeats > 1 else ""))
    console.print(result_table(result, title))
    console.print(f"backend: {result.backend}; config: {json.dumps(result.config.to_dict(only_set=True))}")
    console.print(f"{result.num_tokens} tokens ({result.num_tokens_generated} generated, "
                  f"{fmt(result.tokens_per_s, 3)} tok/s), cache hits {result.cache_hits}/{len(result.rows)}, "
                  f"{result.wall_s:.1f} s")
    if robust:
        lo, hi = robust["drop_ci"]
        console.print(f"augmented ({augment}): {robust['metric']} {fmt(robust['original'])} on the originals, "
                      f"{fmt(robust['augmented'])} on {robust['variants']} variants; paired drop {fmt(robust['drop'])} "
                      f"[{fmt(lo)}, {fmt(hi)}] over {robust['items']} items; per op: "
                      + ", ".join(f"{k} {fmt(v)}" for k, v in robust["per_op"].items()))


def register(app: typer.Typer) -> None:
    """Add the command to the CLI."""
    app.command("eval", help="Evaluate a decoding config on a task (mean and 95% CI per metric).")(eval_command)
