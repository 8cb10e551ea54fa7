"""Head checkpoints that reshard: each rank saves its rows with their global ranges.

One safetensors file per rank, ``head-rank{r}-of-{R}.safetensors``, holding
``weight``/``id_centers`` (identity rows [id0, id1)) and ``seq_centers`` (sequence rows
[sq0, sq1); also ``seq_weight`` in the sequence modes with one W row per sequence) with
their momentum buffers, and, as string metadata, the row ranges and the
head's spec and loss options. Loading onto R' ranks reads only the slices that overlap
each rank's new block (``safe_open(...).get_slice``), so no rank ever holds a full matrix.
safetensors has no code path that executes data, unlike pickle.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .head import PartitionedHead

_FORMAT = "seqface-head/1"
_KINDS = {  # tensor name -> which row range it follows
    "weight": "id_rows", "weight.momentum": "id_rows",
    "seq_weight": "seq_rows", "seq_weight.momentum": "seq_rows",
    "id_centers": "id_rows", "id_centers.momentum": "id_rows",
    "seq_centers": "seq_rows", "seq_centers.momentum": "seq_rows",
}


class HeadCheckpointError(ValueError):
    """A head checkpoint is missing, incomplete or does not match the head."""


def _momentum(opt: torch.optim.Optimizer | None, p: torch.Tensor) -> torch.Tensor | None:
    if opt is None:
        return None
    return opt.state.get(p, {}).get("momentum_buffer")


def save_head(head: PartitionedHead, optimizer: torch.optim.Optimizer | None,
              directory: str | Path) -> Path:
    """Write this rank's rows (and momentum buffers) into ``directory``; returns the file."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    n_local_id = head.id_rows[1] - head.id_rows[0]
    tensors = {**_split_weight(head, head.weight.detach()),
               "id_centers": head.centers.detach()[:n_local_id],
               "seq_centers": head.centers.detach()[n_local_id:]}
    mw, mc = _momentum(optimizer, head.weight), _momentum(optimizer, head.centers)
    if mw is not None:
        tensors.update({f"{k}.momentum": v for k, v in _split_weight(head, mw).items()})
    if mc is not None:
        tensors["id_centers.momentum"] = mc[:n_local_id]
        tensors["seq_centers.momentum"] = mc[n_local_id:]
    meta = {
        "format": _FORMAT,
        "rank": head.rank, "world_size": head.layout.world_size,
        "id_rows": list(head.id_rows), "seq_rows": list(head.seq_rows),
        "spec": dataclasses.asdict(head.spec),
        "loss": dataclasses.asdict(head.cfg),
        "dtype": str(head.weight.dtype),
    }
    path = directory / f"head-rank{head.rank:05d}-of-{head.layout.world_size:05d}.safetensors"
    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(tmp),
              metadata={"seqface": json.dumps(meta)})
    os.replace(tmp, path)  # a crash mid-write never leaves a file that looks complete
    return path


def read_head_metadata(directory: str | Path) -> list[tuple[Path, dict]]:
    """(file, metadata) of every head block in ``directory``, validated for coverage."""
    directory = Path(directory)
    files = sorted(directory.glob("head-rank*-of-*.safetensors"))
    if not files:
        raise HeadCheckpointError(f"{directory}: no head blocks (head-rank*-of-*.safetensors)")
    blocks = []
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            raw = (sf.metadata() or {}).get("seqface")
        if raw is None:
            raise HeadCheckpointError(f"{f}: not a seqface head block (no metadata)")
        meta = json.loads(raw)
        if meta.get("format") != _FORMAT:
            raise HeadCheckpointError(f"{f}: unknown format {meta.get('format')!r}")
        blocks.append((f, meta))
    spec0 = blocks[0][1]["spec"]
    for f, meta in blocks[1:]:
        if meta["spec"] != spec0:
            raise HeadCheckpointError(f"{f}: spec {meta['spec']} differs from {spec0} "
                                      f"in {blocks[0][0].name}")
    for key, total in (("id_rows", spec0["num_identities"]),
                       ("seq_rows", spec0["num_sequences"])):
        ranges = sorted(tuple(m[key]) for _, m in blocks)
        pos = 0
        for start, stop in ranges:
            if start != pos:
                raise HeadCheckpointError(
                    f"{directory}: {key} {pos}..{start - 1} missing (blocks cover {ranges})")
            pos = stop
        if pos != total:
            raise HeadCheckpointError(
                f"{directory}: {key} {pos}..{total - 1} missing (blocks cover {ranges})")
    return blocks


def load_head(head: PartitionedHead, optimizer: torch.optim.Optimizer | None,
              directory: str | Path) -> None:
    """Fill this rank's rows (and momentum) from a checkpoint saved on any number of ranks.

    Refuses a checkpoint whose N_id, N_seq or D differ from the head's, or that misses
    rows — never a silent re-initialisation.
    """
    blocks = read_head_metadata(directory)
    saved = blocks[0][1]["spec"]
    for key in ("num_identities", "num_sequences", "dim"):
        if saved[key] != getattr(head.spec, key):
            raise HeadCheckpointError(
                f"{directory}: checkpoint has {key}={saved[key]}, this head has "
                f"{key}={getattr(head.spec, key)}")
    n_local_id = head.id_rows[1] - head.id_rows[0]
    names0 = _names(blocks[0][0])
    if head.sequence_rows and "seq_weight" not in names0:
        raise HeadCheckpointError(
            f"{directory}: the checkpoint's classifier has no sequence rows (saved with "
            f"sequence_mode {blocks[0][1]['loss'].get('sequence_mode', 'lsr')!r}); this head's "
            f"mode {head.mode!r} needs them")
    if not head.sequence_rows and "seq_weight" in names0:
        raise HeadCheckpointError(
            f"{directory}: the checkpoint's classifier has sequence rows (sequence_mode "
            f"{blocks[0][1]['loss'].get('sequence_mode')!r}); this head's mode {head.mode!r} "
            f"has none")
    with torch.no_grad():
        targets = {**_split_weight(head, head.weight),
                   "id_centers": head.centers[:n_local_id],
                   "seq_centers": head.centers[n_local_id:]}
        mw, mc = _momentum(optimizer, head.weight), _momentum(optimizer, head.centers)
        has_momentum = all("weight.momentum" in _names(f) for f, _ in blocks)
        if optimizer is not None and has_momentum:
            if mw is None:
                mw = optimizer.state[head.weight]["momentum_buffer"] = torch.zeros_like(
                    head.weight)
            if mc is None:
                mc = optimizer.state[head.centers]["momentum_buffer"] = torch.zeros_like(
                    head.centers)
            targets.update({f"{k}.momentum": v for k, v in _split_weight(head, mw).items()})
            targets.update({"id_centers.momentum": mc[:n_local_id],
                            "seq_centers.momentum": mc[n_local_id:]})
        mine = {"id_rows": head.id_rows, "seq_rows": head.seq_rows}
        for f, meta in blocks:
            with safe_open(str(f), framework="pt") as sf:
                names = set(sf.keys())
                for name, dst in targets.items():
                    (lo, hi), (s0, s1) = mine[_KINDS[name]], meta[_KINDS[name]]
                    a, b = max(lo, s0), min(hi, s1)
                    if a >= b:
                        continue
                    if name not in names:
                        raise HeadCheckpointError(f"{f}: tensor {name!r} missing")
                    part = sf.get_slice(name)[a - s0:b - s0]
                    dst[a - lo:b - lo].copy_(part)


def _split_weight(head: PartitionedHead, w: torch.Tensor) -> dict[str, torch.Tensor]:
    """W's local block (or its momentum) as identity rows and, if any, sequence rows."""
    n_local_id = head.id_rows[1] - head.id_rows[0]
    if not head.sequence_rows:
        return {"weight": w}
    return {"weight": w[:n_local_id], "seq_weight": w[n_local_id:]}


def _names(path: Path) -> set[str]:
    with safe_open(str(path), framework="pt") as sf:
        return set(sf.keys())
