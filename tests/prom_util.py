"""A real Prometheus server for the tests, on loopback, scraping a file_sd folder."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def require(tool: str) -> str:
    """The path of a Debian-packaged tool the tests need; a clear failure if missing.

    scripts/test.sh installs it, so a missing tool is a broken setup, not a reason to skip.
    """
    path = shutil.which(tool)
    if path is None:
        pytest.fail(f"{tool} not installed: run scripts/test.sh, or apt-get install -y "
                    "--no-install-recommends prometheus")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_prometheus(tmp: Path, sd_dir: Path,
                     ready_s: float = 60.0) -> tuple[subprocess.Popen, str, Path]:
    """cluster/prometheus.yml with a 1 s interval, its seqface job reading ``sd_dir``."""
    binary = require("prometheus")
    cfg = yaml.safe_load((ROOT / "cluster" / "prometheus.yml").read_text())
    cfg["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    cfg["scrape_configs"] = [j for j in cfg["scrape_configs"] if j["job_name"] == "seqface"]
    cfg["scrape_configs"][0]["file_sd_configs"][0]["files"] = [str(sd_dir / "*.json")]
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(cfg))
    port = free_port()
    log = tmp / "prometheus.log"
    with open(log, "w") as logf:
        proc = subprocess.Popen(
            [binary, f"--config.file={tmp / 'prometheus.yml'}",
             f"--web.listen-address=127.0.0.1:{port}", f"--storage.tsdb.path={tmp / 'tsdb'}"],
            stdout=logf, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + ready_s
    while True:
        if proc.poll() is not None:
            pytest.fail(f"prometheus exited:\n{log.read_text()[-3000:]}")
        try:
            if urllib.request.urlopen(f"{base}/-/ready", timeout=2).status == 200:
                return proc, base, log
        except OSError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"prometheus not ready in {ready_s} s:\n{log.read_text()[-3000:]}")
        time.sleep(0.3)
