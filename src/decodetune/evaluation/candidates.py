"""The candidate strategies: sample k sequences per prompt, return one.

* ``self_consistency`` (Wang et al. 2023): the majority of ``task.extract_answer(text)`` over the k
  candidates. An empty answer (nothing extracted) does not vote unless every candidate's is empty. A tie
  between answers goes to the one whose candidates have the highest summed logprob (the tied answers
  have as many candidates each, so this is their mean sequence logprob), then to the answer seen first;
  the returned text is the winning answer's most likely candidate (the first on a tie).
* ``mbr`` (minimum Bayes risk): the candidate with the highest mean utility against the other k - 1,
  from a k x k matrix computed once per prompt (``U[i, j] = utility(hypothesis=i, reference=j)``).
  Candidates are compared as the task's metrics see them: after its answer extraction. Utilities:
  sacrebleu's sentence chrF and BLEU (effective order, as in :mod:`decodetune.metrics.overlap`),
  rouge-score's ROUGE-L F-measure (the same tokenisation as the ``rougeL`` metric), SQuAD token F1,
  or ``pkg.module:function(hypothesis, reference) -> float``.
* ``best_of_n``: the highest mean logprob (``score / num_tokens``), or a user scorer
  ``pkg.module:function(prompt, candidates) -> list[float]`` (higher is better).

Ties go to the earliest candidate. ``Generation.score`` is the sum of raw token logprobs (torch,
llamacpp and vLLM when logprobs are asked for, which :func:`generate_candidates` does for the selections
that read it); a backend without logprobs (the OpenAI API) scores every candidate 0, so a
self-consistency tie goes to the answer seen first, and ``best_of_n`` by mean logprob is refused there.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import Any

import numpy as np

from decodetune.backends.base import Backend, Request
from decodetune.config import MBR_UTILITIES, RERANKERS, DecodingConfig, candidate_config
from decodetune.errors import UserError
from decodetune.metrics.base import load_function

__all__ = ["best_of_n", "candidate_config", "generate_candidates", "majority_vote", "mbr_matrix", "mbr_select",
           "select", "select_row", "utility_fn"]

#: A stored generation, as the runner keeps it: text, token_ids, num_tokens, score, finish_reason...
Candidate = dict[str, Any]


# ==================================================================== generation
def generate_candidates(backend: Backend, requests: Sequence[Request], *, logprobs: bool = False,
                        batch_size: int | None = None, progress: bool = False) -> list[Any]:
    """``backend.generate`` with every candidate strategy replaced by its :func:`candidate_config`.

    User selectors are imported first, so a typo fails before anything is generated. Logprobs are asked
    for when a selection reads the candidates' scores and the backend returns them (llama.cpp and vLLM
    compute them only on request; torch always does).
    """
    for r in requests:
        check_selector(r.config)
    wants_scores = any(_reads_scores(r.config) for r in requests) and backend.capabilities().logprobs
    engine_requests = [Request(r.prompt, candidate_config(r.config), r.seed) for r in requests]
    extra = {"logprobs": True} if logprobs or wants_scores else {}
    return backend.generate(engine_requests, batch_size=batch_size, progress=progress, **extra)


def generate_selected(backend: Backend, requests: Sequence[Request], task: Any = None, *, logprobs: bool = False,
                      batch_size: int | None = None, progress: bool = False) -> list[Any]:
    """Like ``backend.generate``, with each candidate-strategy request answered by its selected candidate
    (``sequence_index`` 0). ``task`` gives self-consistency and MBR their answer extraction (default:
    the stripped text), as ``decodetune generate`` has no task."""
    from decodetune.tasks.base import Task

    task = task or Task(name="text", kind="open", metrics=["length"], splits={}, extract="strip")
    gens = generate_candidates(backend, requests, logprobs=logprobs, batch_size=batch_size, progress=progress)
    by_prompt: dict[int, list[Any]] = {}
    for g in gens:
        by_prompt.setdefault(int(g.prompt_index), []).append(g)
    out = []
    for i, r in enumerate(requests):
        seqs = sorted(by_prompt.get(i, []), key=lambda g: g.sequence_index)
        if r.config.is_candidate and seqs:
            cands = [{"text": g.text, "score": g.score, "num_tokens": g.num_tokens} for g in seqs]
            chosen = seqs[select(r.config, cands, task, r.prompt)]
            chosen.sequence_index = 0
            seqs = [chosen]
        out.extend(seqs)
    return out


def _reads_scores(cfg: DecodingConfig) -> bool:
    return cfg.strategy == "self_consistency" or (cfg.strategy == "best_of_n" and cfg.rerank in RERANKERS)


def check_selector(cfg: DecodingConfig) -> None:
    """Import the config's user utility / reranker (a :class:`UserError` naming the field if that fails)."""
    if cfg.strategy == "mbr" and cfg.mbr_utility not in MBR_UTILITIES:
        load_function(cfg.mbr_utility, "mbr_utility")
    if cfg.strategy == "best_of_n" and cfg.rerank not in RERANKERS:
        load_function(cfg.rerank, "rerank")


# ==================================================================== the row's pick
def select_row(cfg: DecodingConfig, candidates: list[Candidate], task: Any,
               prompt: Any) -> tuple[Candidate, list[Candidate]]:
    """``(the row's generation, the other sequences)``.

    For a candidate strategy, the selected candidate with ``num_tokens`` replaced by the tokens of every
    candidate (what the row cost); any other config keeps sequence 0 (the best beam, or the first sample).
    """
    if not cfg.is_candidate:
        return candidates[0], candidates[1:]
    i = select(cfg, candidates, task, prompt)
    chosen = dict(candidates[i])
    chosen["num_tokens"] = sum(_num_tokens(c) for c in candidates)
    return chosen, candidates[:i] + candidates[i + 1:]


def select(cfg: DecodingConfig, candidates: Sequence[Candidate], task: Any, prompt: Any) -> int:
    """Index of the candidate that ``cfg``'s strategy returns."""
    texts = [c["text"] for c in candidates]
    scores = [float(c.get("score", 0.0)) for c in candidates]
    if cfg.strategy == "self_consistency":
        return majority_vote([task.extract_answer(t) for t in texts], scores)
    if cfg.strategy == "mbr":
        answers = [task.extract_answer(t) for t in texts]
        return mbr_select(mbr_matrix(answers, utility_fn(cfg.mbr_utility)))
    if cfg.strategy == "best_of_n":
        if cfg.rerank == "mean_logprob":
            return best_of_n([s / max(1, _num_tokens(c)) for s, c in zip(scores, candidates, strict=True)])
        return best_of_n(_user_scores(cfg.rerank, prompt, texts))
    raise ValueError(f"strategy {cfg.strategy!r} selects no candidate")


def _num_tokens(c: Candidate) -> int:
    return int(c.get("num_tokens", len(c.get("token_ids", []))))


# ==================================================================== selections
def majority_vote(answers: Sequence[str], scores: Sequence[float]) -> int:
    """Index of the returned candidate: the majority answer's most likely one (see the module doc)."""
    keys = [" ".join(a.split()) for a in answers]  # "12 " and "12" are one answer
    voters = [i for i, k in enumerate(keys) if k] or list(range(len(keys)))
    groups: dict[str, list[int]] = {}
    for i in voters:
        groups.setdefault(keys[i], []).append(i)
    # dicts keep first-seen order and max() keeps the first of equals: the earliest answer wins a full tie
    best = max(groups.values(), key=lambda g: (len(g), sum(scores[i] for i in g)))
    return max(best, key=lambda i: scores[i])


def mbr_matrix(texts: Sequence[str], utility: Callable[[str, str], float]) -> np.ndarray:
    """``U[i, j] = utility(texts[i], texts[j])`` for i != j (NaN on the diagonal); each distinct pair once."""
    k = len(texts)
    out = np.full((k, k), np.nan)
    memo: dict[tuple[str, str], float] = {}  # sampled candidates repeat often
    for i in range(k):
        for j in range(k):
            if i != j:
                pair = (texts[i], texts[j])
                if pair not in memo:
                    memo[pair] = _finite(utility(*pair), "mbr_utility")
                out[i, j] = memo[pair]
    return out


def mbr_select(matrix: np.ndarray) -> int:
    """The row with the highest mean off-diagonal utility (the earliest on a tie)."""
    return int(np.argmax(np.nanmean(matrix, axis=1)))


def best_of_n(scores: Sequence[float]) -> int:
    """The highest score (the earliest on a tie)."""
    return int(np.argmax(np.asarray(scores, dtype=float)))


def _user_scores(spec: str, prompt: Any, texts: list[str]) -> list[float]:
    fn = load_function(spec, "rerank")
    try:
        out = fn(prompt, list(texts))
    except Exception as e:  # noqa: BLE001 - the user's code; report it in one line
        msg = str(e).splitlines()[0] if str(e) else ""
        raise UserError(f"rerank {spec!r} raised {type(e).__name__}: {msg}") from None
    if isinstance(out, str | bytes) or not isinstance(out, Sequence | np.ndarray) or len(out) != len(texts):
        raise UserError(f"rerank {spec!r} must return one number per candidate ({len(texts)})")
    return [_finite(v, f"rerank {spec!r}") for v in out]


def _finite(v: Any, who: str) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float | np.number) or not math.isfinite(float(v)):
        raise UserError(f"{who}: returned {v!r}, expected a finite number")
    return float(v)


# ==================================================================== utilities
def utility_fn(name: str) -> Callable[[str, str], float]:
    """``utility(hypothesis, reference) -> float`` for an ``mbr_utility`` value."""
    builtins: dict[str, Callable[[str, str], float]] = {
        "chrf": _chrf, "bleu": _bleu, "rouge_l": _rouge_l, "token_f1": _token_f1}
    return builtins.get(name) or load_function(name, "mbr_utility")


def _chrf(hyp: str, ref: str) -> float:
    from decodetune.metrics.overlap import _chrf as chrf_object

    return float(chrf_object().sentence_score(hyp, [ref]).score)


def _bleu(hyp: str, ref: str) -> float:
    from decodetune.metrics.overlap import _bleu_objects

    return float(_bleu_objects()[1].sentence_score(hyp, [ref]).score)  # effective order, as the metric


@lru_cache(maxsize=1)
def _rouge_l_scorer() -> Any:
    from rouge_score import rouge_scorer

    from decodetune.metrics.overlap import _UnicodeRougeTokenizer

    return rouge_scorer.RougeScorer(["rougeL"], tokenizer=_UnicodeRougeTokenizer())


def _rouge_l(hyp: str, ref: str) -> float:
    return float(_rouge_l_scorer().score(ref, hyp)["rougeL"].fmeasure)  # rouge-score: score(target, prediction)


def _token_f1(hyp: str, ref: str) -> float:
    from decodetune.metrics.answer import token_f1

    return float(token_f1(hyp, ref))
