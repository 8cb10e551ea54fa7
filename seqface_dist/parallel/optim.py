"""SGD with momentum for the head, updating in place.

torch.optim.SGD adds weight decay into a fresh tensor (``grad.add(param, ...)``), which
at a million rows is a gigabyte-sized temporary; this one folds it into the gradient
buffer the head already owns. Semantics equal torch's SGD without dampening or nesterov
(the first step's momentum buffer is the gradient). A sparse gradient (the DSA center
update) is added into the momentum buffer row by row: two passes over the block, not four.

A group with ``lazy_rows`` (W under the sampled softmax) updates only the rows its sparse
gradient names: their weight decay, momentum and step, as if the other rows did not
exist this step. An unsampled row's momentum neither decays nor moves it (Partial FC's
convention): decaying it would touch every row every step, the cost sampling avoids, and
would keep moving rows on gradients they no longer have.
"""

from __future__ import annotations

import torch


class InPlaceSGD(torch.optim.Optimizer):
    def __init__(self, params, lr: float, momentum: float = 0.0, weight_decay: float = 0.0):
        if lr <= 0 or not 0.0 <= momentum < 1.0 or weight_decay < 0:
            raise ValueError(f"InPlaceSGD: bad lr={lr}, momentum={momentum}, "
                             f"weight_decay={weight_decay}")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if d.is_sparse:
                    if group.get("lazy_rows"):
                        self._lazy_rows_step(p, d, lr, mu, wd)
                    else:
                        self._sparse_step(p, d, lr, mu, wd)
                    continue
                if wd:
                    d.add_(p, alpha=wd)  # the gradient buffer is ours: no temporary
                if mu:
                    buf = self.state[p].get("momentum_buffer")
                    if buf is None:
                        buf = self.state[p]["momentum_buffer"] = d.clone()
                    else:
                        buf.mul_(mu).add_(d)
                    d = buf
                p.add_(d, alpha=-lr)

    def _sparse_step(self, p: torch.Tensor, d: torch.Tensor, lr: float, mu: float,
                     wd: float) -> None:
        """The same update for a gradient that is non-zero on a few rows only."""
        if wd:
            raise ValueError("InPlaceSGD: weight decay needs a dense gradient")
        d = d.coalesce()
        idx, vals = d.indices()[0], d.values()
        if not mu:
            p.index_add_(0, idx, vals, alpha=-lr)
            return
        buf = self.state[p].get("momentum_buffer")
        if buf is None:  # torch's first step: buf = grad
            buf = self.state[p]["momentum_buffer"] = torch.zeros_like(p)
        else:
            buf.mul_(mu)
        buf.index_add_(0, idx, vals)
        p.add_(buf, alpha=-lr)

    def _lazy_rows_step(self, p: torch.Tensor, d: torch.Tensor, lr: float, mu: float,
                        wd: float) -> None:
        """SGD on the rows of a sparse gradient only (``lazy_rows``). A row's momentum starts
        at zero, so its first update equals torch's first step (buf = grad)."""
        d = d.coalesce()
        idx, vals = d.indices()[0], d.values()
        if wd:
            vals = vals + wd * p[idx]
        if mu:
            buf = self.state[p].get("momentum_buffer")
            if buf is None:
                buf = self.state[p]["momentum_buffer"] = torch.zeros_like(p)
            vals = buf[idx].mul_(mu).add_(vals)
            buf.index_copy_(0, idx, vals)
        p.index_add_(0, idx, vals, alpha=-lr)
