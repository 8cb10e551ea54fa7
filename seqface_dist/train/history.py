"""A run's history: ``<storage>/<run>/history.jsonl``, one JSON object a line, rank 0's.

Every logged step is a line, and so is every event (a resume). Each line names the
``attempt`` that wrote it (the worker group's token, also in its checkpoints' folder
names), so after a restart the steps between the checkpoint and the failure, logged
twice, can be told apart: the later attempt's lines are the ones that count
(:func:`latest_attempt_rows`). On local storage lines are appended in place; on any other
storage (``s3://``) rank 0 appends to a local copy, seeded from the stored file when it
resumes, and uploads it whole at every checkpoint and at the end (object stores cannot
append).
"""

from __future__ import annotations

import json
import posixpath
import tempfile
from pathlib import Path

import pyarrow.fs as pafs

from seqface_dist.config import Config

HISTORY_FILE = "history.jsonl"


def history_path(cfg: Config) -> Path | None:
    """The history file of a run on local storage (None for ``s3://`` storage)."""
    if "://" in cfg.train.storage_path:
        return None
    return Path(cfg.train.storage_path).expanduser().resolve() / cfg.train.run_name / \
        HISTORY_FILE


class History:
    """Rank 0's writer of the run's history on the storage's filesystem."""

    def __init__(self, fs: pafs.FileSystem, run_path: str, attempt: str):
        self.fs, self.attempt = fs, attempt
        self.remote = posixpath.join(run_path, HISTORY_FILE)
        if isinstance(fs, pafs.LocalFileSystem):
            self.local = Path(self.remote)
            self.local.parent.mkdir(parents=True, exist_ok=True)
            self._upload = False
        else:
            self._dir = tempfile.TemporaryDirectory(prefix="seqface-history-")
            self.local = Path(self._dir.name) / HISTORY_FILE
            self._upload = True
            try:  # a resumed run continues the stored history
                with fs.open_input_stream(self.remote) as f:
                    self.local.write_bytes(f.read())
            except (FileNotFoundError, OSError):
                self.local.touch()

    def append(self, record: dict) -> None:
        with open(self.local, "a") as f:
            f.write(json.dumps({**record, "attempt": self.attempt}) + "\n")

    def sync(self) -> None:
        """Put the whole history into the storage (a no-op on local storage)."""
        if self._upload:
            with self.fs.open_output_stream(self.remote) as out:
                out.write(self.local.read_bytes())


def read_history(uri: str) -> list[dict]:
    """The lines of a run's history: a run folder or a history file, local or ``s3://``."""
    fs, path = (pafs.LocalFileSystem(), uri) if "://" not in uri else \
        pafs.FileSystem.from_uri(uri)
    if not path.endswith(".jsonl"):
        path = posixpath.join(path, HISTORY_FILE)
    try:
        with fs.open_input_stream(path) as f:
            text = f.read().decode()
    except (FileNotFoundError, OSError) as e:
        raise FileNotFoundError(f"{uri}: no {HISTORY_FILE} ({e})") from None
    rows = []
    for i, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except ValueError:
                raise ValueError(f"{path}:{i}: not a JSON line") from None
    return rows


def latest_attempt_rows(rows: list[dict]) -> list[dict]:
    """The logged steps as the run went on: where an attempt resumed from a checkpoint at
    step s, the earlier attempts' lines after s are dropped (that work was redone)."""
    kept: list[dict] = []
    for r in rows:
        if r.get("event") == "resumed":
            kept = [k for k in kept if k.get("step", 0) <= r["step"]]
        elif "step" in r and "event" not in r:
            kept.append(r)
    return kept
