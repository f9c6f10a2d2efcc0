"""What each backend kind can do, known without loading anything (the CLI checks spaces against it).

The torch engine honours every DecodingConfig field. The others honour the fields their engine has a
sampler for; anything else is refused up front (the tuner's default space leaves it out). A server's
real capabilities are probed when it is opened (:mod:`decodetune.backends.openai`); the static table
for ``openai`` is the union over the server families it knows, so a probe can only narrow it.
"""

from __future__ import annotations

from decodetune.backends.base import Capabilities
from decodetune.errors import UserError

_COMMON = frozenset({"max_new_tokens", "stop", "temperature", "top_p", "seed", "num_return_sequences",
                     "presence_penalty", "frequency_penalty"})
#: llama.cpp's own samplers beyond the common ones (native ``llama_sampler_init_*``; ``logit_bias`` also
#: carries ``ignore_eos``, which llama.cpp implements as a -inf bias on every end-of-generation token)
LLAMACPP_SAMPLERS = frozenset({"top_k", "min_p", "typical_p", "repetition_penalty", "penalty_last_n",
                               "dry_multiplier", "dry_base", "dry_allowed_length", "dry_penalty_last_n",
                               "dry_sequence_breakers", "xtc_threshold", "xtc_probability", "top_n_sigma",
                               "mirostat", "mirostat_tau", "mirostat_eta", "dynatemp_range", "dynatemp_exponent",
                               "adaptive_target", "adaptive_decay", "logit_bias", "ignore_eos"})
#: vLLM's token-level controls (SamplingParams and its OpenAI server's extra parameters)
VLLM_TOKEN_CONTROLS = frozenset({"logit_bias", "bad_words", "stop_token_ids", "ignore_eos"})

#: llama.cpp through llama-cpp-python: the chain is built in each config's ``sampler_order`` (as
#: ``--samplers`` does), after the penalties sampler.
LLAMACPP = Capabilities(
    strategies=frozenset({"greedy", "sample"}),
    fields=_COMMON | LLAMACPP_SAMPLERS | {"sampler_order", "stop_token_ids"},
    sampler_order=None,
    reproducible_seeds=True,
    mirostat_alone=True,
    notes={"repetition_penalty": "llama.cpp penalties sampler over penalty_last_n tokens (prompt + output)",
           "ignore_eos": "end-of-generation tokens are banned (llama.cpp --ignore-eos); torch and vLLM let them "
                         "be generated and go on",
           "dry_multiplier": "llama.cpp DRY sampler, after the penalties, over prompt and output",
           "logit_bias": "added first, before the penalties (llama.cpp's chain)",
           "presence_penalty": "llama.cpp counts prompt tokens too (torch: output only)",
           "frequency_penalty": "llama.cpp counts prompt tokens too (torch: output only)",
           "weights": "the GGUF's own quantised weights (torch de-quantises them to fp32)"},
)

#: vLLM v1 applies penalties, then temperature, then min_p, then top_k / top_p.
VLLM_ORDER = ("temperature", "min_p", "top_k", "top_p")

VLLM = Capabilities(
    strategies=frozenset({"greedy", "sample"}),
    # top_logprobs: SamplingParams(logprobs=N) has it, but Generation has no place for them yet
    fields=_COMMON | VLLM_TOKEN_CONTROLS | {"top_k", "min_p", "repetition_penalty", "min_new_tokens"},
    sampler_order=VLLM_ORDER,
    reproducible_seeds=True,
    notes={"presence_penalty": "output tokens only", "frequency_penalty": "output tokens only",
           "repetition_penalty": "prompt and output tokens"},
)

#: The union over server families; the probe of a real server narrows it.
OPENAI_ANY = Capabilities(
    strategies=frozenset({"greedy", "sample"}),
    fields=_COMMON | LLAMACPP_SAMPLERS | VLLM_TOKEN_CONTROLS | {"min_new_tokens"},
    sampler_order=None,
    reproducible_seeds=False,
    logprobs=False,
    token_ids=False,
)


def static_capabilities(name: str) -> Capabilities:
    """The capabilities of backend kind ``name`` before it is opened."""
    if name == "torch":
        from decodetune.backends.torch_backend import TORCH_CAPABILITIES

        return TORCH_CAPABILITIES
    table = {"llamacpp": LLAMACPP, "vllm": VLLM, "openai": OPENAI_ANY}
    if name not in table:
        raise UserError(f"--backend: unknown backend {name!r}; choose one of torch, llamacpp, openai, vllm")
    return table[name]
