"""DRY ("don't repeat yourself", p-e-w), llama.cpp's ``llama_sampler_dry`` vectorised over rows.

llama.cpp's algorithm, per row, over the last ``N = min(context, dry_penalty_last_n)`` tokens (-1 = the
whole context, prompt included, as llama.cpp's server feeds the prompt to its samplers):

1. ``rep_limit``: scanning back from the newest token, the first token that is the head of a sequence
   breaker whose tail follows it (the longest such tail) limits repeats to the tokens after that breaker;
   no breaker: ``rep_limit = N``. Below ``dry_allowed_length`` nothing is penalised.
2. For every earlier position, the length of the longest suffix of the context that also ends there
   (llama.cpp's reverse Z-algorithm), capped by the window and by ``rep_limit``.
3. A token that would extend such a repeat of length ``>= dry_allowed_length`` (the token that followed the
   earlier occurrence) gets ``logit -= multiplier * base ** (length - allowed_length)``, with the exponent
   capped where ``base ** exponent`` would overflow a float (llama.cpp's ``88.7228391 / log(base)``);
   the longest repeat a token extends counts, and one-token breakers are never penalised.

Vectorised: the suffix-match lengths of step 2 are kept per row in ``TokenState.per_row["dry_match"]``
(column ``j``: the common suffix of the context up to ``j`` and the whole context) and extended in
``O(context)`` tensor work per new token, instead of llama.cpp's per-step scan; steps 1 and 3 are a few
masked reductions. The result is the same penalty (tests/test_llama_reference.py feeds both the same
histories). The breakers are tokenized as llama.cpp does (:func:`decodetune.decoding.token_rules.dry_breakers`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from decodetune.decoding import token_rules

if TYPE_CHECKING:
    from decodetune.decoding.processors import RowParams, TokenState

#: llama.cpp's approximate log of the largest float, which caps the penalty's exponent.
FLOAT_MAX_LOG = 88.7228391


def dry_rows(rows: RowParams) -> list[int]:
    """Rows with DRY on (multiplier > 0 and a window that is not 0)."""
    return rows.cached("dry_rows", lambda: [
        i for i, (m, n) in enumerate(zip(rows.values["dry_multiplier"], rows.values["dry_penalty_last_n"],
                                         strict=True)) if m > 0 and n != 0])


def init_dry_state(state: TokenState) -> None:
    """Start the suffix-match table from the prompt (only when some row uses DRY)."""
    if not dry_rows(state.rows):
        return
    state.per_row["dry_match"] = torch.zeros(state.history.shape, dtype=torch.int32, device=state.device)
    for pos in range(1, state.length):
        extend_matches(state, pos)


def extend_matches(state: TokenState, pos: int) -> None:
    """Update the match table for the token just written at column ``pos`` (the new end of the context).

    The common suffix of ``..j`` and ``..pos`` is that of ``..j-1`` and ``..pos-1`` plus one when the
    tokens at ``j`` and ``pos`` are equal, else 0; padding (-1) matches nothing.
    """
    match = state.per_row["dry_match"]
    hist = state.history
    newest = hist[:, pos:pos + 1]
    before = torch.cat([torch.zeros_like(match[:, :1]), match[:, :pos - 1]], dim=1)
    equal = (hist[:, :pos] == newest) & (newest >= 0)
    match[:, :pos] = torch.where(equal, before + 1, 0)
    match[:, pos] = 0


class DRY:
    """The DRY processor (interface of :class:`~decodetune.decoding.processors.LogitsProcessor`)."""

    name = "dry"

    def active(self, state: TokenState) -> bool:
        return bool(dry_rows(state.rows)) and state.length > 1

    def __call__(self, logits: torch.Tensor, state: TokenState) -> torch.Tensor:
        rows = state.rows
        idx = dry_rows(rows)
        idx_t = rows.index_tensor(idx)
        sub = rows.subset(idx)
        penalty = torch.zeros((len(idx), logits.shape[1]), dtype=torch.float32, device=logits.device)
        for breakers, group in _breaker_groups(sub):
            g = sub.index_tensor(group)
            penalty[g] = _penalties(state, idx_t.index_select(0, g), sub.subset(group), breakers, logits.shape[1])
        out = logits.clone()
        out[idx_t] = logits.index_select(0, idx_t) - penalty.to(logits.dtype)
        return out


def _breaker_groups(rows: RowParams) -> list[tuple[tuple[str, ...], list[int]]]:
    groups: dict[tuple[str, ...], list[int]] = {}
    for i, b in enumerate(rows.values["dry_sequence_breakers"]):
        groups.setdefault(tuple(b), []).append(i)
    return list(groups.items())


def _penalties(state: TokenState, idx: torch.Tensor, rows: RowParams, breakers: tuple[str, ...],
               vocab: int) -> torch.Tensor:
    """``(rows, vocab)`` DRY penalties of the rows ``idx`` of ``state`` (all with the same breakers)."""
    length = state.length
    hist = state.history.index_select(0, idx)[:, :length]
    match = state.per_row["dry_match"].index_select(0, idx)[:, :length]
    single, tails = _breaker_masks(state, rows, breakers, vocab)
    ids = torch.where(hist < 0, single.shape[0] - 1, hist.clamp(max=single.shape[0] - 2))

    dist = (length - 1) - torch.arange(length, device=hist.device)  # tokens between a column and the end
    n_real = (hist >= 0).sum(dim=1, keepdim=True)
    last_n = rows.tensor("dry_penalty_last_n").unsqueeze(1).to(n_real.dtype)
    window = torch.where(last_n < 0, n_real, torch.minimum(last_n, n_real))
    in_window = dist < window

    rep_limit = _rep_limit(ids, single, tails, dist, in_window, window)
    allowed = rows.tensor("dry_allowed_length").unsqueeze(1)
    # the repeat ending at column c (c < end) is extended by the token that followed it, at c + 1
    repeat = torch.minimum(torch.minimum(match.to(window.dtype), window - dist), rep_limit)[:, :-1]
    counts = (in_window[:, :-1] & (repeat >= allowed))
    nxt = torch.where(counts, hist[:, 1:].clamp(max=vocab), vocab)
    longest = torch.full((hist.shape[0], vocab + 1), -1, dtype=repeat.dtype, device=hist.device)
    longest.scatter_reduce_(1, nxt, torch.where(counts, repeat, -1), reduce="amax")
    longest = longest[:, :vocab]
    hit = (longest >= allowed) & ~single[:vocab]
    return torch.where(hit, _penalty(rows, longest - allowed), 0.0)


def _penalty(rows: RowParams, exponent: torch.Tensor) -> torch.Tensor:
    """``multiplier * base ** exponent`` as llama.cpp computes it (double pow of the float base, then float)."""
    base = rows.tensor("dry_base").unsqueeze(1)
    cap = (torch.tensor(FLOAT_MAX_LOG, dtype=torch.float32) / torch.log(base)).to(torch.long)
    capped = torch.where((base > 1.000001) & (cap > 0) & (exponent > cap), cap, exponent)
    mult = rows.tensor("dry_multiplier").unsqueeze(1)
    return (mult.double() * base.double() ** capped.double()).to(torch.float32)


def _rep_limit(ids: torch.Tensor, single: torch.Tensor, tails: list[tuple[tuple[int, ...], torch.Tensor]],
               dist: torch.Tensor, in_window: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """``(rows, 1)``: tokens after the breaker nearest the end (llama.cpp's scan), or the window without one."""
    length = ids.shape[1]
    best = torch.where(single[ids], 0, -1)  # longest breaker tail that starts at each head column
    for tail, heads in tails:
        m = len(tail)
        if m >= length:
            continue
        ok = heads[ids[:, : length - m]]
        for o, tok in enumerate(tail):
            ok &= ids[:, 1 + o: length - m + 1 + o] == tok
        best[:, : length - m] = torch.where(ok, torch.clamp(best[:, : length - m], min=m), best[:, : length - m])
    found = in_window & (best >= 0)
    nearest = torch.where(found, dist, length + 1).amin(dim=1, keepdim=True)
    at = torch.where(found, dist, length + 1).argmin(dim=1, keepdim=True)
    return torch.where(nearest <= length, nearest - best.gather(1, at), window)


def _breaker_masks(state: TokenState, rows: RowParams, breakers: tuple[str, ...],
                   vocab: int) -> tuple[torch.Tensor, list[tuple[tuple[int, ...], torch.Tensor]]]:
    """One-token breakers as a mask, and each multi-token tail with the mask of its heads.

    Masks have two spare entries: ids beyond the vocabulary and padding, which are never breakers.
    """
    def make() -> tuple[torch.Tensor, list[tuple[tuple[int, ...], torch.Tensor]]]:
        tok = token_rules._need_tokenizer(rows, "dry_sequence_breakers")
        processed = token_rules.dry_breakers(tok, breakers)
        size = max(vocab, state.vocab_size) + 2
        single = torch.zeros(size, dtype=torch.bool, device=state.device)
        by_tail: dict[tuple[int, ...], list[int]] = {}
        for head, head_tails in processed.items():
            if head >= size - 2:
                continue
            for tail in head_tails:
                if tail:
                    by_tail.setdefault(tail, []).append(head)
                else:
                    single[head] = True
        tails = []
        for tail, heads in by_tail.items():
            mask = torch.zeros(size, dtype=torch.bool, device=state.device)
            mask[torch.tensor(heads, device=state.device)] = True
            tails.append((tail, mask))
        return single, tails

    return rows.cached(("dry_breakers", breakers, vocab), make)
