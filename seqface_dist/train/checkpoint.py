"""Run checkpoints: one folder holding everything a run needs to continue.

    engine/            the DeepSpeed engine's own files (backbone, its optimizer, ZeRO parts)
    head-rank*-of-*.safetensors   the head's row blocks with their global ranges
    rng-rank*.safetensors          each rank's torch RNG state
    backbone-momentum.safetensors  ZeRO 1/2 (rank 0): the backbone's whole momentum per
                                   parameter, so a resume on another number of ranks keeps it
    export/            rank 0, last step only: the standalone embedding network
    state.json         the commit: step, seeds, head layout, data identity, resolved config,
                       and every file above with its size and sha256

Every rank writes only its own files into a local folder and lists them
(:func:`write_rank_files`); Ray Train uploads each rank's folder into the run's checkpoint
on its own, in no order. ``state.json`` is therefore *not* part of any upload: once every
rank's upload has returned, rank 0 writes it into the persisted folder
(:mod:`seqface_dist.train.commit`). A folder is complete only if ``state.json`` exists and
every file it lists is there with its size and hash (:func:`check_complete`), so a crash or
a full disk mid-upload never leaves something that loads.

Nothing here unpickles: the head and RNG files are safetensors, ``state.json`` is JSON, and
the engine's files are read through :mod:`seqface_dist.train.safe_load` (``torch.load``
with ``weights_only=True``).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from seqface_dist.parallel import HeadCheckpointError, load_head, read_head_metadata, save_head

STATE_FILE = "state.json"
BACKBONE_MOMENTUM = "backbone-momentum.safetensors"
MOMENTUM_KEY = "momentum_buffer"  # torch SGD's state name (the backbone's optimizer)
ENGINE_DIR = "engine"
ENGINE_TAG = "state"
FORMAT = "seqface-run/2"  # /2: state.json lists every file (size, sha256) and the data


class CheckpointError(ValueError):
    """A run checkpoint is incomplete or does not fit the run."""


@dataclass
class RunState:
    step: int = 0
    epoch: int = 0
    samples_seen: int = 0
    world_size: int = 1
    zero_stage: int = 0
    seed: int = 0
    skipped_steps: int = 0  # non-finite steps skipped so far (train.max_nonfinite_steps)
    head: dict[str, Any] = field(default_factory=dict)  # spec + label layout (with digests)
    config: dict[str, Any] = field(default_factory=dict)  # the resolved config
    files: dict[str, dict[str, Any]] = field(default_factory=dict)  # path -> bytes, sha256
    format: str = FORMAT

    def to_json(self) -> bytes:
        return (json.dumps(asdict(self), indent=1, sort_keys=True) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes, where: str) -> RunState:
        try:
            raw = json.loads(data)
        except (ValueError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{where}: not JSON ({e}); the commit did not finish") from None
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            got = raw.get("format") if isinstance(raw, dict) else type(raw).__name__
            raise CheckpointError(f"{where}: format {got!r}, this version reads {FORMAT!r}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise CheckpointError(f"{where}: unknown keys {unknown} (written by another "
                                  "version?)")
        return cls(**raw)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def list_files(directory: str | Path) -> dict[str, dict[str, Any]]:
    """Every regular file under ``directory``: relative POSIX path -> bytes, sha256."""
    directory = Path(directory)
    return {p.relative_to(directory).as_posix(): {"bytes": p.stat().st_size,
                                                  "sha256": sha256_file(p)}
            for p in sorted(directory.rglob("*")) if p.is_file()}


def write_rank_files(directory: str | Path, *, engine, head, head_optimizer,
                     rank: int) -> dict[str, dict[str, Any]]:
    """Collective (DeepSpeed saves together): this rank's files into its own local
    ``directory``; returns their listing for the commit."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    engine.save_checkpoint(str(directory / ENGINE_DIR), tag=ENGINE_TAG, save_latest=False)
    momentum = gather_backbone_momentum(engine)
    if momentum is not None and rank == 0:
        save_file(momentum, str(directory / BACKBONE_MOMENTUM))
    save_head(head, head_optimizer, directory)
    save_file({"cpu": torch.get_rng_state()}, str(directory / f"rng-rank{rank:05d}.safetensors"))
    return list_files(directory)


def gather_backbone_momentum(engine) -> dict[str, torch.Tensor] | None:
    """ZeRO 1/2: each backbone parameter's whole momentum, assembled from every rank's
    partition (a collective: all ranks call it). None at ZeRO 0, whose engine file holds
    the momentum whole, and before the first step (there is none yet)."""
    if engine.zero_optimization_stage() == 0 or not engine.optimizer.optimizer.state:
        return None
    from deepspeed.utils import safe_get_full_optimizer_state

    return {name: safe_get_full_optimizer_state(p, MOMENTUM_KEY).detach().cpu().contiguous()
            for name, p in engine.module.named_parameters() if p.requires_grad}


def scatter_backbone_momentum(engine, momentum: dict[str, torch.Tensor], where: str) -> None:
    """Set each backbone parameter's momentum into this rank's ZeRO 1/2 partition: the
    momentum saved on another number of ranks continues here (DeepSpeed's
    safe_set_full_optimizer_state, after creating the state its first step would)."""
    from deepspeed.utils import safe_set_full_optimizer_state

    params = {n: p for n, p in engine.module.named_parameters() if p.requires_grad}
    if set(params) != set(momentum):
        missing, extra = sorted(set(params) - set(momentum)), sorted(set(momentum) - set(params))
        raise CheckpointError(f"{where}: backbone momentum does not fit this backbone "
                              f"(missing {missing[:3]}, unknown {extra[:3]})")
    zero = engine.optimizer
    for flat in zero.single_partition_of_fp32_groups:
        zero.optimizer.state[flat].setdefault(MOMENTUM_KEY, torch.zeros_like(flat))
    zero._hp_optimizer_states_linked = False  # link the fragments to the state just made
    zero._lazy_init_hp_params_optimizer_state()
    for name, p in params.items():
        if momentum[name].shape != p.shape:
            raise CheckpointError(f"{where}: momentum of {name} has shape "
                                  f"{tuple(momentum[name].shape)}, the parameter {tuple(p.shape)}")
        safe_set_full_optimizer_state(p, momentum[name].to(p.device, torch.float32),
                                      MOMENTUM_KEY)


def check_complete(directory: str | Path, *, verify_hashes: bool = True) -> RunState:
    """The run state of a complete local checkpoint, or a CheckpointError naming what is
    missing or wrong (``verify_hashes=False`` checks sizes only)."""
    directory = Path(directory)
    f = directory / STATE_FILE
    if not f.is_file():
        raise CheckpointError(f"{directory}: no {STATE_FILE} (not a checkpoint, or its commit "
                              "did not happen)")
    state = RunState.from_json(f.read_bytes(), str(f))
    for rel, want in sorted(state.files.items()):
        p = directory / rel
        if not p.is_file():
            raise CheckpointError(f"{directory}: {rel} is listed in {STATE_FILE} but missing")
        if p.stat().st_size != want["bytes"]:
            raise CheckpointError(f"{directory}: {rel} has {p.stat().st_size:,} bytes, "
                                  f"{STATE_FILE} lists {want['bytes']:,} (cut mid-write?)")
        if verify_hashes and sha256_file(p) != want["sha256"]:
            raise CheckpointError(f"{directory}: {rel} does not match its sha256 in "
                                  f"{STATE_FILE} (changed after the commit)")
    if not any(rel.startswith(f"{ENGINE_DIR}/{ENGINE_TAG}/") for rel in state.files):
        raise CheckpointError(f"{directory}: {STATE_FILE} lists no DeepSpeed engine files")
    try:
        blocks = read_head_metadata(directory)  # raises when rows are missing
    except (HeadCheckpointError, SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{directory}: head blocks unreadable: {e}") from None
    if len(blocks) != state.world_size:
        raise CheckpointError(f"{directory}: {len(blocks)} head blocks for a run of "
                              f"{state.world_size} ranks")
    return state


def describe_data_change(saved: dict, now: dict) -> str | None:
    """What differs between the label layout a checkpoint was trained on and this run's
    (class counts and label-map digests per shard set), or None when it is the same data."""
    for kind in ("identity_sets", "sequence_sets"):
        a, b = saved.get(kind, []), now.get(kind, [])
        if len(a) != len(b):
            return f"{len(a)} {kind.replace('_', ' ')} in the checkpoint, {len(b)} now"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            for key in ("num_classes", "label_digest"):
                if x.get(key) != y.get(key):
                    return (f"{kind}[{i}] ({y.get('url')}): {key} {x.get(key)} in the "
                            f"checkpoint ({x.get('url')}), {y.get(key)} now")
    return None


def load_checkpoint(directory: str | Path, *, engine, head, head_optimizer, rank: int,
                    world_size: int, weights_only: bool = False,
                    data_layout: dict | None = None) -> RunState:
    """Restore engine, head and RNG; the head reshards to ``world_size`` ranks.

    The backbone is data-parallel, so its weights load on any number of ranks. Its
    optimizer state does too with ZeRO stage 0 (one full copy); with ZeRO 1/2 it is split
    per rank, so on a different world size the weights load from the engine's files and
    the momentum from ``backbone-momentum.safetensors`` (whole per parameter), re-split
    over the new ranks (without that file, from an older checkpoint, the momentum
    restarts, said in the log). ``weights_only``: the backbone's weights only; the
    head, optimizer and RNG keep their fresh state (a new head for other data).
    ``data_layout`` (this run's label layout): refuse a checkpoint trained on other data,
    unless only the weights are taken.
    """
    from seqface_dist.train.safe_load import UnsafeCheckpointError

    directory = Path(directory)
    state = check_complete(directory)
    if data_layout is not None and not weights_only:
        change = describe_data_change(state.head.get("layout", {}), data_layout)
        if change:
            raise CheckpointError(f"{directory}: trained on other data: {change}; resume with "
                                  "train.resume_weights_only (--resume-weights-only) for a "
                                  "new head")
    same_world = state.world_size == world_size
    module_only = weights_only or (not same_world and state.zero_stage > 0)
    momentum_file = directory / BACKBONE_MOMENTUM
    regather = module_only and not weights_only  # ZeRO 1/2 on another number of ranks
    if regather and rank == 0:
        logging.getLogger("seqface").info(
            "[seqface] resuming ZeRO-%d state of %d ranks on %d: backbone weights load, its "
            "momentum %s", state.zero_stage, state.world_size, world_size,
            "is re-split over the new ranks" if momentum_file.is_file() else
            "restarts (this checkpoint has no backbone-momentum file)")
    try:
        path, _ = engine.load_checkpoint(
            str(directory / ENGINE_DIR), tag=ENGINE_TAG, load_module_only=module_only,
            load_optimizer_states=not module_only, load_lr_scheduler_states=False)
    except UnsafeCheckpointError as e:
        raise CheckpointError(str(e)) from None
    if path is None:
        raise CheckpointError(f"{directory}: DeepSpeed could not load {ENGINE_DIR}/{ENGINE_TAG}")
    if momentum_file.is_file() and not weights_only:  # read (checked) even when unused
        try:
            momentum = load_file(str(momentum_file))
        except SafetensorError as e:
            raise CheckpointError(f"{momentum_file}: unreadable ({e})") from None
        if regather:
            scatter_backbone_momentum(engine, momentum, str(momentum_file))
    if weights_only:
        return state
    load_head(head, head_optimizer, directory)
    rng = directory / f"rng-rank{rank:05d}.safetensors"
    if same_world:
        if not rng.is_file():
            raise CheckpointError(f"{directory}: {rng.name} missing for rank {rank}")
        try:
            torch.set_rng_state(load_file(str(rng))["cpu"])
        except (SafetensorError, KeyError) as e:
            raise CheckpointError(f"{rng}: not an RNG state ({e})") from None
    else:  # a new world: fresh, distinct per-rank streams derived from the step
        torch.manual_seed(state.seed * 7919 + state.step * 104_729 + rank)
    return state
