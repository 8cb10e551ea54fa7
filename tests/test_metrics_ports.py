"""Fixed metrics ports (metrics.port > 0): the worker of local rank k binds port + k, so the
workers of one node never collide and a PodMonitor can target them (real HTTP, real binds)."""

from __future__ import annotations

import socket
import threading
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
from prometheus_client.parser import text_string_to_metric_families

from seqface_dist.config import Config, ConfigError, MetricsConfig, load_config
from seqface_dist.metrics import start_worker_metrics
from seqface_dist.metrics.worker import NullMetrics, WorkerMetrics, endpoint_port

ROOT = Path(__file__).resolve().parents[1]


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return r.read().decode()


def ranks_in(text: str) -> set[str]:
    return {s.labels["rank"] for fam in text_string_to_metric_families(text)
            for s in fam.samples if "rank" in s.labels}


def free_port_run(n: int, tries: int = 50) -> int:
    """A base port P with P .. P+n-1 all free on 127.0.0.1 right now."""
    for _ in range(tries):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + n - 1 > 65535:
            continue
        socks = []
        try:
            for k in range(n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", base + k))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    pytest.fail(f"no run of {n} free ports on 127.0.0.1 in {tries} tries: the machine's "
                "loopback ports are exhausted")


def test_endpoint_port_is_base_plus_local_rank_or_any_free_port():
    assert endpoint_port(0, 0) == endpoint_port(0, 5) == 0  # the OS picks, as before
    assert [endpoint_port(9100, k) for k in range(8)] == list(range(9100, 9108))
    assert endpoint_port(65535, 0) == 65535
    with pytest.raises(ValueError, match="metrics.port 65530 \\+ local rank 6 = 65536"):
        endpoint_port(65530, 6)
    with pytest.raises(ValueError, match="must be >= 0"):
        endpoint_port(9100, -1)


def test_two_local_ranks_with_one_base_port_bind_p_and_p_plus_1_and_serve():
    base = free_port_run(2)
    a, b = WorkerMetrics("run", 0, node="n"), WorkerMetrics("run", 1, node="n")
    try:
        assert a.start("127.0.0.1", base, local_rank=0) == base
        assert b.start("127.0.0.1", base, local_rank=1) == base + 1
        assert (a.port, b.port) == (base, base + 1)
        ta, tb = scrape(base), scrape(base + 1)
        assert "seqface_steps_total" in ta and "seqface_steps_total" in tb
        assert ranks_in(ta) == {"0"} and ranks_in(tb) == {"1"}
        # A third worker given local rank 1 again (a wrong rank) is refused, named.
        c = WorkerMetrics("run", 2, node="n")
        with pytest.raises(OSError, match=f"cannot bind 127.0.0.1:{base + 1} "
                                          f"\\(metrics.port {base} \\+ local rank 1\\)"):
            c.start("127.0.0.1", base, local_rank=1)
        assert c.port is None
    finally:
        a.stop()
        b.stop()
    with pytest.raises(OSError):
        scrape(base)
    assert NullMetrics().start("127.0.0.1", base, local_rank=1) is None


def test_start_metrics_in_the_train_worker_uses_the_ray_local_rank(monkeypatch):
    """train/worker.py's _start_metrics: base port from the config + Ray's local rank."""
    import ray.train
    import ray.util

    from seqface_dist.train import worker as train_worker

    base = free_port_run(4)
    monkeypatch.setattr(ray.util, "get_node_ip_address", lambda: "127.0.0.1")
    cfg = Config()
    cfg.metrics = MetricsConfig(host="127.0.0.1", port=base)
    head = SimpleNamespace(weight=SimpleNamespace(shape=(5, 4)), id_rows=(0, 3),
                           seq_rows=(3, 5))
    started = []
    try:
        for rank, local_rank in ((4, 3), (5, 1)):  # ranks on a second node
            ctx = SimpleNamespace(get_local_rank=lambda lr=local_rank: lr)
            monkeypatch.setattr(ray.train, "get_context", lambda ctx=ctx: ctx)
            w = SimpleNamespace(cfg=cfg, rank=rank, world=8,
                                trainer=SimpleNamespace(head=head))
            m = train_worker._start_metrics(w)
            started.append(m)
            assert m.port == base + local_rank
            assert ranks_in(scrape(m.port)) == {str(rank)}
        assert cfg.metrics.port == base  # the config itself is left as it was
    finally:
        for m in started:
            m.stop()


def test_port_zero_still_gives_any_free_port_through_start_worker_metrics():
    m, target = start_worker_metrics(MetricsConfig(port=0), "r", 0)
    try:
        assert m.port > 0 and target == f"127.0.0.1:{m.port}"
    finally:
        m.stop()
    # The config keeps its stated range (the base itself).
    with pytest.raises(ConfigError, match="metrics.port"):
        MetricsConfig(port=-1).validate("metrics")


def test_cluster_config_sets_a_base_port_its_workers_per_node_fit_under():
    cfg = load_config(ROOT / "configs" / "cluster-8gpu.yaml")
    assert cfg.metrics.port > 1024 and cfg.metrics.host == "0.0.0.0"
    # Local ranks run up to the workers per node (at most train.num_workers).
    assert endpoint_port(cfg.metrics.port, cfg.train.num_workers - 1) <= 65535


@pytest.mark.slow  # starts Ray and trains 2 workers (~40 s): the slow tier
@pytest.mark.timeout(420)
def test_a_real_two_worker_run_on_one_node_serves_on_base_and_base_plus_one(shards, tmp_path):
    """Ray's local ranks 0 and 1 on this one node: the discovery file lists P and P+1, and
    both answer while the run trains."""
    from train_util import train_cfg

    from seqface_dist.config import config_from_dict
    from seqface_dist.metrics import read_sd_file, sd_path
    from seqface_dist.train.driver import local_ray, run

    base = free_port_run(2)
    sd_dir = tmp_path / "sd"
    sd_dir.mkdir()
    cfg = config_from_dict(train_cfg(
        shards, tmp_path / "runs", "ports", data__shuffle_buffer=50, optim__max_steps=150,
        optim__milestones=[10_000], train__log_every=10, train__checkpoint_every=10_000,
        metrics__enabled=True, metrics__port=base, metrics__service_discovery_dir=str(sd_dir)))
    seen: dict[str, str] = {}
    served: dict[str, set] = {}
    stop = threading.Event()

    def watch() -> None:
        path = sd_path(sd_dir, "ports")
        while not stop.is_set():
            try:
                for g in read_sd_file(path):
                    (target,) = g["targets"]
                    seen[g["labels"]["rank"]] = target
                    served.setdefault(target, set()).update(
                        ranks_in(scrape(int(target.rsplit(":", 1)[1]))))
            except (ValueError, OSError):
                pass  # not written yet, or the run just ended
            stop.wait(0.3)

    watcher = threading.Thread(target=watch, daemon=True)
    with local_ray(num_cpus=2, env_vars={"DS_ACCELERATOR": "cpu"},
                   object_store_memory=256 << 20):
        watcher.start()
        t0 = time.monotonic()
        try:
            run(cfg)
        finally:
            stop.set()
            watcher.join(timeout=10)
    print(f"run: {time.monotonic() - t0:.0f} s; discovery {seen}; served {served}")
    assert sorted(seen.values()) == [f"127.0.0.1:{base}", f"127.0.0.1:{base + 1}"], seen
    # Each port served its own rank's metrics (which rank got local rank 0 is Ray's choice).
    assert served == {t: {k} for k, t in seen.items()}, served


def test_a_base_port_whose_last_worker_would_pass_65535_is_refused_up_front():
    cfg = load_config(ROOT / "configs" / "cluster-8gpu.yaml")
    n = cfg.train.num_workers
    load_config(ROOT / "configs" / "cluster-8gpu.yaml", [f"metrics.port={65536 - n}"])
    with pytest.raises(ConfigError, match=f"metrics.port: {65537 - n} \\+ up to {n} workers"):
        load_config(ROOT / "configs" / "cluster-8gpu.yaml", [f"metrics.port={65537 - n}"])
