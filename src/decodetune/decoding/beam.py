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

Token controls (vLLM's, as in the flat loop): with ``ignore_eos`` an EOS candidate is an ordinary token;
a ``stop_token_ids`` candidate ends like EOS with ``finish_reason="stop"`` (kept in the ids, not in the text;
banned before ``min_new_tokens``); these ending ids count in ``max(2, 1 + #ending ids)`` as EOS does, so
prompts whose count differs run as separate batches. ``top_logprobs = N`` keeps, per generated token, the N
most likely raw logprobs of the beam's row, reordered with the beams like the logprobs.

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
    stop_token: bool = False  # ended on one of its stop_token_ids (kept in the ids, left out of the text)
    top_logprobs: list[dict[int, float]] | None = None


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
    # top_logprobs history, (prompts, num_beams, horizon, N); N = 0 when no request asks for them
    run_top_v: torch.Tensor
    run_top_i: torch.Tensor
    fin_top_v: torch.Tensor
    fin_top_i: torch.Tensor
    # per prompt: its EOS ids (none with ignore_eos) and its stop_token_ids, padded with -1
    eos_ids: torch.Tensor
    stop_ids: torch.Tensor

    @classmethod
    def start(cls, requests: Sequence[BeamRequest], k: int, horizon: int, pad: int, eos: Sequence[int],
              device: torch.device) -> BeamState:
        """Before the first step: only beam 0 of each prompt is real; nothing is finished."""
        n_prompts = len(requests)
        run_tok = torch.full((n_prompts, k, horizon), pad, dtype=torch.long, device=device)
        run_lp = torch.zeros((n_prompts, k, horizon), dtype=torch.float32, device=device)
        run_score = torch.zeros((n_prompts, k), dtype=torch.float32, device=device)
        run_score[:, 1:] = _NEG
        top_n = max(r.config.top_logprobs for r in requests)
        top_v = torch.zeros((n_prompts, k, horizon, top_n), dtype=torch.float32, device=device)
        top_i = torch.zeros((n_prompts, k, horizon, top_n), dtype=torch.long, device=device)
        eos_ids = _padded([[] if r.config.ignore_eos else list(eos) for r in requests], device)
        stop_ids = _padded([list(r.config.stop_token_ids) for r in requests], device)
        return cls(run_tok, run_lp, run_score, run_tok.clone(), run_lp.clone(),
                   torch.full((n_prompts, k), _NEG, dtype=torch.float32, device=device),
                   torch.zeros((n_prompts, k), dtype=torch.long, device=device),
                   torch.zeros((n_prompts, k), dtype=torch.long, device=device),
                   torch.full((n_prompts, k), -1, dtype=torch.long, device=device),
                   torch.zeros((n_prompts, k), dtype=torch.bool, device=device),
                   torch.ones((n_prompts, 1), dtype=torch.bool, device=device),
                   top_v, top_i, top_v.clone(), top_i.clone(), eos_ids, stop_ids)


def _padded(rows: list[list[int]], device: torch.device) -> torch.Tensor:
    """``(len(rows), longest)`` long, padded with -1 (never a token id); at least one column."""
    width = max(1, max(len(r) for r in rows))
    return torch.tensor([r + [-1] * (width - len(r)) for r in rows], dtype=torch.long, device=device)


def ending_ids(config: DecodingConfig, eos_token_ids: Sequence[int]) -> set[int]:
    """The ids that end a hypothesis of this config: EOS (unless ``ignore_eos``) and its stop_token_ids."""
    return (set() if config.ignore_eos else set(eos_token_ids)) | set(config.stop_token_ids)


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
    """Decode ``requests`` (all with the same ``num_beams`` and strategy).

    Returns, per request, its ``num_return_sequences`` best hypotheses (best first), and the prefill time.
    One batch per candidate count ``max(2, 1 + #ending ids)``, so that a request's beams (and beam_sample's
    draws) never depend on the stop_token_ids / ignore_eos of the requests batched with it.
    """
    groups: dict[int, list[int]] = {}
    for i, r in enumerate(requests):
        groups.setdefault(max(2, 1 + len(ending_ids(r.config, eos_token_ids))), []).append(i)
    results: list[list[Hypothesis]] = [[] for _ in requests]
    prefill_s = 0.0
    for min_keep, members in groups.items():
        part, seconds = _beam_batch(runner, [requests[i] for i in members], min_keep, pad_token_id=pad_token_id,
                                    eos_token_ids=eos_token_ids, decode=decode, on_done=on_done)
        prefill_s += seconds
        for i, hyps in zip(members, part, strict=True):
            results[i] = hyps
    return results, prefill_s


def _beam_batch(runner: ModelRunner, requests: Sequence[BeamRequest], min_keep: int, *, pad_token_id: int,
                eos_token_ids: Sequence[int], decode: Callable[[list[int]], str],
                on_done: Callable[[int], None] | None) -> tuple[list[list[Hypothesis]], float]:
    """One batch of :func:`beam_search`; ``min_keep`` candidates per beam (transformers: #EOS + 1, at least 2)."""
    num_beams = requests[0].config.num_beams
    do_sample = requests[0].config.is_sampling
    assert all(r.config.num_beams == num_beams and r.config.is_sampling == do_sample for r in requests)
    n_prompts, k = len(requests), num_beams
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
    gens = [make_generator(row_seed(r.seed, 0), device) for r in requests] if do_sample else []

    alive = list(range(n_prompts))  # request index of each prompt still in the batch
    s = BeamState.start(requests, k, horizon, pad_token_id, eos_token_ids, device)
    top_n = s.run_top_v.shape[3]
    top_mask = torch.arange(n_keep, device=device) < k
    results: list[list[Hypothesis]] = [[] for _ in requests]

    for step in range(horizon):
        p = len(alive)
        logp = logits.log_softmax(dim=1)
        scores = apply_processors(logp, state)  # MinNewTokens bans EOS and stop_token_ids
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
        cand_top_v, cand_top_i = _top_history(s, logp, src, step, top_n)

        # which candidates end here, and why
        is_eos = _matches(tok, s.eos_ids)
        too_short = torch.tensor([step + 1 <= requests[r].config.min_new_tokens for r in alive], device=device)
        is_stop_tok = _matches(tok, s.stop_ids) & ~is_eos & ~too_short.unsqueeze(1)
        is_eos = is_eos | is_stop_tok  # a stop token ends the candidate as EOS does
        at_length = torch.tensor([step + 1 >= max_new[r] for r in alive], device=device).unsqueeze(1)
        cand_cut = torch.full_like(cand, -1)
        is_stop = torch.zeros_like(is_eos)
        if any(stops[r] for r in alive):
            is_stop, cand_cut = _stop_hits(cand_tok[:, :, : step + 1], is_eos, alive, requests, stops, decode)
        hits = is_eos | is_stop | at_length
        reason = torch.where(is_stop_tok, _STOP_TOKEN, torch.where(is_eos, 0, torch.where(is_stop, 1, 2)))

        # the best num_beams unfinished candidates keep running
        running_lp = cand_lp + hits.to(torch.float32) * _NEG
        nxt = torch.topk(running_lp, k, dim=1).indices
        s.run_score = running_lp.gather(1, nxt)
        s.run_tok = cand_tok.gather(1, nxt.unsqueeze(2).expand(-1, -1, horizon))
        s.run_lp = cand_lp_hist.gather(1, nxt.unsqueeze(2).expand(-1, -1, horizon))
        s.run_top_v, s.run_top_i = _take(cand_top_v, nxt), _take(cand_top_i, nxt)
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
        s.fin_top_v = _take(torch.cat([s.fin_top_v, cand_top_v], dim=1), merged)
        s.fin_top_i = _take(torch.cat([s.fin_top_i, cand_top_i], dim=1), merged)
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
                results[alive[j]] = _hypotheses(requests[alive[j]].config, s, j, elapsed)
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


#: reason code of a hypothesis that ended on one of its stop_token_ids (after stopping.FINISH_CODES' 0, 1, 2)
_STOP_TOKEN = 3


def _take(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows ``idx`` ``(prompts, n)`` of ``t`` ``(prompts, beams, ...)`` along dim 1, trailing dims whole."""
    view = idx.view(*idx.shape, *([1] * (t.dim() - 2)))
    return t.gather(1, view.expand(-1, -1, *t.shape[2:]))


def _matches(tok: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``(prompts, n)`` bool: whether each candidate token is one of its prompt's ``ids`` ``(prompts, m)``."""
    return (tok.unsqueeze(2) == ids.unsqueeze(1)).any(dim=2)


def _top_history(s: BeamState, logp: torch.Tensor, src: torch.Tensor, step: int,
                 top_n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The candidates' top-logprob histories: their source beam's, plus this step's top ``top_n`` of its row."""
    if top_n == 0:  # nothing to record: the (.., 0) histories are gathered for free
        return _take(s.run_top_v, src), _take(s.run_top_i, src)
    p, k = s.run_score.shape
    top = logp.topk(top_n, dim=1)
    pick = src.unsqueeze(2).expand(-1, -1, top_n)
    cand_v, cand_i = _take(s.run_top_v, src).clone(), _take(s.run_top_i, src).clone()
    cand_v[:, :, step] = top.values.view(p, k, top_n).gather(1, pick)
    cand_i[:, :, step] = top.indices.view(p, k, top_n).gather(1, pick)
    return cand_v, cand_i


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


def _hypotheses(config: DecodingConfig, s: BeamState, j: int, elapsed: float) -> list[Hypothesis]:
    """The ``num_return_sequences`` best finished hypotheses of prompt ``j`` of the batch."""
    out = []
    n_top = config.top_logprobs
    lengths, reasons, cuts, scores = s.fin_len[j].tolist(), s.fin_reason[j].tolist(), s.fin_cut[j].tolist(), \
        s.fin_score[j].tolist()
    for b in range(config.num_return_sequences):
        n_tok, code = lengths[b], reasons[b]
        top = None
        if n_top:
            values, ids = s.fin_top_v[j, b, :n_tok, :n_top].tolist(), s.fin_top_i[j, b, :n_tok, :n_top].tolist()
            top = [dict(zip(i, v, strict=True)) for v, i in zip(values, ids, strict=True)]
        reason = "stop" if code == _STOP_TOKEN else FINISH_CODES[code]
        out.append(Hypothesis(s.fin_tok[j, b, :n_tok].tolist(), s.fin_lp[j, b, :n_tok].tolist(), scores[b], reason,
                              cuts[b] if cuts[b] >= 0 else None, elapsed, code == _STOP_TOKEN, top))
    return out
