"""Experiment tracking (seqface_dist.train.tracking): TensorBoard event files read back,
on local and S3 storage, written off the caller's thread; MLflow on a file:// store; and
one end-to-end training run (slow tier) with two evaluation sets, one of them on S3."""

from __future__ import annotations

import math
import sys
import threading
import time

import pyarrow.fs as pafs
import pytest

from seqface_dist.config import load_config
from seqface_dist.train import tracking
from seqface_dist.train.tracking import Tracker, read_event_file, read_scalars


def _step(step: int, total: float, **kw) -> dict:
    return {"step": step, "epoch": 0, "total": total, "chief": total / 2, "lr": 0.1,
            "lambda": 5.0, "samples_per_second": 100.0 + step, "skipped_steps": 0,
            "node_ids": ["n0", "n1"], "pids": [1, 2], **kw}


def _cfg(*over: str):
    return load_config(None, ["train.run_name=r1", *over])


def test_event_files_hold_every_scalar_at_its_step(tmp_path):
    run = tmp_path / "r1"
    t = Tracker(_cfg(), pafs.LocalFileSystem(), str(run), "aaaa0000")
    t.log(_step(2, 3.0))
    t.log(_step(4, 2.0, grad_norm=float("nan"), **{"eval/lfw/accuracy": 0.75,
                                                      "eval/lfw/tar@far=0.001": 0.5}))
    t.close()
    sc = read_scalars(run / "tensorboard")
    assert sc["train/total"] == [(2, 3.0), (4, 2.0)]
    assert sc["train/chief"] == [(2, 1.5), (4, 1.0)]
    assert sc["train/lr"] == [(2, pytest.approx(0.1)), (4, pytest.approx(0.1))]
    assert sc["train/samples_per_second"] == [(2, 102.0), (4, 104.0)]
    assert sc["eval/lfw/accuracy"] == [(4, 0.75)]
    assert sc["eval/lfw/tar_far_0.001"] == [(4, 0.5)]
    assert "train/grad_norm" not in sc and "train/node_ids" not in sc  # NaN, lists: not
    files = list((run / "tensorboard").glob("events.out.tfevents.*.aaaa0000"))
    assert len(files) == 1
    assert read_event_file(files[0])[0].file_version == "brain.Event:2"
    assert t.errors == {}


def test_logging_never_waits_for_the_writer(tmp_path, monkeypatch):
    # The writer is held until every step was logged: log() returning at all shows it
    # only queues (a blocking log would deadlock here; the timeout reports that).
    release = threading.Event()
    real = tracking._TensorBoard.write

    def held(self, *a):
        assert release.wait(60), "log() waited for the writer"
        real(self, *a)

    monkeypatch.setattr(tracking._TensorBoard, "write", held)
    t = Tracker(_cfg(), pafs.LocalFileSystem(), str(tmp_path / "r1"), "aaaa0000")
    for s in range(1, 6):
        t.log(_step(s, 1.0 / s))
    assert read_scalars(tmp_path / "r1" / "tensorboard").get("train/total", []) == []
    release.set()
    t.flush()  # waits for all of them
    assert [s for s, _ in read_scalars(tmp_path / "r1" / "tensorboard")["train/total"]] == \
        [1, 2, 3, 4, 5]
    t.close()


def test_s3_event_files_are_uploaded_at_flush_and_a_resume_purges_redone_steps():
    from seqface_dist.data import store
    from seqface_dist.data.testing import local_s3

    with local_s3("bucket"):
        fs, run = pafs.FileSystem.from_uri("s3://bucket/runs/r1")
        first = Tracker(_cfg(), fs, run, "aaaa0000")
        for s in (2, 4, 6):
            first.log(_step(s, 10.0 - s))
        time.sleep(0.2)
        assert fs.get_file_info(pafs.FileSelector(f"{run}/tensorboard",
                                                  allow_not_found=True)) == []
        first.flush()
        first.close()  # "killed" after step 6; the last checkpoint was at step 4
        second = Tracker(_cfg(), fs, run, "bbbb1111", resumed_step=4)
        second.log(_step(6, 1.0))
        second.close()
        infos = fs.get_file_info(pafs.FileSelector(f"{run}/tensorboard"))
        got = {i.base_name: store.read_bytes(f"s3://{i.path}") for i in infos}
    assert sorted(n.rsplit(".", 1)[-1] for n in got) == ["aaaa0000", "bbbb1111"]
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        for name, data in got.items():
            (Path(d) / name).write_bytes(data)
        sc = read_scalars(d)
        second_file = next(Path(d).glob("*.bbbb1111"))
        purge = [e for e in read_event_file(second_file) if e.HasField("session_log")]
    assert sorted(sc["train/total"]) == [(2, 8.0), (4, 6.0), (6, 1.0), (6, 4.0)]
    # TensorBoard drops the first attempt's steps >= 5 when it meets this marker.
    assert [(e.step, e.session_log.status) for e in purge] == [(5, 1)]


def test_mlflow_file_store_gets_params_and_metrics_per_step(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 prefers a database
    from mlflow.tracking import MlflowClient

    uri = (tmp_path / "mlruns").as_uri()
    cfg = _cfg(f"tracking.mlflow_uri={uri}", "tracking.mlflow_experiment=exp",
               "eval.sets=[{name: lfw, path: /d/lfw.bin}]")
    t = Tracker(cfg, pafs.LocalFileSystem(), str(tmp_path / "r1"), "aaaa0000")
    t.log(_step(2, 3.0))
    t.log(_step(4, 2.0, **{"eval/lfw/accuracy": 0.75}))
    t.close()
    again = Tracker(cfg, pafs.LocalFileSystem(), str(tmp_path / "r1"), "bbbb1111", 4)
    again.log(_step(6, 1.0))
    again.close()
    assert t.errors == {} and again.errors == {}
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("exp").experiment_id])
    assert len(runs) == 1  # the resumed attempt continued the same MLflow run
    r = runs[0]
    assert r.info.run_name == "r1"
    assert r.data.params["loss.margin"] == "sphereface"
    assert r.data.params["train.run_name"] == "r1"
    assert "lfw.bin" in r.data.params["eval.sets"]
    hist = client.get_metric_history(r.info.run_id, "train/total")
    assert sorted((m.step, m.value) for m in hist) == [(2, 3.0), (4, 2.0), (6, 1.0)]
    assert [m.value for m in client.get_metric_history(r.info.run_id,
                                                       "eval/lfw/accuracy")] == [0.75]


def test_a_failing_tracker_is_skipped_and_never_raises(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if not installed
    monkeypatch.setitem(sys.modules, "mlflow.tracking", None)
    t = Tracker(_cfg("tracking.mlflow_uri=file:///nowhere"), pafs.LocalFileSystem(),
                str(tmp_path / "r1"), "aaaa0000")
    t.log(_step(2, 3.0))
    t.close()
    assert "not installed" in t.errors["mlflow"]
    assert read_scalars(tmp_path / "r1" / "tensorboard")["train/total"] == [(2, 3.0)]
    off = Tracker(_cfg("tracking.tensorboard=false"), pafs.LocalFileSystem(),
                  str(tmp_path / "r2"), "aaaa0000")
    off.log(_step(2, 3.0))
    off.close()
    assert not (tmp_path / "r2").exists()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_training_writes_event_files_and_evaluates_every_set(shards, tmp_path, monkeypatch):
    """One Ray run: two evaluation sets (local, S3) every 10 steps, TensorBoard files
    with the loss terms and each set's accuracy, and the MLflow run."""
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # inherited by the Ray workers
    from mlflow.tracking import MlflowClient
    from test_eval_sets import _bin
    from train_util import history, train_cfg

    from seqface_dist.config import config_from_dict
    from seqface_dist.data import store
    from seqface_dist.data.testing import local_s3
    from seqface_dist.train.driver import run

    uri = (tmp_path / "mlruns").as_uri()
    local = _bin(tmp_path / "a.bin", n=20)
    with local_s3("bucket") as endpoint:
        store.write_bytes("s3://bucket/eval/b.bin", _bin(tmp_path / "b.bin", n=20).read_bytes())
        d = train_cfg(shards, tmp_path / "runs", "tracked", optim__max_steps=20,
                      eval__sets=[{"name": "a", "path": str(local)},
                                  {"name": "b", "path": "s3://bucket/eval/b.bin"}],
                      eval__every_steps=10, eval__flip_test=False,
                      tracking__mlflow_uri=uri)
        d["data"]["s3_endpoint_url"] = endpoint
        cfg = config_from_dict(d)
        run(cfg)
    rows = history(cfg)
    evals = {r["step"]: r for r in rows if "eval/a/accuracy" in r}
    assert sorted(evals) == [10, 20]
    for r in evals.values():
        for name in ("a", "b"):
            assert 0.0 <= r[f"eval/{name}/accuracy"] <= 1.0
            assert f"eval/{name}/tar@far=0.001" in r
        assert not any(k.startswith("eval_") for k in r)
    sc = read_scalars(tmp_path / "runs" / "tracked" / "tensorboard")
    logged = [r["step"] for r in rows if "total" in r]
    for term in ("total", "chief", "dsa_pull", "dsa_push", "lr", "samples_per_second"):
        assert [s for s, _ in sc[f"train/{term}"]] == logged, term
    want = {r["step"]: r["total"] for r in rows if "total" in r}
    assert all(math.isclose(v, want[s], rel_tol=1e-6) for s, v in sc["train/total"])
    assert [s for s, _ in sc["eval/b/accuracy"]] == [10, 20]
    client = MlflowClient(tracking_uri=uri)
    (mr,) = client.search_runs([client.get_experiment_by_name("seqface").experiment_id])
    assert [m.step for m in client.get_metric_history(mr.info.run_id, "eval/a/accuracy")] \
        == [10, 20]
