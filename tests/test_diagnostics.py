"""Head diagnostics on hand-built cases with known answers."""
import math

import pytest
import torch

from dhkd.diagnostics import (
    backbone_gradient_cosine,
    gradient_cosine,
    head_gradient_cosine,
    head_report,
    nc1,
    pairwise_cosine_stats,
    weight_norm_stats,
)

F64 = torch.float64


def random_orthogonal(d, seed, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=F64))
    return (q * torch.sign(torch.diagonal(r))).to(dtype)


def simplex_etf(c, d, seed=0, scale=1.0, dtype=F64):
    """(C, d) rows of sqrt(C/(C-1)) (I - 11^T/C), embedded in d >= C dims and rotated at random."""
    m = math.sqrt(c / (c - 1)) * (torch.eye(c, dtype=F64) - torch.full((c, c), 1.0 / c, dtype=F64))
    emb = torch.zeros(c, d, dtype=F64)
    emb[:, :c] = m
    return (scale * emb @ random_orthogonal(d, seed)).to(dtype)


# ---------------------------------------------------------------- weight norms and cosines


@pytest.mark.parametrize("c,d", [(2, 2), (3, 5), (10, 10), (10, 64)])
def test_simplex_etf_has_etf_cosines_and_equal_norms(c, d):
    w = simplex_etf(c, d, seed=c + d, scale=3.7)
    norms = weight_norm_stats(w)
    assert norms["mean"] == pytest.approx(3.7, rel=1e-12)
    assert norms["cv"] == pytest.approx(0.0, abs=1e-12)
    for center in (False, True):
        cos = pairwise_cosine_stats(w, center=center)
        assert cos["etf_cos"] == -1.0 / (c - 1)
        assert cos["mean_cos"] == pytest.approx(-1.0 / (c - 1), abs=1e-12)
        assert cos["gap"] == pytest.approx(0.0, abs=1e-12)
        assert cos["std_cos"] == pytest.approx(0.0, abs=1e-12)
        assert cos["mean_abs_dev"] == pytest.approx(0.0, abs=1e-12)


def test_etf_float32(device):
    w = simplex_etf(10, 32, seed=1, dtype=torch.float32).to(device)
    cos = pairwise_cosine_stats(w)
    assert cos["gap"] == pytest.approx(0.0, abs=1e-6)
    assert cos["std_cos"] == pytest.approx(0.0, abs=1e-6)
    assert weight_norm_stats(w)["cv"] == pytest.approx(0.0, abs=1e-6)


def test_hand_computed_cosines_and_norms():
    # w0 = (2,0), w1 = (0,1), w2 = (-3,0): cosines 0, -1, 0; norms 2, 1, 3
    w = torch.tensor([[2.0, 0.0], [0.0, 1.0], [-3.0, 0.0]], dtype=F64)
    cos = pairwise_cosine_stats(w)
    assert cos["mean_cos"] == pytest.approx(-1 / 3, abs=1e-15)
    assert cos["etf_cos"] == -0.5
    assert cos["gap"] == pytest.approx(1 / 6, abs=1e-15)
    assert cos["std_cos"] == pytest.approx(math.sqrt(2 / 9), abs=1e-15)  # population std of (0, -1, 0)
    assert cos["mean_abs_dev"] == pytest.approx(0.5, abs=1e-15)
    norms = weight_norm_stats(w)
    assert norms["mean"] == pytest.approx(2.0, abs=1e-15)
    assert norms["std"] == pytest.approx(math.sqrt(2 / 3), abs=1e-15)
    assert norms["cv"] == pytest.approx(math.sqrt(2 / 3) / 2, abs=1e-15)


def test_centering_removes_a_shared_offset():
    w = simplex_etf(6, 8, seed=3)
    shifted = w + 2.0 * torch.linspace(-1, 1, 8, dtype=F64)
    raw = pairwise_cosine_stats(shifted)
    centered = pairwise_cosine_stats(shifted, center=True)
    assert raw["gap"] > 0.1 and raw["std_cos"] > 1e-3
    assert centered["gap"] == pytest.approx(0.0, abs=1e-12)
    assert centered["std_cos"] == pytest.approx(0.0, abs=1e-12)


def test_zero_rows_have_zero_cosine():
    w = torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 0.0]], dtype=F64)
    assert pairwise_cosine_stats(w)["mean_cos"] == pytest.approx(1 / 3, abs=1e-15)  # cosines 0, 1, 0
    zeros = torch.zeros(4, 3, dtype=F64)
    assert weight_norm_stats(zeros) == {"mean": 0.0, "std": 0.0, "cv": 0.0}
    assert pairwise_cosine_stats(zeros)["mean_cos"] == 0.0


def test_weight_stats_do_not_touch_autograd():
    w = simplex_etf(4, 4).requires_grad_()
    weight_norm_stats(w)
    pairwise_cosine_stats(w)
    assert w.grad is None


# ---------------------------------------------------------------- NC1


def two_class_1d(s):
    """Class 0 at -1 +/- s, class 1 at 1 +/- s: Sigma_W = s^2, Sigma_B = 1, NC1 = s^2 / 2."""
    f = torch.tensor([[-1 - s], [-1 + s], [1 - s], [1 + s]], dtype=F64)
    return f, torch.tensor([0, 0, 1, 1])


@pytest.mark.parametrize("s", [0.0, 0.1, 0.5, 2.0])
def test_nc1_hand_computed(s):
    f, y = two_class_1d(s)
    assert nc1(f, y, 2) == pytest.approx(s * s / 2, rel=1e-14, abs=1e-15)


def test_nc1_ignores_absent_classes():
    f, y = two_class_1d(0.5)
    assert nc1(f, y, 7) == pytest.approx(0.125, abs=1e-15)
    assert nc1(f, y * 3 + 1, 7) == pytest.approx(0.125, abs=1e-15)  # labels 1 and 4 of 7


def noisy_clusters(c, d, per_class, sigma, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    means = 3.0 * torch.randn(c, d, generator=g, dtype=F64)
    y = torch.arange(c).repeat_interleave(per_class)
    f = means[y] + sigma * torch.randn(len(y), d, generator=g, dtype=F64)
    return f.to(dtype), y


def nc1_direct(f, y, c):
    """tr(Sigma_W pinv(Sigma_B)) / C with d x d matrices, every class present."""
    mu = torch.stack([f[y == k].mean(0) for k in range(c)])
    mg = f.mean(0)
    dw = f - mu[y]
    sw = dw.T @ dw / len(f)
    sb = (mu - mg).T @ (mu - mg) / c
    return torch.trace(sw @ torch.linalg.pinv(sb, hermitian=True)).item() / c


@pytest.mark.parametrize("c,d", [(4, 16), (10, 5), (3, 3)])
def test_nc1_matches_direct_formula(c, d):
    f, y = noisy_clusters(c, d, per_class=7, sigma=0.7, seed=c * d)
    assert nc1(f, y, c) == pytest.approx(nc1_direct(f, y, c), rel=1e-9)


def test_nc1_zero_when_features_collapse_onto_class_means(device):
    g = torch.Generator().manual_seed(5)
    means = torch.randn(10, 32, generator=g, dtype=F64)
    y = torch.randint(0, 10, (200,), generator=g)
    y[:10] = torch.arange(10)
    assert nc1(means[y].to(device), y.to(device), 10) == pytest.approx(0.0, abs=1e-20)
    assert nc1(means[y].float().to(device), y.to(device), 10) == pytest.approx(0.0, abs=1e-10)


def test_nc1_grows_with_noise(device):
    values = [nc1(*(t.to(device) for t in noisy_clusters(5, 12, 40, s, seed=1)), 5) for s in (0.0, 0.01, 0.1, 1.0)]
    assert values[0] == pytest.approx(0.0, abs=1e-20)
    assert values[1] < values[2] < values[3]
    assert 50 < values[2] / values[1] < 200  # about sigma^2 while the noise does not move the class means


def test_nc1_is_invariant_to_rotation_scale_and_shift():
    f, y = noisy_clusters(6, 9, 10, 0.8, seed=2)
    ref = nc1(f, y, 6)
    moved = 4.0 * f @ random_orthogonal(9, seed=4) + 1.5
    assert nc1(moved, y, 6) == pytest.approx(ref, rel=1e-9)


def test_nc1_with_a_large_common_offset():
    # The rows of M are dependent (rank C' - 1); the round-off singular value must not be inverted.
    f, y = noisy_clusters(10, 64, 20, 0.5, seed=3)
    ref = nc1(f, y, 10)
    for offset in (1e3, 1e6):
        assert nc1(f + offset, y, 10) == pytest.approx(ref, rel=1e-6)
    assert nc1((f + 1e3).float(), y, 10) == pytest.approx(ref, rel=1e-4)
    keep = y != 3  # unbalanced counts with a class missing: the dependency is count-weighted
    keep[:7] = False
    assert nc1(f[keep] + 1e6, y[keep], 10) == pytest.approx(nc1(f[keep], y[keep], 10), rel=1e-6)


def test_nc1_float32_close_to_float64(device):
    f, y = noisy_clusters(10, 32, 20, 0.5, seed=7)
    assert nc1(f.float().to(device), y.to(device), 10) == pytest.approx(nc1(f, y, 10), rel=1e-4)


def test_nc1_undefined_cases_give_nan():
    f = torch.randn(5, 3, dtype=F64)
    assert math.isnan(nc1(f, torch.full((5,), 2), 4))  # one class present
    assert math.isnan(nc1(torch.zeros(0, 3, dtype=F64), torch.zeros(0, dtype=torch.long), 4))
    assert math.isnan(nc1(torch.ones(4, 3, dtype=F64), torch.tensor([0, 0, 1, 1]), 2))  # equal class means


# ---------------------------------------------------------------- gradient cosines


def test_gradient_cosine_orthogonal_parallel_opposite():
    a = torch.tensor([1.0, 2.0, 0.0], dtype=F64)
    b = torch.tensor([-2.0, 1.0, 5.0], dtype=F64)
    assert gradient_cosine(a, b) == pytest.approx(0.0, abs=1e-15)
    assert gradient_cosine(a, 3.0 * a) == pytest.approx(1.0, abs=1e-15)
    assert gradient_cosine(a, -0.25 * a) == pytest.approx(-1.0, abs=1e-15)
    assert gradient_cosine(a, a + b) == pytest.approx(math.sqrt(5) / math.sqrt(35), abs=1e-15)


def test_gradient_cosine_on_lists_concatenates():
    a = [torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=F64), torch.tensor([2.0], dtype=F64)]
    b = [torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=F64), torch.tensor([[1.0]], dtype=F64)]  # same numel, other shapes
    # flattened: (1, 0, 0, 1, 2) . (1, 1, 0, 0, 1) = 3; norms sqrt(6), sqrt(3)
    assert gradient_cosine(a, b) == pytest.approx(3 / math.sqrt(18), abs=1e-15)
    assert gradient_cosine(tuple(a), b) == gradient_cosine(a, b)


def test_gradient_cosine_none_entries_are_zeros():
    a = [torch.tensor([1.0, 0.0]), None]
    b = [torch.tensor([1.0, 0.0]), torch.tensor([1.0])]
    assert gradient_cosine(a, b) == pytest.approx(1 / math.sqrt(2), abs=1e-7)
    assert gradient_cosine([None], [torch.ones(3)]) == 0.0


def test_gradient_cosine_zero_gradient_is_zero_not_nan(device):
    z = torch.zeros(4, device=device)
    assert gradient_cosine(z, torch.ones(4, device=device)) == 0.0
    assert gradient_cosine(z, z) == 0.0


def test_gradient_cosine_non_finite_is_nan():
    assert math.isnan(gradient_cosine(torch.tensor([float("nan"), 1.0]), torch.ones(2)))
    assert math.isnan(gradient_cosine(torch.tensor([float("inf"), 1.0]), torch.ones(2)))


def test_gradient_cosine_float32_and_device(device):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(1000, generator=g, dtype=F64)
    b = torch.randn(1000, generator=g, dtype=F64)
    expected = (a @ b / (a.norm() * b.norm())).item()
    assert gradient_cosine(a.float().to(device), b.float().to(device)) == pytest.approx(expected, abs=1e-6)


def linear_backbone():
    """h = x A with x = [[1, 0], [0, 2]]; loss_prob = sum(h * U), loss_logit = sum(h * V).

    d loss / d h = U, V and d loss / d A = x^T U, x^T V, so by hand:
    features: <U, V> / (|U||V|) = 2 / 3;  A: <x^T U, x^T V> / (|x^T U||x^T V|) = 5 / sqrt(54).
    """
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=F64)
    a = torch.tensor([[0.3, -1.2], [0.7, 2.0]], dtype=F64, requires_grad=True)
    u = torch.tensor([[1.0, 1.0], [0.0, 1.0]], dtype=F64)
    v = torch.tensor([[1.0, 0.0], [1.0, 1.0]], dtype=F64)
    h = x @ a
    return a, h, (h * u).sum(), (h * v).sum()


def test_backbone_gradient_cosine_wrt_features_and_params():
    a, h, lp, ll = linear_backbone()
    assert backbone_gradient_cosine(h, lp, ll) == pytest.approx(2 / 3, abs=1e-15)
    assert backbone_gradient_cosine(h, lp, ll, params=[a]) == pytest.approx(5 / math.sqrt(54), abs=1e-15)
    assert backbone_gradient_cosine(h, lp, ll, params=iter([a])) == pytest.approx(5 / math.sqrt(54), abs=1e-15)
    assert a.grad is None  # .grad untouched
    (lp + ll).backward()  # graph retained for the caller
    assert a.grad is not None


def test_backbone_gradient_cosine_of_a_loss_that_misses_a_param():
    a, h, lp, _ = linear_backbone()
    unused = torch.ones(3, dtype=F64, requires_grad=True)
    other = (unused * 2.0).sum()
    assert backbone_gradient_cosine(h, lp, other, params=[a, unused]) == 0.0


def test_backbone_gradient_cosine_dual_head_conflict_sign():
    # Both losses on the same features, pulling a 1-D feature to +1 and to -1: cosine -1 in the backbone.
    w = torch.tensor([[2.0]], dtype=F64, requires_grad=True)
    h = torch.tensor([[0.25]], dtype=F64) @ w  # h = 0.5: gradients -1 and 3
    up, down = ((h - 1.0) ** 2).sum(), ((h + 1.0) ** 2).sum()
    assert backbone_gradient_cosine(h, up, down) == pytest.approx(-1.0, abs=1e-15)


# ---------------------------------------------------------------- head_report

REPORT_KEYS = {"norm_mean", "norm_cv", "cos_mean", "cos_std", "cos_etf_gap", "cos_etf_absdev",
               "cos_centered_etf_gap", "cos_centered_std"}


def test_head_report_on_collapsed_etf_head(device):
    w = simplex_etf(10, 16, seed=9, scale=2.0).to(device)
    y = torch.arange(10, device=device).repeat(3)
    rep = head_report(w, features=w[y] * 5.0, labels=y)
    assert set(rep) == REPORT_KEYS | {"nc1"}
    assert all(type(v) is float for v in rep.values())
    assert rep["norm_mean"] == pytest.approx(2.0, rel=1e-12)
    assert rep["cos_mean"] == pytest.approx(-1 / 9, abs=1e-12)
    for key in ("norm_cv", "cos_std", "cos_etf_gap", "cos_etf_absdev", "cos_centered_etf_gap", "cos_centered_std", "nc1"):
        assert rep[key] == pytest.approx(0.0, abs=1e-12), key


def test_head_report_without_features_and_with_num_classes():
    w = torch.tensor([[2.0, 0.0], [0.0, 1.0], [-3.0, 0.0]], dtype=F64)
    rep = head_report(w)
    assert set(rep) == REPORT_KEYS
    assert rep["cos_etf_gap"] == pytest.approx(1 / 6, abs=1e-15)
    f, y = two_class_1d(0.5)
    assert head_report(w, f, y, num_classes=5)["nc1"] == pytest.approx(0.125, abs=1e-15)
    assert head_report(w, f, y)["nc1"] == pytest.approx(0.125, abs=1e-15)  # num_classes = rows of w


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("fn", [weight_norm_stats, pairwise_cosine_stats])
def test_weight_bad_input(fn):
    with pytest.raises(ValueError, match="weight"):
        fn(torch.ones(3))
    with pytest.raises(ValueError, match="weight"):
        fn(torch.ones(1, 4))
    with pytest.raises(TypeError, match="weight"):
        fn(torch.ones(3, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="weight"):
        fn([[1.0, 0.0], [0.0, 1.0]])


def test_nc1_bad_input():
    f, y = two_class_1d(0.1)
    with pytest.raises(ValueError, match="features"):
        nc1(f.reshape(4, 1, 1), y, 2)
    with pytest.raises(ValueError, match="labels"):
        nc1(f, y[:3], 2)
    with pytest.raises(ValueError, match="labels"):
        nc1(f, y.reshape(2, 2), 2)
    with pytest.raises(TypeError, match="labels"):
        nc1(f, y.double(), 2)
    with pytest.raises(ValueError, match="labels"):
        nc1(f, y + 1, 2)
    with pytest.raises(ValueError, match="labels"):
        nc1(f, y - 1, 2)
    with pytest.raises(ValueError, match="num_classes"):
        nc1(f, y, 1)
    with pytest.raises(ValueError, match="num_classes"):
        nc1(f, y, 2.0)


def test_gradient_bad_input():
    with pytest.raises(ValueError, match="grads_b"):
        gradient_cosine([torch.ones(2), torch.ones(2)], [torch.ones(2)])
    with pytest.raises(ValueError, match="grads_b"):
        gradient_cosine(torch.ones(3), torch.ones(4))
    with pytest.raises(TypeError, match="grads_a"):
        gradient_cosine(3.0, torch.ones(1))
    with pytest.raises(TypeError, match="grads_b"):
        gradient_cosine(torch.ones(1), torch.ones(1, dtype=torch.long))


def test_backbone_gradient_bad_input():
    a, h, lp, ll = linear_backbone()
    with pytest.raises(ValueError, match="loss_prob"):
        backbone_gradient_cosine(h, h, ll)
    with pytest.raises(ValueError, match="loss_logit"):
        backbone_gradient_cosine(h, lp, ll.detach())
    with pytest.raises(ValueError, match="features"):
        backbone_gradient_cosine(h.detach(), lp, ll)
    with pytest.raises(ValueError, match="params"):
        backbone_gradient_cosine(h, lp, ll, params=[])
    with pytest.raises(ValueError, match="params"):
        backbone_gradient_cosine(h, lp, ll, params=[torch.ones(2)])


def test_head_report_bad_input():
    w = simplex_etf(3, 3)
    with pytest.raises(ValueError, match="head_weight"):
        head_report(w[0])
    with pytest.raises(ValueError, match="labels"):
        head_report(w, features=torch.ones(4, 3))


# ---------------------------------------------------------------- head gradient cosine

def test_head_gradient_cosine_hand_computed_rows():
    """L_a = <A, W>, L_b = <B, W>: the gradients are A and B. Rows: parallel, opposite, orthogonal."""
    w = torch.zeros(3, 2, dtype=F64, requires_grad=True)
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=F64)
    b = torch.tensor([[2.0, 0.0], [0.0, -1.0], [1.0, -1.0]], dtype=F64)
    out = head_gradient_cosine((a * w).sum(), (b * w).sum(), w)
    assert out["cos"] == pytest.approx(1 / (2 * math.sqrt(7)), abs=1e-12)  # <A,B> = 1, |A|^2 = 4, |B|^2 = 7
    assert out["row_cos_mean"] == pytest.approx(0.0, abs=1e-12)              # (1 - 1 + 0) / 3
    assert out["row_conflict_frac"] == pytest.approx(1 / 3, abs=1e-12)
    assert w.grad is None


@pytest.mark.parametrize("teacher, expected", [("agrees", 1.0), ("inverts", -1.0), ("raises_all", 0.0)])
@pytest.mark.parametrize("logit_loss", ["binary_kl", "binary_kl_norm"])
@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_head_gradient_cosine_of_ce_and_a_logit_loss_on_one_head(teacher, expected, logit_loss, backend):
    """Two classes, features H = I, W = 0, b = 0 (all logits 0), labels (0, 1). CE's logit gradient is
    (softmax(0) - e_y)/N = (1/4) [[-1, 1], [1, -1]] and dL/dW = G^T H = G^T. At z = 0 the logit losses
    have dL/dz = tau (sig(0) - sig(t/tau))/N (BinaryKL) and -(tau/2) tanh(t/(2 tau))/N (BinaryKL-Norm),
    both odd in t with the sign of -t. A teacher that agrees with the labels, t = a [[1, -1], [-1, 1]], gives a G proportional to
    CE's (cos +1), one that inverts them the opposite (cos -1), one that raises every logit,
    t = a [[1, 1], [1, 1]], a common-mode G = -k [[1, 1], [1, 1]] that CE cannot see (cos 0)."""
    from dhkd_kernels import fused_dual_head_kd_loss
    h = torch.eye(2, dtype=F64)
    w = torch.zeros(2, 2, dtype=F64, requires_grad=True)
    b = torch.zeros(2, dtype=F64)
    y = torch.tensor([0, 1])
    pattern = {"agrees": [[1.0, -1.0], [-1.0, 1.0]], "inverts": [[-1.0, 1.0], [1.0, -1.0]],
               "raises_all": [[1.0, 1.0], [1.0, 1.0]]}[teacher]
    t = 3.0 * torch.tensor(pattern, dtype=F64)
    common = dict(kd_weight=0.0, logit_temperature=2.0, logit_loss=logit_loss, backend=backend)
    ce = fused_dual_head_kd_loss(h, w, b, w, b, t, y, ce_weight=1.0, logit_weight=0.0, **common)
    logit = fused_dual_head_kd_loss(h, w, b, w, b, t, y, ce_weight=0.0, logit_weight=1.0, **common)
    out = head_gradient_cosine(ce, logit, w)
    assert out["cos"] == pytest.approx(expected, abs=1e-12)
    assert out["row_cos_mean"] == pytest.approx(expected, abs=1e-12)
    assert out["row_conflict_frac"] == (1.0 if expected < 0 else 0.0)


def test_head_gradient_cosine_unreached_weight_and_bad_inputs():
    w = torch.ones(2, 3, dtype=F64, requires_grad=True)
    other = torch.ones(3, dtype=F64, requires_grad=True)
    out = head_gradient_cosine((w * w).sum(), other.sum(), w)
    assert out == {"cos": 0.0, "row_cos_mean": 0.0, "row_conflict_frac": 0.0}
    with pytest.raises(ValueError, match="does not require grad"):
        head_gradient_cosine((w * w).sum(), (w * w).sum().detach(), w)
    with pytest.raises(ValueError, match="head_weight does not require grad"):
        head_gradient_cosine(other.sum(), other.sum(), torch.ones(2, 3))
