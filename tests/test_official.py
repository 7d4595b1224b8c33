"""The official code's numerics (``loss.numerics: official``): equal to the exact losses where the clamps
do not act, infinite or gradient-free where float32 makes them act, and wired into the distiller."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from dhkd.config import ConfigError, load_config
from dhkd.distill import Distiller
from dhkd.models import build_student
from dhkd.official import official_binary_kl, official_binary_kl_norm, official_dual_head_loss, official_kd
from dhkd_kernels import fused_dual_head_kd_loss, reference
from tests.trainer_helpers import CONFIGS, FAST, dhkd_cache  # noqa: F401

TAU = 2.0


def logits(n=16, c=7, scale=3.0, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, c, generator=g, dtype=dtype) * scale,
            torch.randn(n, c, generator=g, dtype=dtype) * scale)


@pytest.mark.parametrize("name", ["binary_kl", "binary_kl_norm", "kd"])
def test_official_formulas_equal_the_exact_ones_where_no_clamp_acts(name):
    z, t = logits()
    z.requires_grad_(True)
    official = {"binary_kl": lambda: official_binary_kl(z, t, TAU),
                "binary_kl_norm": lambda: official_binary_kl_norm(z, t, TAU),
                "kd": lambda: official_kd(z, t, 4.0)}[name]()
    exact = {"binary_kl": lambda: reference.binary_kl(z, t, TAU),
             "binary_kl_norm": lambda: reference.binary_kl_norm(z, t, TAU),
             "kd": lambda: reference.softmax_kd(z, t, 4.0)}[name]().mean()
    torch.testing.assert_close(official, exact, rtol=1e-10, atol=1e-12)
    g_off, = torch.autograd.grad(official, z)
    g_ex, = torch.autograd.grad(exact, z)
    torch.testing.assert_close(g_off, g_ex, rtol=1e-8, atol=1e-12)


def test_float32_binary_kl_norm_is_infinite_past_16_6_tau_and_gradient_free_outside_the_clamps():
    """Past 16.6 tau, d rounds to 1 = the clamp's max in float32: the loss is inf, and the clamp's backward
    (which compares with 1 - 1e-8 exactly) passes no gradient; below -18.4 tau the bottom clamp holds."""
    t = torch.zeros(1, 4)
    z = torch.tensor([[16.5, 16.8, -19.0, 1.0]]) * TAU
    per_class = []
    for k in range(4):
        zk = z[:, k:k + 1].clone().requires_grad_(True)
        loss = official_binary_kl_norm(zk, t[:, :1], TAU)
        grad, = torch.autograd.grad(loss, zk)
        exact = reference.binary_kl_norm(zk.detach().double(), t[:, :1].double(), TAU)
        per_class.append((loss.item(), grad.item(), exact.item()))
    (l0, g0, e0), (l1, g1, e1), (l2, g2, e2), (l3, g3, e3) = per_class
    assert math.isfinite(l0) and math.isfinite(g0) and g0 > 0     # below the threshold: finite
    assert l1 == math.inf and g1 == 0.0 and math.isfinite(e1)    # 1 - d rounds to 0
    assert math.isfinite(l2) and g2 == 0.0                          # bottom clamp: no gradient
    assert math.isclose(l3, e3, rel_tol=1e-5) and g3 > 0
    # the exact loss keeps its gradient (tau/2) tanh(x/2) at -19 tau: about -tau/2
    z2 = z[:, 2:3].clone().requires_grad_(True)
    g_exact, = torch.autograd.grad(
        fused_dual_head_kd_loss(torch.ones(1, 1), z2, None, z2, None, t[:, :1], torch.zeros(1, dtype=torch.long),
                                ce_weight=0.0, logit_weight=1.0, logit_temperature=TAU, backend="torch"), z2)
    torch.testing.assert_close(g_exact, torch.tensor([[-TAU / 2 * math.tanh(19 / 2)]]), rtol=1e-5, atol=1e-6)


def test_float32_binary_kl_is_infinite_once_the_student_sigmoid_rounds_to_one():
    z = torch.tensor([[16.5, 16.8, 16.8]]) * TAU
    t = torch.tensor([[0.0, 0.0, 17.0]]) * TAU
    losses = [official_binary_kl(z[:, k:k + 1], t[:, k:k + 1], TAU).item() for k in range(3)]
    assert math.isfinite(losses[0]) and losses[1] == math.inf
    assert math.isnan(losses[2])  # teacher saturated too: 0 * log 0 in the KL
    zk = z[:, 1:].clone().requires_grad_(True)
    grad, = torch.autograd.grad(official_binary_kl(zk, t[:, 1:], TAU), zk)
    assert torch.equal(grad, torch.zeros_like(grad))  # finite, but no gradient on the saturated logits
    assert math.isfinite(reference.binary_kl(z.double(), t.double(), TAU).sum().item())
    # in float64 the same gaps are harmless
    assert math.isfinite(official_binary_kl(z.double(), torch.zeros(1, 3, dtype=torch.float64), TAU).item())


def make(method, *extra):
    cfg = load_config(CONFIGS / f"mnist1d/{method}.yaml", FAST + list(extra))
    torch.manual_seed(0)
    student = build_student("mnist1d_mlp", num_classes=10, aux_head="linear").double()
    return Distiller(student, torch.nn.Identity(), cfg.loss, method)


@pytest.mark.parametrize("method, logit_loss", [("ce_binary_kl", "binary_kl"), ("dhkd", "binary_kl_norm"),
                                                ("dhkd", "binary_kl"), ("kd", "binary_kl_norm")])
def test_distiller_with_official_numerics(method, logit_loss):
    official = make(method, "loss.numerics=official", "loss.backend=reference", f"loss.logit_loss={logit_loss}")
    exact = copy.deepcopy(official)
    exact.cfg = copy.deepcopy(official.cfg)
    exact.cfg.numerics, exact.cfg.backend = "exact", "torch"
    g = torch.Generator().manual_seed(3)
    x = torch.randn(32, 40, generator=g, dtype=torch.float64)
    y = torch.randint(0, 10, (32,), generator=g)
    t = torch.randn(32, 10, generator=g, dtype=torch.float64) * 3
    out = official.train_step(x, y, teacher_logits=t)
    exact.train_step(x, y, teacher_logits=t)
    s = official.student
    f = s.backbone(x)
    w2 = s.aux_head if method == "dhkd" else s.head
    c = official.cfg
    ce_w, kd_w, lg_w = official.loss_weights(0)
    expected = official_dual_head_loss(f, s.head.weight, s.head.bias, w2.weight, w2.bias, t, y, ce_weight=ce_w,
                                       kd_weight=kd_w, logit_weight=lg_w, kd_temperature=c.kd_temperature,
                                       logit_temperature=c.logit_temperature, logit_loss=logit_loss)
    torch.testing.assert_close(out["loss"], expected.detach(), rtol=1e-12, atol=1e-12)
    for (n, p), q in zip(official.student.named_parameters(), exact.student.parameters()):
        if p.grad is not None:  # moderate logits: the same gradients as the exact losses
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-7, atol=1e-10, msg=n)


def test_official_numerics_need_the_reference_backend():
    with pytest.raises(ConfigError, match="loss.numerics=official"):
        load_config(CONFIGS / "mnist1d/dhkd.yaml", ["loss.numerics=official"])
    with pytest.raises(ConfigError, match="loss.numerics must be one of"):
        load_config(CONFIGS / "mnist1d/dhkd.yaml", ["loss.numerics=fast", "loss.backend=reference"])
    assert load_config(CONFIGS / "mnist1d/dhkd.yaml", ["loss.numerics=official", "loss.backend=reference"]
                       ).loss.numerics == "official"


def test_trainer_logs_and_counts_non_finite_official_losses(tmp_path, dhkd_cache):  # noqa: F811
    """At tau = 0.05 gaps past 16.6 tau (0.83) are everywhere: the official loss is inf in every step, the
    run goes on (finite gradients) and counts the steps; the exact loss stays finite."""
    from dhkd.train import Trainer
    over = FAST + ["train.epochs=1", "train.max_steps_per_epoch=4", "train.log_every=2", "train.eval_teacher=false",
                   "loss.logit_temperature=0.05", "loss.backend=reference"]
    rows = {}
    for numerics in ("official", "exact"):
        cfg = load_config(CONFIGS / "mnist1d/dhkd.yaml", over + [f"loss.numerics={numerics}"])
        trainer = Trainer(cfg, tmp_path / numerics, log=lambda m: None)
        final = trainer.fit()
        assert math.isfinite(final["val/acc1_main"])
        assert all(torch.isfinite(p).all() for p in trainer.student.parameters())
        rows[numerics] = [r for r in trainer.metrics.rows() if r["kind"] == "train"]
    assert [r["nonfinite_steps"] for r in rows["official"]] == [2, 2]
    assert all(r["loss"] == math.inf for r in rows["official"])
    assert [r["nonfinite_steps"] for r in rows["exact"]] == [0, 0]
    assert all(math.isfinite(r["loss"]) for r in rows["exact"])


def test_non_finite_steps_are_counted_over_all_ranks():
    """Under torchrun the train rows average the window over the ranks (the trainer's rule); a step whose
    loss is not finite on one rank of two is still one non-finite step (it counted as 0.5, rounded to 0:
    the row's loss was inf with nonfinite_steps 0). Emulated: rank 0's window plus another rank's values."""
    from dhkd.train import Trainer
    trainer = Trainer.__new__(Trainer)
    trainer.world_size, trainer.device = 2, torch.device("cpu")
    other = {"loss": 3.0, "ce": 1.0, "bad": [0.0, 1.0, 0.0]}  # rank 1: a non-finite loss in step 2
    trainer.all_reduce = lambda t: t + torch.tensor([other["ce"], other["loss"], *other["bad"]], dtype=t.dtype)
    sums = {"loss": torch.tensor(6.0), "ce": torch.tensor(2.0)}
    bad = [torch.tensor(0.0), torch.tensor(0.0), torch.tensor(1.0)]  # rank 0: step 3
    means = trainer._window_means(sums, bad)
    assert means == {"loss": 1.5, "ce": 0.5, "nonfinite_steps": 2}
    trainer.world_size = 1
    assert trainer._window_means(sums, bad) == {"loss": 2.0, "ce": 2.0 / 3, "nonfinite_steps": 1}


# ---------------------------------------------------------------- the clamp's gradient rule (issue 20)

HI = 1 - 1e-8


@pytest.mark.parametrize("rule, passes", [("exact", False), ("rounded", True)])
def test_clamp_rules_at_the_float32_bound(rule, passes):
    """s = 1.0 in float32 is the rounded bound: torch 2.1.2's rule (rounded) passes the gradient, the
    installed torch's rule (exact) does not; inside the bounds both pass it, far outside neither does."""
    from dhkd.official import clamp
    s = torch.tensor([1.0, 0.5, 1e-9], requires_grad=True)
    grad, = torch.autograd.grad(clamp(s, 1e-8, HI, rule).sum(), s)
    assert grad.tolist() == [1.0 if passes else 0.0, 1.0, 0.0]
    assert torch.equal(clamp(s, 1e-8, HI, rule), s.detach().clamp(1e-8, HI))


def test_the_exact_rule_is_the_installed_torch_clamp():
    """``official`` emulates the installed torch: its clamp passes no gradient at s = 1.0 (float32) either.
    If this fails, the installed torch changed its rule and docs/results/mnist1d100.md's note is stale."""
    s = torch.tensor([1.0, 0.5], requires_grad=True)
    grad, = torch.autograd.grad(s.clamp(min=1e-8, max=HI).sum(), s)
    assert grad.tolist() == [0.0, 1.0]


@pytest.mark.parametrize("fn", [official_binary_kl, official_binary_kl_norm])
def test_torch21_rule_turns_a_saturated_logit_into_a_nan_gradient(fn):
    """Past 16.6 tau: no gradient under ``official``, a nan gradient under ``official_torch21``; below it
    the two rules agree."""
    t = torch.zeros(1, 2)
    z = (torch.tensor([[16.8, 3.0]]) * TAU).requires_grad_(True)
    g_exact, = torch.autograd.grad(fn(z, t, TAU, clamp_rule="exact"), z)
    g_21, = torch.autograd.grad(fn(z, t, TAU, clamp_rule="rounded"), z)
    assert g_exact[0, 0].item() == 0.0 and math.isnan(g_21[0, 0].item())
    assert g_exact[0, 1].item() == g_21[0, 1].item() > 0


def test_official_torch21_numerics_in_the_config():
    cfg = load_config(CONFIGS / "mnist1d" / "dhkd.yaml", ["loss.numerics=official_torch21", "loss.backend=reference"])
    assert cfg.loss.numerics == "official_torch21"
    with pytest.raises(ConfigError, match="loss.numerics=official_torch21"):
        load_config(CONFIGS / "mnist1d" / "dhkd.yaml", ["loss.numerics=official_torch21", "loss.backend=torch"])
    with pytest.raises(ConfigError, match="loss.numerics"):
        load_config(CONFIGS / "mnist1d" / "dhkd.yaml", ["loss.numerics=torch21", "loss.backend=reference"])
