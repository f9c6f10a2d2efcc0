"""What each OpenAI-compatible server family accepts, and the request body decodetune sends it.

The openai backend (:mod:`decodetune.backends.openai`) probes the family when it opens; its capabilities
are :data:`~decodetune.backends.capabilities.OPENAI_ANY` narrowed by :data:`FAMILY_FIELDS`, and each request
carries only those fields (:func:`request_body`).
"""

from __future__ import annotations

import warnings
from dataclasses import replace
from typing import Any

from decodetune.backends.base import Capabilities, active
from decodetune.backends.capabilities import LLAMACPP_SAMPLERS, OPENAI_ANY, VLLM_ORDER, VLLM_TOKEN_CONTROLS
from decodetune.config import DecodingConfig
from decodetune.export_llama import llamacpp_server_body

#: the DecodingConfig fields each server family accepts (besides the common OpenAI ones)
FAMILY_FIELDS: dict[str, frozenset[str]] = {
    "vllm": frozenset({"top_k", "min_p", "repetition_penalty", "min_new_tokens"}) | VLLM_TOKEN_CONTROLS,
    # llama_cpp/server/types.py: top_k, min_p, repeat_penalty, min_tokens (a logits processor); no typical_p
    "llama-cpp-python": frozenset({"top_k", "min_p", "repetition_penalty", "min_new_tokens"}),
    # llama-server's JSON body has all of llama.cpp's samplers (export_llama.llamacpp_server_body)
    "llama.cpp": LLAMACPP_SAMPLERS,
    "ollama": frozenset(), "openai": frozenset(), "other": frozenset(),
}
COMMON_FIELDS = OPENAI_ANY.fields - frozenset().union(*FAMILY_FIELDS.values())
#: llama-cpp-python's Llama._init_sampler: penalties -> top_k -> typical -> top_p -> min_p -> temp -> dist
LLAMA_CPP_PYTHON_ORDER = ("top_k", "top_p", "min_p", "temperature")
_ORDER = {"vllm": VLLM_ORDER, "llama-cpp-python": LLAMA_CPP_PYTHON_ORDER}
_SEEDED = {"vllm", "llama-cpp-python", "llama.cpp", "ollama"}
_NOTES = {
    "llama-cpp-python": {
        "repetition_penalty": "llama.cpp penalties over the server's last_n_tokens_size (64) tokens, prompt included",
        "presence_penalty": "llama.cpp counts prompt tokens too (torch: output only)",
        "frequency_penalty": "llama.cpp counts prompt tokens too (torch: output only)",
        "num_tokens": "usage.completion_tokens leaves out the EOS token (torch counts it)",
        "finish_reason": "'stop' with stop strings set cannot tell EOS from a stop string"},
    "llama.cpp": {"repetition_penalty": "llama.cpp penalties over penalty_last_n tokens, prompt included",
                  "ignore_eos": "end-of-generation tokens are banned (llama.cpp); torch and vLLM go on past them"},
    "ollama": {"top_k": "needs Ollama's native /api options, not its /v1 endpoint"},
}


def family_capabilities(family: str) -> Capabilities:
    """OPENAI_ANY narrowed to what ``family`` accepts."""
    return replace(OPENAI_ANY, fields=COMMON_FIELDS | FAMILY_FIELDS.get(family, frozenset()),
                   sampler_order=_ORDER.get(family), reproducible_seeds=family in _SEEDED,
                   notes=dict(_NOTES.get(family, {})))


def request_body(cfg: DecodingConfig, seed: int | None, family: str) -> dict[str, Any]:
    """The sampling fields of one request for ``cfg`` on a server of ``family`` (no model, no prompt)."""
    sampling = cfg.is_sampling
    if family == "llama.cpp":  # every llama.cpp sampler, in the config's order (one definition with the export)
        with warnings.catch_warnings():  # check_config has refused what the family lacks; the body carries the rest
            warnings.simplefilter("ignore")
            body = llamacpp_server_body(cfg.replace(num_return_sequences=1, seed=None), strict=False)
        if sampling and seed is not None:
            body["seed"] = seed
        return body
    body: dict[str, Any] = {"max_tokens": cfg.max_new_tokens, "temperature": cfg.temperature if sampling else 0.0}
    if sampling and cfg.top_p != 1.0:
        body["top_p"] = cfg.top_p
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(cfg, name):
            body[name] = getattr(cfg, name)
    if cfg.stop:
        body["stop"] = list(cfg.stop)
    if sampling and seed is not None:
        body["seed"] = seed
    if family == "llama-cpp-python":
        # the server defaults are not neutral (top_k 40, min_p 0.05, repeat 1.1), so send every sampler
        body.update(top_k=cfg.top_k if sampling else 0, top_p=cfg.top_p if sampling else 1.0,
                    min_p=cfg.min_p if sampling else 0.0, repeat_penalty=cfg.repetition_penalty)
    if family == "vllm":
        body.update({n: getattr(cfg, n) for n in ("top_k", "min_p", "repetition_penalty") if active(cfg, n)})
        body.update(_vllm_token_controls(cfg))
    if cfg.min_new_tokens and family in ("vllm", "llama-cpp-python"):
        body["min_tokens"] = cfg.min_new_tokens
    return body


def _vllm_token_controls(cfg: DecodingConfig) -> dict[str, Any]:
    """vLLM's extra request parameters: logit_bias (token ids as strings), bad_words, stop_token_ids, ignore_eos."""
    out: dict[str, Any] = {}
    if cfg.logit_bias:
        out["logit_bias"] = {str(t): b for t, b in sorted(cfg.logit_bias.items())}
    for name in ("bad_words", "stop_token_ids"):
        if getattr(cfg, name):
            out[name] = list(getattr(cfg, name))
    if cfg.ignore_eos:
        out["ignore_eos"] = True
    return out
