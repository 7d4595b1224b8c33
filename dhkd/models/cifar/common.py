"""Shared pieces of the CIFAR-100 zoo (32x32 inputs)."""
from __future__ import annotations

import math

import torch
from torch import nn


class CifarClassifier(nn.Module):
    """Base: ``forward(x) = <head_name>(forward_features(x))``, with pooled features (N, num_features).

    ``head_name`` is the qualified name of the final Linear as in the KD literature's checkpoints
    (``fc``, ``classifier``, ``linear`` or ``classifier.0``).
    """

    head_name = "fc"
    num_features: int

    @property
    def final_linear(self) -> nn.Module:
        return self.get_submodule(self.head_name)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.final_linear(self.forward_features(x))


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(N, g*k, H, W) -> channels reordered as k groups of g: [N, g, k] -> [N, k, g]."""
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


def init_kaiming_fan_out(model: nn.Module) -> None:
    """Conv: Kaiming normal (fan_out, ReLU); BatchNorm: weight 1, bias 0."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def init_normal_fan_out(model: nn.Module, linear_std: float | None) -> None:
    """Conv: N(0, 2 / (k_h k_w out_channels)), bias 0; BatchNorm 1/0; Linear: bias 0, weight N(0, linear_std)
    when given (else PyTorch's default)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            if linear_std is not None:
                nn.init.normal_(m.weight, 0.0, linear_std)
            nn.init.zeros_(m.bias)
