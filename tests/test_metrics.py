"""WorkerMetrics: exposition, names, labels, values, endpoints (no mocks: real HTTP)."""

from __future__ import annotations

import math
import sys
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from seqface_dist.config import ConfigError, MetricsConfig
from seqface_dist.metrics import (
    CUDA_ONLY_METRIC_NAMES,
    EXPORTED_METRIC_NAMES,
    LOSS_TERMS,
    PHASES,
    NullMetrics,
    WorkerMetrics,
    start_worker_metrics,
)

PH = {"data_wait": 0.01, "forward": 0.1, "backward": 0.2, "communication": 0.03,
      "optimizer": 0.02}
LOSSES = {"chief": 9.5, "lsr": 8.25, "dsa_pull": 0.5, "dsa_push": 0.75, "total": 9.55}


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return r.read().decode()


def samples(text: str) -> list:
    return [s for fam in text_string_to_metric_families(text) for s in fam.samples]


def value(text: str, name: str, **labels: str) -> float:
    found = [s.value for s in samples(text)
             if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(found) == 1, f"{name} {labels}: {len(found)} samples"
    return found[0]


def fill(m: WorkerMetrics) -> None:
    """Touch every metric so each labelled family has a series."""
    m.observe_step(PH, LOSSES, samples=64, lr=0.1, lam=5.0, active_hinge_fraction=0.25, step=7)
    m.set_head_rows(classifier=100, identity_centers=100, sequence_centers=300)
    m.add_bad_samples("decode_error", 2)
    m.update_data_counters({"shard_bytes": 1000, "shard_samples": 10, "shards_opened": 1,
                            "s3_retries": 3, "bad_samples": {"missing_json": 1}})
    m.set_eval("lfw", step=7, accuracy=0.99, tar_at_far={1e-3: 0.9, 1e-4: 0.8})


def test_exposition_parses_with_expected_names_and_labels():
    m = WorkerMetrics(run="exp1", rank=3, node="nodeA", world_size=4)
    fill(m)
    port = m.start()
    try:
        text = scrape(port)
    finally:
        m.stop()
    ss = samples(text)
    names = {s.name for s in ss}
    # Every exported name, and nothing else, appears (CUDA gauges only where CUDA is).
    torch = sys.modules.get("torch")
    cuda = torch is not None and torch.cuda.is_available()
    assert names == (EXPORTED_METRIC_NAMES if cuda else
                     EXPORTED_METRIC_NAMES - CUDA_ONLY_METRIC_NAMES)
    assert all(n.startswith("seqface_") for n in names)
    for s in ss:
        assert (s.labels["run"], s.labels["rank"], s.labels["node"]) == ("exp1", "3", "nodeA"), s
    counts = [s for s in ss if s.name == "seqface_step_phase_seconds_count"]
    assert {s.labels["phase"] for s in counts} == set(PHASES)
    assert {s.labels["term"] for s in ss if s.name == "seqface_loss"} == set(LOSS_TERMS)
    for term, v in LOSSES.items():
        assert value(text, "seqface_loss", term=term) == v
    assert value(text, "seqface_step_phase_seconds_sum", phase="backward") == pytest.approx(0.2)
    assert value(text, "seqface_step_duration_seconds_sum") == pytest.approx(sum(PH.values()))
    assert value(text, "seqface_steps_total") == 1
    assert value(text, "seqface_samples_total") == 64
    assert value(text, "seqface_learning_rate") == 0.1
    assert value(text, "seqface_asoftmax_lambda") == 5.0
    assert value(text, "seqface_dsa_active_hinge_ratio") == 0.25
    assert value(text, "seqface_global_step") == 7
    assert value(text, "seqface_world_size") == 4
    assert value(text, "seqface_head_rows", matrix="sequence_centers") == 300
    assert value(text, "seqface_bad_samples_total", reason="decode_error") == 2
    assert value(text, "seqface_bad_samples_total", reason="missing_json") == 1
    assert value(text, "seqface_s3_retries_total") == 3
    assert value(text, "seqface_eval_tar_ratio", dataset="lfw", far="0.0001") == 0.8
    assert value(text, "seqface_eval_accuracy_ratio", dataset="lfw") == 0.99
    # Resident memory is read at scrape time: a live process has some.
    assert value(text, "seqface_process_resident_memory_bytes") > 10e6


def test_two_workers_in_one_process_get_different_ports_and_both_serve():
    a, b = WorkerMetrics("run", 0, node="n"), WorkerMetrics("run", 1, node="n")
    pa, pb = a.start("127.0.0.1", 0), b.start("127.0.0.1", 0)
    try:
        assert pa != pb and pa > 0 and pb > 0
        a.observe_step(PH, {"total": 1.0}, samples=8)
        b.observe_step(PH, {"total": 2.0}, samples=8)
        b.observe_step(PH, {"total": 3.0}, samples=8)
        ta, tb = scrape(pa), scrape(pb)
        assert value(ta, "seqface_loss", term="total", rank="0") == 1.0
        assert value(tb, "seqface_loss", term="total", rank="1") == 3.0
        assert value(tb, "seqface_steps_total") == 2
        # Private registries: neither leaks into the other.
        assert all(s.labels["rank"] == "0" for s in samples(ta))
        with pytest.raises(RuntimeError, match="already serves"):
            a.start()
    finally:
        a.stop()
        b.stop()
    a.stop()  # idempotent
    with pytest.raises(OSError):
        scrape(pa)


def test_data_counters_advance_by_deltas_of_totals_and_survive_a_restart():
    m = WorkerMetrics("r", 0, node="n")
    m.update_data_counters({"shard_bytes": 100, "bad_samples": {"corrupt_jpeg": 2}})
    m.update_data_counters({"shard_bytes": 250, "bad_samples": {"corrupt_jpeg": 5}})
    m.update_data_counters({"shard_bytes": 40})  # the pipeline restarted: counts afresh
    text = _text(m)
    assert value(text, "seqface_shard_read_bytes_total") == 290
    assert value(text, "seqface_bad_samples_total", reason="corrupt_jpeg") == 5


def _text(m: WorkerMetrics) -> str:
    from prometheus_client import generate_latest

    return generate_latest(m.registry).decode()


def test_throughput_gauge_is_window_samples_over_window_clock_time():
    """The gauge's windowing rule, driven by an injected clock: the test advances it by
    hand and no real time is read, so nothing here depends on this machine's speed (real
    throughput is measured by bench/bench_metrics_train.py, not asserted)."""
    clock = [100.0]
    m = WorkerMetrics("r", 0, node="n", throughput_window_s=1.0, clock=lambda: clock[0])
    m.observe_step({}, {}, samples=10)  # opens the window; its samples predate it
    clock[0] += 0.5
    m.observe_step({}, {}, samples=30)
    assert value(_text(m), "seqface_throughput_samples_per_second") == 0  # window not full
    clock[0] += 1.5
    m.observe_step({}, {}, samples=50)
    window_samples, window_clock_s = 30 + 50, 0.5 + 1.5
    assert (value(_text(m), "seqface_throughput_samples_per_second")
            == window_samples / window_clock_s)


def test_bad_input_is_refused_with_a_clear_error():
    m = WorkerMetrics("r", 0, node="n")
    with pytest.raises(ValueError, match="unknown phase 'fwd'"):
        m.observe_step({"fwd": 0.1}, {}, samples=1)
    with pytest.raises(ValueError, match="unknown loss term 'dsa'"):
        m.observe_step({}, {"dsa": 0.1}, samples=1)
    with pytest.raises(ValueError, match="unknown key 'bytes'"):
        m.update_data_counters({"bytes": 1})
    with pytest.raises(ValueError, match="bad sample reason"):
        m.add_bad_samples("a reason with spaces")
    with pytest.raises(ValueError, match="negative"):
        m.update_data_counters({"s3_retries": -1})
    with pytest.raises(ValueError, match="eval dataset"):
        m.set_eval("", step=1, accuracy=0.5)


def test_nan_loss_is_exported_not_hidden():
    m = WorkerMetrics("r", 0, node="n")
    m.observe_step({}, {"total": float("nan")}, samples=1)
    assert math.isnan(value(_text(m), "seqface_loss", term="total"))


def test_config_disabled_gives_null_metrics_and_enabled_serves_on_loopback():
    cfg = MetricsConfig(enabled=False)
    m, target = start_worker_metrics(cfg, "r", 0)
    assert isinstance(m, NullMetrics) and target is None
    m.observe_step(PH, LOSSES, samples=3)  # all no-ops
    assert m.start() is None

    cfg = MetricsConfig()
    m, target = start_worker_metrics(cfg, "r", 1, world_size=2)
    try:
        assert target == f"127.0.0.1:{m.port}"
        assert value(scrape(m.port), "seqface_world_size", rank="1") == 2
    finally:
        m.stop()

    cfg = MetricsConfig(host="0.0.0.0", advertise_host="10.1.2.3")
    m, target = start_worker_metrics(cfg, "r", 2)
    try:
        assert target == f"10.1.2.3:{m.port}"
    finally:
        m.stop()


def test_metrics_config_refuses_bad_values():
    with pytest.raises(ConfigError, match="metrics.host"):
        MetricsConfig(host="").validate("metrics")
    with pytest.raises(ConfigError, match="metrics.port"):
        MetricsConfig(port=70000).validate("metrics")


def test_a_skipped_step_counts_as_nonfinite_not_as_an_optimizer_step():
    m = WorkerMetrics(run="run", rank=0, node="n")
    m.observe_step(PH, LOSSES, samples=64, step=1)
    m.observe_step(PH, {}, samples=64, step=2, skipped=True)
    m.observe_step(PH, {}, samples=64, step=3, skipped=True)
    port = m.start()
    try:
        text = scrape(port)
    finally:
        m.stop()
    assert value(text, "seqface_steps_total") == 1
    assert value(text, "seqface_nonfinite_steps_total") == 2
    assert value(text, "seqface_samples_total") == 3 * 64  # their batches were consumed
    assert value(text, "seqface_global_step") == 3
    assert value(text, "seqface_loss", term="total") == LOSSES["total"]  # the last finite
