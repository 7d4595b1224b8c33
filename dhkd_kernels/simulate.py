"""Cost simulation: the real host code of the Triton backend on ``meta`` tensors, where nothing
computes and every launch is recorded (``dhkd_kernels.cost``) or compiled (``dhkd_kernels.compile_report``)."""
from __future__ import annotations

from typing import Optional

import torch

from . import cost
from .functional import fused_dual_head_kd_loss
from .ops import dual_head_kd as dhk
from .ops._plan import _opts_from, _work, llm_extra, make_plan


def simulate(n: int, d: int, c: int, *, dtype: str = "bf16", da: Optional[int] = None, bias: bool = True,
             backward: bool = True, requires_grad=None, device: str = "meta", teacher_width: Optional[int] = None,
             **opts):
    """Run the real host code of one ``fused_dual_head_kd_loss(..., backend="triton")`` forward
    (+ backward) on ``meta`` tensors: nothing is computed, every launch is recorded. Returns
    (cost.Record, Plan). ``requires_grad``: the inputs that ask for gradients (default all of
    them when ``backward``); ``teacher_width`` D_t: the teacher as features + head instead of logits.
    Loss options default to all three terms on (the benchmarks' CE + KD + BinaryKL-Norm); ``dtype``
    "tf32" is fp32 with TF32 matmuls. With reduction="none" the backward is that of ``.sum()``."""
    dt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "tf32": torch.float32}[dtype]
    dev = torch.device(device)
    names = ("features", "head_weight", "head_bias", "aux_features", "aux_weight", "aux_bias")
    if requires_grad is None:
        requires_grad = names if backward else ()
    shapes = dict(features=(n, d), head_weight=(c, d), head_bias=(c,), aux_features=(n, da or d),
                  aux_weight=(c, d if da is None else da), aux_bias=(c,))
    leaves = {k: torch.empty(*shapes[k], dtype=dt, device=dev).requires_grad_(k in requires_grad) for k in names}
    if da is None:
        leaves["aux_features"] = None
    if not bias:
        leaves["head_bias"] = leaves["aux_bias"] = None
    head = {}
    t = torch.empty(n, c, dtype=dt, device=dev)
    if teacher_width:
        t = None
        head = dict(teacher_features=torch.empty(n, teacher_width, dtype=dt, device=dev),
                    teacher_weight=torch.empty(c, teacher_width, dtype=dt, device=dev),
                    teacher_bias=torch.empty(c, dtype=dt, device=dev) if bias else None)
    y = torch.empty(n, dtype=torch.int64, device=dev)
    kw = dict(ce_weight=1.0, kd_weight=1.0, logit_weight=1.0, kd_temperature=4.0, logit_temperature=2.0,
              logit_loss="binary_kl_norm", ignore_index=-100, reduction="mean", return_components=False)
    kw.update(opts)
    o = _opts_from(kw["ce_weight"], kw["kd_weight"], kw["logit_weight"], kw["kd_temperature"],
                   kw["logit_temperature"], kw["logit_loss"] == "binary_kl_norm", kw["ignore_index"],
                   kw["reduction"] == "mean", kw["return_components"], dtype == "tf32",
                   kw.get("label_smoothing", 0.0), kw["reduction"] == "none",
                   llm_extra(kw.get("kd_divergence", "forward_kl"), kw.get("jsd_beta", 0.5), kw.get("softcap"),
                             kw.get("teacher_softcap"), kw.get("z_loss_weight", 0.0)))
    x, a = leaves["features"], leaves["aux_features"]
    needs = [backward and v is not None and v.requires_grad for v in
             (x, leaves["head_weight"], leaves["head_bias"], a, leaves["aux_weight"], leaves["aux_bias"])]
    teacher = t if t is not None else (head["teacher_features"], head["teacher_weight"], head["teacher_bias"])
    plan = make_plan(_work(x, leaves["head_weight"], a, n, c, o, needs, teacher), dev)
    with cost.record() as rec, torch.set_grad_enabled(backward), dhk._direct(), dhk._tf32(dtype == "tf32"):
        loss = fused_dual_head_kd_loss(x, leaves["head_weight"], leaves["head_bias"], leaves["aux_weight"],
                                       leaves["aux_bias"], t, y, aux_features=a, backend="triton", **head, **kw)
        if isinstance(loss, tuple):
            loss = loss[0]
        if backward and loss.requires_grad:
            (loss.sum() if loss.dim() else loss).backward()
    return rec, plan
