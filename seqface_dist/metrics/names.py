"""The metric catalogue: every name a worker exports, its type, help text and labels.

One table serves three readers: :class:`~seqface_dist.metrics.worker.WorkerMetrics` builds
its collectors from it, the dashboard test checks every PromQL query against
:data:`EXPORTED_METRIC_NAMES`, and the docs list it. Conventions: ``seqface_`` prefix,
base units in the name (``_seconds``, ``_bytes``, ``_ratio``), counters end in ``_total``
once exposed, times are histograms.
"""

from __future__ import annotations

from dataclasses import dataclass

PREFIX = "seqface_"
# Every series carries these, so one PromQL selector picks a run, a rank or a node.
COMMON_LABELS = ("run", "rank", "node")

PHASES = ("data_wait", "forward", "backward", "communication", "optimizer")
LOSS_TERMS = ("chief", "lsr", "dsa_pull", "dsa_push", "total")
HEAD_MATRICES = ("classifier", "identity_centers", "sequence_centers")

# 0.5 ms .. 60 s: a small CPU step is milliseconds, a stalled S3 read is tens of seconds.
TIME_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


@dataclass(frozen=True)
class MetricSpec:
    kind: str  # counter | gauge | histogram
    name: str  # as declared; a counter's exposed samples gain "_total"
    help: str
    labels: tuple[str, ...] = ()  # beyond COMMON_LABELS
    cuda_only: bool = False


SPECS: tuple[MetricSpec, ...] = (
    # Progress and throughput.
    MetricSpec("counter", "seqface_steps", "Optimizer steps completed by this worker."),
    MetricSpec("counter", "seqface_nonfinite_steps",
               "Steps skipped, no update applied: the loss or gradient norm was not finite."),
    MetricSpec("counter", "seqface_samples", "Training samples consumed by this worker."),
    MetricSpec("gauge", "seqface_global_step", "Latest global step number."),
    MetricSpec("gauge", "seqface_world_size", "Number of training workers in the run."),
    MetricSpec("gauge", "seqface_throughput_samples_per_second",
               "Samples per second of this worker over the last window of wall time."),
    # Step time split.
    MetricSpec("histogram", "seqface_step_phase_seconds",
               "Time of one phase of a training step.", ("phase",)),
    MetricSpec("histogram", "seqface_step_duration_seconds", "Time of a whole training step."),
    # Losses and schedule.
    MetricSpec("gauge", "seqface_loss", "Latest value of a loss term.", ("term",)),
    MetricSpec("gauge", "seqface_dsa_active_hinge_ratio",
               "Fraction of DSA push hinge terms that are active (> 0)."),
    MetricSpec("gauge", "seqface_learning_rate", "Backbone learning rate."),
    MetricSpec("gauge", "seqface_asoftmax_lambda", "A-Softmax annealing lambda_t."),
    # Data health.
    MetricSpec("counter", "seqface_shard_read_bytes", "Bytes read from shards."),
    MetricSpec("counter", "seqface_shard_samples_read", "Samples read from shards."),
    MetricSpec("counter", "seqface_shards_opened", "Shards opened."),
    MetricSpec("counter", "seqface_shards_failed",
               "Shards given up (S3 errors after retries, bad tar header, deadline, checksum); "
               "each also counted by reason in seqface_bad_samples."),
    MetricSpec("counter", "seqface_bad_samples", "Samples skipped as bad, by reason.",
               ("reason",)),
    MetricSpec("counter", "seqface_s3_retries", "Retried S3 requests."),
    # Partitioned head.
    MetricSpec("gauge", "seqface_head_rows", "Rows of a head matrix owned by this rank.",
               ("matrix",)),
    # Memory.
    MetricSpec("gauge", "seqface_process_resident_memory_bytes",
               "Resident memory of the worker process."),
    MetricSpec("gauge", "seqface_gpu_memory_allocated_bytes",
               "GPU memory held by tensors (torch.cuda.memory_allocated).", cuda_only=True),
    MetricSpec("gauge", "seqface_gpu_memory_reserved_bytes",
               "GPU memory reserved by the caching allocator.", cuda_only=True),
    MetricSpec("gauge", "seqface_gpu_memory_max_allocated_bytes",
               "Peak GPU memory held by tensors.", cuda_only=True),
    # Evaluation.
    MetricSpec("gauge", "seqface_eval_accuracy_ratio",
               "Latest verification accuracy on a pairs set.", ("dataset",)),
    MetricSpec("gauge", "seqface_eval_tar_ratio",
               "Latest true accept rate at a false accept rate.", ("dataset", "far")),
    MetricSpec("gauge", "seqface_eval_step", "Global step of the latest evaluation.",
               ("dataset",)),
)


def exposed_names(spec: MetricSpec) -> tuple[str, ...]:
    """The sample names Prometheus sees for one metric (prometheus-client's exposition)."""
    if spec.kind == "counter":
        return (spec.name + "_total", spec.name + "_created")
    if spec.kind == "histogram":
        return tuple(spec.name + s for s in ("_bucket", "_sum", "_count", "_created"))
    return (spec.name,)


EXPORTED_METRIC_NAMES: frozenset[str] = frozenset(
    n for spec in SPECS for n in exposed_names(spec))
# Present only where CUDA is (a CPU scrape lacks them; the dashboard may still query them).
CUDA_ONLY_METRIC_NAMES: frozenset[str] = frozenset(
    n for spec in SPECS if spec.cuda_only for n in exposed_names(spec))


def exported_metric_names() -> list[str]:
    """Sorted list of every exposed sample name (for docs and the dashboard test)."""
    return sorted(EXPORTED_METRIC_NAMES)
