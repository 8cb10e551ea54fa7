"""Run a function on R real processes joined in a gloo group (file store on local disk)."""

from __future__ import annotations

import os
import tempfile
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank: int, world_size: int, store: str, out_dir: str, fn, args) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                            world_size=world_size)
    try:
        result = fn(rank, world_size, *args)
        torch.save({"ok": result}, Path(out_dir) / f"{rank}.pt")
    except BaseException as e:  # report the error text to the parent, never hang it
        torch.save({"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()},
                   Path(out_dir) / f"{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_ranks(fn, world_size: int, *args, timeout: float = 120.0) -> list:
    """fn(rank, world_size, *args) on each rank; returns the results (or error dicts)."""
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        ctx = mp.get_context("fork")  # no re-import per rank: seconds, not tens
        procs = [ctx.Process(target=_entry, args=(r, world_size, store, tmp, fn, args))
                 for r in range(world_size)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout)
        for p in procs:
            if p.is_alive():
                p.kill()
                raise TimeoutError(f"rank process {p.pid} hung for {timeout} s")
        out = []
        for r in range(world_size):
            f = Path(tmp) / f"{r}.pt"
            if not f.exists():
                raise RuntimeError(f"rank {r} died without a result (exit {procs[r].exitcode})")
            out.append(torch.load(f, weights_only=True))
        return out
