"""Shared-memory batch slots that worker processes fill and the main process hands out.

A worker that sends each batch as a fresh tensor through a queue (what a DataLoader worker
does) has it moved to a new shared-memory segment by the pickler (page faults) and its file
descriptor passed over a socket: with 64 x 112 x 112 x 3 uint8 batches that caps two
workers that do nothing else at ~16k samples/s and costs the main process ~24 us of CPU
per sample, against ~120k and ~5 us through slots (``bench/bench_handoff.py``; decoding
alone is ~130 us per sample). Here each worker gets a few slots in shared tensors made
before the workers start: it fills a free slot's images and center indices, writes its counters,
records the slot as its next batch and posts a semaphore. Nothing is pickled per batch.

The main process takes each worker's batches in order and lends the slot itself to the
caller (no copy) while the caller holds fewer than ``lend`` of that worker's batches; the
slot is free again when the caller's last reference to the batch, or to any view of it,
is gone. Past that (a caller keeping batches), it hands out a copy and frees the slot at
once. Slots come back in any order, so each has a shared busy flag, and a semaphore per
worker counts its free slots: a worker never overwrites a batch in use; it waits instead,
and never for ever, because there are more slots than ``lend`` and the main process takes
each worker's batches in order.

A worker's k-th batch is named in ``order[worker, k % slots]``: when the worker claims a
slot for batch k, batch k - slots has been taken (otherwise all its slots would be busy),
so the entry it overwrites has been read.
"""

from __future__ import annotations

import multiprocessing
import weakref

import numpy as np
import torch


class BatchRing:
    """``slots`` batches of ``shape`` uint8 images and ``shape[0]`` int64 center indices for each of
    ``workers`` workers, and a row of ``stats_width`` int64 counters per worker."""

    def __init__(self, workers: int, slots: int, shape: tuple[int, ...], lend: int = 2,
                 stats_width: int = 1, ctx: multiprocessing.context.BaseContext | None = None):
        ctx = ctx or multiprocessing.get_context()
        if workers < 1 or not 0 <= lend < slots:
            raise ValueError(f"a batch ring needs workers >= 1 and 0 <= lend < slots, got "
                             f"workers={workers}, slots={slots}, lend={lend}")
        self.slots, self.lend, self.ctx = slots, lend, ctx
        self.images = torch.empty((workers, slots, *shape), dtype=torch.uint8).share_memory_()
        self.center_index = torch.empty((workers, slots, shape[0]),
                                        dtype=torch.int64).share_memory_()
        self.busy = torch.zeros((workers, slots), dtype=torch.uint8).share_memory_()
        self.order = torch.zeros((workers, slots), dtype=torch.int64).share_memory_()
        self.stats = torch.zeros((workers, stats_width), dtype=torch.int64).share_memory_()
        self.stopping = torch.zeros(1, dtype=torch.uint8).share_memory_()
        self.free = [ctx.Semaphore(slots) for _ in range(workers)]
        self.filled = [ctx.Semaphore(0) for _ in range(workers)]
        self._lent = [0] * workers  # batches of each worker the caller still holds (main)
        self._taken = [0] * workers  # batches of each worker taken so far (main)

    # ----------------------------------------------------------------- in a worker

    def claim(self, worker: int, timeout: float | None = None
              ) -> tuple[int, np.ndarray, np.ndarray] | None:
        """(a free slot, now busy; its writable B x H x W x C images; its B center indices), or None
        when the main process has stopped reading or ``timeout`` seconds passed."""
        if not self.free[worker].acquire(timeout=timeout) or self.stopping[0]:
            return None  # else at least one of this worker's slots is free
        busy = self.busy[worker].numpy()
        slot = int(np.flatnonzero(busy == 0)[0])
        busy[slot] = 1
        return slot, self.images[worker, slot].numpy(), self.center_index[worker, slot].numpy()

    def publish(self, worker: int, batch: int, slot: int, stats: list[int] | None = None) -> None:
        """Hand the worker's ``batch``-th batch (0, 1, ...), filled in ``slot``, to the main
        process, with the worker's counters as they are now (``stats``)."""
        if stats is not None:
            self.stats[worker].numpy()[:] = stats
        self.order[worker, batch % self.slots] = slot
        self.filled[worker].release()  # a barrier: the main process sees the slot's data

    # ----------------------------------------------------------------- in the main process

    def wait(self, worker: int, timeout: float | None = None) -> int | None:
        """The slot of ``worker``'s next batch, or None if none came within ``timeout``."""
        if not self.filled[worker].acquire(timeout=timeout):
            return None
        k = self._taken[worker]
        self._taken[worker] += 1
        return int(self.order[worker, k % self.slots])

    def take(self, worker: int, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(images, center_index) of the batch in ``slot``: images lent or copied (see the
        module doc), the indices always copied (they are small)."""
        index = torch.from_numpy(self.center_index[worker, slot].numpy().copy())
        # A fresh numpy view per batch: the tensor's storage, and so every view of it,
        # keeps this object alive; its finalizer frees the slot when the last one is gone.
        batch = self.images[worker, slot].numpy()
        if self._lent[worker] < self.lend:
            self._lent[worker] += 1
            weakref.finalize(batch, self._returned, worker, slot).atexit = False
            return torch.from_numpy(batch), index
        images = torch.from_numpy(batch.copy())
        self._release(worker, slot)
        return images, index

    def _release(self, worker: int, slot: int) -> None:
        self.busy[worker, slot] = 0  # before the semaphore (a barrier): the worker sees it
        self.free[worker].release()

    def _returned(self, worker: int, slot: int) -> None:
        self._lent[worker] -= 1
        self._release(worker, slot)

    def unblock(self) -> None:
        """Let every worker finish: the main process stopped reading (end or early exit)."""
        self.stopping[0] = 1
        for sem in self.free:
            for _ in range(self.slots):
                sem.release()
