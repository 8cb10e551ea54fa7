"""SGD with momentum for the head, updating in place.

torch.optim.SGD adds weight decay into a fresh tensor (``grad.add(param, ...)``), which
at a million rows is a gigabyte-sized temporary; this one folds it into the gradient
buffer the head already owns. Semantics equal torch's SGD without dampening or nesterov
(the first step's momentum buffer is the gradient). A sparse gradient (the DSA center
update) is added into the momentum buffer row by row: two passes over the block, not four.

A group with ``lazy_rows`` (W under the sampled softmax; the centers with
``loss.lazy_center_momentum``) updates only the rows its sparse gradient names: their
weight decay, momentum and step, as if the other rows did not exist this step. A row
left out keeps its momentum, which neither decays nor moves it (Partial FC's convention):
decaying it would touch every row every step, the cost sampling avoids, and would keep
moving rows on gradients they no longer have.

A bf16 parameter with a ``stochastic_rounding`` group (W of a bf16 head) is updated in
fp32, row chunk by row chunk, and rounded back to bf16 stochastically, its momentum too:
an SGD step is often far below half a bf16 ulp of the weight (weight decay: lr * wd =
5e-5 of it, against an ulp of 2^-7 of it), so round-to-nearest would drop it every step, while
stochastic rounding applies it in expectation. No fp32 master copy is kept: it would
cost more memory than the bf16 block saves.
"""

from __future__ import annotations

import torch

# fp32 temporaries of a chunked bf16 update: 16 MB each on the CPU (cache-sized), 256 MB
# on a GPU (fewer kernel launches over a block of millions of rows).
_CHUNK_ELEMS = {"cpu": 1 << 22, "cuda": 1 << 26}


def stochastic_round_(out: torch.Tensor, x: torch.Tensor, generator: torch.Generator) -> None:
    """``out`` (bf16) <- x (fp32) rounded up or down to a neighbouring bf16 value with
    probabilities that make the result unbiased: add uniform 16-bit noise below bf16's
    mantissa, then truncate (the sign is separate, so this rounds the magnitude)."""
    noise = torch.randint(0, 1 << 16, x.shape, dtype=torch.int32, device=x.device,
                          generator=generator)
    bits = noise.add_(x.contiguous().view(torch.int32))  # x itself is left as it was
    out.copy_(bits.bitwise_and_(-65536).view(torch.float32))


class InPlaceSGD(torch.optim.Optimizer):
    def __init__(self, params, lr: float, momentum: float = 0.0, weight_decay: float = 0.0,
                 seed: int = 0):
        if lr <= 0 or not 0.0 <= momentum < 1.0 or weight_decay < 0:
            raise ValueError(f"InPlaceSGD: bad lr={lr}, momentum={momentum}, "
                             f"weight_decay={weight_decay}")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))
        self._seed = seed
        self._round_step = 0
        self._generators: dict[torch.device, torch.Generator] = {}

    def seed_rounding(self, step: int) -> None:
        """Key the stochastic rounding of the next update to the training step: a run
        resumed at step s rounds exactly as the uninterrupted run did (the stream is a
        function of (seed, step), so nothing of it needs checkpointing)."""
        self._round_step = step
        self._generators.clear()

    def _generator(self, device: torch.device) -> torch.Generator:
        g = self._generators.get(device)
        if g is None:
            g = self._generators[device] = torch.Generator(device=device)
            g.manual_seed((self._seed * 2_654_435_761 + self._round_step * 40_503)
                          % (1 << 62) + 17)
        return g

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
            rounding = group.get("stochastic_rounding", False)
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if d.is_sparse:
                    if group.get("lazy_rows"):
                        self._lazy_rows_step(p, d, lr, mu, wd, rounding)
                    else:
                        self._sparse_step(p, d, lr, mu, wd)
                    continue
                if rounding and p.dtype == torch.bfloat16:
                    self._rounded_step(p, d, lr, mu, wd)
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

    def _rounded_step(self, p: torch.Tensor, d: torch.Tensor, lr: float, mu: float,
                      wd: float) -> None:
        """The dense step of a bf16 parameter in fp32 chunks, stochastically rounded."""
        buf = self.state[p].get("momentum_buffer") if mu else None
        first = mu and buf is None
        if first:
            buf = self.state[p]["momentum_buffer"] = torch.empty_like(p)
        g = self._generator(p.device)
        chunk = _CHUNK_ELEMS.get(p.device.type, _CHUNK_ELEMS["cpu"])
        rows = max(1, chunk // max(1, p[0].numel())) if p.dim() else 1
        for s in range(0, p.shape[0] if p.dim() else 1, rows):
            pc, dc = (p[s:s + rows], d[s:s + rows]) if p.dim() else (p, d)
            step = dc.float()
            if wd:
                step.add_(pc.float(), alpha=wd)
            if mu:
                bc = buf[s:s + rows] if p.dim() else buf
                if not first:
                    step.add_(bc.float(), alpha=mu)
                stochastic_round_(bc, step, g)
            stochastic_round_(pc, pc.float().sub_(step, alpha=lr), g)

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
                        wd: float, rounding: bool) -> None:
        """SGD on the rows of a sparse gradient only (``lazy_rows``). A row's momentum starts
        at zero, so its first update equals torch's first step (buf = grad)."""
        d = d.coalesce()
        ct = torch.float32 if p.dtype == torch.bfloat16 else p.dtype  # compute in fp32 at least
        idx, vals = d.indices()[0], d.values().to(ct)
        rows = p[idx].to(ct)
        if wd:
            vals = vals + wd * rows
        rounded = rounding and p.dtype == torch.bfloat16
        if mu:
            buf = self.state[p].get("momentum_buffer")
            if buf is None:
                buf = self.state[p]["momentum_buffer"] = torch.zeros_like(p)
            vals = buf[idx].to(ct).mul_(mu).add_(vals)
            buf.index_copy_(0, idx, self._to(vals, buf.dtype, rounded, p.device))
        p.index_copy_(0, idx, self._to(rows.sub_(vals, alpha=lr), p.dtype, rounded, p.device))

    def _to(self, x: torch.Tensor, dtype: torch.dtype, rounded: bool,
            device: torch.device) -> torch.Tensor:
        if not rounded:
            return x.to(dtype)
        out = torch.empty(x.shape, dtype=dtype, device=device)
        stochastic_round_(out, x, self._generator(device))
        return out
