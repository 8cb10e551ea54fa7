"""bench/bench_head.py --quick runs end to end (so the benchmark cannot rot).

It starts real gloo ranks, steps the head and the dense reference, and profiles a step;
the checks are on properties, never on timings: every section prints, the bytes a rank
sends per step do not depend on N_id, the R = 1 head and the dense reference see the same
data (equal first loss), the pass counter found the step's three GEMMs, and the center
block is streamed only by the optimizer's momentum decay and parameter update (the center
update is sparse: no zero-fill, no full-block scaling, no dense update buffer).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_head_quick_runs_end_to_end():
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_head.py"), "--quick",
                           "--sample-rate", "1.0", "0.5", "--head-dtype", "fp32", "bf16"],
                          cwd=ROOT, capture_output=True, text=True, timeout=240)
    out = proc.stdout
    assert proc.returncode == 0, f"bench failed:\n{out}\n{proc.stderr}"
    for section in ("== memory", "== communication", "== speed", "== passes", "== scale plan"):
        assert section in out, f"missing section {section!r}:\n{out}"
    assert "SKIPPED" not in out, out
    assert "bytes/step equal across N_id: True" in out, out
    gaps = [float(x) for x in re.findall(r"\|loss\[0\] head - dense\| = (\S+)", out)]
    assert len(gaps) == 2 and all(g < 1e-4 for g in gaps), out
    assert len(re.findall(r"head R = \d .* wall .* sample rate 0.5", out)) == 4, out
    assert "GEMMs on the big operands (3)" in out, out
    assert "other ops on the n_c x D center block (2): mul_ add_" in out, out
    assert "ops on the sparse center update" in out, out
    assert "projected R = 8 peak" in out, out
    for rate in ("1", "0.5"):  # the scale plan per sample rate and head dtype
        for dtype in ("fp32", "bf16"):
            assert f"sample rate {rate}, head {dtype}" in out, out
