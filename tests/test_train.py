"""End-to-end training on real local Ray clusters (CPU, gloo, DeepSpeed) over real shards.

Each run trains the tiny backbone on MNIST shards built once per module. The history of
every run is read from rank 0's ``history.jsonl`` (one line per logged step).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import ray

from seqface_dist.config import ConfigError, config_from_dict, load_config
from seqface_dist.train.checkpoint import check_complete
from seqface_dist.train.driver import PreflightError, preflight, run
from seqface_dist.train.worker import history_path

pytestmark = pytest.mark.timeout(600)
VENV_BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from seqface_dist.data.build import write_shard_set
    from seqface_dist.data.mnist import load_mnist

    out = tmp_path_factory.mktemp("shards")
    x, y = load_mnist()["train"]
    ids = [(int(d), x[i]) for d in range(5) for i in np.nonzero(y == d)[0][:150]]
    seqs = [(k * 4 + j // 25, x[i]) for k, d in enumerate((5, 6, 7))
            for j, i in enumerate(np.nonzero(y == d)[0][:100])]
    rng = np.random.default_rng(0)
    rng.shuffle(ids)
    write_shard_set(ids, str(out / "ids"), "identity", max_samples=150)
    write_shard_set(seqs, str(out / "seqs"), "sequence", max_samples=100)
    return out


def _cfg(shards: Path, storage: Path, name: str, **over) -> dict:
    d = {
        "model": {"backbone": "tiny", "embedding_dim": 32, "input_size": [28, 28],
                  "in_channels": 1},
        "loss": {"scale": 16.0, "dsa_p": 0.3},
        "data": {"identity_shards": [str(shards / "ids")],
                 "sequence_shards": [str(shards / "seqs")],
                 "identities_per_batch": 16, "sequences_per_batch": 16, "num_workers": 1,
                 "shuffle_buffer": 100},
        "optim": {"lr": 0.05, "max_steps": 40, "milestones": [1000]},
        "train": {"run_name": name, "storage_path": str(storage), "num_workers": 2,
                  "log_every": 2, "checkpoint_every": 10, "max_failures": 0},
        "metrics": {"enabled": False},
    }
    for key, value in over.items():
        section, field = key.split("__")
        d[section][field] = value
    return d


def _history(cfg) -> list[dict]:
    return [json.loads(line) for line in history_path(cfg).read_text().splitlines()]


def _mean(rows, key):
    return float(np.mean([r[key] for r in rows]))


@pytest.fixture()
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=256 << 20)
    yield
    ray.shutdown()


def test_two_workers_deepspeed_every_loss_term_goes_down(shards, tmp_path, local_ray):
    cfg = config_from_dict(_cfg(shards, tmp_path, "down", optim__max_steps=60))
    result = run(cfg)
    hist = _history(cfg)
    assert [r["step"] for r in hist] == list(range(2, 61, 2))
    first, last = hist[:5], hist[-5:]
    for term in ("chief", "lsr", "chief_identity", "dsa_pull", "dsa_push", "total"):
        assert _mean(last, term) < 0.8 * _mean(first, term), (term, first, last)
    state = check_complete(result.checkpoint.path)
    assert state.step == 60 and state.world_size == 2
    assert (Path(result.checkpoint.path) / "export" / "embedding.pt2").is_file()


def test_multi_node_cluster_spreads_workers_and_checkpoints(shards, tmp_path):
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True,
                      head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    try:
        ray.init(address=cluster.address)
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2
        cfg = config_from_dict(_cfg(shards, tmp_path, "nodes", optim__max_steps=20))
        result = run(cfg)
        state = check_complete(result.checkpoint.path)
        assert state.step == 20 and state.world_size == 2
        # One CPU per node and one CPU per worker: the two workers ran on different nodes.
        assert len(set(_history(cfg)[-1]["node_ids"])) == 2
    finally:
        ray.shutdown()
        cluster.shutdown()


def _kill_a_worker_after_first_checkpoint(run_dir: Path, killed: list, stop: threading.Event):
    while not stop.is_set():
        if any(run_dir.glob("checkpoint_*/state.json")):
            for p in psutil.process_iter(["cmdline"]):
                if "RayTrainWorker" in " ".join(p.info["cmdline"] or []):
                    killed.append(p.pid)
                    os.kill(p.pid, signal.SIGKILL)
                    return
        time.sleep(0.2)


def test_killed_worker_restarts_from_last_checkpoint(shards, tmp_path, local_ray):
    cfg = config_from_dict(_cfg(shards, tmp_path, "fault", optim__max_steps=80,
                                train__max_failures=2, train__checkpoint_every=10))
    killed: list[int] = []
    stop = threading.Event()
    killer = threading.Thread(target=_kill_a_worker_after_first_checkpoint,
                              args=(tmp_path / "fault", killed, stop), daemon=True)
    killer.start()
    try:
        result = run(cfg)
    finally:
        stop.set()
    assert killed, "no worker was killed"
    hist = _history(cfg)
    steps = [r["step"] for r in hist]
    # After the kill the step counter went back to the last checkpoint and continued.
    restart = next(i for i in range(1, len(steps)) if steps[i] <= steps[i - 1])
    resumed_from = steps[restart] - 2
    assert resumed_from % 10 == 0 and resumed_from < steps[restart - 1] + 1
    assert steps[-1] == 80 and steps[restart:] == list(range(steps[restart], 81, 2))
    # Samples seen are counted from the checkpoint: nothing after it is claimed done.
    assert hist[-1]["samples_seen"] == 80 * 32 * 2
    assert check_complete(result.checkpoint.path).step == 80


def test_resume_on_a_different_number_of_workers(shards, tmp_path, local_ray):
    a = config_from_dict(_cfg(shards, tmp_path, "two", optim__max_steps=50))
    first = run(a)
    b = config_from_dict(_cfg(shards, tmp_path, "one", optim__max_steps=70,
                              train__num_workers=1,
                              train__resume_from=first.checkpoint.path))
    run(b)
    ha, hb = _history(a), _history(b)
    assert hb[0]["step"] == 52  # continued, not restarted
    start_a, end_a, start_b = _mean(ha[:3], "total"), _mean(ha[-5:], "total"), \
        _mean(hb[:5], "total")
    # Same loss level as before the stop (within noise), far from a fresh start.
    assert abs(start_b - end_a) < 0.35 * end_a + 0.2, (end_a, start_b)
    assert start_b < start_a - 0.5 * (start_a - end_a), (start_a, end_a, start_b)


def test_preflight_refuses_bad_runs_before_any_worker(shards, tmp_path):
    with pytest.raises(ConfigError, match="loss.dsa_p"):
        config_from_dict(_cfg(shards, tmp_path, "x", loss__dsa_p=2.0))
    bad_shards = _cfg(shards, tmp_path, "x")
    bad_shards["data"]["identity_shards"] = [str(tmp_path / "nowhere")]
    with pytest.raises(PreflightError, match="nowhere"):
        preflight(config_from_dict(bad_shards))
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(PreflightError, match="train.storage_path"):
        preflight(config_from_dict(_cfg(shards, blocker / "runs", "x")))
    wrong_size = _cfg(shards, tmp_path, "x")
    wrong_size["model"]["input_size"] = [32, 32]
    with pytest.raises(PreflightError, match="input_size"):
        preflight(config_from_dict(wrong_size))
    assert not ray.is_initialized()  # nothing was started


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ray_job_submit_runs_training(shards, tmp_path):
    import yaml

    cfg_file = tmp_path / "job.yaml"
    cfg_file.write_text(yaml.safe_dump(_cfg(shards, tmp_path, "job", optim__max_steps=10)))
    env = dict(os.environ, RAY_AUTH_MODE="token", PATH=f"{VENV_BIN}:{os.environ['PATH']}")
    port, dash = _free_port(), _free_port()
    ray_bin = str(VENV_BIN / "ray")
    subprocess.run([ray_bin, "start", "--head", "--port", str(port), "--num-cpus", "2",
                    "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
                    "--disable-usage-stats"], check=True, env=env, capture_output=True,
                   timeout=180)
    try:
        out = subprocess.run(
            [ray_bin, "job", "submit", "--address", f"http://127.0.0.1:{dash}", "--",
             str(VENV_BIN / "seqface"), "train", "--config", str(cfg_file)],
            env=env, capture_output=True, text=True, timeout=400)
        logs = out.stdout + out.stderr
        assert out.returncode == 0, logs[-3000:]
        assert "[seqface] step=10" in logs and "succeeded" in logs, logs[-3000:]
    finally:
        subprocess.run([ray_bin, "stop", "--force"], env=env, capture_output=True, timeout=120)
    shutil.rmtree(tmp_path / "job", ignore_errors=True)


def test_cli_train_refuses_a_bad_config_with_the_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("loss: {dsa_lambda: 3}\n")
    out = subprocess.run([str(VENV_BIN / "seqface"), "train", "--config", str(bad)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "loss.dsa_lambda" in out.stderr
    with pytest.raises(ConfigError, match="optim.grad_clip"):
        load_config(bad, ["loss.dsa_lambda=0.5", "optim.grad_clip=1.0",
                          "train.zero_stage=2"])
