"""llama.cpp's own samplers through llama-cpp-python's low-level API, and ours on the same input.

Used by tests/test_llama_reference.py. ``llama_apply`` builds a ``llama_token_data_array`` over the whole
vocabulary (ids in order, unsorted, as ``llama_sampler_sample`` does), feeds the history to every sampler
with ``llama_sampler_accept`` and runs ``llama_sampler_apply`` of each in turn.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from dataclasses import dataclass

import llama_cpp as L
import numpy as np
import torch

from decodetune import DecodingConfig
from decodetune.decoding.processors import RowParams, TokenState, apply_processors
from decodetune.decoding.sampler import apply_samplers


@dataclass
class Result:
    """What is left in the candidate array: ids, their logits, and the distribution over them."""

    ids: list[int]
    logits: np.ndarray
    selected: int  # the selected token id (-1: the samplers selected none)

    @property
    def probs(self) -> dict[int, float]:
        z = self.logits.astype(np.float64)
        p = np.exp(z - z.max())
        return dict(zip(self.ids, (p / p.sum()).tolist(), strict=True))


def llama_apply(samplers: Sequence[int], logits: np.ndarray, history: Sequence[int] = ()) -> Result:
    """Run llama.cpp samplers (handles from ``llama_sampler_init_*``) on one row of logits."""
    vocab = len(logits)
    arr = (L.llama_token_data * vocab)()
    for i, x in enumerate(logits.tolist()):
        arr[i].id, arr[i].logit, arr[i].p = i, x, 0.0
    cur = L.llama_token_data_array(data=ctypes.cast(arr, ctypes.POINTER(L.llama_token_data)), size=vocab,
                                   selected=-1, sorted=False)
    for s in samplers:
        for t in history:
            L.llama_sampler_accept(s, t)
    for s in samplers:
        L.llama_sampler_apply(s, ctypes.byref(cur))
    ids = [cur.data[i].id for i in range(cur.size)]
    vals = np.array([cur.data[i].logit for i in range(cur.size)], dtype=np.float32)
    finite = np.isfinite(vals)  # llama.cpp may leave -inf candidates in the array (top-nσ, -inf biases)
    order = np.argsort(np.array(ids)[finite], kind="stable")
    selected = ids[cur.selected] if cur.selected >= 0 else -1
    return Result([ids[j] for j in np.flatnonzero(finite)[order]], vals[finite][order], selected)


def llama_full_logits(samplers: Sequence[int], logits: np.ndarray, history: Sequence[int] = ()) -> np.ndarray:
    """The logits of every token after llama.cpp's (non-truncating) samplers, in id order."""
    out = np.full(len(logits), -np.inf, dtype=np.float32)
    res = llama_apply(samplers, logits, history)
    out[res.ids] = res.logits
    return out


def free(*samplers: int) -> None:
    """Free sampler handles."""
    for s in samplers:
        L.llama_sampler_free(s)


def ctx_floats(sampler: int, n: int) -> list[float]:
    """The first ``n`` float32 words of a sampler's private state (mirostat keeps mu there)."""
    ctx = ctypes.cast(sampler, ctypes.POINTER(L.llama_sampler)).contents.ctx
    return list((ctypes.c_float * n).from_address(ctx))


def ours_result(out: torch.Tensor) -> Result:
    """A row of our processed logits in the same form as :func:`llama_apply`'s."""
    row = out.numpy()
    ids = np.flatnonzero(np.isfinite(row)).tolist()
    return Result(ids, row[ids].astype(np.float32), -1)


def rows_of(configs: Sequence[DecodingConfig], tokenizer: object = None) -> RowParams:
    """RowParams of configs (sampling configs keep their sampler fields)."""
    return RowParams.from_configs(list(configs), "cpu", tokenizer=tokenizer)


def state_of(rows: RowParams, prompts: Sequence[Sequence[int]], outputs: Sequence[Sequence[int]],
             vocab: int) -> TokenState:
    """A token state whose rows saw ``prompts`` and then generated ``outputs`` (one step per token)."""
    steps = max((len(o) for o in outputs), default=0)
    assert all(len(o) == steps for o in outputs), "outputs must have equal lengths"
    state = TokenState(prompts, steps + 1, vocab, rows, [], "cpu")
    for t in range(steps):
        state.append(torch.tensor([o[t] for o in outputs], dtype=torch.long))
    return state


def ours_processors(configs: Sequence[DecodingConfig], logits: torch.Tensor, prompts: Sequence[Sequence[int]],
                    outputs: Sequence[Sequence[int]] | None = None, tokenizer: object = None) -> torch.Tensor:
    """Our processors on ``logits`` after the given histories."""
    rows = rows_of(configs, tokenizer)
    outputs = outputs if outputs is not None else [[] for _ in prompts]
    return apply_processors(logits, state_of(rows, prompts, outputs, logits.shape[1]))


def ours_samplers(configs: Sequence[DecodingConfig], logits: torch.Tensor,
                  coins: torch.Tensor | None = None) -> torch.Tensor:
    """Our sampler chain (each row's own order) on ``logits``."""
    return apply_samplers(logits, rows_of(configs), 1, coins)
