"""Backbones: shapes at both crop sizes, layer counts, parameter counts, determinism, config."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from seqface_dist.config import ConfigError, ModelConfig, load_config
from seqface_dist.models import BACKBONES, build_backbone
from seqface_dist.models.iresnet import IBasicBlock, IResNet
from seqface_dist.models.sphere import SphereNet

# Parameter counts (millions) at 3 input channels, 512-d embedding. They follow from the
# layer definitions: e.g. sphere20's FC alone is 512*7*6*512 = 11.0M at 112x96, and
# insightface reports 43.6M / 65.2M for IResNet-50/100 at 112x112.
PARAMS_M = {
    ("sphere20", (112, 96)): 22.67, ("sphere20", (112, 112)): 24.51,
    ("sphere36", (112, 96)): 32.78, ("sphere36", (112, 112)): 34.61,
    ("sphere64", (112, 96)): 48.20, ("sphere64", (112, 112)): 50.04,
    ("iresnet50", (112, 96)): 41.76, ("iresnet50", (112, 112)): 43.59,
    ("iresnet100", (112, 96)): 63.32, ("iresnet100", (112, 112)): 65.16,
}
BIG = ["sphere20", "sphere36", "sphere64", "iresnet50", "iresnet100"]


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("size", [(112, 96), (112, 112)])
@pytest.mark.parametrize("name", BIG)
def test_big_backbones_shape_params_and_eval_determinism(name: str, size: tuple[int, int]) -> None:
    torch.manual_seed(0)
    net = build_backbone(ModelConfig(backbone=name, input_size=list(size))).eval()
    assert n_params(net) / 1e6 == pytest.approx(PARAMS_M[(name, size)], rel=0.005)
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        y1, y2 = net(x), net(x)
    assert y1.shape == (2, 512)
    assert torch.isfinite(y1).all()
    assert torch.equal(y1, y2)
    # The two images must not collapse to one feature.
    assert not torch.allclose(y1[0], y1[1])


@pytest.mark.parametrize("depth", [20, 36, 64])
def test_sphere_conv_layer_count_matches_its_name(depth: int) -> None:
    net = SphereNet(depth, input_size=(112, 96))
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == depth
    assert not any(isinstance(m, nn.BatchNorm2d) for m in net.modules())  # as in the paper


@pytest.mark.parametrize("depth,blocks", [(50, 24), (100, 49)])
def test_iresnet_block_count(depth: int, blocks: int) -> None:
    net = IResNet(depth, input_size=(112, 112))
    assert sum(isinstance(m, IBasicBlock) for m in net.modules()) == blocks
    assert not net.features.weight.requires_grad  # the feature BN's scale is fixed at 1


@pytest.mark.parametrize("name", BIG + ["tiny"])
def test_channels_and_embedding_dim_are_configurable(name: str) -> None:
    size = [32, 32] if name == "tiny" else [112, 96]
    cfg = ModelConfig(backbone=name, in_channels=1, embedding_dim=64, input_size=size)
    net = build_backbone(cfg).eval()
    with torch.no_grad():
        assert net(torch.randn(2, 1, *size)).shape == (2, 64)
    with pytest.raises(ValueError, match="expected images"):
        net(torch.randn(2, 3, *size))  # a 3-channel image into a 1-channel net


@pytest.mark.parametrize("size", [(28, 28), (32, 32), (24, 20)])
def test_tiny_shapes_and_gradients_reach_every_parameter(size: tuple[int, int]) -> None:
    torch.manual_seed(0)
    net = BACKBONES["tiny"](in_channels=1, embedding_dim=16, input_size=size)
    assert n_params(net) < 200_000
    y = net(torch.randn(4, 1, *size))
    assert y.shape == (4, 16)
    y.pow(2).sum().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_wrong_input_size_fails_loudly() -> None:
    net = build_backbone(ModelConfig(backbone="tiny", input_size=[32, 32], in_channels=1))
    with pytest.raises(ValueError, match=r"\(B, 1, 32, 32\), got \(2, 1, 28, 28\)"):
        net(torch.randn(2, 1, 28, 28))  # the FC was sized for 32x32


def test_dropout_only_acts_in_train_mode() -> None:
    torch.manual_seed(0)
    net = IResNet(18, input_size=(32, 32), embedding_dim=8, dropout=0.5)
    x = torch.randn(4, 3, 32, 32)
    net.train()
    assert not torch.equal(net(x), net(x))
    net.eval()
    assert torch.equal(net(x), net(x))


def test_unknown_backbone_refused_naming_the_key() -> None:
    with pytest.raises(ConfigError, match=r"model\.backbone"):
        load_config(None, ["model.backbone=resnet9000"])
    with pytest.raises(ConfigError, match=r"model\.backbone"):
        build_backbone(ModelConfig(backbone="resnet9000"))  # not validated: still refused


def test_too_small_input_refused() -> None:
    with pytest.raises(ValueError, match="too small"):
        SphereNet(20, input_size=(4, 4))
