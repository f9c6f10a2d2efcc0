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

#: llama.cpp through llama-cpp-python: the chain is built in each config's ``sampler_order`` (as
#: ``--samplers`` does), after the penalties sampler.
LLAMACPP = Capabilities(
    strategies=frozenset({"greedy", "sample"}),
    fields=_COMMON | {"top_k", "min_p", "typical_p", "repetition_penalty", "sampler_order"},
    sampler_order=None,
    reproducible_seeds=True,
    notes={"repetition_penalty": "llama.cpp penalties sampler over the whole context (prompt + output)",
           "presence_penalty": "llama.cpp counts prompt tokens too (torch: output only)",
           "frequency_penalty": "llama.cpp counts prompt tokens too (torch: output only)",
           "weights": "the GGUF's own quantised weights (torch de-quantises them to fp32)"},
)

#: vLLM v1 applies penalties, then temperature, then min_p, then top_k / top_p.
VLLM_ORDER = ("temperature", "min_p", "top_k", "top_p")

VLLM = Capabilities(
    strategies=frozenset({"greedy", "sample"}),
    fields=_COMMON | {"top_k", "min_p", "repetition_penalty", "min_new_tokens"},
    sampler_order=VLLM_ORDER,
    reproducible_seeds=True,
    notes={"presence_penalty": "output tokens only", "frequency_penalty": "output tokens only",
           "repetition_penalty": "prompt and output tokens"},
)

#: The union over server families; the probe of a real server narrows it.
OPENAI_ANY = Capabilities(
    strategies=frozenset({"greedy", "sample"}),
    fields=_COMMON | {"top_k", "min_p", "typical_p", "repetition_penalty", "min_new_tokens"},
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
