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

Gradient accumulation (``train.gradient_accumulation_steps`` k > 1): ``step`` gets the
step's whole batch (or a list of k micro-batches) and runs k forward/backward passes, the
micro-batch j holding samples j, j + k, j + 2k, ... (so a loader batch of identities then
sequences keeps its mix in each), each loss scaled by 1/k (DeepSpeed's own scaling
for its engine, with the accumulation boundary set on the last one); then, once, the
non-finite check, clipping over the accumulated gradient, the backbone's and the head's
optimizer steps. The step number, the lr and lambda schedules and the DSA negative draw
stay those of the step, so every micro-batch sees the same negatives. What this equals:

* W's gradient and the feature gradients: the large batch's mean gradient, exactly, when
  every micro-batch counts the same number of samples in the chief loss (every mode with
  the loader's fixed mix; ``none`` counts identity samples only) and the full softmax is
  used (``sampled_softmax_fraction`` < 1 draws rows per micro-batch, from its positives).
* The centers: moved once per step by the update of the whole batch,
  -(1/(1 + count_n)) sum (f_i - c_n) / 2 over all k micro-batches (counts summed; see
  ``PartitionedHead.collect_center_update``): exactly the large batch's, not k updates.
* The backbone: exactly the large batch's gradient for a network without BatchNorm. A
  BatchNorm layer normalises each micro-batch by its own statistics and moves its running
  statistics k times: that part is not the large batch's (as with any accumulation).

fp16 (``train.precision: fp16``, DeepSpeed's fp16 block with a dynamic loss scale): the
engine multiplies the loss by its scale S before the backward, so the head's W gradient
arrives scaled by S as well (the head is outside the engine, which unscales only its own
gradients). The scale actually applied is read off the gradient reaching the loss tensor;
W's gradient is divided by it and the global norm computed unscaled. A step whose
gradients overflow is handed to the engine anyway (it skips its update and lowers S) and
the head skips its step too; such loss-scale skips are counted in ``skipped_steps`` but
not toward ``train.max_nonfinite_steps`` (a non-finite loss still is).
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
        # The engine's parameters may be bf16/fp16 (train.precision): inputs in their dtype.
        self._input_dtype = next((p.dtype for p in self.module.parameters()
                                  if p.is_floating_point()), torch.float32)
        self.accumulation = self.cfg.train.gradient_accumulation_steps
        self._local = isinstance(self.engine, LocalEngine)
        if not self._local:  # DeepSpeed scales each micro-batch's loss by its own count
            gas = self.engine.gradient_accumulation_steps()
            if gas != self.accumulation:
                raise ValueError(f"the DeepSpeed engine accumulates {gas} micro-batches, "
                                 "train.gradient_accumulation_steps is "
                                 f"{self.accumulation}: build it with ds_config(cfg, ...)")
        self.head.accumulating = self.accumulation > 1
        fp16 = getattr(self.engine, "fp16_enabled", None)
        self.fp16 = bool(callable(fp16) and fp16())
        self.loss_scale_skips = 0  # fp16 steps the engine skipped on overflow

    @property
    def module(self) -> nn.Module:
        return self.engine.module

    def step(self, images, center_index, step: int) -> StepResult:
        """One optimisation step on this rank's batch (uint8 B x H x W x C images).

        With ``train.gradient_accumulation_steps`` k > 1, ``images`` and ``center_index``
        are the step's whole batch (split into k micro-batches, see the module's doc) or
        lists of k micro-batches. A non-finite loss or gradient norm skips the step
        (``StepResult.skipped``); the ``train.max_nonfinite_steps + 1``-th skipped step in
        a row raises :class:`NonFiniteLossError`.
        """
        o = self.cfg.optim
        micro = self._micro_batches(images, center_index)
        k = len(micro)
        factor = lr_multiplier(step, o)
        set_lr(self._optimizers, self._base_lrs, factor)
        comm_before = self.comm.seconds
        for saved, b in zip(self._saved_buffers, self._buffers, strict=True):
            saved.copy_(b)
        t_fwd = t_bwd = 0.0
        outs, loss_grads = [], []
        for j, (im, ci) in enumerate(micro):
            t0 = time.perf_counter()
            if k > 1 and not self._local:  # the engine reduces and steps on the last one
                self.engine.set_gradient_accumulation_boundary(j == k - 1)
            x = normalize(im.to(self.device, non_blocking=True)).to(self._input_dtype)
            feats = self.engine(x)
            out = self.head(feats, ci.to(self.device), step=step)
            t1 = time.perf_counter()
            loss = out.loss
            if self.fp16:  # the factor the engine's backward applies (scale / k)
                loss = loss.view(()) * 1  # a fresh node to hook, out.loss stays as it was
                loss.register_hook(lambda g, s=loss_grads: s.append(g.detach().float()))
            self.engine.backward(loss / k if self._local and k > 1 else loss)
            if k > 1:
                self.head.collect_center_update()
            outs.append(out)
            t_fwd, t_bwd = t_fwd + t1 - t0, t_bwd + time.perf_counter() - t1
        t2 = time.perf_counter()
        out = outs[0] if k == 1 else _mean_output(outs)
        if k > 1:
            self.head.finish_accumulation()
        scale = 1.0
        if self.fp16 and loss_grads:  # W's gradient was scaled by the engine's loss scale
            scale = float(loss_grads[-1]) * k
            if scale != 1.0 and math.isfinite(scale) and scale > 0:
                self.head.scale_grad_(1.0 / scale)
        # Every step, not only when clipping or logging: a NaN gradient applied once makes
        # every later step and checkpoint NaN. One sync for loss and norm together, after
        # the backward is queued and before any optimizer moves a weight.
        sq_norm = self._grad_sq_norm(scale)
        loss_ok, norm_ok = (bool(v) for v in torch.stack(
            [torch.isfinite(torch.stack([x.loss.detach().float() for x in outs])).all(),
             torch.isfinite(sq_norm)]).cpu())
        t3 = time.perf_counter()
        seconds = {"forward": t_fwd, "backward": t_bwd + t3 - t2, "optimizer": 0.0,
                   "communication": self.comm.seconds - comm_before}
        if self.fp16 and loss_ok and not norm_ok:
            return self._loss_scale_skip(out, o.lr * factor, seconds)
        if not (loss_ok and norm_ok):
            return self._skip(step, out, o.lr * factor, loss_ok, seconds)
        grad_norm = float(sq_norm.sqrt())
        if o.grad_clip > 0 and grad_norm > o.grad_clip:
            self._scale_gradients(o.grad_clip / (grad_norm + 1e-6))
        self.engine.step()
        if self.fp16 and not self.engine.was_step_applied():  # the engine found an overflow
            return self._loss_scale_skip(out, o.lr * factor, seconds, engine_stepped=True)
        self.consecutive_skipped = 0
        self.head_opt.seed_rounding(step)  # bf16 W: a resumed run rounds as this one did
        self.head_opt.step()
        self.head_opt.zero_grad(set_to_none=True)
        seconds["optimizer"] = time.perf_counter() - t3
        return StepResult(out, o.lr * factor, grad_norm, seconds,
                          skipped_steps=self.skipped_steps)

    def _micro_batches(self, images, center_index) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The step's k micro-batches: given as lists, or the batch's samples j::k."""
        k = self.accumulation
        if isinstance(images, (list, tuple)):
            if len(images) != k or len(center_index) != k:
                raise ValueError(f"{len(images)} micro-batches given, "
                                 f"train.gradient_accumulation_steps is {k}")
            return list(zip(images, center_index, strict=True))
        if k == 1:
            return [(images, center_index)]
        n = images.shape[0]
        if n % k:
            raise ValueError(f"a batch of {n} samples does not split into "
                             f"train.gradient_accumulation_steps={k} equal micro-batches")
        return [(images[j::k], center_index[j::k]) for j in range(k)]

    def _loss_scale_skip(self, out: HeadOutput, lr: float, seconds: dict[str, float],
                         engine_stepped: bool = False) -> StepResult:
        """fp16: the gradients overflowed at the engine's loss scale. The engine's step
        sees the overflow (it skips its update and lowers the scale); the head skips too.
        Counted in skipped_steps, not toward max_nonfinite_steps (the scaler's business)."""
        if not engine_stepped:
            self.engine.step()  # DeepSpeed: detects the overflow, skips, lowers the scale
        self._drop_head_step()
        self.skipped_steps += 1
        self.loss_scale_skips += 1
        return StepResult(out, lr, float("nan"), seconds, skipped=True,
                          skipped_steps=self.skipped_steps, nonfinite=("loss_scale_overflow",))

    def _drop_head_step(self) -> None:
        """Forget the step's head gradients and center updates; put back BatchNorm's
        statistics as they were before the forward."""
        self.head_opt.zero_grad(set_to_none=True)
        self.head.discard_accumulation()
        with torch.no_grad():
            for saved, b in zip(self._saved_buffers, self._buffers, strict=True):
                b.copy_(saved)

    def _skip(self, step: int, out: HeadOutput, lr: float, loss_ok: bool,
              seconds: dict[str, float]) -> StepResult:
        """Drop this step's gradients and buffer updates; raise once too many in a row."""
        self.engine.zero_grad()  # DeepSpeed's: the module's gradients
        opt = getattr(self.engine, "optimizer", None)
        if opt is not None:  # DeepSpeed's wrapper may hold its own copies (bf16)
            opt.zero_grad(set_to_none=True)
        self._drop_head_step()
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

    def _grad_sq_norm(self, loss_scale: float = 1.0) -> torch.Tensor:
        """Squared global gradient norm over backbone and head rows (a collective; no sync).

        Backbone gradients are identical on every rank after DeepSpeed's all-reduce (ZeRO
        0); the head's row gradients are disjoint blocks, so their squares are summed over
        ranks. Every rank gets the same value, so every rank skips the same steps. The
        center update is not a gradient and is not counted. ``loss_scale`` (fp16): the
        backbone's gradients are still scaled by it (the engine unscales them in its step).
        """
        bb = [p.grad for p in self.module.parameters() if p.grad is not None]
        sq_head = self.head.grad_sq_norm()
        if not bb:
            return sq_head.float()
        sq_bb = torch.nn.utils.get_total_norm([g.float() for g in bb]).square()
        if loss_scale != 1.0:
            sq_bb = sq_bb / loss_scale ** 2
        return sq_bb.to(sq_head.device) + sq_head.float()

    def _scale_gradients(self, coef: float) -> None:
        for p in self.module.parameters():
            if p.grad is not None:
                p.grad.mul_(coef)
        self.head.scale_grad_(coef)


def _mean_output(outs: list[HeadOutput]) -> HeadOutput:
    """The step's loss terms over its micro-batches, without graphs: their means (equal
    micro-batches give the large batch's mean). A non-finite term stays non-finite; only
    the per-kind chief terms, nan by design for a micro-batch without that kind, skip nans.
    """
    def mean(name: str) -> torch.Tensor:
        v = torch.stack([torch.as_tensor(getattr(o, name)).detach().float() for o in outs])
        return v.nanmean() if name in ("chief_identity", "chief_lsr") else v.mean()

    last = outs[-1]
    return HeadOutput(
        loss=mean("loss"), chief=mean("chief"), chief_identity=mean("chief_identity"),
        chief_lsr=mean("chief_lsr"), dsa=mean("dsa"), dsa_pull=mean("dsa_pull"),
        dsa_push=mean("dsa_push"), active_fraction=mean("active_fraction"),
        num_negatives=last.num_negatives, lam=last.lam)


def init_backbone(cfg: Config, backbone: nn.Module) -> str | None:
    """``train.init_from``'s weights into a freshly built backbone (checked key by key);
    returns the line to log, None without init_from."""
    if not cfg.train.init_from:
        return None
    from seqface_dist.train.init_from import load_init_from

    return load_init_from(backbone, cfg.train.init_from, cfg.model)


def local_trainer(cfg: Config, num_identities: int, num_sequences: int,
                  device: torch.device | str = "cpu", *,
                  sequence_weight: float | None = None) -> Trainer:
    """A one-process Trainer: the backbone under a LocalEngine, the head on ``Comm()``.

    ``sequence_weight``: the resolved ``loss.sequence_weight`` (see
    :func:`resolve_sequence_weight`); None: the config's, auto counting as 1.
    """
    from seqface_dist.models import build_backbone

    torch.manual_seed(cfg.train.seed)  # the worker's backbone init, too
    backbone = build_backbone(cfg.model)
    init_backbone(cfg, backbone)
    backbone = backbone.to(device)
    opt = backbone_optimizer(backbone, cfg.optim)
    comm = Comm()
    head, head_opt, _ = build_head(cfg, num_identities, num_sequences, comm, device,
                                   sequence_weight=sequence_weight)
    return Trainer(cfg, LocalEngine(backbone, opt), head, head_opt, opt, comm,
                   torch.device(device))
