"""End-to-end training on real local Ray clusters (CPU, gloo, DeepSpeed) over real shards.

Each run trains the tiny backbone on MNIST shards built once per module. The history of
every run is read from rank 0's ``history.jsonl`` (one line per logged step).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import ray
from train_util import history, mean, run_while_watching, train_cfg

from seqface_dist.config import ConfigError, config_from_dict, load_config
from seqface_dist.train.checkpoint import check_complete
from seqface_dist.train.driver import PreflightError, local_ray, preflight, run
from seqface_dist.train.history import history_path, latest_attempt_rows

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]  # starts Ray: the slow tier
VENV_BIN = Path(sys.executable).parent




def test_preflight_refuses_bad_runs_before_any_worker(shards, tmp_path):
    with pytest.raises(ConfigError, match="loss.dsa_p"):
        config_from_dict(train_cfg(shards, tmp_path, "x", loss__dsa_p=2.0))
    bad_shards = train_cfg(shards, tmp_path, "x")
    bad_shards["data"]["identity_shards"] = [str(tmp_path / "nowhere")]
    with pytest.raises(PreflightError, match="nowhere"):
        run(config_from_dict(bad_shards))  # the driver refuses before starting Ray
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(PreflightError, match="train.storage_path"):
        preflight(config_from_dict(train_cfg(shards, blocker / "runs", "x")))
    wrong_size = train_cfg(shards, tmp_path, "x")
    wrong_size["model"]["input_size"] = [32, 32]
    with pytest.raises(PreflightError, match="input_size"):
        preflight(config_from_dict(wrong_size))
    no_pairs = train_cfg(shards, tmp_path, "x", eval__pairs=str(tmp_path / "no.bin"))
    with pytest.raises(PreflightError, match="eval.pairs"):
        preflight(config_from_dict(no_pairs))
    assert not ray.is_initialized()  # nothing was started (runs before the Ray tests)


def _committed_checkpoint(folder: Path, cfg, layout: dict) -> Path:
    """A checkpoint as the workers commit it: head block, engine file, state.json listing
    both (what the preflight reads: the commit, the files' sizes, the head and data)."""
    from seqface_dist.parallel import HeadSpec, PartitionedHead, save_head
    from seqface_dist.train.checkpoint import ENGINE_DIR, ENGINE_TAG, RunState, list_files

    spec = HeadSpec(layout["num_identities"], layout["num_sequences"], cfg.model.embedding_dim)
    save_head(PartitionedHead(spec, cfg.loss), None, folder)
    (folder / ENGINE_DIR / ENGINE_TAG).mkdir(parents=True)
    (folder / ENGINE_DIR / ENGINE_TAG / "mp_rank_00_model_states.pt").write_bytes(b"x" * 64)
    state = RunState(world_size=1, config=cfg.to_dict(), files=list_files(folder),
                     head={"spec": dataclasses.asdict(spec), "layout": layout})
    (folder / "state.json").write_bytes(state.to_json())
    return folder


def _layout(cfg) -> dict:
    from seqface_dist.data.layout import make_layout, resolve_sets

    return make_layout(resolve_sets(cfg.data.identity_shards, "identity"),
                       resolve_sets(cfg.data.sequence_shards, "sequence")).to_dict()


def test_preflight_refuses_a_resume_across_classifier_layouts(shards, tmp_path):
    # A checkpoint's state.json records the mode it trained with; an lsr head has no
    # sequence rows, so a sequence_classes run cannot continue it (and vice versa).
    cfg = config_from_dict(train_cfg(shards, tmp_path, "x", loss__sequence_mode="lsr"))
    ckpt = _committed_checkpoint(tmp_path / "ckpt", cfg, _layout(cfg))
    again = train_cfg(shards, tmp_path, "y", loss__sequence_mode="lsr",
                      train__resume_from=str(ckpt))
    preflight(config_from_dict(again))  # the same mode resumes
    other = dict(again, loss={**again["loss"], "sequence_mode": "sequence_classes"})
    with pytest.raises(PreflightError, match="set loss.sequence_mode=lsr"):
        preflight(config_from_dict(other))


def test_preflight_refuses_a_resume_onto_other_data_unless_weights_only(shards, tmp_path):
    cfg = config_from_dict(train_cfg(shards, tmp_path, "x"))
    layout = _layout(cfg)
    # Same class counts, other people: only the label maps' digests tell.
    layout["identity_sets"][0]["label_digest"] = "0" * 64
    ckpt = _committed_checkpoint(tmp_path / "ckpt", cfg, layout)
    again = train_cfg(shards, tmp_path, "y", train__resume_from=str(ckpt))
    with pytest.raises(PreflightError, match=r"other data: identity_sets\[0\].*label_digest"):
        preflight(config_from_dict(again))
    again["train"]["resume_weights_only"] = True
    preflight(config_from_dict(again))
    # A cut file or a missing commit is refused before any worker starts.
    engine = next((ckpt / "engine").rglob("*.pt"))
    engine.write_bytes(b"x" * 10)
    with pytest.raises(PreflightError, match="mp_rank_00_model_states.pt has 10 bytes"):
        preflight(config_from_dict(again))
    (ckpt / "state.json").unlink()
    with pytest.raises(PreflightError, match="no state.json"):
        preflight(config_from_dict(again))


@pytest.fixture(scope="module")
def own_ray():
    """One local Ray for the module's runs (each run() reuses it: no restart per test)."""
    with local_ray(num_cpus=2, env_vars={"DS_ACCELERATOR": "cpu"},
                   object_store_memory=256 << 20):
        yield


@pytest.fixture(scope="module")
def two_worker_run(shards, tmp_path_factory, own_ray):
    storage = tmp_path_factory.mktemp("runs")
    cfg = config_from_dict(train_cfg(shards, storage, "down", optim__max_steps=60))
    return cfg, run(cfg)


def test_two_workers_deepspeed_every_loss_term_goes_down(two_worker_run):
    cfg, result = two_worker_run
    hist = history(cfg)
    assert [r["step"] for r in hist] == list(range(2, 61, 2))
    first, last = hist[:5], hist[-5:]
    for term in ("chief", "lsr", "chief_identity", "dsa_pull", "dsa_push", "total"):
        assert mean(last, term) < 0.8 * mean(first, term), (term, first, last)
    state = check_complete(result.checkpoint.path)
    assert state.step == 60 and state.world_size == 2
    assert (Path(result.checkpoint.path) / "export" / "embedding.pt2").is_file()


def _registered_checkpoint_steps(run_dir: Path) -> list[int]:
    """Steps of the checkpoints Ray Train has registered (its manager's snapshot)."""
    snap = run_dir / "checkpoint_manager_snapshot.json"
    try:
        return [r["metrics"]["step"] for r in json.loads(snap.read_text())["checkpoint_results"]]
    except (OSError, ValueError, KeyError):  # not there yet, or being rewritten
        return []


def _kill_rank1_after_a_checkpoint(cfg, killed: list, stop: threading.Event):
    """Once Ray registered a checkpoint and a later step was logged, SIGKILL rank 1."""
    run_dir = Path(cfg.train.storage_path) / cfg.train.run_name
    while not stop.is_set():
        done = _registered_checkpoint_steps(run_dir)
        try:
            rows = history(cfg) if history_path(cfg).exists() else []
        except ValueError:  # a line being written
            rows = []
        if done and rows and rows[-1].get("step", 0) > min(done):
            pid = rows[-1]["pids"][1]
            killed.append((pid, rows[-1]["step"]))
            os.kill(pid, signal.SIGKILL)
            return
        time.sleep(0.1)


def test_killed_worker_restarts_from_last_checkpoint(shards, tmp_path, own_ray):
    cfg = config_from_dict(train_cfg(shards, tmp_path, "fault", optim__max_steps=60,
                                     train__max_failures=2, train__checkpoint_every=10))
    result, killed = run_while_watching(cfg, _kill_rank1_after_a_checkpoint)
    assert killed, "no worker was killed"
    (pid, step_at_kill), = killed
    hist = history(cfg)
    resumed = [r for r in hist if r.get("event") == "resumed"]
    assert len(resumed) == 1, hist
    back_to = resumed[0]["step"]
    # The restart continued from the last checkpoint at or before the kill.
    assert back_to % 10 == 0 and 10 <= back_to <= step_at_kill
    after = [r["step"] for r in hist[hist.index(resumed[0]) + 1:]]
    assert after == list(range(back_to + 2, 61, 2))
    assert pid not in hist[-1]["pids"]  # a new process took rank 1's place
    # Every line names its attempt; the steps redone after the restart count once.
    before, again = hist[0]["attempt"], resumed[0]["attempt"]
    assert before != again and hist[-1]["attempt"] == again
    assert [r["step"] for r in latest_attempt_rows(hist)] == list(range(2, 61, 2))
    # Samples are counted from the checkpoint on: nothing after it is claimed done.
    assert hist[-1]["samples_seen"] == 60 * 32 * 2
    assert check_complete(result.checkpoint.path).step == 60


def test_resume_on_a_different_number_of_workers(shards, tmp_path, two_worker_run):
    a, first = two_worker_run  # 60 steps on 2 workers
    b = config_from_dict(train_cfg(shards, tmp_path, "one", optim__max_steps=80,
                              train__num_workers=1,
                              train__resume_from=first.checkpoint.path))
    run(b)
    ha, hb = history(a), history(b)
    assert hb[0]["event"] == "resumed" and hb[0]["step"] == 60
    hb = hb[1:]
    assert hb[0]["step"] == 62 and len(hb[0]["pids"]) == 1  # continued on one worker
    start_a, end_a, start_b = mean(ha[:3], "total"), mean(ha[-5:], "total"), \
        mean(hb[:5], "total")
    # Same loss level as before the stop (within noise), far from a fresh start.
    assert abs(start_b - end_a) < 0.35 * end_a + 0.2, (end_a, start_b)
    assert start_b < start_a - 0.5 * (start_a - end_a), (start_a, end_a, start_b)


def test_weights_only_resume_takes_the_backbone_onto_other_data(shards, tmp_path,
                                                                two_worker_run):
    # Other data (no sequence set: another label layout) is refused as a resume, and
    # trained with the old backbone and a new head when only the weights are asked for.
    _, first = two_worker_run
    over = {"data__sequence_shards": [], "data__sequences_per_batch": 0,
            "train__resume_from": first.checkpoint.path}
    with pytest.raises(PreflightError, match="other data: 1 sequence sets in the checkpoint"):
        preflight(config_from_dict(train_cfg(shards, tmp_path, "other", **over)))
    cfg = config_from_dict(train_cfg(shards, tmp_path, "other", optim__max_steps=10,
                                     train__resume_weights_only=True, **over))
    run(cfg)
    hist = history(cfg)
    assert not any(r.get("event") == "resumed" for r in hist)  # a new run, from step 0
    assert [r["step"] for r in hist] == list(range(2, 11, 2))
    # The same 10 steps from a fresh backbone: the taken one starts better.
    fresh = config_from_dict(train_cfg(shards, tmp_path, "fresh", optim__max_steps=10,
                                       data__sequence_shards=[], data__sequences_per_batch=0))
    run(fresh)
    assert mean(hist, "chief") < mean(history(fresh), "chief"), (hist, history(fresh))


def test_cli_train_refuses_a_bad_config_with_the_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("loss: {dsa_lambda: 3}\n")
    out = subprocess.run([str(VENV_BIN / "seqface"), "train", "--config", str(bad)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "loss.dsa_lambda" in out.stderr
    with pytest.raises(ConfigError, match="optim.grad_clip"):
        load_config(bad, ["loss.dsa_lambda=0.5", "optim.grad_clip=1.0",
                          "train.zero_stage=2"])
