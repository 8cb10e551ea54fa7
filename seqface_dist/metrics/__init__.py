"""Prometheus metrics for seqface workers (DESIGN.md §6).

What the trainer uses::

    from seqface_dist.metrics import start_worker_metrics, register_endpoint
    metrics, target = start_worker_metrics(cfg.metrics, run, rank, world_size, node_ip)
    if target and cfg.metrics.service_discovery_dir:
        register_endpoint(run, rank, node_ip, target)   # driver ran start_registrar(...)
    ... metrics.observe_step(phases, losses, samples, lr=..., lam=..., step=...) ...
    metrics.stop()

Create the metrics after ``torch.cuda.set_device``: the GPU memory gauges read that device.
"""

from __future__ import annotations

from seqface_dist.config import MetricsConfig
from seqface_dist.metrics.discovery import (
    ServiceDiscoveryFile,
    read_sd_file,
    sd_path,
    target_address,
)
from seqface_dist.metrics.names import (
    CUDA_ONLY_METRIC_NAMES,
    EXPORTED_METRIC_NAMES,
    HEAD_MATRICES,
    LOSS_TERMS,
    PHASES,
    exported_metric_names,
)
from seqface_dist.metrics.registrar import register_endpoint, start_registrar, stop_registrar
from seqface_dist.metrics.worker import DATA_COUNTER_KEYS, NullMetrics, WorkerMetrics

__all__ = [
    "CUDA_ONLY_METRIC_NAMES", "DATA_COUNTER_KEYS", "EXPORTED_METRIC_NAMES", "HEAD_MATRICES",
    "LOSS_TERMS", "PHASES", "NullMetrics", "ServiceDiscoveryFile", "WorkerMetrics",
    "exported_metric_names", "read_sd_file", "register_endpoint", "sd_path",
    "start_registrar", "start_worker_metrics", "stop_registrar", "target_address",
]


def start_worker_metrics(cfg: MetricsConfig, run: str, rank: int,
                         world_size: int | None = None, node_ip: str = "",
                         local_rank: int = 0) -> tuple[WorkerMetrics | NullMetrics, str | None]:
    """Create this worker's metrics and start its endpoint (on ``cfg.port + local_rank``
    when ``cfg.port`` is a fixed base, else on any free port).

    Returns (metrics, target): target is the ``host:port`` Prometheus should scrape
    (``cfg.advertise_host``, else ``node_ip`` when bound to a wildcard, else the bound
    host), or None when metrics are disabled.
    """
    if not cfg.enabled:
        return NullMetrics(), None
    m = WorkerMetrics(run=run, rank=rank, node=node_ip or None, world_size=world_size)
    port = m.start(cfg.host, cfg.port, local_rank)
    advertise = cfg.advertise_host
    if not advertise and cfg.host in ("0.0.0.0", "::"):
        advertise = node_ip
    return m, target_address(cfg.host, port, advertise)
