"""dhkd_kernels: fused dual-head knowledge-distillation losses (Triton kernels with a PyTorch fallback).

    from dhkd_kernels import fused_dual_head_kd_loss, DualHeadKDLoss

``dhkd_kernels.reference`` holds the plain PyTorch definitions every path is tested against;
``dhkd_kernels.cost`` the launch recorder and cost model of the Triton path.
"""
from . import cost, reference
from .functional import DualHeadKDLoss, fused_dual_head_kd_loss, set_label_check

__all__ = ["DualHeadKDLoss", "cost", "fused_dual_head_kd_loss", "reference", "set_label_check"]
__version__ = "0.2.0"
