"""Token-level distillation losses: forward KL, reverse KL, generalized JSD (GKD) and their CE mix.

Every function takes logits of shape ``(N, V)`` (already gathered at the completion positions, so
masking happened before) and returns one loss per token, shape ``(N,)``; callers sum and normalise.

Conventions (also in docs/distillation.md):

* ``tau`` is the softmax temperature of the soft targets; every KD term is multiplied by ``tau**2``
  (Hinton et al. 2015) so that its gradient scale does not shrink as ``tau`` grows.
* ``S`` = softmax(student / tau), ``T`` = softmax(teacher / tau).
* forward KL = KL(T || S) (mean-seeking), reverse KL = KL(S || T) (mode-seeking).
* generalized JSD (Agarwal et al. 2024, GKD) with ``M = beta*T + (1-beta)*S``:
  ``JSD(beta) = beta*KL(T || M) + (1-beta)*KL(S || M)``, computed in log space (logsumexp). As in
  GKD/TRL, ``beta=0`` is defined as forward KL and ``beta=1`` as reverse KL: JSD(beta) itself tends to
  0 at both ends (it behaves like ``beta*KL(T||S)`` near 0 and ``(1-beta)*KL(S||T)`` near 1), so the
  end points are the limits of the *normalised* divergence, not of its value.
* The mix with cross-entropy: ``loss = alpha*CE + (1-alpha)*KD``; ``kind="ce"`` is CE alone.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LOSS_KINDS = ("ce", "fkl", "rkl", "jsd")


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """At least float32 (half-precision logits lose too much in log-softmax); float64 stays float64."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _kl_from_logprobs(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(P || Q) per row from log-probabilities; terms with P = 0 count 0 (no 0 * inf = nan)."""
    p = logp.exp()
    terms = torch.where(p > 0, p * (logp - logq), torch.zeros_like(p))
    return terms.sum(-1)


def forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """``tau**2 * KL(T || S)`` per token (soft targets, Hinton)."""
    s = F.log_softmax(_upcast(student_logits) / tau, dim=-1)
    t = F.log_softmax(_upcast(teacher_logits) / tau, dim=-1)
    return _kl_from_logprobs(t, s) * tau**2


def reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """``tau**2 * KL(S || T)`` per token."""
    s = F.log_softmax(_upcast(student_logits) / tau, dim=-1)
    t = F.log_softmax(_upcast(teacher_logits) / tau, dim=-1)
    return _kl_from_logprobs(s, t) * tau**2


def generalized_jsd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float = 0.5,
                    tau: float = 1.0) -> torch.Tensor:
    """``tau**2 * JSD(beta)`` per token, with ``M = beta*T + (1-beta)*S`` built by logsumexp.

    ``beta=0`` returns forward KL and ``beta=1`` reverse KL (see the module docstring).
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if beta == 0.0:
        return forward_kl(student_logits, teacher_logits, tau)
    if beta == 1.0:
        return reverse_kl(student_logits, teacher_logits, tau)
    s = F.log_softmax(_upcast(student_logits) / tau, dim=-1)
    t = F.log_softmax(_upcast(teacher_logits) / tau, dim=-1)
    log_m = torch.logsumexp(torch.stack([t + math.log(beta), s + math.log(1.0 - beta)]), dim=0)
    return (beta * _kl_from_logprobs(t, log_m) + (1.0 - beta) * _kl_from_logprobs(s, log_m)) * tau**2


def token_cross_entropy(student_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Plain next-token cross-entropy per token (no temperature)."""
    return F.cross_entropy(_upcast(student_logits), labels, reduction="none")


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor | None, labels: torch.Tensor,
                 kind: str = "fkl", alpha: float = 0.0, tau: float = 1.0,
                 beta: float = 0.5) -> dict[str, torch.Tensor]:
    """Per-token losses: ``{"loss", "ce", "kd"}``, each of shape ``(N,)``.

    ``loss = alpha*ce + (1-alpha)*kd`` for the KD kinds; for ``kind="ce"`` it is ``ce`` and ``kd`` is 0.
    ``teacher_logits`` may be None only when no KD term is needed.
    """
    if kind not in LOSS_KINDS:
        raise ValueError(f"unknown loss kind {kind!r}; expected one of {', '.join(LOSS_KINDS)}")
    ce = token_cross_entropy(student_logits, labels)
    if kind == "ce" or alpha >= 1.0:
        return {"loss": ce, "ce": ce, "kd": torch.zeros_like(ce)}
    if teacher_logits is None:
        raise ValueError(f"loss kind {kind!r} with alpha={alpha} needs teacher logits")
    if kind == "fkl":
        kd = forward_kl(student_logits, teacher_logits, tau)
    elif kind == "rkl":
        kd = reverse_kl(student_logits, teacher_logits, tau)
    else:
        kd = generalized_jsd(student_logits, teacher_logits, beta, tau)
    loss = kd if alpha <= 0.0 else alpha * ce + (1.0 - alpha) * kd
    return {"loss": loss, "ce": ce, "kd": kd}


def needs_teacher_logits(kind: str, alpha: float) -> bool:
    """Whether a loss configuration uses the teacher's distribution at all."""
    return kind != "ce" and alpha < 1.0
