"""Margin softmax logits: SphereFace A-Softmax (default), ArcFace, CosFace (DESIGN §2.1).

Features and class weights are L2-normalised; a logit is scale * cos(theta). Only the
*target* logit of an *identity* sample gets a margin; sequence samples (center index
>= N_id) keep plain logits, their loss is LSR (see `lsr.py`).

The elementwise pieces (`psi`, `psi_from_cos`, `margin_target_cos`) are separate so the
row-partitioned head can apply the margin to the targets its rank owns.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .indices import check_center_index

MARGIN_KINDS = ("sphereface", "arcface", "cosface")


def lambda_schedule(
    step: int, *, base: float = 5.0, gamma: float = 0.12, power: float = 1.0,
    lambda_min: float = 5.0,
) -> float:
    """lambda_t = max(lambda_min, base * (1 + gamma * step) ** -power).

    `step` is used as given; the Caffe layer increments its counter before use, so its
    first forward pass is step 1. With the reference values (base = lambda_min = 5) the
    schedule is the constant 5.
    """
    if step < 0:
        raise ValueError(f"lambda_schedule: step must be >= 0, got {step}")
    return max(float(lambda_min), float(base) * (1.0 + gamma * step) ** (-power))


def _check_m(m: int, where: str) -> None:
    if not isinstance(m, int) or isinstance(m, bool) or m < 1:
        raise ValueError(f"{where}: m must be an integer >= 1, got {m!r}")


def _psi_segment(theta_or_cos: torch.Tensor, m: int, *, from_cos: bool) -> torch.Tensor:
    """k = floor(m theta / pi) in [0, m-1]; piecewise constant, so computed without grad."""
    with torch.no_grad():
        theta = torch.acos(theta_or_cos.clamp(-1.0, 1.0)) if from_cos else theta_or_cos
        return torch.floor(theta * (m / math.pi)).clamp(0, m - 1)


def psi(theta: torch.Tensor, m: int) -> torch.Tensor:
    """psi(theta) = (-1)^k cos(m theta) - 2k for theta in [k pi/m, (k+1) pi/m], k = 0..m-1.

    Continuous and monotonically decreasing on [0, pi], from 1 to -(2m - 1).
    """
    _check_m(m, "psi")
    k = _psi_segment(theta, m, from_cos=False)
    sign = 1.0 - 2.0 * torch.remainder(k, 2)
    return sign * torch.cos(m * theta) - 2.0 * k


def _chebyshev_t(c: torch.Tensor, m: int) -> torch.Tensor:
    """T_m(c) = cos(m acos c) as a polynomial (recurrence T_{n+1} = 2c T_n - T_{n-1})."""
    t_prev, t = torch.ones_like(c), c
    for _ in range(m - 1):
        t_prev, t = t, 2.0 * c * t - t_prev
    return t


def psi_from_cos(cos: torch.Tensor, m: int) -> torch.Tensor:
    """psi(acos(cos)) computed as (-1)^k T_m(cos) - 2k, like the reference's sign terms.

    The gradient is the polynomial's, so it stays finite at cos = +-1 (no d acos / d cos);
    acos is only used, clamped and without grad, to find the segment k.
    """
    _check_m(m, "psi_from_cos")
    k = _psi_segment(cos, m, from_cos=True)
    sign = 1.0 - 2.0 * torch.remainder(k, 2)
    return sign * _chebyshev_t(cos, m) - 2.0 * k


def _safe_acos(cos: torch.Tensor) -> torch.Tensor:
    # Keep acos' derivative -1/sqrt(1 - c^2) finite: clamp just inside [-1, 1]
    # (the clamp's gradient is 0 outside, so cos = +-1 gets a zero, finite gradient).
    eps = max(1e-7, float(torch.finfo(cos.dtype).eps))
    return torch.acos(cos.clamp(-1.0 + eps, 1.0 - eps))


def margin_target_cos(
    cos_target: torch.Tensor, *, kind: str = "sphereface", m: int = 4, lam: float = 5.0,
    arcface_margin: float = 0.5, cosface_margin: float = 0.35,
) -> torch.Tensor:
    """Margin-adjusted cosine of target entries (elementwise); the logit is scale * result.

    - sphereface: (lam * cos + psi(theta)) / (1 + lam), psi with integer margin m.
    - arcface: cos(theta + arcface_margin) while theta + margin <= pi; beyond, the
      continuous, still decreasing cos - (1 - cos(margin)) (so the target never gains
      by moving past pi - margin).
    - cosface: cos - cosface_margin.
    """
    if kind == "sphereface":
        if lam < 0:
            raise ValueError(f"margin_target_cos: lam must be >= 0, got {lam}")
        return (lam * cos_target + psi_from_cos(cos_target, m)) / (1.0 + lam)
    if kind == "arcface":
        if not 0.0 <= arcface_margin < math.pi:
            raise ValueError(f"margin_target_cos: arcface_margin must be in [0, pi), "
                             f"got {arcface_margin}")
        theta = _safe_acos(cos_target)
        fallback = cos_target - (1.0 - math.cos(arcface_margin))
        return torch.where(theta <= math.pi - arcface_margin,
                           torch.cos(theta + arcface_margin), fallback)
    if kind == "cosface":
        return cos_target - cosface_margin
    raise ValueError(f"margin_target_cos: unknown kind {kind!r}; choose one of {MARGIN_KINDS}")


class _ReferenceTargetLogit(torch.autograd.Function):
    """SphereFace target logit |x| (lam cos + psi(cos)) / (1 + lam) with the Caffe backward.

    NOT the true gradient. The true derivative w.r.t. x is
        (lam w + a w + b x) / (1 + lam),  a = psi'(cos),  b = (psi - cos psi'(cos)) / |x|;
    the reference MarginInnerProduct layer rescales (a, b) to unit norm (a, b) / ||(a, b)||
    before using them. Its weight gradient is that of a plain linear layer, g * x.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, lam: float, m: int) -> torch.Tensor:
        x_norm = x.norm(dim=1)
        cos = (x * w).sum(dim=1) / x_norm
        ctx.save_for_backward(x, w, x_norm, cos)
        ctx.lam, ctx.m = lam, m
        return x_norm * (lam * cos + psi_from_cos(cos, m)) / (1.0 + lam)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, w, x_norm, cos = ctx.saved_tensors
        lam, m = ctx.lam, ctx.m
        with torch.enable_grad():
            c = cos.detach().requires_grad_(True)
            p = psi_from_cos(c, m)
            (dpsi,) = torch.autograd.grad(p.sum(), c)
        coeff_w = dpsi
        coeff_x = (p.detach() - cos * dpsi) / x_norm
        norm = torch.sqrt(coeff_w**2 + coeff_x**2).clamp_min(torch.finfo(x.dtype).tiny)
        g = (grad_out / (1.0 + lam)).unsqueeze(1)
        grad_x = g * (lam * w + (coeff_w / norm).unsqueeze(1) * w
                      + (coeff_x / norm).unsqueeze(1) * x)
        grad_w = grad_out.unsqueeze(1) * x
        return grad_x, grad_w, None, None


def reference_target_logit(x: torch.Tensor, w: torch.Tensor, *, lam: float, m: int) -> torch.Tensor:
    """Target logits for rows x (scaled features, K x D) and their normalised weights w (K x D),
    with the reference Caffe layer's rescaled backward (documented as not the true gradient)."""
    _check_m(m, "reference_target_logit")
    return _ReferenceTargetLogit.apply(x, w, float(lam), m)


def _check_head_inputs(features, weight, center_index, num_identities, where):
    if features.dim() != 2 or weight.dim() != 2:
        raise ValueError(f"{where}: features and weight must be 2-D, got {tuple(features.shape)} "
                         f"and {tuple(weight.shape)}")
    if weight.shape != (num_identities, features.shape[1]):
        raise ValueError(f"{where}: weight must have shape (num_identities={num_identities}, "
                         f"D={features.shape[1]}), got {tuple(weight.shape)}")
    # A sequence center index may reach any value >= N_id; only negatives are malformed.
    check_center_index(center_index, features.shape[0], 2**62, where=where)


def margin_logits(
    features: torch.Tensor, weight: torch.Tensor, center_index: torch.Tensor,
    num_identities: int, *, kind: str = "sphereface", scale: float = 32.0, m: int = 4,
    lam: float = 5.0, arcface_margin: float = 0.5, cosface_margin: float = 0.35,
    reference_grad: bool = False,
) -> torch.Tensor:
    """Logits (B x N_id) of an L2-constrained margin softmax.

    logit_ic = scale * cos(theta_ic); the target entry of identity samples
    (center_index < num_identities) is scale * margin_target_cos(cos). Sequence samples get
    no margin. `reference_grad=True` (sphereface only) swaps in the Caffe layer's rescaled
    target-logit backward, which is NOT the true gradient (see `_ReferenceTargetLogit`).
    """
    where = "margin_logits"
    _check_head_inputs(features, weight, center_index, num_identities, where)
    if scale <= 0:
        raise ValueError(f"{where}: scale must be > 0, got {scale}")
    if reference_grad and kind != "sphereface":
        raise ValueError(f"{where}: reference_grad is only defined for kind='sphereface'")
    f_hat = F.normalize(features, dim=1)
    w_hat = F.normalize(weight, dim=1)
    cos = f_hat @ w_hat.t()
    logits = scale * cos
    rows = (center_index < num_identities).nonzero().squeeze(1)
    if rows.numel() == 0:
        return logits
    cols = center_index[rows]
    if reference_grad:
        target = reference_target_logit(scale * f_hat[rows], w_hat[cols], lam=lam, m=m)
    else:
        cos_t = cos[rows, cols]
        target = scale * margin_target_cos(cos_t, kind=kind, m=m, lam=lam,
                                           arcface_margin=arcface_margin,
                                           cosface_margin=cosface_margin)
    return logits.index_put((rows, cols), target)


def sphereface_logits(
    features: torch.Tensor, weight: torch.Tensor, center_index: torch.Tensor,
    num_identities: int, *, m: int = 4, scale: float = 32.0, lam: float = 5.0,
    reference_grad: bool = False,
) -> torch.Tensor:
    """SphereFace A-Softmax logits on normalised features (DESIGN §2.1 defaults)."""
    return margin_logits(features, weight, center_index, num_identities, kind="sphereface",
                         scale=scale, m=m, lam=lam, reference_grad=reference_grad)
