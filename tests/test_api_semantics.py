"""Semantics every backend shares (reference, torch, triton in the interpreter): ignored rows never
influence a result, masked classes, ignore_index compared as a value, unused terms cannot reach the
loss, one dtype rule for mixed operands, clear errors for double backward and torch.func, and no
host synchronisation for CUDA-style label errors (NaN instead)."""
from __future__ import annotations

import math

import pytest
import torch

from dhkd_kernels import fused_dual_head_kd_loss
from tests.helpers import GRAD_NAMES, cast_inputs, loss_and_grads, make_inputs, rel_err

BACKENDS = ("reference", "torch", "triton")
ARGS = ("features", "head_weight", "head_bias", "aux_weight", "aux_bias", "teacher_logits", "labels")


def _call(inputs, **opts):
    return fused_dual_head_kd_loss(*[inputs[k] for k in ARGS], aux_features=inputs["aux_features"], **opts)


def _grads(inputs):
    return {k: inputs[k].grad for k in GRAD_NAMES if inputs.get(k) is not None and inputs[k].requires_grad}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("garbage", ["nan", "inf", "huge"])
def test_ignored_rows_with_garbage_do_not_influence_anything(backend, garbage):
    """NaN/inf/1e30 in the features, aux features and teacher logits of ignored rows: the loss and
    every gradient equal those of the batch without those rows (mean over the valid rows)."""
    val = {"nan": float("nan"), "inf": float("inf"), "huge": 1e30}[garbage]
    base = make_inputs(12, 5, 9, da=4, ignore_frac=0.0, seed=41)
    ignored = torch.tensor([1, 4, 5, 10])
    keep = torch.tensor([i for i in range(12) if i not in ignored.tolist()])
    dirty = cast_inputs(base)
    with torch.no_grad():
        for k in ("features", "aux_features", "teacher_logits"):
            dirty[k][ignored] = val
    dirty["labels"] = base["labels"].clone()
    dirty["labels"][ignored] = -100
    clean = cast_inputs(base)
    for k in ("features", "aux_features", "teacher_logits", "labels"):
        clean[k] = clean[k][keep].detach().requires_grad_(k in ("features", "aux_features"))
    opts = dict(kd_weight=0.5, backend=backend)
    loss_d, grads_d = loss_and_grads(dirty, grad_scale=1.0, **opts)
    loss_c, grads_c = loss_and_grads(clean, grad_scale=1.0, **opts)
    assert torch.isfinite(loss_d) and rel_err(loss_d, loss_c) < 1e-5
    for k in ("head_weight", "head_bias", "aux_weight", "aux_bias"):
        assert rel_err(grads_d[k], grads_c[k]) < 1e-5, k
    for k in ("features", "aux_features"):
        assert torch.equal(grads_d[k][ignored], torch.zeros_like(grads_d[k][ignored])), k
        assert rel_err(grads_d[k][keep], grads_c[k]) < 1e-5, k


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_classes_give_finite_kd_and_no_logit_loss(backend):
    """A teacher logit of -inf (a class masked out of the vocabulary): KD is finite with 0 log 0 = 0,
    equal to F.kl_div(log_softmax(z/T), softmax(t/T)) summed; the masked classes contribute nothing to
    either logit-level loss; a masked class's student logit gets no logit-level gradient."""
    inputs = make_inputs(6, 5, 11, seed=42)
    t = inputs["teacher_logits"].clone()
    t[:, [2, 7]] = float("-inf")
    t[3, 0] = float("-inf")
    inputs["teacher_logits"] = t
    T = 2.0
    with torch.no_grad():
        x, w1, b1 = (inputs[k].double() for k in ("features", "head_weight", "head_bias"))
        z1 = x @ w1.t() + b1
        kl = torch.nn.functional.kl_div(torch.log_softmax(z1 / T, -1), torch.softmax(t.double() / T, -1),
                                        reduction="sum") * T * T / 6
    _, comps = _call(inputs, backend=backend, kd_temperature=T, kd_weight=1.0, return_components=True)
    assert torch.isfinite(comps["kd"]) and rel_err(comps["kd"], kl) < 1e-5
    for logit_loss in ("binary_kl_norm", "binary_kl"):
        masked, grads = loss_and_grads(inputs, backend=backend, ce_weight=0.0, logit_loss=logit_loss,
                                       grad_scale=1.0)
        assert torch.isfinite(masked)
        # the same loss as the unmasked classes alone
        live = [c for c in range(11) if c not in (2, 7)]
        sub = cast_inputs(inputs)
        for k in ("head_weight", "head_bias", "aux_weight", "aux_bias"):
            sub[k] = sub[k][live].detach().requires_grad_(True)
        sub["teacher_logits"] = t[:, live].clone()
        sub["labels"] = torch.zeros(6, dtype=torch.long)
        alone, sub_grads = loss_and_grads(sub, backend="reference", ce_weight=0.0, logit_loss=logit_loss,
                                          grad_scale=1.0)
        assert rel_err(masked, alone) < 1e-5
        assert torch.equal(grads["aux_weight"][[2, 7]], torch.zeros_like(grads["aux_weight"][[2, 7]]))
        assert rel_err(grads["aux_weight"][live], sub_grads["aux_weight"]) < 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
def test_ignore_index_is_compared_as_a_value(backend):
    """int32 labels with ignore_index = 2**32 + 3: no int32 label equals it (no wrap-around to 3)."""
    inputs = make_inputs(8, 4, 6, seed=43)
    y = torch.tensor([3, 1, 3, 0, 5, 3, 2, 1], dtype=torch.int32)
    inputs["labels"] = y
    _, comps = _call(inputs, backend=backend, ignore_index=2**32 + 3, return_components=True)
    assert int(comps["n_valid"]) == 8
    ref, _ = loss_and_grads(dict(inputs, labels=y.long()), backend="reference", ignore_index=-100)
    loss, _ = loss_and_grads(inputs, backend=backend, ignore_index=2**32 + 3)
    assert rel_err(loss, ref) < 1e-5
    with pytest.raises(ValueError, match="ignore_index"):
        _call(inputs, backend=backend, ignore_index=2**70)


@pytest.mark.parametrize("backend", BACKENDS)
def test_components_do_not_change_the_loss(backend):
    """kd_weight = logit_weight = 0 with a NaN teacher: the loss is the finite CE with or without
    return_components; the unused terms are reported (NaN here) without reaching the loss."""
    inputs = make_inputs(7, 4, 9, seed=44)
    inputs["teacher_logits"] = torch.full_like(inputs["teacher_logits"], float("nan"))
    opts = dict(kd_weight=0.0, logit_weight=0.0, backend=backend)
    plain, g_plain = loss_and_grads(inputs, **opts)
    loss, comps = _call(cast_inputs(inputs), return_components=True, **opts)
    assert torch.isfinite(plain) and torch.isfinite(loss)
    assert rel_err(loss, plain) < 1e-6 and rel_err(loss, comps["ce"]) < 1e-6
    assert math.isnan(float(comps["kd"])) and math.isnan(float(comps["logit"]))
    for k, g in g_plain.items():
        assert torch.isfinite(g).all(), k


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_operand_dtypes_follow_one_rule(backend):
    """fp32 features with bf16 head weights: every backend promotes the matmul operands to fp32 (the
    reference used to crash with 'expected m1 and m2 to have the same dtype'); grads keep each dtype."""
    inputs = make_inputs(6, 5, 7, seed=45)
    for k in ("head_weight", "aux_weight"):
        inputs[k] = inputs[k].detach().bfloat16().requires_grad_(True)
    loss, grads = loss_and_grads(inputs, backend=backend, kd_weight=0.5)
    assert loss.dtype == torch.float32
    assert grads["head_weight"].dtype == torch.bfloat16 and grads["features"].dtype == torch.float32
    promoted, _ = loss_and_grads(cast_inputs(inputs, torch.float64), backend="reference", kd_weight=0.5)
    assert rel_err(loss, promoted) < 1e-5


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_double_backward_raises_a_clear_error(backend):
    inputs = make_inputs(5, 4, 6, seed=46)
    loss = _call(inputs, backend=backend)
    with pytest.raises(RuntimeError, match="backend='reference'"):
        torch.autograd.grad(loss, inputs["features"], create_graph=True)


def test_double_backward_works_on_the_reference():
    inputs = make_inputs(5, 4, 6, seed=46, dtype=torch.float64)
    loss = _call(inputs, backend="reference")
    (g,) = torch.autograd.grad(loss, inputs["features"], create_graph=True)
    assert g.requires_grad
    (gg,) = torch.autograd.grad(g.square().sum(), inputs["head_weight"])
    assert torch.isfinite(gg).all() and gg.abs().sum() > 0


@pytest.mark.parametrize("backend", ["torch", "triton", "auto"])
def test_torch_func_transforms_raise_a_clear_error(backend):
    inputs = make_inputs(5, 4, 6, seed=47)
    rest = [inputs[k].detach() for k in ARGS[1:]]

    def f(x):
        return fused_dual_head_kd_loss(x, *rest, backend=backend)

    with pytest.raises(RuntimeError, match="torch.func"):
        torch.func.grad(f)(inputs["features"].detach())
    with pytest.raises(RuntimeError, match="backend='reference'"):
        torch.func.vmap(f)(inputs["features"].detach()[None].expand(2, -1, -1))
    g = torch.func.grad(lambda x: fused_dual_head_kd_loss(x, *rest, backend="reference"))(
        inputs["features"].detach())
    assert g.shape == inputs["features"].shape


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_out_of_range_labels_without_host_check_give_nan(backend):
    """What CUDA callers get (no host sync): the kernels themselves turn a valid row with a label
    outside [0, C) into a NaN loss and NaN gradients, never a silently wrong number."""
    from dhkd_kernels.ops import chunked
    inputs = make_inputs(6, 4, 5, seed=48)
    y = inputs["labels"].clone()
    y[2] = 7
    opts = dict(aux_features=None, ce_weight=1.0, kd_weight=0.5, logit_weight=1.0, kd_temperature=4.0,
                logit_temperature=2.0, logit_loss="binary_kl_norm", ignore_index=-100, reduction="mean",
                return_components=False)
    if backend == "torch":
        run = chunked.chunked_dual_head_kd_loss
    else:
        from dhkd_kernels.ops import dual_head_kd
        run = dual_head_kd.dual_head_kd_loss
    args = [inputs[k] for k in ARGS[:6]] + [y]
    loss = run(*args, **opts)[0]
    loss.backward()
    assert math.isnan(float(loss))
    assert torch.isnan(inputs["head_weight"].grad).any()


def test_cpu_labels_out_of_range_raise_before_work():
    inputs = make_inputs(4, 3, 5, seed=49)
    inputs["labels"] = torch.tensor([0, 1, 5, 2])
    for backend in BACKENDS:
        with pytest.raises(ValueError, match=r"labels\[2\] = 5"):
            _call(inputs, backend=backend)


def test_second_backward_through_one_call():
    """backend='torch' and the resident Triton plans keep what they need: a call can be
    back-propagated twice (retain_graph=True). The chunked Triton plan scales its stored gradients in
    place (no second set of LLM-sized gradients) and says so instead of returning wrong ones."""
    from dhkd_kernels.ops import _plan
    inputs = make_inputs(9, 4, 7, seed=50)
    for backend in ("torch", "triton"):
        x = inputs["features"]
        loss = _call(inputs, backend=backend)
        (g1,) = torch.autograd.grad(loss, x, retain_graph=True)
        (g2,) = torch.autograd.grad(loss, x)
        assert torch.equal(g1, g2), backend
    saved = _plan.MEMORY_BUDGET_BYTES, _plan._ENGINE
    try:
        _plan.MEMORY_BUDGET_BYTES, _plan._ENGINE = 2048, "cublas"
        inputs = make_inputs(40, 6, 45, seed=50)
        loss = _call(inputs, backend="triton")
        torch.autograd.grad(loss, inputs["features"], retain_graph=True)
        with pytest.raises(RuntimeError, match="retain_graph"):
            torch.autograd.grad(loss, inputs["features"])
    finally:
        _plan.MEMORY_BUDGET_BYTES, _plan._ENGINE = saved
