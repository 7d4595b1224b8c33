"""The chunked torch path against the float64 reference: loss and every gradient, many shapes and options."""
import pytest
import torch

from dhkd_kernels import DualHeadKDLoss, fused_dual_head_kd_loss
from dhkd_kernels.ops import chunked
from tests.helpers import assert_matches_reference, cast_inputs, loss_and_grads, make_inputs, rel_err

SHAPES = [  # (N, D, C, D_aux)
    (1, 4, 3, None),
    (5, 3, 1, None),
    (6, 5, 2, None),
    (13, 7, 11, 5),
    (33, 17, 129, None),
    (9, 1, 7, 3),
]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_shapes_and_dtypes(shape, dtype):
    n, d, c, da = shape
    inputs = make_inputs(n, d, c, da=da, dtype=dtype, ignore_frac=0.25, seed=n * c)
    assert_matches_reference(inputs, backend="torch", kd_weight=0.5)


@pytest.mark.parametrize("logit_loss", ["binary_kl_norm", "binary_kl"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("bias", [True, False])
def test_options(logit_loss, reduction, bias):
    inputs = make_inputs(10, 6, 9, bias=bias, ignore_frac=0.3, seed=11)
    assert_matches_reference(inputs, backend="torch", logit_loss=logit_loss, reduction=reduction,
                             kd_weight=0.3, ce_weight=0.8, logit_weight=1.7)


@pytest.mark.parametrize("kd_t,tau", [(0.5, 0.5), (1.0, 2.0), (4.0, 10.0), (10.0, 1.0)])
def test_temperatures(kd_t, tau):
    inputs = make_inputs(8, 5, 13, seed=5)
    for logit_loss in ("binary_kl_norm", "binary_kl"):
        assert_matches_reference(inputs, backend="torch", kd_weight=1.0, kd_temperature=kd_t,
                                 logit_temperature=tau, logit_loss=logit_loss)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_confident_logits(dtype):
    """Softmax of the target close to 1: CE near 0, gradient tiny, no NaN."""
    inputs = make_inputs(8, 6, 10, dtype=torch.float64, seed=2)
    x = inputs["features"].detach()
    y = inputs["labels"]
    w = torch.zeros(10, 6, dtype=torch.float64)
    w[y] = 30.0 * x / x.norm(dim=1, keepdim=True) ** 2  # target logit 30, others 0 (unless a label repeats)
    inputs["head_weight"] = w.requires_grad_(True)
    inputs = cast_inputs(inputs, dtype)
    assert_matches_reference(inputs, backend="torch", kd_weight=0.5)


def test_teacher_equals_student():
    inputs = make_inputs(7, 5, 6, dtype=torch.float64, seed=4)
    with torch.no_grad():
        z = inputs["features"] @ inputs["aux_weight"].T + inputs["aux_bias"]
    inputs["teacher_logits"] = z.clone()
    loss, parts = fused_dual_head_kd_loss(
        *[inputs[k] for k in ("features", "head_weight", "head_bias", "aux_weight", "aux_bias",
                              "teacher_logits", "labels")],
        backend="torch", return_components=True, ce_weight=0.0)
    assert abs(parts["logit"].item()) < 1e-12
    loss.backward()
    assert inputs["aux_weight"].grad.abs().max() < 1e-12
    assert_matches_reference(inputs, backend="torch", kd_weight=1.0)


@pytest.mark.parametrize("logit_loss", ["binary_kl_norm", "binary_kl"])
def test_huge_logits_float32_stay_finite(logit_loss):
    """Logits of magnitude 1e4 in float32: finite loss and gradients, matching float64."""
    inputs = make_inputs(6, 4, 7, dtype=torch.float32, logit_scale=1e4, teacher_scale=1e4, seed=8)
    loss, grads = loss_and_grads(inputs, backend="torch", kd_weight=1.0, logit_loss=logit_loss)
    assert torch.isfinite(loss)
    assert all(torch.isfinite(g).all() for g in grads.values())
    assert_matches_reference(inputs, backend="torch", kd_weight=1.0, logit_loss=logit_loss)


def test_chunking_does_not_change_the_result(monkeypatch):
    inputs = make_inputs(37, 5, 23, dtype=torch.float64, ignore_frac=0.2, seed=9)
    whole = loss_and_grads(inputs, backend="torch", kd_weight=0.4)
    monkeypatch.setattr(chunked, "DEFAULT_CHUNK_ELEMENTS", 23 * 4)
    parts = loss_and_grads(inputs, backend="torch", kd_weight=0.4)
    assert rel_err(parts[0], whole[0]) < 1e-13
    for k in whole[1]:
        assert rel_err(parts[1][k], whole[1][k]) < 1e-13


def test_components_match_reference():
    inputs = make_inputs(20, 6, 5, dtype=torch.float64, ignore_frac=0.3, seed=1)
    args = [inputs[k] for k in ("features", "head_weight", "head_bias", "aux_weight", "aux_bias",
                                "teacher_logits", "labels")]
    for reduction in ("mean", "sum"):
        _, ref = fused_dual_head_kd_loss(*args, backend="reference", return_components=True,
                                         reduction=reduction)
        _, got = fused_dual_head_kd_loss(*args, backend="torch", return_components=True,
                                         reduction=reduction)
        assert got.keys() == ref.keys() == {"ce", "kd", "logit", "correct", "n_valid"}
        for k in ("ce", "kd", "logit"):
            torch.testing.assert_close(got[k], ref[k], rtol=1e-12, atol=1e-12)
            assert not got[k].requires_grad
        assert got["correct"].item() == ref["correct"].item()
        assert got["n_valid"].item() == int((inputs["labels"] != -100).sum())


def test_correct_count_uses_first_argmax():
    x = torch.ones(3, 1, dtype=torch.float64)
    w = torch.tensor([[1.0], [1.0], [0.0]], dtype=torch.float64)  # classes 0 and 1 tie
    t = torch.zeros(3, 3, dtype=torch.float64)
    y = torch.tensor([0, 1, 2])
    for backend in ("reference", "torch"):
        _, parts = fused_dual_head_kd_loss(x, w, None, w, None, t, y, backend=backend,
                                           return_components=True)
        assert parts["correct"].item() == 1, backend


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_all_rows_ignored_and_empty_batch(backend):
    inputs = make_inputs(4, 3, 5, ignore_frac=1.0)
    assert (inputs["labels"] == -100).all()
    loss, grads = loss_and_grads(inputs, backend=backend, kd_weight=1.0)
    assert loss.item() == 0.0
    assert all(g.abs().max() == 0 for g in grads.values())
    empty = make_inputs(0, 3, 5)
    loss, grads = loss_and_grads(empty, backend=backend)
    assert loss.item() == 0.0 and torch.isfinite(loss)


def test_custom_ignore_index_and_int32_labels():
    inputs = make_inputs(9, 4, 6, ignore_frac=0.4, ignore_index=5, seed=3)
    inputs["labels"] = inputs["labels"].to(torch.int32)
    assert_matches_reference(inputs, backend="torch", ignore_index=5)


def test_no_grad_needed_skips_gradients_and_matches():
    inputs = cast_inputs(make_inputs(5, 4, 6, seed=6), torch.float32)
    args = [inputs[k].detach() if k != "labels" else inputs[k] for k in
            ("features", "head_weight", "head_bias", "aux_weight", "aux_bias", "teacher_logits", "labels")]
    with torch.no_grad():
        a = fused_dual_head_kd_loss(*args, backend="torch")
    b = fused_dual_head_kd_loss(*args, backend="reference")
    assert not a.requires_grad
    torch.testing.assert_close(a, b.float(), rtol=1e-6, atol=1e-6)


def test_only_some_inputs_require_grad():
    inputs = make_inputs(6, 4, 5, seed=12)
    inputs["head_weight"].requires_grad_(False)
    inputs["features"].requires_grad_(False)
    loss, grads = loss_and_grads(inputs, backend="torch", kd_weight=0.2)
    _, ref = loss_and_grads(cast_inputs(inputs, torch.float64), backend="reference", kd_weight=0.2)
    assert grads.keys() == {"head_bias", "aux_weight", "aux_bias"}
    for k in ("aux_weight", "aux_bias", "head_bias"):
        assert rel_err(grads[k], ref[k]) < 1e-4


def test_mixed_dtypes_and_autocast():
    """One dtype rule on every backend: under autocast the matmuls run in the autocast dtype (here
    bf16, as ``F.linear`` would), outside it in the operands' promoted dtype. Grads keep each dtype."""
    inputs = make_inputs(6, 8, 5, seed=13)
    inputs["features"] = inputs["features"].detach().bfloat16().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, grads = loss_and_grads(inputs, backend="torch", kd_weight=0.3)
        eager, _ = loss_and_grads(inputs, backend="reference", kd_weight=0.3)
    assert loss.dtype == torch.float32
    assert grads["features"].dtype == torch.bfloat16
    assert grads["head_weight"].dtype == torch.float32
    rounded = cast_inputs(cast_inputs(inputs, torch.bfloat16), torch.float64)  # the operands autocast sees
    ref_loss, _ = loss_and_grads(rounded, backend="reference", kd_weight=0.3)
    assert rel_err(loss, ref_loss) <= 1.5 * rel_err(eager, ref_loss) + 2e-3
    # without autocast, bf16 features and fp32 weights are promoted to fp32 by every backend
    for backend in ("torch", "reference"):
        loss, grads = loss_and_grads(inputs, backend=backend, kd_weight=0.3)
        assert loss.dtype == torch.float32 and grads["features"].dtype == torch.bfloat16
        promoted, _ = loss_and_grads(cast_inputs(inputs, torch.float64), backend="reference", kd_weight=0.3)
        assert rel_err(loss, promoted) < 1e-5, backend


def test_module_form():
    inputs = make_inputs(5, 4, 6, seed=14)
    crit = DualHeadKDLoss(kd_weight=0.5, logit_loss="binary_kl", backend="torch")
    assert "binary_kl" in repr(crit)
    args = [inputs[k] for k in ("features", "head_weight", "head_bias", "aux_weight", "aux_bias",
                                "teacher_logits", "labels")]
    got = crit(*args)
    want = fused_dual_head_kd_loss(*args, kd_weight=0.5, logit_loss="binary_kl", backend="reference")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_binary_kl_exact_past_softplus_cutoff():
    """Teacher logits beyond 20 tau (where F.softplus switches to the identity) stay exact in float64."""
    inputs = make_inputs(3, 2, 6, dtype=torch.float64, logit_scale=0.1, seed=21)
    inputs["teacher_logits"] = torch.tensor([-21.0, 23.0, -40.0, 0.5, 25.0, -22.0],
                                            dtype=torch.float64).repeat(3, 1) * 2.0
    assert_matches_reference(inputs, backend="torch", logit_loss="binary_kl", ce_weight=0.0)


def test_confident_row_gradients_no_worse_than_eager():
    """A property-test example: p_y -> 1 in float32 (z - lse used to lose p_y - 1's digits)."""
    inputs = make_inputs(1, 1, 36, logit_scale=10.0, teacher_scale=0.0, seed=469)
    assert_matches_reference(inputs, backend="torch", ce_weight=1.0, kd_weight=0.0, logit_weight=0.0)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_teacher_logits_get_no_gradient(backend):
    """The teacher is a constant target on every backend, even when its tensor requires grad."""
    inputs = make_inputs(4, 3, 5, seed=15)
    inputs["teacher_logits"].requires_grad_(True)
    args = [inputs[k] for k in ("features", "head_weight", "head_bias", "aux_weight", "aux_bias",
                                "teacher_logits", "labels")]
    fused_dual_head_kd_loss(*args, kd_weight=1.0, backend=backend).backward()
    assert inputs["teacher_logits"].grad is None
    assert inputs["features"].grad is not None
