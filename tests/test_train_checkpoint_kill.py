"""A rank killed *during* a checkpoint (its upload done, the commit not yet written): the
run goes on from the last committed checkpoint, on a real local Ray cluster.

The workers pause between their upload and the commit (the fault-injection variable
SEQFACE_FAULT_PAUSE_BEFORE_COMMIT_S, set for this test's own cluster only), which gives
the test a window to SIGKILL rank 1 inside the checkpoint write.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
from train_util import history, run_while_watching, train_cfg

from seqface_dist.config import config_from_dict
from seqface_dist.train import commit
from seqface_dist.train.checkpoint import check_complete
from seqface_dist.train.driver import local_ray
from seqface_dist.train.history import history_path
from seqface_dist.train.worker import FAULT_PAUSE_BEFORE_COMMIT

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]  # starts Ray: the slow tier


def _uncommitted_after_a_commit(run_dir: Path) -> Path | None:
    """A checkpoint folder with files but no commit, newer than a committed one."""
    folders = sorted(run_dir.glob("checkpoint-*"))
    done = [f for f in folders if (f / "state.json").is_file()]
    pending = [f for f in folders if not (f / "state.json").exists() and any(f.rglob("*.pt"))]
    if done and pending and pending[-1].name > done[-1].name:
        return pending[-1]
    return None


def _kill_rank1_mid_checkpoint(cfg, killed: list, stop: threading.Event) -> None:
    run_dir = Path(cfg.train.storage_path) / cfg.train.run_name
    while not stop.is_set():
        pending = _uncommitted_after_a_commit(run_dir)
        if pending is not None and history_path(cfg).exists():
            pid = history(cfg)[-1]["pids"][1]
            killed.append((pid, pending.name))
            os.kill(pid, signal.SIGKILL)
            return
        time.sleep(0.05)


def test_a_rank_killed_during_a_checkpoint_write_resumes_from_the_last_commit(shards,
                                                                              tmp_path):
    cfg = config_from_dict(train_cfg(shards, tmp_path, "mid", optim__max_steps=40,
                                     train__max_failures=1, train__checkpoint_every=10,
                                     train__keep_checkpoints=2))
    with local_ray(num_cpus=2, env_vars={"DS_ACCELERATOR": "cpu",
                                         FAULT_PAUSE_BEFORE_COMMIT: "4"},
                   object_store_memory=256 << 20):
        result, killed = run_while_watching(cfg, _kill_rank1_mid_checkpoint)
    assert killed, "no rank was killed mid-checkpoint"
    (pid, half_written), = killed
    half_step = int(half_written.split("-")[1])
    hist = history(cfg)
    resumed = [r for r in hist if r.get("event") == "resumed"]
    assert len(resumed) == 1, hist
    # Back to the last *committed* checkpoint, not the half-written one.
    assert resumed[0]["step"] == half_step - 10, (resumed, half_written)
    assert pid not in hist[-1]["pids"] and hist[-1]["step"] == 40
    final = check_complete(result.checkpoint.path)
    assert final.step == 40
    # Only committed checkpoints remain, the newest two; the half-written one is gone.
    run_dir = Path(cfg.train.storage_path) / cfg.train.run_name
    left = sorted(p.name for p in run_dir.glob("checkpoint-*"))
    assert len(left) == 2 and half_written not in left, left
    found, skipped = commit.find_resumable(commit.filesystem(str(run_dir))[0], str(run_dir))
    assert found.step == 40 and skipped == []
