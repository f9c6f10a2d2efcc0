"""`decodetune compare`: configs on the same items and seeds; paired tests vs the first, Holm-corrected over several."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any, Optional

import typer

from decodetune.cli.backend_options import backend_options, engine_for
from decodetune.cli.eval_cmd import ARROW, check_common, check_outputs, fmt
from decodetune.cli.options import config_options, flag_fields
from decodetune.errors import UserError


def parse_config_arg(value: str, overrides: dict[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
    """``--config`` value: a JSON/YAML file, or inline JSON such as ``'{"strategy": "sample"}'``.

    Returns (label, fields as given, with ``overrides`` - the decoding flags - on top) so task defaults fill
    only what neither sets. The config is validated with the overrides: ``{"strategy": "beam"}`` plus
    ``--num-beams 4`` is fine.
    """
    from decodetune.config import DecodingConfig

    overrides = dict(overrides or {})
    text = value.strip()
    if text.startswith("{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"--config {value!r}: malformed inline JSON ({e.msg})") from None
        data = _with_overrides(data, overrides)
        DecodingConfig.from_dict(data, source=f"--config {value}" + (" with the flags" if overrides else ""))
        return text, data
    import yaml

    from decodetune.io import read_text

    raw = read_text(value)
    try:
        data = yaml.safe_load(raw) or {}
    except yaml.YAMLError:
        DecodingConfig.load(value)  # raises the one-line error naming file and line
        raise
    if not isinstance(data, dict):
        raise UserError(f"{value}: expected a mapping of config fields")
    if overrides:
        data = _with_overrides(data, overrides)
        DecodingConfig.from_dict(data, source=f"{value} with the flags")
    else:
        DecodingConfig.load(value)  # full validation with file-aware messages
    return Path(value).stem, data


def _with_overrides(data: Any, overrides: dict[str, Any]) -> Any:
    """The config's fields (aliases as their field names) with the flags' fields on top."""
    if not overrides or not isinstance(data, dict):
        return data
    from decodetune.config import ALIASES

    return {**{ALIASES.get(k, k): v for k, v in data.items()}, **overrides}


def _warn_ignored(labels: list[str], configs: list[dict[str, Any]], overrides: dict[str, Any]) -> None:
    """``warning: greedy: temperature is ignored by strategy greedy`` for a flag a config never reads."""
    from decodetune.config import DecodingConfig

    for label, data in zip(labels, configs, strict=True):
        cfg = DecodingConfig.from_dict(data)
        for name, line in zip(cfg.ignored_fields(), cfg.ignored_field_warnings(), strict=True):
            if name in overrides:
                print(f"warning: {label}: {line}", file=sys.stderr)


#: the decoding flags, on top of every --config; compare's own --seed is the base of the row seeds
OVERRIDES_PANEL = "Decoding config (overrides every --config)"


@config_options(file_option=False, skip=("seed",), panel=OVERRIDES_PANEL)
@backend_options
def compare_command(
    task: str = typer.Option(..., "--task", "-t", help="builtin task name or a .jsonl/.csv file"),
    config: list[str] = typer.Option(..., "--config", "-c", help="config file or inline JSON (repeat; the first is the baseline)"),  # noqa: E501
    model: str = typer.Option("smollm2-135m", "--model", "-m", help="builtin name, HF folder, .gguf or hub id"),
    split: str = typer.Option("dev", "--split", help="dev | test"),
    repeats: int = typer.Option(1, "--repeats", "-r", help="samples per item for sampling configs"),
    limit: Optional[int] = typer.Option(None, "--limit", "-n", help="only the first N items"),  # noqa: UP045
    metric: Optional[list[str]] = typer.Option(None, "--metric", help="metric name or pkg.module:function (repeatable)"),  # noqa: E501,UP045
    seed: int = typer.Option(0, "--seed", help="base seed: row seeds come from (seed, item, repeat)"),
    output: Optional[Path] = typer.Option(  # noqa: UP045
        None, "--output", "--out", "-o", metavar="FILE", help="write every config's rows as JSONL"),
    cache: Optional[Path] = typer.Option(None, "--cache", help="SQLite generation cache"),  # noqa: UP045
    scorer: Optional[str] = typer.Option(None, "--scorer", help="model scoring gen_ppl (default: --model)"),  # noqa: UP045
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="rows per forward batch"),  # noqa: UP045
    bootstrap: int = typer.Option(1000, "--bootstrap", help="bootstrap resamples (0 = no CIs)"),
    alpha: float = typer.Option(0.05, "--alpha", help="significance level for the verdict column"),
    as_json: bool = typer.Option(False, "--json", help="print machine-readable JSON"),
    *,
    config_flags: dict[str, Any],
    backend: Any,
) -> None:
    """Is B really better than A? Same items, same seeds, paired differences with a paired test."""
    check_common(repeats, limit, batch_size, bootstrap)
    check_outputs(output, cache)
    if len(config) < 2:
        raise UserError("--config: give at least two configs (the first is the baseline)")
    if not 0 < alpha < 1:
        raise UserError(f"--alpha: must be in (0, 1), got {alpha}")
    overrides = flag_fields(config_flags)
    parsed = [parse_config_arg(c, overrides) for c in config]
    labels = [lab for lab, _ in parsed]
    _warn_ignored(labels, [d for _, d in parsed], overrides)
    from decodetune.eval import compare

    cmp = compare(engine_for(model, backend), task, [d for _, d in parsed], split=split, repeats=repeats, limit=limit,
                  metrics=metric or None, seed=seed, batch_size=batch_size, cache=cache, scorer=scorer,
                  bootstrap=bootstrap, output=output, progress=not as_json)
    if output is not None:
        print(f"wrote {sum(len(r.rows) for r in cmp.results)} rows to {output}", file=sys.stderr)
    if as_json:
        d = cmp.to_dict()
        d["labels"] = labels
        print(json.dumps(d, ensure_ascii=False))
        return
    from rich.console import Console
    from rich.table import Table

    console = Console(width=140)
    first = cmp.results[0]
    names = list(first.metrics)
    table = Table(title=f"{first.task} \\[{first.split}] · {first.model} · {len(first.item_ids)} items · seed {seed}")
    table.add_column("config")
    for n in names:
        table.add_column(f"{n} {ARROW.get(first.metrics[n].direction, '')}", justify="right")
    for label, res in zip(labels, cmp.results, strict=True):
        table.add_row(label, *[f"{fmt(res.metrics[n].value)} [{fmt(res.metrics[n].ci_low)}, "
                               f"{fmt(res.metrics[n].ci_high)}]" for n in names])
    console.print(table)
    diff_table = Table(title=f"paired differences vs {labels[0]} (B - A)")
    corrected = cmp.n_comparisons > 1
    cols = ("config", "metric", "diff", "95% CI", "p", *(("p (Holm)",) if corrected else ()), "test", "verdict")
    for col in cols:
        diff_table.add_column(col, justify="right" if col in ("diff", "95% CI", "p", "p (Holm)") else "left")
    for d in cmp.differences:
        direction = first.metrics[d.metric].direction
        p = d.p_holm if corrected else d.p_value  # the verdict of k comparisons uses the corrected p
        diff_table.add_row(labels[d.config_index], d.metric, fmt(d.diff), f"[{fmt(d.ci_low)}, {fmt(d.ci_high)}]",
                           fmt(d.p_value, 3), *((fmt(d.p_holm, 3),) if corrected else ()), d.test,
                           verdict(d.diff, p, direction, alpha))
    console.print(diff_table)
    if corrected:
        console.print(f"{cmp.correction_note}; the verdict uses the Holm p at alpha {alpha}", highlight=False)


def verdict(diff: float, p: float, direction: str, alpha: float) -> str:
    """'better' / 'worse' (significant at alpha, in the metric's direction), 'higher'/'lower' for
    metrics without a direction, else 'no significant difference'."""
    if p is None or math.isnan(p) or p >= alpha or diff == 0:
        return "no significant difference"
    if direction == "none":
        return "higher" if diff > 0 else "lower"
    return "better" if (diff > 0) == (direction == "max") else "worse"


def register(app: typer.Typer) -> None:
    """Add the command to the CLI."""
    app.command("compare", help="Compare configs on the same items and seeds with paired tests. The decoding "
                "flags (--max-new-tokens 32, ...) apply on top of every --config.")(compare_command)
