"""A real Prometheus server scrapes a real 2-worker training run (local Ray, DeepSpeed, gloo).

Prometheus (Debian's package) runs on loopback with cluster/prometheus.yml, changed only to
a 1 s scrape interval and the run's discovery folder. Nothing is registered by hand: the
driver's registrar writes ``<sd_dir>/<run>.json`` and each worker adds its own endpoint, as
on a cluster. The identity shards carry one corrupt JPEG each, so every shard a worker
opens adds one ``bad_jpeg`` sample that the run must skip, count and export.

One run serves both tests (a module fixture): while it trains, a poller thread asks
Prometheus's HTTP API whether both targets are ``up`` and which step each rank is at; after
it, range queries read back every sample Prometheus scraped during the run (instant
queries would see nothing: a target that goes away gets staleness markers).
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from prom_util import start_prometheus
from promql_util import dashboard_queries, metric_names_in_promql
from train_util import train_cfg

from seqface_dist.config import config_from_dict
from seqface_dist.data.mnist import write_mnist_shards
from seqface_dist.metrics import CUDA_ONLY_METRIC_NAMES, LOSS_TERMS, sd_path
from seqface_dist.train.driver import local_ray, run
from seqface_dist.train.history import history_path

ROOT = Path(__file__).resolve().parents[1]
RUN = "obs"
STEPS = 360  # ~2x the ~10 s Prometheus takes to discover and first scrape both workers here
EVAL_EVERY = 120
READY_S = 60.0  # Prometheus up and answering

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]  # starts Ray: the slow tier


def query(base: str, q: str, at: float | None = None) -> list[dict]:
    """An instant query (at a unix time, default now); returns the result list."""
    params = {"query": q} | ({"time": f"{at:.3f}"} if at is not None else {})
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode(params)
    with urllib.request.urlopen(url, timeout=5) as r:
        body = json.load(r)
    assert body["status"] == "success", body
    return body["data"]["result"]


def series(base: str, selector: str, window: str = "10m") -> dict[tuple, list[float]]:
    """Every sample of ``selector`` scraped in the last ``window``, keyed by (rank, extra
    label value) -- the extra label being term, reason, ... ("" when there is none)."""
    out = {}
    for r in query(base, f"{selector}[{window}]"):
        m = r["metric"]
        extra = [v for k, v in m.items() if k not in _COMMON]
        assert len(extra) <= 1, m
        out[(m["rank"], extra[0] if extra else "")] = [float(v) for _, v in r["values"]]
    return out


_COMMON = ("__name__", "instance", "job", "run", "rank", "node")


def corrupt_first_jpeg(tar: Path) -> None:
    """Break the start-of-image marker of the tar's first JPEG; same size, tar still valid."""
    data = bytearray(tar.read_bytes())
    pos = data.find(b"\xff\xd8\xff")
    assert pos > 0, f"{tar}: no JPEG inside"
    data[pos:pos + 2] = b"NO"
    tar.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    write_mnist_shards(out, per_identity=120, shard_size=100)
    tars = sorted((out / "ids").glob("*.tar"))
    assert len(tars) == 6
    for t in tars:  # every identity shard a worker opens holds one bad sample
        corrupt_first_jpeg(t)
    return out


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    """A small verification set of MNIST test digits (same digit = genuine pair)."""
    from seqface_dist.data.images import encode_jpeg
    from seqface_dist.data.mnist import load_mnist
    from seqface_dist.eval.pairs import write_bin

    x, y = load_mnist()["test"]
    rng = np.random.default_rng(1)
    by_digit = [np.nonzero(y == d)[0] for d in range(10)]
    images, issame = [], []
    for k in range(200):
        a = int(rng.integers(10))
        b = a if k % 2 == 0 else int((a + rng.integers(1, 10)) % 10)
        images += [encode_jpeg(x[rng.choice(by_digit[a])]),
                   encode_jpeg(x[rng.choice(by_digit[b])])]
        issame.append(k % 2 == 0)
    path = tmp_path_factory.mktemp("pairs") / "mnist-pairs.bin"
    write_bin(path, images, issame)
    return path


@dataclass
class Seen:
    """What the poller saw while the run trained."""

    up: dict[str, float] = field(default_factory=dict)  # rank -> up, first time both seen
    last_up: float | None = None  # latest unix time both targets were up
    steps: dict[str, set] = field(default_factory=dict)  # rank -> global steps seen
    sd_groups: list = field(default_factory=list)  # discovery file contents
    errors: list = field(default_factory=list)


def poll(base: str, sd_file: Path, seen: Seen, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            if not seen.sd_groups and sd_file.exists():
                groups = json.loads(sd_file.read_text())
                if len(groups) == 2:
                    seen.sd_groups = groups
            up = {r["metric"]["rank"]: float(r["value"][1])
                  for r in query(base, f'up{{job="seqface",run="{RUN}"}}')}
            if len(up) == 2 and all(v == 1.0 for v in up.values()):
                seen.up = seen.up or up
                seen.last_up = time.time()
            for r in query(base, f'seqface_global_step{{run="{RUN}"}}'):
                seen.steps.setdefault(r["metric"]["rank"], set()).add(float(r["value"][1]))
        except Exception as e:  # noqa: BLE001 - recorded; the test reports it if it matters
            seen.errors.append(repr(e))
        stop.wait(0.5)


@dataclass
class Observed:
    base: str
    seen: Seen
    history: list[dict]
    log: Path


@pytest.fixture(scope="module")
def observed(shards, pairs, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("obs")
    sd_dir = tmp / "sd"
    sd_dir.mkdir()
    cfg = config_from_dict(train_cfg(
        shards, tmp / "runs", RUN, data__shuffle_buffer=50, optim__max_steps=STEPS,
        optim__milestones=[10_000], train__log_every=10, train__checkpoint_every=10_000,
        metrics__enabled=True, metrics__service_discovery_dir=str(sd_dir),
        # Rank 0 evaluates during the run, so the dashboard's evaluation panels get data.
        eval__pairs=str(pairs), eval__every_steps=EVAL_EVERY, eval__flip_test=False))
    proc, base, log = start_prometheus(tmp, sd_dir, READY_S)
    seen, stop = Seen(), threading.Event()
    poller = threading.Thread(target=poll, args=(base, sd_path(sd_dir, RUN), seen, stop),
                              daemon=True)
    try:
        # Our own cluster: other Ray clusters on the machine must not answer for it.
        with local_ray(num_cpus=2, env_vars={"DS_ACCELERATOR": "cpu"},
                       object_store_memory=256 << 20):
            try:
                poller.start()
                t0 = time.monotonic()
                run(cfg)  # raises if a worker failed: the corrupt samples must not crash it
                print(f"run of {STEPS} steps: {time.monotonic() - t0:.0f} s")
                stop.set()
                poller.join(timeout=10)
                history = [json.loads(x) for x in history_path(cfg).read_text().splitlines()]
                yield Observed(base, seen, history, log)
            finally:
                stop.set()
    finally:  # whatever happened above, no Prometheus outlives the tests
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_prometheus_scrapes_both_workers_of_a_real_run(observed):
    seen, base = observed.seen, observed.base
    assert observed.history[-1]["step"] == STEPS
    # Discovery: the driver's file listed both ranks on loopback, Prometheus found them.
    assert sorted(g["labels"]["rank"] for g in seen.sd_groups) == ["0", "1"], seen
    assert all(t.startswith("127.0.0.1:") for g in seen.sd_groups for t in g["targets"])
    assert seen.up == {"0": 1.0, "1": 1.0}, (seen, observed.log.read_text()[-3000:])
    # Training progressed between scrapes while the poller watched.
    assert set(seen.steps) == {"0", "1"} and all(len(s) >= 2 for s in seen.steps.values()), seen

    # Every loss term of both ranks was scraped, and each moved during the run.
    loss = series(base, f'seqface_loss{{run="{RUN}"}}')
    for term in LOSS_TERMS:
        for rank in ("0", "1"):
            values = loss.get((rank, term))
            assert values, f"no {term} loss scraped for rank {rank}: {sorted(loss)}"
            assert len(set(values)) >= 2, f"{term} loss of rank {rank} never moved: {values}"
    print("scraped total loss, first -> last:", {k[0]: (round(v[0], 3), round(v[-1], 3), len(v))
          for k, v in loss.items() if k[1] == "total"})
    # Throughput of both ranks: positive, and it changed from scrape to scrape.
    tput = series(base, f'seqface_throughput_samples_per_second{{run="{RUN}"}}')
    assert set(tput) == {("0", ""), ("1", "")}, tput
    print("scraped samples/s, min..max:", {k[0]: (round(min(v)), round(max(v))) for k, v in
                                           tput.items()})
    for key, values in tput.items():
        assert max(values) > 0 and len(set(values)) >= 2, (key, values)
    # The steps counters rose from scrape to scrape, never past the run's length.
    steps = series(base, f'seqface_steps_total{{run="{RUN}"}}')
    assert set(steps) == {("0", ""), ("1", "")}, steps
    for key, values in steps.items():
        assert values[0] < values[-1] <= STEPS, (key, values)
    # Every series carries the node it ran on (one machine here: the same for both ranks).
    nodes = {r["metric"]["node"] for r in query(base, f'seqface_world_size{{run="{RUN}"}}[10m]')}
    assert len(nodes) == 1 and "" not in nodes, nodes


def test_corrupt_shards_raise_the_bad_sample_counter_and_the_run_survives(observed):
    base = observed.base
    assert observed.history[-1]["step"] == STEPS  # skipped, not fatal
    bad = series(base, f'seqface_bad_samples_total{{run="{RUN}"}}')
    # Only the damage put in, on both ranks; it rose as more corrupt shards were opened.
    assert set(bad) == {("0", "bad_jpeg"), ("1", "bad_jpeg")}, bad
    opened = series(base, f'seqface_shards_opened_total{{run="{RUN}"}}')
    print("bad_jpeg first -> last:", {k[0]: (v[0], v[-1]) for k, v in bad.items()},
          "shards opened:", {k[0]: v[-1] for k, v in opened.items()})
    for (rank, _), values in bad.items():
        assert 0 < values[0] < values[-1], (rank, values)
        # One corrupt JPEG per identity shard: never more bad samples than shards opened.
        assert values[-1] <= opened[(rank, "")][-1], (rank, values, opened)


def test_every_dashboard_panel_shows_data_from_the_real_run(observed):
    """The Grafana dashboard's queries, as Grafana sends them ($run = this run, all ranks),
    at the last moment both workers were up: each returns data, except GPU memory here."""
    seen, base = observed.seen, observed.base
    assert seen.last_up is not None, seen
    dash = json.loads((ROOT / "cluster" / "grafana-dashboard.json").read_text())
    queries = list(dashboard_queries(dash))
    empty, checked = [], 0
    for title, expr in queries:
        if metric_names_in_promql(expr) <= CUDA_ONLY_METRIC_NAMES:
            continue  # no CUDA on this machine
        q = expr.replace("$run", RUN).replace("$rank", ".*")
        assert "$" not in q, f"panel {title!r}: unknown dashboard variable in {expr}"
        checked += 1
        if not query(base, q, at=seen.last_up):
            empty.append((title, q))
    assert checked >= 15 and not empty, f"panels without data: {empty}"
    up = query(base, f'sum(up{{job="seqface",run=~"{RUN}"}})', at=seen.last_up)
    assert float(up[0]["value"][1]) == 2.0  # the "Workers up" stat
    acc = query(base, f'seqface_eval_accuracy_ratio{{run="{RUN}"}}', at=seen.last_up)
    assert [r["metric"]["rank"] for r in acc] == ["0"]  # rank 0 evaluates
    assert 0.0 <= float(acc[0]["value"][1]) <= 1.0
