"""Video backbones: torchvision R(2+1)D-18 / R3D-18 / S3D with the official pooling, plus a tiny CPU 3D CNN.

Each backbone maps N×C×T×H×W to N×F pooled features. `pool="1x2x2"` keeps a 2×2 spatial grid
(AdaptiveAvgPool3d(1,2,2)) so R(2+1)D-18 gives the 2048-d features the official code reports; `"global"` averages
everything (512-d for the ResNets, 1024-d for S3D — the official `s3d_old`).
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torchvision.models import video as tv_video

_POOLS = {"1x2x2": (1, 2, 2), "global": (1, 1, 1)}


class PooledBackbone(nn.Module):
    """A trunk followed by adaptive average pooling and flattening."""

    def __init__(self, trunk: nn.Module, channels: int, pool: str):
        super().__init__()
        if pool not in _POOLS:
            raise ValueError(f"pool must be one of {sorted(_POOLS)}, got {pool!r}")
        self.trunk = trunk
        self.pool = nn.AdaptiveAvgPool3d(_POOLS[pool])
        grid = _POOLS[pool]
        self.out_dim = channels * grid[0] * grid[1] * grid[2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.pool(self.trunk(x)), 1)


def _replace_first_conv(conv: nn.Conv3d, in_channels: int) -> nn.Conv3d:
    """A stem conv taking `in_channels` (2 for u/v flow) with the same geometry, freshly initialised."""
    new = nn.Conv3d(in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                    bias=conv.bias is not None)
    nn.init.kaiming_normal_(new.weight, mode="fan_out", nonlinearity="relu")
    return new


def _video_resnet(builder, in_channels: int, pool: str) -> PooledBackbone:
    net = builder(weights=None)
    if in_channels != 3:
        net.stem[0] = _replace_first_conv(net.stem[0], in_channels)
    trunk = nn.Sequential(net.stem, net.layer1, net.layer2, net.layer3, net.layer4)
    return PooledBackbone(trunk, 512, pool)


def _s3d(in_channels: int, pool: str) -> PooledBackbone:
    net = tv_video.s3d(weights=None)
    if in_channels != 3:
        stem = net.features[0][0]
        stem[0] = _replace_first_conv(stem[0], in_channels)
    return PooledBackbone(net.features, 1024, pool)


class TinyVideoNet(nn.Module):
    """A 4-layer 3D CNN (≈0.2 M parameters) so the CPU demo and tests train in minutes."""

    def __init__(self, in_channels: int = 3, width: int = 32):
        super().__init__()

        def block(cin: int, cout: int, stride: tuple[int, int, int]) -> nn.Sequential:
            return nn.Sequential(nn.Conv3d(cin, cout, 3, stride=stride, padding=1, bias=False),
                                 nn.BatchNorm3d(cout), nn.ReLU(inplace=True))

        self.layers = nn.Sequential(
            block(in_channels, width, (1, 2, 2)),
            block(width, width * 2, (2, 2, 2)),
            block(width * 2, width * 4, (2, 2, 2)),
            block(width * 4, width * 4, (1, 2, 2)),
        )
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


BACKBONES = ("r2plus1d_18", "r3d_18", "s3d", "tiny")


def build_backbone(arch: str, in_channels: int = 3, pool: str = "1x2x2") -> PooledBackbone:
    """Build a randomly initialised backbone; `in_channels=2` gives the flow stream's stem."""
    if arch == "r2plus1d_18":
        return _video_resnet(tv_video.r2plus1d_18, in_channels, pool)
    if arch == "r3d_18":
        return _video_resnet(tv_video.r3d_18, in_channels, pool)
    if arch == "s3d":
        return _s3d(in_channels, pool)
    if arch == "tiny":
        return PooledBackbone(TinyVideoNet(in_channels), 128, pool)
    raise ValueError(f"unknown backbone {arch!r}; choose one of {', '.join(BACKBONES)}")
