"""Small MNIST-1D classifiers (inputs: (N, 40) float signals, or (N, 1, 40)).

Reference accuracies on MNIST-1D (Greydanus 2020): an MLP reaches about 68% test accuracy, a small
1-D CNN about 94%.
"""
from __future__ import annotations

import torch
from torch import nn

MNIST1D_LENGTH = 40


def _as_signal(x: torch.Tensor) -> torch.Tensor:
    """(N, L) or (N, 1, L) -> (N, L)."""
    if x.dim() == 3 and x.shape[1] == 1:
        return x[:, 0]
    if x.dim() != 2:
        raise ValueError(f"MNIST-1D models take inputs of shape (N, L) or (N, 1, L); got {tuple(x.shape)}")
    return x


class MNIST1DMLP(nn.Module):
    """``Linear(L, h) -> ReLU -> Linear(h, h) -> ReLU`` features (N, h), then ``fc = Linear(h, C)``."""

    def __init__(self, num_classes: int = 10, length: int = MNIST1D_LENGTH, hidden: int = 100):
        super().__init__()
        self.num_features = hidden
        self.features = nn.Sequential(nn.Linear(length, hidden), nn.ReLU(inplace=True),
                                      nn.Linear(hidden, hidden), nn.ReLU(inplace=True))
        self.fc = nn.Linear(hidden, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(_as_signal(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.forward_features(x))


class MNIST1DCNN(nn.Module):
    """Three strided Conv1d layers (kernel 5/3/3, stride 2, ``channels`` wide, ReLU); the (N, channels, 5)
    map is average-pooled to ``positions`` steps and flattened: features (N, channels * positions).
    For L = 40 the map already has 5 steps, so the pooling is the identity. Then ``fc = Linear(·, C)``."""

    def __init__(self, num_classes: int = 10, channels: int = 32, positions: int = 5):
        super().__init__()
        self.num_features = channels * positions
        self.features = nn.Sequential(
            nn.Conv1d(1, channels, 5, stride=2, padding=1), nn.ReLU(inplace=True),
            nn.Conv1d(channels, channels, 3, stride=2, padding=1), nn.ReLU(inplace=True),
            nn.Conv1d(channels, channels, 3, stride=2, padding=1), nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool1d(positions), nn.Flatten(1))
        self.fc = nn.Linear(self.num_features, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(_as_signal(x).unsqueeze(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.forward_features(x))


class MNIST1DBNCNN(nn.Module):
    """Conv1d-BatchNorm1d-ReLU blocks on (N, 1, L): ``stem`` blocks of stride 1, then ``downs`` blocks of
    stride 2, ``channels`` wide (kernel 5 for the first block, 3 after), then flattened: features
    (N, channels * L / 2^downs), for L = 40 and 3 downs (N, 5 channels). Then ``fc = Linear(., C)``."""

    def __init__(self, num_classes: int = 10, channels: int = 32, stem: int = 0, downs: int = 3,
                 length: int = MNIST1D_LENGTH):
        super().__init__()
        if length % 2 ** downs:
            raise ValueError(f"length {length} is not a multiple of 2^downs = {2 ** downs}")
        self.num_features = channels * (length // 2 ** downs)
        layers, c_in = [], 1
        for k in range(stem + downs):
            kernel = 5 if k == 0 else 3
            layers += [nn.Conv1d(c_in, channels, kernel, stride=1 if k < stem else 2, padding=kernel // 2,
                                 bias=False), nn.BatchNorm1d(channels), nn.ReLU(inplace=True)]
            c_in = channels
        self.features = nn.Sequential(*layers, nn.Flatten(1))
        self.fc = nn.Linear(self.num_features, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(_as_signal(x).unsqueeze(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.forward_features(x))
