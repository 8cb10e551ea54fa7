"""The chief loss (margin softmax + LSR) over a row block of the classifier.

One autograd Function does the block's whole forward and backward so that the only
B x n_local buffer is allocated once and reused in place: cosines -> logits -> exp
(forward, saved) -> probabilities -> logit gradients (backward). The softmax is assembled
from two all-reduces of O(B) values (row max; then row sum of exp, target logit and row
sum of logits). The backward needs no communication: the gradient it returns for the
features is this block's share, summed over ranks by the features' all-gather.

Math per sample i (DESIGN.md §2.1, §2.2a): classification rows l_i = lse(z_i) - z_iy over
the columns the sample sees (hidden columns hold -inf: p = q = 0 there), LSR rows
l_i = lse(z_i) - mean_c z_ic over the identity columns; so dl_i/dz_ic = p_ic - q_ic with
q one-hot or uniform.

A bf16 W (``train.head_precision``): the GEMMs and the B x n buffer in bf16, the row
norms, the margin, the softmax statistics (row max, sums of exp and of logits, the target
logit) and the loss in fp32.

Sampled softmax (``row_index``, Partial FC's idea): the block is the rows ``row_index`` of
W only (this rank's positives plus uniform negatives, drawn by the head). Every formula
above then runs over the sampled columns, and W's gradient is a sparse gradient on those
rows (the optimizer touches nothing else).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from seqface_dist.losses import margin_target_cos, psi_from_cos

from .comm import Comm

_ROWDOT_CHUNK = 1 << 16  # rows per chunk of the W-norm correction (bounds its temporary)


class Workspace:
    """Large buffers the head reuses step after step.

    A fresh gigabyte-sized tensor costs a page fault per page on first write (seen ~1 s/GB
    on a VM); the logits buffer and W's gradient are the same shapes every step, so they
    are allocated once. A buffer still held by a forward awaiting its backward is never
    handed out twice: the second caller gets a temporary.
    """

    def __init__(self) -> None:
        self._bufs: dict[str, torch.Tensor] = {}
        self._busy: set[str] = set()

    def take(self, name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        if name in self._busy:
            return torch.empty(shape, dtype=like.dtype, device=like.device)
        b = self._bufs.get(name)
        if b is None or b.shape != shape or b.dtype != like.dtype or b.device != like.device:
            b = self._bufs[name] = torch.empty(shape, dtype=like.dtype, device=like.device)
        self._busy.add(name)
        return b

    def give_back(self, name: str, buf: torch.Tensor) -> None:
        if self._bufs.get(name) is buf:
            self._busy.discard(name)


@dataclass(frozen=True)
class MarginSpec:
    kind: str = "sphereface"
    m: int = 4
    scale: float = 32.0
    arcface_margin: float = 0.5
    cosface_margin: float = 0.35
    reference_grad: bool = False  # sphereface only: the Caffe layer's rescaled backward

    def target_cos(self, cos: torch.Tensor, lam: float) -> torch.Tensor:
        return margin_target_cos(cos, kind=self.kind, m=self.m, lam=lam,
                                 arcface_margin=self.arcface_margin,
                                 cosface_margin=self.cosface_margin)

    def reference_coefficients(self, cos: torch.Tensor,
                               lam: float) -> tuple[torch.Tensor, torch.Tensor]:
        """d(target)/d cos on the feature path and on the weight path, as the Caffe layer.

        The reference's target logit |x| (lam cos + psi) / (1 + lam) has the derivative
        (lam w + a w + b x) / (1 + lam) along x, a = psi'(cos), b = (psi - cos a) / |x|; it
        uses (a, b) / |(a, b)| instead. With x = s fn, the b x part is radial and vanishes
        through the features' normalisation, leaving (lam + a / |(a, b)|) / (1 + lam) on the
        feature path; its weight gradient is a plain linear layer's (coefficient 1).
        See ``seqface_dist.losses.margins._ReferenceTargetLogit`` (the dense oracle).
        """
        with torch.enable_grad():
            c = cos.detach().requires_grad_(True)
            p = psi_from_cos(c, self.m)
            (a,) = torch.autograd.grad(p.sum(), c) if c.numel() else (c,)
        b = (p.detach() - cos * a) / self.scale
        unit = torch.sqrt(a.square() + b.square()).clamp_min(torch.finfo(cos.dtype).tiny)
        return (lam + a / unit) / (1.0 + lam), torch.ones_like(cos)


class BlockMarginSoftmax(torch.autograd.Function):
    """Per-sample chief loss of the global batch, from this rank's block of W.

    Inputs: ``fn`` (B x D) L2-normalised features of the global batch; ``weight``
    (n x D) raw local rows of W (its identity rows first, then ``n - n_id_cols`` sequence
    rows in the modes that have them); ``target_col`` (B,) local column of the sample's
    target where this rank owns it, else -1; ``uniform`` (B,) bool: LSR samples (target
    uniform over the identity classes); ``hide_id`` / ``hide_seq`` (B,) bool: the sample's
    softmax leaves out the identity / sequence columns (its own target column stays).
    Returns l (B,), equal on all ranks. Backward may run once (it reuses the saved buffer
    in place). W's gradient is written into ``weight.grad`` directly (a workspace buffer,
    accumulated if a gradient is already there), so no fresh n x D tensor is allocated.
    ``row_index`` (sorted distinct rows of ``weight``): the block is those rows only
    (columns, ``target_col`` and ``n_id_cols`` count in them); W's gradient is then sparse,
    on those rows.
    """

    @staticmethod
    def forward(ctx, fn, param, target_col, uniform, hide_id, hide_seq, comm: Comm,
                spec: MarginSpec, lam: float, num_identities: int, n_id_cols: int,
                workspace: Workspace, row_index: torch.Tensor | None = None):
        weight = param if row_index is None else param[row_index]
        acc = torch.promote_types(weight.dtype, torch.float32)  # statistics: fp32 at least
        eps = torch.finfo(acc).tiny
        inv_wnorm = _row_norms(weight, acc).clamp_min_(eps).reciprocal_()
        # GEMM 1, into the block's only B x n buffer.
        z = workspace.take("logits", (fn.shape[0], weight.shape[0]), fn)
        torch.mm(fn, weight.t(), out=z)
        z.mul_(inv_wnorm.to(z.dtype))  # cosines
        rows = (target_col >= 0).nonzero().squeeze(1)
        cols = target_col[rows]
        with torch.enable_grad():  # d margin / d cos, for the backward
            cos_t = z[rows, cols].detach().to(acc).requires_grad_(True)
            g_t = spec.target_cos(cos_t, lam)
            (dg_t,) = torch.autograd.grad(g_t.sum(), cos_t) if rows.numel() else (cos_t,)
        dg_x, dg_w = dg_t, dg_t
        if spec.reference_grad:
            dg_x, dg_w = spec.reference_coefficients(cos_t.detach(), lam)
        if bool(hide_id.any()):
            z[hide_id, :n_id_cols] = float("-inf")
        if bool(hide_seq.any()):
            z[hide_seq, n_id_cols:] = float("-inf")
        z[rows, cols] = g_t.detach().to(z.dtype)
        z.mul_(spec.scale)  # logits

        b = z.shape[0]
        rowmax = (z.max(dim=1).values.to(acc) if z.shape[1] else
                  torch.full((b,), float("-inf"), dtype=acc, device=z.device))
        comm.all_reduce_(rowmax, op="max")
        stats = torch.zeros(3, b, dtype=acc, device=z.device)
        if bool(uniform.any()):  # LSR needs the mean logit over all N_id classes
            stats[2] = _row_sums(z[:, :n_id_cols], acc)
        stats[1, rows] = g_t.detach() * spec.scale  # = z[rows, cols], kept in fp32 or wider
        # rowmax is one of the (bf16) logits, so subtracting it in z's dtype is exact.
        z.sub_(rowmax.to(z.dtype)[:, None]).exp_()
        stats[0] = _row_sums(z, acc)
        comm.all_reduce_(stats)
        sumexp, target, rowsum = stats
        lse = rowmax + sumexp.log()
        loss = torch.where(uniform, lse - rowsum / num_identities, lse - target)

        ctx.save_for_backward(z, sumexp, fn, weight, inv_wnorm, rows, cols, dg_x, dg_w,
                              uniform)
        ctx.scale, ctx.num_identities, ctx.n_id_cols = spec.scale, num_identities, n_id_cols
        ctx.workspace, ctx.weight = workspace, param  # the Parameter, to write its .grad
        ctx.row_index = row_index
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        z, sumexp, fn, weight, inv_wnorm, rows, cols, dg_x, dg_w, uniform = ctx.saved_tensors
        # Every in-place operand in z's dtype: a wider one would make torch materialise
        # the whole B x n buffer in it (bf16 head: twice its size).
        g = z.div_(sumexp.to(z.dtype)[:, None])  # probabilities p_ic (0 on hidden columns)
        if bool(uniform.any()):  # LSR: q = 1/N_id over the identity columns
            g[:, :ctx.n_id_cols].sub_((uniform.to(g.dtype) / ctx.num_identities)[:, None])
        g[rows, cols] -= 1.0  # classification rows: q = one-hot
        g.mul_((grad_loss * ctx.scale).to(g.dtype)[:, None])  # dL/dcos (before the margin)
        g_t = g[rows, cols]  # dL/d(margin cos) of the targets owned here
        g[rows, cols] = (g_t * dg_w).to(g.dtype)
        g.mul_(inv_wnorm.to(g.dtype))  # dL/d(fn . w_c) with cos = fn . w_c / |w_c|
        grad_fn = g @ weight  # GEMM 2
        if dg_x is not dg_w:  # the reference's feature path: its own target coefficient
            coef = (g_t * (dg_x - dg_w) * inv_wnorm[cols])[:, None]
            grad_fn.index_add_(0, rows, (coef * weight[cols]).to(grad_fn.dtype))
        param = ctx.weight
        if ctx.row_index is not None:  # sampled rows: a small k x D gradient, sparse on W
            grad_w = torch.mm(g.t(), fn)
            _cos_row_correction_(grad_w, weight, inv_wnorm)
            ctx.workspace.give_back("logits", z)
            add_row_grad_(param, ctx.row_index, grad_w)
            return (grad_fn,) + (None,) * 12
        accumulate = param.grad is not None
        grad_w = ctx.workspace.take("grad_w", tuple(weight.shape), weight)
        if accumulate and grad_w is param.grad:  # never overwrite what we add to
            ctx.workspace.give_back("grad_w", grad_w)
            grad_w = torch.empty_like(weight)
        torch.mm(g.t(), fn, out=grad_w)  # GEMM 3: A_c = sum_i g_ic fn_i
        _cos_row_correction_(grad_w, weight, inv_wnorm)
        ctx.workspace.give_back("logits", z)
        if accumulate:
            param.grad.add_(grad_w)
            ctx.workspace.give_back("grad_w", grad_w)
        else:
            param.grad = grad_w  # stays ours: reused next step once the optimizer is done
            ctx.workspace.give_back("grad_w", grad_w)
        return (grad_fn,) + (None,) * 12


def _row_norms(weight: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """|w_c| in ``acc``, a row chunk at a time when that is wider than W (never a whole
    upcast copy of the block)."""
    if weight.dtype == acc:
        return weight.norm(dim=1)
    return torch.cat([torch.linalg.vector_norm(weight[s:s + _ROWDOT_CHUNK], dim=1, dtype=acc)
                      for s in range(0, weight.shape[0], _ROWDOT_CHUNK)] or
                     [weight.new_zeros(0, dtype=acc)])


def _row_sums(x: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """Row sums of a B x n buffer accumulated in ``acc``, a column chunk at a time when that
    is wider than x (torch would otherwise upcast the whole buffer first)."""
    if x.dtype == acc:
        return x.sum(dim=1)
    cols = max(1, (_ROWDOT_CHUNK * 64) // max(1, x.shape[0]))
    out = torch.zeros(x.shape[0], dtype=acc, device=x.device)
    for s in range(0, x.shape[1], cols):
        out += x[:, s:s + cols].sum(dim=1, dtype=acc)
    return out


def _cos_row_correction_(grad_w: torch.Tensor, weight: torch.Tensor,
                         inv_wnorm: torch.Tensor) -> None:
    """A_c -> dL/dw_c in place: d cos/d w_c = (fn - cos wn_c) / |w_c|, so
    grad_c = A_c - w_c (w_c . A_c) / |w_c|^2 (chunked: no block-sized temporary)."""
    for s in range(0, grad_w.shape[0], _ROWDOT_CHUNK):
        a, w = grad_w[s:s + _ROWDOT_CHUNK], weight[s:s + _ROWDOT_CHUNK]
        coef = torch.einsum("nd,nd->n", w, a).to(inv_wnorm.dtype)
        coef = (coef * inv_wnorm[s:s + _ROWDOT_CHUNK].square()).to(a.dtype)
        a.addcmul_(w, coef[:, None], value=-1.0)


def add_row_grad_(param: torch.Tensor, rows: torch.Tensor, values: torch.Tensor) -> None:
    """Add a gradient that lives on ``rows`` (sorted, distinct) of ``param``: as a sparse
    COO gradient (coalesced), or into a dense gradient already there."""
    if param.grad is not None and not param.grad.is_sparse:
        param.grad.index_add_(0, rows, values)
        return
    sparse = torch.sparse_coo_tensor(rows[None], values, tuple(param.shape),
                                     is_coalesced=True, check_invariants=False)
    param.grad = sparse if param.grad is None else (param.grad + sparse).coalesce()
