"""The README's main command, ``seqface demo``, runs end to end (short, in the slow tier)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_the_demo_trains_evaluates_and_exports(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "seqface_dist.cli", "demo", "--out",
                           str(tmp_path / "demo-out"), "--steps", "60"],
                          env={**os.environ, "DS_ACCELERATOR": "cpu"},
                          capture_output=True, text=True, timeout=900)
    out = proc.stdout
    assert proc.returncode == 0, f"{out[-4000:]}\n{proc.stderr[-4000:]}"
    m = re.search(r"verification\s+([0-9.]+) ± [0-9.]+ 10-fold accuracy", out)
    assert m, out[-3000:]
    assert 0.5 < float(m.group(1)) <= 1.0, out[-3000:]  # a real figure, above chance
    (run,) = (tmp_path / "demo-out" / "runs").iterdir()
    last = sorted(run.glob("checkpoint-*"))[-1]
    assert (last / "export" / "model.json").is_file()
    assert list((run / "tensorboard").rglob("events.out.tfevents.*"))
