"""Training on multi-node Ray clusters: ray.cluster_utils.Cluster and `ray job submit`."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray
from train_util import history, train_cfg

from seqface_dist.config import config_from_dict
from seqface_dist.train.checkpoint import check_complete
from seqface_dist.train.driver import run

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]  # starts Ray: the slow tier
VENV_BIN = Path(sys.executable).parent




def test_multi_node_cluster_spreads_workers_and_checkpoints(shards, tmp_path):
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True,
                      head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    try:
        ray.init(address=cluster.address)
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2
        cfg = config_from_dict(train_cfg(shards, tmp_path, "nodes", optim__max_steps=20))
        result = run(cfg)
        state = check_complete(result.checkpoint.path)
        assert state.step == 20 and state.world_size == 2
        # One CPU per node and one CPU per worker: the two workers ran on different nodes.
        assert len(set(history(cfg)[-1]["node_ids"])) == 2
    finally:
        ray.shutdown()
        cluster.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ray_job_submit_runs_training(shards, tmp_path):
    import yaml

    cfg_file = tmp_path / "job.yaml"
    cfg_file.write_text(yaml.safe_dump(train_cfg(shards, tmp_path, "job", optim__max_steps=10)))
    env = dict(os.environ, RAY_AUTH_MODE="token", PATH=f"{VENV_BIN}:{os.environ['PATH']}")
    port, dash = _free_port(), _free_port()
    ray_bin = str(VENV_BIN / "ray")
    subprocess.run([ray_bin, "start", "--head", "--port", str(port), "--num-cpus", "2",
                    "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
                    "--disable-usage-stats"], check=True, env=env, capture_output=True,
                   timeout=180)
    try:
        for _ in range(20):  # the head's job agent comes up some seconds after `ray start`
            out = subprocess.run(
                [ray_bin, "job", "submit", "--address", f"http://127.0.0.1:{dash}", "--",
                 str(VENV_BIN / "seqface"), "train", "--config", str(cfg_file)],
                env=env, capture_output=True, text=True, timeout=400)
            logs = out.stdout + out.stderr
            if "No available agent to submit job" not in logs:
                break
            time.sleep(3)
        assert out.returncode == 0, logs[-3000:]
        assert "succeeded" in logs, logs[-3000:]
        # Each progress line once (Ray Train tees print() twice), no per-report dict dump.
        assert logs.count("[seqface] step=10 ") == 1, logs[-3000:]
        assert "Reporting training result" not in logs, logs[-3000:]
    finally:
        subprocess.run([ray_bin, "stop", "--force"], env=env, capture_output=True, timeout=120)
    shutil.rmtree(tmp_path / "job", ignore_errors=True)
