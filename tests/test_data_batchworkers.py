"""The batch worker pool: real processes over a real shared-memory ring.

Each test's ``make`` is a module-level function (workers under the spawn start method
import it by name). Batches carry (worker, index) in their pixels, so order and content
are checked, not only counts.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import time
from functools import partial

import psutil
import pytest

from seqface_dist.data.batchring import BatchRing
from seqface_dist.data.batchworkers import BatchWorkers, WorkerError

SHAPE = (4, 2, 2, 1)


def _numbered(worker: int, claim, publish, quotas: tuple[int, ...] = (), fail_at: int = -1,
              kill_at: int = -1) -> None:
    """Makes batch after batch until told to stop, or its quota if given."""
    k = 0
    while (not quotas or k < quotas[worker]) and (got := claim()) is not None:
        if k == fail_at:
            raise ValueError(f"bad sample in batch {k} of worker {worker}")
        if k == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        slot, images, centers = got
        images[:] = 10 * worker + k
        centers[:] = k
        publish(slot, [k + 1])
        k += 1


def _pool(make, quotas: list[int], ctx=None) -> tuple[BatchRing, BatchWorkers]:
    ring = BatchRing(len(quotas), 3, SHAPE, stats_width=1, ctx=ctx)
    return ring, BatchWorkers(make, ring, quotas)


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _gone(pids: list[int], within_s: float = 10.0) -> bool:
    end = time.monotonic() + within_s
    while time.monotonic() < end:
        if not any(_running(p) for p in pids):
            return True
        time.sleep(0.1)
    return False


@pytest.mark.parametrize("start", ["fork", "spawn"])
def test_batches_come_round_robin_in_each_workers_order_then_the_workers_exit(start):
    make = partial(_numbered, quotas=(3, 5))
    ring, pool = _pool(make, [3, 5], ctx=multiprocessing.get_context(start))
    with pool:
        got = []
        for w, slot in pool:
            images, centers = ring.take(w, slot)
            got.append((w, int(images[0, 0, 0, 0]), int(centers[0])))
            del images
        pids = [p.pid for p in pool._procs]
    # Round robin while both have batches left, then the rest of worker 1's.
    assert got == [(0, 0, 0), (1, 10, 0), (0, 1, 1), (1, 11, 1), (0, 2, 2), (1, 12, 2),
                   (1, 13, 3), (1, 14, 4)]
    assert ring.stats[:, 0].tolist() == [3, 5]  # each worker's last published counters
    assert _gone(pids)


def test_an_exception_in_a_worker_is_raised_in_the_main_process_with_its_traceback():
    ring, pool = _pool(partial(_numbered, fail_at=2), [4, 4])
    with pytest.raises(WorkerError) as err, pool:
        for w, slot in pool:
            ring.take(w, slot)
    msg = str(err.value)
    assert "batch worker" in msg and "ValueError: bad sample in batch 2 of worker" in msg
    assert "_numbered" in msg  # the worker's own traceback, not the main process's
    assert _gone([p.pid for p in pool._procs])


def test_a_killed_worker_is_reported_not_waited_for():
    ring, pool = _pool(partial(_numbered, kill_at=1), [3])
    t0 = time.monotonic()
    with pytest.raises(WorkerError, match=r"exited with code -9 .*killed by a signal"), pool:
        for w, slot in pool:
            ring.take(w, slot)
    assert time.monotonic() - t0 < 30  # noticed through the poll, not a hang


def test_stopping_early_stops_the_workers():
    ring, pool = _pool(_numbered, [1000, 1000])
    pids = [p.pid for p in pool._procs]
    with pool:
        for n, (w, slot) in enumerate(pool):
            ring.take(w, slot)
            if n == 3:
                break
    assert [p.exitcode for p in pool._procs] == [0, 0]  # left on their own, not terminated
    assert _gone(pids)


_ORPHAN = """
import sys, time
from seqface_dist.data.batchring import BatchRing
from seqface_dist.data.batchworkers import BatchWorkers
from tests.test_data_batchworkers import SHAPE, _numbered
ring = BatchRing(2, 3, SHAPE)
pool = BatchWorkers(_numbered, ring, [1000, 1000])
print(*[p.pid for p in pool._procs], flush=True)
time.sleep(600)
"""


def test_workers_exit_when_their_parent_is_killed():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    parent = subprocess.Popen([sys.executable, "-c", _ORPHAN], cwd=root,
                              stdout=subprocess.PIPE, text=True)
    pids: list[int] = []
    try:
        pids = [int(p) for p in parent.stdout.readline().split()]
        assert len(pids) == 2 and all(psutil.pid_exists(p) for p in pids)
        parent.kill()  # SIGKILL: no cleanup runs in the parent
        parent.wait()
        # The workers block on full rings; their bounded wait sees the parent gone.
        assert _gone(pids)
    finally:
        parent.kill()
        for pid in filter(_running, pids):  # leave no orphans behind when the check fails
            os.kill(pid, signal.SIGKILL)
