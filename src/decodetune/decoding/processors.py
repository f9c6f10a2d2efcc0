"""Per-row parameters, the token state, and the logits processors that run before the samplers.

Every processor works on a whole batch at once, with one parameter value per row packed in a tensor
(vLLM v1's layout), and says from plain Python values whether any row needs it, so a batch where no row
uses it skips it entirely. They share one small interface (llama.cpp's sampler chain): ``name``,
``active(state)`` and ``__call__(logits, state) -> logits``.

The order is fixed and documented (llama.cpp's chain starts logit bias -> penalties -> DRY too):

1. ``logit_bias`` (OpenAI / vLLM / llama.cpp): ``score[token] += bias``;
2. ``repetition_penalty`` over prompt + output tokens, transformers' semantics: a seen token's score is
   divided by the penalty when positive and multiplied by it when negative;
3. ``presence_penalty`` / ``frequency_penalty`` over output tokens only, vLLM / OpenAI semantics:
   ``score -= frequency * count + presence * (count > 0)``;
   ``penalty_last_n`` (llama.cpp ``repeat_last_n``) windows 2 and 3 to the last n tokens of the context
   (-1 = all, 0 = penalties off); the last n of the context that are output are the last n output tokens,
   so 3 keeps vLLM's output-only rule inside llama.cpp's window;
4. DRY (llama.cpp's ``llama_sampler_dry``, :mod:`decodetune.decoding.dry`);
5. ``no_repeat_ngram_size`` (transformers): a token that would complete an n-gram already present in
   prompt + output is banned;
6. ``bad_words`` (vLLM, :mod:`decodetune.decoding.token_rules`): a token that would complete a bad word's
   token sequence in the output is banned;
7. ``min_new_tokens``: every EOS id, and the row's own ``stop_token_ids`` (vLLM's ``min_tokens``), is
   banned while the row has generated fewer than ``min_new_tokens`` tokens.

``bad_words`` and DRY's sequence breakers are strings, tokenized with the model's tokenizer:
:meth:`RowParams.from_configs` takes it, or the one set by :func:`~decodetune.decoding.token_rules.use_tokenizer`
(the engine sets it for the whole of ``generate``).

The distribution samplers (temperature, top-k, ...) come after, in :mod:`decodetune.decoding.sampler`.
Padding never counts as a token (transformers >= 5 also ignores it for the repetition penalty).

Rows of one :class:`TokenState` may be at different steps (continuous batching: rows join a running batch
at their start, or rebuilt from their output so far): every rule that looks at "the output" or "the tokens
generated" uses the row's own count (:attr:`TokenState.generated`), never the shared step.

``MinNewTokens`` and ``NoRepeatNGram`` write in place (``apply_``) on a copy that an earlier stage already
made; :func:`apply_processors` makes the one copy when no stage did, so the caller's logits are never
modified.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from decodetune.config import DecodingConfig
from decodetune.config_checks import MIROSTAT_REPLACES
from decodetune.decoding import dry, token_rules
from decodetune.decoding.llama_samplers import init_adaptive_p_state, init_mirostat_state

#: Value of each per-row parameter that makes its processor or sampler a no-op (for the detail fields,
#: e.g. ``dry_base``, simply their defaults: they do nothing while their main field is off).
NEUTRAL: dict[str, float | int] = {
    "temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0, "typical_p": 1.0, "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0, "repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0,
    "no_repeat_ngram_size": 0, "min_new_tokens": 0, "penalty_last_n": -1,
    "dry_multiplier": 0.0, "dry_base": 1.75, "dry_allowed_length": 2, "dry_penalty_last_n": -1,
    "xtc_probability": 0.0, "xtc_threshold": 0.1, "top_n_sigma": -1.0, "mirostat": 0, "mirostat_tau": 5.0,
    "mirostat_eta": 0.1, "dynatemp_range": 0.0, "dynatemp_exponent": 1.0, "adaptive_target": -1.0,
    "adaptive_decay": 0.9,
}
#: Per-row values that are not numbers (never packed in tensors), with their neutral values.
OBJECT_FIELDS: dict[str, Any] = {"logit_bias": {}, "bad_words": [], "dry_sequence_breakers": [],
                                  "stop_token_ids": []}
#: Parameters that only shape the sampling distribution; they are neutral on rows that do not sample.
SAMPLER_FIELDS = frozenset({"temperature", "top_k", "top_p", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff",
                            "xtc_probability", "xtc_threshold", "top_n_sigma", "mirostat", "mirostat_tau",
                            "mirostat_eta", "dynatemp_range", "dynatemp_exponent", "adaptive_target",
                            "adaptive_decay"})
_INT_FIELDS = frozenset({"top_k", "no_repeat_ngram_size", "min_new_tokens", "penalty_last_n", "dry_allowed_length",
                         "dry_penalty_last_n", "mirostat"})


class RowParams:
    """Decoding parameters of the rows of a batch: Python lists (to decide what runs) and device tensors.

    Rows that do not sample (greedy, beam, temperature 0) get neutral sampler parameters, so the samplers
    can never change them; mirostat rows get neutral values for the samplers mirostat replaces (llama.cpp's
    mirostat chain is temperature -> mirostat). ``tokenizer`` tokenizes ``bad_words`` and DRY's breakers.
    """

    def __init__(self, values: dict[str, list[Any]], orders: list[tuple[str, ...]], sampling: list[bool],
                 device: torch.device | str, tokenizer: Any = None):
        self.values = values
        self.orders = orders
        self.sampling = sampling
        self.device = torch.device(device)
        self.tokenizer = tokenizer
        self._cache: dict[Any, Any] = {}

    @classmethod
    def from_configs(cls, configs: Sequence[DecodingConfig], device: torch.device | str,
                     tokenizer: Any = None) -> RowParams:
        """One row per config (repeat a config to give it several rows); ``tokenizer`` defaults to the one
        set by :func:`~decodetune.decoding.token_rules.use_tokenizer`."""
        sampling = [c.is_sampling for c in configs]
        values = {name: [_row_value(c, s, name, neutral) for c, s in zip(configs, sampling, strict=True)]
                  for name, neutral in {**NEUTRAL, **OBJECT_FIELDS}.items()}
        orders = [tuple(c.full_sampler_order) for c in configs]
        tokenizer = tokenizer if tokenizer is not None else token_rules.current_tokenizer()
        return cls(values, orders, sampling, device, tokenizer)

    def __len__(self) -> int:
        return len(self.sampling)

    def tensor(self, name: str) -> torch.Tensor:
        """The ``(rows,)`` tensor of one parameter (long for counts, float32 otherwise)."""
        return self.cached(("tensor", name), lambda: torch.tensor(
            self.values[name], dtype=torch.long if name in _INT_FIELDS else torch.float32, device=self.device))

    def active(self, name: str) -> bool:
        """Whether any row has a non-neutral value for ``name``."""
        neutral = OBJECT_FIELDS[name] if name in OBJECT_FIELDS else NEUTRAL[name]
        return self.cached(("active", name), lambda: any(v != neutral for v in self.values[name]))

    def rows_where(self, name: str) -> list[int]:
        """The rows whose ``name`` is not neutral (memoised)."""
        neutral = OBJECT_FIELDS[name] if name in OBJECT_FIELDS else NEUTRAL[name]
        return self.cached(("rows_where", name), lambda: [i for i, v in enumerate(self.values[name]) if v != neutral])

    def index_tensor(self, rows: Sequence[int]) -> torch.Tensor:
        """``rows`` as a long tensor on the device (memoised)."""
        return self.cached(("idx", tuple(rows)), lambda: torch.tensor(list(rows), dtype=torch.long, device=self.device))

    def cached(self, key: Any, make: Callable[[], Any]) -> Any:
        """Memoise something derived from these rows (tensors, index lists) until the rows change."""
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def index(self, rows: Sequence[int]) -> RowParams:
        """The parameters of a subset (or reordering) of the rows."""
        rows = list(rows)
        return RowParams({k: [v[i] for i in rows] for k, v in self.values.items()},
                         [self.orders[i] for i in rows], [self.sampling[i] for i in rows], self.device,
                         self.tokenizer)

    def subset(self, rows: Sequence[int]) -> RowParams:
        """Like :meth:`index`, memoised (used every step for the sampling rows and the order groups)."""
        return self.cached(("subset", tuple(rows)), lambda: self.index(rows))

    def order_groups(self) -> list[tuple[tuple[str, ...], list[int]]]:
        """Rows grouped by sampler order, in first-seen order."""
        def make() -> list[tuple[tuple[str, ...], list[int]]]:
            groups: dict[tuple[str, ...], list[int]] = {}
            for i, order in enumerate(self.orders):
                groups.setdefault(order, []).append(i)
            return list(groups.items())
        return self.cached("order_groups", make)


class TokenState:
    """What the processors look at: every row's tokens so far and the per-token bookkeeping of penalties.

    ``history`` is ``(rows, prompt_len + max_new)``, left-padded, with ``-1`` for padding and for steps not
    generated yet, so that padding never matches a real token. ``seen`` (prompt + output, for the repetition
    penalty) and ``counts`` (output only, for presence/frequency) exist only when some row needs them; both
    have one spare column that absorbs ids outside the model's output vocabulary. With a ``penalty_last_n``
    window on some row they are recomputed from ``history`` each step instead (:meth:`penalty_seen`,
    :meth:`penalty_counts`). ``per_row`` holds the stateful stages' per-row tensors (DRY's suffix matches,
    mirostat's mu, adaptive-p's moving average); :meth:`index` keeps them aligned with the rows.

    ``outputs`` (rows joining a batch mid-way, or a state rebuilt for rows at different steps): each row's
    tokens generated so far; they follow its prompt in ``history``, count as output, and set the row's
    :attr:`generated` count. Everything but mirostat's mu and adaptive-p's average is rebuilt from them;
    :meth:`carry_from` copies those (and any other per-row value that tokens cannot give) from the state the
    rows ran in.
    ``max_new_tokens`` is then the room left for the row with the most steps to go.
    """

    #: ``per_row`` entries that cannot be rebuilt from the tokens (:meth:`carry_from` copies them)
    CARRIED = ("mirostat_mu", "adaptive_weighted_sum", "adaptive_total_weight")

    def __init__(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, vocab_size: int,
                 rows: RowParams, eos_token_ids: Sequence[int], device: torch.device | str,
                 outputs: Sequence[Sequence[int]] | None = None):
        self.rows = rows
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        outputs = outputs if outputs is not None else [()] * len(prompts)
        contexts = [list(p) + list(o) for p, o in zip(prompts, outputs, strict=True)]
        width = max(len(c) for c in contexts)
        history = torch.full((len(prompts), width + max_new_tokens), -1, dtype=torch.long)
        for i, c in enumerate(contexts):
            if c:
                history[i, width - len(c):width] = torch.tensor(c, dtype=torch.long)
        self.history = history.to(self.device)
        self.length = width
        self.prompt_width = width  # columns filled when the state was built (prompts and outputs so far)
        self.step = 0  # tokens appended since then (the same for every row)
        #: each row's tokens generated before this state was built (host side, for what runs when)
        self.first: list[int] = [len(o) for o in outputs]
        self._first_t: torch.Tensor | None = None
        self.per_row: dict[str, torch.Tensor] = {}
        self._tables: dict[str, torch.Tensor] = {}
        self.eos_ids = tuple(sorted(set(eos_token_ids)))
        self.eos = torch.tensor(self.eos_ids, dtype=torch.long, device=self.device)
        self.seen: torch.Tensor | None = None
        self.counts: torch.Tensor | None = None
        self.windowed = rows.active("penalty_last_n")
        if rows.active("repetition_penalty") and not self.windowed:
            ids = self.history[:, :width].clamp(max=vocab_size)
            seen = torch.zeros((len(prompts), vocab_size + 2), dtype=torch.bool, device=self.device)
            # padding (-1) goes to the last spare column, out-of-vocabulary ids to the one before it
            seen.scatter_(1, torch.where(ids < 0, vocab_size + 1, ids), True)
            self.seen = seen[:, : vocab_size + 1].contiguous()
        if (rows.active("presence_penalty") or rows.active("frequency_penalty")) and not self.windowed:
            self.counts = torch.zeros((len(prompts), vocab_size + 1), dtype=torch.float32, device=self.device)
            if any(self.first):  # the outputs so far: each row's last ``generated`` columns
                out = torch.arange(width, device=self.device) >= width - self.generated.unsqueeze(1)
                ids = torch.where(out, self.history[:, :width].clamp(max=vocab_size), vocab_size)
                self.counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=self.counts.dtype))
        dry.init_dry_state(self)
        init_mirostat_state(self)
        init_adaptive_p_state(self)

    @property
    def generated(self) -> torch.Tensor:
        """``(rows,)`` long: tokens each row has generated (its outputs before this state, plus every step)."""
        key = "generated"
        if key not in self._tables:
            if self._first_t is None:
                self._first_t = torch.tensor(self.first, dtype=torch.long, device=self.device)
            self._tables[key] = self._first_t + self.step
        return self._tables[key]

    def generated_counts(self) -> list[int]:
        """:attr:`generated` on the host (no device sync: from the host-side counts)."""
        return [f + self.step for f in self.first]

    def carry_from(self, old: TokenState, rows: Sequence[int]) -> None:
        """Copy the :data:`CARRIED` per-row values of ``old``'s rows into this state: ``old``'s row ``i``
        is row ``rows[i]`` here (rows new to this state keep their fresh start, e.g. mu = 2 tau)."""
        idx = torch.tensor(list(rows), dtype=torch.long, device=self.device)
        for key in self.CARRIED:
            if key in self.per_row and key in old.per_row:
                self.per_row[key][idx] = old.per_row[key]

    def append(self, tokens: torch.Tensor) -> None:
        """Record one new token per row."""
        self.history[:, self.length] = tokens
        self.length += 1
        self.step += 1
        self._tables.clear()
        ids = tokens.clamp(max=self.vocab_size).unsqueeze(1)
        if "dry_match" in self.per_row:
            dry.extend_matches(self, self.length - 1)
        if self.seen is not None:
            self.seen.scatter_(1, ids, True)
        if self.counts is not None:
            self.counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=self.counts.dtype))

    def index(self, idx: torch.Tensor, rows: RowParams | None = None, host_idx: Sequence[int] | None = None) -> None:
        """Keep / reorder rows (beam reordering, dropping finished rows); ``rows`` if they changed;
        ``host_idx``: ``idx`` as a list, which spares a sync when rows are at different steps."""
        if len(set(self.first)) > 1:
            self.first = [self.first[i] for i in (host_idx if host_idx is not None else idx.tolist())]
        elif len(self.first) != idx.numel():
            self.first = [self.first[0] if self.first else 0] * idx.numel()
        self._first_t = None
        self.history = self.history.index_select(0, idx)
        if self.seen is not None:
            self.seen = self.seen.index_select(0, idx)
        if self.counts is not None:
            self.counts = self.counts.index_select(0, idx)
        self.per_row = {k: v.index_select(0, idx) for k, v in self.per_row.items()}
        self._tables.clear()
        if rows is not None:
            self.rows = rows

    def penalty_seen(self) -> torch.Tensor | None:
        """``(rows, vocab + 1)`` bool: tokens the repetition penalty looks at (None: no row uses it)."""
        if not self.windowed:
            return self.seen
        if not self.rows.active("repetition_penalty"):
            return None
        return self._window_table("seen", output_only=False) > 0

    def penalty_counts(self) -> torch.Tensor | None:
        """``(rows, vocab + 1)`` float: output-token counts for presence/frequency (None: no row uses them)."""
        if not self.windowed:
            return self.counts
        if not (self.rows.active("presence_penalty") or self.rows.active("frequency_penalty")):
            return None
        return self._window_table("counts", output_only=True)

    def _window_table(self, key: str, output_only: bool) -> torch.Tensor:
        """Token counts over each row's last ``penalty_last_n`` tokens (-1 all, 0 none), computed once a step."""
        if key not in self._tables:
            hist = self.history[:, : self.length]
            cols = torch.arange(self.length, device=self.device)
            n = self.rows.tensor("penalty_last_n").unsqueeze(1)
            valid = (hist >= 0) & ((n < 0) | (cols >= self.length - n))
            if output_only:  # each row's output: its last ``generated`` columns
                valid &= cols >= (self.length - self.generated).unsqueeze(1)
            # invalid positions land in the spare column past the vocabulary, which is then dropped
            ids = torch.where(valid, hist.clamp(max=self.vocab_size), self.vocab_size + 1)
            table = torch.zeros((hist.shape[0], self.vocab_size + 2), dtype=torch.float32, device=self.device)
            table.scatter_add_(1, ids, torch.ones_like(ids, dtype=torch.float32))
            self._tables[key] = table[:, : self.vocab_size + 1]
        return self._tables[key]


class LogitsProcessor:
    """Interface of one pipeline stage."""

    name = "processor"

    def active(self, state: TokenState) -> bool:  # pragma: no cover - interface
        """Whether any row needs this stage now."""
        raise NotImplementedError

    def __call__(self, logits: torch.Tensor, state: TokenState) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError


class RepetitionPenalty(LogitsProcessor):
    """transformers' ``RepetitionPenaltyLogitsProcessor`` with a per-row penalty, over prompt + output."""

    name = "repetition_penalty"

    def active(self, state: TokenState) -> bool:
        return state.seen is not None or (state.windowed and state.rows.active("repetition_penalty"))

    def __call__(self, logits: torch.Tensor, state: TokenState) -> torch.Tensor:
        seen = state.penalty_seen()
        assert seen is not None
        penalty = state.rows.tensor("repetition_penalty").unsqueeze(1)
        penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
        return torch.where(seen[:, : logits.shape[1]], penalised, logits)


class PresenceFrequencyPenalty(LogitsProcessor):
    """vLLM's additive penalties over output tokens: ``-frequency * count - presence * (count > 0)``."""

    name = "presence_frequency_penalty"

    def active(self, state: TokenState) -> bool:
        uses = state.counts is not None or (
            state.windowed and (state.rows.active("presence_penalty") or state.rows.active("frequency_penalty")))
        return uses and (state.step > 0 or any(state.first))

    def __call__(self, logits: torch.Tensor, state: TokenState) -> torch.Tensor:
        counts = state.penalty_counts()
        assert counts is not None
        counts = counts[:, : logits.shape[1]]
        frequency = state.rows.tensor("frequency_penalty").unsqueeze(1)
        presence = state.rows.tensor("presence_penalty").unsqueeze(1)
        return logits - frequency * counts - presence * (counts > 0).to(logits.dtype)


class NoRepeatNGram(LogitsProcessor):
    """transformers' ``NoRepeatNGramLogitsProcessor`` with a per-row n (rows grouped by n), padding excluded."""

    name = "no_repeat_ngram_size"
    in_place = True

    def active(self, state: TokenState) -> bool:
        return state.rows.active("no_repeat_ngram_size")

    def __call__(self, logits: torch.Tensor, state: TokenState) -> torch.Tensor:
        return self.apply_(logits.clone(memory_format=torch.contiguous_format), state)

    def apply_(self, logits: torch.Tensor, state: TokenState) -> torch.Tensor:
        """Ban in place (``logits`` contiguous): one ``amin`` scatter per n, no full-vocabulary mask."""
        rows = state.rows
        vocab = logits.shape[1]
        flat = logits.view(-1)
        for n, idx in rows.cached("ngram_groups", lambda: _groups(rows.values["no_repeat_ngram_size"])):
            if state.length < n:
                continue
            idx_t = rows.cached(("idx", tuple(idx)), lambda idx=idx: torch.tensor(idx, device=rows.device))
            hist = state.history.index_select(0, idx_t)[:, : state.length]
            prefix = hist[:, state.length - n + 1:]
            windows = hist.unfold(1, n, 1)
            match = (windows[..., :-1] == prefix.unsqueeze(1)).all(-1)
            # a prefix reaching into padding matches nothing; a window ending in padding bans nothing
            last = windows[..., -1]
            match &= (prefix >= 0).all(-1, keepdim=True) & (last >= 0) & (last < vocab)
            # min with -inf bans, min with +inf leaves the score exactly as it was (duplicates agree)
            target = idx_t.unsqueeze(1) * vocab + last.clamp(min=0, max=vocab - 1)
            values = torch.where(match, float("-inf"), float("inf")).to(logits.dtype)
            flat.scatter_reduce_(0, target.flatten(), values.flatten(), reduce="amin")
        return logits


class LogitBias(LogitsProcessor):
    """``score[token] += bias`` per row (ids outside the vocabulary are ignored, as llama.cpp and vLLM do)."""

    name = "logit_bias"

    def active(self, state: TokenState) -> bool:
        return state.rows.active("logit_bias")

    def __call__(self, logits: torch.Tensor, state: TokenState) -> torch.Tensor:
        rows = state.rows
        vocab = logits.shape[1]

        def make() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            triples = [(i, t, b) for i, bias in enumerate(rows.values["logit_bias"])
                       for t, b in bias.items() if t < vocab]
            r, t, b = zip(*triples, strict=True) if triples else ((), (), ())
            dev = rows.device
            return (torch.tensor(r, dtype=torch.long, device=dev), torch.tensor(t, dtype=torch.long, device=dev),
                    torch.tensor(b, dtype=torch.float32, device=dev))

        r, t, b = rows.cached(("logit_bias", vocab), make)
        return logits.index_put((r, t), b.to(logits.dtype), accumulate=True)


class MinNewTokens(LogitsProcessor):
    """Bans every EOS id and the row's ``stop_token_ids`` on rows that have generated fewer than
    ``min_new_tokens`` tokens (each row its own count: :attr:`TokenState.generated`)."""

    name = "min_new_tokens"
    in_place = True

    def active(self, state: TokenState) -> bool:
        rows = state.rows
        mins = rows.values["min_new_tokens"]
        stops = rows.values["stop_token_ids"]
        return any(m > f + state.step and (state.eos_ids or s)
                   for m, f, s in zip(mins, state.first, stops, strict=True))

    def __call__(self, logits: torch.Tensor, state: TokenState) -> torch.Tensor:
        return self.apply_(logits.clone(memory_format=torch.contiguous_format), state)

    def apply_(self, logits: torch.Tensor, state: TokenState) -> torch.Tensor:
        """Ban in place with one small ``amin`` scatter over each row's banned ids (no full-logit copy)."""
        ids, has_ids = _min_new_ids(state, logits.shape[1])
        too_short = (state.rows.tensor("min_new_tokens") > state.generated).unsqueeze(1) & has_ids
        values = torch.where(too_short, float("-inf"), float("inf")).to(logits.dtype).expand(ids.shape)
        return logits.scatter_reduce_(1, ids, values, reduce="amin")


def _min_new_ids(state: TokenState, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rows, m)``: each row's EOS and stop ids inside the vocabulary, padded by repeating one of them.

    Also ``(rows, 1)`` bool: whether the row has any (a row without gets column 0, never banned).
    """
    rows = state.rows

    def make() -> tuple[torch.Tensor, torch.Tensor]:
        per_row = [sorted({i for i in (*state.eos_ids, *stops) if 0 <= i < vocab})
                   for stops in rows.values["stop_token_ids"]]
        width = max(1, max(len(r) for r in per_row))
        padded = [(r + [r[-1]] * (width - len(r))) if r else [0] * width for r in per_row]
        return (torch.tensor(padded, dtype=torch.long, device=rows.device),
                torch.tensor([bool(r) for r in per_row], device=rows.device).unsqueeze(1))

    return rows.cached(("min_new_ids", state.eos_ids, vocab), make)


def _row_value(config: DecodingConfig, sampling: bool, name: str, neutral: Any) -> Any:
    """A config's value for one per-row parameter, neutral where the row never reads it."""
    if name in SAMPLER_FIELDS and not sampling:
        return neutral
    if config.mirostat and name in MIROSTAT_REPLACES:
        return neutral
    return getattr(config, name)



#: The fixed order of the processors that run before the distribution samplers (DRY and bad words share the
#: ``name`` / ``active`` / ``__call__`` interface without importing this module).
PROCESSORS: tuple[Any, ...] = (LogitBias(), RepetitionPenalty(), PresenceFrequencyPenalty(), dry.DRY(),
                               NoRepeatNGram(), token_rules.BadWords(), MinNewTokens())


def apply_processors(logits: torch.Tensor, state: TokenState) -> torch.Tensor:
    """Run every active processor, in order. Never modifies ``logits`` in place.

    A stage with ``in_place`` writes into the scores an earlier stage returned (a fresh tensor); only when
    none did is the one copy made here, so a step costs at most one full-logit copy per out-of-place stage.
    """
    source = logits
    for proc in PROCESSORS:
        if not proc.active(state):
            continue
        if getattr(proc, "in_place", False):
            if _shares(logits, source) or not logits.is_contiguous():
                logits = logits.clone(memory_format=torch.contiguous_format)
            logits = proc.apply_(logits, state)
        else:
            logits = proc(logits, state)
    return logits


def _shares(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` may be (a view of) the caller's tensor ``b``, which must not be written."""
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def _groups(values: Sequence[int]) -> list[tuple[int, list[int]]]:
    groups: dict[int, list[int]] = {}
    for i, v in enumerate(values):
        if v:
            groups.setdefault(int(v), []).append(i)
    return sorted(groups.items())
