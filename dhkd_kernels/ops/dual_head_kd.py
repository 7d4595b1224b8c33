"""The ``backend="triton"`` path: the dual-head KD loss at the cost of its matmuls.

Notation: z1 = X W1^T + b1 (main head), z2 = A W2^T + b2 (auxiliary head; A = X when ``aux_features``
is None), t the teacher logits, V the valid rows.

**Work.** Per forward+backward exactly one z = X W^T, one dX = dZ W and one dW = dZ^T X per head
(12 N C D FLOPs with shared features): the logits of a block are stored once by the GEMM, the loss
epilogue turns them into dz in place, and the gradient products read that dz. Nothing is recomputed.
Without any gradient (eval, ``torch.no_grad()``) only the forward products run.

Modules: :mod:`._plan` (the plan, its dispatch rule and the memory bound), :mod:`._launch` (launches
and the cost record), :mod:`._resident` and :mod:`._chunked_cublas` (the two plans' forward and
backward), :mod:`._custom_ops` (``torch.library`` registration and autograd), kernels in
:mod:`._gemm_kernels`, :mod:`._epilogue_kernels` and :mod:`._grad_kernel`. This module is the entry
point: dtypes, casts, the plan of the call, and the op.

**No host synchronisation:** the plan depends only on shapes, dtypes and flags; every scalar that
depends on data (|V|, grad_output) stays on the device. The op can be captured in a CUDA graph.
**Determinism:** every output element is written by one program in a fixed order, no atomics.

Dtypes: matmul operands (features, weights, aux features) in one dtype of fp32/bf16/fp16: the
autocast dtype under ``torch.autocast``, otherwise the promoted dtype of the operands. Logits are
stored in the operand dtype (as eager PyTorch does); every loss formula, statistic and dz is fp32
arithmetic; biases and teacher logits are read in fp32. fp32 operands use TF32 iff PyTorch's CUDA
matmul setting asks for it.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Optional

import torch

from . import TeacherHead
from ._custom_ops import _direct, _fwd_op, direct_forward
from ._launch import _cast, _contiguous, _dot_precision, set_debug_poison
from ._plan import (TRITON_MAX_FLOPS, Plan, Work, _opts_from, _work, llm_extra, make_plan, opts_cached,
                    plan_for, plan_from_list,                    plan_to_list, set_engine, set_memory_budget, settings)

__all__ = ["dual_head_kd_loss", "make_plan", "set_debug_poison", "set_engine", "set_memory_budget",
           "TRITON_MAX_FLOPS", "settings", "Plan", "Work", "plan_from_list", "plan_to_list", "operand_dtype"]

_OPERAND_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
TEACHER_OFFSET_MAX = 2**31 - 1  # the largest teacher class offset (class x column stride) the kernels take

def _tf32_enabled(matmul=None) -> bool:
    """PyTorch's TF32 setting for CUDA matmuls: ``allow_tf32`` (traceable by dynamo), or, where
    reading it raises because the newer ``fp32_precision`` API was used (torch >= 2.9), that one."""
    matmul = torch.backends.cuda.matmul if matmul is None else matmul
    try:
        return bool(matmul.allow_tf32)
    except RuntimeError:
        return getattr(matmul, "fp32_precision", "ieee") == "tf32"


def _autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    if device_type == "meta":
        return None
    try:
        if torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
        return None
    except (TypeError, AttributeError):  # older signatures
        if device_type == "cuda" and torch.is_autocast_enabled():
            return torch.get_autocast_gpu_dtype()
        return None


def operand_dtype(mats, device_type: str) -> torch.dtype:
    """The one dtype of the matmul operands: autocast's under autocast, else their promoted dtype."""
    cdt = _autocast_dtype(device_type)
    if cdt is None:
        cdt = mats[0].dtype
        for m in mats[1:]:
            cdt = torch.promote_types(cdt, m.dtype)
    return cdt


def dual_head_kd_loss(features, head_weight, head_bias, aux_weight, aux_bias, teacher_logits, labels, *,
                      aux_features, ce_weight, kd_weight, logit_weight, kd_temperature, logit_temperature,
                      logit_loss, ignore_index, reduction, return_components, label_smoothing=0.0,
                      kd_divergence="forward_kl", jsd_beta=0.5, softcap=None, teacher_softcap=None,
                      z_loss_weight=0.0, vocab_parallel=None):
    """Run the Triton path; returns (loss, terms, correct, n_valid). Inputs must be validated.
    ``teacher_logits`` is the (N, C) tensor or a ``TeacherHead`` (its product runs inside). terms is
    (ce, kd, logit) and z_loss fourth when ``z_loss_weight`` is not 0 (per row: (3 or 4, N)).
    ``vocab_parallel``: a ``VocabShard`` (the sharded form; eager mode only, see ``_sharded``).

    Raises TypeError for float64 features/weights/biases (use backend="torch" for float64).
    """
    operands = {"features": features, "head_weight": head_weight, "head_bias": head_bias,
                "aux_weight": aux_weight, "aux_bias": aux_bias, "aux_features": aux_features}
    for name, v in operands.items():
        if v is not None and v.dtype == torch.float64:
            raise TypeError(f"backend='triton' supports float32/bfloat16/float16 {name}, got float64; "
                            "use backend='torch' (or 'auto') for float64")
    mats = [features, head_weight, aux_weight] + ([aux_features] if aux_features is not None else [])
    cdt = operand_dtype(mats, features.device.type)
    if cdt not in _OPERAND_DTYPES:
        raise TypeError(f"backend='triton' cannot run matmuls in {cdt}")
    x, w1, w2 = (_cast(m, cdt) for m in (features, head_weight, aux_weight))
    a = None if aux_features is None else _cast(aux_features, cdt)
    t = tf = tw = tb = None
    if isinstance(teacher_logits, TeacherHead):
        tdt = operand_dtype([teacher_logits.features, teacher_logits.weight], features.device.type)
        if tdt not in _OPERAND_DTYPES:
            tdt = cdt  # a float64 teacher head is computed in the student's operand dtype
        tf, tw = _cast(teacher_logits.features, tdt), _cast(teacher_logits.weight, tdt)
        tb = None if teacher_logits.bias is None else _contiguous(_cast(teacher_logits.bias, tdt))
    else:
        # the kernels take a teacher class's offset as an int32 product (class x column stride; stride 1,
        # the usual layout, is specialized away): a strided teacher whose offsets pass int32 is copied
        t = teacher_logits
        if t.dim() == 2 and t.stride(1) != 1 and t.shape[1] * t.stride(1) > TEACHER_OFFSET_MAX:
            t = _contiguous(t)
    # the kernels index labels and biases with unit stride: strided or expanded views are copied
    # (N + 2C elements); gradients reach the original views through autograd
    labels = _contiguous(labels)
    head_bias = None if head_bias is None else _contiguous(head_bias)
    aux_bias = None if aux_bias is None else _contiguous(aux_bias)
    grad_on = torch.is_grad_enabled()
    needs = [grad_on and v is not None and v.requires_grad for v in (x, w1, head_bias, a, w2, aux_bias)]
    scalars = (float(ce_weight), float(kd_weight), float(logit_weight), float(kd_temperature),
               float(logit_temperature), logit_loss == "binary_kl_norm", int(ignore_index), reduction == "mean",
               bool(return_components), bool(_TF32_OVERRIDE or _tf32_enabled()), float(label_smoothing),
               reduction == "none",
               () if (kd_divergence == "forward_kl" and softcap is None and teacher_softcap is None
                      and not z_loss_weight) else llm_extra(kd_divergence, jsd_beta, softcap, teacher_softcap,
                                                            z_loss_weight))
    # the plan is decided here, once: the forward, its fake (torch.compile) and the backward all read it
    compiling = torch.compiler.is_compiling()
    o = _opts_from(*scalars) if compiling else opts_cached(*scalars)
    wk = _work(x, w1, a, labels.shape[0], w1.shape[0], o, needs, teacher_logits if t is not None else (tf, tw, tb))
    if vocab_parallel is not None:
        if compiling:
            raise ValueError("vocab_parallel_group with backend='triton' runs in eager mode only, not under "
                             "torch.compile; use backend='torch' there")
        # every rank plans for the global C: the same plan, so the same row chunks and collectives
        o = dataclasses.replace(o, shard=vocab_parallel)
        plan = plan_for(wk._replace(c=vocab_parallel.total), x.device)
        out = direct_forward(wk, plan, o, needs, x, w1, head_bias, a, w2, aux_bias, t, labels, tf, tw, tb)
        loss, terms, correct, n_valid = out[:4]
        return loss, terms.detach(), correct, n_valid
    if compiling:
        out = _fwd_op(x, w1, head_bias, a, w2, aux_bias, t, labels, tf, tw, tb, *scalars[:12], list(scalars[12]),
                      needs, plan_to_list(make_plan(wk, x.device)))
    else:
        out = direct_forward(wk, plan_for(wk, x.device), o, needs, x, w1, head_bias, a, w2, aux_bias, t, labels,
                             tf, tw, tb)
    loss, terms, correct, n_valid = out[:4]
    return loss, terms.detach(), correct, n_valid


@contextlib.contextmanager
def _tf32(enabled: bool):
    global _TF32_OVERRIDE
    saved, _TF32_OVERRIDE = _TF32_OVERRIDE, (enabled or None)
    try:
        yield
    finally:
        _TF32_OVERRIDE = saved


_TF32_OVERRIDE = None

