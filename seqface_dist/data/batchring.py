"""Shared-memory batch slots that DataLoader workers fill and the main process hands out.

A DataLoader worker that yields a fresh tensor has it moved to a new shared-memory segment
by the DataLoader's pickler (page faults) and its file descriptor passed over a socket: with
64 x 112 x 112 x 3 uint8 batches that caps two workers that do nothing else at ~16k
samples/s and costs the main process ~24 us of CPU per sample, against ~120k and ~5 us
through this ring (``bench/bench_handoff.py``; decoding alone is ~130 us per sample). Here
each worker gets a few slots in one shared tensor made before the workers start, fills a
free one and sends only its number.

The main process lends the slot itself to the caller (no copy) while the caller holds
fewer than ``lend`` of that worker's batches; the slot is free again when the caller's
last reference to the batch, or to any view of it, is gone. Past that (a caller keeping
batches), it hands out a copy and frees the slot at once. Slots come back in any order, so
each has a shared busy flag, and a semaphore per worker counts its free slots: a worker
never overwrites a batch in use; it waits instead, and never for ever, because there are
more slots than ``lend`` and the main process takes each worker's batches in order.
"""

from __future__ import annotations

import multiprocessing
import weakref

import numpy as np
import torch


class BatchRing:
    """``slots`` uint8 batches of ``shape`` for each of ``workers`` workers."""

    def __init__(self, workers: int, slots: int, shape: tuple[int, ...], lend: int = 2):
        if workers < 1 or not 0 <= lend < slots:
            raise ValueError(f"a batch ring needs workers >= 1 and 0 <= lend < slots, got "
                             f"workers={workers}, slots={slots}, lend={lend}")
        self.slots, self.lend = slots, lend
        self.images = torch.empty((workers, slots, *shape), dtype=torch.uint8).share_memory_()
        self.busy = torch.zeros((workers, slots), dtype=torch.uint8).share_memory_()
        self.free = [multiprocessing.Semaphore(slots) for _ in range(workers)]
        self._lent = [0] * workers  # batches of each worker the caller still holds (main)

    def claim(self, worker: int) -> tuple[int, np.ndarray]:
        """In worker ``worker``: (a free slot, now busy; its writable B x H x W x C view)."""
        self.free[worker].acquire()  # then at least one of this worker's slots is free
        busy = self.busy[worker].numpy()
        slot = int(np.flatnonzero(busy == 0)[0])
        busy[slot] = 1
        return slot, self.images[worker, slot].numpy()

    def _release(self, worker: int, slot: int) -> None:
        self.busy[worker, slot] = 0  # before the semaphore (a barrier): the worker sees it
        self.free[worker].release()

    def take(self, worker: int, slot: int) -> torch.Tensor:
        """In the main process: the batch in ``slot``, lent or copied (see the module doc)."""
        # A fresh numpy view per batch: the tensor's storage, and so every view of it,
        # keeps this object alive; its finalizer frees the slot when the last one is gone.
        batch = self.images[worker, slot].numpy()
        if self._lent[worker] < self.lend:
            self._lent[worker] += 1
            weakref.finalize(batch, self._returned, worker, slot).atexit = False
            return torch.from_numpy(batch)
        out = torch.from_numpy(batch.copy())
        self._release(worker, slot)
        return out

    def _returned(self, worker: int, slot: int) -> None:
        self._lent[worker] -= 1
        self._release(worker, slot)

    def unblock(self) -> None:
        """Let every worker finish: the main process stopped reading (end or early exit)."""
        for sem in self.free:
            for _ in range(self.slots):
                sem.release()
