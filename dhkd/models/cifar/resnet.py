"""CIFAR ResNets of the KD literature: resnet{20,32,56,110} (widths 16/16/32/64), resnet8x4 and resnet32x4
(widths 32/64/128/256), depth = 6n + 2 with n basic blocks per stage; and the CIFAR ``ResNet50``
(bottleneck blocks [3, 4, 6, 3], widths 64..512, expansion 4, 3x3 stem)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .common import CifarClassifier, init_kaiming_fan_out


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN + shortcut (``downsample`` = 1x1 conv + BN when the shape changes), ReLU."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(out + shortcut)


class CifarResNet(CifarClassifier):
    """conv3x3(3, w0)-BN-ReLU, three stages of n = (depth - 2) / 6 basic blocks (widths w1, w2, w3; strides
    1, 2, 2), global average pooling (8x8 at 32x32 inputs) -> features (N, w3), ``fc``."""

    head_name = "fc"

    def __init__(self, depth: int, widths: tuple[int, int, int, int], num_classes: int = 100):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"depth must be 6n + 2, got {depth}")
        n = (depth - 2) // 6
        self.inplanes = widths[0]
        self.conv1 = nn.Conv2d(3, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(widths[1], n, 1)
        self.layer2 = self._make_layer(widths[2], n, 2)
        self.layer3 = self._make_layer(widths[3], n, 2)
        self.num_features = widths[3]
        self.fc = nn.Linear(widths[3], num_classes)
        init_kaiming_fan_out(self)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [BasicBlock(self.inplanes, planes, stride)]
        self.inplanes = planes
        layers += [BasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)


def resnet20(num_classes: int = 100) -> CifarResNet:
    return CifarResNet(20, (16, 16, 32, 64), num_classes)


def resnet32(num_classes: int = 100) -> CifarResNet:
    return CifarResNet(32, (16, 16, 32, 64), num_classes)


def resnet56(num_classes: int = 100) -> CifarResNet:
    return CifarResNet(56, (16, 16, 32, 64), num_classes)


def resnet110(num_classes: int = 100) -> CifarResNet:
    return CifarResNet(110, (16, 16, 32, 64), num_classes)


def resnet8x4(num_classes: int = 100) -> CifarResNet:
    return CifarResNet(8, (32, 64, 128, 256), num_classes)


def resnet32x4(num_classes: int = 100) -> CifarResNet:
    return CifarResNet(32, (32, 64, 128, 256), num_classes)


class Bottleneck(nn.Module):
    """1x1-BN-ReLU, 3x3 (stride)-BN-ReLU, 1x1 (x4)-BN + ``shortcut`` (1x1 conv + BN, or identity), ReLU."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != out:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, out, 1, stride, bias=False), nn.BatchNorm2d(out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet50(CifarClassifier):
    """The KD literature's CIFAR ``ResNet50``: 3x3 stem (64), bottleneck stages [3, 4, 6, 3] at widths
    64/128/256/512 (strides 1, 2, 2, 2), global average pooling -> features (N, 2048), ``linear``."""

    head_name = "linear"

    def __init__(self, num_classes: int = 100, num_blocks: tuple[int, ...] = (3, 4, 6, 3)):
        super().__init__()
        self.in_planes = 64
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.layer1 = self._make_layer(64, num_blocks[0], 1)
        self.layer2 = self._make_layer(128, num_blocks[1], 2)
        self.layer3 = self._make_layer(256, num_blocks[2], 2)
        self.layer4 = self._make_layer(512, num_blocks[3], 2)
        self.num_features = 512 * Bottleneck.expansion
        self.linear = nn.Linear(self.num_features, num_classes)
        init_kaiming_fan_out(self)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (blocks - 1):
            layers.append(Bottleneck(self.in_planes, planes, s))
            self.in_planes = planes * Bottleneck.expansion
        return nn.Sequential(*layers)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
