"""Distillers: the training loss equals dhkd_kernels.reference, gradients (GA included) match autograd,
and every method lowers its loss on MNIST-1D."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from dhkd.config import load_config
from dhkd.distill import Distiller
from dhkd.models import build_student, build_teacher
from dhkd.train import Trainer
from dhkd_kernels import reference
from tests.trainer_helpers import CONFIGS, FAST, dhkd_cache  # noqa: F401

METHODS = ["ce", "kd", "binary_kl", "ce_binary_kl", "dhkd"]


def make(method, *, aux_head="linear", **loss):
    cfg = load_config(CONFIGS / f"mnist1d/{method}.yaml", FAST + [f"student.aux_head={aux_head}"] +
                      [f"loss.{k}={v}" for k, v in loss.items()])
    torch.manual_seed(0)
    student = build_student("mnist1d_mlp", num_classes=10, aux_head=aux_head).double()
    teacher = build_teacher("mnist1d_cnn", num_classes=10).double()
    return Distiller(student, None if method == "ce" else teacher, cfg.loss, method), cfg


def batch(n=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 40, generator=g, dtype=torch.float64), torch.randint(0, 10, (n,), generator=g)


def oracle(d: Distiller, x, y, epoch=0):
    """The method's loss from the reference definitions (and F.cross_entropy for label smoothing)."""
    s = d.student
    f, a = s.forward_features(x)
    t = d.teacher(x) if d.teacher is not None else torch.zeros(x.shape[0], 10, dtype=x.dtype)
    ce_w, kd_w, lg_w = d.loss_weights(epoch)
    eps = d.cfg.label_smoothing
    two = d.method == "dhkd"
    w2, b2 = (s.aux_head.weight, s.aux_head.bias) if two else (s.head.weight, s.head.bias)
    loss = reference.dual_head_kd_loss(
        f, s.head.weight, s.head.bias, w2, b2, t, y, aux_features=a if two else None, ce_weight=0.0,
        kd_weight=kd_w, logit_weight=lg_w, kd_temperature=d.cfg.kd_temperature,
        logit_temperature=d.cfg.logit_temperature, logit_loss=d.cfg.logit_loss)
    return loss + ce_w * F.cross_entropy(s.head(f), y, label_smoothing=eps)


CASES = [(m, {}) for m in METHODS] + [
    ("dhkd", {"kd_weight": 0.5}), ("dhkd", {"label_smoothing": 0.1}), ("kd", {"label_smoothing": 0.2}),
    ("dhkd", {"logit_loss": "binary_kl"}), ("dhkd", {"backend": "reference"})]


def run_against_oracle(d, x, y, *, seed):
    """Backward through ``d.forward_train`` and through ``oracle`` on a deep copy, with the same RNG
    (dropout); returns (losses, oracle loss, the copy holding the oracle's gradients)."""
    ref = copy.deepcopy(d)
    torch.manual_seed(seed)
    _, out = d.forward_train(x, y)
    out["loss"].backward()
    torch.manual_seed(seed)
    expected = oracle(ref, x, y)
    expected.backward()
    return out, expected, ref


@pytest.mark.parametrize("method, loss", CASES)
@pytest.mark.parametrize("aux_head", ["linear", "mlp"])
def test_loss_and_grads_equal_reference(method, loss, aux_head):
    d, _ = make(method, aux_head=aux_head, **loss)
    x, y = batch()
    d.train()
    out, expected, ref_model = run_against_oracle(d, x, y, seed=5)
    torch.testing.assert_close(out["loss"], expected, rtol=1e-10, atol=1e-10)
    for (name, p), q in zip(d.student.named_parameters(), ref_model.student.parameters()):
        if q.grad is None:
            assert p.grad is None or p.grad.abs().max() == 0, name
        else:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-8, atol=1e-10, msg=name)
    assert int(out["n_valid"]) == 32
    assert int(out["correct"]) == int((ref_model.student(x).argmax(1) == y).sum())


def test_logit_weight_off_epoch_is_the_official_one_based_rule():
    """off_epoch 50: alpha = 0 once the 1-based epoch >= 50, so 1-based epochs 1-49 (0-based 0-48) keep it."""
    d, _ = make("dhkd", logit_weight=0.1, logit_weight_off_epoch=50)
    on = [e for e in range(100) if d.loss_weights(e)[2] == 0.1]
    assert on == list(range(49))
    assert all(d.loss_weights(e) == (1.0, 0.0, 0.0) for e in range(49, 100))
    x, y = batch()
    _, out = d.forward_train(x, y, epoch=49)
    torch.testing.assert_close(out["loss"], out["ce"], rtol=1e-12, atol=1e-12)
    _, out = d.forward_train(x, y, epoch=48)
    torch.testing.assert_close(out["loss"], out["ce"] + 0.1 * out["logit"], rtol=1e-12, atol=1e-12)


def test_logit_weight_off_epoch_in_the_trainer_log(tmp_path, dhkd_cache):  # noqa: F811
    cfg = load_config(CONFIGS / "mnist1d/dhkd.yaml", FAST + [
        "train.epochs=3", "train.eval_teacher=false", "train.log_every=1000", "loss.logit_weight=0.5",
        "loss.logit_weight_off_epoch=3", "train.max_steps_per_epoch=2"])
    trainer = Trainer(cfg, tmp_path, log=lambda m: None)
    trainer.fit()
    rows = [r for r in trainer.metrics.rows() if r["kind"] == "train"]
    assert [(r["epoch"], r["logit_weight"]) for r in rows] == [(1, 0.5), (2, 0.5), (3, 0.0)]
    assert rows[0]["logit"] > 0 and "logit" not in rows[-1]  # a switched-off term is not logged
    assert math.isclose(rows[-1]["loss"], rows[-1]["ce"], rel_tol=1e-5)


def parameter_space_ga_oracle(d: Distiller, x, y, t):
    """The official gradient alignment written out by hand on a copy: g0, g1 flattened over all student
    parameters, g1 projected off g0 when they conflict; returns ({name: grad}, <g1, g0>, cos)."""
    ref = copy.deepcopy(d)
    s = ref.student
    f, a = s.forward_features(x)
    l_prob = F.cross_entropy(s.head(f), y)
    l_logit = reference.binary_kl_norm(s.aux_logits(f, a), t, 2.0).mean()
    names = [n for n, _ in s.named_parameters()]
    params = list(s.parameters())
    flat = []
    for loss in (l_prob, l_logit):
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        flat.append(torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(params, grads)]))
    g0, g1 = flat
    dot = g1 @ g0
    cos = dot / (g0.norm() * g1.norm())
    if dot < 0:
        g1 = g1 - dot / (g0 @ g0) * g0
    total = g0 + g1
    out, k = {}, 0
    for n, p in zip(names, params):
        out[n] = total[k:k + p.numel()].view_as(p)
        k += p.numel()
    return out, dot, cos


def conflicting_teacher(d: Distiller, x, y, sign: float):
    """Teacher logits that agree (sign=+1) or disagree (sign=-1) with the labels: the aux head's logits
    plus sign * 8 on the label. A linear aux head starts as a copy of the main head, so the logit term pulls
    the backbone along (+1) or against (-1) CE."""
    s = d.student
    with torch.no_grad():
        if s.aux_mlp is None:
            s.aux_head.weight.copy_(s.head.weight)
            s.aux_head.bias.copy_(s.head.bias)
        f, a = s.forward_features(x)
        return s.aux_logits(f, a) + sign * 8.0 * F.one_hot(y, 10).double()


@pytest.mark.parametrize("aux_head", ["linear", "mlp"])
@pytest.mark.parametrize("sign", [-1.0, 1.0])
def test_gradient_alignment_is_the_official_parameter_space_projection(aux_head, sign):
    d, _ = make("dhkd", aux_head=aux_head, ga="true")
    d.eval()  # no dropout: the oracle's forward is the same function
    x, y = batch(64)
    t = conflicting_teacher(d, x, y, sign)
    expected, dot, cos = parameter_space_ga_oracle(d, x, y, t)
    assert (dot < 0) == (sign < 0), float(dot)  # both branches of the projection are exercised
    out = d.train_step(x, y, teacher_logits=t)
    for n, p in d.student.named_parameters():
        torch.testing.assert_close(p.grad, expected[n], rtol=1e-8, atol=1e-12, msg=n)
    torch.testing.assert_close(out["ga_cos"], cos, rtol=1e-8, atol=1e-12)
    assert float(out["ga_conflict"]) == float(sign < 0)


def test_gradient_alignment_accumulates_into_existing_grads_with_scale():
    d, _ = make("dhkd", ga="true")
    d.eval()
    x, y = batch(64)
    t = conflicting_teacher(d, x, y, -1.0)
    expected, _, _ = parameter_space_ga_oracle(d, x, y, t)
    for p in d.student.parameters():
        p.grad = torch.ones_like(p)
    d.train_step(x, y, scale=0.25, teacher_logits=t)
    for n, p in d.student.named_parameters():
        torch.testing.assert_close(p.grad, 1 + 0.25 * expected[n], rtol=1e-8, atol=1e-12, msg=n)


def test_parameter_and_feature_space_alignment_differ_on_a_conflict():
    """The two variants agree without a conflict and differ with one: the official projection also moves
    the heads' gradients, the feature-space one never does."""
    d, _ = make("dhkd", ga="true")
    d.eval()
    x, y = batch(64)
    t = conflicting_teacher(d, x, y, -1.0)
    feat = copy.deepcopy(d)
    feat.cfg = copy.deepcopy(d.cfg)
    feat.cfg.ga_space = "features"
    out_p = d.train_step(x, y, teacher_logits=t)
    out_f = feat.train_step(x, y, teacher_logits=t)
    assert float(out_p["ga_conflict"]) == 1.0
    gp, gf = d.student.head.weight.grad, feat.student.head.weight.grad
    assert (gp - gf).norm() > 0.01 * gf.norm()
    torch.testing.assert_close(out_p["grad_cos"], out_f["grad_cos"], rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("aux_head", ["linear", "mlp"])
def test_feature_space_alignment_projects_conflicting_backbone_gradient(aux_head):
    d, _ = make("dhkd", aux_head=aux_head, ga="true", ga_space="features")
    x, y = batch(64)
    ref = copy.deepcopy(d)
    torch.manual_seed(3)
    out = d.train_step(x, y)

    s = ref.student
    torch.manual_seed(3)
    f = s.backbone(x)
    a = s.aux_mlp(f) if s.aux_mlp is not None else f
    t = ref.teacher(x)
    l_prob = F.cross_entropy(s.head(f), y)
    l_logit = reference.binary_kl_norm(s.aux_head(a), t, 2.0).mean()
    g_p, = torch.autograd.grad(l_prob, f, retain_graph=True)
    g_l, = torch.autograd.grad(l_logit, f, retain_graph=True)
    dot = (g_p * g_l).sum()
    assert dot < 0  # this batch has conflicting gradients, so the projection is exercised
    if dot < 0:
        g_l = g_l - dot / (g_p * g_p).sum() * g_p
    heads = list(s.head.parameters()) + list(s.aux_head.parameters()) + \
        (list(s.aux_mlp.parameters()) if s.aux_mlp is not None else [])
    head_grads = torch.autograd.grad(l_prob + l_logit, heads, retain_graph=True)
    bb = list(s.backbone.parameters())
    bb_grads = torch.autograd.grad(f, bb, g_p + g_l)
    got = dict(d.student.named_parameters())
    names = {id(p): n for n, p in s.named_parameters()}
    for p, g in list(zip(heads, head_grads)) + list(zip(bb, bb_grads)):
        torch.testing.assert_close(got[names[id(p)]].grad, g, rtol=1e-8, atol=1e-12, msg=names[id(p)])
    cos = dot / (g_p.norm() * torch.autograd.grad(l_logit, f, retain_graph=True)[0].norm())
    torch.testing.assert_close(out["grad_cos"], cos, rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(out["loss"], (l_prob + l_logit).detach(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("space", ["params", "features"])
@pytest.mark.parametrize("sign", [-1.0, 1.0])  # -1: conflicting gradients, +1: aligned ones
def test_gradient_alignment_changes_nothing_without_conflict(space, sign):
    """Two copies, one with GA: the grads agree with plain DHKD exactly when there is no conflict."""
    d_plain, _ = make("dhkd")
    d_plain.eval()
    x, y = batch(64)
    t = conflicting_teacher(d_plain, x, y, sign)
    d_ga = copy.deepcopy(d_plain)
    d_ga.cfg = copy.deepcopy(d_plain.cfg)
    d_ga.cfg.ga, d_ga.cfg.ga_space = True, space
    out = d_ga.train_step(x, y, teacher_logits=t)
    d_plain.train_step(x, y, teacher_logits=t)
    same = all(torch.allclose(p.grad, q.grad, rtol=1e-9, atol=1e-12)
               for p, q in zip(d_plain.student.parameters(), d_ga.student.parameters()))
    assert float(out["ga_conflict"]) == float(sign < 0)
    assert same == (sign > 0)


@pytest.mark.parametrize("method, extra", [(m, []) for m in METHODS] + [
    ("dhkd", ["loss.ga=true", "student.aux_head=mlp"]), ("kd", ["loss.label_smoothing=0.1"])])
def test_each_method_lowers_its_loss_on_mnist1d(method, extra, tmp_path, dhkd_cache):  # noqa: F811
    cfg = load_config(CONFIGS / f"mnist1d/{method}.yaml",
                      FAST + extra + ["train.epochs=3", "train.eval_teacher=false"])
    trainer = Trainer(cfg, tmp_path, log=lambda m: None)
    final = trainer.fit()
    rows = [r for r in trainer.metrics.rows() if r["kind"] == "train"]
    assert len(rows) >= 10
    first = sum(r["loss"] for r in rows[:2]) / 2
    last = sum(r["loss"] for r in rows[-2:]) / 2
    assert last < 0.8 * first, (first, last)
    assert final["val/acc1_main"] > 30  # chance is 10%


def test_trainer_step_loss_equals_reference(tmp_path, dhkd_cache):  # noqa: F811
    """The loss the training loop records for its first batch equals the reference loss of that batch."""
    cfg = load_config(CONFIGS / "mnist1d/dhkd.yaml", FAST + ["loss.kd_weight=0.3"])
    trainer = Trainer(cfg, tmp_path, log=lambda m: None)
    trainer.data.train.set_epoch(0)
    x, y = next(iter(trainer.data.train))
    x = trainer.data.prepare(x, trainer.device)
    s = trainer.student
    with torch.no_grad():
        f = s.backbone(x)
        t = trainer.teacher(x)
        expected = reference.dual_head_kd_loss(
            f.double(), s.head.weight.double(), s.head.bias.double(), s.aux_head.weight.double(),
            s.aux_head.bias.double(), t.double(), y, ce_weight=1.0, kd_weight=0.3, logit_weight=1.0,
            kd_temperature=4.0, logit_temperature=2.0)
    stats = trainer.train_step([(x, y)], 0)
    torch.testing.assert_close(stats["loss"].double(), expected, rtol=1e-5, atol=1e-5)


def test_teacher_stays_in_eval_mode():
    d, _ = make("kd")
    d.train()
    assert d.student.training and not d.teacher.training
    assert not any(p.requires_grad for p in d.teacher.parameters())


@pytest.mark.parametrize("method", ["dhkd", "ce_binary_kl"])
def test_triton_backend_matches_reference(method):
    """Through the Triton kernels (the interpreter on a CPU) when dhkd_kernels ships them."""
    pytest.importorskip("dhkd_kernels.ops.dual_head_kd")
    import os
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton on CPU needs TRITON_INTERPRET=1")
    d, _ = make(method, aux_head="mlp", backend="triton", kd_weight=0.5)
    d = d.float()
    x, y = batch(16)
    x = x.float()
    out, expected, ref = run_against_oracle(d, x, y, seed=2)
    torch.testing.assert_close(out["loss"], expected, rtol=1e-4, atol=1e-4)
    for p, q in zip(d.student.parameters(), ref.student.parameters()):
        if q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-3, atol=1e-5)
