"""The dual-head student: one backbone, a main linear head and an auxiliary head (linear or MLP)."""
from __future__ import annotations

import copy
import numbers

import torch
from torch import nn

AUX_HEADS = ("linear", "mlp")


class StudentClassifier(nn.Module):
    """A plain classifier ``head(backbone(x))``: what ``DualHeadStudent.export_student`` returns.

    backbone maps x to pooled features (N, D); head is ``Linear(D, C)``; forward returns logits (N, C).
    """

    def __init__(self, backbone: nn.Module, head: nn.Linear):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


class DualHeadStudent(nn.Module):
    """Backbone + main head ``Linear(d, C)`` + auxiliary head.

    aux_head="linear": ``aux_head = Linear(d, C)`` on the backbone features.
    aux_head="mlp" (as in the DHKD paper's code): ``aux_mlp = Linear(d, aux_hidden) -> Dropout(aux_dropout)
    -> BatchNorm1d(aux_hidden) -> ReLU`` then ``aux_head = Linear(aux_hidden, C)``.
    ``aux_head`` is always the last Linear, the one ``fused_dual_head_kd_loss`` fuses (its aux_weight/
    aux_bias), and the aux_mlp output is the loss's ``aux_features``.

    ``forward`` returns the main head's logits only (inference); training code calls
    ``forward_features`` and hands the features and the head parameters to the fused loss.
    """

    def __init__(self, backbone: nn.Module, num_features: int, num_classes: int, aux_head: str = "linear",
                 aux_hidden: int = 200, aux_dropout: float = 0.1):
        super().__init__()
        if aux_head not in AUX_HEADS:
            raise ValueError(f"aux_head must be one of {AUX_HEADS}, got {aux_head!r}")
        for arg, value in (("num_features", num_features), ("num_classes", num_classes),
                           ("aux_hidden", aux_hidden)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"{arg} must be a positive int, got {value!r}")
        if not 0.0 <= float(aux_dropout) < 1.0:
            raise ValueError(f"aux_dropout must be in [0, 1), got {aux_dropout!r}")
        num_features, num_classes, aux_hidden = int(num_features), int(num_classes), int(aux_hidden)
        self.backbone = backbone
        self.num_features = num_features
        self.num_classes = num_classes
        self.aux_head_kind = aux_head
        self.head = nn.Linear(num_features, num_classes)
        if aux_head == "mlp":
            self.aux_mlp = nn.Sequential(nn.Linear(num_features, aux_hidden), nn.Dropout(aux_dropout),
                                         nn.BatchNorm1d(aux_hidden), nn.ReLU(inplace=True))
            self.aux_head = nn.Linear(aux_hidden, num_classes)
        else:
            self.aux_mlp = None
            self.aux_head = nn.Linear(num_features, num_classes)

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x -> (features (N, d), aux_features (N, aux_hidden) for the MLP head, else None)."""
        features = self.backbone(x)
        if features.dim() != 2:
            raise ValueError(f"the backbone must return pooled features (N, D); got shape {tuple(features.shape)}")
        aux_features = self.aux_mlp(features) if self.aux_mlp is not None else None
        return features, aux_features

    def aux_logits(self, features: torch.Tensor, aux_features: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of the auxiliary head (N, C), from ``forward_features``'s outputs."""
        if self.aux_mlp is not None:
            if aux_features is None:
                aux_features = self.aux_mlp(features)
            return self.aux_head(aux_features)
        return self.aux_head(features)

    def main_logits(self, features: torch.Tensor) -> torch.Tensor:
        """Logits of the main head (N, C) from the pooled features."""
        return self.head(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def export_student(self) -> StudentClassifier:
        """A standalone copy ``StudentClassifier(backbone, head)`` without the auxiliary head.

        Its state dict holds ``backbone.*`` and ``head.*`` only; it keeps this module's train/eval mode.
        """
        exported = StudentClassifier(copy.deepcopy(self.backbone), copy.deepcopy(self.head))
        exported.train(self.training)
        return exported
