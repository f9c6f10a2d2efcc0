"""Diverse (group) beam search (Vijayakumar et al. 2018), step for step transformers v4's ``_group_beam_search``.

The ``num_beams`` beams of a prompt form ``num_beam_groups`` groups of ``g = num_beams / num_beam_groups``.
Each step the groups run in order on the same forward pass: group ``i``'s scores are the log-softmax of
the logits minus ``diversity_penalty`` times how often each token was just chosen by groups ``0..i-1`` of
the same prompt (``HammingDiversityLogitsProcessor``, which runs before the other processors), then the
processors; each group then does one step of ordinary beam search on its own ``g`` beams with its own
finished-hypothesis list (transformers' ``BeamSearchScorer`` / ``BeamHypotheses`` of 4.55, whose rules
this module copies, Python floats included):

* the group's best ``max(2, 1 + #EOS) * g`` candidates, by accumulated score; one ending on EOS (or on a
  stop string, which transformers' beam scorer does not have) enters the group's hypotheses
  (``score / len ** length_penalty``) only if it ranks among the first ``g``; the first ``g`` others run on;
* a group is done when it holds ``g`` hypotheses and ``early_stopping`` says so (True: at once; False: the
  best candidate score at the current length cannot beat the worst hypothesis; "never": at the most
  favourable length); a done group's beams then emit the pad token (which still counts for the later
  groups' diversity penalty, as in transformers);
* at ``max_new_tokens`` the running beams of groups that are not done join their hypotheses;
* the returned sequences are the ``num_return_sequences`` best hypotheses over all groups.

Beyond transformers: stop strings end candidates; ``max_new_tokens``, ``length_penalty``,
``early_stopping`` and ``diversity_penalty`` may differ per prompt of a batch; a prompt whose groups are
all done leaves the batch. Returned ids end with the EOS id that was generated (transformers writes
``eos_token_id[0]`` in its place).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from decodetune.decoding.beam import _NEG, BeamRequest, Hypothesis, PromptState, prefill_beams
from decodetune.decoding.processors import PROCESSORS, RowParams, TokenState, apply_processors
from decodetune.decoding.runner import ModelRunner
from decodetune.decoding.stopping import StopStrings, stop_in_hypothesis

#: One finished hypothesis before selection: (token ids, raw logprobs, finish reason, stop-string cut).
_Item = tuple[list[int], list[float], str, int | None]


class GroupHypotheses:
    """transformers' ``BeamHypotheses``: the ``size`` best finished hypotheses of one group of one prompt."""

    def __init__(self, size: int, length_penalty: float, early_stopping: bool | str, max_new_tokens: int):
        self.size, self.length_penalty, self.early_stopping = size, length_penalty, early_stopping
        self.max_new_tokens = max_new_tokens
        self.beams: list[tuple[float, _Item]] = []
        self.worst_score = 1e9

    def add(self, sum_logprobs: float, length: int, item: _Item) -> None:
        """Keep the hypothesis if it is among the best ``size`` (the worst one goes; ties: the older)."""
        score = sum_logprobs / (length ** self.length_penalty)
        if len(self.beams) < self.size or score > self.worst_score:
            self.beams.append((score, item))
            if len(self.beams) > self.size:
                ranked = sorted([(s, i) for i, (s, _) in enumerate(self.beams)])
                del self.beams[ranked[0][1]]
                self.worst_score = ranked[1][0]
            else:
                self.worst_score = min(score, self.worst_score)

    def is_done(self, best_sum_logprobs: float, length: int) -> bool:
        """Whether no running beam can still enter (transformers' three ``early_stopping`` rules)."""
        if len(self.beams) < self.size:
            return False
        if self.early_stopping is True:
            return True
        if self.early_stopping == "never" and self.length_penalty > 0.0:
            length = self.max_new_tokens  # the longest, hence (for lp > 0) most favourable, length
        return self.worst_score >= best_sum_logprobs / length ** self.length_penalty


@dataclass
class DiverseState(PromptState):
    """Running beams, ``(prompts, num_beams[, horizon])``: tokens, raw logprobs, accumulated scores."""

    run_tok: torch.Tensor
    run_lp: torch.Tensor
    run_score: torch.Tensor


class _Prompt:
    """One prompt's groups: their hypotheses and done flags, and what it needs to check its candidates."""

    def __init__(self, request: BeamRequest, n_groups: int, group_size: int, decode: Callable[[list[int]], str]):
        cfg = request.config
        self.config, self.decode, self.stops = cfg, decode, StopStrings(cfg.stop)
        self.groups = [GroupHypotheses(group_size, cfg.length_penalty, cfg.early_stopping, cfg.max_new_tokens)
                       for _ in range(n_groups)]
        self.done = [False] * n_groups

    def stop_cut(self, ids: list[int]) -> int | None:
        """Where the text is cut if ``ids`` completes a stop string."""
        return stop_in_hypothesis(self.stops, self.decode, ids, self.config.min_new_tokens) if self.stops else None

    def best(self, elapsed: float) -> list[Hypothesis]:
        """The ``num_return_sequences`` best hypotheses over all groups (transformers' sort-then-pop order)."""
        ranked = sorted([b for g in self.groups for b in g.beams], key=lambda b: b[0])
        out = []
        for _ in range(self.config.num_return_sequences):
            score, (ids, lps, reason, cut) = ranked.pop()
            out.append(Hypothesis(ids, lps, score, reason, cut, elapsed))
        return out


def diverse_beam_search(runner: ModelRunner, requests: Sequence[BeamRequest], *, pad_token_id: int,
                        eos_token_ids: Sequence[int], decode: Callable[[list[int]], str],
                        on_done: Callable[[int], None] | None = None) -> tuple[list[list[Hypothesis]], float]:
    """Decode ``requests`` (same ``num_beams`` and ``num_beam_groups``) in one batch.

    Returns, per request, its ``num_return_sequences`` best hypotheses (best first), and the prefill time.
    """
    cfg0 = requests[0].config
    k, n_groups = cfg0.num_beams, cfg0.num_beam_groups
    assert all(r.config.num_beams == k and r.config.num_beam_groups == n_groups for r in requests)
    gs = k // n_groups
    horizon = max(r.config.max_new_tokens for r in requests)
    device = runner.device
    t0 = time.perf_counter()
    logits, cache, mask, next_pos = prefill_beams(runner, [r.ids for r in requests], pad_token_id, k)
    prefill_s = time.perf_counter() - t0
    t_decode = time.perf_counter()
    params = RowParams.from_configs([r.config for r in requests for _ in range(k)], device)
    state = TokenState([r.ids for r in requests for _ in range(k)], horizon, logits.shape[1], params,
                       eos_token_ids, device)
    run_score = torch.full((len(requests), k), _NEG, dtype=torch.float32, device=device)
    run_score[:, ::gs] = 0  # the first beam of each group is real, so a group's beams start apart
    s = DiverseState(torch.full((len(requests), k, horizon), pad_token_id, dtype=torch.long, device=device),
                     torch.zeros((len(requests), k, horizon), dtype=torch.float32, device=device), run_score)
    step_ctx = _StepContext(gs, n_groups, pad_token_id, set(eos_token_ids), max(2, 1 + len(set(eos_token_ids))))
    prompts = [_Prompt(r, n_groups, gs, decode) for r in requests]
    alive = list(range(len(requests)))
    penalty = torch.tensor([r.config.diversity_penalty for r in requests], dtype=torch.float32, device=device)
    results: list[list[Hypothesis]] = [[] for _ in requests]
    for step in range(horizon):
        s, src, tokens = _step(step_ctx, s, logits, state, [prompts[r] for r in alive], penalty, step)
        keep = []
        for j, r in enumerate(alive):
            if _finish_if_over(prompts[r], s, j, step, gs):
                results[r] = prompts[r].best(time.perf_counter() - t_decode)
                if on_done is not None:
                    on_done(1)
            else:
                keep.append(j)
        if not keep:
            break
        p = len(alive)
        flat_src = torch.arange(p, device=device).unsqueeze(1) * k + src
        if len(keep) < p:
            keep_t = torch.tensor(keep, device=device)
            flat_src, tokens, s = flat_src[keep_t], tokens[keep_t], s.index(keep_t)
            rows_keep = (keep_t.unsqueeze(1) * k + torch.arange(k, device=device)).flatten()
            mask, next_pos, penalty = mask[rows_keep], next_pos[rows_keep], penalty[keep_t]
            params = params.index([j * k + b for j in keep for b in range(k)])
            alive = [alive[j] for j in keep]
        flat_src = flat_src.flatten()
        cache.reorder_cache(flat_src)
        state.index(flat_src, params)
        state.append(tokens.flatten())
        logits, mask = runner.step(tokens.flatten(), mask, next_pos, cache)
        next_pos = next_pos + 1
    return results, prefill_s


@dataclass
class _StepContext:
    group_size: int
    n_groups: int
    pad: int
    eos: set[int]
    keep_factor: int  # candidates per beam: max(2, 1 + #EOS), as transformers


def _step(ctx: _StepContext, s: DiverseState, logits: torch.Tensor, state: TokenState, prompts: list[_Prompt],
          penalty: torch.Tensor, step: int) -> tuple[DiverseState, torch.Tensor, torch.Tensor]:
    """Every group of every prompt, in group order; the new state, each beam's source beam and token."""
    p, gs = len(prompts), ctx.group_size
    k = gs * ctx.n_groups
    logp = logits.log_softmax(dim=1)
    vocab = logp.shape[1]
    logp3 = logp.view(p, k, vocab)
    counts = torch.zeros((p, vocab), dtype=torch.float32, device=logp.device)
    any_processor = any(proc.active(state) for proc in PROCESSORS)
    src = torch.zeros((p, k), dtype=torch.long)
    tok = torch.zeros((p, k), dtype=torch.long)
    score = torch.zeros((p, k), dtype=torch.float32)
    raw = torch.zeros((p, k), dtype=torch.float32)
    for g in range(ctx.n_groups):
        sl = slice(g * gs, (g + 1) * gs)
        scores = logp3[:, sl]
        if g > 0:  # Hamming diversity: the tokens the earlier groups just chose
            scores = scores - penalty.view(p, 1, 1) * counts.unsqueeze(1)
        if any_processor:  # the processors see the whole batch; only this group's rows are read back
            full = logp3.clone()
            full[:, sl] = scores
            scores = apply_processors(full.view(p * k, vocab), state).view(p, k, vocab)[:, sl]
        acc = (scores + s.run_score[:, sl].unsqueeze(2)).reshape(p, gs * vocab)
        cand_score, cand = torch.topk(acc, ctx.keep_factor * gs, dim=1, largest=True, sorted=True)
        cand_raw = logp3[:, sl].reshape(p, gs * vocab).gather(1, cand)
        host = (cand_score.tolist(), (cand // vocab).tolist(), (cand % vocab).tolist(), cand_raw.tolist())
        for j, prompt in enumerate(prompts):
            beams = _process_group(ctx, prompt, g, s, j, step, *(h[j] for h in host))
            for b, (bsrc, btok, bscore, braw) in enumerate(beams):
                src[j, g * gs + b], tok[j, g * gs + b] = g * gs + bsrc, btok
                score[j, g * gs + b], raw[j, g * gs + b] = bscore, braw
        group_tok = tok[:, sl].to(logp.device)
        counts.scatter_add_(1, group_tok, torch.ones_like(group_tok, dtype=counts.dtype))
    device = s.run_tok.device
    src, tok = src.to(device), tok.to(device)
    run_tok = s.run_tok.gather(1, src.unsqueeze(2).expand(-1, -1, s.run_tok.shape[2])).clone()
    run_lp = s.run_lp.gather(1, src.unsqueeze(2).expand(-1, -1, s.run_lp.shape[2])).clone()
    run_tok[:, :, step], run_lp[:, :, step] = tok, raw.to(device)
    return DiverseState(run_tok, run_lp, score.to(device)), src, tok


def _process_group(ctx: _StepContext, prompt: _Prompt, g: int, s: DiverseState, j: int, step: int,
                   scores: list[float], srcs: list[int], toks: list[int],
                   raws: list[float]) -> list[tuple[int, int, float, float]]:
    """transformers' ``BeamSearchScorer.process`` for one group of one prompt: the ``g`` beams that run on,
    as (source beam within the group, token, accumulated score, raw logprob)."""
    gs = ctx.group_size
    if prompt.done[g]:
        return [(0, ctx.pad, 0.0, 0.0)] * gs
    hyps = prompt.groups[g]
    beams: list[tuple[int, int, float, float]] = []
    for rank, (sc, sr, tk, rw) in enumerate(zip(scores, srcs, toks, raws, strict=True)):
        ids = None
        cut = None
        if tk not in ctx.eos and prompt.stops:
            ids = s.run_tok[j, g * gs + sr, :step].tolist() + [tk]
            cut = prompt.stop_cut(ids)
        if tk in ctx.eos or cut is not None:
            if rank >= gs:  # only the group's top candidates may finish
                continue
            ids = ids or s.run_tok[j, g * gs + sr, :step].tolist() + [tk]
            lps = s.run_lp[j, g * gs + sr, :step].tolist() + [rw]
            hyps.add(sc, step + 1, (ids, lps, "eos" if tk in ctx.eos else "stop", cut))
        else:
            beams.append((sr, tk, sc, rw))
        if len(beams) == gs:
            break
    # transformers raises when fewer than g candidates run on (only stop strings can cause it here)
    beams += [(0, ctx.pad, _NEG, 0.0)] * (gs - len(beams))
    prompt.done[g] = hyps.is_done(max(scores), step + 1)
    return beams


def _finish_if_over(prompt: _Prompt, s: DiverseState, j: int, step: int, gs: int) -> bool:
    """True when the prompt is over: every group done, or ``max_new_tokens`` reached (then the running
    beams of the groups not done join their hypotheses, as transformers' ``finalize``)."""
    if all(prompt.done):
        return True
    if step + 1 < prompt.config.max_new_tokens:
        return False
    for g, hyps in enumerate(prompt.groups):
        if prompt.done[g]:
            continue
        for b in range(g * gs, (g + 1) * gs):
            score = float(s.run_score[j, b])
            if score > _NEG / 2:  # a filler beam (see _process_group) is not a hypothesis
                hyps.add(score, step + 1, (s.run_tok[j, b, :step + 1].tolist(), s.run_lp[j, b, :step + 1].tolist(),
                                           "length", None))
    return True
