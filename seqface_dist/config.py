"""One validated config tree for every seqface command.

Defaults live here and nowhere else. A config is built from these defaults, then a YAML
file, then ``section.key=value`` overrides from the command line. Unknown keys, wrong
types and impossible values are refused with a :class:`ConfigError` that names the key,
before any work starts.

    cfg = load_config("configs/local-cpu.yaml", ["loss.dsa_p=0.02", "train.num_workers=1"])
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

# Kept torch-free (config validation must not import torch); the losses import these.
SEQUENCE_MODES = ("lsr", "none", "sequence_classes", "separate_heads", "masked_softmax")
CLASS_ROW_MODES = ("sequence_classes", "separate_heads", "masked_softmax")  # W gains N_seq rows


# The backbones seqface_dist.models builds (it checks its registry against this list).
BACKBONE_NAMES = ("sphere20", "sphere36", "sphere64", "iresnet50", "iresnet100", "tiny")


class ConfigError(ValueError):
    """A config key is unknown, has the wrong type or an impossible value."""


def _check(ok: bool, key: str, reason: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {reason}")


def _range(section: Any, p: str, name: str, lo: float | None = None, hi: float | None = None,
           *, lo_open: bool = False, hi_open: bool = False) -> None:
    """Refuse ``section.name`` outside [lo, hi] (open ends as asked; None: unbounded),
    with an error that names the key, the range and the value."""
    v = getattr(section, name)
    ok = ((lo is None or (v > lo if lo_open else v >= lo)) and
          (hi is None or (v < hi if hi_open else v <= hi)))
    if not ok:
        raise ConfigError(f"{p}.{name}: must be {_interval(lo, hi, lo_open, hi_open)} "
                          f"(got {v!r})")


def _interval(lo: float | None, hi: float | None, lo_open: bool, hi_open: bool) -> str:
    def num(x: float) -> str:
        return str(x) if isinstance(x, int) else f"{x:g}"

    if hi is None:
        return f"{'>' if lo_open else '>='} {num(lo)}"
    if lo is None:
        return f"{'<' if hi_open else '<='} {num(hi)}"
    return f"in {'(' if lo_open else '['}{num(lo)}, {num(hi)}{')' if hi_open else ']'}"


# A learning rate above this is a typo, not a schedule (the reference uses 0.01 to 0.1).
MAX_LR = 10.0


@dataclass
class ModelConfig:
    backbone: str = "sphere20"  # sphere20 | sphere36 | sphere64 | iresnet50 | iresnet100 | ...
    embedding_dim: int = 512  # >= 1
    input_size: list[int] = field(default_factory=lambda: [112, 96])  # height, width; >= 8
    in_channels: int = 3  # 1 or 3

    def validate(self, p: str) -> None:
        _check(self.backbone in BACKBONE_NAMES, f"{p}.backbone",
               f"unknown backbone {self.backbone!r}; choose one of {sorted(BACKBONE_NAMES)}")
        _range(self, p, "embedding_dim", 1)
        _check(len(self.input_size) == 2 and all(s >= 8 for s in self.input_size),
               f"{p}.input_size", f"must be [height, width], each >= 8 (got {self.input_size})")
        _check(self.in_channels in (1, 3), f"{p}.in_channels",
               f"must be 1 or 3 (got {self.in_channels})")


@dataclass
class LossConfig:
    # Chief loss: L2-constrained margin softmax over identities, LSR for sequence samples.
    margin: str = "sphereface"  # sphereface | arcface | cosface
    m: int = 4  # A-Softmax angular margin: 1, 2, 3 or 4
    scale: float = 32.0  # > 0
    # lambda_t = max(lambda_min, base * (1 + gamma t)^-power); each >= 0
    lambda_base: float = 5.0
    lambda_gamma: float = 0.12
    lambda_power: float = 1.0
    lambda_min: float = 5.0
    arcface_margin: float = 0.5  # [0, pi)
    cosface_margin: float = 0.35  # [0, 2)
    # How sequence samples enter the chief loss (DESIGN.md §2.2a). The default is the mode
    # that recovered the most of the labeled gain in docs/experiments.md (E1, E2); the
    # paper's lsr cost accuracy there and stays selectable (configs/reference.yaml).
    #   lsr              the paper: uniform target over the identity classes
    #   none             sequence samples only in DSA
    #   sequence_classes one classifier row per sequence, every sample sees every row
    #   separate_heads   identity samples see identity rows, sequence samples sequence rows
    #   masked_softmax   as sequence_classes, a sequence sample sees identity rows + its own
    sequence_mode: str = "sequence_classes"
    # Weight of a sequence sample's chief loss (epsilon of lsr; 1 = the paper). < 0: auto,
    # min(1, (sequence images / identity images) * (identities / sequences per batch)):
    # a small sequence set drawn at a fixed share of every batch would otherwise weigh
    # each of its images more than a labeled one (train.step.resolve_sequence_weight).
    sequence_weight: float = -1.0  # [0, 1], or < 0 for auto
    weight_renorm: bool = False  # the reference renormalises W's rows in place every forward
    center_init: str = "zeros"  # zeros | xavier (the reference net's filler)
    reference_margin_grad: bool = False  # the Caffe layer's rescaled (not true) gradient
    # Sampled softmax (Partial FC's idea), (0, 1]: per step and rank, the batch's positive
    # rows of W plus uniform negatives up to this share of the rank's rows (sequence rows
    # too, in the modes that have them); only those rows are computed and updated.
    # 1.0 = the full softmax.
    sampled_softmax_fraction: float = 1.0
    # DSA auxiliary loss (DESIGN.md §2.2).
    dsa_lambda: float = 0.5  # [0, 1]: pull share lambda, push share 1 - lambda
    dsa_alpha: float = 2.0  # >= 1
    dsa_beta: float = 1.0  # >= 0
    dsa_p: float = 0.01  # [0, 1]: share of centers drawn as negatives
    dsa_sampler: str = "exact"  # exact (reference: floor(N p) distinct) | bernoulli
    dsa_normalize_scale: float = 0.0  # 0 = raw features (reference); > 0 = normalise to it
    center_lr: float = -1.0  # [0, MAX_LR]; < 0: the backbone's learning rate (reference)
    center_momentum: float = 0.9  # [0, 1)
    # false (the reference): every center moves by its momentum every step, a pass over the
    # whole center block per step. true: only the batch's centers are updated, their
    # momentum included (a center's momentum waits for its next batch, as W's rows do under
    # the sampled softmax): the step's center cost no longer grows with N_id + N_seq.
    lazy_center_momentum: bool = False
    # Weights of the total loss: each >= 0, not both 0.
    chief_weight: float = 1.0
    dsa_weight: float = 0.04

    def validate(self, p: str) -> None:
        _check(self.margin in ("sphereface", "arcface", "cosface"), f"{p}.margin",
               f"unknown margin {self.margin!r}; choose sphereface, arcface or cosface")
        _check(self.m in (1, 2, 3, 4), f"{p}.m", f"must be one of 1, 2, 3, 4 (got {self.m})")
        _range(self, p, "scale", 0, lo_open=True)
        for name in ("lambda_base", "lambda_gamma", "lambda_power", "lambda_min"):
            _range(self, p, name, 0)
        _range(self, p, "arcface_margin", 0, math.pi, hi_open=True)
        _range(self, p, "cosface_margin", 0, 2, hi_open=True)
        _check(self.sequence_mode in SEQUENCE_MODES, f"{p}.sequence_mode",
               f"unknown mode {self.sequence_mode!r}; choose one of {', '.join(SEQUENCE_MODES)}")
        _check(self.sequence_weight <= 1.0, f"{p}.sequence_weight",
               f"must be in [0, 1], or < 0 for auto (got {self.sequence_weight})")
        _check(self.center_init in ("zeros", "xavier"), f"{p}.center_init",
               "must be 'zeros' or 'xavier'")
        _check(not self.reference_margin_grad or self.margin == "sphereface",
               f"{p}.reference_margin_grad", "is defined for margin: sphereface only")
        _range(self, p, "sampled_softmax_fraction", 0, 1, lo_open=True)
        _range(self, p, "dsa_normalize_scale", 0)
        # Refused here, not after Ray starts: the partitioned head (the one training path)
        # does not implement it. The dense oracle in seqface_dist.losses keeps it.
        _check(self.dsa_normalize_scale == 0, f"{p}.dsa_normalize_scale",
               "the partitioned head supports raw features only (0, the reference)")
        _range(self, p, "dsa_lambda", 0, 1)
        _range(self, p, "dsa_alpha", 1)
        _range(self, p, "dsa_beta", 0)
        _range(self, p, "dsa_p", 0, 1)
        _check(self.dsa_sampler in ("exact", "bernoulli"), f"{p}.dsa_sampler",
               "must be 'exact' or 'bernoulli'")
        if self.center_lr >= 0:  # < 0: auto
            _range(self, p, "center_lr", 0, MAX_LR)
        _range(self, p, "center_momentum", 0, 1, hi_open=True)
        _range(self, p, "chief_weight", 0)
        _range(self, p, "dsa_weight", 0)
        _check(self.chief_weight + self.dsa_weight > 0, f"{p}.chief_weight",
               "loss.chief_weight and loss.dsa_weight are both 0: nothing would train")


@dataclass
class DataConfig:
    # Shard sets: each a manifest URL or a brace pattern (s3://, file:// or a plain path).
    # Several sets of one kind are concatenated in this order (DESIGN.md §4a).
    identity_shards: list[str] = field(default_factory=list)
    sequence_shards: list[str] = field(default_factory=list)
    identities_per_batch: int = 32  # per worker, reference 32 + 32
    sequences_per_batch: int = 32  # per worker; 0 = identities only
    num_workers: int = 2  # batch worker processes per training worker (0: in-process)
    shuffle_buffer: int = 1000  # samples each reader shuffles among
    resampled: bool = True  # fixed samples per epoch: uneven shards never hang the epoch end
    samples_per_epoch: int = 0  # per worker; 0 = the shard set's size / world size
    flip: bool = True  # random horizontal flip of training images
    random_crop: int = 0  # pixels of random-crop padding; 0 = off
    s3_endpoint_url: str = ""  # "" = AWS_ENDPOINT_URL or the standard AWS endpoint
    # botocore timeouts: to connect, and for each wait for more response bytes. Every
    # request is retried (botocore 5 attempts, then the reader's own 8), so a silent
    # server costs up to ~40 x the read timeout per shard unless shard_deadline_s is set.
    s3_connect_timeout_s: float = 10.0
    s3_read_timeout_s: float = 30.0
    # Give up a shard whose reading (open to end) takes longer; counted shard_deadline.
    # Checked between socket reads (so overshot by one read timeout at most). 0 = none.
    shard_deadline_s: float = 0.0
    # A failed shard (S3 error after retries, bad tar header, deadline, checksum) is
    # skipped and counted by reason; a reader's pass fails once more than this fraction
    # of the shards it tried failed *and* more than failed_shard_allowance did.
    max_failed_shard_fraction: float = 0.1
    failed_shard_allowance: int = 2  # failed shards a pass always tolerates
    # Hash each shard while reading and compare with the manifest's sha256 at its end;
    # a mismatch fails the shard (checksum_mismatch), but its samples were already
    # yielded and cannot be recalled: this detects tampering, it does not filter it.
    verify_checksums: bool = False

    def validate(self, p: str) -> None:
        _check(self.identities_per_batch >= 0, f"{p}.identities_per_batch", "must be >= 0")
        _check(self.sequences_per_batch >= 0, f"{p}.sequences_per_batch", "must be >= 0")
        _check(self.identities_per_batch + self.sequences_per_batch > 0,
               f"{p}.identities_per_batch", "a batch needs at least one sample")
        _check(self.num_workers >= 0, f"{p}.num_workers", "must be >= 0")
        _check(self.shuffle_buffer >= 0, f"{p}.shuffle_buffer", "must be >= 0")
        _check(self.samples_per_epoch >= 0, f"{p}.samples_per_epoch", "must be >= 0")
        _check(self.random_crop >= 0, f"{p}.random_crop", "must be >= 0")
        for key in ("s3_connect_timeout_s", "s3_read_timeout_s"):
            v = getattr(self, key)
            _check(math.isfinite(v) and v > 0, f"{p}.{key}", f"must be finite and > 0 (got {v})")
        _check(math.isfinite(self.shard_deadline_s) and self.shard_deadline_s >= 0,
               f"{p}.shard_deadline_s", f"must be finite and >= 0 (got {self.shard_deadline_s})")
        _check(0.0 <= self.max_failed_shard_fraction <= 1.0, f"{p}.max_failed_shard_fraction",
               f"must be in [0, 1] (got {self.max_failed_shard_fraction})")
        _check(self.failed_shard_allowance >= 0, f"{p}.failed_shard_allowance",
               f"must be >= 0 (got {self.failed_shard_allowance})")


@dataclass
class OptimConfig:
    lr: float = 0.1  # (0, MAX_LR]
    momentum: float = 0.9  # [0, 1)
    weight_decay: float = 5e-4  # [0, 1)
    schedule: str = "step"  # step (reference) | cosine (with warm-up)
    milestones: list[int] = field(default_factory=lambda: [16000, 24000])  # each >= 0, sorted
    gamma: float = 0.1  # (0, 1]: lr factor at each milestone
    warmup_steps: int = 0  # >= 0
    max_steps: int = 28000  # >= 1
    grad_clip: float = 0.0  # >= 0: global norm over backbone and head; 0 = off

    def validate(self, p: str) -> None:
        _range(self, p, "lr", 0, MAX_LR, lo_open=True)
        _range(self, p, "momentum", 0, 1, hi_open=True)
        _range(self, p, "weight_decay", 0, 1, hi_open=True)
        _check(self.schedule in ("step", "cosine"), f"{p}.schedule", "must be 'step' or 'cosine'")
        _check(all(m >= 0 for m in self.milestones) and
               list(self.milestones) == sorted(self.milestones), f"{p}.milestones",
               f"must be increasing steps, each >= 0 (got {self.milestones})")
        _range(self, p, "gamma", 0, 1, lo_open=True)
        _range(self, p, "warmup_steps", 0)
        _range(self, p, "max_steps", 1)
        _range(self, p, "grad_clip", 0)


@dataclass
class TrainConfig:
    run_name: str = "seqface"  # the run's folder under storage_path
    storage_path: str = "./runs"  # local folder or s3://bucket/prefix
    num_workers: int = 2  # >= 1 Ray Train workers (one per GPU, or CPU processes)
    use_gpu: bool = False  # one GPU per Ray Train worker (NCCL); false: CPU workers (gloo)
    cpus_per_worker: int = 1  # >= 1
    zero_stage: int = 0  # 0, 1 or 2
    # The backbone's precision inside DeepSpeed: fp32 | bf16 | fp16. fp16 is DeepSpeed's
    # fp16 block with a dynamic loss scale (GPUs only: DeepSpeed refuses fp16 on CPUs;
    # zero_stage 1 or 2: DeepSpeed 0.19 mis-scales ZeRO 0's fp16 gradients, PR #8393);
    # the head outside the engine unscales its own gradient by the engine's scale and
    # skips its step whenever the engine skips one on overflow (train/step.py).
    precision: str = "fp32"
    # Micro-batches per optimizer step, >= 1: each worker's batch (data.*_per_batch) is
    # split into this many equal micro-batches (it must divide the batch); backbone
    # (DeepSpeed's gradient accumulation) and head (train/step.py) accumulate and step
    # once per step, so the lr schedule counts optimizer steps.
    gradient_accumulation_steps: int = 1
    # Your own DeepSpeed JSON (local path or s3://), merged under seqface's keys: see
    # seqface_dist/deepspeed_json.py for what is overridden and what is refused.
    deepspeed_config: str = ""
    # The head's W and centers (and their momentum): bf16 halves their memory (what lets
    # 10M + 10M rows fit 8 ranks in every sequence mode); norms, softmax statistics and
    # DSA distances stay fp32, W's updates round stochastically (parallel/optim.py).
    head_precision: str = "fp32"  # fp32 | bf16
    seed: int = 0  # [0, 2^32 - 1] (numpy's seed range)
    log_every: int = 10  # >= 1
    checkpoint_every: int = 500  # >= 1
    keep_checkpoints: int = 3  # >= 1 committed checkpoints kept; older go after a commit
    max_failures: int = 3  # >= 0
    resume_from: str = ""  # a checkpoint folder (local or s3://) of another run
    # Take only the backbone's weights from resume_from (a new head and schedule: other
    # data, or another classifier layout); otherwise the data must be the same.
    resume_weights_only: bool = False
    # Start a new run (step 0, fresh optimizers, fresh head) from the backbone weights of a
    # run checkpoint, an export folder, or an insightface arcface_torch iresnet .pth
    # (seqface_dist/train/init_from.py; nothing is unpickled). Not with resume_from.
    init_from: str = ""
    # A step whose loss or gradient norm is not finite is skipped (no update, counted as
    # skipped_steps); more than this many in a row stop the run. >= 0; 0 = stop at the
    # first. Skipping needs zero_stage 0: with ZeRO 1/2 the first one stops the run.
    max_nonfinite_steps: int = 10
    # false: the preflight refuses a run that asks for more CPUs/GPUs than the Ray cluster
    # has (Ray Train would wait for them forever). true: skip that check, for a cluster
    # with an autoscaler that adds nodes on demand.
    wait_for_resources: bool = False

    def validate(self, p: str) -> None:
        _check(bool(self.run_name) and "/" not in self.run_name, f"{p}.run_name",
               "must be a non-empty name without '/'")
        _check(bool(self.storage_path), f"{p}.storage_path", "must not be empty")
        _range(self, p, "num_workers", 1)
        _range(self, p, "cpus_per_worker", 1)
        _check(self.zero_stage in (0, 1, 2), f"{p}.zero_stage",
               f"must be 0, 1 or 2 (got {self.zero_stage})")
        _check(self.precision in ("fp32", "bf16", "fp16"), f"{p}.precision",
               f"must be 'fp32', 'bf16' or 'fp16' (got {self.precision!r})")
        _check(self.precision != "fp16" or self.use_gpu, f"{p}.precision",
               "fp16 needs train.use_gpu: true (DeepSpeed refuses fp16 on CPUs; use bf16)")
        # DeepSpeed 0.19's engine.backward scales the loss only for its ZeRO optimizers,
        # while the fp16 optimizer of ZeRO 0 still divides the gradients by the scale: the
        # backbone would move ~scale times too little (deepspeedai/DeepSpeed PR #8393).
        _check(self.precision != "fp16" or self.zero_stage in (1, 2), f"{p}.precision",
               "fp16 needs train.zero_stage 1 or 2 (at ZeRO 0 DeepSpeed leaves the loss "
               "unscaled but unscales the gradients: deepspeedai/DeepSpeed PR #8393); or "
               "use bf16")
        _range(self, p, "gradient_accumulation_steps", 1)
        _check(self.head_precision in ("fp32", "bf16"), f"{p}.head_precision",
               "must be 'fp32' or 'bf16'")
        _range(self, p, "seed", 0, 2**32 - 1)
        _range(self, p, "log_every", 1)
        _range(self, p, "checkpoint_every", 1)
        _range(self, p, "keep_checkpoints", 1)
        _range(self, p, "max_failures", 0)
        _range(self, p, "max_nonfinite_steps", 0)
        _check(self.resume_from or not self.resume_weights_only, f"{p}.resume_weights_only",
               "needs train.resume_from (the checkpoint whose weights to take)")
        _check(not (self.init_from and self.resume_from), f"{p}.init_from",
               f"cannot be set together with train.resume_from ({self.resume_from}): "
               "init_from starts a new run from a backbone's weights, resume_from continues "
               "a run; keep one (resume_from + resume_weights_only also takes only weights)")
        if self.deepspeed_config:
            self.deepspeed_config = _local_absolute(self.deepspeed_config)
            _check_deepspeed_json(self.deepspeed_config, f"{p}.deepspeed_config")
        if self.init_from:
            self.init_from = _local_absolute(self.init_from)
            _check_init_from(self.init_from, f"{p}.init_from")


def _local_absolute(path: str) -> str:
    """A relative local path made absolute (Ray workers run in another working
    directory, and each validates the config again); URLs unchanged."""
    if "://" in path:
        return path
    return str(Path(path).expanduser().resolve())


def _check_deepspeed_json(uri: str, key: str) -> None:
    """The user's DeepSpeed JSON exists, parses and holds nothing seqface refuses."""
    from seqface_dist.deepspeed_json import DeepSpeedConfigError, read_json, refusals

    try:
        user = read_json(uri)
    except DeepSpeedConfigError as e:
        raise ConfigError(f"{key}: {e}") from None
    bad = refusals(user)
    if bad:
        raise ConfigError(f"{key}: {uri}: cannot run beside the partitioned head: "
                          + "; ".join(bad))


def _check_init_from(uri: str, key: str) -> None:
    """train.init_from names something readable of a kind it can load (the weights
    themselves are checked key by key and shape by shape when they load)."""
    if "://" in uri:
        try:
            import pyarrow.fs as pafs

            fs, path = pafs.FileSystem.from_uri(uri)
            info = fs.get_file_info(path)
        except (OSError, ValueError) as e:
            raise ConfigError(f"{key}: {uri}: cannot reach it ({e})") from None
        _check(info.type != pafs.FileType.NotFound, key, f"{uri}: does not exist")
        return
    p = Path(uri)
    _check(p.exists(), key, f"{uri}: does not exist")
    if p.is_dir():
        _check((p / "state.json").is_file() or (p / "model.json").is_file()
               or any(p.glob("checkpoint-*/state.json")), key,
               f"{uri}: neither a run (no checkpoint-*/state.json), a run checkpoint (no "
               "state.json) nor an export (no model.json)")
        return
    try:
        with open(p, "rb") as f:
            f.read(1)
    except OSError as e:
        raise ConfigError(f"{key}: {uri}: not readable ({e.strerror})") from None
    _check(p.suffix in (".pth", ".pt", ".safetensors"), key,
           f"{uri}: a file must be an arcface_torch .pth/.pt state dict or a "
           "backbone .safetensors")


@dataclass
class MetricsConfig:
    enabled: bool = True  # each worker serves Prometheus /metrics
    host: str = "127.0.0.1"  # loopback unless the cluster needs otherwise (0.0.0.0 on a cluster)
    # [0, 65535]; 0 = any free port (several workers per node never collide; found through
    # service_discovery_dir). P > 0 = a base port: the worker of local rank k (its index
    # among its node's workers) serves on P + k, fixed ports a PodMonitor can target
    # (cluster/kuberay-podmonitor.yaml); P + workers per node - 1 must stay <= 65535.
    port: int = 0
    # Address Prometheus scrapes; "" = the node IP when host is 0.0.0.0, else host.
    advertise_host: str = ""
    # Folder Prometheus watches (file_sd glob <dir>/*.json); the driver keeps <run>.json
    # there, listing every worker's endpoint. "" = no discovery file.
    service_discovery_dir: str = ""

    def validate(self, p: str) -> None:
        _check(bool(self.host), f"{p}.host", "must not be empty (127.0.0.1, 0.0.0.0, an IP)")
        _range(self, p, "port", 0, 65535)


# An evaluation set's name: a metric label value and a part of report keys.
EVAL_SET_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")


@dataclass
class EvalSetConfig:
    """One verification set rank 0 evaluates during training."""

    name: str = ""  # 1-64 of letters, digits, '_', '.', '-'; the key eval/<name>/...
    path: str = ""  # a .bin file or an LFW-style pairs.txt: local path, file:// or s3://
    root: str = ""  # image root of a pairs.txt set (local or s3://); "" for .bin

    def validate(self, p: str) -> None:
        _check(bool(EVAL_SET_NAME.match(self.name)), f"{p}.name",
               f"must be 1-64 letters, digits, '_', '.' or '-' (got {self.name!r})")
        _check(bool(self.path), f"{p}.path", "must name a .bin file or a pairs.txt")
        _check(eval_set_kind(self.path) == "bin" or bool(self.root), f"{p}.root",
               f"a pairs list ({self.path}) needs the image root folder")


def eval_set_kind(path: str) -> str:
    """``bin`` for an insightface ``.bin`` set, ``pairs`` for an LFW-style pairs.txt."""
    return "bin" if path.rstrip("/").endswith(".bin") else "pairs"


def eval_set_name(path: str) -> str:
    """A set named after its file (lfw.bin -> lfw) or folder."""
    base = path.rstrip("/").rsplit("/", 1)[-1]
    return base.rsplit(".", 1)[0] if "." in base else base


@dataclass
class EvalConfig:
    # Verification sets rank 0 evaluates every every_steps and at the end (arcface_torch
    # style: lfw, cfp_fp, agedb_30 .bin files together), each {name, path, root?}:
    #   sets: [{name: lfw, path: s3://bucket/eval/lfw.bin}, {name: cfp_fp, path: ...}]
    # Report keys eval/<name>/accuracy, ...; the eval metrics carry dataset=<name>.
    sets: list[EvalSetConfig] = field(default_factory=list)
    # Shorthand for one set: pairs (.bin or pairs.txt) and root (of a pairs.txt), named
    # after the .bin file's stem or the root folder (resolved_sets()). Not with sets.
    pairs: str = ""
    root: str = ""
    every_steps: int = 0  # >= 0; 0 = only at the end
    flip_test: bool = True  # embed each image and its mirror, sum the two

    def resolved_sets(self) -> list[EvalSetConfig]:
        """Every set to evaluate: ``sets``, or the one ``pairs``/``root`` describe."""
        if not self.pairs:
            return list(self.sets)
        kind = eval_set_kind(self.pairs)
        name = eval_set_name(self.pairs if kind == "bin" or not self.root else self.root)
        name = re.sub(r"[^A-Za-z0-9_.\-]", "_", name)[:64] or "pairs"
        return [EvalSetConfig(name=name, path=self.pairs, root=self.root)]

    def validate(self, p: str) -> None:
        _range(self, p, "every_steps", 0)
        _check(not (self.pairs and self.sets), f"{p}.pairs",
               "give either eval.pairs (one set) or eval.sets, not both")
        _check(bool(self.pairs) or not self.root, f"{p}.root",
               "is the image root of eval.pairs, which is empty (in eval.sets each set "
               "has its own root)")
        if self.pairs:
            _check(eval_set_kind(self.pairs) == "bin" or bool(self.root), f"{p}.root",
                   f"a pairs list ({self.pairs}) needs the image root folder")
        seen: set[str] = set()
        for i, s in enumerate(self.sets):
            s.validate(f"{p}.sets[{i}]")
            _check(s.name not in seen, f"{p}.sets[{i}].name",
                   f"{s.name!r} names two sets; each needs its own name")
            seen.add(s.name)


@dataclass
class TrackingConfig:
    """Experiment tracking, by rank 0 (seqface_dist.train.tracking): the dict every logged
    step writes to history.jsonl also goes to TensorBoard and, if set, MLflow."""

    # TensorBoard event files in <storage>/<run>/tensorboard/ (tensorboardX; on s3://
    # storage written locally and uploaded at every checkpoint and at the end).
    tensorboard: bool = True
    # An MLflow tracking URI (http://host:5000, sqlite:///mlflow.db, or file:///mlruns,
    # which MLflow 3 accepts only with MLFLOW_ALLOW_FILE_STORE=true); "" = no MLflow.
    # Needs `pip install mlflow-skinny` (or mlflow): params = the resolved config
    # flattened, metrics = every logged step's scalars.
    mlflow_uri: str = ""
    mlflow_experiment: str = "seqface"  # the MLflow experiment; the run is train.run_name

    def validate(self, p: str) -> None:
        _check(not self.mlflow_uri or bool(self.mlflow_experiment), f"{p}.mlflow_experiment",
               "must not be empty when tracking.mlflow_uri is set")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def validate(self) -> Config:
        for f in dataclasses.fields(self):
            getattr(self, f.name).validate(f.name)
        # Clipping covers backbone and head together, which needs the backbone's full
        # gradients in place: ZeRO 1/2 keep them partitioned inside the engine.
        _check(self.optim.grad_clip == 0 or self.train.zero_stage == 0, "optim.grad_clip",
               "gradient clipping needs train.zero_stage: 0 (ZeRO 1/2 partition gradients)")
        k = self.train.gradient_accumulation_steps
        per_worker = self.data.identities_per_batch + self.data.sequences_per_batch
        _check(per_worker % k == 0, "train.gradient_accumulation_steps",
               f"must divide the batch per worker (data.identities_per_batch + "
               f"data.sequences_per_batch = {per_worker}) into equal micro-batches (got {k})")
        # A fixed base port: local rank k serves on port + k, and a node holds at most
        # every worker (refused here, not when the last worker fails to bind).
        last = self.metrics.port + self.train.num_workers - 1
        _check(self.metrics.port == 0 or not self.metrics.enabled or last <= 65535,
               "metrics.port", f"{self.metrics.port} + up to {self.train.num_workers} workers "
               f"per node passes 65535 (the last would be {last})")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------
# Building a config from dicts, YAML and overrides, with type checks.


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Return value as type tp, or raise ConfigError naming key."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arm in typing.get_args(tp):
            if arm is type(None) and value is None:
                return None
        arms = [a for a in typing.get_args(tp) if a is not type(None)]
        return _coerce(value, arms[0], key)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):  # a list of sections (eval.sets)
        return _build(tp, value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {type(value).__name__} {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {type(value).__name__} {value!r}")
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"{key}: expected a number, got {type(value).__name__} {value!r}")
        if not math.isfinite(number):  # .inf / .nan pass every range check below
            raise ConfigError(f"{key}: must be a finite number (got {value!r})")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {type(value).__name__} {value!r}")
    raise TypeError(f"unsupported config type {tp} for {key}")


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"{where}{unknown[0]}: unknown key (known: {', '.join(sorted(names))})")
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, key)
        else:
            kwargs[name] = _coerce(value, tp, key)
    return cls(**kwargs)


def model_config_from(raw: dict[str, Any], where: str) -> ModelConfig:
    """The model section of a file that carries more beside it (an export's model.json,
    a checkpoint's resolved config): typed and validated, other keys ignored."""
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    cfg = _build(ModelConfig, {k: v for k, v in raw.items() if k in names}, where)
    cfg.validate(where)
    return cfg


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_override(text: str) -> dict[str, Any]:
    """``a.b=value`` -> {"a": {"b": value}}; the value is read as YAML (1e-3, true, [1, 2])."""
    if "=" not in text:
        raise ConfigError(f"{text}: an override must look like section.key=value")
    path, raw = text.split("=", 1)
    parts = path.strip().split(".")
    if not all(parts):
        raise ConfigError(f"{path}: an override key must look like section.key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: cannot parse value {raw!r}: {e}") from None
    out: dict[str, Any] = {parts[-1]: value}
    for part in reversed(parts[:-1]):
        out = {part: out}
    return out


def config_from_dict(data: dict[str, Any]) -> Config:
    """Build and validate a Config from a nested dict (missing keys take the defaults)."""
    return _build(Config, data, "").validate()


# The ready configs of the repository (configs/*.yaml): the named bases every command,
# experiment and bench starts from (`local-cpu` is the one a new user starts from).
CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


def named_config_path(name: str) -> Path:
    """configs/<name>.yaml, or ``name`` itself when it is a path to a YAML file."""
    p = Path(name)
    if p.suffix in (".yaml", ".yml"):
        return p
    path = CONFIG_DIR / f"{name}.yaml"
    if not path.is_file():
        known = sorted(q.stem for q in CONFIG_DIR.glob("*.yaml"))
        raise ConfigError(f"config {name!r}: no {path} (named configs: {', '.join(known)}; "
                          f"a non-editable install has none: pass a YAML path)")
    return path


def load_named(name: str, overrides: list[str] | None = None) -> Config:
    """A named base config (``local-cpu``, ``reference``, ...) with overrides."""
    return load_config(named_config_path(name), overrides)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the YAML file at ``path``, then ``section.key=value`` overrides."""
    data: dict[str, Any] = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p}: not found")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {p}: not valid YAML: {e}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p}: the top level must be a mapping")
        data = loaded
    for text in overrides or []:
        data = _merge(data, parse_override(text))
    return config_from_dict(data)
