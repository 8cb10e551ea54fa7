"""Shared by the training tests: MNIST shards, a tiny-run config, a run's history."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np

from seqface_dist.config import load_named
from seqface_dist.data.mnist import write_mnist_shards
from seqface_dist.train.history import history_path


def build_mnist_shards(out: Path) -> Path:
    """Identities: digits 0-4 (150 images each); sequences: 12 tracks of 25 (digits 5-7)."""
    write_mnist_shards(out)
    return out


def train_cfg(shards: Path, storage: Path, name: str, **over) -> dict:
    """The named base ``mnist-tiny`` on ``shards``; ``section__key=value`` overrides."""
    d = load_named("mnist-tiny").to_dict()
    d["data"].update(identity_shards=[str(shards / "ids")],
                     sequence_shards=[str(shards / "seqs")])
    d["train"].update(run_name=name, storage_path=str(storage))
    for key, value in over.items():
        section, field = key.split("__")
        d[section][field] = value
    return d


def history(cfg) -> list[dict]:
    """Rank 0's logged steps of the run ``cfg`` described."""
    return [json.loads(line) for line in history_path(cfg).read_text().splitlines()]


def mean(rows: list[dict], key: str) -> float:
    return float(np.mean([r[key] for r in rows]))


def run_while_watching(cfg, watch) -> tuple[object, list]:
    """``run(cfg)`` while ``watch(cfg, killed, stop)`` runs in a thread (it appends what it
    killed to ``killed`` and returns once ``stop`` is set); returns (result, killed)."""
    from seqface_dist.train.driver import run

    killed: list = []
    stop = threading.Event()
    threading.Thread(target=watch, args=(cfg, killed, stop), daemon=True).start()
    try:
        return run(cfg), killed
    finally:
        stop.set()
