"""Distillation losses against hand-computed references (plain Python math, no torch softmax)."""

from __future__ import annotations

import math

import pytest
import torch

from decodetune.train.distill.data import Example, collate
from decodetune.train.distill.losses import (
    distill_loss,
    forward_kl,
    generalized_jsd,
    reverse_kl,
    token_cross_entropy,
)

STUDENT = [[1.0, 2.0, 3.0], [0.5, -1.0, 2.0]]
TEACHER = [[3.0, 1.0, 0.0], [0.0, 0.0, 4.0]]


def softmax(xs: list[float], tau: float = 1.0) -> list[float]:
    m = max(x / tau for x in xs)
    e = [math.exp(x / tau - m) for x in xs]
    return [v / sum(e) for v in e]


def kl(p: list[float], q: list[float]) -> float:
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True) if pi > 0)


def ref_jsd(s_logits: list[float], t_logits: list[float], beta: float, tau: float) -> float:
    s, t = softmax(s_logits, tau), softmax(t_logits, tau)
    m = [beta * ti + (1 - beta) * si for si, ti in zip(s, t, strict=True)]
    return (beta * kl(t, m) + (1 - beta) * kl(s, m)) * tau**2


def tensors() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor(STUDENT, dtype=torch.float64), torch.tensor(TEACHER, dtype=torch.float64)


@pytest.mark.parametrize("tau", [1.0, 2.0, 0.5])
def test_forward_and_reverse_kl_match_hand_computation(tau: float) -> None:
    s, t = tensors()
    fwd = forward_kl(s, t, tau)
    rev = reverse_kl(s, t, tau)
    for i in range(2):
        ps, pt = softmax(STUDENT[i], tau), softmax(TEACHER[i], tau)
        assert fwd[i].item() == pytest.approx(kl(pt, ps) * tau**2, rel=1e-6)
        assert rev[i].item() == pytest.approx(kl(ps, pt) * tau**2, rel=1e-6)
    assert fwd[0].item() != pytest.approx(rev[0].item(), rel=1e-3)  # they are different divergences


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_generalized_jsd_matches_hand_computation(beta: float, tau: float) -> None:
    s, t = tensors()
    got = generalized_jsd(s, t, beta, tau)
    for i in range(2):
        assert got[i].item() == pytest.approx(ref_jsd(STUDENT[i], TEACHER[i], beta, tau), rel=1e-6)


def test_jsd_end_points_are_forward_and_reverse_kl_and_limits_agree() -> None:
    s, t = tensors()
    assert torch.allclose(generalized_jsd(s, t, 0.0), forward_kl(s, t))
    assert torch.allclose(generalized_jsd(s, t, 1.0), reverse_kl(s, t))
    eps = 1e-5  # JSD(beta)/beta -> KL(T||S) as beta -> 0; JSD(beta)/(1-beta) -> KL(S||T) as beta -> 1
    assert torch.allclose(generalized_jsd(s, t, eps) / eps, forward_kl(s, t), rtol=1e-3)
    assert torch.allclose(generalized_jsd(s, t, 1 - eps) / eps, reverse_kl(s, t), rtol=1e-3)


def test_jsd_is_stable_for_extreme_logits() -> None:
    # softmax probabilities underflow to exactly 0 here; the log-space mixture must stay finite
    s = torch.tensor([[0.0, 800.0, -800.0]], dtype=torch.float32)
    t = torch.tensor([[900.0, 0.0, -900.0]], dtype=torch.float32)
    for beta in (0.0, 0.3, 1.0):
        v = generalized_jsd(s, t, beta)
        assert torch.isfinite(v).all()
    # teacher puts all mass on token 0, student on token 1: JSD(0.5) is log 2 (disjoint supports)
    assert generalized_jsd(s, t, 0.5).item() == pytest.approx(math.log(2), rel=1e-5)
    # KL(T||S) = log T(0) - log S(0) = 0 - (0 - 800)
    assert forward_kl(s, t).item() == pytest.approx(800.0, rel=1e-5)


def test_identical_distributions_give_zero() -> None:
    s, _ = tensors()
    for fn in (forward_kl, reverse_kl):
        assert torch.allclose(fn(s, s), torch.zeros(2, dtype=s.dtype), atol=1e-12)
    assert torch.allclose(generalized_jsd(s, s, 0.5), torch.zeros(2, dtype=s.dtype), atol=1e-12)


def test_cross_entropy_and_alpha_mix() -> None:
    s, t = tensors()
    labels = torch.tensor([2, 0])
    ce = token_cross_entropy(s, labels)
    for i, lab in enumerate([2, 0]):
        assert ce[i].item() == pytest.approx(-math.log(softmax(STUDENT[i])[lab]), rel=1e-6)
    parts = distill_loss(s, t, labels, kind="rkl", alpha=0.25, tau=2.0)
    want = [0.25 * ce[i].item() + 0.75 * kl(softmax(STUDENT[i], 2), softmax(TEACHER[i], 2)) * 4 for i in range(2)]
    assert parts["loss"].tolist() == pytest.approx(want, rel=1e-6)
    only_ce = distill_loss(s, None, labels, kind="ce")
    assert torch.equal(only_ce["loss"], ce)
    with pytest.raises(ValueError):
        distill_loss(s, None, labels, kind="fkl")


def test_gradients_flow_and_match_autograd_of_reference() -> None:
    s, t = tensors()
    s = s.clone().requires_grad_(True)
    generalized_jsd(s, t, 0.5).sum().backward()
    # finite-difference check of d JSD / d s[0, 0] against the Python reference
    h = 1e-6
    bumped = [row[:] for row in STUDENT]
    bumped[0][0] += h
    fd = (ref_jsd(bumped[0], TEACHER[0], 0.5, 1.0) - ref_jsd(STUDENT[0], TEACHER[0], 0.5, 1.0)) / h
    assert s.grad[0, 0].item() == pytest.approx(fd, rel=1e-4)


def test_collate_masks_only_completion_positions() -> None:
    exs = [Example([1, 5, 6], [7, 8, 2], 0), Example([1, 9], [2], 1)]
    batch = collate(exs, pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 5, 6, 7, 8, 2], [1, 9, 2, 0, 0, 0]]
    assert batch["target_mask"].tolist() == [[False, False, True, True, True, False],
                                             [False, True, False, False, False, False]]
    assert batch["labels"].tolist() == [7, 8, 2, 2]  # the completion tokens, padding never a target
