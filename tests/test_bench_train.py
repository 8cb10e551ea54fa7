"""python -m bench.bench_train --quick runs end to end (so the benchmark cannot rot).

It builds shards, runs the bare loop (shard loader and pre-decoded) in fresh processes and
the whole stack on a real local Ray (1 worker, then 2 workers, DeepSpeed on gloo). The
checks are on properties, never on timings, and read the benchmark's last line (one JSON
object holding its figures): every run has a rate, every ratio is there, and the stack and
the bare loop did the same work (same init, data and optimizer give the same loss at the
first logged steps).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from bench_util import measured

ROOT = Path(__file__).resolve().parents[1]

# Two Ray Train starts plus Ray itself: ~1 min on an idle 2-core box, minutes under load.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]  # starts Ray: the slow tier


def test_bench_train_quick_runs_end_to_end():
    proc = subprocess.run([sys.executable, "-m", "bench.bench_train", "--quick"],
                          cwd=ROOT, capture_output=True, text=True, timeout=580)
    out = proc.stdout
    assert proc.returncode == 0, f"bench failed:\n{out}\n{proc.stderr[-4000:]}"
    res = json.loads(out.strip().splitlines()[-1])  # the figures, as the last line
    assert res["bench"] == "train" and res["args"]["quick"] is True, res
    for label in ("bare loop, same shard loader", "stack: Ray + DeepSpeed + head + loader",
                  "bare loop, pre-decoded batches", "stack, 2 workers x 1 thread"):
        runs = res["runs"][label]
        assert len(runs) == 1 and measured(runs[0]["images_per_s"]), (label, res)
    for label in ("stack / bare, same loader", "stack / bare, pre-decoded",
                  "bare same loader / bare pre-decoded",
                  "2 workers x 1 thread / 1 worker x 2 threads"):
        ratio = res["ratios"][label]["per_round"]
        assert len(ratio) == 1 and measured(ratio[0]), (label, res)
    same = res["same_work"]
    assert same["steps"] == [2, 4] and same["loss_gap_stack_vs_bare"] < 1e-4, res
