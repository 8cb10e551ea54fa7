"""One small single-process SeqFace training loop shared by the experiments.

A batch mixes identity samples (center index = identity) and sequence samples (center index
= N_id + sequence), like the reference's 32 + 32 per GPU. The chief loss is the
L2-constrained A-Softmax with LSR for sequence rows (`seqface_dist.losses`), the auxiliary
loss DSA with the center-loss style center update (the centers' `.grad`), DESIGN §2.
Runs without sequences use the same total batch of identity samples, so every condition
sees the same number of images per step and the same number of steps.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from seqface_dist.losses import (
    dsa_terms,
    lambda_schedule,
    lsr_cross_entropy,
    margin_logits,
    sample_negatives,
)


@dataclass
class TrainSpec:
    steps: int = 1000
    optimizer: str = "sgd"  # "sgd" (momentum) or "adam", for the net and W
    batch: int = 128  # samples per step; half identities, half sequences when sequences used
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    margin: str = "sphereface"
    m: int = 4
    scale: float = 32.0
    lam: float = 5.0  # SphereFace lambda (reference: constant 5)
    use_sequences: bool = False  # LSR on sequence samples
    use_dsa: bool = False
    dsa_weight: float = 0.04
    dsa_p: float = 0.01
    dsa_lam: float = 0.5
    dsa_alpha: float = 2.0
    dsa_beta: float = 1.0
    center_lr: float = 0.1
    seed: int = 0
    log_every: int = 100


@dataclass
class TrainData:
    """Images as uint8 or float arrays (n, H, W); identities 0..N_id-1, sequences 0..N_seq-1."""

    id_images: np.ndarray
    id_labels: np.ndarray
    num_identities: int
    seq_images: np.ndarray | None = None
    seq_labels: np.ndarray | None = None
    num_sequences: int = 0


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """(n, H, W) uint8 (ink 255) or float in [0, 1] -> (n, 1, H, W) float32 in [-1, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(images))
    x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
    return (x.unsqueeze(1) - 0.5) / 0.5


def _cosine_lr(base: float, step: int, steps: int) -> float:
    return 0.5 * base * (1.0 + np.cos(np.pi * step / max(1, steps)))


def train(net: nn.Module, data: TrainData, spec: TrainSpec, *, log=print,
          tag: str = "") -> dict[str, float]:
    """Train `net` (images -> features) in place; returns a few final figures for the log."""
    if spec.use_dsa and not spec.use_sequences:
        raise ValueError("TrainSpec: use_dsa needs use_sequences (DSA here is on A + B)")
    if spec.use_sequences and (data.seq_images is None or data.num_sequences == 0):
        raise ValueError("TrainSpec: use_sequences but the data has no sequences")
    gen = torch.Generator().manual_seed(spec.seed)
    torch.manual_seed(spec.seed)
    n_id = data.num_identities
    dim = net(to_tensor(data.id_images[:2])).shape[1]
    weight = nn.Parameter(torch.randn(n_id, dim, generator=gen) * 0.01)
    n_centers = n_id + (data.num_sequences if spec.use_dsa else 0)
    centers = nn.Parameter(torch.zeros(n_centers, dim))
    params = list(net.parameters()) + [weight]
    if spec.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=spec.lr, momentum=spec.momentum,
                              weight_decay=spec.weight_decay)
    elif spec.optimizer == "adam":
        opt = torch.optim.Adam(params, lr=spec.lr)
    else:
        raise ValueError(f"TrainSpec.optimizer: {spec.optimizer!r} is not 'sgd' or 'adam'")
    # Centers move only by the center-loss style update (their .grad), no weight decay.
    copt = torch.optim.SGD([centers], lr=spec.center_lr, momentum=0.9)
    id_x, id_y = to_tensor(data.id_images), torch.from_numpy(data.id_labels).long()
    if spec.use_sequences:
        seq_x = to_tensor(data.seq_images)
        seq_t = torch.from_numpy(data.seq_labels).long() + n_id
        n_seq_batch = spec.batch // 2
    else:
        n_seq_batch = 0
    n_id_batch = spec.batch - n_seq_batch
    net.train()
    t0, last = time.time(), {}
    for step in range(spec.steps):
        lr = _cosine_lr(spec.lr, step, spec.steps)
        for g in opt.param_groups:
            g["lr"] = lr
        for g in copt.param_groups:
            g["lr"] = _cosine_lr(spec.center_lr, step, spec.steps)
        pick = torch.randint(len(id_y), (n_id_batch,), generator=gen)
        x, t = id_x[pick], id_y[pick]
        if n_seq_batch:
            pick = torch.randint(len(seq_t), (n_seq_batch,), generator=gen)
            x, t = torch.cat([x, seq_x[pick]]), torch.cat([t, seq_t[pick]])
        feats = net(x)
        logits = margin_logits(feats, weight, t, n_id, kind=spec.margin, scale=spec.scale,
                               m=spec.m, lam=lambda_schedule(step, base=spec.lam,
                                                             lambda_min=spec.lam))
        chief = lsr_cross_entropy(logits, t, n_id)
        loss = chief
        if spec.use_dsa:
            negs = sample_negatives(n_centers, spec.dsa_p, generator=gen)
            terms = dsa_terms(feats, t, centers, n_id, negs, lam=spec.dsa_lam,
                              alpha=spec.dsa_alpha, beta=spec.dsa_beta)
            loss = loss + spec.dsa_weight * terms.loss
        opt.zero_grad(set_to_none=True)
        copt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if spec.use_dsa:
            copt.step()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{tag} step {step}: loss is {float(loss)}")
        last = {"loss": loss.item(), "chief": chief.item()}
        if spec.use_dsa:
            last.update(dsa=terms.loss.item(), active=terms.active_fraction.item())
        if spec.log_every and ((step + 1) % spec.log_every == 0 or step + 1 == spec.steps):
            with torch.no_grad():  # plain nearest-class accuracy (no margin) on identities
                is_id = t < n_id
                cos = nn.functional.normalize(feats[is_id]) @ nn.functional.normalize(weight).t()
                acc = float((cos.argmax(1) == t[is_id]).float().mean())
            figures = " ".join(f"{k} {v:.3f}" for k, v in last.items())
            log(f"  {tag} step {step + 1}/{spec.steps} {figures} id-acc {acc:.3f} "
                f"lr {lr:.4f} ({time.time() - t0:.0f} s)")
    last["seconds"] = time.time() - t0
    return last


@torch.no_grad()
def embed(net: nn.Module, images: np.ndarray, batch: int = 512) -> np.ndarray:
    """Features (n, D) of `images` with the net in eval mode."""
    net.eval()
    out = [net(to_tensor(images[i:i + batch])).numpy() for i in range(0, len(images), batch)]
    net.train()
    return np.concatenate(out).astype(np.float64)


def spec_dict(spec: TrainSpec) -> dict:
    return asdict(spec)
