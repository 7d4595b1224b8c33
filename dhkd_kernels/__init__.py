"""dhkd_kernels: fused dual-head knowledge-distillation losses (Triton kernels with a PyTorch fallback).

    from dhkd_kernels import fused_dual_head_kd_loss, DualHeadKDLoss

``dhkd_kernels.reference`` holds the plain PyTorch definitions every path is tested against.
"""
from . import reference
from .functional import DualHeadKDLoss, fused_dual_head_kd_loss

__all__ = ["DualHeadKDLoss", "fused_dual_head_kd_loss", "reference"]
__version__ = "0.1.0"
