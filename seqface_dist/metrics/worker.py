"""Per-worker Prometheus metrics: what the training loop calls, and its HTTP endpoint.

Each worker owns a private ``CollectorRegistry`` (never the global one), so several
workers, and tests, live in one process without clashing. The endpoint binds loopback
and port 0 by default: the OS picks a free port, so workers sharing a node never collide;
``start`` returns the port for service discovery. A port P > 0 is a base: the worker of
local rank k (its index among the workers of its node) binds P + k, a fixed port that a
scraper without the discovery file (a kube-prometheus PodMonitor) can target.

    m = WorkerMetrics(run="exp1", rank=0, node="10.0.0.5", world_size=8)
    port = m.start("127.0.0.1", 0)      # or m.start("0.0.0.0", 9100, local_rank=3): 9103
    m.set_head_rows(classifier=125_000, identity_centers=125_000, sequence_centers=500_000)
    m.observe_step({"data_wait": 0.01, "forward": 0.1, "backward": 0.2,
                    "communication": 0.03, "optimizer": 0.02},
                   {"chief": 9.1, "lsr": 8.7, "dsa_pull": 0.4, "dsa_push": 0.9, "total": 9.2},
                   samples=64, lr=0.1, lam=5.0, active_hinge_fraction=0.3, step=1)
    m.stop()
"""

from __future__ import annotations

import os
import re
import socket
import sys
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from seqface_dist.metrics.names import (
    COMMON_LABELS,
    HEAD_MATRICES,
    LOSS_TERMS,
    PHASES,
    SPECS,
    TIME_BUCKETS,
)

# Keys update_data_counters accepts (cumulative totals from the data pipeline).
DATA_COUNTER_KEYS = ("shard_bytes", "shard_samples", "shards_opened", "s3_retries",
                     "shards_failed", "bad_samples")
# Label values that come from callers must stay few and tame: one series per value.
_LABEL_VALUE = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
_KINDS = {"counter": Counter, "gauge": Gauge, "histogram": Histogram}


def _rss_bytes() -> float:
    try:  # Linux: current (not peak) resident set, no extra dependency.
        with open("/proc/self/statm") as f:
            return float(int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE"))
    except (OSError, ValueError, IndexError):
        import psutil  # comes with ray[default]

        return float(psutil.Process().memory_info().rss)


def _check_label_value(value: str, what: str) -> str:
    if not isinstance(value, str) or not _LABEL_VALUE.match(value):
        raise ValueError(f"{what}: {value!r} is not a valid label value "
                         "(1-64 characters of letters, digits, '_', '.', '-')")
    return value


def endpoint_port(base: int, local_rank: int = 0) -> int:
    """The port the worker of ``local_rank`` binds: 0 (any free port) when ``base`` is 0,
    else ``base + local_rank``, so that the workers of one node never collide."""
    base, local_rank = int(base), int(local_rank)
    if base < 0 or local_rank < 0:
        raise ValueError(f"metrics port: base {base} and local rank {local_rank} must be >= 0")
    if base == 0:
        return 0
    port = base + local_rank
    if port > 65535:
        raise ValueError(f"metrics.port {base} + local rank {local_rank} = {port} is past "
                         "65535: lower metrics.port")
    return port


class WorkerMetrics:
    """The metrics of one training worker, in its own registry, served over HTTP."""

    def __init__(self, run: str, rank: int, node: str | None = None,
                 world_size: int | None = None, throughput_window_s: float = 1.0,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.run, self.rank = run, int(rank)
        self.node = node or socket.gethostname()
        self.registry = CollectorRegistry(auto_describe=True)
        self._common = {"run": run, "rank": str(self.rank), "node": self.node}
        self._m: dict[str, Any] = {}
        for spec in SPECS:
            cls = _KINDS[spec.kind]
            kwargs: dict[str, Any] = {"registry": self.registry}
            if spec.kind == "histogram":
                kwargs["buckets"] = TIME_BUCKETS
            # prometheus-client appends "_total" to counters itself.
            self._m[spec.name] = cls(spec.name, spec.help, COMMON_LABELS + spec.labels,
                                     **kwargs)
        # Children with fixed label values are made once: .labels() costs microseconds.
        c = self._child
        self._phase = {p: c("seqface_step_phase_seconds", phase=p) for p in PHASES}
        self._loss = {t: c("seqface_loss", term=t) for t in LOSS_TERMS}
        self._head = {h: c("seqface_head_rows", matrix=h) for h in HEAD_MATRICES}
        self._step_hist = c("seqface_step_duration_seconds")
        self._steps, self._samples = c("seqface_steps"), c("seqface_samples")
        self._nonfinite = c("seqface_nonfinite_steps")
        self._global_step = c("seqface_global_step")
        self._throughput = c("seqface_throughput_samples_per_second")
        self._lr, self._lam = c("seqface_learning_rate"), c("seqface_asoftmax_lambda")
        self._hinge = c("seqface_dsa_active_hinge_ratio")
        self._data = {"shard_bytes": c("seqface_shard_read_bytes"),
                      "shard_samples": c("seqface_shard_samples_read"),
                      "shards_opened": c("seqface_shards_opened"),
                      "shards_failed": c("seqface_shards_failed"),
                      "s3_retries": c("seqface_s3_retries")}
        self._bad: dict[str, Any] = {}
        self._last_totals: dict[str, float] = {}
        if world_size is not None:
            c("seqface_world_size").set(world_size)
        # Memory is read when Prometheus scrapes, so it costs the training loop nothing.
        c("seqface_process_resident_memory_bytes").set_function(_rss_bytes)
        self._setup_cuda()
        self._window_s = throughput_window_s
        self._clock = clock  # wall time for the throughput window (tests pass a fake one)
        self._win_start: float | None = None
        self._win_samples = 0
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self.port: int | None = None

    def _child(self, name: str, **labels: str) -> Any:
        return self._m[name].labels(**self._common, **labels)

    def _setup_cuda(self) -> None:
        # Only if the trainer already imported torch: the driver and tests stay light.
        torch = sys.modules.get("torch")
        if torch is None or not torch.cuda.is_available():
            return
        cuda = torch.cuda
        # The current device is per thread: fix the trainer's now, the scrape thread's is 0.
        dev = cuda.current_device()
        self._child("seqface_gpu_memory_allocated_bytes").set_function(
            lambda: float(cuda.memory_allocated(dev)))
        self._child("seqface_gpu_memory_reserved_bytes").set_function(
            lambda: float(cuda.memory_reserved(dev)))
        self._child("seqface_gpu_memory_max_allocated_bytes").set_function(
            lambda: float(cuda.max_memory_allocated(dev)))

    # -- what the training loop calls ------------------------------------------------

    def observe_step(self, phases: Mapping[str, float], losses: Mapping[str, float],
                     samples: int, lr: float | None = None, lam: float | None = None,
                     active_hinge_fraction: float | None = None, step: int | None = None,
                     step_seconds: float | None = None, skipped: bool = False) -> None:
        """Record one finished step.

        phases: seconds per phase, keys from ``PHASES`` (any subset); losses: keys from
        ``LOSS_TERMS`` (any subset); samples: this worker's samples in the step;
        step_seconds: the whole step's time (default: the sum of the phases); skipped: the
        step's loss or gradient was not finite and nothing was updated (counted in
        ``seqface_nonfinite_steps_total``, not in ``seqface_steps_total``).
        """
        total = 0.0
        for name, seconds in phases.items():
            child = self._phase.get(name)
            if child is None:
                raise ValueError(f"observe_step: unknown phase {name!r}; known: {PHASES}")
            child.observe(seconds)
            total += seconds
        for name, value in losses.items():
            child = self._loss.get(name)
            if child is None:
                raise ValueError(f"observe_step: unknown loss term {name!r}; known: {LOSS_TERMS}")
            child.set(value)
        self._step_hist.observe(total if step_seconds is None else step_seconds)
        (self._nonfinite if skipped else self._steps).inc()
        self._samples.inc(samples)
        if lr is not None:
            self._lr.set(lr)
        if lam is not None:
            self._lam.set(lam)
        if active_hinge_fraction is not None:
            self._hinge.set(active_hinge_fraction)
        if step is not None:
            self._global_step.set(step)
        self._update_throughput(samples)

    def _update_throughput(self, samples: int) -> None:
        # Samples over a window of wall time: includes every stall the phases miss.
        now = self._clock()
        if self._win_start is None:
            self._win_start = now
            return
        self._win_samples += samples
        elapsed = now - self._win_start
        if elapsed >= self._window_s:
            self._throughput.set(self._win_samples / elapsed)
            self._win_start, self._win_samples = now, 0

    def set_head_rows(self, classifier: int, identity_centers: int,
                      sequence_centers: int) -> None:
        """Rows of W and of C (identity and sequence blocks) this rank owns."""
        self._head["classifier"].set(classifier)
        self._head["identity_centers"].set(identity_centers)
        self._head["sequence_centers"].set(sequence_centers)

    def add_bad_samples(self, reason: str, n: int = 1) -> None:
        """Count ``n`` skipped samples the trainer itself saw (reason: a short tag)."""
        self._bad_child(reason).inc(n)

    def _bad_child(self, reason: str) -> Any:
        child = self._bad.get(reason)
        if child is None:
            _check_label_value(reason, "bad sample reason")
            child = self._bad[reason] = self._child("seqface_bad_samples", reason=reason)
        return child

    def update_data_counters(self, totals: Mapping[str, Any]) -> None:
        """Advance the data counters to the pipeline's cumulative ``totals``.

        Keys: ``shard_bytes``, ``shard_samples``, ``shards_opened``, ``s3_retries``,
        ``shards_failed`` (numbers)
        and ``bad_samples`` (a mapping reason -> count), all totals since the pipeline
        started. A total that goes down means the pipeline restarted: it counts afresh.
        """
        for key, value in totals.items():
            if key == "bad_samples":
                if not isinstance(value, Mapping):
                    raise ValueError("update_data_counters: bad_samples must map reason -> count")
                for reason, count in value.items():
                    self._bad_child(reason).inc(self._delta(f"bad/{reason}", count))
            elif key in self._data:
                self._data[key].inc(self._delta(key, value))
            else:
                raise ValueError(f"update_data_counters: unknown key {key!r}; "
                                 f"known: {DATA_COUNTER_KEYS}")

    def _delta(self, key: str, total: float) -> float:
        if total < 0:
            raise ValueError(f"update_data_counters: {key} total is negative ({total})")
        last = self._last_totals.get(key, 0.0)
        self._last_totals[key] = total
        return total - last if total >= last else total

    def set_eval(self, dataset: str, step: int, accuracy: float | None = None,
                 tar_at_far: Mapping[float, float] | None = None) -> None:
        """Latest evaluation on ``dataset``: accuracy and TAR at each FAR (ratios in 0..1)."""
        _check_label_value(dataset, "eval dataset")
        self._child("seqface_eval_step", dataset=dataset).set(step)
        if accuracy is not None:
            self._child("seqface_eval_accuracy_ratio", dataset=dataset).set(accuracy)
        for far, tar in (tar_at_far or {}).items():
            self._child("seqface_eval_tar_ratio", dataset=dataset, far=f"{far:g}").set(tar)

    # -- the endpoint --------------------------------------------------------------------

    def start(self, host: str = "127.0.0.1", port: int = 0, local_rank: int = 0) -> int:
        """Serve ``/metrics`` on host and return the bound port: any free port when
        ``port`` is 0, else ``port + local_rank`` (:func:`endpoint_port`)."""
        if self._server is not None:
            raise RuntimeError(f"metrics endpoint of rank {self.rank} already serves "
                               f"on port {self.port}")
        bind = endpoint_port(port, local_rank)
        try:
            self._server, self._thread = start_http_server(bind, addr=host,
                                                           registry=self.registry)
        except OSError as e:
            if not bind:
                raise
            raise OSError(e.errno, f"metrics endpoint of rank {self.rank}: cannot bind "
                                   f"{host}:{bind} (metrics.port {port} + local rank "
                                   f"{local_rank}): {e.strerror}") from e
        self.port = int(self._server.server_port)
        return self.port

    def stop(self) -> None:
        """Stop the endpoint (idempotent)."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            if self._thread is not None:
                self._thread.join(timeout=5)
            self._server = self._thread = self.port = None

    def __enter__(self) -> WorkerMetrics:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class NullMetrics:
    """Same methods, does nothing: what the trainer gets when metrics are disabled."""

    port: int | None = None

    def observe_step(self, *args: Any, **kwargs: Any) -> None:
        pass

    def set_head_rows(self, *args: Any, **kwargs: Any) -> None:
        pass

    def add_bad_samples(self, *args: Any, **kwargs: Any) -> None:
        pass

    def update_data_counters(self, *args: Any, **kwargs: Any) -> None:
        pass

    def set_eval(self, *args: Any, **kwargs: Any) -> None:
        pass

    def start(self, host: str = "127.0.0.1", port: int = 0, local_rank: int = 0) -> None:
        return None

    def stop(self) -> None:
        pass

    def __enter__(self) -> NullMetrics:
        return self

    def __exit__(self, *exc: object) -> None:
        pass
