"""The model side of the decoding loop: left-padded prefill and one-token steps over a KV cache.

Left padding with an attention mask, and position ids from the mask's cumulative sum (padding gets position 0,
as transformers' ``generate`` does), so a prompt gets the same positions alone or in a batch. Only the last
position's logits are computed (``logits_to_keep=1``) and returned as float32.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch


class ModelRunner:
    """Calls a Hugging Face causal LM with a ``DynamicCache``, whatever the transformers version calls it."""

    def __init__(self, model: Any):
        self.model = model
        params = inspect.signature(model.forward).parameters
        # transformers 5 renamed ``past_key_values`` to ``cache`` (the old name is deprecated)
        self.cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self.keep_kwarg = next((k for k in ("logits_to_keep", "num_logits_to_keep") if k in params), None)
        self.takes_positions = "position_ids" in params
        self.device = next(model.parameters()).device

    def new_cache(self) -> Any:
        """An empty ``DynamicCache`` for this model."""
        from transformers import DynamicCache

        try:
            return DynamicCache(config=self.model.config)
        except TypeError:  # transformers < 4.56 takes no config
            return DynamicCache()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                cache: Any) -> torch.Tensor:
        """Run the model on new tokens; returns the ``(batch, vocab)`` float32 logits of the last position."""
        kwargs: dict[str, Any] = {self.cache_kwarg: cache, "use_cache": True}
        if self.keep_kwarg is not None:
            kwargs[self.keep_kwarg] = 1
        if self.takes_positions:
            kwargs["position_ids"] = position_ids
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        return out.logits[:, -1, :].float()

    def prefill(self, prompts: Sequence[Sequence[int]], pad_token_id: int) -> tuple[torch.Tensor, Any,
                                                                                     torch.Tensor, torch.Tensor]:
        """Left-pad ``prompts`` and run them; returns (last logits, cache, attention mask, next positions)."""
        ids, mask, positions = left_pad(prompts, pad_token_id, self.device)
        cache = self.new_cache()
        logits = self.forward(ids, mask, positions, cache)
        return logits, cache, mask, mask.sum(-1)

    def step(self, tokens: torch.Tensor, attention_mask: torch.Tensor, next_positions: torch.Tensor,
             cache: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Feed one token per row; returns (logits, the attention mask grown by one column)."""
        mask = torch.cat([attention_mask, attention_mask.new_ones((attention_mask.shape[0], 1))], dim=1)
        return self.forward(tokens.unsqueeze(1), mask, next_positions.unsqueeze(1), cache), mask


def left_pad(prompts: Sequence[Sequence[int]], pad_token_id: int,
             device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, attention mask, position ids) of ``prompts`` left-padded to the longest, on ``device``."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(list(p), dtype=torch.long)
        mask[i, width - len(p):] = 1
    ids, mask = ids.to(device), mask.to(device)
    return ids, mask, (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
