"""Argument checks shared by every backend: clear errors naming the argument, raised before any work."""
from __future__ import annotations

import math
import numbers

import torch

from .reference import KD_DIVERGENCES, LOGIT_LOSSES, REDUCTIONS, valid_rows

BACKENDS = ("auto", "triton", "torch", "reference")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _tensor(name: str, x, ndim: int, float_: bool = True) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {x.layout}; "
                        f"call .to_dense() first")
    if float_ and x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a float16/bfloat16/float32/float64 tensor, got {x.dtype}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), got shape {tuple(x.shape)}")


def _shape(name: str, x: torch.Tensor, expected: tuple, meaning: str) -> None:
    if x.shape != expected:
        raise ValueError(f"{name} must have shape {meaning} = {expected}, got {tuple(x.shape)}")


def _number(name: str, value, *, positive: bool) -> float:
    if not isinstance(value, float) and (isinstance(value, bool) or not isinstance(value, numbers.Real)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        need = "a finite positive number" if positive else "a finite number >= 0"
        raise ValueError(f"{name} must be {need}, got {value}")
    return value


def _choice(name: str, value, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def validate(features, head_weight, head_bias, aux_weight, aux_bias, teacher_logits, labels, *,
             aux_features, ce_weight, kd_weight, logit_weight, kd_temperature, logit_temperature,
             logit_loss, ignore_index, reduction, backend, teacher_features=None, teacher_weight=None,
             teacher_bias=None, label_smoothing=0.0, return_components=False, kd_divergence="forward_kl",
             jsd_beta=0.5, softcap=None, teacher_softcap=None, z_loss_weight=0.0) -> None:
    """Check every argument of ``fused_dual_head_kd_loss``; raise ValueError/TypeError naming the culprit."""
    _tensor("features", features, 2)
    n, d = features.shape
    _tensor("head_weight", head_weight, 2)
    c = head_weight.shape[0]
    _shape("head_weight", head_weight, (c, d), "(C, D)")
    if c < 1:
        raise ValueError("head_weight must have at least one class row (C >= 1)")
    if aux_features is not None:
        _tensor("aux_features", aux_features, 2)
        if aux_features.shape[0] != n:
            raise ValueError(
                f"aux_features must have shape (N, D_aux) with N = {n} rows like features, "
                f"got {tuple(aux_features.shape)}")
        da = aux_features.shape[1]
    else:
        da = d
    _tensor("aux_weight", aux_weight, 2)
    _shape("aux_weight", aux_weight, (c, da), "(C, D_aux)" if aux_features is not None else "(C, D)")
    for name, bias in (("head_bias", head_bias), ("aux_bias", aux_bias)):
        if bias is not None:
            _tensor(name, bias, 1)
            _shape(name, bias, (c,), "(C,)")
    head = (teacher_features, teacher_weight, teacher_bias)
    if teacher_logits is not None and any(v is not None for v in head):
        raise ValueError("pass either teacher_logits or teacher_features/teacher_weight/teacher_bias, not both")
    if teacher_logits is None:
        if teacher_features is None or teacher_weight is None:
            raise ValueError("the teacher is missing: pass teacher_logits (N, C), or teacher_features (N, D_t) "
                             "with teacher_weight (C, D_t) (and optionally teacher_bias (C,))")
        _tensor("teacher_features", teacher_features, 2)
        if teacher_features.shape[0] != n:
            raise ValueError(f"teacher_features must have shape (N, D_t) with N = {n} rows like features, "
                             f"got {tuple(teacher_features.shape)}")
        _tensor("teacher_weight", teacher_weight, 2)
        _shape("teacher_weight", teacher_weight, (c, teacher_features.shape[1]), "(C, D_t)")
        if teacher_bias is not None:
            _tensor("teacher_bias", teacher_bias, 1)
            _shape("teacher_bias", teacher_bias, (c,), "(C,)")
    else:
        _tensor("teacher_logits", teacher_logits, 2)
        _shape("teacher_logits", teacher_logits, (n, c), "(N, C)")
    _tensor("labels", labels, labels.dim() if isinstance(labels, torch.Tensor) else 1, float_=False)
    if labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"labels must be an int64 or int32 tensor, got {labels.dtype}")
    _shape("labels", labels, (n,), "(N,)")

    dev = features.device
    others = (head_weight, head_bias, aux_weight, aux_bias, teacher_logits, labels, aux_features,
              teacher_features, teacher_weight, teacher_bias)
    if any(x is not None and x.device != dev for x in others):
        names = ("head_weight", "head_bias", "aux_weight", "aux_bias", "teacher_logits", "labels",
                 "aux_features", "teacher_features", "teacher_weight", "teacher_bias")
        devices = {"features": dev, **{k: x.device for k, x in zip(names, others) if x is not None}}
        raise ValueError(f"all tensors must be on one device, got {devices}")

    for name, w in (("ce_weight", ce_weight), ("kd_weight", kd_weight), ("logit_weight", logit_weight)):
        _number(name, w, positive=False)
    for name, temp in (("kd_temperature", kd_temperature), ("logit_temperature", logit_temperature)):
        _number(name, temp, positive=True)
    eps = _number("label_smoothing", label_smoothing, positive=False)
    if eps > 1:
        raise ValueError(f"label_smoothing must lie in [0, 1], got {label_smoothing}")
    _choice("logit_loss", logit_loss, LOGIT_LOSSES)
    _choice("kd_divergence", kd_divergence, KD_DIVERGENCES)
    beta = _number("jsd_beta", jsd_beta, positive=False)
    if beta > 1:
        raise ValueError(f"jsd_beta must lie in [0, 1], got {jsd_beta}")
    for name, cap in (("softcap", softcap), ("teacher_softcap", teacher_softcap)):
        if cap is not None:
            _number(name, cap, positive=True)
    _number("z_loss_weight", z_loss_weight, positive=False)
    _choice("reduction", reduction, REDUCTIONS)
    _choice("backend", backend, BACKENDS)
    if not isinstance(return_components, bool):
        raise TypeError(f"return_components must be a bool, got {type(return_components).__name__}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if not -2**63 <= int(ignore_index) < 2**63:
        raise ValueError(f"ignore_index must fit in int64 (no label dtype holds {ignore_index})")


def check_label_values(labels: torch.Tensor, n_classes: int, ignore_index: int) -> None:
    """ValueError naming the first label outside [0, C) that is not ignore_index. Reads the labels on
    the host: called for CPU tensors (free) and, opt-in, for CUDA ones (a synchronisation)."""
    if labels.numel() == 0:
        return
    bad = valid_rows(labels, int(ignore_index)) & ((labels < 0) | (labels >= n_classes))
    if bool(bad.any()):
        first = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"labels must lie in [0, C) = [0, {n_classes}) or equal ignore_index={ignore_index}; "
            f"labels[{first}] = {int(labels[first])}")


# ---------------------------------------------------------------- environment variables
# One rule: a variable gets the checks of its setter, and an error names the variable.

def env_flag(name: str, default: bool = False) -> bool:
    """``name`` as a switch: unset or empty -> ``default``; "0"/"1" (also false/true, no/yes, off/on)."""
    import os
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    value = {"0": False, "1": True, "false": False, "true": True, "no": False, "yes": True,
             "off": False, "on": True}.get(raw.lower())
    if value is None:
        raise ValueError(f"environment variable {name}={_short(raw)} must be 0 or 1")
    return value


def env_positive_number(name: str, default: float) -> float:
    """``name`` as a finite number > 0 (unset or empty -> ``default``)."""
    import os
    raw = os.environ.get(name, "").strip()
    if not raw:
        return float(default)
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={_short(raw)} must be a number") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"environment variable {name}={_short(raw)} must be a finite number > 0")
    return value


def env_choice(name: str, choices: tuple, default: str) -> str:
    """``name`` as one of ``choices`` (unset or empty -> ``default``)."""
    import os
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    if raw not in choices:
        raise ValueError(f"environment variable {name}={_short(raw)} must be one of {', '.join(choices)}")
    return raw


def env_memory_budget_bytes(name: str = "DHKD_MEMORY_BUDGET_MB", default_mb: float = 512) -> int:
    """The triton op's memory budget from ``name`` (MiB, a number > 0) in bytes, as ``set_memory_budget``
    takes it (a positive int)."""
    mb = env_positive_number(name, default_mb)
    nbytes = int(mb * 2**20)
    if nbytes < 1:
        raise ValueError(f"environment variable {name}={mb:g} is below one byte")
    return nbytes


def _short(text: str, limit: int = 40) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")
