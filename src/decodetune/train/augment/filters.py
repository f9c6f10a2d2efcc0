"""Filters on augmented texts: duplicates, near-duplicates, length bounds and answer preservation.

A candidate is compared with the original text of its row and with the variants of that row already kept
(in generation order), so near-duplicate filtering is greedy and deterministic. Empty texts and exact
duplicates (after whitespace normalisation) are always dropped; everything else is opt-in.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from decodetune.errors import UserError
from decodetune.train.augment.text import NUMBER_RE, WORD_RE

#: Named ``preserve`` patterns. ``numbers``: every number of the original, in the same order.
PRESERVE_PRESETS = {"numbers": NUMBER_RE.pattern}

#: Why a candidate was dropped (the keys of the summary counts), in the order the checks run.
DROP_REASONS = ("empty", "duplicate", "length", "preserve", "overlap", "self_bleu")


def compile_preserve(spec: str | None) -> re.Pattern[str] | None:
    """``numbers`` or a regular expression (matched case-insensitively); a bad one is a :class:`UserError`."""
    if not spec:
        return None
    try:
        return re.compile(PRESERVE_PRESETS.get(spec, spec), re.IGNORECASE)
    except re.error as e:
        raise UserError(f"--preserve: invalid regular expression {spec!r} ({e})") from None


@dataclass
class Filters:
    """Which augmented texts to keep.

    ``max_overlap``: drop when the Jaccard similarity of word ``overlap_n``-gram sets (lowercased) with the
    original or a kept sibling exceeds it. ``max_self_bleu``: drop when sentence BLEU (0..1, sacrebleu,
    the original and kept siblings as references) exceeds it. ``min_words``/``max_words`` bound the word
    count; ``min_len_ratio``/``max_len_ratio`` bound it relative to the original. ``preserve``: the matches
    of this pattern in the original (e.g. its numbers) must appear in the candidate, same order and count.
    """

    max_overlap: float | None = None
    overlap_n: int = 3
    max_self_bleu: float | None = None
    min_words: int | None = None
    max_words: int | None = None
    min_len_ratio: float | None = None
    max_len_ratio: float | None = None
    preserve: re.Pattern[str] | None = None

    def __post_init__(self) -> None:
        for name in ("max_overlap", "max_self_bleu"):
            v = getattr(self, name)
            if v is not None and not 0 <= v <= 1:
                raise UserError(f"--{name.replace('_', '-')}: must be in [0, 1], got {v}")
        if self.overlap_n < 1:
            raise UserError(f"--overlap-n: must be >= 1, got {self.overlap_n}")
        for name in ("min_words", "max_words", "min_len_ratio", "max_len_ratio"):
            v = getattr(self, name)
            if v is not None and v < 0:
                raise UserError(f"--{name.replace('_', '-')}: must be >= 0, got {v}")
        if self.min_words is not None and self.max_words is not None and self.min_words > self.max_words:
            raise UserError(f"--min-words ({self.min_words}) is above --max-words ({self.max_words})")
        if (self.min_len_ratio is not None and self.max_len_ratio is not None
                and self.min_len_ratio > self.max_len_ratio):
            raise UserError(f"--min-len-ratio ({self.min_len_ratio}) is above --max-len-ratio ({self.max_len_ratio})")

    def check(self, candidate: str, original: str, kept: list[str]) -> str | None:
        """The reason to drop ``candidate`` (one of :data:`DROP_REASONS`), or None to keep it."""
        norm = _normalise(candidate)
        if not norm:
            return "empty"
        if norm == _normalise(original) or any(norm == _normalise(k) for k in kept):
            return "duplicate"
        n_words = len(words_of(candidate))
        n_orig = max(1, len(words_of(original)))
        if ((self.min_words is not None and n_words < self.min_words)
                or (self.max_words is not None and n_words > self.max_words)
                or (self.min_len_ratio is not None and n_words / n_orig < self.min_len_ratio)
                or (self.max_len_ratio is not None and n_words / n_orig > self.max_len_ratio)):
            return "length"
        if self.preserve is not None and not preserves(self.preserve, original, candidate):
            return "preserve"
        refs = [original, *kept]
        if self.max_overlap is not None and max(ngram_jaccard(candidate, r, self.overlap_n)
                                                for r in refs) > self.max_overlap:
            return "overlap"
        if self.max_self_bleu is not None and self_bleu(candidate, refs) > self.max_self_bleu:
            return "self_bleu"
        return None


def _normalise(text: str) -> str:
    return " ".join(text.split())


def words_of(text: str) -> list[str]:
    """The words of ``text`` as the token ops see them."""
    return WORD_RE.findall(text)


def preserves(pattern: re.Pattern[str], original: str, candidate: str) -> bool:
    """True when the candidate has exactly the original's matches of ``pattern``, in order (case-insensitive)."""
    def found(t: str) -> list[str]:
        return [m.group().replace("\u2212", "-").lower() for m in pattern.finditer(t)]
    return found(original) == found(candidate)


def ngram_jaccard(a: str, b: str, n: int) -> float:
    """Jaccard similarity of the sets of lowercased word n-grams (n shrinks to fit short texts)."""
    wa, wb = [w.lower() for w in words_of(a)], [w.lower() for w in words_of(b)]
    n = max(1, min(n, len(wa), len(wb)))
    ga = {tuple(wa[i : i + n]) for i in range(len(wa) - n + 1)}
    gb = {tuple(wb[i : i + n]) for i in range(len(wb) - n + 1)}
    if not ga or not gb:
        return 0.0
    return len(ga & gb) / len(ga | gb)


def self_bleu(candidate: str, references: list[str]) -> float:
    """Sentence BLEU-4 of ``candidate`` against ``references``, on a 0..1 scale (sacrebleu, exp smoothing)."""
    from sacrebleu.metrics import BLEU

    return BLEU(effective_order=True).sentence_score(candidate, references).score / 100.0
