"""Training throughput with the Prometheus metrics on vs off: what the metrics really cost.

    .venv/bin/python -m bench.bench_metrics_train [--steps 300] [--repeats 2]

Runs the same 2-worker local Ray training (tiny backbone on MNIST shards, DeepSpeed on
CPU, 16 identities + 16 sequences per rank and step) ``--repeats`` times with
``metrics.enabled: false`` and as often with ``metrics.enabled: true`` plus a discovery
file, alternating off/on so that drifting load on the machine hits both alike. While a
metrics run trains, a thread scrapes every worker endpoint listed in the discovery file
every ``--scrape-interval`` seconds (default 1 s: 5x the cluster config's rate), as
Prometheus would.

Throughput is rank 0's ``samples_per_second`` from ``history.jsonl`` (global samples per
wall second over each ``log_every`` window), combined as total samples / total time
(harmonic mean) over the windows after the first ``--warmup-windows``. Prints each run,
the mean per setting and the ratio on/off. Figures, not asserts; the last line of stdout is
one JSON object holding them.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from seqface_dist.config import load_named
from seqface_dist.data.mnist import write_mnist_shards
from seqface_dist.metrics import sd_path
from seqface_dist.train.driver import local_ray, run
from seqface_dist.train.history import history_path

LOG_EVERY = 10


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_shards(out: Path) -> None:
    write_mnist_shards(out)


def make_cfg(shards: Path, storage: Path, name: str, steps: int, metrics: bool, sd_dir: Path):
    """The tests' named base (configs/mnist-tiny.yaml) with this bench's run length."""
    return load_named("mnist-tiny", [
        f"data.identity_shards=[{shards / 'ids'}]", f"data.sequence_shards=[{shards / 'seqs'}]",
        f"optim.max_steps={steps}", "optim.milestones=[1000000]",
        f"train.run_name={name}", f"train.storage_path={storage}",
        f"train.log_every={LOG_EVERY}", "train.checkpoint_every=1000000",
        f"metrics.enabled={str(metrics).lower()}",
        f"metrics.service_discovery_dir={sd_dir if metrics else ''}"])


def scrape_loop(sd_file: Path, interval: float, stop: threading.Event, count: list) -> None:
    """GET /metrics of every target in the discovery file, as Prometheus would."""
    while not stop.wait(interval):
        try:
            groups = json.loads(sd_file.read_text())
        except (OSError, ValueError):
            continue  # not written yet, or already removed
        for g in groups:
            for t in g["targets"]:
                try:
                    urllib.request.urlopen(f"http://{t}/metrics", timeout=5).read()
                    count[0] += 1
                except OSError:
                    pass  # endpoint going away at the end of the run


def throughput(cfg, warmup: int) -> float:
    rows = [json.loads(x) for x in history_path(cfg).read_text().splitlines()]
    rates = [r["samples_per_second"] for r in rows[warmup:]]
    if not rates:
        raise SystemExit(f"run {cfg.train.run_name}: only {len(rows)} logged windows; "
                         "raise --steps or lower --warmup-windows")
    return len(rates) / sum(1.0 / r for r in rates)  # total samples / total time


def _load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=2, help="runs per setting")
    ap.add_argument("--scrape-interval", type=float, default=1.0)
    ap.add_argument("--warmup-windows", type=int, default=3,
                    help=f"first windows of {LOG_EVERY} steps left out")
    args = ap.parse_args()

    summary: dict = {"bench": "metrics_train", "args": vars(args), "runs": {}}
    with tempfile.TemporaryDirectory(prefix="bench-metrics-train-") as tmp:
        tmp = Path(tmp)
        build_shards(tmp / "shards")
        sd_dir = tmp / "sd"
        print("load average at start: " + _load(), flush=True)
        summary["load_start"] = list(os.getloadavg())
        results: dict[bool, list[float]] = {False: [], True: []}
        with local_ray(num_cpus=2, env_vars={"DS_ACCELERATOR": "cpu"},
                       object_store_memory=256 << 20):
            for i in range(args.repeats):
                for metrics in (False, True):
                    name = f"{'on' if metrics else 'off'}{i}"
                    cfg = make_cfg(tmp / "shards", tmp / "runs", name, args.steps, metrics,
                                   sd_dir)
                    stop, scrapes = threading.Event(), [0]
                    scraper = threading.Thread(target=scrape_loop, daemon=True, args=(
                        sd_path(sd_dir, name), args.scrape_interval, stop, scrapes))
                    if metrics:
                        scraper.start()
                    t0 = time.perf_counter()
                    try:
                        run(cfg)
                    finally:
                        stop.set()
                    rate = throughput(cfg, args.warmup_windows)
                    results[metrics].append(rate)
                    wall = time.perf_counter() - t0
                    print(f"run {name}: {rate:8.1f} samples/s (wall {wall:.0f} s"
                          + (f", {scrapes[0]} scrapes)" if metrics else ")"), flush=True)
                    summary["runs"][name] = {"metrics": metrics, "samples_per_s": rate,
                                             "wall_s": wall,
                                             **({"scrapes": scrapes[0]} if metrics else {})}
    print("load average at end: " + _load())
    summary["load_end"] = list(os.getloadavg())
    off, on = statistics.mean(results[False]), statistics.mean(results[True])
    print(f"metrics off: {off:8.1f} samples/s  (runs: "
          + ", ".join(f"{r:.1f}" for r in results[False]) + ")")
    print(f"metrics on:  {on:8.1f} samples/s  (runs: "
          + ", ".join(f"{r:.1f}" for r in results[True]) + ")")
    print(f"ratio on/off: {on / off:.3f}")
    summary.update(mean_samples_per_s={"metrics off": off, "metrics on": on},
                   ratio_on_over_off=on / off)
    print(json.dumps(summary))  # the last line: the figures above, for tests and tools


if __name__ == "__main__":
    main()
