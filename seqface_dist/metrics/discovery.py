"""Prometheus file-based service discovery: one JSON file per run, written atomically.

Prometheus watches ``file_sd_configs`` files (here a glob, ``<dir>/*.json``) and re-reads
one whenever it changes, so workers that appear, restart on another port or go away are
picked up without a restart or hand-editing. The file has Prometheus' file_sd shape::

    [{"targets": ["10.0.0.5:40211"], "labels": {"run": "exp1", "rank": "0", "node": "..."}}]

One entry per rank: a rank that re-registers (a restarted worker) replaces its old entry.
Each write goes to a hidden temporary file in the same folder and is renamed over the old
one, so Prometheus never reads half a file and the glob never matches the temporary.
"""

from __future__ import annotations

import json
import os
import re
import socket
import tempfile
import threading
from collections.abc import Mapping
from pathlib import Path

_LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
_WILDCARDS = ("", "0.0.0.0", "::", "[::]")


def check_target(target: str) -> str:
    """Return target if it is ``host:port`` (IPv6 hosts in brackets), else raise ValueError."""
    host, sep, port = target.rpartition(":")
    ok = bool(sep) and bool(host) and port.isdigit() and 0 < int(port) < 65536
    if not ok:
        raise ValueError(f"service discovery target {target!r}: expected host:port "
                         "with a port in 1..65535")
    return target


def target_address(bound_host: str, port: int, advertise_host: str = "") -> str:
    """The ``host:port`` Prometheus should scrape for an endpoint bound to bound_host.

    advertise_host wins when given; a wildcard bind (0.0.0.0, ::) otherwise advertises this
    machine's address (pass Ray's node IP as advertise_host on a cluster).
    """
    host = advertise_host or bound_host
    if host in _WILDCARDS:
        host = socket.gethostbyname(socket.gethostname())
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"  # IPv6 literal
    return check_target(f"{host}:{port}")


def sd_path(sd_dir: str | Path, run: str) -> Path:
    """Where the discovery file of ``run`` lives inside the watched folder."""
    return Path(sd_dir) / f"{run}.json"


class ServiceDiscoveryFile:
    """A file_sd JSON file holding one target group per key (e.g. per rank)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if self.path.suffix != ".json":
            raise ValueError(f"service discovery file {self.path}: must end in .json "
                             "(Prometheus reads file_sd files by extension)")
        self._groups: dict[str, dict] = {}
        self._lock = threading.Lock()

    def register(self, key: str, target: str, labels: Mapping[str, str] | None = None) -> None:
        """Add or replace the target group ``key`` and rewrite the file."""
        check_target(target)
        clean = {}
        for name, value in (labels or {}).items():
            if not _LABEL_NAME.match(name) or name.startswith("__"):
                raise ValueError(f"service discovery label {name!r} (key {key}): not a "
                                 "valid Prometheus label name")
            clean[name] = str(value)
        with self._lock:
            self._groups[key] = {"targets": [target], "labels": clean}
            self._write()

    def unregister(self, key: str) -> None:
        """Drop the group ``key`` (a finished worker) and rewrite the file."""
        with self._lock:
            if self._groups.pop(key, None) is not None:
                self._write()

    def groups(self) -> list[dict]:
        with self._lock:
            return [dict(g) for _, g in sorted(self._groups.items())]

    def remove(self) -> None:
        """Delete the file: the run is over and Prometheus should stop scraping it."""
        with self._lock:
            self._groups.clear()
            self.path.unlink(missing_ok=True)

    def _write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = json.dumps([g for _, g in sorted(self._groups.items())], indent=1)
        # Hidden name, no .json suffix: a *.json glob never sees the half-written file.
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.",
                                   suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)  # mkstemp makes 0600; Prometheus often runs as its own user
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def read_sd_file(path: str | Path) -> list[dict]:
    """Read and check a file_sd JSON file; raise ValueError naming the file and entry."""
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"service discovery file {p}: cannot read JSON: {e}") from None
    if not isinstance(data, list):
        raise ValueError(f"service discovery file {p}: top level must be a list")
    for i, group in enumerate(data):
        if not isinstance(group, dict) or set(group) - {"targets", "labels"}:
            raise ValueError(f"{p}[{i}]: must be an object with 'targets' and 'labels'")
        targets = group.get("targets")
        if not isinstance(targets, list) or not targets:
            raise ValueError(f"{p}[{i}].targets: must be a non-empty list")
        for t in targets:
            check_target(t)
        labels = group.get("labels", {})
        if not isinstance(labels, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
            raise ValueError(f"{p}[{i}].labels: must map strings to strings")
    return data
