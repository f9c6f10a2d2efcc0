"""Diversity and degeneration metrics of open-ended generations (no references needed).

- ``distinct-n`` (Li et al. 2016): unique n-grams / total n-grams over all generations (whitespace tokens).
- ``rep-n`` and ``diversity`` (Su et al. 2022, SimCTG): rep-n = 100 x (1 - unique n-grams / total n-grams)
  counted within each generation and summed over generations; diversity = prod over n = 2..4 of
  (1 - rep-n / 100). (The SimCTG script skips each text's last n-gram by an off-by-one; we count all.)
- ``self_bleu`` (Zhu et al. 2018): BLEU-4 of each generation against all the others, 0-1 scale, sacrebleu's
  13a tokenisation with exp smoothing and effective order (Texygen used NLTK's smoothing method 1).
- ``repetition`` (Holtzman et al. 2020): % of generations whose first 200 tokens end in a phrase of >= 2
  tokens repeated >= 3 times in a row. (The authors' script counts phrases of >= 3 tokens, or any phrase
  repeated > 50 times; we use the definition stated in the issue: phrase >= 2 tokens, >= 3 times.)
- ``zipf`` (Holtzman et al. 2020): minus the slope of log frequency vs log rank over the generations'
  tokens (the most frequent 5000 types), fitted by least squares as in the authors' script.

Tokens for ``repetition`` and ``zipf`` are the model's token ids when known, else whitespace tokens.

Bootstrap: ``distinct-n`` splits its corpus value into per-row shares (each n-gram occurrence counts
1/frequency), so a resample recomputes a ratio of sums without the artificial repeats that duplicated rows
would create; ``rep-n``/``diversity`` are ratios of per-row sums; ``zipf`` refits on resampled counts;
``self_bleu`` and ``repetition`` average their row scores.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Hashable, Sequence
from functools import lru_cache

import numpy as np

from decodetune.metrics.base import Metric, MetricInput, MetricScores, register, register_family


def ngrams(tokens: Sequence[Hashable], n: int) -> list[tuple]:
    """All contiguous n-grams of a token sequence."""
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def _word_tokens(texts: Sequence[str]) -> list[list[str]]:
    return [t.split() for t in texts]


def _model_tokens(inp: MetricInput) -> list[list]:
    if inp.token_ids is not None:
        return [list(t) for t in inp.token_ids]
    return _word_tokens(inp.texts or [])


# ----------------------------------------------------------------------------------------- distinct-n
def distinct_n(inp: MetricInput, n: int) -> MetricScores:
    """Corpus distinct-n, with per-row distinct-n as the row score."""
    grams = [ngrams(toks, n) for toks in _word_tokens(inp.texts or [])]
    freq = Counter(g for row in grams for g in row)
    per_row = np.array([len(set(row)) / len(row) if row else math.nan for row in grams])
    # Per-row share of the corpus's unique count: each occurrence is worth 1/frequency, so the shares sum
    # to the number of unique n-grams, and the full-corpus value is exactly unique / total.
    stats = np.array([[sum(1.0 / freq[g] for g in row), len(row)] for row in grams]).reshape(-1, 2)

    def combine(s: np.ndarray) -> float:
        return float(s[0] / s[1]) if s[1] > 0 else math.nan

    return MetricScores(per_row=per_row, stats=stats, combine=combine)


# ----------------------------------------------------------------------------------- rep-n, diversity
def _unique_total(tokens: Sequence[str], n: int) -> tuple[int, int]:
    grams = ngrams(tokens, n)
    return len(set(grams)), len(grams)


def rep_n(inp: MetricInput, n: int) -> MetricScores:
    """SimCTG rep-n (0-100, lower is better)."""
    ut = np.array([_unique_total(t, n) for t in _word_tokens(inp.texts or [])], dtype=float).reshape(-1, 2)
    with np.errstate(invalid="ignore", divide="ignore"):
        per_row = np.where(ut[:, 1] > 0, 100 * (1 - ut[:, 0] / np.where(ut[:, 1] > 0, ut[:, 1], 1)), np.nan)

    def combine(s: np.ndarray) -> float:
        return float(100 * (1 - s[0] / s[1])) if s[1] > 0 else math.nan

    return MetricScores(per_row=per_row, stats=ut, combine=combine)


def diversity(inp: MetricInput) -> MetricScores:
    """SimCTG diversity = prod_{n=2..4} (1 - rep-n/100), 0-1, higher is more diverse."""
    toks = _word_tokens(inp.texts or [])
    stats = np.array([[x for n in (2, 3, 4) for x in _unique_total(t, n)] for t in toks], dtype=float)
    stats = stats.reshape(-1, 6)

    def combine(s: np.ndarray) -> float:
        if s[1] == 0 or s[3] == 0 or s[5] == 0:
            return math.nan
        return float((s[0] / s[1]) * (s[2] / s[3]) * (s[4] / s[5]))

    per_row = np.array([combine(row) for row in stats])
    return MetricScores(per_row=per_row, stats=stats, combine=combine)


# --------------------------------------------------------------------------------------- Self-BLEU
@lru_cache(maxsize=1)
def _tokenizer_13a():
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

    return Tokenizer13a()


def self_bleu_scores(texts: Sequence[str], max_order: int = 4) -> np.ndarray:
    """BLEU (0-1) of each text against all the other texts as references.

    Equal to ``sacrebleu.sentence_bleu(texts[i], texts[:i] + texts[i+1:])`` with effective order, but
    linear in the corpus: the clipping count max over references excluding i comes from each n-gram's
    two largest counts.
    """
    from sacrebleu.metrics import BLEU

    tok = _tokenizer_13a()
    toks = [tok(t).split() for t in texts]
    counts = [Counter(g for n in range(1, max_order + 1) for g in ngrams(t, n)) for t in toks]
    # For each n-gram, the two largest counts over rows and the row holding the largest.
    top1: dict[tuple, tuple[int, int]] = {}
    top2: dict[tuple, int] = {}
    for i, c in enumerate(counts):
        for g, k in c.items():
            best = top1.get(g)
            if best is None:
                top1[g] = (k, i)
            elif k > best[0]:
                top2[g] = best[0]
                top1[g] = (k, i)
            elif k > top2.get(g, 0):
                top2[g] = k
    lens = np.array([len(t) for t in toks])
    scores = np.zeros(len(toks))
    if len(toks) < 2:
        return np.full(len(toks), np.nan)
    for i, c in enumerate(counts):
        correct = [0] * max_order
        total = [max(0, len(toks[i]) - n + 1) for n in range(1, max_order + 1)]
        for g, k in c.items():
            k1, owner = top1[g]
            ref_max = top2.get(g, 0) if owner == i else k1
            correct[len(g) - 1] += min(k, ref_max)
        others = np.delete(lens, i)
        diffs = np.abs(others - lens[i])
        closest = int(others[diffs == diffs.min()].min())
        score = BLEU.compute_bleu(correct, total, int(lens[i]), closest, smooth_method="exp",
                                  effective_order=True, max_ngram_order=max_order).score
        scores[i] = score / 100.0
    return scores


def self_bleu(inp: MetricInput, n: int = 4) -> MetricScores:
    """Self-BLEU-n (0-1, lower is more diverse): each generation vs the rest, averaged."""
    return MetricScores(per_row=self_bleu_scores(inp.texts or [], max_order=n))


# ------------------------------------------------------------------------------ Holtzman repetition
def ends_in_repetition(tokens: Sequence[Hashable], min_phrase: int = 2, min_repeats: int = 3,
                       window: int = 200) -> bool:
    """True when the first ``window`` tokens end in a phrase of >= ``min_phrase`` tokens repeated
    >= ``min_repeats`` times back to back."""
    toks = list(tokens[:window])
    rev = toks[::-1]
    for n in range(min_phrase, len(rev) // min_repeats + 1):
        phrase = rev[:n]
        repeats = 1
        while rev[n * repeats:n * (repeats + 1)] == phrase:
            repeats += 1
        if repeats >= min_repeats:
            return True
    return False


def repetition(inp: MetricInput) -> MetricScores:
    """% of generations ending in a repetition loop (0 or 100 per row)."""
    return MetricScores(per_row=np.array([100.0 * ends_in_repetition(t) for t in _model_tokens(inp)]), scale=100.0)


# --------------------------------------------------------------------------------------------- Zipf
def zipf_coefficient(counts: np.ndarray, top: int = 5000) -> float:
    """Minus the least-squares slope of log(count) on log(rank) over the ``top`` most frequent types."""
    c = np.sort(counts[counts > 0])[::-1][:top]
    if len(c) < 2:
        return math.nan
    x = np.log(np.arange(1, len(c) + 1))
    y = np.log(c)
    slope = np.polyfit(x, y, 1)[0]
    return float(-slope)


def zipf(inp: MetricInput) -> MetricScores:
    """Zipf coefficient of the generations' token distribution (corpus-level; row score NaN)."""
    from scipy import sparse

    toks = _model_tokens(inp)
    vocab: dict[Hashable, int] = {}
    rows, cols, vals = [], [], []
    for i, t in enumerate(toks):
        for tok, k in Counter(t).items():
            rows.append(i)
            cols.append(vocab.setdefault(tok, len(vocab)))
            vals.append(k)
    mat = sparse.csr_matrix((vals, (rows, cols)), shape=(len(toks), max(1, len(vocab))), dtype=float)

    def corpus_fn(w: np.ndarray) -> float:
        return zipf_coefficient(np.asarray(mat.T @ w).ravel())

    return MetricScores(per_row=np.full(len(toks), np.nan), corpus_fn=corpus_fn)


# ---------------------------------------------------------------------------------------- registry
def _distinct_family(n: int) -> Metric:
    return Metric(f"distinct-{n}", lambda inp: distinct_n(inp, n), "max", corpus=True,
                  description=f"unique / total {n}-grams over all generations (0-1)")


def _rep_family(n: int) -> Metric:
    return Metric(f"rep-{n}", lambda inp: rep_n(inp, n), "min", corpus=True,
                  description=f"SimCTG rep-{n}: 100 x (1 - unique/total {n}-grams within generations)")


def _self_bleu_family(n: int) -> Metric:
    return Metric(f"self_bleu-{n}", lambda inp: self_bleu(inp, n), "min", corpus=True,
                  description=f"Self-BLEU-{n}: BLEU of each generation vs the others (0-1)")


register_family("distinct", _distinct_family)
register_family("rep", _rep_family)
register_family("self_bleu", _self_bleu_family)
register(Metric("self_bleu", lambda inp: self_bleu(inp, 4), "min", corpus=True,
                description="Self-BLEU-4: BLEU of each generation vs the others (0-1)"))
register(Metric("diversity", diversity, "max", corpus=True,
                description="SimCTG diversity: prod over n=2..4 of (1 - rep-n/100), 0-1"))
register(Metric("repetition", repetition, "min",
                description="Holtzman %: generations ending in a >=2-token phrase repeated >=3 times"))
register(Metric("zipf", zipf, "none", corpus=True,
                description="Zipf coefficient of generated tokens (human text ~0.9-1.0)"))
