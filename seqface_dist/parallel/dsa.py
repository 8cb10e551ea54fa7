"""The DSA loss over a row block of the centers (DESIGN.md §2.2, §3 step 3).

The owner of each sample's center computes the pull distance d_pos = |f - c_t|^2 / 4;
one all-reduce shares it together with the per-rank count of drawn negatives. Each rank
then computes the hinge terms against the negatives drawn from its own block, and a
second all-reduce sums them per sample. Like the chief loss, the backward needs no
communication: it returns this block's share of the feature gradient (summed over ranks
by the features' all-gather) and the center update for the rows this rank owns.
"""

from __future__ import annotations

import torch

from .comm import Comm


class BlockDSA(torch.autograd.Function):
    """Per-sample DSA loss L_i of the global batch, from this rank's block of centers.

    Inputs: ``feats`` (B x D) global batch features; ``centers`` (m x D) local block;
    ``center_index`` (B,) global; ``own_row`` (B,) local row of the sample's center or -1;
    ``is_seq`` (B,) bool; ``neg_rows`` (k,) local rows of the negatives drawn here;
    ``neg_index`` (k,) their global center indices; ``neg_is_seq`` (k,) bool.
    Returns (L (B,), pull (B,), push (B,), stats (3,)): L has gradients; pull = lam d_pos
    and push = (1 - lam)/|S| sum hinge are for logging; stats = (active hinge terms,
    counted hinge terms, |S|). ``centers`` receives the center update, not a gradient:
    -(1/(1 + count_n)) sum_{i: t_i = n} (f_i - c_n)/2, whatever the loss is scaled by, as
    a sparse tensor over the batch's rows (the head's optimizer applies it in place).
    """

    @staticmethod
    def forward(ctx, feats, centers, center_index, own_row, is_seq, neg_rows, neg_index,
                neg_is_seq, comm: Comm, lam: float, alpha: float, beta: float):
        b = feats.shape[0]
        owned = (own_row >= 0).nonzero().squeeze(1)
        diff_pos = feats[owned] - centers[own_row[owned]]  # (b_own x D)
        packed = torch.zeros(b + 1, dtype=feats.dtype, device=feats.device)
        packed[owned] = diff_pos.square().sum(dim=1) / 4.0
        packed[b] = neg_rows.numel()
        comm.all_reduce_(packed)
        d_pos, num_drawn = packed[:b], packed[b]

        neg = centers[neg_rows].to(feats.dtype)  # (k x D); a bf16 block: distances in fp32
        # d(f, c) = (|f|^2 - 2 f.c + |c|^2) / 4 as one GEMM, never a B x k x D tensor.
        d_neg = torch.addmm(neg.square().sum(1)[None, :], feats, neg.t(), alpha=-2.0)
        d_neg.add_(feats.square().sum(1)[:, None]).div_(4.0)
        counted = (neg_index[None, :] != center_index[:, None]) & \
            ~(is_seq[:, None] & neg_is_seq[None, :])
        hinge = (alpha * d_pos[:, None] - d_neg + beta).clamp_min_(0.0).mul_(counted)
        active = hinge > 0
        sums = torch.stack([hinge.sum(1), active.sum(1).to(feats.dtype),
                            counted.sum(1).to(feats.dtype)])
        comm.all_reduce_(sums)
        hinge_sum, n_active, n_counted = sums

        push_coef = (1.0 - lam) / num_drawn if num_drawn > 0 else torch.zeros_like(num_drawn)
        pull = lam * d_pos
        push = push_coef * hinge_sum
        stats = torch.stack([n_active.sum(), n_counted.sum(), num_drawn])

        # Center update for the centers this rank owns, as a sparse gradient over only the
        # rows in the batch: a dense one would zero-fill and rewrite the whole block.
        rows, slot = own_row[owned].unique(return_inverse=True)
        delta = torch.zeros(rows.numel(), feats.shape[1], dtype=feats.dtype, device=feats.device)
        delta.index_add_(0, slot, diff_pos)
        count = torch.bincount(slot, minlength=rows.numel()).to(feats.dtype)
        delta.mul_((-0.5 / (1.0 + count))[:, None])
        update = torch.sparse_coo_tensor(rows[None], delta.to(centers.dtype), centers.shape,
                                         is_coalesced=True,
                                         check_invariants=False)  # unique rows, in range

        ctx.save_for_backward(feats, centers, owned, own_row, diff_pos, neg, active,
                              n_active, push_coef, update)
        ctx.lam, ctx.alpha = lam, alpha
        ctx.mark_non_differentiable(pull, push, stats)
        return pull + push, pull, push, stats

    @staticmethod
    def backward(ctx, grad_loss, *_):
        feats, centers, owned, own_row, diff_pos, neg, active, n_active, push_coef, update = \
            ctx.saved_tensors
        grad = torch.zeros_like(feats)
        # Pull and the hinges' alpha * d_pos: only the owner of c_t holds f - c_t.
        g_pos = grad_loss[owned] * (ctx.lam + ctx.alpha * push_coef * n_active[owned])
        grad[owned] = (g_pos / 2.0)[:, None] * diff_pos
        # - d(f, c_n) of the active hinges on this rank's negatives: -(f - c_n) / 2 each.
        if neg.shape[0]:
            a = active.to(feats.dtype).mul_((grad_loss * push_coef / 2.0)[:, None])
            grad.sub_(a.sum(1)[:, None] * feats - a @ neg)
        return grad, update, None, None, None, None, None, None, None, None, None, None
