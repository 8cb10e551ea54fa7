"""SGD with momentum for the head, updating in place.

torch.optim.SGD adds weight decay into a fresh tensor (``grad.add(param, ...)``), which
at a million rows is a gigabyte-sized temporary; this one folds it into the gradient
buffer the head already owns. Semantics equal torch's SGD without dampening or nesterov
(the first step's momentum buffer is the gradient).
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
