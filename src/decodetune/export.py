"""Export a DecodingConfig to the request parameters of other engines.

Each target lacks some of our fields. A field that is *set* (differs from its neutral value) and has
no equivalent raises :class:`ExportError` naming it; ``strict=False`` drops it with a warning instead.
Sampler order is part of the semantics: llama.cpp gets an explicit ``--samplers`` chain, and vLLM /
OpenAI (whose order is fixed) are refused an order they cannot reproduce.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

from decodetune.errors import UserError

if TYPE_CHECKING:
    from decodetune.config import DecodingConfig


class ExportError(UserError):
    """A set config field has no equivalent in the export target."""


#: The value of each optional field that means "off" (exporters and backends' capability checks share it).
NEUTRAL: dict[str, Any] = {
    "min_new_tokens": 0, "stop": [], "top_k": 0, "top_p": 1.0, "min_p": 0.0, "typical_p": 1.0,
    "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "repetition_penalty": 1.0, "presence_penalty": 0.0,
    "frequency_penalty": 0.0, "no_repeat_ngram_size": 0, "length_penalty": 1.0, "early_stopping": False,
    "num_return_sequences": 1, "seed": None, "temperature": 1.0,
}

SAMPLING_FIELDS = ("temperature", "top_k", "top_p", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff")
BEAM_FIELDS = ("length_penalty", "early_stopping")


def active(cfg: DecodingConfig, name: str) -> bool:
    """Whether field ``name`` changes what ``cfg`` generates (set away from neutral, and used by its strategy)."""
    if name in SAMPLING_FIELDS and not cfg.is_sampling:
        return False  # greedy/beam ignore the sampling fields
    if name in BEAM_FIELDS and not cfg.is_beam:
        return False
    if name not in NEUTRAL:
        return False
    return getattr(cfg, name) != NEUTRAL[name]



def _unsupported(cfg: DecodingConfig, target: str, fields: list[str], strict: bool, why: str = "") -> None:
    for name in fields:
        if name in ("strategy", "sampler_order") or active(cfg, name):
            msg = f"{name}={getattr(cfg, name)!r} has no equivalent in {target}{why}"
            if strict:
                raise ExportError(f"{name}: {msg} (use strict=False to drop it)")
            warnings.warn(f"dropped {msg}", stacklevel=3)


def _drop_selection(cfg: DecodingConfig, target: str, strict: bool) -> DecodingConfig:
    """A candidate strategy (self_consistency, mbr, best_of_n) has no engine equivalent: refused, or with
    ``strict=False`` dropped to the sampling config its candidates are drawn with (one sequence)."""
    if not cfg.is_candidate:
        return cfg
    _unsupported(cfg, target, ["strategy"], strict, f" (it samples num_candidates={cfg.num_candidates} "
                                                    "and selects one; no engine does the selection)")
    return cfg.replace(strategy="sample", num_candidates=1)


def _order_matters(cfg: DecodingConfig, fixed: tuple[str, ...]) -> bool:
    """True if the config's order of *active* samplers differs from a target's fixed order."""
    mine = [s for s in cfg.full_sampler_order if active(cfg, s)]
    theirs = [s for s in fixed if active(cfg, s)]
    if set(mine) != set(theirs):
        return False  # missing samplers are reported separately
    # temperature before/after a truncation only matters for truncations that read probabilities
    # of the *tempered* distribution (all but top_k); compare the order of the rest.
    return [s for s in mine if s != "top_k"] != [s for s in theirs if s != "top_k"]


def to_hf(cfg: DecodingConfig, strict: bool = True) -> dict[str, Any]:
    """``transformers.GenerationConfig`` kwargs (transformers' order is our default order)."""
    cfg = _drop_selection(cfg, "transformers", strict)
    _unsupported(cfg, "transformers", ["presence_penalty", "frequency_penalty"], strict)
    if _order_matters(cfg, ("temperature", "top_k", "top_p", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff")):
        _unsupported(cfg, "transformers", ["sampler_order"], strict, " (its sampler order is fixed)")
    out: dict[str, Any] = {
        "do_sample": cfg.is_sampling,
        "num_beams": cfg.num_beams,
        "max_new_tokens": cfg.max_new_tokens,
    }
    if cfg.min_new_tokens:
        out["min_new_tokens"] = cfg.min_new_tokens
    if cfg.stop:
        out["stop_strings"] = list(cfg.stop)
    if cfg.is_sampling:
        out.update(temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p)
        for name in ("min_p", "typical_p", "epsilon_cutoff", "eta_cutoff"):
            if active(cfg, name):
                out[name] = getattr(cfg, name)
    if cfg.repetition_penalty != 1.0:
        out["repetition_penalty"] = cfg.repetition_penalty
    if cfg.no_repeat_ngram_size:
        out["no_repeat_ngram_size"] = cfg.no_repeat_ngram_size
    if cfg.is_beam:
        out.update(length_penalty=cfg.length_penalty, early_stopping=cfg.early_stopping)
    if cfg.num_return_sequences > 1:
        out["num_return_sequences"] = cfg.num_return_sequences
    return out


#: vLLM v1 applies penalties, then temperature, then min_p, then top_k/top_p.
_VLLM_ORDER = ("temperature", "min_p", "top_k", "top_p")


def to_vllm(cfg: DecodingConfig, strict: bool = True) -> dict[str, Any]:
    """``vllm.SamplingParams`` kwargs. vLLM's SamplingParams has no beam search."""
    cfg = _drop_selection(cfg, "vLLM", strict)
    if cfg.is_beam:
        _unsupported(cfg, "vLLM SamplingParams", ["strategy"], strict, " (beam search is a separate vLLM API)")
    _unsupported(cfg, "vLLM", ["typical_p", "epsilon_cutoff", "eta_cutoff", "no_repeat_ngram_size"], strict)
    if _order_matters(cfg, _VLLM_ORDER + ("typical_p", "epsilon_cutoff", "eta_cutoff")):
        _unsupported(cfg, "vLLM", ["sampler_order"], strict, " (vLLM applies min_p before top_k/top_p)")
    out: dict[str, Any] = {"max_tokens": cfg.max_new_tokens, "n": cfg.num_return_sequences}
    if cfg.is_sampling:
        out.update(temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k if cfg.top_k else -1,
                   min_p=cfg.min_p)
    else:
        out["temperature"] = 0.0
    if cfg.min_new_tokens:
        out["min_tokens"] = cfg.min_new_tokens
    if cfg.stop:
        out["stop"] = list(cfg.stop)
    for name in ("repetition_penalty", "presence_penalty", "frequency_penalty", "seed"):
        if getattr(cfg, name) != NEUTRAL[name]:
            out[name] = getattr(cfg, name)
    return out


_LLAMACPP_NAMES = {"temperature": "temperature", "top_k": "top_k", "top_p": "top_p", "min_p": "min_p",
                   "typical_p": "typ_p"}


def to_llamacpp(cfg: DecodingConfig, strict: bool = True) -> list[str]:
    """llama.cpp flags. The sampler chain order is exported with ``--samplers``."""
    cfg = _drop_selection(cfg, "llama.cpp", strict)
    if cfg.is_beam:
        _unsupported(cfg, "llama.cpp", ["strategy"], strict, " (llama.cpp removed beam search)")
    _unsupported(cfg, "llama.cpp", ["epsilon_cutoff", "eta_cutoff", "no_repeat_ngram_size", "min_new_tokens"],
                 strict)
    if cfg.num_return_sequences > 1:
        _unsupported(cfg, "llama.cpp CLI", ["num_return_sequences"], strict)
    flags = ["-n", str(cfg.max_new_tokens)]
    penalised = bool(cfg.repetition_penalty != 1.0 or cfg.presence_penalty or cfg.frequency_penalty)
    if not cfg.is_sampling:
        flags += ["--temp", "0"]  # llama.cpp's default chain then keeps only the (penalised) argmax
    else:
        flags += ["--temp", f"{cfg.temperature:g}", "--top-k", str(cfg.top_k), "--top-p", f"{cfg.top_p:g}",
                  "--min-p", f"{cfg.min_p:g}", "--typical", f"{cfg.typical_p:g}"]
        # penalties is a sampler of the --samplers list: a chain without it applies no penalty at all
        chain = (["penalties"] if penalised else []) + [
            _LLAMACPP_NAMES[s] for s in cfg.full_sampler_order if s in _LLAMACPP_NAMES]
        flags += ["--samplers", ";".join(chain)]
    if penalised:
        # -1: the whole context (default 64), the window decodetune's llamacpp backend uses
        flags += ["--repeat-last-n", "-1"]
    if cfg.repetition_penalty != 1.0:
        flags += ["--repeat-penalty", f"{cfg.repetition_penalty:g}"]
    if cfg.presence_penalty:
        flags += ["--presence-penalty", f"{cfg.presence_penalty:g}"]
    if cfg.frequency_penalty:
        flags += ["--frequency-penalty", f"{cfg.frequency_penalty:g}"]
    for s in cfg.stop:
        flags += ["--reverse-prompt", s]
    if cfg.seed is not None:
        flags += ["--seed", str(cfg.seed)]
    return flags


def to_openai(cfg: DecodingConfig, strict: bool = True) -> dict[str, Any]:
    """OpenAI chat/completions request parameters (temperature 0 for greedy)."""
    cfg = _drop_selection(cfg, "the OpenAI API", strict)
    if cfg.is_beam:
        _unsupported(cfg, "the OpenAI API", ["strategy"], strict)
    _unsupported(cfg, "the OpenAI API", ["top_k", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff",
                                         "repetition_penalty", "no_repeat_ngram_size", "min_new_tokens"], strict)
    if len(cfg.stop) > 4:
        _unsupported(cfg, "the OpenAI API (at most 4 stop strings)", ["stop"], strict)
    out: dict[str, Any] = {"max_tokens": cfg.max_new_tokens}
    out["temperature"] = cfg.temperature if cfg.is_sampling else 0.0
    if cfg.is_sampling and cfg.top_p != 1.0:
        out["top_p"] = cfg.top_p
    if cfg.presence_penalty:
        out["presence_penalty"] = cfg.presence_penalty
    if cfg.frequency_penalty:
        out["frequency_penalty"] = cfg.frequency_penalty
    if cfg.stop:
        out["stop"] = list(cfg.stop[:4])
    if cfg.num_return_sequences > 1:
        out["n"] = cfg.num_return_sequences
    if cfg.seed is not None:
        out["seed"] = cfg.seed
    return out
