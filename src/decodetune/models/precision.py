"""Weight precision: ``fp32`` (the default), ``bf16`` weights, or ``int8`` dynamic quantisation.

* ``bf16``: every parameter in ``torch.bfloat16``; buffers (the rotary ``inv_freq``) stay float32, as
  ``from_pretrained(dtype=torch.bfloat16)`` leaves them. On a CPU with AVX512-BF16 (or AMX) oneDNN runs the
  matmuls natively in bf16; without it they are emulated and bf16 can be slower than fp32.
* ``int8``: dynamic int8 quantisation of every ``nn.Linear`` (int8 weights with one scale per output
  channel, activations quantised per call) through ``torch.ao.quantization.quantize_dynamic``, whose
  fbgemm / oneDNN kernels are the fast CPU path. int8 is CPU-only. The embedding stays float32; a tied LM
  head (smollm2) becomes a quantised copy of the embedding matrix, so the tie no longer shares memory but
  both still hold the same weights (the embedding exactly, the head to int8 precision).

Why ``torch.ao`` and not torchao's ``quantize_`` API: measured on torch 2.13 CPU at batch 1 over a stack of
smollm2-sized Linear layers, torchao 0.18's ``Int8DynamicActivationInt8WeightConfig`` ran 1.3x *slower*
than fp32 (no fused CPU int8 x int8 kernel in eager mode) and ``Int8WeightOnlyConfig`` 1.7x faster, against
7x faster for ``quantize_dynamic``. ``torch.ao.quantization`` is deprecated in favour of torchao; if a later
torch drops it, loading int8 fails with one line saying so.

The kernels quantise the activations with one scale for the whole input, i.e. for every token of a prefill
or every row of a batch together, and one token with huge activations (smollm2's first) wrecks the rest:
next-token KL against fp32 over a 54-token prefill was 1.48 nats (top-1 agreement 44%).
:class:`RowScaledInt8Linear` divides each token's activations by its own max-abs first and multiplies the
output back (exact for a linear map), so the shared scale is per token in effect: KL 0.24 (78%). A
one-token step (about 0.1 nats, 85% on the same text) skips the rescaling. bf16: 0.001 nats (100%).

Logits stay float32 whatever the weights: :class:`decodetune.decoding.runner.ModelRunner` casts the last
position's logits with ``.float()`` before any processor or sampler sees them, and the speculative path
does the same.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from decodetune.errors import UserError

#: Accepted ``dtype`` values; ``fp32`` is the default.
DTYPES = ("fp32", "bf16", "int8")
DEFAULT_DTYPE = "fp32"


def check_dtype(dtype: Any, flag: str = "dtype") -> str:
    """``dtype`` as one of :data:`DTYPES` (case-insensitive), else a :class:`UserError` naming ``flag``."""
    value = dtype.strip().lower() if isinstance(dtype, str) else dtype
    if value not in DTYPES:
        raise UserError(f"{flag}: must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return value


def torch_load_dtype(dtype: str) -> Any:
    """The ``torch.dtype`` to load the weights in before any quantisation (int8 quantises fp32 weights)."""
    return torch.bfloat16 if dtype == "bf16" else torch.float32


def to_bf16(model: Any) -> Any:
    """Cast every parameter to bfloat16 in place; float32 buffers stay (``from_pretrained`` does the same)."""
    for p in model.parameters():  # tied parameters are one object, so they are cast once and stay tied
        p.data = p.data.to(torch.bfloat16)
    return model


class RowScaledInt8Linear(nn.Module):
    """A dynamic int8 Linear whose activations get one quantisation scale per token (see the module doc)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        weight, bias = inner._weight_bias()
        inner.set_weight_bias(weight, None)  # the bias is added after the rescaling
        self.inner = inner
        self.bias = bias
        self.in_features, self.out_features = inner.in_features, inner.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``inner(x)`` with each token's activations scaled to max-abs 1 going in and back coming out."""
        if x.shape[:-1].numel() > 1:  # one token: the kernel's per-call scale is already per token
            scale = x.abs().amax(dim=-1, keepdim=True).clamp_(min=1e-12)
            y = self.inner(x / scale) * scale
        else:
            y = self.inner(x)
        return y if self.bias is None else y + self.bias


def quantize_int8(model: Any) -> Any:
    """Dynamic int8 quantisation of every ``nn.Linear``, in place (CPU only); returns the model."""
    if next(model.parameters()).device.type != "cpu":
        raise UserError("dtype: int8 (torch.ao dynamic quantisation) runs on CPU only; use bf16 on a GPU")
    try:
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic
    except ImportError:  # torch dropped the deprecated eager quantisation API
        raise UserError(f"dtype: int8 needs torch.ao.quantization.quantize_dynamic, which torch "
                        f"{torch.__version__} no longer has") from None
    with warnings.catch_warnings():  # its deprecation notice (migrate to torchao) is not the user's business
        warnings.simplefilter("ignore")
        # per-channel scales: one per output row, so the wide LM head keeps rare-token logits apart
        quantize_dynamic(model, {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8, inplace=True)
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if _is_dynamic_int8(child):
                setattr(parent, child_name, RowScaledInt8Linear(child))
    return model


def _is_dynamic_int8(module: Any) -> bool:
    """A ``torch.ao`` dynamically quantised Linear (not its ``_packed_params`` holder)."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    return isinstance(module, DynamicLinear)


def convert(model: Any, dtype: str) -> Any:
    """A float32 model converted in place to ``dtype`` (fp32: unchanged)."""
    if dtype == "bf16":
        return to_bf16(model)
    if dtype == "int8":
        return quantize_int8(model)
    return model


def dtype_of(model: Any) -> str:
    """What precision an in-memory model runs in: int8 if any Linear is dynamically quantised, else its
    parameters' dtype (``fp32``, ``bf16``, or torch's name such as ``float16``)."""
    if any(_is_dynamic_int8(module) for module in model.modules()):
        return "int8"
    param = next(model.parameters(), None)
    if param is None or param.dtype == torch.float32:
        return "fp32"
    if param.dtype == torch.bfloat16:
        return "bf16"
    return str(param.dtype).removeprefix("torch.")
