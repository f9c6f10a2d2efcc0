"""`augment_rows`: expand rows of a data set with token-level and LM-based variants, then filter them.

Output layout, per input row in input order: the original (when ``keep_original``), then for each op in
the order given, up to ``n`` variants that passed the filters. Every field of the input row is kept; the
text field holds the variant, ``id`` (when present) gets the suffix ``~<op><k>`` (k = 1..n), and two fields
are added: ``aug_op`` (``original`` or the op) and ``aug_source`` (0-based index of the input row). Back-
generated rows are *new* prompts, so their answer fields (:data:`ANSWER_FIELDS`) are removed.

Randomness: variant ``k`` of row ``i`` under op ``o`` uses its own RNG (or, for LM ops, its own engine seed)
derived from ``(seed, o, i, k)``; the same seed gives the same output, and a variant does not change when
``n``, the other ops or the rows after it change.
"""

from __future__ import annotations

import copy
import hashlib
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from dataclasses import field as dc_field
from pathlib import Path
from typing import Any

from decodetune.config import DecodingConfig
from decodetune.errors import UserError
from decodetune.train.augment.filters import Filters
from decodetune.train.augment.lm_ops import (
    LM_OPS,
    PARAPHRASE_TEMPLATE,
    backgen_prompt,
    clean_generation,
    default_lm_config,
    paraphrase_prompt,
    run_generations,
    with_stops,
)
from decodetune.train.augment.ops import SOURCE_OPS, TOKEN_OPS, apply_token_op
from decodetune.train.augment.synonyms import LMSuggestions, SynonymSource, SynonymTable

ALL_OPS = TOKEN_OPS + LM_OPS
#: Rate used by a token op that ``rates`` does not mention (EDA's recommended alpha).
DEFAULT_RATE = 0.1
#: Fields removed from back-generated rows: a new prompt has no known answer.
ANSWER_FIELDS = ("answer", "answers", "reference", "references", "target", "targets", "label", "labels",
                 "output", "completion", "response", "solution")


@dataclass
class AugmentResult:
    """Rows out, and per op how many candidates were made, kept, and dropped for which reason."""

    rows: list[dict[str, Any]]
    counts: dict[str, dict[str, int]] = dc_field(default_factory=dict)


def parse_ops(spec: str | Sequence[str]) -> list[str]:
    """``"swap,delete"`` or a list of names -> validated op names (order kept, duplicates removed)."""
    names = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else [str(s).strip() for s in spec]
    names = [s for s in names if s]
    if not names:
        raise UserError(f"--ops: no op given; known: {', '.join(ALL_OPS)}")
    for name in names:
        if name not in ALL_OPS:
            raise UserError(f"--ops: unknown op {name!r}; known: {', '.join(ALL_OPS)}")
    return list(dict.fromkeys(names))


def parse_rates(spec: str | float | dict[str, float] | None) -> dict[str, float]:
    """``0.1`` (every token op), ``"swap=0.1,delete=0.2"`` or a dict -> a rate per token op, in [0, 1]."""
    rates = dict.fromkeys(TOKEN_OPS, DEFAULT_RATE)
    if spec is None or spec == "":
        return rates
    if isinstance(spec, dict):
        items = list(spec.items())
    elif isinstance(spec, int | float):
        items = [(op, spec) for op in TOKEN_OPS]
    else:
        items = []
        for part in (p.strip() for p in str(spec).split(",")):
            if not part:
                continue
            if "=" not in part:
                items.extend((op, part) for op in TOKEN_OPS)
                continue
            op, _, value = part.partition("=")
            items.append((op.strip(), value.strip()))
    for op, value in items:
        if op not in TOKEN_OPS:
            raise UserError(f"--rate: {op!r} is not a token op; rates apply to {', '.join(TOKEN_OPS)}")
        try:
            rate = float(value)
        except (TypeError, ValueError):
            raise UserError(f"--rate: {op}={value!r} is not a number") from None
        if not 0 <= rate <= 1:
            raise UserError(f"--rate: {op}={rate:g} is outside [0, 1]")
        rates[op] = rate
    return rates


def augment_rows(rows: list[dict[str, Any]], ops: str | Sequence[str], n: int = 1, seed: int = 0,
                 **kwargs: Any) -> list[dict[str, Any]]:
    """Augmented rows (see the module docstring for layout and fields). Keywords: as :func:`augment`."""
    return augment(rows, ops, n, seed, **kwargs).rows


def row_augmenter(ops: str | Sequence[str], n: int = 1, seed: int = 0,
                  **kwargs: Any) -> Callable[[list[dict[str, Any]]], list[dict[str, Any]]]:
    """An ``augment(rows) -> rows`` callable for hooks such as distillation's ``prepare_rows``.

    Ops and rates are checked now; each output row keeps its source row's ``_line`` (for error messages).
    """
    parse_ops(ops)
    parse_rates(kwargs.get("rates"))

    def run(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        out = augment(rows, ops, n, seed, **kwargs).rows
        for row in out:
            if "_line" in rows[row["aug_source"]]:
                row["_line"] = rows[row["aug_source"]]["_line"]
        return out

    return run


def augment_texts(texts: Sequence[str], ops: str | Sequence[str], n: int = 1, seed: int = 0,
                  **kwargs: Any) -> list[str]:
    """Plain prompts in, plain prompts out (originals first per prompt when ``keep_original``)."""
    rows = [{"prompt": t} for t in texts]
    return [r["prompt"] for r in augment(rows, ops, n, seed, field="prompt", **kwargs).rows]


def augment(rows: list[dict[str, Any]], ops: str | Sequence[str], n: int = 1, seed: int = 0, *,
            field: str | None = None, rates: str | float | dict[str, float] | None = None,
            synonyms: str | Path | SynonymSource | None = None, model: Any = None,
            config: DecodingConfig | None = None, filters: Filters | None = None, keep_original: bool = True,
            paraphrase_template: str = PARAPHRASE_TEMPLATE, backgen_examples: int = 3,
            answer_fields: Sequence[str] = ANSWER_FIELDS, source: str = "input",
            progress: bool = False) -> AugmentResult:
    """Expand ``rows`` with ``n`` variants per row and op, filter them, and count what was dropped.

    ``field`` names the text to augment (a string, or a chat whose last user message is edited); by
    default each row's ``messages`` when it has them, else its ``prompt`` (as task files are read).
    ``rates``: see :func:`parse_rates`. ``synonyms``: a TSV/JSON table path, a :class:`SynonymTable`,
    ``"lm"`` for the model's contextual suggestions (the default when ``insert``/``synonym`` are asked for).
    ``model``: anything :func:`decodetune.models.load_model` accepts (default: the builtin smollm2-135m),
    loaded only when an op needs it. ``config``: decoding for LM ops (default: sampling, T=0.8, top-p 0.95).
    ``filters.preserve`` also protects its matches from token edits. ``source`` names the input in errors.
    Bad input raises :class:`UserError` before any model is loaded.
    """
    op_list = parse_ops(ops)
    rate_of = parse_rates(rates)
    if not isinstance(n, int) or n < 1:
        raise UserError(f"--n: must be an integer >= 1, got {n!r}")
    if not rows:
        raise UserError(f"{source}: no rows (empty input)")
    if backgen_examples < 1:
        raise UserError(f"--backgen-examples: must be >= 1, got {backgen_examples}")
    if "paraphrase" in op_list and "{text}" not in paraphrase_template:
        raise UserError("--paraphrase-template: must contain {text}")
    filters = filters or Filters()
    fields = [field or ("messages" if row.get("messages") not in (None, "") else "prompt") for row in rows]
    texts = [_text_of(row, i, f, source, op_list[0], explicit=field is not None)
             for i, (row, f) in enumerate(zip(rows, fields, strict=True))]

    word_source: SynonymSource | None = None
    if any(op in SOURCE_OPS for op in op_list):
        word_source = _synonym_source(synonyms, model)
    loaded = None
    if any(op in LM_OPS for op in op_list):
        from decodetune.models import DEFAULT_MODEL, load_model

        loaded = word_source.loaded if isinstance(word_source, LMSuggestions) else load_model(
            model if model is not None else DEFAULT_MODEL)
    cfg = config if config is not None else default_lm_config()

    candidates: dict[str, list[list[str]]] = {}
    for op in op_list:
        if op in TOKEN_OPS:
            candidates[op] = _token_candidates(op, texts, n, seed, rate_of[op], word_source, filters, progress)
        else:
            candidates[op] = _lm_candidates(op, texts, n, seed, loaded, cfg, paraphrase_template,
                                            backgen_examples, progress)

    result = AugmentResult(rows=[], counts={op: {"candidates": 0, "kept": 0} for op in op_list})
    for i, row in enumerate(rows):
        base = {k: v for k, v in row.items() if k != "_line"}
        if keep_original:
            result.rows.append({**copy.deepcopy(base), "aug_op": "original", "aug_source": i})
        kept: list[str] = []
        for op in op_list:
            counts = result.counts[op]
            for k, cand in enumerate(candidates[op][i], start=1):
                counts["candidates"] += 1
                reason = filters.check(cand, texts[i], kept)
                if reason is not None:
                    counts[reason] = counts.get(reason, 0) + 1
                    continue
                kept.append(cand)
                counts["kept"] += 1
                result.rows.append(_variant_row(base, fields[i], cand, op, k, i, answer_fields))
    return result


def _text_of(row: dict[str, Any], index: int, field: str, source: str, op: str, explicit: bool) -> str:
    where = f"{source}:{row['_line']}" if "_line" in row else f"{source}: row {index + 1}"
    if field not in row:
        name = repr(field) if explicit else "'prompt' (or 'messages')"
        raise UserError(f"{where}: row has no {name} field, which op {op!r} needs (choose one with --field)")
    value = row[field]
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(m, dict) for m in value):
        for m in reversed(value):
            if m.get("role") == "user" and isinstance(m.get("content"), str):
                return m["content"]
        raise UserError(f"{where}: field {field!r} is a chat without a user message to augment")
    raise UserError(f"{where}: field {field!r} must be text or a chat, got {type(value).__name__}")


def _with_text(value: Any, text: str) -> Any:
    """The field value with its text replaced (for a chat: the content of the last user message)."""
    if isinstance(value, str):
        return text
    out = copy.deepcopy(value)
    for m in reversed(out):
        if m.get("role") == "user" and isinstance(m.get("content"), str):
            m["content"] = text
            break
    return out


def _variant_row(base: dict[str, Any], field: str, text: str, op: str, k: int, index: int,
                 answer_fields: Sequence[str]) -> dict[str, Any]:
    row = copy.deepcopy(base)
    row[field] = _with_text(base[field], text)
    if "id" in row:
        row["id"] = f"{row['id']}~{op}{k}"
    if op == "backgen":
        for name in answer_fields:
            if name != field:
                row.pop(name, None)
    row["aug_op"] = op
    row["aug_source"] = index
    return row


def _synonym_source(synonyms: Any, model: Any) -> SynonymSource:
    if synonyms is None or synonyms == "lm":
        from decodetune.models import DEFAULT_MODEL

        return LMSuggestions(model if model is not None else DEFAULT_MODEL)
    if isinstance(synonyms, str | Path):
        return SynonymTable.load(synonyms)
    return synonyms


def variant_rng(seed: int, op: str, index: int, k: int) -> random.Random:
    """The RNG of variant ``k`` of row ``index`` under ``op`` (stable across runs and Python versions)."""
    return random.Random(f"{seed}|{op}|{index}|{k}")


def variant_seed(seed: int, op: str, index: int, k: int) -> int:
    """The engine seed of an LM-op variant: a stable 31-bit hash of ``(seed, op, index, k)``."""
    digest = hashlib.sha256(f"{seed}|{op}|{index}|{k}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


def _token_candidates(op: str, texts: list[str], n: int, seed: int, rate: float,
                      word_source: SynonymSource | None, filters: Filters, progress: bool) -> list[list[str]]:
    protect = filters.preserve
    slow = isinstance(word_source, LMSuggestions) and op in SOURCE_OPS
    out: list[list[str]] = []
    for i, text in enumerate(_track(texts, f"augment: {op}", progress and slow)):
        out.append([apply_token_op(op, text, rate, variant_rng(seed, op, i, k), word_source, protect)
                    for k in range(1, n + 1)])
    return out


def _lm_candidates(op: str, texts: list[str], n: int, seed: int, loaded: Any, config: DecodingConfig,
                   template: str, n_examples: int, progress: bool) -> list[list[str]]:
    prompts: list[str] = []
    seeds: list[int] = []
    configs: list[DecodingConfig] = []
    shown: list[list[str]] = []
    for i, text in enumerate(texts):
        for k in range(1, n + 1):
            if op == "paraphrase":
                prompts.append(paraphrase_prompt(text, template))
                shown.append([])
            else:
                rng = variant_rng(seed, op, i, k)
                others = [j for j in range(len(texts)) if j != i]
                picks = rng.sample(others, min(n_examples - 1, len(others)))
                examples = [texts[j] for j in picks] + [text]  # the row's own prompt comes last
                prompts.append(backgen_prompt(examples))
                shown.append(examples)
            seeds.append(variant_seed(seed, op, i, k))
            configs.append(with_stops(config, text))
    if progress:
        import sys

        print(f"augment: {op}: {len(prompts)} generations", file=sys.stderr)
    outs = run_generations(loaded, prompts, seeds, configs, progress=progress)
    result: list[list[str]] = []
    for i, text in enumerate(texts):
        row = []
        for k in range(n):
            cand = clean_generation(outs[i * n + k], text)
            if any(_same(cand, e) for e in shown[i * n + k]):
                cand = text  # a copied example is no new prompt: make it the row's own text, a "duplicate"
            row.append(cand)
        result.append(row)
    return result


def _same(a: str, b: str) -> bool:
    return " ".join(a.split()) == " ".join(b.split())


def _track(items: list[str], label: str, enabled: bool) -> Any:
    if not enabled:
        return items
    from rich.console import Console
    from rich.progress import track

    return track(items, description=label, console=Console(stderr=True), transient=True)
