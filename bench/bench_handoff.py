"""Batch handoff from worker processes to the trainer: what each way costs per sample.

    .venv/bin/python -m bench.bench_handoff [--batches 600] [--workers 2]

Workers that do no decoding (they fill each batch with one value) hand 64 x 112 x 112 x 3
batches to the main process in several ways; per way, samples/s and the main process's CPU
share while it receives (psutil). Figures, not asserts; the last line of stdout is one JSON
object holding them. Through a DataLoader:
- ``fresh float32``: a new normalised float tensor per batch (the loader before the ring);
- ``fresh uint8``: a new uint8 tensor per batch; the DataLoader's pickler moves each to a
  new shared-memory segment (page faults) and passes its file descriptor over a socket;
- ``ring, torch clone``: :class:`BatchRing` slots, the main process copies each batch out
  with ``Tensor.clone()`` (wakes torch's intra-op thread pool, which then spins);
- ``ring, copy``: the same with a numpy copy;
- ``ring, lend``: :class:`BatchRing` slots lent to the caller until it drops the batch.
Without one:
- ``own workers, lend``: :class:`BatchWorkers` make their batches unasked and post each
  slot through the ring's semaphores, lent as above (what ``TrainLoader`` does).
"""

from __future__ import annotations

import argparse
import json
import time
from functools import partial

import numpy as np
import psutil
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from seqface_dist.data.batchring import BatchRing
from seqface_dist.data.batchworkers import BatchWorkers

SHAPE = (64, 112, 112, 3)


class Fill(IterableDataset):
    def __init__(self, way: str, batches: int, ring: BatchRing | None):
        self.way, self.batches, self.ring = way, batches, ring

    def __iter__(self):
        info = get_worker_info()
        w, nw = info.id, info.num_workers
        for k in range(self.batches // nw):
            if self.ring is not None:
                slot, out, _ = self.ring.claim(w)
                out.fill(k % 251)
                yield w, slot
            elif self.way == "fresh float32":
                yield w, torch.full(SHAPE[:1] + (3, *SHAPE[1:3]), (k % 251 - 127.5) / 128)
            else:
                yield w, torch.full(SHAPE, k % 251, dtype=torch.uint8)


def _as_is(item):
    return item


def _fill(batches: int, worker: int, claim, publish) -> None:
    for k in range(batches):
        slot, out, _ = claim()
        out.fill(k % 251)
        publish(slot)


def measure(way: str, batches: int, workers: int, lend: int) -> tuple[float, float]:
    own = way.startswith("own")
    ring = BatchRing(workers, 6, SHAPE, lend=lend) if own or way.startswith("ring") else None
    if own:
        per_worker = batches // workers
        loader = pool = BatchWorkers(partial(_fill, per_worker), ring, [per_worker] * workers)
    else:
        loader = DataLoader(Fill(way, batches, ring), batch_size=None, num_workers=workers,
                            prefetch_factor=4, collate_fn=_as_is)
    me = psutil.Process()
    it = iter(loader)
    next(it)
    cpu0, t0 = me.cpu_times(), time.perf_counter()
    n = 0
    for w, item in it:
        if way == "ring, torch clone":
            images = ring.images[w, item].clone()
            ring._release(w, item)
        else:
            images = ring.take(w, item)[0] if ring is not None else item
        n += images.shape[0]
        del images
    dt = time.perf_counter() - t0
    cpu1 = me.cpu_times()
    if ring is not None:
        ring.unblock()
    if own:
        pool.close()
    main = (cpu1.user + cpu1.system - cpu0.user - cpu0.system) / dt
    return n / dt, main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", type=int, default=600)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    # The main process keeps torch's default intra-op threads, as a trainer does.
    print(f"{args.workers} workers, batches of {'x'.join(map(str, SHAPE))} uint8 "
          f"({np.prod(SHAPE) / 1e6:.1f} MB), {args.batches} batches per way")
    ways: dict[str, dict[str, float]] = {}
    for way, lend in (("fresh float32", 0), ("fresh uint8", 0), ("ring, torch clone", 0),
                      ("ring, copy", 0), ("ring, lend", 2), ("own workers, lend", 2)):
        rate, main_cpu = measure(way, args.batches, args.workers, lend)
        print(f"{way:17s}: {rate:8.0f} samples/s, main process {main_cpu:.2f} CPU "
              f"({main_cpu / rate * 1e6:.1f} us of main CPU per sample)")
        ways[way] = {"samples_per_s": rate, "main_process_cpu": main_cpu,
                     "main_cpu_us_per_sample": main_cpu / rate * 1e6}
    print(json.dumps({"bench": "handoff", "args": vars(args), "batch_shape": list(SHAPE),
                      "batch_mb": float(np.prod(SHAPE)) / 1e6, "ways": ways}))  # the last line


if __name__ == "__main__":
    main()
