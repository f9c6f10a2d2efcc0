"""Normalisation layers a student can use instead of Llama's RMSNorm, and how they are swapped in.

``rmsnorm`` is stock Llama. ``layernorm`` is :class:`torch.nn.LayerNorm` (mean and variance over the
hidden features of each token). ``batchnorm`` is :class:`MaskedBatchNorm`: per-feature statistics over
the *real* tokens of the batch (never padding), running statistics in eval mode.

BatchNorm is not a per-token operation: in training, the statistics of a batch mix every position of
every sequence, so a token's output depends on later tokens (a causal leak) and on the other sequences,
and eval mode (running statistics) computes something else than training did. docs/distillation.md
documents this, and ``benchmarks/distill.py`` measures it.

The padding mask reaches the BatchNorm layers through a forward pre-hook on the decoder
(:func:`install_mask_hook`), which copies the ``attention_mask`` argument onto every BatchNorm layer.

It lives in ``models/`` because the model loaders need :func:`maybe_patch_norm`; ``train.distill`` builds
students on top of it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from decodetune.errors import UserError

NORMS = ("rmsnorm", "layernorm", "batchnorm")

#: config.json field naming the norm of a decodetune student; absent means stock RMSNorm.
NORM_CONFIG_FIELD = "decodetune_norm"


class MaskedBatchNorm(nn.Module):
    """BatchNorm over the hidden features of ``(B, T, H)`` activations, statistics from real tokens only.

    ``token_mask`` (``(B, T)`` or ``(B, T_total)`` with 1 = real token) is set by the decoder hook before
    each forward; without it every position counts as real. With ``sync=True`` and an initialised
    process group, the statistics are summed over all ranks (differentiably), so data-parallel
    training computes the same thing as one process with the whole batch.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-5, momentum: float = 0.1, sync: bool = True):
        super().__init__()
        self.hidden_size = hidden_size
        self.eps = eps
        self.momentum = momentum
        self.sync = sync
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.bias = nn.Parameter(torch.zeros(hidden_size))
        self.register_buffer("running_mean", torch.zeros(hidden_size))
        self.register_buffer("running_var", torch.ones(hidden_size))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))
        self.token_mask: torch.Tensor | None = None

    def _real_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, T, 1)`` float mask of real tokens for activations ``x`` of shape ``(B, T, H)``."""
        b, t = x.shape[0], x.shape[1]
        mask = self.token_mask
        if mask is None or mask.dim() != 2 or mask.shape[0] != b or mask.shape[1] < t:
            return torch.ones(b, t, 1, dtype=torch.float32, device=x.device)
        # With a KV cache the mask covers past + current tokens; the current ones are the last t.
        return mask[:, -t:].to(device=x.device, dtype=torch.float32).unsqueeze(-1)

    def batch_statistics(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(mean, biased variance, token count) over real tokens, summed across ranks when syncing."""
        xf = x.float()
        m = self._real_tokens(x)
        sums = torch.cat([(xf * m).sum((0, 1)), m.sum().reshape(1)])
        sums = _all_reduce_if_distributed(sums) if self.sync else sums
        count = sums[-1].clamp_min(1.0)
        mean = sums[:-1] / count
        # Two passes (mean, then squared deviations) avoid the cancellation of E[x^2] - E[x]^2.
        sq = ((xf - mean) ** 2 * m).sum((0, 1))
        sq = _all_reduce_if_distributed(sq) if self.sync else sq
        return mean, sq / count, sums[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            mean, var, count = self.batch_statistics(x)
            with torch.no_grad():
                n = float(count)
                unbiased = var * (n / (n - 1.0)) if n > 1 else var
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), self.momentum)
                self.running_var.lerp_(unbiased.detach().to(self.running_var.dtype), self.momentum)
                self.num_batches_tracked += 1
        else:
            mean, var = self.running_mean.float(), self.running_var.float()
        y = (x.float() - mean) * torch.rsqrt(var + self.eps) * self.weight.float() + self.bias.float()
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}, momentum={self.momentum}, sync={self.sync}"


def _all_reduce_if_distributed(t: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        from torch.distributed.nn.functional import all_reduce

        return all_reduce(t)
    return t


def _is_rmsnorm(module: nn.Module) -> bool:
    return type(module).__name__.endswith("RMSNorm")


def make_norm(kind: str, hidden_size: int, eps: float) -> nn.Module:
    """A fresh normalisation module of ``kind`` (identity-like init: weight 1, bias 0)."""
    if kind == "layernorm":
        return nn.LayerNorm(hidden_size, eps=eps)
    if kind == "batchnorm":
        return MaskedBatchNorm(hidden_size, eps=max(eps, 1e-5))
    raise ValueError(f"unknown norm {kind!r}; expected one of {', '.join(NORMS)}")


def swap_norms(model: nn.Module, kind: str, copy_weight: bool = True) -> int:
    """Replace every RMSNorm in ``model`` by a ``kind`` norm (in place); returns how many were swapped.

    With ``copy_weight`` the RMSNorm gain is copied into the new module's weight (bias stays 0), which is
    what layer extraction from an RMSNorm teacher wants.
    """
    if kind == "rmsnorm":
        return 0
    targets = [(name, mod) for name, mod in model.named_modules() if _is_rmsnorm(mod)]
    for name, mod in targets:
        weight = mod.weight
        eps = float(getattr(mod, "variance_epsilon", getattr(mod, "eps", 1e-6)))
        new = make_norm(kind, weight.shape[0], eps).to(device=weight.device, dtype=weight.dtype)
        if copy_weight:
            with torch.no_grad():
                new.weight.copy_(weight)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, new)
    if kind == "batchnorm":
        install_mask_hook(model)
    return len(targets)


def _decoder(model: nn.Module) -> nn.Module:
    get = getattr(model, "get_decoder", None)
    dec = get() if callable(get) else None
    return dec if isinstance(dec, nn.Module) else model


def install_mask_hook(model: nn.Module) -> None:
    """Make the decoder hand its ``attention_mask`` to every :class:`MaskedBatchNorm` for each forward."""
    decoder = _decoder(model)
    if getattr(decoder, "_decodetune_mask_hook", False):
        return
    bns = [m for m in decoder.modules() if isinstance(m, MaskedBatchNorm)]

    def set_mask(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        mask = kwargs.get("attention_mask")
        if mask is None and len(args) > 1 and isinstance(args[1], torch.Tensor):
            mask = args[1]
        mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        for bn in bns:
            bn.token_mask = mask

    def clear_mask(_module: nn.Module, _args: Any, _output: Any) -> None:
        for bn in bns:
            bn.token_mask = None

    decoder.register_forward_pre_hook(set_mask, with_kwargs=True)
    decoder.register_forward_hook(clear_mask)
    decoder._decodetune_mask_hook = True


def norm_kind(config: Any) -> str:
    """The norm a (student) config declares; stock configs are ``rmsnorm``."""
    return str(getattr(config, NORM_CONFIG_FIELD, None) or "rmsnorm")


def _safetensors_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / s for s in shards]
    single = model_dir / "model.safetensors"
    return [single] if single.exists() else []


def maybe_patch_norm(model: nn.Module, model_dir: str | Path | None) -> nn.Module:
    """Turn a just-loaded decodetune student with a non-RMSNorm norm into the model it was trained as.

    No-op for stock configs (no ``decodetune_norm`` field, or ``rmsnorm``). Otherwise the RMSNorm
    modules that ``from_pretrained`` built are replaced by LayerNorm / MaskedBatchNorm and their
    tensors (weight, bias, running statistics) are read from the directory's safetensors files.
    Returns the model (patched in place).
    """
    kind = norm_kind(model.config)
    if kind == "rmsnorm":
        return model
    if kind not in NORMS:
        raise UserError(f"{model_dir}: config.json {NORM_CONFIG_FIELD}={kind!r} is not one of {', '.join(NORMS)}")
    if model_dir is None:
        raise UserError(f"a {kind} student needs its directory to load the norm tensors")
    from safetensors import safe_open

    norm_names = [name for name, mod in model.named_modules() if _is_rmsnorm(mod)]
    was_training = model.training
    swap_norms(model, kind, copy_weight=False)
    state = model.state_dict()
    wanted = {k for k in state if any(k.startswith(n + ".") for n in norm_names)}
    found: dict[str, torch.Tensor] = {}
    for f in _safetensors_files(Path(model_dir)):
        with safe_open(str(f), framework="pt") as st:
            for k in wanted.intersection(st.keys()):
                found[k] = st.get_tensor(k)
    missing = sorted(wanted - found.keys())
    if missing:
        raise UserError(f"{model_dir}: safetensors lack {len(missing)} {kind} tensors (first: {missing[0]})")
    with torch.no_grad():
        for k, v in found.items():
            state[k].copy_(v.to(dtype=state[k].dtype) if v.is_floating_point() else v)
    model.train(was_training)
    return model
