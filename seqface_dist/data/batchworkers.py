"""Worker processes that make batches into a :class:`BatchRing`; the main process reads them.

Why not a DataLoader: its workers get a request per batch through a queue and answer
through another (pickled, with a feeder thread on each side), which cost the main process
~0.13 of a core at ~10k samples/s and the workers their share of two cores. Here a worker
knows its quota and makes its batches unasked; the ring's semaphores are the only flow
control, and per batch nothing is pickled (``bench/bench_data.py``).

What a DataLoader did that is kept: workers are started per pass and stopped when the
pass ends or the caller stops early; an exception in a worker is raised in the main
process with the worker's traceback; a worker that dies (killed, out of memory) is
reported instead of waited for; a worker whose parent died exits; workers run torch with
one intra-op thread.
"""

from __future__ import annotations

import os
import signal
import traceback
from collections.abc import Callable, Iterator

import torch

from seqface_dist.data.batchring import BatchRing

POLL_S = 0.5  # how often a waiting side looks whether the other one is still there

# make(worker, claim, publish): makes the worker's batches; claim() -> (slot, images,
# center indices) or None (stop); publish(slot, stats) after filling one, with the worker's
# counters (a list of ints for ``BatchRing.stats``). Must be picklable by reference
# (a module-level function or a functools.partial of one) for non-fork start methods.
MakeBatches = Callable[[int, Callable, Callable], None]


class WorkerError(RuntimeError):
    """A batch worker failed; the message holds its traceback."""


def _worker_main(make: MakeBatches, ring: BatchRing, worker: int, errors, parent: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle
    torch.set_num_threads(1)  # workers decode; intra-op threads would only contend
    made = 0  # batches published so far

    def claim():
        while True:  # a bounded wait, so that a worker whose parent died does not linger
            got = ring.claim(worker, timeout=POLL_S)
            if got is not None or ring.stopping[0]:
                return got
            if os.getppid() != parent:
                os._exit(1)

    def publish(slot: int, stats: list[int] | None = None) -> None:
        nonlocal made
        ring.publish(worker, made, slot, stats)
        made += 1

    try:
        make(worker, claim, publish)
    except BaseException:  # noqa: BLE001 - every failure goes to the main process
        errors.put((worker, traceback.format_exc()))
        ring.filled[worker].release()  # wake the main process if it waits for this worker


class BatchWorkers:
    """``len(quotas)`` processes; worker ``w`` makes ``quotas[w]`` batches with ``make``.
    Iterate to get ``(worker, slot)`` round robin over the workers that have batches left;
    :meth:`close` (or leaving a ``with`` block) stops them."""

    def __init__(self, make: MakeBatches, ring: BatchRing, quotas: list[int]):
        ctx = ring.ctx  # the ring's semaphores only cross to processes of its own context
        self.ring, self.quotas = ring, list(quotas)
        self._errors = ctx.SimpleQueue()
        self._procs = [ctx.Process(target=_worker_main, name=f"seqface-batches-{w}",
                                   args=(make, ring, w, self._errors, os.getpid()),
                                   daemon=True)
                       for w in range(len(quotas))]
        for p in self._procs:
            p.start()

    def __enter__(self) -> BatchWorkers:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __iter__(self) -> Iterator[tuple[int, int]]:
        left = list(self.quotas)
        while any(left):
            for w, n in enumerate(left):
                if n:
                    yield w, self._next_slot(w)
                    left[w] -= 1

    def _next_slot(self, w: int) -> int:
        while True:
            if not self._errors.empty():
                worker, tb = self._errors.get()
                raise WorkerError(f"batch worker {worker} failed:\n{tb}")
            slot = self.ring.wait(w, timeout=POLL_S)
            if slot is not None:
                if not self._errors.empty():  # the wake-up was the worker failing
                    continue
                return slot
            proc = self._procs[w]
            if not proc.is_alive() and self._errors.empty():
                slot = self.ring.wait(w, timeout=0)  # it may have published, then exited
                if slot is not None:
                    return slot
                raise WorkerError(f"batch worker {w} (pid {proc.pid}) exited with code "
                                  f"{proc.exitcode} before making its batches"
                                  + (" (killed by a signal: out of memory?)"
                                     if (proc.exitcode or 0) < 0 else ""))

    def close(self) -> None:
        self.ring.unblock()  # workers waiting for a slot see the stop
        for p in self._procs:
            p.join(timeout=10)
        for p in self._procs:
            if p.is_alive():
                p.terminate()
                p.join()
        self._errors.close()
