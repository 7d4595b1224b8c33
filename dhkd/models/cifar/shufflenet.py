"""ShuffleNet V1 (groups 3, widths 240/480/960) and V2 (1x: 116/232/464, 1024 features) for CIFAR as in
the KD literature: a 1x1 stem without downsampling, three stages that each halve the resolution."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .common import CifarClassifier, channel_shuffle


class ShuffleV1Block(nn.Module):
    """1x1 group conv-BN-ReLU, channel shuffle, 3x3 depthwise (stride)-BN-ReLU, 1x1 group conv-BN; then ReLU of
    (out + x) at stride 1, or of concat(out, avgpool3x3/2(x)) at stride 2 (``shortcut``)."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, groups: int):
        super().__init__()
        self.stride = stride
        mid = out_planes // 4
        self.g1 = 1 if in_planes == 24 else groups
        self.conv1 = nn.Conv2d(in_planes, mid, 1, groups=self.g1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, out_planes, 1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = nn.Sequential(nn.AvgPool2d(3, 2, 1)) if stride == 2 else nn.Sequential()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = channel_shuffle(F.relu(self.bn1(self.conv1(x))), self.g1)
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        res = self.shortcut(x)
        return F.relu(torch.cat([out, res], 1) if self.stride == 2 else out + res)


class ShuffleNetV1(CifarClassifier):
    """conv1x1(3, 24)-BN-ReLU, stages of [4, 8, 4] blocks (the first of each strided, concatenating its
    input), global average pooling -> features (N, 960), ``linear``."""

    head_name = "linear"

    def __init__(self, num_classes: int = 100, out_planes=(240, 480, 960), num_blocks=(4, 8, 4), groups: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.in_planes = 24
        self.layer1 = self._make_layer(out_planes[0], num_blocks[0], groups)
        self.layer2 = self._make_layer(out_planes[1], num_blocks[1], groups)
        self.layer3 = self._make_layer(out_planes[2], num_blocks[2], groups)
        self.num_features = out_planes[2]
        self.linear = nn.Linear(out_planes[2], num_classes)

    def _make_layer(self, out_planes: int, blocks: int, groups: int) -> nn.Sequential:
        layers = []
        for i in range(blocks):
            cat = self.in_planes if i == 0 else 0
            layers.append(ShuffleV1Block(self.in_planes, out_planes - cat, 2 if i == 0 else 1, groups))
            self.in_planes = out_planes
        return nn.Sequential(*layers)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)


class ShuffleV2Block(nn.Module):
    """Split channels in halves (x1, x2); x2 -> 1x1-BN-ReLU, 3x3 depthwise-BN, 1x1-BN-ReLU; concat(x1, ·),
    shuffle with 2 groups."""

    def __init__(self, channels: int):
        super().__init__()
        c = channels // 2
        self.conv1 = nn.Conv2d(c, c, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, 1, 1, groups=c, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.conv3 = nn.Conv2d(c, c, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1] // 2
        x1, x2 = x[:, :c], x[:, c:]
        out = F.relu(self.bn1(self.conv1(x2)))
        out = self.bn2(self.conv2(out))
        out = F.relu(self.bn3(self.conv3(out)))
        return channel_shuffle(torch.cat([x1, out], 1), 2)


class ShuffleV2DownBlock(nn.Module):
    """Left: 3x3 depthwise/2-BN, 1x1-BN-ReLU; right: 1x1-BN-ReLU, 3x3 depthwise/2-BN, 1x1-BN-ReLU; concat,
    shuffle with 2 groups. Each branch gives out_channels / 2."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        mid = out_channels // 2
        self.conv1 = nn.Conv2d(in_channels, in_channels, 3, 2, 1, groups=in_channels, bias=False)
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv2 = nn.Conv2d(in_channels, mid, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(in_channels, mid, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = nn.Conv2d(mid, mid, 3, 2, 1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, mid, 1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = F.relu(self.bn3(self.conv3(x)))
        right = F.relu(self.bn5(self.conv5(self.bn4(self.conv4(right)))))
        return channel_shuffle(torch.cat([left, right], 1), 2)


class ShuffleNetV2(CifarClassifier):
    """conv1x1(3, 24)-BN-ReLU, stages [down block + 3, 7, 3 blocks] at 116/232/464, conv1x1 to 1024-BN-ReLU,
    global average pooling -> features (N, 1024), ``linear``."""

    head_name = "linear"

    def __init__(self, num_classes: int = 100, out_channels=(116, 232, 464, 1024), num_blocks=(3, 7, 3)):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.in_channels = 24
        self.layer1 = self._make_layer(out_channels[0], num_blocks[0])
        self.layer2 = self._make_layer(out_channels[1], num_blocks[1])
        self.layer3 = self._make_layer(out_channels[2], num_blocks[2])
        self.conv2 = nn.Conv2d(out_channels[2], out_channels[3], 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels[3])
        self.num_features = out_channels[3]
        self.linear = nn.Linear(out_channels[3], num_classes)

    def _make_layer(self, out_channels: int, blocks: int) -> nn.Sequential:
        layers = [ShuffleV2DownBlock(self.in_channels, out_channels)]
        layers += [ShuffleV2Block(out_channels) for _ in range(blocks)]
        self.in_channels = out_channels
        return nn.Sequential(*layers)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
