"""A real Prometheus server discovers two live WorkerMetrics endpoints and scrapes them.

Prometheus (Debian's package) runs on loopback with cluster/prometheus.yml, changed only
to a 1 s scrape interval and a temporary discovery folder. The endpoints are registered
*after* Prometheus started, as on a cluster, so the file_sd watch is exercised too.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from prom_util import start_prometheus
from promql_util import dashboard_queries, metric_names_in_promql

from seqface_dist.metrics import (
    CUDA_ONLY_METRIC_NAMES,
    ServiceDiscoveryFile,
    WorkerMetrics,
    sd_path,
    target_address,
)

ROOT = Path(__file__).resolve().parents[1]
DEADLINE_S = 40.0



def query(base: str, q: str) -> list[dict]:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": q})
    with urllib.request.urlopen(url, timeout=5) as r:
        body = json.load(r)
    assert body["status"] == "success", body
    return body["data"]["result"]


def wait_for(what: str, fn, deadline: float, proc: subprocess.Popen, log: Path):
    """Poll fn() until it returns something truthy; fail with Prometheus' log otherwise."""
    last = None
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"prometheus exited:\n{log.read_text()[-3000:]}"
        try:
            last = fn()
            if last:
                return last
        except OSError as e:  # not listening yet
            last = e
        time.sleep(0.3)
    pytest.fail(f"timed out waiting for {what} (last: {last!r})\n{log.read_text()[-3000:]}")


def by_rank(result: list[dict]) -> dict[str, float]:
    return {r["metric"]["rank"]: float(r["value"][1]) for r in result}


@pytest.mark.slow  # a real Prometheus server scraping two worker processes
def test_prometheus_scrapes_both_workers_and_sees_values_move(tmp_path):
    deadline = time.monotonic() + DEADLINE_S
    sd_dir = tmp_path / "sd"
    sd_dir.mkdir()

    workers = [WorkerMetrics("itest", r, node="localnode", world_size=2) for r in (0, 1)]
    stop = threading.Event()

    def train_loop():  # stands in for two trainers: values change every step
        step = 0
        while not stop.is_set():
            step += 1
            for w in workers:
                loss = 10.0 / (1 + 0.01 * step) + w.rank
                w.observe_step({"data_wait": 0.001, "forward": 0.01, "backward": 0.02,
                                "communication": 0.003, "optimizer": 0.002},
                               {"chief": loss, "lsr": loss / 2, "dsa_pull": 0.3,
                                "dsa_push": 0.2, "total": loss + 0.02},
                               samples=64, lr=0.1, lam=5.0, active_hinge_fraction=0.5,
                               step=step)
                w.update_data_counters({"shard_bytes": 1000 * step, "shard_samples": 64 * step,
                                        "shards_opened": 1 + step // 50,
                                        "s3_retries": step // 20})
            time.sleep(0.05)

    proc, base, log = start_prometheus(tmp_path, sd_dir)
    loop = threading.Thread(target=train_loop)
    try:
        for w in workers:
            w.set_head_rows(classifier=50, identity_centers=50, sequence_centers=200)
            w.add_bad_samples("corrupt_jpeg", 1 + w.rank)
            w.set_eval("lfw", step=0, accuracy=0.9, tar_at_far={1e-3: 0.8})
            w.start("127.0.0.1", 0)
        loop.start()
        # Workers register only now: Prometheus must notice the file appear.
        sd = ServiceDiscoveryFile(sd_path(sd_dir, "itest"))
        for w in workers:
            sd.register(f"rank{w.rank:05d}", target_address("127.0.0.1", w.port),
                        {"run": "itest", "rank": str(w.rank), "node": w.node})

        up = wait_for("both targets up", lambda: (
            lambda r: r if len(r) == 2 and all(v == 1.0 for v in r.values()) else None)(
            by_rank(query(base, 'up{job="seqface",run="itest"}'))), deadline, proc, log)
        assert set(up) == {"0", "1"}

        def both(q):
            r = by_rank(query(base, q))
            return r if set(r) == {"0", "1"} else None

        first_steps = wait_for("steps of both ranks", lambda: both(
            'seqface_steps_total{run="itest"}'), deadline, proc, log)
        first_loss = wait_for("total loss of both ranks", lambda: both(
            'seqface_loss{run="itest",term="total"}'), deadline, proc, log)
        # A later scrape: counters rose and losses moved on both ranks.
        later = wait_for("new scrapes", lambda: (
            lambda s: s if s and all(s[r] > first_steps[r] for r in s) else None)(
            both('seqface_steps_total{run="itest"}')), deadline, proc, log)
        assert set(later) == {"0", "1"}
        moved = wait_for("loss values moving", lambda: (
            lambda s: s if s and all(s[r] != first_loss[r] for r in s) else None)(
            both('seqface_loss{run="itest",term="total"}')), deadline, proc, log)
        assert moved["1"] > moved["0"]  # rank 1's loss is offset by 1 in the loop above
        tput = wait_for("throughput of both ranks", lambda: (
            lambda s: s if s and all(v > 0 for v in s.values()) else None)(
            both('seqface_throughput_samples_per_second{run="itest"}')), deadline, proc, log)
        assert set(tput) == {"0", "1"}
        rate = wait_for("rate over samples counter", lambda: query(
            base, 'sum(rate(seqface_samples_total{run="itest"}[5s]))'), deadline, proc, log)
        assert float(rate[0]["value"][1]) > 0
        bad = by_rank(query(base, 'seqface_bad_samples_total{reason="corrupt_jpeg"}'))
        assert bad == {"0": 1.0, "1": 2.0}

        # Every metric the dashboard reads is in this real scrape (GPU ones need CUDA).
        with urllib.request.urlopen(f"{base}/api/v1/label/__name__/values", timeout=5) as r:
            present = set(json.load(r)["data"])
        dash = json.loads((ROOT / "cluster" / "grafana-dashboard.json").read_text())
        wanted = set().union(*(metric_names_in_promql(e) for _, e in dashboard_queries(dash)))
        missing = wanted - CUDA_ONLY_METRIC_NAMES - present
        assert not missing, f"dashboard metrics absent from the scrape: {sorted(missing)}"
    finally:
        stop.set()
        if loop.is_alive():
            loop.join()
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        for w in workers:
            w.stop()
