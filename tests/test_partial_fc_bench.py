"""bench.partial_fc runs insightface's PartialFC_V2 on real gloo ranks (a tiny run).

Partial FC is read at run time from a snapshot of deepinsight/insightface named by
SEQFACE_PARTIAL_FC_SNAPSHOT (a bare git dir or a checkout); without it those tests are
skipped, and the loader is still tested on stand-in files.
"""

from __future__ import annotations

import math
import os

import pytest
from bench_util import measured

from bench.head_common import Setup, run_processes, setup_dict
from bench.partial_fc import load_partial_fc, partial_fc_worker

SNAPSHOT = os.environ.get("SEQFACE_PARTIAL_FC_SNAPSHOT")
# insightface's Partial FC is not on PyPI (the `insightface` wheel has no arcface_torch)
# and may not be vendored: only a machine given a snapshot of the repository can run it.
# The loader itself is tested below on stand-in files, everywhere.
needs_snapshot = pytest.mark.skipif(
    not SNAPSHOT, reason="needs a deepinsight/insightface snapshot in "
    "SEQFACE_PARTIAL_FC_SNAPSHOT (not on PyPI, never vendored; CI has none)")

# Stand-ins in the layout and style of arcface_torch (written here, not copied).
_LOSSES = """
import torch
class CombinedMarginLoss(torch.nn.Module):
    def __init__(self, s, m1, m2, m3, interclass_filtering_threshold=0):
        super().__init__()
class ArcFace(torch.nn.Module):
    pass
"""
_PFC = """
import torch
class PartialFC_V2(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.index = torch.arange(3).cuda()
        self.buffer = torch.zeros(2).cuda(non_blocking=True)
    def forward(self, x):
        with torch.cuda.amp.autocast(False):
            return x
"""


def _stand_in(root, git: bool) -> str:
    import subprocess

    folder = root / "recognition" / "arcface_torch"
    folder.mkdir(parents=True)
    (folder / "losses.py").write_text(_LOSSES)
    (folder / "partial_fc_v2.py").write_text(_PFC)
    if not git:
        return str(root)
    run = dict(cwd=root, check=True, capture_output=True)
    subprocess.run(["git", "init", "-q"], **run)
    subprocess.run(["git", "add", "."], **run)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm",
                    "stand-in"], **run)
    return str(root / ".git")


@pytest.mark.parametrize("git", [False, True])
def test_load_partial_fc_patches_a_stand_in_snapshot(tmp_path, git):
    # The loader reads both files from a folder or a bare git dir, drops every .cuda()
    # call, moves autocast off CUDA, and the patched code runs on the CPU.
    mod = load_partial_fc(_stand_in(tmp_path, git))
    assert mod.__patches__ == {
        "recognition/arcface_torch/partial_fc_v2.py: drop .cuda()": 2,
        "recognition/arcface_torch/partial_fc_v2.py: "
        "torch.cuda.amp.autocast -> torch.amp.autocast('cpu')": 1}, mod.__patches__
    assert (mod.__commit__ is not None) == git
    pfc = mod.PartialFC_V2()
    assert pfc.index.device.type == "cpu" and pfc(pfc.buffer) is pfc.buffer


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
        assert all(measured(t) for t in r["step_s"] + r["cpu_s"])
        assert r["peak_rss"] > 0 and r["baseline_rss"] > 0
        assert len(r["losses"]) == setup.warmup + setup.steps
        assert all(math.isfinite(x) for x in r["losses"])
        assert r["n_id_local"] == 1_000
        assert r["num_sample"] == int(rate * 1_000)
    # the loss is all-reduced: every rank sees the same value
    assert results[0]["losses"] == pytest.approx(results[1]["losses"])
