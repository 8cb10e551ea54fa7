"""Getting every worker's endpoint into the driver's discovery file, across nodes.

Workers run on many nodes; Prometheus runs on the head node (next to Ray's own metrics
discovery file) and the ``ray job submit`` driver runs there too. So the driver starts a
small named Ray actor on its own node that owns the run's :class:`ServiceDiscoveryFile`;
each worker, once its endpoint is up, calls :func:`register_endpoint`, which finds the
actor by name and adds its ``host:port``. No shared file system is needed, a restarted
worker simply re-registers (same rank, new port), and :func:`stop_registrar` deletes the
file at the end so Prometheus stops scraping the finished run.

    # driver, after ray.init():
    reg = start_registrar(cfg.metrics.service_discovery_dir, cfg.train.run_name)
    try: trainer.fit()
    finally: stop_registrar(reg)
    # each worker, after metrics.start():
    register_endpoint(run, rank, node, target)
"""

from __future__ import annotations

from typing import Any

from seqface_dist.metrics.discovery import ServiceDiscoveryFile, sd_path


def actor_name(run: str) -> str:
    return f"seqface-metrics-sd-{run}"


class _Registrar:
    def __init__(self, path: str) -> None:
        self.sd = ServiceDiscoveryFile(path)

    def register(self, key: str, target: str, labels: dict[str, str]) -> str:
        self.sd.register(key, target, labels)
        return str(self.sd.path)

    def unregister(self, key: str) -> None:
        self.sd.unregister(key)

    def groups(self) -> list[dict]:
        return self.sd.groups()

    def close(self) -> None:
        self.sd.remove()


def start_registrar(sd_dir: str, run: str) -> Any:
    """Start the discovery actor on this (the driver's) node; return its handle."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = ray.get_runtime_context().get_node_id()
    cls = ray.remote(num_cpus=0, max_restarts=-1)(_Registrar)
    # Pinned to the driver's node: the file must land where Prometheus reads it.
    handle = cls.options(
        name=actor_name(run), get_if_exists=True,
        scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False),
    ).remote(str(sd_path(sd_dir, run)))
    ray.get(handle.groups.remote())  # fail here, in the driver, if it cannot start
    return handle


def register_endpoint(run: str, rank: int, node: str, target: str) -> None:
    """Called by a worker: add its endpoint to the run's discovery file (blocks briefly)."""
    import ray

    handle = ray.get_actor(actor_name(run))
    labels = {"run": run, "rank": str(rank), "node": node}
    ray.get(handle.register.remote(f"rank{rank:05d}", target, labels), timeout=60)


def stop_registrar(handle: Any) -> None:
    """Delete the run's discovery file and end the actor."""
    import ray

    try:
        ray.get(handle.close.remote(), timeout=30)
    finally:
        ray.kill(handle)
