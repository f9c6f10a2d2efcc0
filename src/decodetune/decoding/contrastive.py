"""Contrastive search (Su et al. 2022), step for step transformers v4's ``_contrastive_search``.

Each step, for every row: the processors (penalties, n-grams, min_new_tokens) run on the raw logits, the
``top_k`` most likely tokens of their softmax are the candidates, and the model runs on all of them at
once (the row's KV cache copied to its ``top_k`` candidates, as transformers' non-``low_memory`` path) to
get each candidate's last-layer hidden state ``h_v``. The chosen token maximises

    (1 - penalty_alpha) * p(v) - penalty_alpha * max_j cos(h_v, h_j)

over the hidden states ``h_j`` of every earlier position (prompt and generated, padding masked out).
The candidate forward pass already holds the chosen token's logits and cache, so one step costs one
forward over ``rows * top_k`` single tokens. The cosine is computed with transformers' own shapes and
operations (``_ranking_fast``) so that near-ties break the same way.

Unlike transformers v4, a left-padded row is decoded as it would be alone: there the padding positions'
zero hidden states give NaN cosines and the whole padded row silently decodes greedily (see
tests/data/make_reference_strategies.py). Beyond transformers: ``penalty_alpha``, the processors, stop
strings and ``max_new_tokens`` may differ per row of a batch (``top_k`` may not: the engine batches rows
by ``top_k``); a finished row leaves the batch. vLLM's token controls as in the flat loop: ``ignore_eos``,
``stop_token_ids`` (end with ``"stop"``, kept in the ids, not in the text; banned before ``min_new_tokens`` by
the processors) and ``top_logprobs`` (the raw distribution the token was chosen from).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from decodetune.config import DecodingConfig
from decodetune.decoding.beam import Hypothesis
from decodetune.decoding.processors import RowParams, TokenState, apply_processors
from decodetune.decoding.runner import ModelRunner, left_pad
from decodetune.decoding.stopping import RowStopper, StopStrings


@dataclass
class ContrastiveRequest:
    """One prompt to decode with contrastive search."""

    prompt_index: int
    ids: list[int]
    config: DecodingConfig
    seed: int | None = None  # unused (nothing is random); reported back like the other strategies'


def forward_hidden(runner: ModelRunner, input_ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
                   cache: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The runner's forward pass that also returns the last layer's hidden states ``(rows, tokens, hidden)``.

    transformers' ``hidden_states[-1]`` is the final-norm output, which is what contrastive search compares.
    """
    kwargs: dict[str, Any] = {runner.cache_kwarg: cache, "use_cache": True, "output_hidden_states": True}
    if runner.keep_kwarg is not None:
        kwargs[runner.keep_kwarg] = 1
    if runner.takes_positions:
        kwargs["position_ids"] = positions
    out = runner.model(input_ids=input_ids, attention_mask=mask, **kwargs)
    return out.logits[:, -1, :].float(), out.hidden_states[-1]


def _prefill(runner: ModelRunner, prompts: Sequence[Sequence[int]],
             pad: int) -> tuple[torch.Tensor, torch.Tensor, Any, torch.Tensor]:
    """Left-padded prefill as :meth:`ModelRunner.prefill`, keeping every position's hidden state."""
    ids, mask, positions = left_pad(prompts, pad, runner.device)
    cache = runner.new_cache()
    logits, hidden = forward_hidden(runner, ids, mask, positions, cache)
    return logits, hidden, cache, mask


def degeneration_choice(context: torch.Tensor, context_mask: torch.Tensor, candidates: torch.Tensor,
                        probs: torch.Tensor, one_minus_alpha: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Index of the best of ``k`` candidates per row (transformers' ``_ranking_fast``, same operations).

    ``context`` ``(rows, S, H)`` with ``context_mask`` ``(rows, S)`` (0 = padding), ``candidates``
    ``(rows * k, 1, H)``, ``probs`` ``(rows, k)``, the alphas ``(rows, 1)``.
    """
    rows, k = probs.shape
    norm_ctx = context / context.norm(dim=2, keepdim=True)
    norm_ctx = norm_ctx.repeat_interleave(k, dim=0)  # (rows * k, S, H), as transformers repeats the context
    norm_next = candidates / candidates.norm(dim=2, keepdim=True)
    cosine = torch.matmul(norm_ctx, norm_next.transpose(1, 2)).squeeze(-1)  # (rows * k, S)
    # transformers adds finfo.min at padding; a padding position's hidden state is a zero vector there, whose
    # 0/0 cosine is NaN and would make every candidate NaN (the row would fall back to greedy), so the
    # padding is overwritten instead; at real positions both leave the cosine as it is
    pad = context_mask.repeat_interleave(k, dim=0) == 0
    penalty = cosine.masked_fill(pad, torch.finfo(cosine.dtype).min).max(dim=-1).values.view(rows, k)
    score = one_minus_alpha * probs - alpha * penalty.to(probs.dtype)
    return score.max(dim=-1).indices


def contrastive_search(runner: ModelRunner, requests: Sequence[ContrastiveRequest], *, pad_token_id: int,
                       eos_token_ids: Sequence[int], decode: Callable[[list[int]], str],
                       on_done: Callable[[int], None] | None = None) -> tuple[list[list[Hypothesis]], float]:
    """Decode ``requests`` (all with the same ``top_k``) in one batch; one hypothesis per request."""
    top_k = requests[0].config.top_k
    assert all(r.config.top_k == top_k for r in requests)
    device = runner.device
    t0 = time.perf_counter()
    logits, hidden, cache, mask = _prefill(runner, [r.ids for r in requests], pad_token_id)
    prefill_s = time.perf_counter() - t0
    t_decode = time.perf_counter()
    loop = _Loop(runner, requests, logits, hidden, cache, mask, eos_token_ids, decode, device)
    k = min(top_k, logits.shape[1])
    results: list[list[Hypothesis]] = [[] for _ in requests]
    while loop.alive:
        tokens, raw_lp, top = loop.choose(k)
        for j in loop.record(tokens, raw_lp, top):
            b = loop.alive[j]
            stop_token = loop.reason[b] == "stop" and loop.cut[b] is None
            results[b] = [Hypothesis(loop.out_tok[b], loop.out_lp[b], sum(loop.out_lp[b]), loop.reason[b],
                                     loop.cut[b], time.perf_counter() - t_decode, stop_token, loop.out_top[b])]
            if on_done is not None:
                on_done(1)
        loop.drop_finished()
    return results, prefill_s


class _Loop:
    """The batch's state between steps: cache, masks, context hidden states, processors, stops."""

    def __init__(self, runner: ModelRunner, requests: Sequence[ContrastiveRequest], logits: torch.Tensor,
                 hidden: torch.Tensor, cache: Any, mask: torch.Tensor, eos: Sequence[int],
                 decode: Callable[[list[int]], str], device: torch.device):
        self.runner, self.requests, self.cache, self.mask = runner, requests, cache, mask
        self.logits, self.context = logits, hidden
        self.next_pos = mask.sum(-1)
        configs = [r.config for r in requests]
        self.max_new = [c.max_new_tokens for c in configs]
        self.params = RowParams.from_configs(configs, device)
        self.state = TokenState([r.ids for r in requests], max(self.max_new), logits.shape[1], self.params, eos,
                                device)
        # the coefficients in double, then float32, as transformers' Python-float alpha meets the tensors
        self.one_minus = torch.tensor([[1.0 - c.penalty_alpha] for c in configs], dtype=torch.float32, device=device)
        self.alpha = torch.tensor([[c.penalty_alpha] for c in configs], dtype=torch.float32, device=device)
        # per row: the ids that end it with "eos" (none with ignore_eos) and with "stop"
        self.eos = [frozenset() if c.ignore_eos else frozenset(eos) for c in configs]
        self.stop_ids = [frozenset(c.stop_token_ids) for c in configs]
        self.min_new = [c.min_new_tokens for c in configs]
        self.top_n = [c.top_logprobs for c in configs]
        self.out_top: list[list[dict[int, float]] | None] = [[] if n else None for n in self.top_n]
        self.stoppers = [RowStopper(StopStrings(c.stop), decode, c.min_new_tokens) if c.stop else None
                         for c in configs]
        self.alive = list(range(len(requests)))
        self.out_tok: list[list[int]] = [[] for _ in requests]
        self.out_lp: list[list[float]] = [[] for _ in requests]
        self.reason: list[str] = [""] * len(requests)
        self.cut: list[int | None] = [None] * len(requests)
        self._done: list[int] = []

    def choose(self, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.return_types.topk | None]:
        """One step: candidates, their forward pass, the re-ranking; the chosen tokens, raw logprobs and the
        raw top logprobs (the most any alive row asks for; None when none does)."""
        rows = len(self.alive)
        probs = apply_processors(self.logits, self.state).softmax(dim=-1)
        top_p, top_ids = torch.topk(probs, dim=-1, k=k)
        expand = torch.arange(rows, device=top_ids.device).repeat_interleave(k)
        self.cache.reorder_cache(expand)
        cand_mask = torch.cat([self.mask, self.mask.new_ones((rows, 1))], dim=1)
        cand_logits, cand_hidden = forward_hidden(self.runner, top_ids.view(-1, 1), cand_mask[expand],
                                                  self.next_pos[expand].unsqueeze(1), self.cache)
        chosen = degeneration_choice(self.context, self.mask, cand_hidden, top_p, self.one_minus, self.alpha)
        flat = torch.arange(rows, device=chosen.device) * k + chosen
        self.cache.reorder_cache(flat)
        tokens = top_ids.gather(1, chosen.unsqueeze(1)).squeeze(1)
        raw = self.logits.log_softmax(dim=-1)
        raw_lp = raw.gather(1, tokens.unsqueeze(1)).squeeze(1)
        top_n = max(self.top_n[b] for b in self.alive)
        top = raw.topk(top_n, dim=-1) if top_n else None
        self.logits = cand_logits[flat]
        self.context = torch.cat([self.context, cand_hidden[flat]], dim=1)
        self.mask, self.next_pos = cand_mask, self.next_pos + 1
        self.state.append(tokens)
        return tokens, raw_lp, top

    def record(self, tokens: torch.Tensor, raw_lp: torch.Tensor, top: torch.return_types.topk | None) -> list[int]:
        """Append each row's token; the batch positions of the rows that end with it."""
        host_tok, host_lp = tokens.tolist(), raw_lp.tolist()
        top_v, top_i = (top.values.tolist(), top.indices.tolist()) if top is not None else ([], [])
        self._done = []
        for j, b in enumerate(self.alive):
            tok = int(host_tok[j])
            self.out_tok[b].append(tok)
            self.out_lp[b].append(float(host_lp[j]))
            out_top, n = self.out_top[b], self.top_n[b]
            if out_top is not None:
                out_top.append(dict(zip(top_i[j][:n], top_v[j][:n], strict=True)))
            stopper = self.stoppers[b]
            if tok in self.eos[b]:
                self.reason[b] = "eos"
            elif tok in self.stop_ids[b] and len(self.out_tok[b]) > self.min_new[b]:
                self.reason[b] = "stop"  # cut stays None: the stop token, not a stop string
            elif stopper is not None and (cut := stopper.check(self.out_tok[b])) is not None:
                self.reason[b], self.cut[b] = "stop", cut
            elif len(self.out_tok[b]) >= self.max_new[b]:
                self.reason[b] = "length"
            if self.reason[b]:
                self._done.append(j)
        return self._done

    def drop_finished(self) -> None:
        """Finished rows leave the batch (cache, masks, context and processor state)."""
        if not self._done:
            return
        keep = [j for j in range(len(self.alive)) if j not in set(self._done)]
        self.alive = [self.alive[j] for j in keep]
        if not keep:
            return
        keep_t = torch.tensor(keep, device=self.mask.device)
        self.cache.reorder_cache(keep_t)
        self.mask, self.next_pos, self.logits = self.mask[keep_t], self.next_pos[keep_t], self.logits[keep_t]
        self.context, self.one_minus, self.alpha = self.context[keep_t], self.one_minus[keep_t], self.alpha[keep_t]
        self.params = self.params.index(keep)
        self.state.index(keep_t, self.params)
