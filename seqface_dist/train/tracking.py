"""Experiment tracking by rank 0: TensorBoard event files, and MLflow when asked.

    tracker = Tracker(cfg, fs, run_path, attempt, resumed_step=0)   # ``tracking`` section
    tracker.log(report)       # the dict of a logged step (the one history.jsonl gets)
    tracker.flush()           # at every checkpoint: everything written (and uploaded)
    tracker.close()           # at the end

Every numeric entry of a logged step becomes a scalar at that step: each loss term, lr,
lambda, throughput (``samples_per_second``), gradient norm, and the evaluations per set
(``eval/<name>/accuracy``, ...). TensorBoard tags: keys with a ``/`` as they are, the rest
under ``train/``; characters outside ``[A-Za-z0-9_./-]`` become ``_`` (``tar@far=0.001`` ->
``tar_far_0.001``), the same names in MLflow.

**TensorBoard** (``tracking.tensorboard``, default on): event files in
``<storage>/<run>/tensorboard/``, written with tensorboardX's record writer (the format
Ray's TBX logger writes; ``tensorboard --logdir <storage>/<run>/tensorboard``). Each
attempt writes its own file (suffixed with its token); an attempt that resumed at step s
first writes TensorBoard's purge marker, so the steps after s logged by the attempt that
failed are hidden. On ``s3://`` storage the files are written locally and uploaded whole at
every :meth:`Tracker.flush` (each checkpoint) and at the end, as history.jsonl is.

**MLflow** (``tracking.mlflow_uri``; needs ``mlflow-skinny`` or ``mlflow``): one MLflow
run per training run (tag ``seqface.run`` = ``<storage>/<run>``; a resumed attempt continues
it), params = the resolved config flattened (``loss.margin``, ...), metrics per logged step.

Nothing here blocks a step: :meth:`Tracker.log` only queues; one background thread
writes, and a failing writer (full disk, MLflow server down) is reported once and then
skipped, never stopping the run.
"""

from __future__ import annotations

import logging
import math
import os
import posixpath
import queue
import re
import struct
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from seqface_dist.config import Config

log = logging.getLogger("seqface")

TENSORBOARD_DIR = "tensorboard"
_BAD = re.compile(r"[^A-Za-z0-9_./\-]")


def scalar_tag(key: str) -> str:
    """The TensorBoard / MLflow name of a logged key."""
    return _BAD.sub("_", key if "/" in key else f"train/{key}")


def scalars(report: dict) -> dict[str, float]:
    """The finite numbers of a logged step, by tag (``step`` is the x axis, not a scalar)."""
    out: dict[str, float] = {}
    for k, v in report.items():
        if k == "step" or isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if math.isfinite(v):
            out[scalar_tag(k)] = float(v)
    return out


def flatten(d: dict, prefix: str = "") -> dict[str, str]:
    """A nested config as ``section.key`` -> text (lists as they print)."""
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, f"{key}."))
        else:
            out[key] = str(v)
    return out


class _TensorBoard:
    """One event file of this attempt in ``folder`` (tensorboardX's record writer)."""

    def __init__(self, folder: Path, attempt: str, purge_step: int | None):
        from tensorboardX.event_file_writer import EventsWriter

        folder.mkdir(parents=True, exist_ok=True)
        self.writer = EventsWriter(str(folder / "events"), f".{attempt}")
        if purge_step is not None:
            from tensorboardX.proto.event_pb2 import Event, SessionLog

            self.writer.write_event(Event(wall_time=time.time(), step=purge_step,
                                          session_log=SessionLog(status=SessionLog.START)))

    def write(self, step: int, values: dict[str, float], wall: float) -> None:
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.proto.summary_pb2 import Summary

        self.writer.write_event(Event(wall_time=wall, step=step, summary=Summary(
            value=[Summary.Value(tag=k, simple_value=v) for k, v in values.items()])))

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class _MLflow:
    """The MLflow run of this training run, through MlflowClient (no global active run)."""

    def __init__(self, uri: str, experiment: str, run_tag: str, name: str, params: dict):
        try:
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise RuntimeError("tracking.mlflow_uri is set but mlflow is not installed "
                               "(pip install mlflow-skinny)") from None
        self.client = MlflowClient(tracking_uri=uri)
        exp = self.client.get_experiment_by_name(experiment)
        exp_id = exp.experiment_id if exp else self.client.create_experiment(experiment)
        quoted = run_tag.replace("\\", "\\\\").replace("'", "\\'")
        found = self.client.search_runs([exp_id], f"tags.`seqface.run` = '{quoted}'",
                                        max_results=1)
        if found:
            self.run_id = found[0].info.run_id
        else:
            self.run_id = self.client.create_run(
                exp_id, run_name=name, tags={"seqface.run": run_tag}).info.run_id
            self._params(params)

    def _params(self, params: dict) -> None:
        from mlflow.entities import Param

        items = [Param(k, v[:6000]) for k, v in sorted(params.items())]
        for i in range(0, len(items), 100):  # MLflow's batch limit
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def write(self, step: int, values: dict[str, float], wall: float) -> None:
        from mlflow.entities import Metric

        ms = [Metric(k, v, int(wall * 1000), step) for k, v in values.items()]
        for i in range(0, len(ms), 1000):
            self.client.log_batch(self.run_id, metrics=ms[i:i + 1000])

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class Tracker:
    """Rank 0's tracking writers behind one queue and one background thread."""

    def __init__(self, cfg: Config, fs: pafs.FileSystem, run_path: str, attempt: str,
                 resumed_step: int = 0):
        t = cfg.tracking
        self.fs = fs
        self.remote = posixpath.join(run_path, TENSORBOARD_DIR)
        self._upload = not isinstance(fs, pafs.LocalFileSystem)
        if self._upload:
            self._tmp = tempfile.TemporaryDirectory(prefix="seqface-tensorboard-")
            self.local = Path(self._tmp.name)
        else:
            self.local = Path(self.remote)
        self._sinks: list[Any] = []
        self._errors: dict[str, str] = {}
        purge = resumed_step + 1 if resumed_step > 0 else None
        # Opened on the thread too: an MLflow server that does not answer delays only it.
        self._makers: list[tuple[str, Any]] = []
        if t.tensorboard:
            self._makers.append(("tensorboard",
                                 lambda: _TensorBoard(self.local, attempt, purge)))
        if t.mlflow_uri:
            self._makers.append(("mlflow", lambda: _MLflow(
                t.mlflow_uri, t.mlflow_experiment, run_path, cfg.train.run_name,
                flatten(cfg.to_dict()))))
        self._q: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="seqface-tracking",
                                        daemon=True)
        self._thread.start()

    @property
    def errors(self) -> dict[str, str]:
        """Writers that failed (name -> error); they were skipped from then on."""
        return dict(self._errors)

    def _open(self, name: str, make) -> None:
        try:
            sink = make()
        except Exception as e:  # tracking never stops the run
            self._fail(name, e)
        else:
            self._sinks.append((name, sink))

    def _fail(self, name: str, e: BaseException) -> None:
        if name not in self._errors:
            self._errors[name] = repr(e)
            log.warning("[seqface] tracking: %s failed, skipped from now on: %s", name, e)

    def log(self, report: dict) -> None:
        """Queue one logged step (returns at once)."""
        if self._makers and "step" in report:
            self._q.put(("log", int(report["step"]), scalars(report), time.time()))

    def flush(self, timeout: float = 60.0) -> None:
        """Wait until everything queued is written, then upload (``s3://`` storage)."""
        done = threading.Event()
        self._q.put(("flush", done))
        if not done.wait(timeout):
            log.warning("[seqface] tracking: flush still waiting after %.0f s", timeout)

    def close(self) -> None:
        self.flush()
        self._q.put(("close",))
        self._thread.join(timeout=60)

    def _each(self, what: str, *args) -> None:
        for name, sink in list(self._sinks):
            if name in self._errors:
                continue
            try:
                getattr(sink, what)(*args)
            except Exception as e:
                self._fail(name, e)

    def _run(self) -> None:
        for name, make in self._makers:
            self._open(name, make)
        while True:
            item = self._q.get()
            if item[0] == "log":
                _, step, values, wall = item
                self._each("write", step, values, wall)
            elif item[0] == "flush":
                self._each("flush")
                self._sync()
                item[1].set()
            else:
                self._each("close")
                self._sync()
                return

    def _sync(self) -> None:
        """Upload every event file whole (object stores cannot append)."""
        if not self._upload or "upload" in self._errors:
            return
        try:
            for f in sorted(self.local.iterdir()):
                with self.fs.open_output_stream(posixpath.join(self.remote, f.name)) as out:
                    out.write(f.read_bytes())
        except Exception as e:
            self._fail("upload", e)


# ---------------------------------------------------------------------------------------
# Reading event files back (tests, scripts) without TensorBoard installed.


def read_event_file(path: str | os.PathLike) -> list:
    """Every ``Event`` of one TFRecord event file (lengths and CRCs not checked)."""
    from tensorboardX.proto.event_pb2 import Event

    data = Path(path).read_bytes()
    events, pos = [], 0
    while pos + 12 <= len(data):
        (n,) = struct.unpack("<Q", data[pos:pos + 8])
        body = data[pos + 12:pos + 12 + n]
        if len(body) < n:
            break  # a record still being written
        ev = Event()
        ev.ParseFromString(body)
        events.append(ev)
        pos += 12 + n + 4
    return events


def read_scalars(folder: str | os.PathLike) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value), ...] over every event file in ``folder`` (file order)."""
    out: dict[str, list[tuple[int, float]]] = {}
    for f in sorted(Path(folder).glob("events.out.tfevents.*")):
        for ev in read_event_file(f):
            for v in ev.summary.value:
                out.setdefault(v.tag, []).append((int(ev.step), float(v.simple_value)))
    return out
