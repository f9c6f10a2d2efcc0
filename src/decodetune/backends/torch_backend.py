"""The torch backend: decodetune's own batched engine (:mod:`decodetune.decoding`) behind the protocol."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from decodetune.backends.base import NEUTRAL, Capabilities, Request
from decodetune.config import ENGINE_STRATEGIES, DecodingConfig
from decodetune.decoding.types import Generation

TORCH_CAPABILITIES = Capabilities(
    strategies=frozenset(ENGINE_STRATEGIES),  # the candidate strategies run on any backend with n samples
    fields=frozenset(NEUTRAL) | {f.name for f in dataclasses.fields(DecodingConfig)},
    sampler_order=None,  # each config's own sampler_order
    reproducible_seeds=True,
    notes={"presence_penalty": "output tokens only (vLLM / OpenAI semantics)",
           "frequency_penalty": "output tokens only (vLLM / OpenAI semantics)",
           "repetition_penalty": "prompt and output tokens (transformers semantics)"},
)


class TorchBackend:
    """Our engine on a :class:`~decodetune.models.handle.LoadedModel` (what ``load_model`` returns)."""

    name = "torch"

    def __init__(self, lm: Any):
        self.lm = lm
        self.model_name = lm.name

    def identity(self) -> str:
        """The model name plus a hash of its weights (the key the cache used before backends existed)."""
        from decodetune.cache import model_fingerprint

        return model_fingerprint(self.lm)

    def capabilities(self) -> Capabilities:
        """Everything DecodingConfig has."""
        return TORCH_CAPABILITIES

    def render(self, prompt: Any) -> list[int]:
        """Token ids of the prompt after the chat template (if the model uses one)."""
        return self.lm.encode(prompt)

    def generate(self, requests: Sequence[Request], *, logprobs: bool = False, batch_size: int | None = None,
                 progress: bool = False) -> list[Generation]:
        """One batched :func:`decodetune.decoding.generate` call over all requests."""
        from decodetune.decoding import generate

        return generate(self.lm, [r.prompt for r in requests], [r.config for r in requests],
                        seeds=[r.seed for r in requests], logprobs=logprobs, batch_size=batch_size,
                        progress=progress)

    def default_config(self) -> DecodingConfig | None:
        """The model's ``generation_config`` as a DecodingConfig, when it sets a decoding knob."""
        gen = getattr(getattr(self.lm, "model", None), "generation_config", None)
        return generation_config_to_decoding(gen)

    def scorer(self) -> Any:
        """The LoadedModel, for ``gen_ppl`` and likelihood reranking."""
        return self.lm

    def close(self) -> None:
        """Nothing to release: the weights are shared by ``load_model``'s memo."""


def generation_config_to_decoding(gen: Any) -> DecodingConfig | None:
    """A transformers ``GenerationConfig`` as a DecodingConfig, if it sets any decoding knob."""
    if gen is None:
        return None
    try:
        diff = gen.to_diff_dict()
    except Exception:
        return None
    knobs = {k: diff[k] for k in ("do_sample", "temperature", "top_k", "top_p", "min_p", "typical_p",
                                   "num_beams", "repetition_penalty", "no_repeat_ngram_size",
                                   "length_penalty") if diff.get(k) is not None}
    do_sample = bool(knobs.pop("do_sample", False))
    beams = int(knobs.get("num_beams", 1) or 1)
    if not knobs and not do_sample:
        return None
    strategy = ("beam_sample" if beams > 1 else "sample") if do_sample else ("beam" if beams > 1 else "greedy")
    fields: dict[str, Any] = {"strategy": strategy}
    for k, v in knobs.items():
        if not do_sample and k in ("temperature", "top_k", "top_p", "min_p", "typical_p"):
            continue  # transformers ignores them without do_sample
        if beams <= 1 and k in ("num_beams", "length_penalty"):
            continue
        fields[k] = v
    try:
        cfg = DecodingConfig.from_dict(fields)
    except Exception:
        return None
    return None if cfg == DecodingConfig(strategy="greedy") else cfg
