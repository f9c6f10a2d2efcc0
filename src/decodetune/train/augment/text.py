"""Words and the text between them, so that token-level edits keep case, digits and punctuation.

The EDA reference code lowercases its input and strips digits and punctuation before editing. We do not:
a text is split into *words* (letters and digits, with inner ``'``/``-``/``.``/``,`` so that ``don't``,
``well-known`` and ``3.14`` stay whole) and the *gaps* between them (spaces, punctuation). Edits move,
drop, insert or replace words; gaps stay where they are, so ``"What is 12 plus 7?"`` keeps its ``?``.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass, field

#: A word: letters/digits/underscore runs, joined by one inner apostrophe, hyphen, dot, comma, colon or slash.
WORD_RE = re.compile(r"\w+(?:[.,:/'\u2019-]\w+)*")

#: Numbers as the answer-preservation filter sees them (``-3``, ``12``, ``3.5``, ``1,000``).
NUMBER_RE = re.compile(r"(?<![\w.])[-\u2212]?\d+(?:[.,]\d+)*")

#: English function words that EDA never replaces with synonyms (the list from the EDA reference code).
STOP_WORDS = frozenset("""
i me my myself we our ours ourselves you your yours yourself yourselves he him his himself she her hers herself
it its itself they them their theirs themselves what which who whom this that these those am is are was were be
been being have has had having do does did doing a an the and but if or because as until while of at by for with
about against between into through during before after above below to from up down in out on off over under
again further then once here there when where why how all any both each few more most other some such no nor not
only own same so than too very s t can will just don should now
""".split())


@dataclass
class WordText:
    """A text as ``gaps[0] words[0] gaps[1] words[1] ... words[-1] gaps[-1]`` (``len(gaps) == len(words)+1``)."""

    words: list[str]
    gaps: list[str]
    protected: list[bool] = field(default_factory=list)

    @classmethod
    def parse(cls, text: str, protect: re.Pattern[str] | None = None) -> WordText:
        """Split ``text``; words matching ``protect`` (searched) are marked as not to be touched."""
        words: list[str] = []
        gaps: list[str] = []
        pos = 0
        for m in WORD_RE.finditer(text):
            gaps.append(text[pos:m.start()])
            words.append(m.group())
            pos = m.end()
        gaps.append(text[pos:])
        protected = [bool(protect and protect.search(w)) for w in words]
        return cls(words, gaps, protected)

    def render(self) -> str:
        """The text back, gaps interleaved with words."""
        out = [self.gaps[0]]
        for w, g in zip(self.words, self.gaps[1:], strict=True):
            out.append(w)
            out.append(g)
        return "".join(out)

    def before(self, i: int) -> str:
        """The text before word ``i``, the gap in front of it included (``i == len(words)``: everything)."""
        return "".join(g + w for g, w in zip(self.gaps[:i], self.words[:i], strict=True)) + self.gaps[i]

    def after(self, i: int) -> str:
        """The text after word ``i``, starting with the gap behind it."""
        rest = zip(self.words[i + 1 :], self.gaps[i + 2 :], strict=True)
        return self.gaps[i + 1] + "".join(w + g for w, g in rest)

    def copy(self) -> WordText:
        """An independent copy."""
        return WordText(list(self.words), list(self.gaps), list(self.protected))

    def delete(self, i: int) -> None:
        """Remove word ``i`` and merge the gaps on either side of it (keeping their punctuation)."""
        left, right = self.gaps[i], self.gaps[i + 1]
        self.gaps[i : i + 2] = [merge_gaps(left, right, at_start=i == 0, at_end=i == len(self.words) - 1)]
        del self.words[i]
        del self.protected[i]

    def insert(self, slot: int, word: str) -> None:
        """Insert ``word`` so that it becomes word number ``slot`` (0 = first, ``len(words)`` = last)."""
        n = len(self.words)
        if n == 0:
            self.gaps = [self.gaps[0], ""]
        elif slot < n:
            # the old gap stays before the new word; a space separates it from the word it now precedes
            self.gaps.insert(slot + 1, " ")
        else:
            # after the last word: a space, the new word, then the trailing gap (e.g. "?")
            self.gaps.insert(n, " ")
        self.words.insert(slot, word)
        self.protected.insert(slot, False)


def merge_gaps(left: str, right: str, at_start: bool, at_end: bool) -> str:
    """The one gap that replaces ``left word right`` once the word is gone.

    A whitespace-only side gives way to the other, so punctuation is never lost: ``"the big dog"`` ->
    ``"the dog"``, ``"a, b, c"`` -> ``"a, c"``, ``"the dog."`` -> ``"the."``. When both sides hold
    punctuation, both are kept (``"Hello, world!"`` -> ``"Hello,!"``). No space is left dangling at the start.
    """
    if at_start:
        return left + right.lstrip()
    if at_end:
        return left.rstrip() + right
    if not left.strip():
        return right if right else left
    if not right.strip():
        return left
    if left.strip() == right.strip():
        return right
    return left.rstrip() + right


def match_case(template: str, word: str) -> str:
    """``word`` with the case pattern of ``template``: ALL CAPS, Capitalised, or as given."""
    if len(template) > 1 and template.isupper():
        return word.upper()
    if template[:1].isupper() and word[:1].islower():
        return word[:1].upper() + word[1:]
    return word


def stochastic_round(x: float, rng: random.Random) -> int:
    """``floor(x)`` plus one with probability ``x - floor(x)``: an integer whose expectation is exactly ``x``."""
    base = math.floor(x)
    return base + (1 if rng.random() < x - base else 0)


def edit_count(rate: float, n_words: int, rng: random.Random) -> int:
    """How many edits a ``rate`` asks for in ``n_words`` words: ``rate * n_words`` in expectation, at least 1.

    As in EDA, a positive rate always changes something (``max(1, ...)``), so short texts get one edit;
    on long texts the expectation is ``rate * n_words``. A zero rate means no edits.
    """
    if rate <= 0 or n_words == 0:
        return 0
    return max(1, stochastic_round(rate * n_words, rng))


def numbers_in(text: str) -> list[str]:
    """The numbers in ``text``, in order, normalised (unicode minus -> ``-``)."""
    return [m.group().replace("\u2212", "-") for m in NUMBER_RE.finditer(text)]
