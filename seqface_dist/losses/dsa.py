"""DSA (discriminative sequence agent) loss and plain center loss (DESIGN §2.2).

    L_i = lam * d(f_i, c_{t_i})
          + ((1 - lam) / |S|) * sum_{n in S, counted} max(0, alpha d_pos_i - d(f_i, c_n) + beta)

with d_pos_i = d(f_i, c_{t_i}) and d(a, b) = ||a - b||^2 / 4. A pair (i, n) is *counted*
unless n == t_i or both t_i and n are sequence centers (two tracks may be one person);
|S| counts every drawn center.
The loss is the mean of L_i over the batch.

Gradients (custom autograd function):
- features: the true gradient of the loss (through d_pos in the pull and the hinge,
  through d_neg in the hinge); centers are constants in it.
- centers: NOT a gradient of the loss but the center-loss style update of the reference,
  Delta c_n = -(1 / (1 + count_n)) * sum_{i: t_i = n} (f_i - c_n) / 2 for centers in the
  batch, zero elsewhere. It ignores the incoming grad_output, so a loss weight (0.04) or
  a mean does not change how fast the centers move: step them with the center lr.

`normalize_scale` > 0 (reference default: off) projects features (differentiably) and the
centers used (inside, like the reference's in-place normalisation) onto the sphere of
that radius before distances; the center update is then taken between the projected
quantities and applied to the stored rows.

`sparse_center_grad=True` returns the center update as a sparse COO gradient holding only
the batch's rows (a dense N x D zero tensor per step is wasteful for millions of centers;
torch.optim.SGD accepts sparse gradients).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from .indices import check_center_index, is_sequence


class DSATerms(NamedTuple):
    """One DSA evaluation. Only `loss` carries gradients; the rest are detached, for logs."""

    loss: torch.Tensor  # pull + push, differentiable scalar
    pull: torch.Tensor  # mean over the batch of lam * d_pos
    push: torch.Tensor  # mean over the batch of the hinge part
    active_fraction: torch.Tensor  # active hinge terms / counted pairs (0 when none counted)
    num_counted: torch.Tensor  # counted (sample, negative) pairs
    num_active: torch.Tensor  # counted pairs with a hinge > 0


def pairwise_quarter_sqdist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """d(a_i, b_j) = ||a_i - b_j||^2 / 4 for all pairs (len(a) x len(b))."""
    sq = (a * a).sum(1, keepdim=True) + (b * b).sum(1).unsqueeze(0) - 2.0 * (a @ b.t())
    return sq.clamp_min(0.0) / 4.0


def counted_pairs(
    center_index: torch.Tensor, negatives: torch.Tensor, num_identities: int
) -> torch.Tensor:
    """Boolean (B x |S|): which (sample, negative) hinge terms count.

    Skipped: the sample's own center, and a sequence sample against a sequence center.
    """
    own = negatives.unsqueeze(0) == center_index.unsqueeze(1)
    both_seq = (is_sequence(center_index, num_identities).unsqueeze(1)
                & is_sequence(negatives, num_identities).unsqueeze(0))
    return ~(own | both_seq)


def _project(rows: torch.Tensor, scale: float) -> torch.Tensor:
    return rows if scale <= 0 else scale * F.normalize(rows, dim=1)


def _center_delta(
    features: torch.Tensor, center_index: torch.Tensor, own_centers: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    rows, inverse, counts = torch.unique(center_index, return_inverse=True, return_counts=True)
    sums = torch.zeros(rows.shape[0], features.shape[1], dtype=features.dtype,
                       device=features.device)
    sums.index_add_(0, inverse, features - own_centers)
    delta = -sums / (2.0 * (1.0 + counts.to(features.dtype))).unsqueeze(1)
    return rows, delta


def center_update_delta(
    features: torch.Tensor, center_index: torch.Tensor, centers: torch.Tensor, *,
    normalize_scale: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse center update: (rows, delta) with delta[j] = Delta c_{rows[j]} (see module doc).

    For a partitioned head: apply to local rows only, with the same center optimizer.
    """
    with torch.no_grad():
        own = _project(centers[center_index], normalize_scale)
        return _center_delta(features.detach(), center_index, own)


class _DSAFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, features, centers, center_index, negatives, num_identities, lam, alpha,
                beta, normalize_scale, sparse_center_grad):
        batch = features.shape[0]
        own = _project(centers[center_index], normalize_scale)
        diff_pos = features - own
        d_pos = (diff_pos * diff_pos).sum(1) / 4.0
        pull_i = lam * d_pos
        num_neg = negatives.shape[0]
        if num_neg > 0:
            neg = _project(centers[negatives], normalize_scale)
            counted = counted_pairs(center_index, negatives, num_identities)
            hinge = alpha * d_pos.unsqueeze(1) - pairwise_quarter_sqdist(features, neg) + beta
            active = counted & (hinge > 0)
            push_i = ((1.0 - lam) / num_neg) * torch.where(active, hinge, 0.0).sum(1)
            num_counted = counted.sum()
        else:
            neg = features.new_zeros(0, features.shape[1])
            active = torch.zeros(batch, 0, dtype=torch.bool, device=features.device)
            push_i = torch.zeros_like(pull_i)
            num_counted = torch.zeros((), dtype=torch.long, device=features.device)
        num_active = active.sum()
        ctx.save_for_backward(features, center_index, own, diff_pos, neg, active)
        ctx.lam, ctx.alpha, ctx.num_neg = lam, alpha, num_neg
        ctx.centers_shape, ctx.sparse_center_grad = centers.shape, sparse_center_grad
        pull, push = pull_i.mean(), push_i.mean()
        frac = num_active.to(features.dtype) / num_counted.clamp_min(1).to(features.dtype)
        extras = (pull, push, frac, num_counted, num_active)
        ctx.mark_non_differentiable(*extras)
        return (pull + push, *extras)

    @staticmethod
    def backward(ctx, grad_loss, *_unused):
        features, center_index, own, diff_pos, neg, active = ctx.saved_tensors
        lam, alpha, num_neg = ctx.lam, ctx.alpha, ctx.num_neg
        grad_f = grad_c = None
        if ctx.needs_input_grad[0]:
            # d/df of lam d_pos + (1-lam)/|S| sum_active (alpha d_pos - d_neg), d' = (f - c)/2.
            coef_pos = torch.full_like(diff_pos[:, 0], lam)
            grad_f = diff_pos / 2.0
            if num_neg > 0:
                act = active.to(features.dtype)
                n_act = act.sum(1)
                coef_pos = coef_pos + (1.0 - lam) * alpha * n_act / num_neg
                to_negs = (n_act.unsqueeze(1) * features - act @ neg) / 2.0
                grad_f = coef_pos.unsqueeze(1) * grad_f - ((1.0 - lam) / num_neg) * to_negs
            else:
                grad_f = coef_pos.unsqueeze(1) * grad_f
            grad_f = grad_f * (grad_loss / features.shape[0])
        if ctx.needs_input_grad[1]:
            # Center update, independent of grad_loss by design (see module doc).
            rows, delta = _center_delta(features, center_index, own)
            if ctx.sparse_center_grad:
                # torch.unique sorted the rows without repeats: already coalesced.
                grad_c = torch.sparse_coo_tensor(rows.unsqueeze(0), delta, ctx.centers_shape,
                                                 is_coalesced=True, check_invariants=False)
            else:
                grad_c = torch.zeros(ctx.centers_shape, dtype=delta.dtype, device=delta.device)
                grad_c.index_add_(0, rows, delta)
        return grad_f, grad_c, None, None, None, None, None, None, None, None


def _check_dsa_inputs(features, center_index, centers, num_identities, negatives, lam, where):
    if not isinstance(features, torch.Tensor) or features.dim() != 2:
        raise ValueError(f"{where}: features must be a 2-D tensor (B x D)")
    if not features.dtype.is_floating_point:
        raise TypeError(f"{where}: features must be floating point, got {features.dtype}")
    if features.shape[0] == 0:
        raise ValueError(f"{where}: empty batch")
    if centers.dim() != 2 or centers.shape[1] != features.shape[1]:
        raise ValueError(f"{where}: centers must have shape (N, D={features.shape[1]}), "
                         f"got {tuple(centers.shape)}")
    num_centers = centers.shape[0]
    if not 0 <= num_identities <= num_centers:
        raise ValueError(f"{where}: num_identities={num_identities} must be in "
                         f"[0, N={num_centers}]")
    check_center_index(center_index, features.shape[0], num_centers, where=where)
    if not isinstance(negatives, torch.Tensor) or negatives.dim() != 1:
        raise ValueError(f"{where}: negatives must be a 1-D integer tensor of center indices")
    check_center_index(negatives, negatives.shape[0], num_centers, where=where, name="negatives")
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"{where}: lam must be in [0, 1], got {lam}")


def dsa_terms(
    features: torch.Tensor, center_index: torch.Tensor, centers: torch.Tensor,
    num_identities: int, negatives: torch.Tensor, *, lam: float = 0.5, alpha: float = 2.0,
    beta: float = 1.0, normalize_scale: float = 0.0, sparse_center_grad: bool = False,
) -> DSATerms:
    """DSA loss and its parts. `centers` holds all N = N_id + N_seq rows; `negatives` are
    indices into it (from `sample_negatives`), one set for the whole batch."""
    where = "dsa_loss"
    _check_dsa_inputs(features, center_index, centers, num_identities, negatives, lam, where)
    if normalize_scale < 0:
        raise ValueError(f"{where}: normalize_scale must be >= 0, got {normalize_scale}")
    if normalize_scale > 0:
        features = normalize_scale * F.normalize(features, dim=1)
    negatives = negatives.to(device=features.device, dtype=torch.long)
    center_index = center_index.to(device=features.device, dtype=torch.long)
    out = _DSAFunction.apply(features, centers, center_index, negatives, int(num_identities),
                             float(lam), float(alpha), float(beta), float(normalize_scale),
                             bool(sparse_center_grad))
    return DSATerms(*out)


def dsa_loss(
    features: torch.Tensor, center_index: torch.Tensor, centers: torch.Tensor,
    num_identities: int, negatives: torch.Tensor, *, lam: float = 0.5, alpha: float = 2.0,
    beta: float = 1.0, normalize_scale: float = 0.0, sparse_center_grad: bool = False,
) -> torch.Tensor:
    """Scalar DSA loss (mean over the batch); see the module doc for the gradients."""
    return dsa_terms(features, center_index, centers, num_identities, negatives, lam=lam,
                     alpha=alpha, beta=beta, normalize_scale=normalize_scale,
                     sparse_center_grad=sparse_center_grad).loss


def center_loss(
    features: torch.Tensor, center_index: torch.Tensor, centers: torch.Tensor,
    num_identities: int, *, normalize_scale: float = 0.0, sparse_center_grad: bool = False,
) -> torch.Tensor:
    """Plain center loss: mean d(f_i, c_{t_i}) = DSA with lam = 1 and no negatives."""
    no_negatives = torch.zeros(0, dtype=torch.long, device=features.device)
    return dsa_loss(features, center_index, centers, num_identities, no_negatives, lam=1.0,
                    normalize_scale=normalize_scale, sparse_center_grad=sparse_center_grad)
