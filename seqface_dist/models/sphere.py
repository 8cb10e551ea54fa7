"""SphereFace residual networks (Liu et al., CVPR 2017, "SphereFace", Table 2).

Four stages of 64/128/256/512 channels. Each stage opens with a 3x3 stride-2 convolution
+ PReLU and continues with residual units of two 3x3 convolutions + PReLU each, the
identity added after the second. A final fully connected layer gives the embedding.
No batch normalisation, as in the paper (and in SeqFace, which trains these nets).

Residual units per stage (conv layers = 4 + 2 * units):
    sphere20: 1, 2, 4, 1     sphere36: 2, 4, 8, 2     sphere64: 3, 8, 16, 3

Input 112x96 (the paper's aligned crop) gives a 7x6 map before the FC; 112x112 gives 7x7.
"""

from __future__ import annotations

import torch
from torch import nn

from seqface_dist.models._shape import check_batch, check_input

SPHERE_UNITS: dict[int, tuple[int, int, int, int]] = {
    20: (1, 2, 4, 1),
    36: (2, 4, 8, 2),
    64: (3, 8, 16, 3),
}
_WIDTHS = (64, 128, 256, 512)


class SphereUnit(nn.Module):
    """x + PReLU(conv(PReLU(conv(x)))): the residual unit of the SphereFace nets."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, 1, 1)
        self.act1 = nn.PReLU(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1)
        self.act2 = nn.PReLU(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.act2(self.conv2(self.act1(self.conv1(x))))


class SphereNet(nn.Module):
    """SphereFace-style residual net: (B, C, H, W) images -> (B, embedding_dim) features."""

    def __init__(self, depth: int, *, in_channels: int = 3, embedding_dim: int = 512,
                 input_size: tuple[int, int] | list[int] = (112, 96)) -> None:
        super().__init__()
        if depth not in SPHERE_UNITS:
            raise ValueError(f"sphere depth must be one of {sorted(SPHERE_UNITS)}, got {depth}")
        h, w = check_input(input_size, 4, f"sphere{depth}")
        layers: list[nn.Module] = []
        cin = in_channels
        for width, units in zip(_WIDTHS, SPHERE_UNITS[depth], strict=True):
            layers += [nn.Conv2d(cin, width, 3, 2, 1), nn.PReLU(width)]
            layers += [SphereUnit(width) for _ in range(units)]
            cin = width
        self.body = nn.Sequential(*layers)
        self.fc = nn.Linear(cin * h * w, embedding_dim)
        self.input_size = (int(input_size[0]), int(input_size[1]))
        self.in_channels = in_channels
        self.depth = depth
        self._init_weights()

    def _init_weights(self) -> None:
        # Without BN the residual branches must start small, or the activation variance
        # grows with every unit added to the trunk (sphere64 has 30). So, like the
        # reference prototxts: Xavier for the trunk (stride-2 convs, FC) and N(0, 0.01)
        # inside residual units, so each unit starts near the identity. Biases 0.
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.modules():
            if isinstance(m, SphereUnit):
                nn.init.normal_(m.conv1.weight, 0.0, 0.01)
                nn.init.normal_(m.conv2.weight, 0.0, 0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_batch(x, self.input_size, self.in_channels, f"sphere{self.depth}")
        return self.fc(torch.flatten(self.body(x), 1))


def sphere20(**kw) -> SphereNet:
    return SphereNet(20, **kw)


def sphere36(**kw) -> SphereNet:
    return SphereNet(36, **kw)


def sphere64(**kw) -> SphereNet:
    return SphereNet(64, **kw)
