"""Distribution samplers (temperature and the truncations) and the per-row seeded token draw.

Each stage has transformers' semantics (``generation/logits_process.py``), vectorised with one parameter
per row: ``temperature`` (``logits / T``), ``top_k`` (ties with the k-th score are kept), ``top_p`` (the
smallest set of most likely tokens with mass >= p), ``min_p`` (keep p >= min_p * p_max), ``typical_p``
(locally typical sampling), ``epsilon_cutoff`` (keep p >= epsilon) and ``eta_cutoff`` (keep
p >= min(eta, sqrt(eta) * exp(-entropy)), Hewitt et al. 2022). Truncations never keep fewer than
``min_keep`` tokens (1 for sampling; for stochastic beam search, as transformers, the number of EOS ids + 1,
and 2 without any EOS id).

llama.cpp's ``top_n_sigma`` and ``xtc`` stages, dynamic temperature (the ``temperature`` stage when
``dynatemp_range > 0``), mirostat and adaptive-p live in :mod:`decodetune.decoding.llama_samplers`; mirostat
rows run temperature then mirostat, nothing else (llama.cpp's chain), and mirostat is always last; adaptive-p
(``adaptive_target >= 0``) runs after the whole chain and the token is drawn from it (llama.cpp puts it in
place of ``dist``).

Compared with llama.cpp (tests/test_llama_reference.py runs both): temperature, top-p, min-p and typical
keep the same sets on the same logits, up to float rounding at a boundary (top-p and typical sum
probabilities in another order; min-p compares probabilities, llama.cpp logits ``>= max + log p``; typical
keeps through the first cumulative mass ``>= p`` where llama.cpp needs ``> p``). top-k keeps every token
tied with the k-th score (transformers); llama.cpp keeps exactly k, the tied ones in an unspecified order.

Rows run the stages in their own ``full_sampler_order``; rows with different orders in one batch are
grouped by order. A stage whose parameter is neutral on every row is skipped.

Drawing: each row owns a ``torch.Generator`` seeded from its own seed and consumes a fixed amount of it per
step, so its tokens depend on nothing but (prompt, config, seed), never on the rest of the batch. A flat
row draws one uniform ``u`` per step and takes the token where the float64 cumulative distribution crosses
``u`` (inverse CDF, what ``torch.multinomial`` does, but with the row's own stream); stochastic beam search
needs a sample *without replacement* and uses the exponential race instead: the top-k of
``probs / E`` with ``E ~ Exponential(1)`` i.i.d. per candidate (Gumbel-top-k).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

import torch

from decodetune.decoding import llama_samplers as L
from decodetune.decoding.processors import RowParams, TokenState
from decodetune.errors import UserError

NEG_INF = float("-inf")

Stage = Callable[[torch.Tensor, RowParams, int], torch.Tensor]


def temperature(logits: torch.Tensor, rows: RowParams, min_keep: int) -> torch.Tensor:
    """``logits / T`` per row (T > 0 here: temperature 0 rows are greedy and never reach the samplers);
    llama.cpp's entropy-based ``temp_ext`` on rows with ``dynatemp_range > 0``."""
    if rows.active("dynatemp_range"):
        return L.dynamic_temperature(logits, rows)
    return logits / rows.tensor("temperature").unsqueeze(1)


def top_k(logits: torch.Tensor, rows: RowParams, min_keep: int) -> torch.Tensor:
    """Keep the tokens scoring at least the k-th best score of their row (0 = off).

    Only the rows that truncate are ranked, and only as deep as their largest k: a row with top_k = 0 (or
    k >= vocabulary) would otherwise force a full-vocabulary top-k on the whole batch. Its threshold is
    -inf, which removes nothing (as its own vocab-th score did before).
    """
    vocab = logits.shape[1]
    ks = [min(max(k, min_keep), vocab) if k > 0 else vocab for k in rows.values["top_k"]]
    on = rows.cached(("top_k_rows", vocab, min_keep), lambda: [i for i, k in enumerate(ks) if k < vocab])
    if not on:
        return logits
    whole = len(on) == len(ks)
    kth_index = rows.cached(("top_k_index", vocab, min_keep),
                            lambda: torch.tensor([ks[i] for i in on], device=logits.device).sub_(1).unsqueeze(1))
    sub = logits if whole else logits.index_select(0, rows.index_tensor(on))
    kth = torch.topk(sub, max(ks[i] for i in on), dim=1).values.gather(1, kth_index)
    if not whole:
        kth = torch.full((len(ks), 1), NEG_INF, dtype=logits.dtype, device=logits.device).index_copy_(
            0, rows.index_tensor(on), kth)
    return logits.masked_fill(logits < kth, NEG_INF)


#: How deep top-p ranks a row before falling back to a full sort: a row whose ``k`` most likely tokens
#: already hold mass >= p drops everything below them, so only those ``k`` need ranking (~8-40x cheaper).
TOP_P_DEPTHS = (256, 2048)


def top_p(logits: torch.Tensor, rows: RowParams, min_keep: int) -> torch.Tensor:
    """Nucleus: keep a token iff the mass of the tokens ranked above it is < p (transformers' rule).

    Each row is ranked only as deep as it needs (see :data:`TOP_P_DEPTHS`), decided from that row
    alone, and every depth applies the rule to the same float32 prefix sums of the row's ranked
    probabilities; so a row keeps the same set whatever else is in the batch. (transformers sums the same
    rule from the least likely end, so the two can differ by one token where a prefix sum ties with p.)
    """
    vocab = logits.shape[1]
    # the shortcut asks the host which rows each depth covered (a sync); cheap on CPU, a stall on CUDA,
    # where the full sort is fast anyway: one path, no sync
    depths = [] if logits.is_cuda else [k for k in TOP_P_DEPTHS if min_keep <= k and k * 4 < vocab]
    return logits.masked_fill(~_top_p_keep(logits.softmax(dim=1), rows, min_keep, depths), NEG_INF)


def _top_p_keep(probs: torch.Tensor, rows: RowParams, min_keep: int, depths: Sequence[int]) -> torch.Tensor:
    """The kept mask: each row at the first depth that covers its p, else over a full sort; p = 1 keeps all."""
    p_all = rows.tensor("top_p").unsqueeze(1)
    keep = torch.ones_like(probs, dtype=torch.bool)
    pending = list(range(len(rows)))
    for depth in [*depths, None]:
        whole = len(pending) == len(rows)  # the usual case: no copy of the batch
        idx = None if whole else torch.tensor(pending, device=probs.device)
        sub_keep, done = _nucleus(probs if whole else probs.index_select(0, idx),
                                  p_all if whole else p_all.index_select(0, idx), min_keep, depth)
        if depth is None:  # a full sort covers every row: no need to ask the device which
            if whole:
                keep = sub_keep
            else:
                keep[idx] = sub_keep
            break
        done_host = done.tolist()
        if whole and all(done_host):
            keep = sub_keep
        else:
            done_at = done.nonzero().squeeze(1)
            keep[done_at if whole else idx[done_at]] = sub_keep[done_at]
        pending = [i for i, d in zip(pending, done_host, strict=True) if not d]
        if not pending:
            break
    return keep | (p_all >= 1)  # p = 1 is off, even where float sums stay below 1


def _nucleus(probs: torch.Tensor, p: torch.Tensor, min_keep: int,
             depth: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Kept mask over the ``depth`` most likely tokens (all when None), and which rows that depth covers."""
    ranked, order = torch.topk(probs, depth, dim=1) if depth else torch.sort(probs, dim=1, descending=True)
    mass = ranked.cumsum(dim=1)
    # the mass above each token is the inclusive sum one rank up (exact, unlike mass - ranked)
    above = torch.cat([torch.zeros_like(mass[:, :1]), mass[:, :-1]], dim=1)
    ranked_keep = above < p
    ranked_keep[:, :min_keep] = True
    # covered: the first token below this depth has mass[:, -1] >= p above it, so it and all below go
    done = (mass[:, -1:] >= p) | (p >= 1) if depth else torch.ones_like(p, dtype=torch.bool)
    return torch.zeros_like(probs, dtype=torch.bool).scatter_(1, order, ranked_keep), done.squeeze(1)


def min_p(logits: torch.Tensor, rows: RowParams, min_keep: int) -> torch.Tensor:
    """Keep tokens with probability >= min_p * (probability of the most likely token)."""
    probs = logits.softmax(dim=1)
    remove = probs < rows.tensor("min_p").unsqueeze(1) * probs.amax(dim=1, keepdim=True)
    if min_keep > 1:
        remove.scatter_(1, torch.topk(probs, min(min_keep, probs.shape[1]), dim=1).indices, False)
    return logits.masked_fill(remove, NEG_INF)


def typical_p(logits: torch.Tensor, rows: RowParams, min_keep: int) -> torch.Tensor:
    """Locally typical sampling (Meister et al.): keep the tokens whose surprisal is closest to the entropy."""
    logp = logits.log_softmax(dim=1)
    entropy = -(logp * logp.exp()).nansum(dim=1, keepdim=True)
    shifted = (-logp - entropy).abs()
    sorted_shifted, sorted_idx = torch.sort(shifted, dim=1, descending=False)
    cumulative = logits.gather(1, sorted_idx).softmax(dim=1).cumsum(dim=1)
    mass = rows.tensor("typical_p").unsqueeze(1)
    last = (cumulative < mass).sum(dim=1, keepdim=True).clamp_(max=logits.shape[1] - 1)
    remove = sorted_shifted > sorted_shifted.gather(1, last)
    remove[:, :min_keep] = False
    remove &= mass < 1
    return logits.masked_fill(remove.scatter(1, sorted_idx, remove), NEG_INF)


def epsilon_cutoff(logits: torch.Tensor, rows: RowParams, min_keep: int) -> torch.Tensor:
    """Keep tokens with probability >= epsilon (and always the ``min_keep`` best)."""
    remove = logits.softmax(dim=1) < rows.tensor("epsilon_cutoff").unsqueeze(1)
    return logits.masked_fill(remove & _below_top(logits, min_keep), NEG_INF)


def eta_cutoff(logits: torch.Tensor, rows: RowParams, min_keep: int) -> torch.Tensor:
    """Keep tokens with probability >= min(eta, sqrt(eta) * exp(-entropy))."""
    logp = logits.log_softmax(dim=1)
    probs = logp.exp()
    # entropy as torch.distributions.Categorical computes it: -inf log-probs clamped, so 0 * log 0 = 0
    entropy = -(logp.clamp(min=torch.finfo(logp.dtype).min) * probs).sum(dim=1, keepdim=True)
    eps = rows.tensor("eta_cutoff").unsqueeze(1)
    eta = torch.minimum(eps, eps.sqrt() * torch.exp(-entropy))
    return logits.masked_fill((probs < eta) & _below_top(logits, min_keep), NEG_INF)


def _below_top(logits: torch.Tensor, min_keep: int) -> torch.Tensor:
    """Tokens scoring strictly below the ``min_keep``-th best of their row."""
    if min_keep == 1:
        return logits < logits.amax(dim=1, keepdim=True)
    return logits < torch.topk(logits, min(min_keep, logits.shape[1]), dim=1).values[:, -1:]


#: name -> (stage, the RowParams fields of which one must be non-neutral on some row for it to run);
#: ``xtc`` is run by :func:`_run_chain` itself, with the rows' coins.
STAGES: dict[str, tuple[Stage, tuple[str, ...]]] = {
    "temperature": (temperature, ("temperature", "dynatemp_range")),
    "top_k": (top_k, ("top_k",)),
    "top_p": (top_p, ("top_p",)),
    "min_p": (min_p, ("min_p",)),
    "typical_p": (typical_p, ("typical_p",)),
    "epsilon_cutoff": (epsilon_cutoff, ("epsilon_cutoff",)),
    "eta_cutoff": (eta_cutoff, ("eta_cutoff",)),
    "top_n_sigma": (L.top_n_sigma, ("top_n_sigma",)),
}


def apply_samplers(logits: torch.Tensor, rows: RowParams, min_keep: int = 1,
                   coins: torch.Tensor | None = None) -> torch.Tensor:
    """Run the distribution stages on every row in that row's ``full_sampler_order``.

    ``coins``: XTC's per-row uniforms (:func:`~decodetune.decoding.llama_samplers.xtc_coins`); rows with XTC
    need them. Mirostat selects the token itself, so it runs only through :func:`sample_tokens`.
    """
    for name in ("mirostat", "adaptive_target"):
        if rows.active(name):
            raise UserError(f"{name}: selects the token itself, which beam search cannot use; use strategy sample")
    if coins is None and rows.active("xtc_probability"):
        raise UserError("xtc_probability: XTC draws a coin per row, which beam_sample does not give it")
    return _apply_chains(logits, rows, min_keep, coins)


def _apply_chains(logits: torch.Tensor, rows: RowParams, min_keep: int, coins: torch.Tensor | None) -> torch.Tensor:
    groups = rows.order_groups()
    if len(groups) == 1:
        return _run_chain(groups[0][0], logits, rows, min_keep, coins)
    out = logits.clone()
    for order, idx in groups:
        idx_t = rows.index_tensor(idx)
        sub_coins = None if coins is None else coins.index_select(0, idx_t)
        out[idx_t] = _run_chain(order, logits.index_select(0, idx_t), rows.subset(idx), min_keep, sub_coins)
    return out


def _run_chain(order: Sequence[str], logits: torch.Tensor, rows: RowParams, min_keep: int,
               coins: torch.Tensor | None) -> torch.Tensor:
    for name in order:
        if name == "xtc":
            if coins is not None and rows.active("xtc_probability"):
                logits = L.xtc(logits, rows, min_keep, coins)
            continue
        stage, fields = STAGES[name]
        if any(rows.active(f) for f in fields):
            logits = stage(logits, rows, min_keep)
    return logits


def sample_tokens(scores: torch.Tensor, params: RowParams, generators: Sequence[torch.Generator | None],
                  state: TokenState | None = None) -> torch.Tensor:
    """One token per row: argmax for greedy rows; for sampling rows their chain (XTC coin first), mirostat or
    adaptive-p, and the seeded draw, then mirostat's mu / adaptive-p's average update from the drawn token
    (``state`` holds them)."""
    sampling = params.cached("sampling_rows", lambda: [i for i, s in enumerate(params.sampling) if s])
    if not sampling:
        return scores.argmax(dim=1)
    whole = len(sampling) == len(params)
    rows = params if whole else params.subset(sampling)
    sub = scores if whole else scores.index_select(0, params.index_tensor(sampling))
    gens = list(generators) if whole else [generators[i] for i in sampling]
    logits = _apply_chains(sub, rows, 1, L.xtc_coins(rows, gens, scores.device))
    mirostat = rows.active("mirostat")
    if mirostat:
        if state is None or "mirostat_mu" not in state.per_row:
            raise UserError("mirostat: needs the token state (mu per row) in sample_tokens")
        mu = state.per_row["mirostat_mu"]
        logits = L.mirostat_truncate(logits, rows, mu if whole else mu.index_select(0, params.index_tensor(sampling)))
    adaptive = rows.active("adaptive_target")
    if adaptive:
        if state is None or "adaptive_weighted_sum" not in state.per_row:
            raise UserError("adaptive_target: needs the token state (its moving average per row) in sample_tokens")
        ws, tw = state.per_row["adaptive_weighted_sum"], state.per_row["adaptive_total_weight"]
        if not whole:
            ws, tw = (t.index_select(0, params.index_tensor(sampling)) for t in (ws, tw))
        logits, original = L.adaptive_p(logits, rows, ws, tw)
    probs = logits.softmax(dim=1)
    drawn = draw(probs, gens)  # type: ignore[arg-type]
    if mirostat:
        L.update_mirostat(state, sampling, probs, drawn, rows)  # type: ignore[arg-type]
    if adaptive:
        L.update_adaptive_p(state, sampling, original, drawn, rows)  # type: ignore[arg-type]
    if whole:
        return drawn
    tokens = scores.argmax(dim=1)
    tokens[params.index_tensor(sampling)] = drawn
    return tokens


def exponential_noise(shape: tuple[int, int], generators: Sequence[torch.Generator],
                      device: torch.device) -> torch.Tensor:
    """One row of Exponential(1) noise per generator (each row draws from its own stream only)."""
    noise = torch.empty(shape, dtype=torch.float32, device=device)
    for row, gen in zip(noise, generators, strict=True):
        row.exponential_(generator=gen)
    # an exact 0 would turn a zero-probability token into 0/0 = NaN, which argmax would pick
    return noise.clamp_(min=torch.finfo(torch.float32).tiny)


def draw(probs: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """One token per row from ``probs`` (rows sum to 1, up to rounding), by inverse CDF on one uniform per row.

    One ``torch.rand`` per row (one small launch each): the rows' streams must stay their own, independent
    of the batch, and torch has no batched draw from a list of generators.
    """
    u = torch.cat([torch.rand(1, generator=g, dtype=torch.float64, device=probs.device) for g in generators])
    cdf = probs.to(torch.float64).cumsum_(dim=1)
    idx = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(1), right=True).squeeze(1)
    # u < 1, so only rounding could land past the last token; fall back to the most likely one there
    return torch.where(idx < probs.shape[1], idx, probs.argmax(dim=1))


def row_seed(seed: int, sequence_index: int) -> int:
    """The generator seed of sequence ``sequence_index`` of a prompt decoded with ``seed`` (63-bit)."""
    digest = hashlib.blake2b(f"{seed}:{sequence_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def make_generator(seed: int, device: torch.device) -> torch.Generator:
    """A fresh generator on ``device`` seeded with ``seed``."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen
