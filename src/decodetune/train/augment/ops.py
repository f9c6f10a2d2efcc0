"""EDA's four token-level edits (Wei & Zou 2019), keeping case, digits and punctuation.

Each op takes a :class:`~decodetune.train.augment.text.WordText` and a rate and returns an edited copy.
What the rate means, per op (``L`` = number of words in the text):

* ``swap``: ``rate * L`` swaps (in expectation, at least one); each exchanges two words, and the swaps use
  distinct positions, so ``2 * rate * L`` words move.
* ``delete``: every word is dropped with probability ``rate``; at least one goes, and never all of them.
* ``insert``: ``rate * L`` insertions (at least one), each a word from the synonym source.
* ``synonym``: ``rate * L`` words (at least one) that are not stop words are replaced from the source.

Words matched by the ``protect`` pattern (e.g. the numbers of an arithmetic question) are never swapped,
deleted or replaced. Counts use stochastic rounding, so the expectation is exact even for short texts
(apart from the EDA rule that a positive rate edits at least one word).
"""

from __future__ import annotations

import random
import re

from decodetune.train.augment.synonyms import SynonymSource
from decodetune.train.augment.text import STOP_WORDS, WordText, edit_count

TOKEN_OPS = ("swap", "delete", "insert", "synonym")
#: Ops that need a synonym source (a table or the model's suggestions).
SOURCE_OPS = ("insert", "synonym")


def swap_words(doc: WordText, rate: float, rng: random.Random) -> WordText:
    """Swap ``edit_count(rate, L)`` pairs of unprotected words, at distinct positions."""
    out = doc.copy()
    eligible = [i for i, p in enumerate(out.protected) if not p]
    m = min(edit_count(rate, len(out.words), rng), len(eligible) // 2)
    positions = rng.sample(eligible, 2 * m)
    for a, b in zip(positions[0::2], positions[1::2], strict=True):
        out.words[a], out.words[b] = out.words[b], out.words[a]
    return out


def delete_words(doc: WordText, rate: float, rng: random.Random) -> WordText:
    """Drop each unprotected word with probability ``rate``; at least one, never every word."""
    out = doc.copy()
    eligible = [i for i, p in enumerate(out.protected) if not p]
    if rate <= 0 or not eligible:
        return out
    doomed = [i for i in eligible if rng.random() < rate]
    if not doomed:
        doomed = [rng.choice(eligible)]
    if len(doomed) == len(out.words):
        doomed.remove(rng.choice(doomed))
    for i in sorted(doomed, reverse=True):
        out.delete(i)
    return out


def insert_words(doc: WordText, rate: float, rng: random.Random, source: SynonymSource) -> WordText:
    """Insert ``edit_count(rate, L)`` words chosen by ``source`` (EDA: a synonym of a word of the text)."""
    out = doc.copy()
    for _ in range(edit_count(rate, len(doc.words), rng)):
        pick = source.insertion(out, rng)
        if pick is None:
            break
        out.insert(*pick)
    return out


def replace_synonyms(doc: WordText, rate: float, rng: random.Random, source: SynonymSource) -> WordText:
    """Replace ``edit_count(rate, L)`` distinct unprotected non-stop words with words from ``source``."""
    out = doc.copy()
    m = edit_count(rate, len(out.words), rng)
    eligible = [i for i, w in enumerate(out.words)
                if not out.protected[i] and w.lower() not in STOP_WORDS and source.can_replace(w)]
    rng.shuffle(eligible)
    done = 0
    for i in eligible:
        if done == m:
            break
        new = source.replacement(out, i, rng)
        if new is not None and new != out.words[i]:
            out.words[i] = new
            done += 1
    return out


def apply_token_op(op: str, text: str, rate: float, rng: random.Random,
                   source: SynonymSource | None = None, protect: re.Pattern[str] | None = None) -> str:
    """Apply one token op to ``text`` and return the new text."""
    doc = WordText.parse(text, protect)
    if op == "swap":
        return swap_words(doc, rate, rng).render()
    if op == "delete":
        return delete_words(doc, rate, rng).render()
    if op in SOURCE_OPS and source is None:
        raise ValueError(f"op {op!r} needs a synonym source")
    if op == "insert":
        return insert_words(doc, rate, rng, source).render()  # type: ignore[arg-type]
    if op == "synonym":
        return replace_synonyms(doc, rate, rng, source).render()  # type: ignore[arg-type]
    raise ValueError(f"unknown token op {op!r}")
