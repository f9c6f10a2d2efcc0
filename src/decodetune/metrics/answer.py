"""Answer metrics: exact match, contains-answer, numeric match, token F1 (SQuAD-style normalisation).

Each scores one row against a list of references and keeps the best reference (max over references).
Normalisation (as in the SQuAD evaluation script, made Unicode-aware): NFKC, lower-case, drop punctuation
(any Unicode ``P*`` category), drop the English articles a/an/the, collapse whitespace.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter

import numpy as np

from decodetune.errors import UserError
from decodetune.metrics.base import Metric, MetricInput, MetricScores, register

_ARTICLES = {"a", "an", "the"}
# A number: optional sign (ASCII or Unicode minus), digits with optional thousands commas, optional
# decimals, or a bare decimal such as ".5".
_NUMBER_RE = re.compile(r"[-\u2212+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[-\u2212+]?\.\d+")


def normalize_answer(text: str) -> str:
    """SQuAD normalisation, Unicode-aware: ``"The  Café!"`` -> ``"café"``."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = "".join(" " if unicodedata.category(ch).startswith("P") else ch for ch in text)
    return " ".join(t for t in text.split() if t not in _ARTICLES)


def find_number(text: str) -> str | None:
    """The first number in ``text`` as a canonical string (commas removed, Unicode minus folded), or None."""
    m = _NUMBER_RE.search(unicodedata.normalize("NFKC", text))
    if not m:
        return None
    s = m.group(0).replace(",", "").replace("\u2212", "-").lstrip("+")
    return s


def find_numbers(text: str) -> list[str]:
    """Every number in ``text``, in order, canonicalised as by :func:`find_number`."""
    return [m.group(0).replace(",", "").replace("\u2212", "-").lstrip("+")
            for m in _NUMBER_RE.finditer(unicodedata.normalize("NFKC", text))]


def parse_number(text: str) -> float | None:
    """The first number in ``text`` as a float, or None."""
    s = find_number(text)
    return float(s) if s is not None else None


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the normalised strings are equal."""
    return float(normalize_answer(prediction) == normalize_answer(reference))


def contains_answer(prediction: str, reference: str) -> float:
    """1.0 when the normalised reference occurs in the normalised prediction on word boundaries."""
    ref = normalize_answer(reference)
    if not ref:
        return float(not normalize_answer(prediction))
    return float(f" {ref} " in f" {normalize_answer(prediction)} ")


def numbers_equal(prediction: str, reference: float, rel_tol: float = 1e-6) -> float:
    """1.0 when the first number in ``prediction`` equals ``reference`` (relative tolerance)."""
    value = parse_number(prediction)
    if value is None:
        return 0.0
    return float(math.isclose(value, reference, rel_tol=rel_tol, abs_tol=1e-9))


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD token-overlap F1 of the normalised strings (both empty = 1, one empty = 0)."""
    pred = normalize_answer(prediction).split()
    ref = normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def _best_over_refs(fn, inp: MetricInput) -> MetricScores:
    scores = [max(fn(p, r) for r in refs) for p, refs in zip(inp.predictions, inp.references, strict=True)]
    return MetricScores(per_row=np.array(scores, dtype=float))


def _numeric(inp: MetricInput) -> MetricScores:
    scores = []
    for i, (pred, refs) in enumerate(zip(inp.predictions, inp.references, strict=True)):
        best = 0.0
        for ref in refs:
            value = parse_number(ref)
            if value is None:
                item_id = getattr(inp.items[i], "id", i) if inp.items else i
                raise UserError(f"metric 'numeric_match': reference {ref!r} of item {item_id!r} is not a number")
            best = max(best, numbers_equal(pred, value))
        scores.append(best)
    return MetricScores(per_row=np.array(scores, dtype=float))


register(Metric("exact_match", lambda inp: _best_over_refs(exact_match, inp), "max", needs_references=True,
                description="normalised exact match with any reference (0/1)"))
register(Metric("contains", lambda inp: _best_over_refs(contains_answer, inp), "max", needs_references=True,
                description="a reference occurs in the prediction, normalised, on word boundaries (0/1)"))
register(Metric("numeric_match", _numeric, "max", needs_references=True,
                description="first number in the prediction equals the reference number (0/1)"))
register(Metric("token_f1", lambda inp: _best_over_refs(token_f1, inp), "max", needs_references=True,
                description="SQuAD token F1 against the best reference (0-1)"))
