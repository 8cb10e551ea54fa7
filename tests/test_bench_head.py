"""python -m bench.bench_head --quick runs end to end (so the benchmark cannot rot).

It starts real gloo ranks, steps the head and the dense reference, and profiles a step;
the checks are on properties, never on timings: every section prints, the bytes a rank
sends per step do not depend on N_id, the R = 1 head and the dense reference see the same
data (equal first loss), the pass counter found the step's three GEMMs, and the center
block is streamed only by the optimizer's momentum decay and parameter update (the center
update is sparse: no zero-fill, no full-block scaling, no dense update buffer).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from bench_util import measured

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # whole benchmarks in subprocesses: the slow tier


def test_bench_head_quick_runs_end_to_end():
    proc = subprocess.run([sys.executable, "-m", "bench.bench_head", "--quick",
                           "--sample-rate", "1.0", "0.5", "--head-dtype", "fp32", "bf16"],
                          cwd=ROOT, capture_output=True, text=True, timeout=240)
    out = proc.stdout
    assert proc.returncode == 0, f"bench failed:\n{out}\n{proc.stderr}"
    for section in ("== memory", "== communication", "== speed", "== passes", "== scale plan"):
        assert section in out, f"missing section {section!r}:\n{out}"
    assert "SKIPPED" not in out, out
    res = json.loads(out.strip().splitlines()[-1])  # the figures, as the last line
    assert res["bench"] == "head" and res["args"]["quick"] is True
    assert len(res["memory"]) == 2 and all(m["peak_gb"] > 0 for m in res["memory"])
    assert res["comm_equal_across_n"] == [{"mode": "lsr", "equal": True}]
    heads = res["head"]
    assert {(h["world"], h["rate"]) for h in heads} == {(w, r) for w in (1, 2)
                                                       for r in (1.0, 0.5)}
    assert all(measured(h["cpu_ms"]) and measured(h["floor_fraction"]) for h in heads)
    gaps = [h["loss0_gap_vs_dense"] for h in heads if h["loss0_gap_vs_dense"] is not None]
    assert len(gaps) == 2 and all(g < 1e-4 for g in gaps), heads  # R = 1 sees the dense data
    (passes,) = res["passes"]
    assert passes["gemms"] == 3
    assert passes["C_ops"] == ["mul_", "add_"], passes
    assert passes["sparse_ops"] > 0
    # The scale plan per sample rate and head dtype (quick: measured and projected).
    plans = {(p["rate"], p["dtype"]) for p in res["scale"]}
    assert plans == {(r, d) for r in (1.0, 0.5) for d in ("fp32", "bf16")}, res["scale"]
    assert all(p.get("peak_gb") or p.get("projected_gb") for p in res["scale"])
