"""Float32 ``nn.Linear`` layers on a CPU, on few rows: the same products on every thread, bit-exact.

MKL computes ``F.linear`` of a few rows against a float32 weight as matrix-vector products on *one* thread, so
batch-1 decoding reads the weights at one core's memory bandwidth. The same product written as a ``bmm`` over
:data:`PARTS` slices of the output features runs on torch's threads. Measured on the 2-core dev machine (2
threads, weights read cold as in decoding, smollm2's 7 linears x 30 layers): 38 -> 22 ms per step at 1 row,
48 -> 29 ms at 4 rows, no gain at 16; its 49152 x 576 LM head: 10.1 -> 5.2 ms at 1 row, 19 -> 13 ms at 16
rows, 36 -> 29 ms at 64 (``benchmarks/bench_generate.py`` has the end-to-end figures).

Each output is the same dot product in the same order, so the result is bit-exact; that is not assumed but
checked: the first time a (weight shape, rows, threads) comes up, both are computed on random input and the
split is used only if they are equal (:func:`_split_is_exact`). The exactness tests against transformers'
``generate()`` run through it.

:func:`split_linears` switches it on for one model for the duration of a ``with`` block (the engine's
``generate``): it sets a ``forward`` on each plain ``nn.Linear`` instance and removes it afterwards, so the
model is left as it was. Reduced-precision (bf16: oneDNN already uses every thread) and quantised layers are
left alone.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

import torch
from torch import nn

#: Slices of the output features (the first that divides them); 8, 4 and 2 measured within 10% of each other.
PARTS = (8, 4, 2)
#: Rows (tokens in the batch) up to which every layer is split: measured faster at 1 and 4 rows, even at 16.
MAX_ROWS = 8
#: A weight this big (an LM head) is split up to :data:`BIG_MAX_ROWS` rows: measured faster up to 128.
BIG_WEIGHT = 1 << 22
BIG_MAX_ROWS = 128

_exact: dict[tuple[int, int, int, int, bool, int], bool] = {}


@contextmanager
def split_linears(model: nn.Module) -> Iterator[None]:
    """Within the block, ``model``'s float32 ``nn.Linear`` layers on a CPU compute few rows as a split ``bmm``."""
    patched: list[nn.Module] = []
    if torch.get_num_threads() >= 2:
        for module in model.modules():
            if (type(module) is nn.Linear and "forward" not in module.__dict__
                    and module.weight.dtype == torch.float32 and module.weight.device.type == "cpu"):
                module.forward = partial(_forward, module)
                patched.append(module)
    try:
        yield
    finally:
        for module in patched:
            module.__dict__.pop("forward", None)


def _forward(module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    weight, bias = module.weight, module.bias
    out_features, in_features = weight.shape
    rows = x.numel() // in_features if in_features else 0
    limit = BIG_MAX_ROWS if weight.numel() >= BIG_WEIGHT else MAX_ROWS
    parts = next((p for p in PARTS if out_features % p == 0), None)
    if (parts is None or not 0 < rows <= limit or x.dtype != torch.float32 or not weight.is_contiguous()
            or not _split_is_exact(weight, bias, rows, parts)):
        return nn.functional.linear(x, weight, bias)
    return split_linear(x.reshape(rows, in_features), weight, bias, parts).reshape(*x.shape[:-1], out_features)


def split_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, parts: int) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for 2-D ``x`` as a ``bmm`` over ``parts`` slices of the output features."""
    rows, in_features = x.shape
    out_features = weight.shape[0]
    sliced = weight.view(parts, out_features // parts, in_features).transpose(1, 2)  # a view: no copy
    out = torch.bmm(x.unsqueeze(0).expand(parts, rows, in_features), sliced)
    out = out.transpose(0, 1).reshape(rows, out_features)
    return out if bias is None else out + bias


def _split_is_exact(weight: torch.Tensor, bias: torch.Tensor | None, rows: int, parts: int) -> bool:
    key = (*weight.shape, rows, parts, bias is not None, torch.get_num_threads())
    if key not in _exact:
        probe = torch.randn(rows, weight.shape[1], generator=torch.Generator().manual_seed(rows))
        _exact[key] = torch.equal(split_linear(probe, weight, bias, parts), nn.functional.linear(probe, weight, bias))
    return _exact[key]


def exactness_checked() -> dict[Any, bool]:
    """The (out, in, rows, parts, bias, threads) keys checked so far and whether the split was exact there."""
    return dict(_exact)
