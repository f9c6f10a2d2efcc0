"""The flat (greedy / sampling) decoding loop: continuous batching over shared prefills.

Rows wait in a queue ordered by prompt (similar lengths together, identical prompts adjacent). At most
``batch_size`` rows run at once. Whenever rows finish, waiting rows are prefilled and join the running batch
(caches right-aligned, :mod:`decodetune.decoding.kvcache`), so the batch stays full instead of running
under-filled down to its longest row. Rows that share a prompt (n samples, repeats, several configs of one
prompt) prefill it once and copy its cache rows; a prompt whose rows join in different rounds keeps its
prefilled cache until the last of them has joined.

Each step: processors -> argmax (greedy rows) or sampler chain and the row's own seeded draw -> one
device-to-host transfer (tokens, their logprobs, the top logprobs asked for) -> finish checks on the host ->
finished rows leave (their cache rows dropped) -> one forward for the running rows -> admission.

A row's tokens depend only on (prompt, config, seed): its positions come from its own length, padding is
masked, its sampler draws from its own generator, and its min-new-tokens count is its own (rows that joined
at different steps share one :class:`TokenState` that counts each row's generated tokens). So continuous,
static and one-by-one batching give the same tokens, up to the float rounding of different batch shapes.

On every admission the token state is rebuilt from each running row's (prompt, output so far): the seen
tokens, output counts, penalty windows, DRY's match table (``O(context)`` tensor ops per admission) and
bad-word tails all follow from the tokens; mirostat's mu and adaptive-p's moving average, which do not, are
carried over from the state the running rows came from (rows that join start fresh, e.g. mu = 2 tau, as they
would alone).
"""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from decodetune.config import DecodingConfig
from decodetune.decoding import processors
from decodetune.decoding.kvcache import KV, fit, join, layers_of, set_layers, take
from decodetune.decoding.processors import RowParams, TokenState, apply_processors
from decodetune.decoding.runner import ModelRunner
from decodetune.decoding.sampler import make_generator, row_seed, sample_tokens
from decodetune.decoding.stopping import RowStopper, StopStrings

#: Row parameters whose processors / samplers give the same result on a batch whose rows started at
#: different steps, once :meth:`FlatDecoder._rebuild_state` has rebuilt the token state (they look at the
#: row's own tokens and its own generated count, or at state carried over per row, mirostat's mu). A row
#: with any other parameter set makes the call batch statically: rows then always start together.
JOIN_SAFE = frozenset({"temperature", "top_k", "top_p", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff",
                       "repetition_penalty", "presence_penalty", "frequency_penalty", "no_repeat_ngram_size",
                       "min_new_tokens", "logit_bias", "penalty_last_n", "dry_multiplier", "dry_base",
                       "dry_allowed_length", "dry_penalty_last_n", "dry_sequence_breakers", "bad_words",
                       "stop_token_ids", "mirostat", "mirostat_tau", "mirostat_eta", "xtc_probability",
                       "xtc_threshold", "top_n_sigma", "dynatemp_range", "dynatemp_exponent", "adaptive_target",
                       "adaptive_decay"})


def joins_safely(config: DecodingConfig) -> bool:
    """Whether a row with this config can join a running batch mid-way (see :data:`JOIN_SAFE`)."""
    fields = {**processors.NEUTRAL, **getattr(processors, "OBJECT_FIELDS", {})}
    return all(name in JOIN_SAFE or getattr(config, name, neutral) == getattr(_DEFAULT, name, neutral)
               for name, neutral in fields.items())


_DEFAULT = DecodingConfig()


@dataclass
class FlatRow:
    """One sequence to produce with a flat (non-beam) strategy."""

    prompt_index: int
    sequence_index: int
    ids: list[int]
    config: DecodingConfig
    seed: int | None


@dataclass
class Finished:
    """What a row produced, and why it ended."""

    token_ids: list[int]
    logprobs: list[float]
    reason: str
    cut: int | None
    prefill_s: float
    decode_s: float
    stop_token: bool = False
    top_logprobs: list[dict[int, float]] | None = None


@dataclass
class _Prefill:
    """One prefill forward over distinct prompts; kept while rows still wait for one of its prompts."""

    kv: KV | None  # its cache tensors as they were after the prefill (None: the cache cannot be joined)
    cache: Any
    mask: torch.Tensor
    logits: torch.Tensor
    seconds: float
    end: float  # perf_counter() when it finished: a row's decode time counts from there


@dataclass
class _Track:
    """Host-side state of one admitted row."""

    config: DecodingConfig
    prefill_s: float
    t0: float
    stopper: RowStopper | None
    stop_ids: frozenset[int]
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top: list[dict[int, float]] | None = None


def select_tokens(scores: torch.Tensor, params: RowParams, gens: Sequence[torch.Generator | None],
                  state: TokenState | None = None) -> torch.Tensor:
    """Argmax for greedy rows; sampler chain + seeded draw for sampling rows (``state``: mirostat's mu,
    adaptive-p's average)."""
    return sample_tokens(scores, params, gens, state)


class FlatDecoder:
    """Decodes flat rows with at most ``batch_size`` running at once; :meth:`run` returns one result per row.

    ``continuous=False`` admits rows only when the running batch is empty (static batching: a chunk runs
    down to its longest row); ``compact=False`` also keeps finished rows in the batch, masked (both exist to
    measure and test against).
    """

    def __init__(self, runner: ModelRunner, rows: Sequence[FlatRow], *, pad: int, eos: Sequence[int],
                 decode: Callable[[list[int]], str], batch_size: int | None = None,
                 advance: Callable[[int], None] = lambda n: None, continuous: bool = True, compact: bool = True):
        self.runner, self.rows, self.pad, self.decode, self.advance = runner, list(rows), pad, decode, advance
        self.eos = list(eos)
        self.eos_set = frozenset(self.eos)
        self.slots = batch_size or max(1, len(self.rows))
        self.compact = compact
        # without compaction no slot ever frees up
        self.continuous = continuous and compact and all(joins_safely(r.config) for r in self.rows)
        self.device = runner.device
        order = sorted(range(len(self.rows)), key=lambda i: (len(self.rows[i].ids), self.rows[i].ids, i))
        self.waiting = deque(order)
        self.unadmitted = Counter(tuple(r.ids) for r in self.rows)  # per prompt, rows not admitted yet
        self.store: dict[tuple[int, ...], tuple[_Prefill, int]] = {}
        self.finished: list[Finished | None] = [None] * len(self.rows)
        self.track: list[_Track | None] = [None] * len(self.rows)
        self.active: list[int] = []  # row indices of the running batch, in batch order
        self.cache: Any = None
        self.mask = self.next_pos = self.logits = torch.empty(0)
        self.params: RowParams | None = None
        self.state: TokenState | None = None
        self.gens: list[torch.Generator | None] = []
        self.top_n = 0

    def run(self) -> list[Finished]:
        """Decode every row to its end."""
        self._admit()
        while self.active:
            tokens = self._drop_finished(self._choose())
            if self.active:
                self.logits, self.mask = self.runner.step(tokens, self.mask, self.next_pos, self.cache)
                self.next_pos = self.next_pos + 1
            self._admit()
        assert all(f is not None for f in self.finished)
        return self.finished  # type: ignore[return-value]

    # ---- one step

    def _choose(self) -> torch.Tensor:
        """Pick every running row's next token, bring what the host needs over in one transfer, record it."""
        assert self.params is not None and self.state is not None
        logits = self.logits
        scores = apply_processors(logits, self.state)  # MinNewTokens bans EOS and stop_token_ids
        tokens = select_tokens(scores, self.params, self.gens, self.state)
        lse = logits.logsumexp(dim=1, keepdim=True)
        cols = [tokens.unsqueeze(1), logits.gather(1, tokens.unsqueeze(1)) - lse]
        if self.top_n:
            top = logits.topk(self.top_n, dim=1)
            cols += [top.values - lse, top.indices]
        host = torch.cat([c.to(torch.float64) for c in cols], dim=1).tolist()
        self.state.append(tokens)
        now = time.perf_counter()
        done = 0
        for j, b in enumerate(self.active):
            if self.finished[b] is None:  # finished rows only stay when they are masked, not dropped
                done += self._record(b, host[j], now)
        if done:
            self.advance(done)
        return tokens

    def _record(self, b: int, row: list[float], now: float) -> bool:
        """Append one token to row ``b``; returns whether the row finished with it."""
        t = self.track[b]
        assert t is not None
        tok = int(row[0])
        t.tokens.append(tok)
        t.logprobs.append(row[1])
        if t.top is not None:
            n, k = t.config.top_logprobs, self.top_n
            t.top.append({int(i): v for v, i in zip(row[2:2 + n], row[2 + k:2 + k + n], strict=True)})
        reason, cut, stop_token = None, None, False
        count = len(t.tokens)
        if tok in self.eos_set and not t.config.ignore_eos:
            reason = "eos"
        elif tok in t.stop_ids and count > t.config.min_new_tokens:
            reason, stop_token = "stop", True
        elif t.stopper is not None and (cut := t.stopper.check(t.tokens)) is not None:
            reason = "stop"
        elif count >= t.config.max_new_tokens:
            reason = "length"
        if reason is None:
            return False
        self.finished[b] = Finished(t.tokens, t.logprobs, reason, cut, t.prefill_s, now - t.t0, stop_token, t.top)
        return True

    def _drop_finished(self, tokens: torch.Tensor) -> torch.Tensor:
        """Drop finished rows from the batch (or, uncompacted, end the batch once all have finished)."""
        keep = [j for j, b in enumerate(self.active) if self.finished[b] is None]
        if len(keep) == len(self.active):
            return tokens
        if not keep:
            self.active, self.gens, self.cache = [], [], None
            return tokens
        if not self.compact:
            return tokens
        assert self.params is not None and self.state is not None
        idx = torch.tensor(keep, device=self.device)
        self.cache.reorder_cache(idx)
        self.mask, self.next_pos, tokens = self.mask[idx], self.next_pos[idx], tokens[idx]
        self.params = self.params.index(keep)
        self.state.index(idx, self.params, keep)
        self.gens = [self.gens[j] for j in keep]
        self.active = [self.active[j] for j in keep]
        self.top_n = self._top_n()
        # the rows that left may have been the longest: cut the columns that are padding in every row left
        kv = layers_of(self.cache)
        width = max(self._cached(b) - 1 for b in self.active)  # the newest token is not in the cache yet
        if kv is not None and width < self.mask.shape[1]:
            kv, self.mask = fit(kv, self.mask, width)
            set_layers(self.cache, kv)
        return tokens

    # ---- admission

    def _admit(self) -> None:
        """Prefill waiting rows into the free slots (all slots when the batch is empty)."""
        if not self.waiting or (self.active and not self.continuous):
            return
        free = self.slots - len(self.active)
        if free <= 0:
            return
        new = [self.waiting.popleft() for _ in range(min(free, len(self.waiting)))]
        running = len(self.active)
        groups = self._sources(new)
        order = [b for _, rows, _ in groups for b in rows]
        for pf, rows, _ in groups:
            for b in rows:
                r = self.rows[b]
                stopper = RowStopper(StopStrings(r.config.stop), self.decode, r.config.min_new_tokens) \
                    if r.config.stop else None
                self.track[b] = _Track(r.config, pf.seconds, pf.end, stopper, frozenset(r.config.stop_token_ids),
                                       top=[] if r.config.top_logprobs else None)
        self._join(groups)
        self.active = self.active + order
        self.gens = self.gens + [self._generator(b) for b in order]
        self._rebuild_state(running)

    def _sources(self, new: list[int]) -> list[tuple[_Prefill, list[int], list[int]]]:
        """The prefill each new row takes its prompt cache from: (prefill, rows, row of the prefill) groups."""
        keys = [tuple(self.rows[b].ids) for b in new]
        missing = [k for k in dict.fromkeys(keys) if k not in self.store]
        fresh: dict[tuple[int, ...], tuple[_Prefill, int]] = {}
        if missing:
            t0 = time.perf_counter()
            logits, cache, mask, _ = self.runner.prefill([list(k) for k in missing], self.pad)
            end = time.perf_counter()
            kv = layers_of(cache)
            if kv is None:  # sliding-window / linear-attention caches: static batches, one source each
                self.continuous = False
            pf = _Prefill(kv, cache, mask, logits, end - t0, end)
            fresh = {k: (pf, j) for j, k in enumerate(missing)}
        groups: dict[int, tuple[_Prefill, list[int], list[int]]] = {}
        for b, k in zip(new, keys, strict=True):
            pf, j = self.store[k] if k in self.store else fresh[k]
            group = groups.setdefault(id(pf), (pf, [], []))
            group[1].append(b)
            group[2].append(j)
            self.unadmitted[k] -= 1
        for k, src in fresh.items():  # keep a prompt's cache while rows still wait for it
            if self.unadmitted[k] > 0 and src[0].kv is not None:
                self.store[k] = src
        for k in set(keys):
            if self.unadmitted[k] == 0:
                self.store.pop(k, None)
        return list(groups.values())

    def _join(self, groups: list[tuple[_Prefill, list[int], list[int]]]) -> None:
        """Append the new rows' prompt caches, masks, positions and logits to the running batch."""
        dev = self.device
        picks = [(pf, torch.tensor(js, device=dev), js == list(range(pf.mask.shape[0]))) for pf, _, js in groups]
        logits = [pf.logits if whole else pf.logits[idx] for pf, idx, whole in picks]
        masks = [pf.mask if whole else pf.mask[idx] for pf, idx, whole in picks]
        if self.active:
            logits, masks = [self.logits, *logits], [self.mask, *masks]
        self.logits = torch.cat(logits) if len(logits) > 1 else logits[0]
        positions = [m.sum(-1) for m in masks[1 if self.active else 0:]]
        self.next_pos = torch.cat([self.next_pos, *positions] if self.active else positions)
        kvs = [pf.kv for pf, _, _ in picks]
        if not self.active and len(picks) == 1 and kvs[0] is None:  # a cache that cannot be joined
            pf, idx, whole = picks[0]
            self.cache, self.mask = pf.cache, masks[0]
            if not whole:
                self.cache.reorder_cache(idx)
            return
        parts = [(pf.kv if whole else take(pf.kv, idx), m)  # type: ignore[arg-type]
                 for (pf, idx, whole), m in zip(picks, masks[-len(picks):], strict=True)]
        if self.active:
            parts.insert(0, (layers_of(self.cache), self.mask))  # type: ignore[arg-type]
        width = max([self._cached(b) for b in self.active]
                    + [len(self.rows[b].ids) for _, rows, _ in groups for b in rows])
        kv, self.mask = join(parts, width)
        if not self.active:
            self.cache = picks[0][0].cache
        set_layers(self.cache, kv)

    def _rebuild_state(self, running: int) -> None:
        """Row parameters and token state of the running batch, rows at different steps; the first
        ``running`` rows were in the batch before, and their carried state (mirostat's mu) comes along."""
        rows = [self.rows[b] for b in self.active]
        outputs = [t.tokens for t in (self.track[b] for b in self.active)]  # type: ignore[union-attr]
        params = RowParams.from_configs([r.config for r in rows], self.device)
        room = max(r.config.max_new_tokens - len(o) for r, o in zip(rows, outputs, strict=True))
        state = TokenState([r.ids for r in rows], room, self.logits.shape[1], params, self.eos, self.device,
                           outputs=outputs)
        if running and self.state is not None:
            state.carry_from(self.state, range(running))
        self.params, self.state = params, state
        self.top_n = self._top_n()

    # ---- helpers

    def _cached(self, b: int) -> int:
        """Tokens of row ``b`` in the cache after its last forward (prompt + every generated token)."""
        t = self.track[b]
        return len(self.rows[b].ids) + (len(t.tokens) if t is not None else 0)

    def _generator(self, b: int) -> torch.Generator | None:
        r = self.rows[b]
        if not r.config.is_sampling:
            return None
        return make_generator(row_seed(r.seed, r.sequence_index), self.device)  # type: ignore[arg-type]

    def _top_n(self) -> int:
        vocab = self.logits.shape[1] if self.logits.dim() == 2 else 0
        return min(vocab, max((self.rows[b].config.top_logprobs for b in self.active), default=0))

