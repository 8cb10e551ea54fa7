"""Runs that cannot succeed end, with an error that says why, instead of hanging or
reporting success: more workers than the Ray cluster can place, and a diverged run."""

from __future__ import annotations

import pytest
from train_util import history, train_cfg

from seqface_dist.config import config_from_dict
from seqface_dist.train.driver import PreflightError, check_cluster_resources, local_ray, run

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]  # starts Ray: the slow tier


@pytest.fixture(scope="module")
def own_ray():
    with local_ray(num_cpus=2, env_vars={"DS_ACCELERATOR": "cpu"},
                   object_store_memory=256 << 20):
        yield


def test_more_workers_than_the_cluster_has_cpus_is_refused_before_any_worker(
        shards, tmp_path, own_ray):
    # Without the check Ray Train waits for 64 CPUs forever (a retry every 60 s).
    cfg = config_from_dict(train_cfg(shards, tmp_path, "toomany", train__num_workers=64))
    with pytest.raises(PreflightError, match=(
            r"train\.num_workers=64 x train\.cpus_per_worker=1 needs 64 CPUs, the Ray "
            r"cluster has 2 .*train\.wait_for_resources=true")):
        run(cfg)
    one = config_from_dict(train_cfg(shards, tmp_path, "fat", train__num_workers=1,
                                     train__cpus_per_worker=3))
    with pytest.raises(PreflightError, match="needs 3 CPUs, the Ray cluster has 2"):
        run(one)
    assert not (tmp_path / "toomany").exists()  # no worker started, nothing written
    # An autoscaling cluster grows on demand: there the check is off.
    check_cluster_resources(config_from_dict(train_cfg(
        shards, tmp_path, "scales", train__num_workers=64, train__wait_for_resources=True)))


def test_a_diverging_run_skips_its_steps_then_stops_naming_the_step(shards, tmp_path, own_ray):
    # The run: an lr the net cannot take. Two DeepSpeed workers skip the same
    # steps (the loss and the gradient norm are global), then stop after 3 in a row.
    cfg = config_from_dict(train_cfg(shards, tmp_path, "diverge", optim__lr=10.0,
                                     train__max_nonfinite_steps=3, train__log_every=1))
    with pytest.raises(Exception, match=r"not finite.*train\.max_nonfinite_steps is 3") as e:
        run(cfg)
    assert "optim.lr (now 10.0)" in str(e.value)
    rows = history(cfg)
    skipped = [r["skipped_steps"] for r in rows]
    # Logged every step: the count rises by one a step, up to the 3 the run allowed.
    assert skipped[-3:] == [1, 2, 3] and skipped[:-3] == [0] * (len(rows) - 3), skipped
