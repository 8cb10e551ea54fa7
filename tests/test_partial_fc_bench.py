"""bench/partial_fc.py runs insightface's PartialFC_V2 on real gloo ranks (a tiny run).

Partial FC is read at run time from a snapshot of deepinsight/insightface named by
SEQFACE_PARTIAL_FC_SNAPSHOT (a bare git dir or a checkout); without it the test is skipped.
"""

from __future__ import annotations

import math
import os

import pytest
from head_common import Setup, run_processes, setup_dict
from partial_fc import load_partial_fc, partial_fc_worker

SNAPSHOT = os.environ.get("SEQFACE_PARTIAL_FC_SNAPSHOT")
needs_snapshot = pytest.mark.skipif(
    not SNAPSHOT, reason="SEQFACE_PARTIAL_FC_SNAPSHOT (a deepinsight/insightface snapshot) unset")


@needs_snapshot
def test_load_partial_fc_patches_cuda_out():
    mod = load_partial_fc(SNAPSHOT)
    assert hasattr(mod, "PartialFC_V2") and hasattr(mod, "ArcFace")
    assert any("cuda" in name for name in mod.__patches__), mod.__patches__


def test_load_partial_fc_names_the_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="partial_fc_v2.py|losses.py"):
        load_partial_fc(str(tmp_path))


@needs_snapshot
@pytest.mark.parametrize("rate", [1.0, 0.1])
def test_partial_fc_worker_tiny(rate):
    setup = Setup(num_identities=2_000, num_sequences=0, dim=32, batch=16, world=2, steps=2,
                  warmup=1)
    results = run_processes(partial_fc_worker, setup.world, setup_dict(setup), rate, SNAPSHOT,
                            timeout=120)
    assert [r["rank"] for r in results] == [0, 1]
    for r in results:
        assert {"rank", "step_s", "cpu_s", "losses", "peak_rss", "baseline_rss"} <= r.keys()
        assert len(r["step_s"]) == len(r["cpu_s"]) == setup.steps
        assert all(t > 0 for t in r["step_s"] + r["cpu_s"])
        assert r["peak_rss"] > 0 and r["baseline_rss"] > 0
        assert len(r["losses"]) == setup.warmup + setup.steps
        assert all(math.isfinite(x) for x in r["losses"])
        assert r["n_id_local"] == 1_000
        assert r["num_sample"] == int(rate * 1_000)
    # the loss is all-reduced: every rank sees the same value
    assert results[0]["losses"] == pytest.approx(results[1]["losses"])
