"""IResNet (Deng et al., ArcFace; the "improved ResNet" of insightface ``arcface_torch``).

Stem: 3x3 stride-1 conv 64 + BN + PReLU. Four stages of 64/128/256/512 channels, each
opening with stride 2, made of BN-conv-BN-PReLU-conv(stride)-BN residual blocks (the
shortcut is a 1x1 strided conv + BN where the shape changes). Head: BN, dropout, FC to
the embedding, then a BatchNorm1d whose scale is fixed at 1 (the "features" layer).

Blocks per stage: iresnet50: 3, 4, 14, 3;  iresnet100: 3, 13, 30, 3.
Input 112x112 gives a 7x7 map before the FC; 112x96 gives 7x6.
"""

from __future__ import annotations

import torch
from torch import nn

from seqface_dist.models._shape import check_batch, check_input

IRESNET_BLOCKS: dict[int, tuple[int, int, int, int]] = {
    18: (2, 2, 2, 2),
    34: (3, 4, 6, 3),
    50: (3, 4, 14, 3),
    100: (3, 13, 30, 3),
}
_WIDTHS = (64, 128, 256, 512)
_BN_EPS = 1e-5


class IBasicBlock(nn.Module):
    """Pre-activation-style residual block: BN, conv, BN, PReLU, conv(stride), BN (+ shortcut)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin, eps=_BN_EPS)
        self.conv1 = nn.Conv2d(cin, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout, eps=_BN_EPS)
        self.prelu = nn.PReLU(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout, eps=_BN_EPS)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout, eps=_BN_EPS)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return out + shortcut


class IResNet(nn.Module):
    """IResNet-N: (B, C, H, W) images -> (B, embedding_dim) features."""

    def __init__(self, depth: int, *, in_channels: int = 3, embedding_dim: int = 512,
                 input_size: tuple[int, int] | list[int] = (112, 112),
                 dropout: float = 0.0) -> None:
        super().__init__()
        if depth not in IRESNET_BLOCKS:
            raise ValueError(f"iresnet depth must be one of {sorted(IRESNET_BLOCKS)}, got {depth}")
        h, w = check_input(input_size, 4, f"iresnet{depth}")
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False),
            nn.BatchNorm2d(64, eps=_BN_EPS),
            nn.PReLU(64),
        )
        stages: list[nn.Module] = []
        cin = 64
        for width, blocks in zip(_WIDTHS, IRESNET_BLOCKS[depth], strict=True):
            stage = [IBasicBlock(cin, width, 2)]
            stage += [IBasicBlock(width, width, 1) for _ in range(blocks - 1)]
            stages.append(nn.Sequential(*stage))
            cin = width
        self.stages = nn.Sequential(*stages)
        self.bn2 = nn.BatchNorm2d(cin, eps=_BN_EPS)
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(cin * h * w, embedding_dim)
        self.features = nn.BatchNorm1d(embedding_dim, eps=_BN_EPS)
        self.input_size = (int(input_size[0]), int(input_size[1]))
        self.in_channels = in_channels
        self.depth = depth
        self._init_weights()

    def _init_weights(self) -> None:
        # BN follows every conv, so He (Kaiming) init keeps the pre-BN variance sane and
        # BN rescales anyway; BN starts as the identity. The last BN's scale is fixed at 1
        # (as in arcface_torch): the embedding's norm is then set by the FC, not a free gain.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)
        self.features.weight.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_batch(x, self.input_size, self.in_channels, f"iresnet{self.depth}")
        x = self.bn2(self.stages(self.stem(x)))
        x = self.fc(self.dropout(torch.flatten(x, 1)))
        return self.features(x)


def iresnet50(**kw) -> IResNet:
    return IResNet(50, **kw)


def iresnet100(**kw) -> IResNet:
    return IResNet(100, **kw)
