"""MobileNetV2 for CIFAR as in the KD literature (``MobileNetV2`` = "mobile_half": expansion 6, width 0.5)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .common import CifarClassifier, init_normal_fan_out

# (expansion t, channels c, repeats n, stride s); t = None takes the network's expansion ratio
SETTINGS = [(1, 16, 1, 1), (None, 24, 2, 1), (None, 32, 3, 2), (None, 64, 4, 2), (None, 96, 3, 1),
            (None, 160, 3, 2), (None, 320, 1, 1)]


def _conv_bn_relu(inp: int, oup: int, kernel: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(inp, oup, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(oup),
                         nn.ReLU(inplace=True))


class InvertedResidual(nn.Module):
    """``conv``: 1x1 expand-BN-ReLU, 3x3 depthwise (stride)-BN-ReLU, 1x1 project-BN; + x when stride 1 and
    the width is unchanged."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = inp * expand_ratio
        self.use_res_connect = stride == 1 and inp == oup
        self.conv = nn.Sequential(
            nn.Conv2d(inp, hidden, 1, 1, 0, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, oup, 1, 1, 0, bias=False), nn.BatchNorm2d(oup))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(CifarClassifier):
    """``conv1`` 3x3 stride 2, seven ``blocks`` stages, ``conv2`` 1x1 to 1280 (scaled up only for width > 1),
    global average pooling -> features (N, 1280), ``classifier.0``."""

    head_name = "classifier.0"

    def __init__(self, num_classes: int = 100, expand_ratio: int = 6, width_mult: float = 0.5):
        super().__init__()
        channels = int(32 * width_mult)
        self.conv1 = _conv_bn_relu(3, channels, 3, 2)
        self.blocks = nn.ModuleList()
        for t, c, n, s in SETTINGS:
            out = int(c * width_mult)
            layers = []
            for stride in [s] + [1] * (n - 1):
                layers.append(InvertedResidual(channels, out, stride, expand_ratio if t is None else t))
                channels = out
            self.blocks.append(nn.Sequential(*layers))
        self.last_channel = int(1280 * width_mult) if width_mult > 1.0 else 1280
        self.conv2 = _conv_bn_relu(channels, self.last_channel, 1, 1)
        self.num_features = self.last_channel
        self.classifier = nn.Sequential(nn.Linear(self.last_channel, num_classes))
        init_normal_fan_out(self, linear_std=0.01)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        for stage in self.blocks:
            x = stage(x)
        x = self.conv2(x)
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)


def mobilenetv2(num_classes: int = 100) -> MobileNetV2:
    return MobileNetV2(num_classes, expand_ratio=6, width_mult=0.5)
