"""Wide ResNets of the KD literature: wrn_<depth>_<k>, depth = 6n + 4, widths 16k/32k/64k, pre-activation
basic blocks."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .common import CifarClassifier, init_normal_fan_out


class WideBasicBlock(nn.Module):
    """a = ReLU(BN(x)); out = conv2(ReLU(BN(conv1(a)))) + (x, or ``convShortcut(a)`` when the shape changes)."""

    def __init__(self, in_planes: int, out_planes: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, 1, 1, bias=False)
        self.equal_in_out = in_planes == out_planes
        self.convShortcut = None if self.equal_in_out else nn.Conv2d(in_planes, out_planes, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.relu1(self.bn1(x))
        out = self.conv2(self.relu2(self.bn2(self.conv1(a))))
        return out + (x if self.equal_in_out else self.convShortcut(a))


class NetworkBlock(nn.Module):
    """``layer``: n wide basic blocks, the first one with the stride and the width change."""

    def __init__(self, n: int, in_planes: int, out_planes: int, stride: int):
        super().__init__()
        self.layer = nn.Sequential(*[WideBasicBlock(in_planes if i == 0 else out_planes, out_planes,
                                                    stride if i == 0 else 1) for i in range(n)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(CifarClassifier):
    """conv3x3(3, 16), three network blocks (strides 1, 2, 2), BN-ReLU, global average pooling -> features
    (N, 64k), ``fc``."""

    head_name = "fc"

    def __init__(self, depth: int, widen_factor: int, num_classes: int = 100):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"depth must be 6n + 4, got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.block1 = NetworkBlock(n, widths[0], widths[1], 1)
        self.block2 = NetworkBlock(n, widths[1], widths[2], 2)
        self.block3 = NetworkBlock(n, widths[2], widths[3], 2)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU(inplace=True)
        self.num_features = widths[3]
        self.fc = nn.Linear(widths[3], num_classes)
        init_normal_fan_out(self, linear_std=None)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        x = self.relu(self.bn1(x))
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)


def wrn_40_2(num_classes: int = 100) -> WideResNet:
    return WideResNet(40, 2, num_classes)


def wrn_40_1(num_classes: int = 100) -> WideResNet:
    return WideResNet(40, 1, num_classes)


def wrn_16_2(num_classes: int = 100) -> WideResNet:
    return WideResNet(16, 2, num_classes)
