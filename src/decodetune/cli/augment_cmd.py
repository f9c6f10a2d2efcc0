"""`decodetune augment`: expand a JSONL data set with token-level (EDA) and LM-based variants.

Originals are kept in the output by default (``--no-keep-original`` drops them); every row says which op
made it (``aug_op``: ``original`` or the op) and which input row it came from (``aug_source``).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional

import typer

from decodetune.cli.options import config_options
from decodetune.errors import UserError

_FILTERS = "Filters"


@config_options(skip=("seed",))  # --seed is augment's own: each variant's seed comes from it
def augment_command(
    input: Path = typer.Option(..., "--input", "-i", help="JSONL rows with a text field"),  # noqa: A002
    out: Path = typer.Option(..., "--output", "--out", "-o", metavar="FILE", help="JSONL file to write"),
    ops: str = typer.Option(..., "--ops", help="comma-separated: swap,delete,insert,synonym,paraphrase,backgen"),
    n: int = typer.Option(1, "--n", help="variants per row for each op (before filtering)"),
    seed: int = typer.Option(0, "--seed", help="same seed, same output"),
    rate: Optional[str] = typer.Option(  # noqa: UP045
        None, "--rate", help="token-op rate: 0.1 for all, or swap=0.1,delete=0.2 (default 0.1)"),
    field: Optional[str] = typer.Option(  # noqa: UP045
        None, "--field", help="text field to augment (default: messages if present, else prompt)"),
    keep_original: bool = typer.Option(True, "--keep-original/--no-keep-original",
                                       help="also write each input row (aug_op=original)"),
    synonyms: Optional[str] = typer.Option(  # noqa: UP045
        None, "--synonyms", help="synonym table (.tsv: word<TAB>syn..., .json: word -> list of synonyms) or 'lm' "
        "(the model's contextual suggestions; default)"),
    model: str = typer.Option("smollm2-135m", "--model", "-m", help="model for LM ops and 'lm' synonyms"),
    paraphrase_template: Optional[str] = typer.Option(  # noqa: UP045
        None, "--paraphrase-template", help="instruction for paraphrase, with {text}"),
    backgen_examples: int = typer.Option(3, "--backgen-examples", help="example prompts shown per backgen call"),
    preserve: Optional[str] = typer.Option(  # noqa: UP045
        None, "--preserve", rich_help_panel=_FILTERS,
        help="'numbers' or a regex: its matches are never edited and must survive (same order)"),
    max_overlap: Optional[float] = typer.Option(  # noqa: UP045
        None, "--max-overlap", rich_help_panel=_FILTERS,
        help="drop variants whose n-gram Jaccard with the original or a kept variant is above this"),
    overlap_n: int = typer.Option(3, "--overlap-n", rich_help_panel=_FILTERS, help="n of --max-overlap"),
    max_self_bleu: Optional[float] = typer.Option(  # noqa: UP045
        None, "--max-self-bleu", rich_help_panel=_FILTERS,
        help="drop variants whose BLEU (0..1) against the original and kept variants is above this"),
    min_words: Optional[int] = typer.Option(None, "--min-words", rich_help_panel=_FILTERS),  # noqa: UP045
    max_words: Optional[int] = typer.Option(None, "--max-words", rich_help_panel=_FILTERS),  # noqa: UP045
    min_len_ratio: Optional[float] = typer.Option(  # noqa: UP045
        None, "--min-len-ratio", rich_help_panel=_FILTERS, help="minimum words relative to the original"),
    max_len_ratio: Optional[float] = typer.Option(  # noqa: UP045
        None, "--max-len-ratio", rich_help_panel=_FILTERS, help="maximum words relative to the original"),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="progress bars on LM-based ops"),
    *,
    config_flags: dict[str, Any],
) -> None:
    """Augment prompts or training data: EDA token edits, paraphrase and back-generation, with filters."""
    from decodetune.io import check_output_path, read_jsonl, write_jsonl
    from decodetune.train.augment import Filters, compile_preserve, parse_ops, parse_rates
    from decodetune.train.augment.lm_ops import LM_OPS, PARAPHRASE_TEMPLATE
    from decodetune.train.augment.pipeline import augment

    # Everything the user typed is checked before the input is read or a model is loaded.
    check_output_path(out, "--output")
    op_list = parse_ops(ops)
    parse_rates(rate)
    if n < 1:
        raise UserError(f"--n: must be >= 1, got {n}")
    filters = Filters(max_overlap=max_overlap, overlap_n=overlap_n, max_self_bleu=max_self_bleu,
                      min_words=min_words, max_words=max_words, min_len_ratio=min_len_ratio,
                      max_len_ratio=max_len_ratio, preserve=compile_preserve(preserve))
    config = lm_config(config_flags) if any(op in LM_OPS for op in op_list) else None
    if synonyms not in (None, "lm") and not Path(synonyms).is_file():
        raise UserError(f"--synonyms: {synonyms}: file not found (give a .tsv/.json table or 'lm')")
    rows = read_jsonl(input)

    result = augment(rows, op_list, n, seed, field=field, rates=rate, synonyms=synonyms, model=model,
                     config=config, filters=filters, keep_original=keep_original,
                     paraphrase_template=paraphrase_template or PARAPHRASE_TEMPLATE,
                     backgen_examples=backgen_examples, source=str(input), progress=progress)
    write_jsonl(out, result.rows)
    _print_summary(result.counts)
    print(f"wrote {len(result.rows)} rows ({len(rows)} input rows) to {out}", file=sys.stderr)


def lm_config(config_flags: dict[str, Any]) -> Any:
    """The DecodingConfig for LM ops: ``--config`` (or the sampling default) with the flags on top."""
    from decodetune.cli.options import build_config
    from decodetune.config import DecodingConfig
    from decodetune.train.augment.lm_ops import DEFAULT_LM_CONFIG

    flags = {k: v for k, v in config_flags.items() if k != "__file__"}
    if config_flags.get("__file__") is not None:
        return build_config(config_flags)
    if "early_stopping" in flags:  # same spelling as every other command: true | false | never
        value = str(flags["early_stopping"]).strip().lower()
        flags["early_stopping"] = {"true": True, "false": False}.get(value, value)
    return DecodingConfig.from_dict({**DEFAULT_LM_CONFIG, **flags}, source="flags")


def _print_summary(counts: dict[str, dict[str, int]]) -> None:
    from rich.console import Console
    from rich.table import Table

    from decodetune.train.augment.filters import DROP_REASONS

    table = Table(title="augment", show_edge=False)
    for col in ("op", "candidates", "kept", *DROP_REASONS):
        table.add_column(col, justify="left" if col == "op" else "right")
    for op, c in counts.items():
        table.add_row(op, str(c["candidates"]), str(c["kept"]), *(str(c.get(r, 0)) for r in DROP_REASONS))
    Console(stderr=True).print(table)


def register(app: typer.Typer) -> None:
    """Add ``augment`` to the CLI."""
    app.command("augment")(augment_command)
