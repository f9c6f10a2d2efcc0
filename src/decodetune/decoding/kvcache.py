"""Row surgery on a transformers ``DynamicCache``: take rows, and join caches of different widths.

Every cache here is left-padded: row ``i`` holds its real tokens in the *last* columns, the columns before
them are padding that the attention mask hides. Two caches can therefore be joined along the batch by
right-aligning them: the narrower one gets zero keys/values (mask 0) on the left; columns that are padding
in every row can be cut from the left. Masked columns receive exactly zero attention weight, so neither
changes what a row attends to (the positions come from ``position_ids``, not from the column).

Only caches made of plain full-attention layers can be joined (transformers >= 4.56 ``DynamicLayer``, or
the ``key_cache`` / ``value_cache`` lists of older versions); :func:`layers_of` returns None for anything
else (sliding-window or linear-attention layers), and callers then never join.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

#: keys and values of every layer, each ``(batch, kv_heads, seq, head_dim)``
KV = list[tuple[torch.Tensor, torch.Tensor]]


def layers_of(cache: Any) -> KV | None:
    """The per-layer (keys, values) tensors, or None when the cache is not a plain full-attention cache."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        # exact class: subclasses (sliding window, chunked) keep a window, not every column
        if not layers or any(type(layer).__name__ != "DynamicLayer" or layer.keys is None
                             or layer.keys.dim() != 4 for layer in layers):
            return None
        return [(layer.keys, layer.values) for layer in layers]
    keys, values = getattr(cache, "key_cache", None), getattr(cache, "value_cache", None)
    if isinstance(keys, list) and isinstance(values, list) and keys and len(keys) == len(values):
        return list(zip(keys, values, strict=True))
    return None


def set_layers(cache: Any, kv: KV) -> None:
    """Replace the cache's tensors with ``kv`` (same number of layers); the old tensors are not modified."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        for layer, (k, v) in zip(layers, kv, strict=True):
            layer.keys, layer.values = k, v
        return
    cache.key_cache[:] = [k for k, _ in kv]
    cache.value_cache[:] = [v for _, v in kv]
    if hasattr(cache, "_seen_tokens"):  # transformers < 4.47 reads its length from this counter
        cache._seen_tokens = kv[0][0].shape[-2]


def take(kv: KV, rows: torch.Tensor) -> KV:
    """The given rows (repeats allowed: that is how a shared prompt's cache is copied)."""
    return [(k.index_select(0, rows), v.index_select(0, rows)) for k, v in kv]


def fit(kv: KV, mask: torch.Tensor, width: int) -> tuple[KV, torch.Tensor]:
    """Right-align to ``width`` columns: pad on the left, or cut left columns (the caller knows they are padding)."""
    have = mask.shape[1]
    if have == width:
        return kv, mask
    if have > width:
        cut = have - width
        return [(k[:, :, cut:], v[:, :, cut:]) for k, v in kv], mask[:, cut:]
    extra = width - have
    return ([(F.pad(k, (0, 0, extra, 0)), F.pad(v, (0, 0, extra, 0))) for k, v in kv],
            F.pad(mask, (extra, 0)))


def join(parts: Sequence[tuple[KV, torch.Tensor]], width: int) -> tuple[KV, torch.Tensor]:
    """Concatenate the rows of several (kv, mask) parts, each right-aligned to ``width`` columns."""
    fitted = [fit(kv, mask, width) for kv, mask in parts]
    if len(fitted) == 1:
        return fitted[0]
    layers = len(fitted[0][0])
    kv = [(torch.cat([f[0][i][0] for f in fitted]), torch.cat([f[0][i][1] for f in fitted]))
          for i in range(layers)]
    return kv, torch.cat([m for _, m in fitted])
