"""Shared by the training tests: MNIST shards, a tiny-run config, a run's history."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from seqface_dist.data.mnist import write_mnist_shards
from seqface_dist.train.worker import history_path


def build_mnist_shards(out: Path) -> Path:
    """Identities: digits 0-4 (150 images each); sequences: 12 tracks of 25 (digits 5-7)."""
    write_mnist_shards(out)
    return out


def train_cfg(shards: Path, storage: Path, name: str, **over) -> dict:
    """A tiny 2-worker run on ``shards``; ``section__key=value`` overrides."""
    d = {
        "model": {"backbone": "tiny", "embedding_dim": 32, "input_size": [28, 28],
                  "in_channels": 1},
        "loss": {"scale": 16.0, "dsa_p": 0.3},
        "data": {"identity_shards": [str(shards / "ids")],
                 "sequence_shards": [str(shards / "seqs")],
                 "identities_per_batch": 16, "sequences_per_batch": 16, "num_workers": 1,
                 "shuffle_buffer": 100},
        "optim": {"lr": 0.05, "max_steps": 40, "milestones": [1000]},
        "train": {"run_name": name, "storage_path": str(storage), "num_workers": 2,
                  "log_every": 2, "checkpoint_every": 10, "max_failures": 0},
        "metrics": {"enabled": False},
    }
    for key, value in over.items():
        section, field = key.split("__")
        d.setdefault(section, {})[field] = value
    return d


def history(cfg) -> list[dict]:
    """Rank 0's logged steps of the run ``cfg`` described."""
    return [json.loads(line) for line in history_path(cfg).read_text().splitlines()]


def mean(rows: list[dict], key: str) -> float:
    return float(np.mean([r[key] for r in rows]))
