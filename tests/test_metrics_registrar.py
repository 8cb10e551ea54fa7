"""The driver-side discovery actor with real Ray: workers in other processes register."""

from __future__ import annotations

import pytest
import ray

from seqface_dist.metrics import read_sd_file, sd_path
from seqface_dist.metrics.registrar import register_endpoint, start_registrar, stop_registrar

pytestmark = pytest.mark.slow  # starts Ray: the multi-minute tier


def test_workers_register_through_the_driver_actor(tmp_path):
    ray.init(num_cpus=1, include_dashboard=False, object_store_memory=80 * 1024**2,
             log_to_driver=False)
    try:
        reg = start_registrar(str(tmp_path / "sd"), "exp1")

        @ray.remote(num_cpus=0)
        def worker(rank: int, port: int) -> None:  # runs in a Ray worker process
            register_endpoint("exp1", rank, f"node{rank}", f"127.0.0.1:{port}")

        ray.get([worker.remote(0, 40000), worker.remote(1, 40001)])
        path = sd_path(tmp_path / "sd", "exp1")
        groups = read_sd_file(path)
        assert groups == [
            {"targets": [f"127.0.0.1:4000{r}"], "labels": {"run": "exp1", "rank": str(r),
                                                          "node": f"node{r}"}}
            for r in (0, 1)
        ]
        ray.get(worker.remote(0, 40500))  # rank 0 restarted on another port
        assert [g["targets"] for g in read_sd_file(path)] == [["127.0.0.1:40500"],
                                                              ["127.0.0.1:40001"]]
        stop_registrar(reg)
        assert not path.exists()
    finally:
        ray.shutdown()
