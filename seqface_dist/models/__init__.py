"""Backbones: images (B, C, H, W) -> features (B, embedding_dim).

    from seqface_dist.models import build_backbone
    net = build_backbone(cfg.model)   # cfg.model.backbone names an entry of BACKBONES

Every factory takes keyword arguments ``in_channels``, ``embedding_dim`` and
``input_size`` ([height, width]); the FC input is computed from the input size, so
112x96 (SphereFace's crop) and 112x112 (insightface's) both work.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from seqface_dist.config import BACKBONE_NAMES, ConfigError, ModelConfig
from seqface_dist.models.iresnet import IResNet, iresnet50, iresnet100
from seqface_dist.models.sphere import SphereNet, sphere20, sphere36, sphere64
from seqface_dist.models.tiny import TinyNet, tiny

BACKBONES: dict[str, Callable[..., nn.Module]] = {
    "sphere20": sphere20,
    "sphere36": sphere36,
    "sphere64": sphere64,
    "iresnet50": iresnet50,
    "iresnet100": iresnet100,
    "tiny": tiny,
}
if tuple(BACKBONES) != BACKBONE_NAMES:  # config validates names without importing torch
    raise RuntimeError(f"config.BACKBONE_NAMES {BACKBONE_NAMES} must list {tuple(BACKBONES)}")


def build_backbone(cfg: ModelConfig) -> nn.Module:
    """The backbone ``cfg.backbone`` with the configured channels, embedding and input size."""
    if cfg.backbone not in BACKBONES:
        raise ConfigError(f"model.backbone: unknown backbone {cfg.backbone!r}; "
                          f"choose one of {sorted(BACKBONES)}")
    return BACKBONES[cfg.backbone](in_channels=cfg.in_channels, embedding_dim=cfg.embedding_dim,
                                   input_size=list(cfg.input_size))


__all__ = ["BACKBONES", "build_backbone", "IResNet", "SphereNet", "TinyNet"]
