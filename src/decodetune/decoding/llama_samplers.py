"""llama.cpp's samplers beyond transformers', vectorised with one parameter per row.

Each follows its ``llama_sampler_*_apply`` in llama.cpp's ``src/llama-sampling.cpp`` and is proven equal to
it on the same logits in tests/test_llama_reference.py:

- :func:`dynamic_temperature` (``temp_ext``, Zhu et al. 2023): with ``dynatemp_range = d > 0`` the
  temperature is ``max(0, T - d) + 2d * (H / log n) ** dynatemp_exponent``, H the entropy of the current
  distribution and n the number of candidates; a temperature of 0 keeps only the best token.
- :func:`top_n_sigma` (Tang et al. 2024): keep the logits ``>= max - n * std`` (mean and population std
  over the finite logits).
- :func:`xtc` (exclude top choices, p-e-w): with probability ``xtc_probability`` (a coin from the row's
  own generator, one per step), drop every token with probability ``>= xtc_threshold`` except the least
  likely of them; nothing happens with fewer than two such tokens, a threshold above 0.5, or when fewer
  than ``min_keep`` tokens would remain.
- mirostat v1 / v2 (Basu et al. 2021): :func:`mirostat_truncate` keeps the tokens mirostat would sample
  from given the row's ``mu``; :func:`update_mirostat` then moves mu by ``eta * (tau - surprise)`` with the
  surprise ``-log2 p`` of the token actually drawn, in the truncated distribution. mu starts at ``2 tau``
  and lives in ``TokenState.per_row["mirostat_mu"]`` so it follows beam reordering and finished rows.
- adaptive-p (llama.cpp PR #17927): :func:`adaptive_p` reshapes the candidates' logits to
  ``5 - 10 d^2 / (1 + d)``, ``d = |p - target'| / 0.3``, so that tokens whose probability is near an adapted
  target are favoured; ``target' = clamp(2 target - EMA)`` where the EMA is the decayed mean of the *original*
  probabilities of the tokens drawn so far (:func:`update_adaptive_p`). It is the chain's last stage and the
  token is drawn from what it returns, as llama.cpp's ``llama_sampler_adaptive_p`` does instead of ``dist``.

Where llama.cpp counts "candidates" (temp_ext's n, XTC's remaining count) we count the finite logits: in
llama.cpp truncated tokens leave the array, while tokens set to -inf (by a bias or top-nσ) stay in it;
here both are -inf. The two agree whenever no earlier stage set a logit to -inf without removing it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from decodetune.decoding.processors import RowParams, TokenState

NEG_INF = float("-inf")
#: How many of the most likely tokens mirostat v1 fits its Zipf exponent on (llama.cpp's ``m = 100``).
MIROSTAT_M = 100
#: adaptive-p's transform constants (llama.cpp's ``DISTRIBUTION_WIDTH``, ``PEAK_LOGIT_VALUE``, ``SHARPNESS``).
ADAPTIVE_WIDTH, ADAPTIVE_PEAK, ADAPTIVE_SHARPNESS = 0.3, 5.0, 10.0


def dynamic_temperature(logits: torch.Tensor, rows: RowParams) -> torch.Tensor:
    """``temp_ext``: entropy-scaled temperature per row (rows with ``dynatemp_range = 0`` get ``logits / T``)."""
    temp = rows.tensor("temperature").unsqueeze(1)
    delta = rows.tensor("dynatemp_range").unsqueeze(1)
    finite = torch.isfinite(logits)
    n = finite.sum(dim=1, keepdim=True)
    probs = logits.softmax(dim=1)
    entropy = -torch.where(probs > 0, probs * probs.log(), 0.0).sum(dim=1, keepdim=True)
    normalised = entropy / torch.log(n.to(torch.float32)).clamp(min=torch.finfo(torch.float32).tiny)
    low, high = (temp - delta).clamp(min=0.0), temp + delta
    dyn = low + (high - low) * normalised.pow(rows.tensor("dynatemp_exponent").unsqueeze(1))
    dyn = torch.where(delta > 0, dyn, temp)
    scaled = logits / dyn.clamp(min=torch.finfo(torch.float32).tiny)
    # a dynamic temperature of 0 is llama.cpp's temp <= 0: only the best token survives
    best = logits.argmax(dim=1, keepdim=True)
    greedy = torch.full_like(logits, NEG_INF).scatter(1, best, logits.gather(1, best))
    out = torch.where(dyn <= 0, greedy, scaled)
    # one candidate (or none): llama.cpp returns before scaling
    return torch.where((delta > 0) & (n <= 1), logits, out)


def top_n_sigma(logits: torch.Tensor, rows: RowParams, min_keep: int) -> torch.Tensor:
    """Keep the logits ``>= max - n * std`` of their row (n <= 0 is off)."""
    n = rows.tensor("top_n_sigma").unsqueeze(1)
    finite = torch.isfinite(logits)
    count = finite.sum(dim=1, keepdim=True).clamp(min=1)
    values = torch.where(finite, logits, 0.0).to(torch.float64)
    mean = values.sum(dim=1, keepdim=True) / count
    std = (torch.where(finite, values - mean, 0.0).square().sum(dim=1, keepdim=True) / count).sqrt()
    top = torch.where(finite, logits, NEG_INF).amax(dim=1, keepdim=True)
    cut = (top.to(torch.float64) - n.to(torch.float64) * std).to(torch.float32)
    remove = (logits < cut) & (n > 0)
    if min_keep > 1:  # llama.cpp has no min_keep here; beam search needs its candidates
        remove.scatter_(1, torch.topk(logits, min(min_keep, logits.shape[1]), dim=1).indices, False)
    return logits.masked_fill(remove, NEG_INF)


def xtc_coins(rows: RowParams, generators: Sequence[torch.Generator | None] | None,
              device: torch.device) -> torch.Tensor | None:
    """One uniform float32 per row from its own generator, drawn only by rows with XTC on (None: no row)."""
    if not rows.active("xtc_probability"):
        return None
    if generators is None:
        from decodetune.errors import UserError

        raise UserError("xtc_probability: XTC draws a coin per row, which beam_sample does not give it")
    coins = torch.ones(len(rows), dtype=torch.float32, device=device)
    for i in rows.rows_where("xtc_probability"):
        gen = generators[i]
        assert gen is not None
        coins[i] = torch.rand(1, generator=gen, dtype=torch.float32, device=gen.device).to(device)[0]
    return coins


def xtc(logits: torch.Tensor, rows: RowParams, min_keep: int, coins: torch.Tensor) -> torch.Tensor:
    """Exclude top choices on the rows whose coin came up (``coin <= xtc_probability``)."""
    prob = rows.tensor("xtc_probability")
    threshold = rows.tensor("xtc_threshold").unsqueeze(1)
    fire = ((prob > 0) & (coins <= prob)).unsqueeze(1) & (threshold <= 0.5)
    probs = logits.softmax(dim=1)
    ranked, order = torch.sort(probs, dim=1, descending=True, stable=True)
    above = (ranked >= threshold).sum(dim=1, keepdim=True)  # sorted: the tokens >= threshold come first
    drop = above - 1
    remaining = torch.isfinite(logits).sum(dim=1, keepdim=True) - drop
    fire &= (drop > 0) & (remaining >= min_keep)
    ranks = torch.arange(logits.shape[1], device=logits.device)
    remove_ranked = fire & (ranks < drop)
    return logits.masked_fill(torch.zeros_like(remove_ranked).scatter(1, order, remove_ranked), NEG_INF)


def init_mirostat_state(state: TokenState) -> None:
    """mu = 2 tau per row, only when some row uses mirostat."""
    if state.rows.active("mirostat"):
        state.per_row["mirostat_mu"] = 2.0 * state.rows.tensor("mirostat_tau").clone()


def mirostat_truncate(logits: torch.Tensor, rows: RowParams, mu: torch.Tensor) -> torch.Tensor:
    """The candidates mirostat v1 / v2 samples from, per row (``mirostat`` 0 rows pass through)."""
    version = rows.tensor("mirostat").unsqueeze(1)
    probs = logits.softmax(dim=1)
    ranked, order = torch.sort(probs, dim=1, descending=True, stable=True)
    ranks = torch.arange(logits.shape[1], device=logits.device)
    # v2: the tokens whose surprise -log2 p is at most mu (a prefix of the ranking), at least the best one
    keep_v2 = (-torch.log2(ranked) <= mu.unsqueeze(1)) | (ranks == 0)
    keep_v1 = ranks < _mirostat_v1_k(ranked, mu, logits.shape[1]).unsqueeze(1)
    keep_ranked = torch.where(version == 1, keep_v1, torch.where(version == 2, keep_v2, True))
    keep = torch.zeros_like(keep_ranked).scatter(1, order, keep_ranked)
    return logits.masked_fill(~keep, NEG_INF)


def _mirostat_v1_k(ranked: torch.Tensor, mu: torch.Tensor, n_vocab: int) -> torch.Tensor:
    """Mirostat v1's k per row: a Zipf exponent fitted on the best ``m`` probabilities, then its formula."""
    m = min(MIROSTAT_M - 1, ranked.shape[1] - 1)
    i = torch.arange(m, dtype=torch.float32, device=ranked.device)
    t = torch.log((i + 2) / (i + 1))
    b = torch.log(ranked[:, :m] / ranked[:, 1:m + 1])
    s_hat = (t * b).sum(dim=1) / (t * t).sum()
    eps = s_hat - 1
    k = torch.pow(eps * torch.pow(2.0, mu) / (1 - torch.pow(torch.tensor(float(n_vocab)), -eps)), 1 / s_hat)
    # llama.cpp casts k to int: beyond int range (or NaN) that is undefined; we keep every token instead
    too_big = ~(k < 2.0 ** 31)
    return torch.where(too_big, n_vocab, k.clamp(min=1.0, max=2.0 ** 31 - 1).to(torch.long).clamp(min=1))


def update_mirostat(state: TokenState, rows: Sequence[int], probs: torch.Tensor, tokens: torch.Tensor,
                    params: RowParams) -> None:
    """``mu -= eta * (surprise - tau)`` on the mirostat rows among ``rows`` (state rows), from the drawn tokens.

    ``probs`` / ``tokens`` / ``params`` are aligned with ``rows``.
    """
    on = params.tensor("mirostat") > 0
    if not bool(on.any()):
        return
    surprise = -torch.log2(probs.gather(1, tokens.unsqueeze(1)).squeeze(1))
    mu_all = state.per_row["mirostat_mu"]
    idx = _state_rows(params, rows, mu_all.device)
    mu = mu_all.index_select(0, idx)
    new = mu - params.tensor("mirostat_eta") * (surprise - params.tensor("mirostat_tau"))
    mu_all[idx] = torch.where(on, new, mu)


def init_adaptive_p_state(state: TokenState) -> None:
    """adaptive-p's moving average per row, started as llama.cpp does (as if every past token hit the target)."""
    if state.rows.active("adaptive_target"):
        target, decay = state.rows.tensor("adaptive_target"), state.rows.tensor("adaptive_decay")
        state.per_row["adaptive_weighted_sum"] = target / (1.0 - decay)
        state.per_row["adaptive_total_weight"] = 1.0 / (1.0 - decay)


def adaptive_p(logits: torch.Tensor, rows: RowParams, weighted_sum: torch.Tensor,
               total_weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """adaptive-p's logits per row (rows with ``adaptive_target < 0`` pass through), and the probabilities
    before the transform (the moving average is updated with the drawn token's original probability)."""
    probs = logits.softmax(dim=1)
    raw = rows.tensor("adaptive_target")
    target = raw.clamp(0.0, 1.0)
    average = weighted_sum / total_weight
    adapted = torch.where(total_weight == 0, target, 2.0 * target - average).clamp(0.0, 1.0).unsqueeze(1)
    dist = ((probs - adapted) * (1.0 / ADAPTIVE_WIDTH)).abs()
    shaped = ADAPTIVE_PEAK - ADAPTIVE_SHARPNESS * dist * dist / (1.0 + dist)
    # truncated tokens (-inf) stay out, as llama.cpp skips -inf logits
    shaped = torch.where(torch.isfinite(logits), shaped, NEG_INF)
    return torch.where((raw >= 0).unsqueeze(1), shaped, logits), probs


def update_adaptive_p(state: TokenState, rows: Sequence[int], original: torch.Tensor, tokens: torch.Tensor,
                      params: RowParams) -> None:
    """Fold the drawn tokens' original probabilities into the adaptive-p rows' moving average (``rows``: state
    rows; ``original`` / ``tokens`` / ``params`` aligned with them)."""
    on = params.tensor("adaptive_target") >= 0
    if not bool(on.any()):
        return
    p = original.gather(1, tokens.unsqueeze(1)).squeeze(1)
    decay = params.tensor("adaptive_decay")
    idx = _state_rows(params, rows, state.per_row["adaptive_weighted_sum"].device)
    for key, new in (("adaptive_weighted_sum", lambda old: p + decay * old),
                     ("adaptive_total_weight", lambda old: 1.0 + decay * old)):
        values = state.per_row[key]
        old = values.index_select(0, idx)
        values[idx] = torch.where(on, new(old), old)


def _state_rows(params: RowParams, rows: Sequence[int], device: torch.device) -> torch.Tensor:
    """``rows`` (state rows) as an index tensor, cached on ``params`` for the step's stateful updates."""
    return params.cached(("state_rows", tuple(rows)), lambda: torch.tensor(list(rows), device=device))
