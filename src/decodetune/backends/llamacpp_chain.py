"""The native llama.cpp sampler chain of one sequence, built the way ``common_sampler_init`` builds it for the
flags :func:`decodetune.export.to_llamacpp` writes (so a study on the llamacpp backend exports exactly):

* ``logit_bias`` first (``ignore_eos`` adds a -inf bias on every end-of-generation token, as ``--ignore-eos``);
* with mirostat (1 or 2) and sampling: ``temperature -> mirostat`` and nothing else, llama.cpp's mirostat chain
  (the backend refuses penalties and DRY beside it, ``Capabilities.mirostat_alone``);
* otherwise ``penalties`` (over ``penalty_last_n`` tokens, -1 = the context), ``dry``, then the config's
  ``sampler_order`` (temperature as ``temp_ext`` when ``dynatemp_range`` is set, top_k, top_p, min_p,
  typical, top-nσ, XTC), then ``dist(seed)``, or ``adaptive_p(seed)`` in its place when ``adaptive_target`` is
  set (llama.cpp adds it last when ``--samplers`` names ``adaptive_p``); greedy configs end in ``greedy``
  after the penalties and DRY.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from typing import Any

from decodetune.backends.base import PENALTIES, active
from decodetune.config import DecodingConfig

#: llama.cpp's mirostat v1 estimates s_hat over this many tokens (``common_sampler_init``'s value)
MIROSTAT_M = 100


def window(last_n: int, n_ctx: int) -> int:
    """A ``*_last_n`` value for the native samplers: -1 is the whole context (as llama.cpp's CLI maps it)."""
    return n_ctx if last_n == -1 else last_n


def build_chain(llama_cpp: Any, cfg: DecodingConfig, seed: int, n_vocab: int, n_ctx: int, vocab: Any = None,
                eog: Sequence[int] = ()) -> Any:
    """A native sampler chain for ``cfg`` (caller frees it with ``llama_sampler_free``).

    ``vocab`` (the model's ``llama_vocab``) is needed for DRY, ``eog`` (the end-of-generation token ids)
    for ``ignore_eos``.
    """
    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())

    def add(sampler: Any) -> None:
        llama_cpp.llama_sampler_chain_add(chain, sampler)

    bias = dict(cfg.logit_bias)
    if cfg.ignore_eos:
        bias.update({int(t): float("-inf") for t in eog})
    if bias:
        add(logit_bias_sampler(llama_cpp, n_vocab, bias))
    if cfg.is_sampling and active(cfg, "mirostat"):
        add(llama_cpp.llama_sampler_init_temp(cfg.temperature))
        tau, eta = cfg.mirostat_tau, cfg.mirostat_eta
        add(llama_cpp.llama_sampler_init_mirostat(n_vocab, seed, tau, eta, MIROSTAT_M) if cfg.mirostat == 1
            else llama_cpp.llama_sampler_init_mirostat_v2(seed, tau, eta))
        return chain
    if any(active(cfg, p) for p in PENALTIES):
        add(llama_cpp.llama_sampler_init_penalties(n_vocab, window(cfg.penalty_last_n, n_ctx), cfg.repetition_penalty,
                                                   cfg.frequency_penalty, cfg.presence_penalty))
    if active(cfg, "dry_multiplier"):
        add(dry_sampler(llama_cpp, cfg, vocab, n_ctx))
    if not cfg.is_sampling:
        add(llama_cpp.llama_sampler_init_greedy())
        return chain
    for name in cfg.full_sampler_order:
        sampler = _stage(llama_cpp, cfg, name, seed)
        if sampler is not None:
            add(sampler)
    if active(cfg, "adaptive_target"):
        add(llama_cpp.llama_sampler_init_adaptive_p(cfg.adaptive_target, cfg.adaptive_decay, seed))
    else:
        add(llama_cpp.llama_sampler_init_dist(seed))
    return chain


def _stage(llama_cpp: Any, cfg: DecodingConfig, name: str, seed: int) -> Any:
    """The native sampler of one sampler-order stage, or None when the stage is off."""
    if name == "temperature":
        if active(cfg, "dynatemp_range"):
            return llama_cpp.llama_sampler_init_temp_ext(cfg.temperature, cfg.dynatemp_range, cfg.dynatemp_exponent)
        return llama_cpp.llama_sampler_init_temp(cfg.temperature)
    if name == "top_k" and cfg.top_k > 0:
        return llama_cpp.llama_sampler_init_top_k(cfg.top_k)
    if name == "top_p" and cfg.top_p < 1.0:
        return llama_cpp.llama_sampler_init_top_p(cfg.top_p, 1)
    if name == "min_p" and cfg.min_p > 0.0:
        return llama_cpp.llama_sampler_init_min_p(cfg.min_p, 1)
    if name == "typical_p" and cfg.typical_p < 1.0:
        return llama_cpp.llama_sampler_init_typical(cfg.typical_p, 1)
    if name == "top_n_sigma" and active(cfg, "top_n_sigma"):
        return llama_cpp.llama_sampler_init_top_n_sigma(cfg.top_n_sigma)
    if name == "xtc" and active(cfg, "xtc_probability"):
        # XTC draws from its own RNG, seeded like dist (llama.cpp passes params.seed to both)
        return llama_cpp.llama_sampler_init_xtc(cfg.xtc_probability, cfg.xtc_threshold, 1, seed)
    return None


def logit_bias_sampler(llama_cpp: Any, n_vocab: int, bias: dict[int, float]) -> Any:
    """``llama_sampler_init_logit_bias`` over ``{token: bias}`` (the sampler copies the array)."""
    items = sorted(bias.items())
    array = (llama_cpp.llama_logit_bias * len(items))(*[llama_cpp.llama_logit_bias(t, b) for t, b in items])
    return llama_cpp.llama_sampler_init_logit_bias(n_vocab, len(items), array)


def dry_sampler(llama_cpp: Any, cfg: DecodingConfig, vocab: Any, n_ctx: int) -> Any:
    """``llama_sampler_init_dry`` with the config's breakers (the sampler copies the strings)."""
    if vocab is None:
        raise ValueError("DRY needs the model's vocab")
    encoded = [b.encode("utf-8") for b in cfg.dry_sequence_breakers]
    breakers = (ctypes.c_char_p * max(1, len(encoded)))(*encoded)
    return llama_cpp.llama_sampler_init_dry(vocab, cfg.dry_multiplier, cfg.dry_base, cfg.dry_allowed_length,
                                            window(cfg.dry_penalty_last_n, n_ctx), breakers, len(encoded))
