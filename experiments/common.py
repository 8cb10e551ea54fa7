"""What the experiments share: in-memory data, the conditions, and training through the one
training step (`seqface_dist.train.step.Trainer`, as `seqface train` runs it).

An experiment's run is a config tree like any `seqface` command's: a named base (a file in
`configs/`, default `local-cpu`, the config a new user starts from) plus `key=value`
overrides. Budget rule: every condition draws `data.identities_per_batch` labeled images
per step for `optim.max_steps` steps; conditions with sequences add
`data.sequences_per_batch` B images on top; `a-only-2x` is the compute-matched control
(A only, at the doubled batch); `upper` labels B (its characters become identities).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from seqface_dist.config import SEQUENCE_MODES, Config, config_from_dict, load_named
from seqface_dist.data.normalize import normalize
from seqface_dist.train.memory import sample_batch
from seqface_dist.train.step import local_trainer, resolve_sequence_weight

# condition -> sequence_mode (None: no sequence samples)
CONDITIONS: dict[str, str | None] = {"a-only": None, "a-only-2x": None, "upper": None,
                                     **{m: m for m in SEQUENCE_MODES}}


@dataclass
class TrainData:
    """uint8 images (n, H, W); identities 0..N_id-1, sequences 0..N_seq-1."""

    id_images: np.ndarray
    id_labels: np.ndarray
    num_identities: int
    seq_images: np.ndarray | None = None
    seq_labels: np.ndarray | None = None
    num_sequences: int = 0


def experiment_config(base: str = "local-cpu", overrides: list[str] | None = None) -> Config:
    """configs/<base>.yaml (or a YAML path) with `key=value` overrides, validated."""
    return load_named(base, overrides)


def condition_config(cfg: Config, condition: str) -> Config:
    """The run's config of one condition under the budget rule."""
    if condition not in CONDITIONS:
        raise ValueError(f"condition {condition!r}: choose from {', '.join(CONDITIONS)}")
    d = cfg.to_dict()
    if condition == "a-only":
        d["data"]["sequences_per_batch"] = 0
    elif condition in ("a-only-2x", "upper"):  # upper: B labeled, drawn with A
        d["data"]["identities_per_batch"] += d["data"]["sequences_per_batch"]
        d["data"]["sequences_per_batch"] = 0
    elif CONDITIONS[condition]:
        d["loss"]["sequence_mode"] = CONDITIONS[condition]
    return config_from_dict(d)


def to_batch(images: np.ndarray) -> torch.Tensor:
    """(n, H, W) uint8 -> the loader's batch format, uint8 (n, H, W, 1)."""
    return torch.from_numpy(np.ascontiguousarray(images)).unsqueeze(-1)


def train(cfg: Config, data: TrainData, *, log=print,
          tag: str = "") -> tuple[nn.Module, dict, torch.Tensor]:
    """Train a fresh backbone on `data` with `cfg` through the one training step.

    Identity samples are drawn with replacement from `data.id_*`, sequence samples (if
    `data.sequences_per_batch` > 0) from `data.seq_*`; returns the net, the last step's
    figures and the head's classifier rows (identity rows first).
    """
    ns = cfg.data.sequences_per_batch
    if ns and (data.seq_images is None or data.num_sequences == 0):
        raise ValueError(f"{tag}: data.sequences_per_batch = {ns} but the data has no "
                         f"sequences")
    n_seq = data.num_sequences if ns else 0
    weight = resolve_sequence_weight(cfg, len(data.id_labels),
                                     len(data.seq_labels) if ns else 0)
    trainer = local_trainer(cfg, data.num_identities, n_seq, sequence_weight=weight)
    gen = torch.Generator().manual_seed(cfg.train.seed + 1)
    id_x, id_y = to_batch(data.id_images), torch.from_numpy(data.id_labels).long()
    seq_x = seq_t = None
    if ns:
        seq_x = to_batch(data.seq_images)
        seq_t = torch.from_numpy(data.seq_labels).long() + data.num_identities
    steps, every = cfg.optim.max_steps, max(1, cfg.optim.max_steps // 4)
    trainer.module.train()
    t0, last = time.time(), {}
    for step in range(steps):
        x, t = sample_batch(id_x, id_y, seq_x, seq_t, cfg.data, gen)
        res = trainer.step(x, t, step)
        last = {k: v for k, v in res.losses().items() if v == v}
        if (step + 1) % every == 0 or step + 1 == steps:
            log(f"  {tag} step {step + 1}/{steps} " + " ".join(
                f"{k} {v:.3f}" for k, v in last.items()) + f" lr {res.lr:.4f} "
                f"({time.time() - t0:.0f} s)")
    last["seconds"] = time.time() - t0
    last["skipped_steps"] = trainer.skipped_steps  # non-finite steps, nothing applied
    last["sequence_weight"] = weight
    return trainer.module, last, trainer.head.weight.detach()


@torch.no_grad()
def embed(net: nn.Module, images: np.ndarray, batch: int = 512) -> np.ndarray:
    """Features (n, D) of uint8 (n, H, W) images, the net in eval mode."""
    net.eval()
    out = [net(normalize(to_batch(images[i:i + batch]))).numpy()
           for i in range(0, len(images), batch)]
    net.train()
    return np.concatenate(out).astype(np.float64)
