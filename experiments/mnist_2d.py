"""The paper's 2-D feature figure on real MNIST (SeqFace, Hu et al. 2018, Fig. 3 analogue).

Digits 0-5 are labeled identities; digits 6-9 appear only as sequences: tracks of
`--track-len` training images of one digit, `--tracks-per-digit` tracks per digit, each
track its own sequence index (two tracks of one digit are not known to be one class).
A small CNN (`tiny`, three conv layers) with a 2-D embedding is trained four ways with the
same budget (steps x batch):

  a-only            identities 0-5 only
  lsr               + sequences through LSR (the paper: uniform target over the 6 identities)
  sequence_classes  + sequences as classes of their own (one classifier row per track)
  separate_heads    + sequences as classes in a softmax of their own
Every run trains through the one training step with the base config (`--config`,
default `configs/local-cpu.yaml`) at a 2-D embedding; DSA is on in all of them.

and the raw 2-D features of the 10,000 test digits (all ten, colored) are plotted, one
panel per run. The log also reports 10-fold verification accuracy on test pairs of the
never-labeled digits 6-9 (cosine of the 2-D features).

    python -m experiments.mnist_2d                      # ~3 min on one CPU thread
    python -m experiments.mnist_2d --steps 20 --limit 2000 --out /tmp/m2d   # smoke test
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from experiments.common import TrainData, condition_config, embed, experiment_config, train
from seqface_dist.data.mnist import load_mnist
from seqface_dist.eval.verification import cosine_scores, evaluate_scores

IDENTITY_DIGITS = (0, 1, 2, 3, 4, 5)
SEQUENCE_DIGITS = (6, 7, 8, 9)
RUNS = ("a-only", "lsr", "sequence_classes", "separate_heads")  # conditions of common.py


def make_tracks(x: np.ndarray, y: np.ndarray, digits, tracks_per_digit: int, track_len: int,
                rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Images of `digits` cut into tracks; returns (images, sequence index per image)."""
    images, seq = [], []
    for d in digits:
        idx = rng.permutation(np.flatnonzero(y == d))
        need = tracks_per_digit * track_len
        if len(idx) < need:
            raise ValueError(f"digit {d}: {len(idx)} images, {need} needed for "
                             f"{tracks_per_digit} tracks of {track_len}")
        for k in range(tracks_per_digit):
            images.append(x[idx[k * track_len:(k + 1) * track_len]])
            seq.append(np.full(track_len, len(seq), np.int64))
    return np.concatenate(images), np.concatenate(seq)


def verification_pairs(y: np.ndarray, digits, n_pairs: int,
                       rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(i, j, issame): n_pairs genuine then n_pairs impostor pairs, interleaved in 10 folds."""
    pool = np.flatnonzero(np.isin(y, digits))
    i, j, same = [], [], []
    while len(i) < 2 * n_pairs:
        a, b = rng.choice(pool, 2, replace=False)
        want_same = len(i) % 2 == 0
        if (y[a] == y[b]) == want_same:
            i.append(a)
            j.append(b)
            same.append(want_same)
    return np.asarray(i), np.asarray(j), np.asarray(same)


def plot(features: dict[str, np.ndarray], labels: np.ndarray, path: Path, title: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5 * len(features), 5), dpi=110)
    FigureCanvasAgg(fig)
    colors = [f"C{i}" for i in range(10)]
    for k, (name, f) in enumerate(features.items()):
        ax = fig.add_subplot(1, len(features), k + 1)
        for d in range(10):
            sel = labels == d
            kind = "identity" if d in IDENTITY_DIGITS else "sequences only"
            ax.scatter(f[sel, 0], f[sel, 1], s=1.5, c=colors[d], alpha=0.5,
                       label=f"{d} ({kind})", rasterized=True)
        ax.set_title(name)
        ax.set_aspect("equal", adjustable="datalim")
        ax.grid(True, alpha=0.3)
        if k == 0:
            ax.legend(markerscale=6, fontsize=7, loc="best")
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="local-cpu", help="the named base config")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=64,
                    help="identity images per step; sequence runs add as many track images")
    ap.add_argument("--set", dest="overrides", action="append", default=[],
                    metavar="KEY=VALUE", help="config override (repeatable)")
    ap.add_argument("--tracks-per-digit", type=int, default=20)
    ap.add_argument("--track-len", type=int, default=30)
    ap.add_argument("--limit", type=int, default=None,
                    help="use only the first N training and N test digits (smoke tests)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", default=",".join(RUNS), help=f"subset of {','.join(RUNS)}")
    ap.add_argument("--out", default="docs", help="folder for mnist2d.png and mnist2d.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    runs = args.runs.split(",")
    if bad := [r for r in runs if r not in RUNS]:
        ap.error(f"--runs: unknown {bad}; choose from {RUNS}")
    t0 = time.time()
    data = load_mnist()  # uint8, the loader's format
    x, y = data["train"]
    xt, yt = data["test"]
    if args.limit:
        x, y, xt, yt = x[:args.limit], y[:args.limit], xt[:args.limit], yt[:args.limit]
    rng = np.random.default_rng(args.seed)
    is_id = np.isin(y, IDENTITY_DIGITS)
    id_x, id_y = x[is_id], y[is_id]  # digits 0-5 are identities 0-5 already
    seq_x, seq_q = make_tracks(x, y, SEQUENCE_DIGITS, args.tracks_per_digit, args.track_len,
                               rng)
    n_seq = int(seq_q.max()) + 1
    print(f"MNIST: {len(id_y)} identity images (digits 0-5), {n_seq} sequences of "
          f"{args.track_len} (digits 6-9), {len(yt)} test digits", flush=True)
    pi, pj, same = verification_pairs(yt, SEQUENCE_DIGITS, min(1500, len(yt) // 4),
                                      np.random.default_rng(1234))
    features, report = {}, {"args": vars(args), "runs": {}}
    base = experiment_config(args.config, [
        "model.embedding_dim=2", "model.input_size=[28, 28]", "model.in_channels=1",
        "data.flip=false", "loss.dsa_p=0.1", f"optim.max_steps={args.steps}",
        f"data.identities_per_batch={args.batch}", f"data.sequences_per_batch={args.batch}",
        f"train.seed={args.seed}", *args.overrides])
    for name in runs:
        cfg = condition_config(base, name)
        tdata = TrainData(id_x, id_y, len(IDENTITY_DIGITS), seq_x, seq_q, n_seq)
        print(f"[{name}] training", flush=True)
        net, last, _ = train(cfg, tdata, tag=name)
        f = embed(net, xt)
        features[name] = f
        res = evaluate_scores(cosine_scores(f[pi], f[pj]), same, far_targets=(1e-2,))
        report["runs"][name] = {"final": last, "digits6to9_accuracy": res.accuracy,
                                "digits6to9_accuracy_std": res.accuracy_std,
                                "digits6to9_auc": res.auc}
        print(f"[{name}] digits 6-9 verification (cosine of 2-D features, "
              f"{res.n_pairs} pairs): 10-fold accuracy {res.accuracy:.4f} ± "
              f"{res.accuracy_std:.4f}, AUC {res.auc:.4f}", flush=True)
    out = Path(args.out)
    title = (f"MNIST test features, 2-D embedding: digits 0-5 identities, 6-9 only as "
             f"sequences ({base.loss.margin}, s={base.loss.scale:g}, {args.steps} steps)")
    plot(features, yt, out / "mnist2d.png", title)
    report["seconds"] = time.time() - t0
    (out / "mnist2d.json").write_text(json.dumps(report, indent=1, default=float))
    print(f"wrote {out / 'mnist2d.png'} and {out / 'mnist2d.json'} "
          f"({report['seconds']:.0f} s)", flush=True)
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
