"""The reference itself: gradcheck in float64, closed forms, and the official code's definitions."""
import math

import pytest
import torch
import torch.nn.functional as F

from dhkd_kernels import fused_dual_head_kd_loss, reference
from tests.helpers import make_inputs

ARGS = ("features", "head_weight", "head_bias", "aux_weight", "aux_bias", "teacher_logits", "labels")


def _positional(inputs):
    return [inputs[k] for k in ARGS]


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("logit_loss", ["binary_kl_norm", "binary_kl"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("aux", [False, True])
def test_gradcheck(backend, logit_loss, reduction, aux):
    inputs = make_inputs(4, 3, 5, da=2 if aux else None, dtype=torch.float64, ignore_frac=0.3, seed=7)
    leaves = [k for k in ("features", "head_weight", "head_bias", "aux_weight", "aux_bias", "aux_features")
              if inputs[k] is not None]

    def f(*tensors):
        given = dict(inputs, **dict(zip(leaves, tensors)))
        return fused_dual_head_kd_loss(*_positional(given), aux_features=given["aux_features"],
                                       kd_weight=0.7, logit_weight=1.3, ce_weight=0.9,
                                       kd_temperature=3.0, logit_temperature=1.5, logit_loss=logit_loss,
                                       reduction=reduction, backend=backend)

    assert torch.autograd.gradcheck(f, [inputs[k] for k in leaves], eps=1e-6, atol=1e-7, rtol=1e-5)


def test_official_definitions_without_ignored_rows():
    """With no ignored row the total equals the official DHKD code's per-batch definitions."""
    inputs = make_inputs(6, 4, 9, dtype=torch.float64, seed=3)
    x, w1, b1, w2, b2, t, y = _positional(inputs)
    z1, z2 = F.linear(x, w1, b1), F.linear(x, w2, b2)
    n, T, tau = x.shape[0], 4.0, 2.0
    ce = F.cross_entropy(z1, y)
    kd = F.kl_div(F.log_softmax(z1 / T, 1), F.softmax(t / T, 1), reduction="none").sum(1).mean() * T * T
    d = torch.sigmoid((z2 - t) / tau)
    bkl_norm = (0.5 * torch.log(0.5 / d) + 0.5 * torch.log(0.5 / (1 - d))).sum(1).mean() * tau * tau
    ps, pt = torch.sigmoid(z2 / tau), torch.sigmoid(t / tau)
    bkl = (pt * torch.log(pt / ps) + (1 - pt) * torch.log((1 - pt) / (1 - ps))).sum(1).mean() * tau * tau
    for logit_loss, expected in (("binary_kl_norm", bkl_norm), ("binary_kl", bkl)):
        got = reference.dual_head_kd_loss(x, w1, b1, w2, b2, t, y, kd_weight=0.5, logit_weight=0.1,
                                          logit_loss=logit_loss)
        torch.testing.assert_close(got, ce + 0.5 * kd + 0.1 * expected, rtol=1e-12, atol=0)
    assert n == 6


def test_log_cosh_is_exact_and_finite():
    x = torch.tensor([-1e4, -30.0, -1.0, 0.0, 1e-8, 0.5, 20.0, 1e4], dtype=torch.float64)
    # math.log(math.cosh(1e-8)) rounds to 0; the series x^2/2 - x^4/12 is exact there
    expected = torch.tensor([v * v / 2 - v**4 / 12 if abs(v) < 1e-3 else
                             math.log(math.cosh(v)) if abs(v) < 700 else abs(v) - math.log(2)
                             for v in x.tolist()], dtype=torch.float64)
    torch.testing.assert_close(reference.log_cosh(x), expected, rtol=1e-14, atol=0)
    assert torch.isfinite(reference.log_cosh(x.float())).all()
    small = torch.tensor([1e-3, 0.3, 0.99], dtype=torch.float32)  # relative accuracy near 0 in float32
    torch.testing.assert_close(reference.log_cosh(small).double(), reference.log_cosh(small.double()),
                               rtol=1e-6, atol=0)


def test_binary_kl_norm_gradient_survives_large_gaps():
    """Past a gap of ~18 tau the official clamp zeroes the gradient; the exact form keeps (tau/2) tanh."""
    tau = 2.0
    z2 = torch.tensor([[100.0, -100.0]], dtype=torch.float64, requires_grad=True)
    t = torch.zeros(1, 2, dtype=torch.float64)
    reference.binary_kl_norm(z2, t, tau).sum().backward()
    torch.testing.assert_close(z2.grad, torch.tensor([[tau / 2, -tau / 2]], dtype=torch.float64))


def test_binary_kl_zero_when_student_equals_teacher():
    t = torch.randn(3, 11, dtype=torch.float64) * 5
    assert reference.binary_kl(t, t, 2.0).abs().max() < 1e-12
    assert reference.binary_kl_norm(t, t, 2.0).abs().max() < 1e-12
    assert reference.softmax_kd(t, t, 4.0).abs().max() < 1e-12


def test_all_rows_ignored_gives_zero_loss_and_grads():
    inputs = make_inputs(3, 4, 5, dtype=torch.float64)
    inputs["labels"][:] = -100
    loss = reference.dual_head_kd_loss(*_positional(inputs), kd_weight=1.0)
    loss.backward()
    assert loss.item() == 0.0
    assert inputs["features"].grad.abs().max() == 0
    assert inputs["head_weight"].grad.abs().max() == 0
