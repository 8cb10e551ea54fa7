"""Learning-rate multipliers: step decay (the reference) and cosine with warm-up."""

from __future__ import annotations

import math

from seqface_dist.config import OptimConfig


def lr_multiplier(step: int, cfg: OptimConfig) -> float:
    """The factor on the base learning rates at ``step`` (0-based)."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "step":
        return cfg.gamma ** sum(step >= m for m in cfg.milestones)
    span = max(cfg.max_steps - cfg.warmup_steps, 1)
    progress = min(max(step - cfg.warmup_steps, 0) / span, 1.0)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizers, base_lrs: list[list[float]], factor: float) -> None:
    """Set every param group's lr to its base lr times ``factor``."""
    for opt, bases in zip(optimizers, base_lrs, strict=True):
        for group, base in zip(opt.param_groups, bases, strict=True):
            group["lr"] = base * factor
