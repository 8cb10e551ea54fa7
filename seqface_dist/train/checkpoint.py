"""Run checkpoints: one folder holding everything a run needs to continue.

    engine/            the DeepSpeed engine's own files (backbone, its optimizer, ZeRO parts)
    head-rank*-of-*.safetensors   the head's row blocks with their global ranges
    rng-rank*.safetensors          each rank's torch RNG state
    state.json         step, epoch, samples seen, seeds, head metadata, resolved config

Every rank writes only its own files into a local folder that Ray Train merges into the
run's checkpoint (local disk or S3). ``state.json`` is written by rank 0 *last*, after a
barrier, and lists what a complete checkpoint holds; :func:`check_complete` refuses a
folder missing any of it, so a crash mid-write never leaves something that loads.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from seqface_dist.parallel import load_head, read_head_metadata, save_head

STATE_FILE = "state.json"
ENGINE_DIR = "engine"
ENGINE_TAG = "state"
FORMAT = "seqface-run/1"


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
    head: dict[str, Any] = field(default_factory=dict)  # spec + label layout
    config: dict[str, Any] = field(default_factory=dict)  # the resolved config
    format: str = FORMAT


def save_checkpoint(directory: str | Path, *, engine, head, head_optimizer, state: RunState,
                    rank: int, barrier) -> None:
    """Collective: every rank calls it with its own (empty) local ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    engine.save_checkpoint(str(directory / ENGINE_DIR), tag=ENGINE_TAG, save_latest=False)
    save_head(head, head_optimizer, directory)
    save_file({"cpu": torch.get_rng_state()}, str(directory / f"rng-rank{rank:05d}.safetensors"))
    barrier()  # every rank's files are written before rank 0 declares the folder complete
    if rank == 0:
        tmp = directory / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(asdict(state), indent=1, sort_keys=True))
        os.replace(tmp, directory / STATE_FILE)


def check_complete(directory: str | Path) -> RunState:
    """The run state of a complete checkpoint, or a CheckpointError saying what is missing."""
    directory = Path(directory)
    f = directory / STATE_FILE
    if not f.is_file():
        raise CheckpointError(f"{directory}: no {STATE_FILE} (not a checkpoint, or its write "
                              "did not finish)")
    raw = json.loads(f.read_text())
    if raw.get("format") != FORMAT:
        raise CheckpointError(f"{f}: unknown format {raw.get('format')!r}")
    state = RunState(**raw)
    if not (directory / ENGINE_DIR / ENGINE_TAG).is_dir():
        raise CheckpointError(f"{directory}: the DeepSpeed engine folder "
                              f"{ENGINE_DIR}/{ENGINE_TAG} is missing")
    blocks = read_head_metadata(directory)  # raises when rows are missing
    if len(blocks) != state.world_size:
        raise CheckpointError(f"{directory}: {len(blocks)} head blocks for a run of "
                              f"{state.world_size} ranks")
    return state


def load_checkpoint(directory: str | Path, *, engine, head, head_optimizer, rank: int,
                    world_size: int) -> RunState:
    """Restore engine, head and RNG; the head reshards to ``world_size`` ranks.

    The backbone is data-parallel, so its weights load on any number of ranks. Its
    optimizer state does too with ZeRO stage 0 (one full copy); with ZeRO 1/2 it is split
    per rank, so on a different world size only the weights load and the backbone's
    momentum restarts (said in the log).
    """
    directory = Path(directory)
    state = check_complete(directory)
    same_world = state.world_size == world_size
    module_only = not same_world and state.zero_stage > 0
    if module_only and rank == 0:
        print(f"[seqface] resuming ZeRO-{state.zero_stage} state of {state.world_size} ranks "
              f"on {world_size}: backbone weights load, its optimizer state restarts")
    path, _ = engine.load_checkpoint(
        str(directory / ENGINE_DIR), tag=ENGINE_TAG, load_module_only=module_only,
        load_optimizer_states=not module_only, load_lr_scheduler_states=False)
    if path is None:
        raise CheckpointError(f"{directory}: DeepSpeed could not load {ENGINE_DIR}/{ENGINE_TAG}")
    load_head(head, head_optimizer, directory)
    rng = directory / f"rng-rank{rank:05d}.safetensors"
    if same_world and rng.is_file():
        torch.set_rng_state(load_file(str(rng))["cpu"])
    else:  # a new world: fresh, distinct per-rank streams derived from the step
        torch.manual_seed(state.seed * 7919 + state.step * 104_729 + rank)
    return state
