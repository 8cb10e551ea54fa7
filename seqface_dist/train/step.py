"""The one SeqFace training step. The Ray worker, ``seqface smoke``, the experiments and
the bare-loop bench all train through :class:`Trainer`; nothing else updates a model.

    trainer = local_trainer(cfg, num_identities, num_sequences)   # one process, R = 1
    for step in range(cfg.optim.max_steps):
        images, center_index = next(batches)     # uint8 B x H x W x C, (B,) center indices
        res = trainer.step(images, center_index, step)

A step: learning rate and A-Softmax lambda from their schedules, the input normalisation
(``seqface_dist.data.normalize``, the one the export records), backbone forward,
the partitioned head (``Comm()``: a world of one without a process group), backward
(which also fills the head's row gradients), gradient clipping over backbone and head,
the backbone's optimizer, then the head's (W, and the centers' pull update).

The backbone is a DeepSpeed engine in the Ray worker and a :class:`LocalEngine` (the same
three calls over a plain module and torch SGD) everywhere else.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from seqface_dist.config import Config, OptimConfig
from seqface_dist.data.normalize import normalize
from seqface_dist.parallel import Comm, HeadOutput, HeadSpec, PartitionedHead
from seqface_dist.train.schedule import lr_multiplier, set_lr


class LocalEngine:
    """A module and its optimizer behind DeepSpeed's engine calls (forward, backward, step)."""

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.module, self.optimizer = module, optimizer

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def backbone_optimizer(backbone: nn.Module, o: OptimConfig) -> torch.optim.SGD:
    """SGD with momentum and weight decay over the backbone (the reference's solver)."""
    return torch.optim.SGD(backbone.parameters(), lr=o.lr, momentum=o.momentum,
                           weight_decay=o.weight_decay)


def resolve_sequence_weight(cfg: Config, identity_images: int, sequence_images: int) -> float:
    """``loss.sequence_weight``, with auto (< 0) resolved from the data's sizes.

    Auto: min(1, (sequence images / identity images) x (identities / sequences per batch)).
    A batch draws a fixed share of sequence samples whatever the sets' sizes; when the
    sequence set is small, each of its images is then seen more often than a labeled one,
    and this weight brings a sequence image's total pull back to at most a labeled
    image's. A sequence set at least as large as its share of the batch keeps weight 1.
    """
    w, d = cfg.loss.sequence_weight, cfg.data
    if w >= 0:
        return w
    if not (sequence_images and identity_images and d.identities_per_batch and
            d.sequences_per_batch):
        return 1.0
    return min(1.0, sequence_images / identity_images *
               d.identities_per_batch / d.sequences_per_batch)


def build_head(cfg: Config, num_identities: int, num_sequences: int, comm: Comm,
               device: torch.device | str, feature_grad_scale: float = 1.0,
               sequence_weight: float | None = None
               ) -> tuple[PartitionedHead, torch.optim.Optimizer, HeadSpec]:
    """The row-partitioned head for this rank and its own optimizer."""
    spec = HeadSpec(num_identities, num_sequences, cfg.model.embedding_dim,
                    seed=cfg.train.seed)
    head = PartitionedHead(spec, cfg.loss, comm, device=device,
                           feature_grad_scale=feature_grad_scale,
                           sequence_weight=sequence_weight)
    o = cfg.optim
    return head, head.make_optimizer(lr=o.lr, momentum=o.momentum,
                                     weight_decay=o.weight_decay), spec


class NonFiniteLossError(FloatingPointError):
    """The loss turned NaN or infinite: the run diverged."""


@dataclass
class StepResult:
    out: HeadOutput
    lr: float
    grad_norm: float  # nan unless clipping or asked for
    seconds: dict[str, float]  # forward, backward, optimizer, communication

    def losses(self) -> dict[str, float]:
        o = self.out
        return {"chief": float(o.chief), "lsr": float(o.chief_lsr),
                "dsa_pull": float(o.dsa_pull), "dsa_push": float(o.dsa_push),
                "total": float(o.loss.detach())}


@dataclass
class Trainer:
    """Backbone engine + head + their optimizers and schedules: one step at a time."""

    cfg: Config
    engine: Any  # a DeepSpeed engine or a LocalEngine
    head: PartitionedHead
    head_opt: torch.optim.Optimizer
    backbone_opt: torch.optim.Optimizer
    comm: Comm
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def __post_init__(self) -> None:
        self._optimizers = [self.backbone_opt, self.head_opt]
        self._base_lrs = [[g["lr"] for g in o.param_groups] for o in self._optimizers]

    @property
    def module(self) -> nn.Module:
        return self.engine.module

    def step(self, images: torch.Tensor, center_index: torch.Tensor, step: int, *,
             want_grad_norm: bool = False) -> StepResult:
        """One optimisation step on this rank's batch (uint8 B x H x W x C images)."""
        o = self.cfg.optim
        factor = lr_multiplier(step, o)
        set_lr(self._optimizers, self._base_lrs, factor)
        comm_before = self.comm.seconds
        t0 = time.perf_counter()
        feats = self.engine(normalize(images.to(self.device, non_blocking=True)))
        out = self.head(feats, center_index.to(self.device), step=step)
        t1 = time.perf_counter()
        self.engine.backward(out.loss)
        # Checked after the backward is queued (no extra device sync before it) and before
        # any optimizer moves a weight: a diverged step changes nothing.
        loss = float(out.loss.detach())
        if not math.isfinite(loss):
            raise NonFiniteLossError(
                f"step {step}: the loss is {loss} (chief {float(out.chief):.4g}, dsa "
                f"{float(out.dsa):.4g}); the run diverged: lower optim.lr (now {o.lr}), add "
                f"optim.warmup_steps or set optim.grad_clip")
        t2 = time.perf_counter()
        # The norm costs a pass over every gradient: only when clipping or logging it.
        grad_norm = (self.clip_gradients(o.grad_clip) if o.grad_clip > 0 or want_grad_norm
                     else float("nan"))
        self.engine.step()
        self.head_opt.step()
        self.head_opt.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        return StepResult(out, o.lr * factor, grad_norm,
                          {"forward": t1 - t0, "backward": t2 - t1, "optimizer": t3 - t2,
                           "communication": self.comm.seconds - comm_before})

    def clip_gradients(self, max_norm: float) -> float:
        """Clip the global gradient norm over backbone and head rows together; return it.

        Backbone gradients are identical on every rank after DeepSpeed's all-reduce (ZeRO
        0); the head's row gradients are disjoint blocks, so their squares are summed over
        ranks. The center update is not a gradient and is not clipped.
        """
        bb = [p.grad for p in self.module.parameters() if p.grad is not None]
        sq_bb = sum(g.float().square().sum() for g in bb) if bb else torch.zeros(())
        sq_head = self.head.grad_sq_norm()
        norm = float(torch.sqrt(sq_bb.to(sq_head.device) + sq_head))
        if max_norm > 0 and norm > max_norm:
            coef = max_norm / (norm + 1e-6)
            for g in bb:
                g.mul_(coef)
            self.head.scale_grad_(coef)
        return norm


def local_trainer(cfg: Config, num_identities: int, num_sequences: int,
                  device: torch.device | str = "cpu", *,
                  sequence_weight: float | None = None) -> Trainer:
    """A one-process Trainer: the backbone under a LocalEngine, the head on ``Comm()``.

    ``sequence_weight``: the resolved ``loss.sequence_weight`` (see
    :func:`resolve_sequence_weight`); None: the config's, auto counting as 1.
    """
    from seqface_dist.models import build_backbone

    torch.manual_seed(cfg.train.seed)  # the worker's backbone init, too
    backbone = build_backbone(cfg.model).to(device)
    opt = backbone_optimizer(backbone, cfg.optim)
    comm = Comm()
    head, head_opt, _ = build_head(cfg, num_identities, num_sequences, comm, device,
                                   sequence_weight=sequence_weight)
    return Trainer(cfg, LocalEngine(backbone, opt), head, head_opt, opt, comm,
                   torch.device(device))
