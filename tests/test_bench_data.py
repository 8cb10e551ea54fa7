"""The data-plane benchmarks run end to end on small inputs (so they cannot rot).

Checks are on properties, never on timings: every figure is in the benchmark's last line
(one JSON object) as a measured number (tests/bench_util.py), and the handoff benchmark's
lent batches are really the workers' (its run would stall otherwise).
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


def run(script: str, *args: str) -> dict:
    """Runs ``python -m bench.<script>`` and returns the JSON object of its last stdout line."""
    proc = subprocess.run([sys.executable, "-m", f"bench.{script}", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    out = proc.stdout
    assert proc.returncode == 0, f"{script} failed:\n{out}\n{proc.stderr[-4000:]}"
    summary = json.loads(out.strip().splitlines()[-1])  # the figures, as the last line
    assert isinstance(summary, dict) and summary["bench"] == script[6:], out
    return summary


def test_bench_data_prints_every_round_and_the_medians():
    res = run("bench_data", "--samples", "256", "--rounds", "2", "--epochs", "1")
    assert res["args"] == {"samples": 256, "workers": 2, "epochs": 1, "rounds": 2}
    assert all(measured(rate) for d in res["decoders_images_per_s"].values()
               for rate in d.values())
    rounds = res["rounds"]
    assert [r["round"] for r in rounds] == [1, 2], res
    for r in rounds:
        for key in ("decode_bound_images_per_s", "loader_local_samples_per_s",
                    "main_process_cores", "worker_cores", "loader_s3_samples_per_s",
                    "local_over_bound", "s3_over_local", "webdataset_local_samples_per_s",
                    "ours_over_webdataset"):
            assert measured(r[key]), (key, r)
    med = res["medians"]
    assert set(med) == {"local_over_bound", "s3_over_local", "ours_over_webdataset"}, med
    assert all(all(measured(m[k]) for k in ("min", "median", "max")) and
               m["min"] <= m["median"] <= m["max"] for m in med.values()), med


def test_bench_handoff_measures_every_way():
    res = run("bench_handoff", "--batches", "40")
    assert res["args"]["batches"] == 40
    ways = res["ways"]
    assert list(ways) == ["fresh float32", "fresh uint8", "ring, torch clone", "ring, copy",
                          "ring, lend", "own workers, lend"], ways
    assert all(measured(w["samples_per_s"]) and measured(w["main_process_cpu"])
               for w in ways.values()), ways


def test_bench_loader_parts_prints_each_stage():
    res = run("bench_loader_parts", "--samples", "256", "--repeats", "1")
    us = res["us_per_sample"]
    for stage in ("tar parsing (2 members)", "+ json and label checks",
                  "+ shuffle buffer, stream", "JPEG decode, tight loop",
                  "flip, per mirrored image", "flip, numpy pixel axis", "whole worker loop"):
        assert measured(us[stage]), (stage, us)
    assert measured(res["decode_share"]), res


def test_bench_loader_ceiling_prints_each_variant():
    res = run("bench_loader_ceiling", "--samples", "256", "--rounds", "1")
    assert len(res["rounds"]) == 1, res
    assert measured(res["rounds"][0]["decode_bound_images_per_s"]), res
    med = res["median_loader_over_bound"]
    assert list(med) == ["real", "pre-parsed", "pre-parsed, no flip"], med
    assert all(measured(x) for x in med.values()), med
