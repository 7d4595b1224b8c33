"""VGG with batch norm for CIFAR as in the KD literature (``vgg8`` = config S, ``vgg13`` = config B):
five conv blocks without fully connected layers, global average pooling -> 512 features."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .common import CifarClassifier, init_normal_fan_out

CONFIGS = {
    "S": [[64], [128], [256], [512], [512]],
    "B": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
}


def _block(widths: list[int], in_channels: int) -> nn.Sequential:
    """[conv3x3-BN-ReLU] per width, without the last ReLU (indices: conv 3i, BN 3i+1)."""
    layers: list[nn.Module] = []
    for w in widths:
        layers += [nn.Conv2d(in_channels, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
        in_channels = w
    return nn.Sequential(*layers[:-1])


class VGG(CifarClassifier):
    """block0 -ReLU- maxpool, block1 -ReLU- maxpool, block2 -ReLU- maxpool, block3 -ReLU- (maxpool only for
    64x64 inputs, as in the original), block4 -ReLU- global average pooling -> (N, 512), ``classifier``."""

    head_name = "classifier"

    def __init__(self, config: str, num_classes: int = 100):
        super().__init__()
        cfg = CONFIGS[config]
        self.block0 = _block(cfg[0], 3)
        self.block1 = _block(cfg[1], cfg[0][-1])
        self.block2 = _block(cfg[2], cfg[1][-1])
        self.block3 = _block(cfg[3], cfg[2][-1])
        self.block4 = _block(cfg[4], cfg[3][-1])
        self.num_features = cfg[4][-1]
        self.classifier = nn.Linear(self.num_features, num_classes)
        init_normal_fan_out(self, linear_std=0.01)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        tall = x.shape[2] == 64
        x = F.max_pool2d(F.relu(self.block0(x)), 2)
        x = F.max_pool2d(F.relu(self.block1(x)), 2)
        x = F.max_pool2d(F.relu(self.block2(x)), 2)
        x = F.relu(self.block3(x))
        if tall:
            x = F.max_pool2d(x, 2)
        x = F.relu(self.block4(x))
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)


def vgg8(num_classes: int = 100) -> VGG:
    return VGG("S", num_classes)


def vgg13(num_classes: int = 100) -> VGG:
    return VGG("B", num_classes)
