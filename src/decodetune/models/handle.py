"""`LoadedModel`: a causal LM, its tokenizer and how prompts are turned into token ids."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

Prompt = str | list[dict[str, str]]
"""A prompt is plain text, or a chat as a list of ``{"role": ..., "content": ...}`` messages."""


@dataclass
class LoadedModel:
    """A model ready for decoding.

    ``name`` identifies the weights (used in cache keys). ``chat`` says whether prompts go through the
    tokenizer's chat template; it is on for models that have one unless the user asked for ``raw``.
    ``dtype`` is the weight precision (``fp32`` | ``bf16`` | ``int8``, :mod:`decodetune.models.precision`);
    left empty, it is read off the model. It is part of the cache identity.
    """

    model: Any
    tokenizer: Any
    name: str = "custom"
    chat: bool = False
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    dtype: str = ""

    def __post_init__(self) -> None:
        self.model.eval()
        if not self.dtype:
            from decodetune.models.precision import dtype_of

            self.dtype = dtype_of(self.model)
        tok = self.tokenizer
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        self.eos_token_ids = _eos_ids(self.model, tok)

    @property
    def device(self) -> torch.device:
        """Device of the model's parameters."""
        return next(self.model.parameters()).device

    def encode(self, prompt: Prompt) -> list[int]:
        """Token ids for one prompt: chat template (with generation prompt) or raw text."""
        tok = self.tokenizer
        if isinstance(prompt, list):
            if not self.chat:
                text = "\n".join(m.get("content", "") for m in prompt)
                return list(tok(text, add_special_tokens=True)["input_ids"])
            return _chat_ids(tok, prompt)
        if self.chat:
            return _chat_ids(tok, [{"role": "user", "content": prompt}])
        return list(tok(prompt, add_special_tokens=True)["input_ids"])

    def decode(self, ids: list[int]) -> str:
        """Text of generated ids, special tokens dropped."""
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def _chat_ids(tok: Any, messages: list[dict[str, str]]) -> list[int]:
    out = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(out, dict) or hasattr(out, "keys"):
        out = out["input_ids"]
    if out and isinstance(out[0], list):
        out = out[0]
    return [int(i) for i in out]


def _eos_ids(model: Any, tok: Any) -> list[int]:
    ids: list[int] = []
    gen_cfg = getattr(model, "generation_config", None)
    for src in (getattr(gen_cfg, "eos_token_id", None), getattr(model.config, "eos_token_id", None),
                tok.eos_token_id):
        if src is None:
            continue
        for i in src if isinstance(src, list | tuple) else [src]:
            if int(i) not in ids:
                ids.append(int(i))
    return ids
