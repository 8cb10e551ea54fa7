"""Single-process smoke training through the one training step (`train.step.Trainer`).

A few hundred SGD steps on a small in-memory set of synthetic, clustered images, with
every piece of the real objective: identity classes, sequence tracks (two tracks may be
one person, as in videos), mixed batches, the DSA centers moved by their center update.
It answers "does the whole objective train end to end?" in well under a minute on a CPU:
each loss term falls, and verification on *unseen* classes beats the untrained net.

    seqface smoke                                  # configs/smoke.yaml
    seqface smoke --steps 100 loss.dsa_weight=0.1
    python -c "from seqface_dist.train.smoke import run_smoke; print(run_smoke())"

The data is *not* the demo's: each class is a fixed random low-frequency template, and a
sample is that template, shifted, rescaled and noisy. A track adds its own fixed
perturbation to its person's template, so frames of one track are closer than frames of
one person.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from seqface_dist.config import Config, load_config, load_named
from seqface_dist.data.normalize import normalize
from seqface_dist.eval.verification import evaluate_scores
from seqface_dist.train.memory import sample_batch
from seqface_dist.train.step import local_trainer, resolve_sequence_weight


@dataclass
class SyntheticSpec:
    """Sizes and difficulty of the synthetic set (not config: it only exists for the smoke)."""

    identities: int = 64  # labeled classes (chief loss targets)
    persons_in_tracks: int = 32  # other people, seen only as tracks
    tracks_per_person: int = 2  # so some pairs of sequence centers are one person
    samples_per_identity: int = 24
    frames_per_track: int = 12
    unseen_classes: int = 20  # held out: verification only
    samples_per_unseen: int = 10
    noise: float = 1.2  # per-sample pixel noise (templates have unit std)
    track_jitter: float = 0.3  # a track's fixed perturbation of its person's template
    max_shift: int = 1  # pixels of random translation per sample
    verification_pairs: int = 600  # of each kind (same / different)


def smoke_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """The smoke run's config: configs/smoke.yaml (or the YAML file at ``path``) plus
    overrides."""
    return load_config(path, overrides) if path else load_named("smoke", overrides)


# ---------------------------------------------------------------------------------------
# Synthetic clustered images.


def _templates(n: int, size: tuple[int, int], channels: int, g: torch.Generator) -> torch.Tensor:
    # Low-frequency patterns (8x8 noise upsampled): a conv net can learn them, and the
    # random shifts below make raw-pixel cosine a poor matcher.
    small = torch.randn(n, channels, 8, 8, generator=g)
    t = F.interpolate(small, size=size, mode="bilinear", align_corners=False)
    t = t - t.mean(dim=(1, 2, 3), keepdim=True)
    return t / t.std(dim=(1, 2, 3), keepdim=True)


def _draw(base: torch.Tensor, spec: SyntheticSpec, g: torch.Generator) -> torch.Tensor:
    """One noisy, shifted, rescaled sample of each row of ``base``."""
    n = base.shape[0]
    gain = 1.0 + 0.2 * (torch.rand(n, 1, 1, 1, generator=g) - 0.5)
    x = gain * base + spec.noise * torch.randn(base.shape, generator=g)
    shifts = torch.randint(-spec.max_shift, spec.max_shift + 1, (n, 2), generator=g)
    return torch.stack([torch.roll(x[i], (int(s[0]), int(s[1])), dims=(1, 2))
                        for i, s in enumerate(shifts)])


@dataclass
class SmokeData:
    id_images: torch.Tensor  # uint8 (n, H, W, C), center index = identity
    id_index: torch.Tensor
    seq_images: torch.Tensor  # center index = N_id + track
    seq_index: torch.Tensor
    unseen_images: torch.Tensor  # held-out classes, never trained on
    unseen_label: torch.Tensor
    num_identities: int
    num_sequences: int


def make_smoke_data(spec: SyntheticSpec, size: tuple[int, int], channels: int,
                    seed: int) -> SmokeData:
    g = torch.Generator().manual_seed(seed)
    n_id, n_tracks = spec.identities, spec.persons_in_tracks * spec.tracks_per_person
    t = _templates(n_id + spec.persons_in_tracks + spec.unseen_classes, size, channels, g)
    t_id, t_person, t_unseen = t.split([n_id, spec.persons_in_tracks, spec.unseen_classes])

    id_index = torch.arange(n_id).repeat_interleave(spec.samples_per_identity)
    id_images = _draw(t_id[id_index], spec, g)

    person_of_track = torch.arange(spec.persons_in_tracks).repeat_interleave(
        spec.tracks_per_person)
    t_track = t_person[person_of_track] + spec.track_jitter * torch.randn(
        (n_tracks, *t.shape[1:]), generator=g)
    track = torch.arange(n_tracks).repeat_interleave(spec.frames_per_track)
    seq_images = _draw(t_track[track], spec, g)

    unseen_label = torch.arange(spec.unseen_classes).repeat_interleave(spec.samples_per_unseen)
    unseen_images = _draw(t_unseen[unseen_label], spec, g)
    return SmokeData(_to_uint8(id_images), id_index, _to_uint8(seq_images), n_id + track,
                     _to_uint8(unseen_images), unseen_label, n_id, n_tracks)


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    """(n, C, H, W) float samples -> uint8 (n, H, W, C): the loader's batch format, so the
    smoke trains through the same input normalisation as every other run."""
    return (x * 24.0 + 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1) \
        .contiguous()


# ---------------------------------------------------------------------------------------
# Verification on unseen classes: cosine similarity, threshold chosen on the other folds.


def verification_pairs(labels: torch.Tensor, n_pairs: int,
                       g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """n_pairs same-class and n_pairs different-class index pairs (i, j, same)."""
    n = labels.shape[0]
    same_i, same_j, diff_i, diff_j = [], [], [], []
    while len(same_i) < n_pairs or len(diff_i) < n_pairs:
        i, j = torch.randint(0, n, (2, 4 * n_pairs), generator=g)
        keep = i != j
        i, j = i[keep], j[keep]
        s = labels[i] == labels[j]
        same_i += i[s].tolist()
        same_j += j[s].tolist()
        diff_i += i[~s].tolist()
        diff_j += j[~s].tolist()
    ii = torch.tensor(same_i[:n_pairs] + diff_i[:n_pairs])
    jj = torch.tensor(same_j[:n_pairs] + diff_j[:n_pairs])
    same = torch.arange(2 * n_pairs) < n_pairs
    return ii, jj, same


@torch.no_grad()
def verify(net: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor,
           n_pairs: int, seed: int) -> dict[str, float]:
    was_training = net.training
    net.eval()
    feats = F.normalize(torch.cat([net(normalize(b)) for b in images.split(256)]), dim=1)
    net.train(was_training)
    i, j, same = verification_pairs(labels, n_pairs, torch.Generator().manual_seed(seed))
    scores = (feats[i] * feats[j]).sum(dim=1)
    # 10 folds drawn at random, so the fold split owes nothing to the pairs' order.
    folds = torch.randperm(len(scores), generator=torch.Generator().manual_seed(seed)) % 10
    res = evaluate_scores(scores.numpy(), same.numpy(), folds=folds.numpy())
    return {"accuracy": res.accuracy, "threshold": res.threshold}


# ---------------------------------------------------------------------------------------
# Training.


def mixed_batch(data: SmokeData, cfg: Config,
                g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """data.identities_per_batch identity samples, then data.sequences_per_batch track frames
    (drawn with replacement), optionally flipped: images and center indices."""
    return sample_batch(data.id_images, data.id_index, data.seq_images, data.seq_index,
                        cfg.data, g)


TERMS = ("total", "chief", "dsa", "pull", "push", "active")


def run_smoke(cfg: Config | None = None, *, spec: SyntheticSpec | None = None,
              log: Callable[[str], None] | None = print,
              progress: Callable[[int], None] | None = None,
              threads: int | None = 1) -> dict[str, Any]:
    """Train for cfg.optim.max_steps steps; return loss windows and verification figures.

    ``log`` gets a line every train.log_every steps (None: silent); ``progress`` is called
    with 1 after each step (a tqdm bar's update). ``threads``: torch intra-op threads for
    the run (restored after; None leaves torch's setting). One by default: the tiny net's
    ops are too small to gain from more, and on a busy 2-core machine two threads per
    process made the run 16x slower (240 s vs 15 s) through oversubscription.
    """
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _run_smoke(cfg or smoke_config(), spec or SyntheticSpec(), log, progress)
    finally:
        torch.set_num_threads(previous)


def _run_smoke(cfg: Config, spec: SyntheticSpec, log: Callable[[str], None] | None,
               progress: Callable[[int], None] | None) -> dict[str, Any]:
    steps = cfg.optim.max_steps
    size = (cfg.model.input_size[0], cfg.model.input_size[1])
    data = make_smoke_data(spec, size, cfg.model.in_channels, cfg.train.seed)
    weight = resolve_sequence_weight(cfg, len(data.id_index), len(data.seq_index))
    trainer = local_trainer(cfg, data.num_identities, data.num_sequences,
                            sequence_weight=weight)
    net = trainer.module

    before = verify(net, data.unseen_images, data.unseen_label, spec.verification_pairs,
                    cfg.train.seed)
    g = torch.Generator().manual_seed(cfg.train.seed + 1)
    history: list[dict[str, float]] = []
    start = time.perf_counter()
    net.train()
    for step in range(steps):
        x, idx = mixed_batch(data, cfg, g)
        res = trainer.step(x, idx, step)
        o = res.out
        if progress is not None:
            progress(1)
        if res.skipped:  # nothing was updated; its non-finite losses would poison the means
            if log is not None:
                log(f"step {step + 1:5d}/{steps}  skipped (not finite: "
                    f"{', '.join(res.nonfinite)}; {res.skipped_steps} so far)")
            continue
        history.append({"total": float(o.loss.detach()), "chief": float(o.chief),
                        "dsa": float(o.dsa), "pull": float(o.dsa_pull),
                        "push": float(o.dsa_push), "active": float(o.active_fraction)})
        if log is not None and ((step + 1) % cfg.train.log_every == 0 or step == 0):
            h = history[-1]
            log(f"step {step + 1:5d}/{steps}  lr {res.lr:.4g}  "
                + "  ".join(f"{k} {h[k]:.4f}" for k in TERMS))
    seconds = time.perf_counter() - start
    after = verify(net, data.unseen_images, data.unseen_label, spec.verification_pairs,
                   cfg.train.seed)
    window = max(1, steps // 10)
    return {
        "steps": steps,
        "skipped_steps": trainer.skipped_steps,  # non-finite steps: not in history
        "seconds": seconds,
        "window": window,
        "first": _mean(history[:window]),
        "last": _mean(history[-window:]),
        "verification_accuracy": after["accuracy"],
        "verification_threshold": after["threshold"],
        "verification_accuracy_untrained": before["accuracy"],
        "num_identities": data.num_identities,
        "num_sequences": data.num_sequences,
        "history": history,
        "model": net,
        "classifier": trainer.head.weight.detach(),
        "centers": trainer.head.centers.detach(),  # R = 1: identity rows, then sequences
    }


def _mean(rows: list[dict[str, float]]) -> dict[str, float]:
    return {k: sum(r[k] for r in rows) / len(rows) for k in TERMS}


def format_report(result: dict[str, Any]) -> str:
    """A few lines: each loss term first vs last window, and verification accuracy."""
    f, la = result["first"], result["last"]
    lines = [f"smoke: {result['steps']} steps in {result['seconds']:.1f} s "
             f"({result['num_identities']} identities, {result['num_sequences']} tracks); "
             f"mean of the first vs last {result['window']} steps:"]
    lines += [f"  {k:7s} {f[k]:9.4f} -> {la[k]:9.4f}" for k in TERMS]
    if result.get("skipped_steps"):
        lines.append(f"  {result['skipped_steps']} steps skipped: their loss or gradient "
                     "was not finite (see train.max_nonfinite_steps)")
    lines.append(f"  verification on unseen classes (10-fold, cosine): "
                 f"{result['verification_accuracy_untrained']:.3f} untrained -> "
                 f"{result['verification_accuracy']:.3f} trained (chance 0.5)")
    return "\n".join(lines)
