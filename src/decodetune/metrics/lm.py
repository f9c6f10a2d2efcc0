"""Metrics that need the model or the generation's own statistics: gen_ppl, length, tokens,
tokens_per_s.

``gen_ppl`` is the perplexity of each generation given its prompt under a scorer model (by default the
generating model, whose token ids are then reused as generated; another scorer re-tokenises the prompt
and the generated text). The row score is the row's perplexity; the aggregate is the corpus perplexity
exp(total NLL / total tokens), which a bootstrap recomputes from per-row (NLL, tokens) sums.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from decodetune.errors import UserError
from decodetune.metrics.base import Metric, MetricInput, MetricScores, register

#: Tokens per forward pass when scoring (bounds the logits tensor: tokens x vocab floats).
SCORE_TOKEN_BUDGET = 2048


def sequence_nll(scorer: Any, prompts: list[list[int]], continuations: list[list[int]]) -> np.ndarray:
    """Summed negative log-likelihood (nats) of each continuation given its prompt under ``scorer``.

    ``scorer`` is a :class:`~decodetune.models.handle.LoadedModel`. Rows are right-padded and batched by
    a token budget; an empty continuation has NLL 0.
    """
    import torch

    model = scorer.model
    pad = scorer.tokenizer.pad_token_id or 0
    out = np.zeros(len(prompts))
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]) + len(continuations[i]))
    batch: list[int] = []

    def flush(idx: list[int]) -> None:
        seqs = [list(prompts[i]) + list(continuations[i]) for i in idx]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for r, s in enumerate(seqs):
            ids[r, :len(s)] = torch.tensor(s, dtype=torch.long)
            mask[r, :len(s)] = 1
        with torch.no_grad():
            logits = model(input_ids=ids.to(scorer.device), attention_mask=mask.to(scorer.device)).logits
        logp = torch.log_softmax(logits.float(), dim=-1)
        for r, i in enumerate(idx):
            p, c = len(prompts[i]), len(continuations[i])
            if c == 0:
                continue
            # Position t predicts token t+1: continuation tokens sit at p..p+c-1, predicted from p-1..p+c-2.
            pos = torch.arange(p - 1, p + c - 1)
            tgt = ids[r, p:p + c].to(logp.device)
            out[i] = -float(logp[r, pos.to(logp.device), tgt].sum())

    for i in order:
        n_tok = len(prompts[i]) + len(continuations[i])
        if batch and (len(batch) + 1) * max(n_tok, 1) > SCORE_TOKEN_BUDGET:
            flush(batch)
            batch = []
        batch.append(i)
    if batch:
        flush(batch)
    return out


def gen_ppl(inp: MetricInput) -> MetricScores:
    """Perplexity of each generation under the scorer (corpus aggregate = exp(sum NLL / sum tokens))."""
    scorer = inp.get_scorer()
    if scorer is None:
        raise UserError("metric 'gen_ppl' needs a scorer model (evaluate() passes the model itself by default)")
    same = (inp.model_name is not None and getattr(scorer, "name", None) == inp.model_name
            and inp.token_ids is not None and inp.prompt_token_ids is not None)
    if same:
        prompts = [list(p) for p in inp.prompt_token_ids or []]
        conts = [list(t) for t in inp.token_ids or []]
    else:
        if inp.prompts is None:
            raise UserError("metric 'gen_ppl' with another scorer needs the prompts")
        prompts = [scorer.encode(p) for p in inp.prompts]
        conts = [list(scorer.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in inp.texts or []]
    nll = sequence_nll(scorer, prompts, conts)
    ntok = np.array([len(c) for c in conts], dtype=float)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        per_row = np.where(ntok > 0, np.exp(nll / np.where(ntok > 0, ntok, 1)), np.nan)

    def combine(s: np.ndarray) -> float:
        return float(math.exp(s[0] / s[1])) if s[1] > 0 else math.nan

    return MetricScores(per_row=per_row, stats=np.stack([nll, ntok], axis=1), combine=combine)


def _lengths(inp: MetricInput) -> np.ndarray:
    if inp.token_ids is not None:
        return np.array([len(t) for t in inp.token_ids], dtype=float)
    return np.array([len(t.split()) for t in inp.texts or []], dtype=float)


def length(inp: MetricInput) -> MetricScores:
    """Generated tokens per row (model tokens when known, else whitespace words)."""
    return MetricScores(per_row=_lengths(inp))


def tokens(inp: MetricInput) -> MetricScores:
    """Generated tokens per row with every candidate counted (``tune --objective tokens:min``: the cost
    axis of a quality-vs-cost Pareto front); without counts, the returned sequence's length."""
    if inp.num_tokens is None:
        return length(inp)
    return MetricScores(per_row=np.array(inp.num_tokens, dtype=float))


def tokens_per_s(inp: MetricInput) -> MetricScores:
    """Generated tokens per second of generation time (aggregate = total tokens / total seconds)."""
    if inp.gen_seconds is None:
        raise UserError("metric 'tokens_per_s' needs generation timings")
    toks = _lengths(inp)
    secs = np.array(inp.gen_seconds, dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        per_row = np.where(secs > 0, toks / np.where(secs > 0, secs, 1), np.nan)

    def combine(s: np.ndarray) -> float:
        return float(s[0] / s[1]) if s[1] > 0 else math.nan

    return MetricScores(per_row=per_row, stats=np.stack([toks, secs], axis=1), combine=combine)


register(Metric("gen_ppl", gen_ppl, "none", corpus=True,
                description="perplexity of the generations under a scorer model (default: the model)"))
register(Metric("length", length, "none", description="generated tokens per item"))
register(Metric("tokens", tokens, "min", description="generated tokens per item, every candidate counted"))
register(Metric("tokens_per_s", tokens_per_s, "max", corpus=True,
                description="generated tokens per second of generation time"))
