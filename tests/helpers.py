"""Input factories and comparison helpers shared by the loss tests.

Tolerances: one table per dtype, judged against a float64 reference. For bf16/fp16 the bar is
"no worse than eager PyTorch's own error in that dtype" (the reference run in that dtype), times
LOWP_MARGIN, plus a small floor; float32 must meet TOL/GRAD_TOL, or that same eager bar where
eager float32 itself is worse (cancelling tiny losses).
"""
from __future__ import annotations

import torch

from dhkd_kernels import fused_dual_head_kd_loss, reference

# relative error of loss and gradients against float64 (norm-wise: |a - b| / |b|)
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
GRAD_TOL = {torch.float64: 1e-10, torch.float32: 1e-4}
LOWP_MARGIN = 1.5
LOWP_FLOOR = {torch.bfloat16: 2e-3, torch.float16: 3e-4}

GRAD_NAMES = ("features", "head_weight", "head_bias", "aux_weight", "aux_bias", "aux_features")


def make_inputs(n, d, c, *, da=None, dtype=torch.float32, device="cpu", bias=True, ignore_frac=0.0,
                logit_scale=1.0, teacher_scale=3.0, teacher_dtype=None, seed=0, ignore_index=-100):
    """Random inputs for the loss: dict with the 7 positional args plus aux_features (or None).

    ``logit_scale`` scales the weights so student logits have std ~ logit_scale; teacher logits have
    std ``teacher_scale``. Leaf tensors require grad; created in float64 then cast, so every dtype sees
    the same values up to rounding.
    """
    g = torch.Generator().manual_seed(seed)

    def r(*shape, std=1.0):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * std

    x = r(n, d)
    w1 = r(c, d, std=logit_scale / max(d, 1) ** 0.5)
    b1 = r(c, std=0.1) if bias else None
    if da is None:
        a = None
        w2 = r(c, d, std=logit_scale / max(d, 1) ** 0.5)
    else:
        a = r(n, da)
        w2 = r(c, da, std=logit_scale / max(da, 1) ** 0.5)
    b2 = r(c, std=0.1) if bias else None
    t = r(n, c, std=teacher_scale)
    y = torch.randint(0, c, (n,), generator=g)
    if ignore_frac:
        drop = torch.rand(n, generator=g) < ignore_frac
        y[drop] = ignore_index

    def leaf(v):
        return None if v is None else v.to(device=device, dtype=dtype).requires_grad_(True)

    return dict(features=leaf(x), head_weight=leaf(w1), head_bias=leaf(b1), aux_weight=leaf(w2),
                aux_bias=leaf(b2), teacher_logits=t.to(device=device, dtype=teacher_dtype or dtype),
                labels=y.to(device), aux_features=leaf(a))


def cast_inputs(inputs, dtype=None):
    """Fresh leaves of ``inputs``, cast to ``dtype`` when given (teacher too; labels and each leaf's
    requires_grad kept)."""
    out = {}
    for k, v in inputs.items():
        if v is None or k == "labels":
            out[k] = v
        elif k == "teacher_logits":
            out[k] = v.detach().to(dtype or v.dtype)
        else:
            out[k] = v.detach().to(dtype or v.dtype).clone().requires_grad_(v.requires_grad)
    return out


def loss_and_grads(inputs, *, backend, grad_scale=2.0, fn=None, **opts):
    """Loss (detached) and the gradients of ``grad_scale * loss`` for every input leaf (dict)."""
    inputs = cast_inputs(inputs)
    args = [inputs[k] for k in ("features", "head_weight", "head_bias", "aux_weight", "aux_bias",
                                "teacher_logits", "labels")]
    if fn is None:
        loss = fused_dual_head_kd_loss(*args, aux_features=inputs["aux_features"], backend=backend, **opts)
    else:
        loss = fn(*args, aux_features=inputs["aux_features"], **opts)
    if isinstance(loss, tuple):
        loss = loss[0]
    (loss * grad_scale).backward()
    grads = {k: inputs[k].grad for k in GRAD_NAMES if inputs.get(k) is not None and inputs[k].requires_grad}
    return loss.detach(), grads


def reference_in(inputs, dtype, **opts):
    """Loss and grads of the plain reference run in ``dtype`` (float64 = oracle; bf16 = eager bf16)."""
    cast = cast_inputs(inputs, dtype)
    return loss_and_grads(cast, backend="reference", **opts)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Norm-wise relative error of ``a`` against ``b`` (both upcast to float64)."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    assert torch.isfinite(a).all(), "non-finite values in result"
    denom = b.norm().item()
    diff = (a - b).norm().item()
    return diff / denom if denom > 0 else diff


def assert_matches_reference(inputs, *, backend, **opts):
    """Check ``backend`` in the inputs' dtype against the float64 reference, loss and every gradient."""
    dtype = inputs["features"].dtype
    loss, grads = loss_and_grads(inputs, backend=backend, **opts)
    ref_loss, ref_grads = reference_in(inputs, torch.float64, **opts)
    assert set(grads) == set(ref_grads)
    if dtype == torch.float64:
        limits = {"loss": TOL[dtype], **{k: GRAD_TOL[dtype] for k in grads}}
        atol = 1e-12
    elif dtype == torch.float32:
        # 1e-5 / 1e-4 relative, or no worse than eager float32's own error where that is larger
        # (tiny losses that cancel in any float32 evaluation, e.g. KD of nearly equal distributions)
        eager_loss, eager_grads = reference_in(inputs, dtype, **opts)
        limits = {"loss": max(TOL[dtype], LOWP_MARGIN * rel_err(eager_loss, ref_loss))}
        for k in grads:
            limits[k] = max(GRAD_TOL[dtype], LOWP_MARGIN * rel_err(eager_grads[k], ref_grads[k]))
        atol = 1e-6
    else:
        eager_loss, eager_grads = reference_in(inputs, dtype, **opts)
        limits = {"loss": LOWP_MARGIN * rel_err(eager_loss, ref_loss) + LOWP_FLOOR[dtype]}
        for k in grads:
            limits[k] = LOWP_MARGIN * rel_err(eager_grads[k], ref_grads[k]) + LOWP_FLOOR[dtype]
        atol = 0.0
    errors = {"loss": rel_err(loss, ref_loss), **{k: rel_err(grads[k], ref_grads[k]) for k in grads}}
    for k, err in errors.items():
        ref_norm = (ref_loss if k == "loss" else ref_grads[k]).double().norm().item()
        assert err <= limits[k] or err * ref_norm <= atol, (
            f"{backend}/{dtype}: {k} relative error {err:.3e} > {limits[k]:.3e}")
    for k, g in grads.items():
        assert g.dtype == inputs[k].dtype, f"grad of {k} has dtype {g.dtype}, expected {inputs[k].dtype}"
    return errors
