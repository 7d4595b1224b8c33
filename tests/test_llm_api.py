"""The LLM-scale API on every backend (reference, torch, triton in the interpreter under each plan):
the teacher as features + head (its logits never held whole), reduction="none" with per-row
grad_output, and label smoothing, against float64 and F.cross_entropy."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dhkd_kernels import cost, fused_dual_head_kd_loss
from dhkd_kernels.ops import _launch, _plan
from dhkd_kernels.ops import dual_head_kd as dhk
from dhkd_kernels.simulate import simulate
from tests.helpers import cast_inputs, make_inputs, rel_err

ARGS = ("features", "head_weight", "head_bias", "aux_weight", "aux_bias", "teacher_logits", "labels")
LEAVES = ("features", "head_weight", "head_bias", "aux_weight", "aux_bias", "aux_features")
CASES = [("reference", None), ("torch", None), ("triton", "triton"), ("triton", "cublas"), ("triton", "chunked")]


@pytest.fixture(params=CASES, ids=[f"{b}-{p}" if p else b for b, p in CASES])
def backend(request, monkeypatch):
    name, plan = request.param
    monkeypatch.setattr(_launch, "_POISON", True)
    if plan == "chunked":
        monkeypatch.setattr(_plan, "MEMORY_BUDGET_BYTES", 3000)
        monkeypatch.setattr(_plan, "_ENGINE", "cublas")
    elif plan:
        monkeypatch.setattr(_plan, "_ENGINE", plan)
    return name


def teacher_head(n, c, dt=7, seed=5, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, dt, generator=g, dtype=torch.float64).to(dtype),
            (torch.randn(c, dt, generator=g, dtype=torch.float64) / 2).to(dtype),
            torch.randn(c, generator=g, dtype=torch.float64).to(dtype))


def run(inputs, *, backend, head=None, grad=None, dtype=None, **opts):
    """Loss and gradients of sum(grad * loss) (or of the scalar loss), in ``dtype`` (default: the inputs')."""
    inp = cast_inputs(inputs, dtype)
    args = [inp[k] for k in ARGS]
    kw = {}
    if head is not None:
        args[5] = None
        dt = dtype or inputs["features"].dtype
        kw = dict(teacher_features=head[0].to(dt), teacher_weight=head[1].to(dt), teacher_bias=head[2].to(dt))
    loss = fused_dual_head_kd_loss(*args, aux_features=inp["aux_features"], backend=backend, **kw, **opts)
    out = loss[0] if isinstance(loss, tuple) else loss
    if grad is not None:
        out = (out * grad.to(out.dtype)).sum()
    (out.sum() if out.dim() else out).backward()  # .sum(): a stride-0 grad_output for per-row losses
    return loss, {k: inp[k].grad for k in LEAVES if inp.get(k) is not None}


def assert_close(got, want, limit=1e-4):
    (loss, grads), (ref_loss, ref_grads) = got, want
    loss = loss[0] if isinstance(loss, tuple) else loss
    ref_loss = ref_loss[0] if isinstance(ref_loss, tuple) else ref_loss
    assert rel_err(loss, ref_loss) < limit
    for k in ref_grads:
        assert rel_err(grads[k], ref_grads[k]) < limit, k


# ---------------------------------------------------------------- teacher features + teacher head

@pytest.mark.parametrize("kd_weight", [0.0, 0.5])
def test_teacher_head_equals_its_logits(backend, kd_weight):
    """The loss with teacher_features/teacher_weight/teacher_bias equals the loss with their product as
    teacher_logits (float64 reference of the same), with ignored rows, Da != D and both heads."""
    inputs = make_inputs(40, 6, 45, da=5, ignore_frac=0.2, seed=61)
    head = teacher_head(40, 45)
    with torch.no_grad():
        logits = F.linear(head[0].double(), head[1].double(), head[2].double())
    by_logits = dict(inputs, teacher_logits=logits)
    want = run(by_logits, backend="reference", dtype=torch.float64, kd_weight=kd_weight)
    got = run(inputs, backend=backend, head=head, kd_weight=kd_weight)
    assert_close(got, want)


def test_teacher_head_plan_runs_the_teacher_product_once():
    """Cost model: the teacher product adds exactly 2 N C D_t FLOPs to the student's floor, at the LLM
    shapes with D_t = 4096 and 8192, with the DHKD recipe (KD off) and with KD on."""
    for name, n, d, c in cost.SHAPES[-2:]:
        for dt in (4096, 8192):
            for kd in (0.0, 1.0):
                rec, plan = simulate(n, d, c, teacher_width=dt, kd_weight=kd)
                assert rec.matmul_flops == cost.floor_flops(n, c, d) + 2 * n * c * dt, (name, dt, kd, plan)
                assert plan.extra_bytes <= 512 * 2**20 and not rec.syncs
                if kd:
                    assert plan.mode == "rows"  # both heads in row chunks: the teacher block once per chunk


def test_teacher_arguments_are_checked():
    inputs = make_inputs(5, 4, 6, seed=62)
    head = teacher_head(5, 6)
    args = [inputs[k] for k in ARGS]
    with pytest.raises(ValueError, match="not both"):
        fused_dual_head_kd_loss(*args, teacher_features=head[0], teacher_weight=head[1])
    args[5] = None
    with pytest.raises(ValueError, match="teacher is missing"):
        fused_dual_head_kd_loss(*args)
    with pytest.raises(ValueError, match="teacher is missing"):
        fused_dual_head_kd_loss(*args, teacher_features=head[0])
    with pytest.raises(ValueError, match=r"teacher_weight must have shape \(C, D_t\)"):
        fused_dual_head_kd_loss(*args, teacher_features=head[0], teacher_weight=head[1][:, :3])
    with pytest.raises(ValueError, match="teacher_features must have shape"):
        fused_dual_head_kd_loss(*args, teacher_features=head[0][:4], teacher_weight=head[1])
    with pytest.raises(ValueError, match="teacher_bias"):
        fused_dual_head_kd_loss(*args, teacher_features=head[0], teacher_weight=head[1], teacher_bias=head[2][:2])


def test_teacher_head_gets_no_gradient(backend):
    inputs = make_inputs(9, 4, 7, seed=63)
    tf, tw, tb = (v.requires_grad_(True) for v in teacher_head(9, 7))
    args = [inputs[k] for k in ARGS]
    args[5] = None
    loss = fused_dual_head_kd_loss(*args, teacher_features=tf, teacher_weight=tw, teacher_bias=tb,
                                   backend=backend, kd_weight=0.5)
    loss.backward()
    assert tf.grad is None and tw.grad is None and tb.grad is None


# ---------------------------------------------------------------- reduction="none"

@pytest.mark.parametrize("teacher", ["logits", "head"])
def test_reduction_none_with_non_uniform_grad_output(backend, teacher):
    """Per-row losses and the gradients of sum_i g_i loss_i for a random, non-uniform g against float64,
    with ignored rows (0 loss, no influence)."""
    inputs = make_inputs(40, 6, 45, ignore_frac=0.25, seed=64)
    head = teacher_head(40, 45) if teacher == "head" else None
    g = torch.rand(40, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 3 - 1
    opts = dict(reduction="none", kd_weight=0.5)
    got = run(inputs, backend=backend, head=head, grad=g, **opts)
    want = run(inputs, backend="reference", head=head, grad=g, dtype=torch.float64, **opts)
    assert got[0].shape == (40,) and got[0].dtype == torch.float32
    ignored = inputs["labels"] == -100
    assert torch.equal(got[0][ignored], torch.zeros(int(ignored.sum())))
    assert_close(got, want)


def test_reduction_none_summed_equals_reduction_sum(backend):
    """`loss.sum()` of the per-row losses (a stride-0 grad_output, scaled without recomputation) gives
    the loss and gradients of reduction="sum"; `.mean()` those of sum / N."""
    inputs = make_inputs(40, 6, 45, ignore_frac=0.2, seed=65)
    summed = run(inputs, backend=backend, reduction="sum", kd_weight=0.5)
    rows = run(inputs, backend=backend, reduction="none", kd_weight=0.5)
    assert rel_err(rows[0].sum(), summed[0]) < 1e-5
    for k in summed[1]:
        assert rel_err(rows[1][k], summed[1][k]) < 1e-5, k
    inp = cast_inputs(inputs)
    per = fused_dual_head_kd_loss(*[inp[k] for k in ARGS], backend=backend, reduction="none", kd_weight=0.5)
    per.mean().backward()
    assert rel_err(inp["head_weight"].grad, summed[1]["head_weight"] / 40) < 1e-5


def test_reduction_none_components_per_row(backend):
    inputs = make_inputs(12, 5, 9, ignore_frac=0.25, seed=66)
    loss, comps = fused_dual_head_kd_loss(*[inputs[k] for k in ARGS], backend=backend, reduction="none",
                                          kd_weight=0.5, return_components=True)
    _, ref = fused_dual_head_kd_loss(*[cast_inputs(inputs, torch.float64)[k] for k in ARGS], backend="reference",
                                     reduction="none", kd_weight=0.5, return_components=True)
    for k in ("ce", "kd", "logit"):
        assert comps[k].shape == (12,) and rel_err(comps[k], ref[k]) < 1e-5, k
    assert comps["correct"].shape == (12,) and torch.equal(comps["correct"].bool(), ref["correct"])
    assert int(comps["n_valid"]) == int(ref["n_valid"])
    weighted = comps["ce"] + 0.5 * comps["kd"] + comps["logit"]
    assert rel_err(loss.detach(), weighted) < 1e-5


# ---------------------------------------------------------------- label smoothing

@pytest.mark.parametrize("eps", [0.1, 0.6])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_label_smoothing_is_f_cross_entropy(backend, eps, reduction):
    """CE alone with label_smoothing = F.cross_entropy(z, y, label_smoothing=eps, ignore_index=-100),
    loss and gradients, with ignored rows."""
    inputs = make_inputs(30, 6, 37, ignore_frac=0.3, seed=67)
    opts = dict(ce_weight=1.0, kd_weight=0.0, logit_weight=0.0, label_smoothing=eps, reduction=reduction)
    got_loss, got = run(inputs, backend=backend, **opts)
    ref = cast_inputs(inputs, torch.float64)
    z = F.linear(ref["features"], ref["head_weight"], ref["head_bias"])
    want_loss = F.cross_entropy(z, ref["labels"], ignore_index=-100, label_smoothing=eps, reduction=reduction)
    want_loss.sum().backward()
    got_loss = got_loss[0] if isinstance(got_loss, tuple) else got_loss
    assert rel_err(got_loss, want_loss) < 1e-5
    for k in ("features", "head_weight", "head_bias"):
        assert rel_err(got[k], ref[k].grad) < 1e-4, k


def test_label_smoothing_is_checked():
    inputs = make_inputs(4, 3, 5, seed=68)
    for bad, err in ((1.5, ValueError), (-0.1, ValueError), ("x", TypeError)):
        with pytest.raises(err, match="label_smoothing"):
            fused_dual_head_kd_loss(*[inputs[k] for k in ARGS], label_smoothing=bad)
