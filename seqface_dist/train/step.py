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

A step whose loss or gradient norm is not finite is *skipped*: no optimizer moves a
weight, the gradients are dropped and the backbone's buffers (BatchNorm statistics) are
put back, so the model stays at its last good state. The step number is still used up
(its batch is consumed; the lr and lambda schedules follow the step number as always).
More than ``train.max_nonfinite_steps`` skipped in a row raise :class:`NonFiniteLossError`.

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

    def zero_grad(self) -> None:
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
    dtype = torch.bfloat16 if cfg.train.head_precision == "bf16" else torch.float32
    head = PartitionedHead(spec, cfg.loss, comm, device=device, dtype=dtype,
                           feature_grad_scale=feature_grad_scale,
                           sequence_weight=sequence_weight)
    o = cfg.optim
    return head, head.make_optimizer(lr=o.lr, momentum=o.momentum,
                                     weight_decay=o.weight_decay), spec


class NonFiniteLossError(FloatingPointError):
    """Too many steps in a row had a NaN or infinite loss or gradient: the run diverged."""


# The terms a diverged step is reported by (chief_identity / chief_lsr are nan by design
# when a batch has no such samples, so they would mislead here).
LOSS_TERMS = ("chief", "dsa_pull", "dsa_push")


@dataclass
class StepResult:
    out: HeadOutput
    lr: float
    grad_norm: float  # the global gradient norm; nan if the step was skipped for it
    seconds: dict[str, float]  # forward, backward, optimizer, communication
    skipped: bool = False  # the loss or gradient norm was not finite: nothing was updated
    skipped_steps: int = 0  # steps this Trainer skipped so far (since it was built)
    nonfinite: tuple[str, ...] = ()  # what was not finite in a skipped step

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
        self.skipped_steps = 0  # every skipped step so far
        self.consecutive_skipped = 0  # skipped steps since the last applied one
        # ZeRO 1/2 keep reduced gradient partitions and a micro-step count that only the
        # engine's step() resets: a skipped step would leak into the next one, so there
        # the first non-finite step stops the run.
        can_skip = isinstance(self.engine, LocalEngine) or self.cfg.train.zero_stage == 0
        self.max_nonfinite_steps = self.cfg.train.max_nonfinite_steps if can_skip else 0
        # BatchNorm statistics move in the forward, before the check: kept to put back.
        self._buffers = list(self.module.buffers())
        self._saved_buffers = [b.detach().clone() for b in self._buffers]

    @property
    def module(self) -> nn.Module:
        return self.engine.module

    def step(self, images: torch.Tensor, center_index: torch.Tensor, step: int) -> StepResult:
        """One optimisation step on this rank's batch (uint8 B x H x W x C images).

        A non-finite loss or gradient norm skips the step (``StepResult.skipped``); the
        ``train.max_nonfinite_steps + 1``-th skipped step in a row raises
        :class:`NonFiniteLossError`.
        """
        o = self.cfg.optim
        factor = lr_multiplier(step, o)
        set_lr(self._optimizers, self._base_lrs, factor)
        comm_before = self.comm.seconds
        t0 = time.perf_counter()
        for saved, b in zip(self._saved_buffers, self._buffers, strict=True):
            saved.copy_(b)
        feats = self.engine(normalize(images.to(self.device, non_blocking=True)))
        out = self.head(feats, center_index.to(self.device), step=step)
        t1 = time.perf_counter()
        self.engine.backward(out.loss)
        # Every step, not only when clipping or logging: a NaN gradient applied once makes
        # every later step and checkpoint NaN. One sync for loss and norm together, after
        # the backward is queued and before any optimizer moves a weight.
        sq_norm = self._grad_sq_norm()
        loss_ok, norm_ok = (bool(v) for v in torch.stack(
            [torch.isfinite(out.loss.detach().float()), torch.isfinite(sq_norm)]).cpu())
        t2 = time.perf_counter()
        if not (loss_ok and norm_ok):
            return self._skip(step, out, o.lr * factor, loss_ok,
                              {"forward": t1 - t0, "backward": t2 - t1, "optimizer": 0.0,
                               "communication": self.comm.seconds - comm_before})
        self.consecutive_skipped = 0
        grad_norm = float(sq_norm.sqrt())
        if o.grad_clip > 0 and grad_norm > o.grad_clip:
            self._scale_gradients(o.grad_clip / (grad_norm + 1e-6))
        self.engine.step()
        self.head_opt.step()
        self.head_opt.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        return StepResult(out, o.lr * factor, grad_norm,
                          {"forward": t1 - t0, "backward": t2 - t1, "optimizer": t3 - t2,
                           "communication": self.comm.seconds - comm_before},
                          skipped_steps=self.skipped_steps)

    def _skip(self, step: int, out: HeadOutput, lr: float, loss_ok: bool,
              seconds: dict[str, float]) -> StepResult:
        """Drop this step's gradients and buffer updates; raise once too many in a row."""
        self.engine.zero_grad()  # DeepSpeed's: the module's gradients
        opt = getattr(self.engine, "optimizer", None)
        if opt is not None:  # DeepSpeed's wrapper may hold its own copies (bf16)
            opt.zero_grad(set_to_none=True)
        self.head_opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            for saved, b in zip(self._saved_buffers, self._buffers, strict=True):
                b.copy_(saved)
        self.skipped_steps += 1
        self.consecutive_skipped += 1
        if loss_ok:
            nonfinite: tuple[str, ...] = ("grad_norm",)
        else:
            nonfinite = tuple(k for k in LOSS_TERMS if not math.isfinite(float(getattr(out, k))))
            nonfinite = nonfinite or ("total",)
        if self.consecutive_skipped > self.max_nonfinite_steps:
            raise NonFiniteLossError(self._diverged_message(step, out, nonfinite))
        return StepResult(out, lr, float("nan"), seconds, skipped=True,
                          skipped_steps=self.skipped_steps, nonfinite=nonfinite)

    def _diverged_message(self, step: int, out: HeadOutput, nonfinite: tuple[str, ...]) -> str:
        o, t = self.cfg.optim, self.cfg.train
        terms = ", ".join(f"{k} {float(getattr(out, k)):.4g}" for k in LOSS_TERMS)
        if self.max_nonfinite_steps == 0:
            why = ("the first one stops the run" if t.max_nonfinite_steps == 0 else
                   f"train.zero_stage {t.zero_stage} cannot skip a step, only ZeRO 0 can")
        else:
            why = f"{self.consecutive_skipped} in a row, train.max_nonfinite_steps is " \
                  f"{self.max_nonfinite_steps}"
        tips = [f"lower optim.lr (now {o.lr})",
                f"more optim.warmup_steps (now {o.warmup_steps})"]
        if o.grad_clip == 0:
            tips.append("set optim.grad_clip")
        if t.precision != "fp32":
            tips.append(f"train.precision=fp32 (now {t.precision})")
        return (f"step {step}: not finite: {', '.join(nonfinite)} (loss "
                f"{float(out.loss.detach()):.4g}: {terms}); the run diverged ({why}, "
                f"{self.skipped_steps} skipped in all). The model was left at its last good "
                f"state. Try: {'; '.join(tips)}")

    def _grad_sq_norm(self) -> torch.Tensor:
        """Squared global gradient norm over backbone and head rows (a collective; no sync).

        Backbone gradients are identical on every rank after DeepSpeed's all-reduce (ZeRO
        0); the head's row gradients are disjoint blocks, so their squares are summed over
        ranks. Every rank gets the same value, so every rank skips the same steps. The
        center update is not a gradient and is not counted.
        """
        bb = [p.grad for p in self.module.parameters() if p.grad is not None]
        sq_head = self.head.grad_sq_norm()
        if not bb:
            return sq_head.float()
        sq_bb = torch.nn.utils.get_total_norm(bb).float().square()
        return sq_bb.to(sq_head.device) + sq_head.float()

    def _scale_gradients(self, coef: float) -> None:
        for p in self.module.parameters():
            if p.grad is not None:
                p.grad.mul_(coef)
        self.head.scale_grad_(coef)


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
