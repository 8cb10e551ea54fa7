"""Shared-memory batch slots that DataLoader workers fill and the main process empties.

A DataLoader worker that yields a fresh tensor has it moved to a new shared-memory segment
by the DataLoader's pickler, and its file descriptor passed over a socket. For a
64 x 112 x 112 x 3 uint8 batch that costs ~2-3 ms of page faults and ~30-40 us per sample
end to end on a 2-core machine (``bench/bench_data.py --ipc``): a third of the time the
JPEG decode itself takes. Here each worker gets a few slots in one shared tensor made
before the workers start, fills them in turn and sends only the slot number; the main
process copies the batch out (into memory it owns, so the caller may keep it) and frees
the slot. A semaphore per worker counts its free slots, so a worker never overwrites a
batch the main process has not copied yet; it waits instead (a wait, never a deadlock: the
main process always copies a worker's batches in the order the worker wrote them).
"""

from __future__ import annotations

import multiprocessing

import numpy as np
import torch


class BatchRing:
    """``slots`` uint8 batches of ``shape`` for each of ``workers`` workers."""

    def __init__(self, workers: int, slots: int, shape: tuple[int, ...]):
        if workers < 1 or slots < 1:
            raise ValueError(f"a batch ring needs workers >= 1 and slots >= 1, got "
                             f"{workers} and {slots}")
        self.slots = slots
        self.images = torch.empty((workers, slots, *shape), dtype=torch.uint8).share_memory_()
        self.free = [multiprocessing.Semaphore(slots) for _ in range(workers)]

    def claim(self, worker: int, k: int) -> tuple[int, np.ndarray]:
        """In worker ``worker``, for its ``k``-th batch: (slot, writable B x H x W x C view)."""
        self.free[worker].acquire()
        slot = k % self.slots
        return slot, self.images[worker, slot].numpy()

    def take(self, worker: int, slot: int) -> torch.Tensor:
        """In the main process: a copy of the batch in ``slot``; the slot is free again."""
        out = torch.from_numpy(self.images[worker, slot].numpy().copy())
        self.free[worker].release()
        return out

    def unblock(self) -> None:
        """Let every worker finish: the main process stopped reading (end or early exit)."""
        for sem in self.free:
            for _ in range(self.slots):
                sem.release()
