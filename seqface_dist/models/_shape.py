"""Spatial size bookkeeping shared by the backbones (the FC input depends on the image size)."""

from __future__ import annotations

import torch


def downsampled(size: int, times: int) -> int:
    """Side length after ``times`` stride-2 layers (3x3 pad 1 or 1x1 pad 0: both (n-1)//2+1)."""
    for _ in range(times):
        size = (size - 1) // 2 + 1
    return size


def check_input(input_size: tuple[int, int] | list[int], times: int, name: str) -> tuple[int, int]:
    """Return (height, width) after ``times`` halvings, refusing inputs that vanish."""
    if len(input_size) != 2:
        raise ValueError(f"{name}: input_size must be [height, width], got {list(input_size)}")
    h, w = (downsampled(int(s), times) for s in input_size)
    if min(int(s) for s in input_size) < 2**times // 2:
        raise ValueError(f"{name}: input_size {list(input_size)} is too small for "
                         f"{times} stride-2 stages")
    return h, w


def check_batch(x: torch.Tensor, input_size: tuple[int, int], channels: int, name: str) -> None:
    """Refuse images of another size or channel count than the net was built for."""
    if x.dim() != 4 or tuple(x.shape[1:]) != (channels, *input_size):
        raise ValueError(f"{name}: expected images (B, {channels}, {input_size[0]}, "
                         f"{input_size[1]}), got {tuple(x.shape)}")
