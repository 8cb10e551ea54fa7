"""The data-plane benchmarks run end to end on small inputs (so they cannot rot).

Checks are on properties, never on timings: every figure prints and is positive, and the
handoff benchmark's lent batches are really the workers' (its run would stall otherwise).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(script: str, *args: str) -> str:
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / script), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout}\n{proc.stderr[-4000:]}"
    return proc.stdout


def test_bench_data_prints_every_round_and_the_medians():
    out = run("bench_data.py", "--samples", "256", "--rounds", "2", "--epochs", "1")
    rounds = re.findall(r"round \d: decode bound\s+(\d+) images/s .*loader local\s+(\d+) "
                        r"\(main process (\S+) cores, workers (\S+)\), S3\s+(\d+) samples/s", out)
    assert len(rounds) == 2 and all(float(x) > 0 for r in rounds for x in r), out
    med = re.findall(r"local / decode bound = (\S+) .* S3 / local = (\S+) .* ours / "
                     r"webdataset pipeline = (\S+) ", out)
    assert len(med) == 1 and all(float(x) > 0 for x in med[0]), out


def test_bench_handoff_measures_every_way():
    out = run("bench_handoff.py", "--batches", "40")
    for way in ("fresh float32", "fresh uint8", "ring, torch clone", "ring, copy",
                "ring, lend", "own workers, lend"):
        rate = re.findall(re.escape(way) + r"\s*:\s+(\d+) samples/s", out)
        assert len(rate) == 1 and int(rate[0]) > 0, (way, out)


def test_bench_loader_parts_prints_each_stage():
    out = run("bench_loader_parts.py", "--samples", "256", "--repeats", "1")
    for stage in ("tar parsing", "json and label checks", "JPEG decode, tight loop",
                  "flip, per mirrored image", "whole worker loop"):
        us = re.findall(re.escape(stage) + r".*?\s(\d+\.\d) us", out)
        assert len(us) == 1 and float(us[0]) > 0, (stage, out)
    share = re.findall(r"decode share (\S+),", out)
    assert len(share) == 1 and 0 < float(share[0]) <= 1.05, out


def test_bench_loader_ceiling_prints_each_variant():
    out = run("bench_loader_ceiling.py", "--samples", "256", "--rounds", "1")
    med = re.findall(r"median over 1 rounds: real (\S+), pre-parsed (\S+), "
                     r"pre-parsed, no flip (\S+)$", out, re.M)
    assert len(med) == 1 and all(float(x) > 0 for x in med[0]), out
