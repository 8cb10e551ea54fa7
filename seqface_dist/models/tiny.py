"""A tiny conv net for tests and demos: three stride-2 conv-BN-PReLU layers and an FC.

Fast on CPU with small inputs (28x28, 32x32); any input of at least 8x8 works.
"""

from __future__ import annotations

import torch
from torch import nn

from seqface_dist.models._shape import check_batch, check_input

_WIDTHS = (16, 32, 64)


class TinyNet(nn.Module):
    """(B, C, H, W) -> (B, embedding_dim); ~0.1M parameters at 32x32 with 64-d features."""

    def __init__(self, *, in_channels: int = 1, embedding_dim: int = 64,
                 input_size: tuple[int, int] | list[int] = (32, 32)) -> None:
        super().__init__()
        h, w = check_input(input_size, len(_WIDTHS), "tiny")
        layers: list[nn.Module] = []
        cin = in_channels
        for width in _WIDTHS:
            layers += [nn.Conv2d(cin, width, 3, 2, 1, bias=False), nn.BatchNorm2d(width),
                       nn.PReLU(width)]
            cin = width
        self.body = nn.Sequential(*layers)
        self.fc = nn.Linear(cin * h * w, embedding_dim)
        self.input_size = (int(input_size[0]), int(input_size[1]))
        self.in_channels = in_channels
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_batch(x, self.input_size, self.in_channels, "tiny")
        return self.fc(torch.flatten(self.body(x), 1))


def tiny(**kw) -> TinyNet:
    return TinyNet(**kw)
