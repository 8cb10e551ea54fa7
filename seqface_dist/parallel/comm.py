"""The head's only knowledge of the world: one process-group handle.

``Comm`` wraps a torch.distributed group (gloo on CPU, NCCL on GPU). With no initialised
group it is a one-rank world whose collectives return their input, so R = 1 runs the
same code path. ``SoloComm`` poses as rank r of R without any peers: it lets one rank's
block be built and stepped alone (benchmarks, memory planning), never for training.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist


class Comm:
    """Collectives over ``group`` (default: the world group, if one is initialised)."""

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        self.group = group
        self.distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank(group) if self.distributed else 0
        self.world_size = dist.get_world_size(group) if self.distributed else 1
        self.bytes_sent = 0  # payload bytes this rank handed to collectives (for benchmarks)
        self.seconds = 0.0  # wall time spent inside collectives (for the step-time split)

    def _count(self, t: torch.Tensor) -> None:
        self.bytes_sent += t.numel() * t.element_size()

    def all_reduce_(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """In-place all-reduce (``sum`` or ``max``); returns ``t``."""
        if self.world_size > 1:
            self._count(t)
            t0 = time.perf_counter()
            dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM,
                            group=self.group)
            self.seconds += time.perf_counter() - t0
        return t

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        """Concatenate equally-shaped tensors of all ranks along dim 0, in rank order."""
        if self.world_size == 1:
            return t
        self._count(t)
        t0 = time.perf_counter()
        out = [torch.empty_like(t) for _ in range(self.world_size)]
        dist.all_gather(out, t.contiguous(), group=self.group)
        self.seconds += time.perf_counter() - t0
        return torch.cat(out)


class SoloComm(Comm):
    """Rank ``rank`` of ``world_size`` with no peers: collectives are identities."""

    def __init__(self, rank: int, world_size: int) -> None:
        self.group = None
        self.distributed = False
        self.rank = rank
        self.world_size = world_size
        self.bytes_sent = 0
        self.seconds = 0.0

    def all_reduce_(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        return t

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        # Stand in for the peers with copies, so shapes match a real R-rank step.
        return torch.cat([t] * self.world_size)


class _GatherRows(torch.autograd.Function):
    """All-gather along dim 0; the backward sums every rank's gradient and keeps our slice."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, comm: Comm, grad_scale: float) -> torch.Tensor:
        ctx.comm, ctx.n, ctx.grad_scale = comm, local.shape[0], grad_scale
        return comm.all_gather(local)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # Each rank holds the partial gradient from its own block of the head; the feature
        # gradient is their sum. Gloo has no reduce-scatter, so all-reduce and slice.
        grad = ctx.comm.all_reduce_(grad.contiguous().clone())
        start = ctx.comm.rank * ctx.n
        out = grad[start:start + ctx.n]
        if ctx.grad_scale != 1.0:
            out = out * ctx.grad_scale
        return out, None, None


def gather_rows(local: torch.Tensor, comm: Comm, grad_scale: float = 1.0) -> torch.Tensor:
    """Autograd-aware all-gather of per-rank rows (equal row counts on every rank).

    ``grad_scale`` multiplies the gradient returned to ``local``: a data-parallel wrapper
    that *averages* backbone gradients over R ranks needs R here, because the head's loss
    is already the global batch's loss.
    """
    return _GatherRows.apply(local, comm, grad_scale)
