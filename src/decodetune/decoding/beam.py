"""Beam search and stochastic beam search, vectorised over prompts with per-prompt parameters.

The algorithm is transformers' (``GenerationMixin._beam_search``, >= 4.50) step for step, so outputs are
token-identical to ``model.generate(num_beams=...)``:

* scores are log-softmax of the model logits, then the processors (penalties, n-grams, min_new_tokens)
  and, for ``beam_sample``, the distribution samplers (with ``min_keep = max(2, #EOS + 1)``, so that a
  non-EOS continuation survives, and 2 candidates per beam without any EOS id);
* each step keeps ``max(2, 1 + #EOS) * num_beams`` candidates over all beams of a prompt: the best ones
  (``beam``) or a sample without replacement from ``softmax(beam scores)`` (``beam_sample``; drawn as the
  top-k of ``probs / Exponential(1)`` noise, which has the same law as sequential multinomial draws);
* a candidate ending on EOS, a stop string or ``max_new_tokens`` is scored ``sum_logprobs / len **
  length_penalty`` and kept among the ``num_beams`` best finished hypotheses if it is one of the top
  ``num_beams`` candidates; the others continue;
* ``early_stopping``: True stops a prompt as soon as ``num_beams`` hypotheses are finished; False stops
  when the best running beam, at its current length, cannot beat the worst finished one; "never" uses the
  most favourable length (``max_new_tokens`` when ``length_penalty > 0``).

Differences from transformers, all outside its reach: ``length_penalty``, ``early_stopping`` and
``max_new_tokens`` may differ per prompt in one batch; a finished prompt leaves the batch (its KV cache
rows are dropped) instead of being carried along; a prompt also stops when every candidate of a step ends.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from decodetune.config import DecodingConfig
from decodetune.decoding.processors import RowParams, TokenState, apply_processors
from decodetune.decoding.runner import ModelRunner
from decodetune.decoding.sampler import apply_samplers, exponential_noise, make_generator, row_seed
from decodetune.decoding.stopping import FINISH_CODES, StopStrings, stop_in_hypothesis

_NEG = -1.0e9  # transformers' "never pick this" score; kept identical so that scores tie the same way


@dataclass
class BeamRequest:
    """One prompt to decode with beams."""

    prompt_index: int
    ids: list[int]
    config: DecodingConfig
    seed: int | None


@dataclass
class Hypothesis:
    """One finished beam."""

    token_ids: list[int]
    logprobs: list[float]
    score: float
    finish_reason: str
    stop_at: int | None
    decode_s: float


_S = TypeVar("_S", bound="PromptState")


@dataclass
class PromptState:
    """Tensors with one leading row per prompt of a beam batch (beam search, diverse beam search).

    :meth:`index` keeps or reorders the prompts of every field at once, so a new field cannot be
    forgotten when finished prompts leave the batch.
    """

    def index(self: _S, keep: torch.Tensor) -> _S:
        """The state of the prompts ``keep`` (a 1-d index tensor), in that order."""
        return dataclasses.replace(self, **{f.name: getattr(self, f.name)[keep] for f in dataclasses.fields(self)})


@dataclass
class BeamState(PromptState):
    """Beam search's running beams and finished hypotheses, ``(prompts, num_beams[, horizon])`` each."""

    run_tok: torch.Tensor
    run_lp: torch.Tensor
    run_score: torch.Tensor
    fin_tok: torch.Tensor
    fin_lp: torch.Tensor
    fin_score: torch.Tensor
    fin_len: torch.Tensor
    fin_reason: torch.Tensor
    fin_cut: torch.Tensor
    is_fin: torch.Tensor
    improvable: torch.Tensor

    @classmethod
    def start(cls, n_prompts: int, k: int, horizon: int, pad: int, device: torch.device) -> BeamState:
        """Before the first step: only beam 0 of each prompt is real; nothing is finished."""
        run_tok = torch.full((n_prompts, k, horizon), pad, dtype=torch.long, device=device)
        run_lp = torch.zeros((n_prompts, k, horizon), dtype=torch.float32, device=device)
        run_score = torch.zeros((n_prompts, k), dtype=torch.float32, device=device)
        run_score[:, 1:] = _NEG
        return cls(run_tok, run_lp, run_score, run_tok.clone(), run_lp.clone(),
                   torch.full((n_prompts, k), _NEG, dtype=torch.float32, device=device),
                   torch.zeros((n_prompts, k), dtype=torch.long, device=device),
                   torch.zeros((n_prompts, k), dtype=torch.long, device=device),
                   torch.full((n_prompts, k), -1, dtype=torch.long, device=device),
                   torch.zeros((n_prompts, k), dtype=torch.bool, device=device),
                   torch.ones((n_prompts, 1), dtype=torch.bool, device=device))


def prefill_beams(runner: ModelRunner, prompts: Sequence[Sequence[int]], pad: int,
                  k: int) -> tuple[torch.Tensor, Any, torch.Tensor, torch.Tensor]:
    """Prefill each prompt once, then copy its cache, logits, mask and positions to its ``k`` beams."""
    logits, cache, mask, next_pos = runner.prefill(prompts, pad)
    expand = torch.arange(len(prompts), device=runner.device).repeat_interleave(k)
    cache.reorder_cache(expand)
    return logits[expand], cache, mask[expand], next_pos[expand]


def beam_search(runner: ModelRunner, requests: Sequence[BeamRequest], *, pad_token_id: int,
                eos_token_ids: Sequence[int], decode: Callable[[list[int]], str],
                on_done: Callable[[int], None] | None = None) -> tuple[list[list[Hypothesis]], float]:
    """Decode ``requests`` (all with the same ``num_beams`` and strategy) in one batch.

    Returns, per request, its ``num_return_sequences`` best hypotheses (best first), and the prefill time.
    """
    num_beams = requests[0].config.num_beams
    do_sample = requests[0].config.is_sampling
    assert all(r.config.num_beams == num_beams and r.config.is_sampling == do_sample for r in requests)
    n_prompts, k = len(requests), num_beams
    eos_set = set(eos_token_ids)
    # transformers keeps #EOS + 1 tokens per beam, and 2 when the model has no EOS id
    min_keep = max(2, 1 + len(eos_set))
    n_keep = min_keep * k
    max_new = [r.config.max_new_tokens for r in requests]
    horizon = max(max_new)
    stops = [StopStrings(r.config.stop) for r in requests]
    device = runner.device

    t0 = time.perf_counter()
    logits, cache, mask, next_pos = prefill_beams(runner, [r.ids for r in requests], pad_token_id, k)
    prefill_s = time.perf_counter() - t0
    t_decode = time.perf_counter()
    vocab = logits.shape[1]

    params = RowParams.from_configs([r.config for r in requests for _ in range(k)], device)
    state = TokenState([r.ids for r in requests for _ in range(k)], horizon, vocab, params, eos_token_ids, device)
    eos_t = state.eos
    gens = [make_generator(row_seed(r.seed, 0), device) for r in requests] if do_sample else []

    alive = list(range(n_prompts))  # request index of each prompt still in the batch
    s = BeamState.start(n_prompts, k, horizon, pad_token_id, device)
    top_mask = torch.arange(n_keep, device=device) < k
    results: list[list[Hypothesis]] = [[] for _ in requests]

    for step in range(horizon):
        p = len(alive)
        logp = logits.log_softmax(dim=1)
        scores = apply_processors(logp, state)
        if do_sample:
            scores = apply_samplers(scores, params, min_keep=min_keep)
        acc = (scores.view(p, k, vocab) + s.run_score.unsqueeze(2)).view(p, k * vocab)
        if do_sample:
            keys = acc.softmax(dim=1) / exponential_noise((p, k * vocab), gens, device)
            cand = torch.topk(keys, n_keep, dim=1).indices
            cand_lp, order = acc.gather(1, cand).sort(dim=1, descending=True)
            cand = cand.gather(1, order)
        else:
            cand_lp, cand = torch.topk(acc, n_keep, dim=1)
        src, tok = cand // vocab, cand % vocab
        raw_lp = logp.view(p, k * vocab).gather(1, cand)
        cand_tok = s.run_tok.gather(1, src.unsqueeze(2).expand(-1, -1, horizon)).clone()
        cand_tok[:, :, step] = tok
        cand_lp_hist = s.run_lp.gather(1, src.unsqueeze(2).expand(-1, -1, horizon)).clone()
        cand_lp_hist[:, :, step] = raw_lp

        # which candidates end here, and why
        is_eos = torch.isin(tok, eos_t)
        at_length = torch.tensor([step + 1 >= max_new[r] for r in alive], device=device).unsqueeze(1)
        cand_cut = torch.full_like(cand, -1)
        is_stop = torch.zeros_like(is_eos)
        if any(stops[r] for r in alive):
            is_stop, cand_cut = _stop_hits(cand_tok[:, :, : step + 1], is_eos, alive, requests, stops, decode)
        hits = is_eos | is_stop | at_length
        reason = torch.where(is_eos, 0, torch.where(is_stop, 1, 2))

        # the best num_beams unfinished candidates keep running
        running_lp = cand_lp + hits.to(torch.float32) * _NEG
        nxt = torch.topk(running_lp, k, dim=1).indices
        s.run_score = running_lp.gather(1, nxt)
        s.run_tok = cand_tok.gather(1, nxt.unsqueeze(2).expand(-1, -1, horizon))
        s.run_lp = cand_lp_hist.gather(1, nxt.unsqueeze(2).expand(-1, -1, horizon))
        run_src = src.gather(1, nxt)

        # finished candidates among the top num_beams enter the finished set if good enough
        just_finished = hits & top_mask.unsqueeze(0)
        lp_list = [requests[r].config.length_penalty for r in alive]
        early = [requests[r].config.early_stopping for r in alive]
        denom = torch.tensor([(step + 1) ** lp for lp in lp_list], dtype=torch.float32, device=device)
        fin_cand = cand_lp / denom.unsqueeze(1)
        early_true = torch.tensor([e is True for e in early], device=device).unsqueeze(1)
        full = s.is_fin.all(dim=1, keepdim=True) & early_true
        fin_cand += full.to(torch.float32) * _NEG
        fin_cand += (~s.improvable).to(torch.float32) * _NEG
        fin_cand += (~just_finished) * _NEG
        merged = torch.topk(torch.cat([s.fin_score, fin_cand], dim=1), k, dim=1).indices
        s.fin_score = torch.cat([s.fin_score, fin_cand], dim=1).gather(1, merged)
        s.fin_tok = _take(torch.cat([s.fin_tok, cand_tok], dim=1), merged)
        s.fin_lp = _take(torch.cat([s.fin_lp, cand_lp_hist], dim=1), merged)
        s.fin_len = torch.cat([s.fin_len, torch.full_like(cand, step + 1)], dim=1).gather(1, merged)
        s.fin_reason = torch.cat([s.fin_reason, reason], dim=1).gather(1, merged)
        s.fin_cut = torch.cat([s.fin_cut, cand_cut], dim=1).gather(1, merged)
        s.is_fin = torch.cat([s.is_fin, just_finished], dim=1).gather(1, merged)

        # can a running beam still beat the worst finished hypothesis?
        best_len = [max_new[r] if (e == "never" and lp > 0) else step + 1
                    for r, e, lp in zip(alive, early, lp_list, strict=True)]
        best_denom = torch.tensor([n ** lp for n, lp in zip(best_len, lp_list, strict=True)],
                                  dtype=torch.float32, device=device).unsqueeze(1)
        best_possible = s.run_score[:, :1] / best_denom
        worst = torch.where(s.is_fin, s.fin_score.min(dim=1, keepdim=True).values, _NEG)
        s.improvable = s.improvable & (best_possible > worst).any(dim=1, keepdim=True)
        open_beams = ~(s.is_fin.all(dim=1, keepdim=True) & early_true)
        goes_on = (s.improvable & open_beams & ~hits.all(dim=1, keepdim=True)).squeeze(1).tolist()

        done = [j for j, g in enumerate(goes_on) if not g]
        if done:
            elapsed = time.perf_counter() - t_decode
            for j in done:
                results[alive[j]] = _hypotheses(requests[alive[j]].config.num_return_sequences, s.fin_tok[j],
                                                s.fin_lp[j], s.fin_score[j], s.fin_len[j], s.fin_reason[j],
                                                s.fin_cut[j], elapsed)
                if on_done is not None:
                    on_done(1)
        keep = [j for j, g in enumerate(goes_on) if g]
        if not keep:
            break
        flat_src = (torch.arange(p, device=device).unsqueeze(1) * k + run_src)
        if len(keep) < p:
            keep_t = torch.tensor(keep, device=device)
            flat_src = flat_src.index_select(0, keep_t)
            rows_keep = (keep_t.unsqueeze(1) * k + torch.arange(k, device=device)).flatten()
            mask, next_pos = mask[rows_keep], next_pos[rows_keep]
            s = s.index(keep_t)
            params = params.index([j * k + b for j in keep for b in range(k)])
            gens = [gens[j] for j in keep] if do_sample else []
            alive = [alive[j] for j in keep]
        flat_src = flat_src.flatten()
        cache.reorder_cache(flat_src)
        state.index(flat_src, params)
        tokens = s.run_tok[:, :, step].flatten()
        state.append(tokens)
        logits, mask = runner.step(tokens, mask, next_pos, cache)
        next_pos = next_pos + 1
    return results, prefill_s


def _take(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return t.gather(1, idx.unsqueeze(2).expand(-1, -1, t.shape[2]))


def _stop_hits(cand_tok: torch.Tensor, is_eos: torch.Tensor, alive: list[int], requests: Sequence[BeamRequest],
               stops: list[StopStrings], decode: Callable[[list[int]], str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Which candidates (not already ending on EOS) contain a counted stop string, and where to cut."""
    host = cand_tok.tolist()
    eos_host = is_eos.tolist()
    hit = [[False] * len(host[0]) for _ in host]
    cut = [[-1] * len(host[0]) for _ in host]
    for j, r in enumerate(alive):
        if not stops[r]:
            continue
        for c, ids in enumerate(host[j]):
            if eos_host[j][c]:
                continue
            at = stop_in_hypothesis(stops[r], decode, ids, requests[r].config.min_new_tokens)
            if at is not None:
                hit[j][c], cut[j][c] = True, at
    device = cand_tok.device
    return torch.tensor(hit, device=device), torch.tensor(cut, dtype=torch.long, device=device)


def _hypotheses(n: int, tok: torch.Tensor, lp: torch.Tensor, score: torch.Tensor, length: torch.Tensor,
                reason: torch.Tensor, cut: torch.Tensor, elapsed: float) -> list[Hypothesis]:
    out = []
    lengths, reasons, cuts, scores = length.tolist(), reason.tolist(), cut.tolist(), score.tolist()
    for b in range(n):
        n_tok = lengths[b]
        out.append(Hypothesis(tok[b, :n_tok].tolist(), lp[b, :n_tok].tolist(), scores[b],
                              FINISH_CODES[reasons[b]], cuts[b] if cuts[b] >= 0 else None, elapsed))
    return out
