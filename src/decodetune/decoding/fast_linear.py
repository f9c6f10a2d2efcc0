"""Faster ``nn.Linear`` layers on a CPU for decoding (few rows), bit-exact against ``F.linear``.

Two cases, each measured on the 2-core dev machine, an AMD EPYC (2 threads, weights read cold as in decoding,
smollm2's 7 linears x 30 layers; ``benchmarks/bench_generate.py`` has the end-to-end figures):

- **float32**: MKL computes ``F.linear`` of a few rows on *one* thread, so batch-1 decoding read the weights
  at one core's bandwidth. The same product as a ``bmm`` over :data:`PARTS` slices of the output features
  runs on torch's threads: 38 -> 22 ms per step at 1 row, 48 -> 29 ms at 4 rows, no gain at 16; the 49152 x
  576 LM head 10.1 -> 5.2 ms at 1 row, 19 -> 13 ms at 16 rows.
- **bfloat16**: the weights packed once for oneDNN (``torch.ops.mkldnn._reorder_linear_weight``, what
  ``torch.compile``'s CPU backend does) and applied with ``torch.ops.mkldnn._linear_pointwise``: 22.0 ->
  14.2 ms per step at 1 row, 28.6 -> 17.5 ms at 16. (In float32 the packed path is faster at 16 rows too,
  but not bit-exact, so float32 keeps MKL there.)

Neither is assumed exact, nor faster: the first time a (path, weight shape, rows, threads) comes up, both are
computed on random input and the fast one is used only if the results are equal (:func:`_is_exact`); the
first time a (path, dtype, body or head, rows bucket, threads) comes up, both are timed over the model's own
layers of that kind (:func:`_is_faster`), and the fast one is used only if it is faster. (The float32 split
is a workaround for how MKL threads small products, which depends on the CPU: on that AMD EPYC it won
1.7x; on an Intel Xeon with AMX, where MKL threads one row itself, it lost 12%.) The exactness tests against
transformers' ``generate()`` (float32) run through it.

:func:`fast_linears` switches it on for one model for the duration of a ``with`` block (the engine's
``generate``): it sets a ``forward`` on each plain ``nn.Linear`` instance and removes it afterwards, so the
model is left as it was. Packed bf16 weights live only within the block (re-packed when a weight changes in
it), so a generate call holds the bf16 linear weights twice; models whose bf16 linear weights exceed
:data:`PACK_MAX_BYTES` are not packed (a 7B model would need 14 GB more). Quantised layers (int8) and
subclasses of ``nn.Linear`` are left alone, and so is anything under autograd.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import nn

#: Slices of the output features (the first that divides them); 8, 4 and 2 measured within 10% of each other.
PARTS = (8, 4, 2)
#: Rows (tokens in the batch) up to which every float32 layer is split: faster at 1 and 4 rows, even at 16.
MAX_ROWS = 8
#: A float32 weight this big (an LM head) is split up to :data:`BIG_MAX_ROWS` rows: measured faster up to 128.
BIG_WEIGHT = 1 << 22
BIG_MAX_ROWS = 128
#: Rows up to which bf16 layers use their packed weights (decoding steps; a long prefill keeps F.linear).
PACKED_MAX_ROWS = 64
#: bf16 linear weights up to this size are packed (the packed copy doubles them during a generate call).
PACK_MAX_BYTES = 2 << 30
#: Layers timed when a path is first chosen: up to this many bytes of weights, more than a CPU's caches, so
#: they are read cold as in decoding.
TIMING_BYTES = 128 << 20
#: The fast path must take at most this share of the plain path's time to be used.
FASTER = 0.95

_exact: dict[tuple[Any, ...], bool] = {}
_faster: dict[tuple[Any, ...], bool] = {}
_packed: weakref.WeakKeyDictionary[nn.Module, tuple[int, int, torch.Tensor]] = weakref.WeakKeyDictionary()


@contextmanager
def fast_linears(model: nn.Module) -> Iterator[None]:
    """Within the block, ``model``'s plain CPU ``nn.Linear`` layers use the fast paths where they are exact and
    faster."""
    linears = [m for m in model.modules() if type(m) is nn.Linear and "forward" not in m.__dict__
               and m.weight.device.type == "cpu"]
    half_bytes = sum(m.weight.numel() * 2 for m in linears if m.weight.dtype == torch.bfloat16)
    wanted = set()
    if torch.get_num_threads() >= 2:
        wanted.add(torch.float32)
    if (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
            and half_bytes <= PACK_MAX_BYTES):
        wanted.add(torch.bfloat16)
    patched = [m for m in linears if m.weight.dtype in wanted]
    grouped: dict[tuple[torch.dtype, bool], list[nn.Linear]] = {}
    for module in patched:
        grouped.setdefault(_kind(module), []).append(module)
    kinds = {kind: LayerKind(layers) for kind, layers in grouped.items()}
    for module in patched:
        module.forward = partial(_forward, module, kinds[_kind(module)], {})
    try:
        yield
    finally:
        for module in patched:
            module.__dict__.pop("forward", None)
            _packed.pop(module, None)


def _kind(module: nn.Linear) -> tuple[torch.dtype, bool]:
    """(dtype, is an LM-head-sized weight): the layers one timing speaks for."""
    return module.weight.dtype, module.weight.numel() >= BIG_WEIGHT


@dataclass(eq=False)
class LayerKind:
    """A model's layers of one kind (:func:`_kind`), and the key their timings are kept under: the same
    architecture times the same."""

    layers: list[nn.Linear]
    key: tuple[Any, ...] = field(init=False)

    def __post_init__(self) -> None:
        shapes = tuple(sorted({tuple(m.weight.shape) for m in self.layers}))
        self.key = (*_kind(self.layers[0]), shapes, len(self.layers))


def _forward(module: nn.Linear, kin: LayerKind, chosen: dict[tuple[Any, ...], Any], x: torch.Tensor) -> torch.Tensor:
    weight, bias = module.weight, module.bias
    if torch.is_grad_enabled() and (weight.requires_grad or x.requires_grad):
        return nn.functional.linear(x, weight, bias)
    rows = x.numel() // weight.shape[1] if weight.shape[1] else 0
    key = (rows, x.dtype, torch.get_num_threads())
    path = chosen.get(key, False)
    if path is False:  # decided once per block (a decoding step calls each layer with the same rows again)
        path = chosen[key] = _choose(module, kin, x.dtype, rows)
    if path is None:
        return nn.functional.linear(x, weight, bias)
    flat = _run_path(path, module, x.reshape(rows, weight.shape[1]))
    return flat.reshape(*x.shape[:-1], weight.shape[0])


def _run_path(path: int | str | None, module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``module(x)`` for 2-D ``x`` by ``path``: "packed", a split count, or None (``F.linear``)."""
    if path == "packed":
        return packed_linear(x, module)
    if path is None:
        return nn.functional.linear(x, module.weight, module.bias)
    return split_linear(x, module.weight, module.bias, path)


def _probe(rows: int, in_features: int, dtype: torch.dtype) -> torch.Tensor:
    """Random input for the exactness and speed checks (seeded: the same probe every time)."""
    return torch.randn(rows, in_features, generator=torch.Generator().manual_seed(rows)).to(dtype)


def _choose(module: nn.Linear, kin: LayerKind, dtype: torch.dtype, rows: int) -> int | str | None:
    """The path for ``module`` at ``rows`` rows: "packed", a split count, or None for ``F.linear``."""
    weight = module.weight
    if dtype != weight.dtype or not weight.is_contiguous() or rows <= 0:
        return None
    if weight.dtype == torch.bfloat16 and rows <= PACKED_MAX_ROWS:
        if _is_exact("packed", module, rows) and _is_faster("packed", kin, rows):
            return "packed"
    elif weight.dtype == torch.float32:
        parts = _parts(weight.shape[0])
        limit = BIG_MAX_ROWS if weight.numel() >= BIG_WEIGHT else MAX_ROWS
        if parts is not None and rows <= limit and _is_exact(parts, module, rows) and _is_faster("split", kin, rows):
            return parts
    return None


def split_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, parts: int) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for 2-D ``x`` as a ``bmm`` over ``parts`` slices of the output features."""
    rows, in_features = x.shape
    out_features = weight.shape[0]
    sliced = weight.view(parts, out_features // parts, in_features).transpose(1, 2)  # a view: no copy
    out = torch.bmm(x.unsqueeze(0).expand(parts, rows, in_features), sliced)
    out = out.transpose(0, 1).reshape(rows, out_features)
    return out if bias is None else out + bias


def packed_linear(x: torch.Tensor, module: nn.Linear) -> torch.Tensor:
    """``module(x)`` with the weight packed for oneDNN (packed once per weight version, then cached)."""
    weight = module.weight
    key = (weight._version, weight.data_ptr())
    hit = _packed.get(module)
    if hit is None or hit[:2] != key:
        hit = (*key, torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None))
        _packed[module] = hit
    return torch.ops.mkldnn._linear_pointwise(x, hit[2], module.bias, "none", [], "")


def _is_exact(path: Any, module: nn.Linear, rows: int) -> bool:
    """Whether ``path`` (a split count, or "packed") gives ``F.linear``'s result bit for bit at ``rows`` rows."""
    weight, bias = module.weight, module.bias
    key = (path, *weight.shape, weight.dtype, rows, bias is not None, torch.get_num_threads())
    if key not in _exact:
        probe = _probe(rows, weight.shape[1], weight.dtype)
        _exact[key] = torch.equal(_run_path(path, module, probe), nn.functional.linear(probe, weight, bias))
    return _exact[key]


def _is_faster(path: str, kin: LayerKind, rows: int) -> bool:
    """Whether ``path`` ("split" or "packed") runs faster than ``F.linear`` over ``kin``'s layers at about
    ``rows`` rows (timed once per rows bucket 1, 2-3, 4-7, ...: the best of 3 alternated passes each)."""
    key = (path, rows.bit_length(), torch.get_num_threads(), *kin.key)
    if key not in _faster:
        timed, total = [], 0
        for module in kin.layers:  # enough layers to read their weights cold, as decoding does
            timed.append(module)
            total += module.weight.numel() * module.weight.element_size()
            if total >= TIMING_BYTES:
                break
        plain_s, fast_s = _time_paths(path, timed, rows)
        _faster[key] = min(fast_s) <= FASTER * min(plain_s)
    return _faster[key]


def _time_paths(path: str, layers: list[nn.Linear], rows: int, passes: int = 3) -> tuple[list[float], list[float]]:
    """Seconds of ``passes`` passes over ``layers`` with ``F.linear`` and with ``path``, alternated, after one
    pass of each that warms up (and packs)."""
    inputs = {m.in_features: _probe(rows, m.in_features, m.weight.dtype) for m in layers}
    fast_paths = [path if path == "packed" else _parts(m.out_features) for m in layers]

    def seconds(paths: list[int | str | None]) -> float:
        start = time.perf_counter()
        for m, each in zip(layers, paths, strict=True):
            _run_path(each, m, inputs[m.in_features])
        return time.perf_counter() - start

    plain_s, fast_s = [], []
    with torch.no_grad():
        for _ in range(passes + 1):
            plain_s.append(seconds([None] * len(layers)))
            fast_s.append(seconds(fast_paths))
    return plain_s[1:], fast_s[1:]


def _parts(out_features: int) -> int | None:
    """How many output-feature slices the float32 split uses: the first of :data:`PARTS` that divides them."""
    return next((p for p in PARTS if out_features % p == 0), None)


def paths_timed() -> dict[tuple[Any, ...], bool]:
    """The (path, rows bucket, threads, dtype, head-sized, shapes, layers) keys timed so far and whether the
    path was faster."""
    return dict(_faster)


def exactness_checked() -> dict[tuple[Any, ...], bool]:
    """The (path, out, in, dtype, rows, bias, threads) keys checked so far and whether the path was exact."""
    return dict(_exact)
