"""Reference-overlap metrics: BLEU and chrF (sacrebleu), ROUGE-1/2/L F-measure (rouge-score).

BLEU and chrF rows are sentence scores (sacrebleu ``sentence_score``; BLEU with effective order), while the
aggregate is the corpus score computed from summed sufficient statistics, exactly as
``sacrebleu.corpus_bleu`` / ``corpus_chrf`` would, so a bootstrap resample recomputes the corpus value.
Scales follow the libraries: BLEU and chrF 0-100, ROUGE 0-1. Rows may have different numbers of
references. ROUGE uses rouge-score's tokenisation and Porter stemmer, except that letters outside ASCII
are kept (rouge-score's default tokenizer deletes them, so "日本" would score 0 against itself).
"""

from __future__ import annotations

import re
from functools import lru_cache

import numpy as np

from decodetune.metrics.base import Metric, MetricInput, MetricScores, register


@lru_cache(maxsize=1)
def _bleu_objects():
    from sacrebleu.metrics import BLEU

    return BLEU(), BLEU(effective_order=True)


@lru_cache(maxsize=1)
def _chrf():
    from sacrebleu.metrics import CHRF

    return CHRF()


def _sacrebleu_metric(inp: MetricInput, corpus_obj, sentence_obj) -> MetricScores:
    rows, stats = [], []
    for pred, refs in zip(inp.predictions, inp.references, strict=True):
        rows.append(sentence_obj.sentence_score(pred, list(refs)).score)
        # Statistics of one hypothesis against its own reference set (one stream per reference).
        stats.append(corpus_obj._extract_corpus_statistics([pred], [[r] for r in refs])[0])
    stats_arr = np.array(stats, dtype=float)

    def combine(summed: np.ndarray) -> float:
        return float(corpus_obj._compute_score_from_stats([int(round(x)) for x in summed]).score)

    return MetricScores(per_row=np.array(rows), stats=stats_arr, combine=combine)


def bleu(inp: MetricInput) -> MetricScores:
    """Sentence BLEU per row; corpus BLEU aggregate (0-100)."""
    corpus_obj, sentence_obj = _bleu_objects()
    return _sacrebleu_metric(inp, corpus_obj, sentence_obj)


def chrf(inp: MetricInput) -> MetricScores:
    """Sentence chrF per row; corpus chrF aggregate (0-100)."""
    obj = _chrf()
    return _sacrebleu_metric(inp, obj, obj)


class _UnicodeRougeTokenizer:
    """rouge-score's default tokenisation (lower-case, split on non-alphanumerics, stem words > 3 chars)
    with Unicode letters kept."""

    def __init__(self) -> None:
        from nltk.stem import porter

        self._stemmer = porter.PorterStemmer()

    def tokenize(self, text: str) -> list[str]:
        tokens = re.split(r"[\W_]+", text.lower())
        return [self._stemmer.stem(t) if len(t) > 3 and t.isascii() else t for t in tokens if t]


@lru_cache(maxsize=1)
def _rouge_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], tokenizer=_UnicodeRougeTokenizer())


@lru_cache(maxsize=4096)
def _rouge_row(pred: str, refs: tuple[str, ...]) -> dict[str, float]:
    scores = _rouge_scorer().score_multi(list(refs), pred)
    return {k: v.fmeasure for k, v in scores.items()}


def _rouge(kind: str):
    def fn(inp: MetricInput) -> MetricScores:
        vals = [_rouge_row(p, tuple(r))[kind] for p, r in zip(inp.predictions, inp.references, strict=True)]
        return MetricScores(per_row=np.array(vals, dtype=float))

    return fn


register(Metric("bleu", bleu, "max", needs_references=True, corpus=True,
                description="sacrebleu BLEU (corpus aggregate, sentence BLEU per item), 0-100"))
register(Metric("chrf", chrf, "max", needs_references=True, corpus=True,
                description="sacrebleu chrF (corpus aggregate, sentence chrF per item), 0-100"))
for _kind in ("rouge1", "rouge2", "rougeL"):
    register(Metric(_kind, _rouge(_kind), "max", needs_references=True,
                    description=f"{_kind} F-measure, best reference (rouge-score, stemmed), 0-1"))
