"""Distillers: one small module per run that turns a batch into named losses through
``dhkd_kernels.fused_dual_head_kd_loss`` (the (N, C) logits are never materialized in training).

Methods (``method:`` in the config), with W1 the main head, W2 the auxiliary head, f the backbone
features and t the teacher's logits:

    ce            ce_weight CE(W1 f, y)                                        (no teacher)
    kd            ce_weight CE(W1 f, y) + kd_weight KD_T(W1 f, t)
    binary_kl     logit_weight L_tau(W1 f, t)                                  (one head)
    ce_binary_kl  ce_weight CE(W1 f, y) + logit_weight L_tau(W1 f, t)         (one head, both losses)
    dhkd          ce_weight CE(W1 f, y) + kd_weight KD_T(W1 f, t) + logit_weight L_tau(W2 a, t)
                  with a = f (linear aux head) or the aux MLP's hidden output.

L is BinaryKL-Norm or BinaryKL (``loss.logit_loss``). Single-head methods pass W1 as both the head and
the auxiliary weights; the fused loss then returns the summed gradient. Weights of terms a method does
not use are ignored. ``loss.logit_weight_off_epoch`` = E sets the logit weight to 0 once the 1-based
epoch is >= E (the official ImageNet rule: E = 50 trains epochs 1-49 with the logit loss).
``loss.numerics: official`` (or ``official_torch21``: torch 2.1.2's clamp gradient) computes every term with
the official code's clamped formulas (``dhkd.official``) through autograd instead of ``fused_dual_head_kd_loss``.

Label smoothing eps replaces CE by (1 - eps) CE + eps U with U = -mean_c log softmax(z1)_c. The fused
loss has no smoothing term, so U comes from a second fused call: with zero teacher logits and T = 1 its
KD term is KD = U - log C, hence U = KD + log C (same gradient).

Gradient alignment (``loss.ga``, method dhkd), the official algorithm (``loss.ga_space: params``): with
g0 = d(prob-level terms: CE, KD)/dtheta and g1 = d(logit term)/dtheta flattened over all student
parameters theta (backbone, both heads, the aux MLP), if <g1, g0> < 0 then g1 <- g1 - <g1, g0>/|g0|^2 g0;
the parameters receive g0 + g1. One forward, two backward passes through the whole student. Each
micro-batch projects its own gradients (with ``train.accum_steps`` > 1 or several processes the
projection acts on micro-batch gradients, which are then summed/averaged).
``loss.ga_space: features`` projects the same way at the backbone output instead: G_p = dL_prob/df and
G_l = dL_logit/df (N, D) with one inner product over the micro-batch; the heads keep their own gradients
and the backbone receives G_p + G_l (two backward passes through the heads, one through the backbone).
"""
from __future__ import annotations

import functools
import math

import torch
from torch import nn

from dhkd_kernels import fused_dual_head_kd_loss

from .config import METHODS, LossConfig
from .official import official_dual_head_loss

SINGLE_HEAD = ("ce", "kd", "binary_kl", "ce_binary_kl")


class StudentFeatures(nn.Module):
    """``forward(x)`` = the student's backbone features (N, D): the part a DDP wrapper would own."""

    def __init__(self, student: nn.Module):
        super().__init__()
        self.student = student

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.student.backbone(x)
        if f.dim() != 2:
            raise ValueError(f"the backbone must return pooled features (N, D); got {tuple(f.shape)}")
        return f


class Distiller(nn.Module):
    """Student (trainable ``DualHeadStudent``) + frozen teacher + the method's loss.

    ``forward_train(images, labels, epoch)`` -> ``(None, losses)``: ``losses["loss"]`` is the total
    (with graph), the other entries are detached: ``ce``, ``kd``, ``logit`` (unweighted), ``correct``
    and ``n_valid`` (main-head top-1 count). ``train_step`` also runs the backward pass(es) (gradient
    alignment needs its own). ``forward(images)`` is inference with the main head. Both take
    ``teacher_logits=`` (N, C) to use precomputed teacher logits instead of running the teacher.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module | None, loss: LossConfig, method: str,
                 *, autocast=None):
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if method != "ce" and teacher is None:
            raise ValueError(f"method {method!r} needs a teacher")
        self.student = student
        self.teacher = teacher
        self.features = StudentFeatures(student)
        self.teacher_forward = teacher  # the teacher, or its torch.compile wrapper
        self.cfg = loss
        self.method = method
        self.autocast = autocast or (lambda: torch.autocast("cpu", enabled=False))
        self.grad_probe = False  # when True, every train_step reports "grad_cos" (diagnostics hook)

    # ---------------------------------------------------------------- weights
    @property
    def uses_aux_head(self) -> bool:
        return self.method == "dhkd"

    def loss_weights(self, epoch: int) -> tuple[float, float, float]:
        """(ce, kd, logit) weights of this method at ``epoch`` (0-based, so the 1-based epoch is epoch + 1)."""
        c = self.cfg
        logit = c.logit_weight
        if c.logit_weight_off_epoch is not None and epoch + 1 >= c.logit_weight_off_epoch:
            logit = 0.0
        return {"ce": (c.ce_weight, 0.0, 0.0), "kd": (c.ce_weight, c.kd_weight, 0.0),
                "binary_kl": (0.0, 0.0, logit), "ce_binary_kl": (c.ce_weight, 0.0, logit),
                "dhkd": (c.ce_weight, c.kd_weight, logit)}[self.method]

    def train(self, mode: bool = True):
        """Train/eval mode of the student; the teacher always stays in eval mode."""
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    # ---------------------------------------------------------------- pieces
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.student(images)

    @torch.no_grad()
    def teacher_logits(self, images: torch.Tensor, num_classes: int) -> torch.Tensor:
        if self.teacher_forward is None:
            return images.new_zeros((images.shape[0], num_classes), dtype=torch.float32)
        with self.autocast():
            return self.teacher_forward(images)

    def _aux(self, f: torch.Tensor) -> torch.Tensor | None:
        mlp = getattr(self.student, "aux_mlp", None)
        if not self.uses_aux_head or mlp is None:
            return None
        with self.autocast():
            return mlp(f)

    def _fused(self, f, a, t, labels, ce, kd, logit, *, components=True, smoothing_only=False):
        """One ``fused_dual_head_kd_loss`` call with this method's heads: under the trainer's autocast
        (bf16 matmul operands on GPU, as ``F.linear`` would get), except for the reference backend."""
        s = self.student
        w1, b1 = s.head.weight, s.head.bias
        if self.uses_aux_head and not smoothing_only:
            w2, b2, af = s.aux_head.weight, s.aux_head.bias, a
        else:
            w2, b2, af = w1, b1, None
        c = self.cfg
        loss_fn = fused_dual_head_kd_loss
        if c.numerics != "exact":
            loss_fn = functools.partial(official_dual_head_loss, numerics=c.numerics)
        if c.backend == "reference":  # plain autograd in the weights' dtype, outside autocast (A/B)
            f = f.to(w1.dtype)
            af = None if af is None else af.to(w2.dtype)
            context = torch.autocast(f.device.type, enabled=False)
        else:  # the fused loss casts its matmul operands to the autocast dtype, loss math in fp32
            context = self.autocast()
        with context:
            return loss_fn(
                f, w1, b1, w2, b2, t, labels, aux_features=af, ce_weight=ce, kd_weight=kd,
                logit_weight=logit, kd_temperature=1.0 if smoothing_only else c.kd_temperature,
                logit_temperature=c.logit_temperature, logit_loss=c.logit_loss, backend=c.backend,
                return_components=components)

    def _prob_and_logit(self, f, a, t, labels, epoch, *, split: bool):
        """Losses of the batch; with ``split`` the probability-level and logit terms come separately.

        Returns (prob_loss, logit_loss or None, components); prob_loss includes the logit term when
        not split.
        """
        ce_w, kd_w, lg_w = self.loss_weights(epoch)
        eps = self.cfg.label_smoothing if ce_w else 0.0
        a_main = a.detach() if split and a is not None else a  # the prob-level terms do not use it
        main, comps = self._fused(f, a_main, t, labels, ce_w * (1 - eps), kd_w, 0.0 if split else lg_w)
        comps = dict(comps)
        if eps:
            zeros = torch.zeros_like(t, dtype=torch.float32)
            smooth, sc = self._fused(f, None, zeros, labels, 0.0, ce_w * eps, 0.0, smoothing_only=True)
            log_c = math.log(t.shape[1])
            main = main + smooth + ce_w * eps * log_c
            comps["smooth"] = sc["kd"] + log_c
        logit = None
        if split and lg_w:
            logit = self._fused(f, a, t, labels, 0.0, 0.0, lg_w, components=False)
        return main, logit, comps

    # ---------------------------------------------------------------- API
    def _teacher(self, images, teacher_logits):
        if teacher_logits is not None:
            return teacher_logits.detach()
        return self.teacher_logits(images, self.student.head.out_features)

    def forward_train(self, images: torch.Tensor, labels: torch.Tensor, epoch: int = 0, *,
                      teacher_logits: torch.Tensor | None = None):
        """(None, losses) for one batch: ``losses["loss"]`` has a graph, the rest are detached."""
        t = self._teacher(images, teacher_logits)
        with self.autocast():
            f = self.features(images)
        a = self._aux(f)
        loss, _, comps = self._prob_and_logit(f, a, t, labels, epoch, split=False)
        comps["loss"] = loss
        return None, comps

    def train_step(self, images: torch.Tensor, labels: torch.Tensor, epoch: int = 0,
                   scale: float = 1.0, *, teacher_logits: torch.Tensor | None = None) -> dict:
        """Forward + backward of ``scale * loss`` (grads accumulate); returns detached losses.

        With gradient alignment also ``ga_conflict`` (1.0 when this step projected) and, in parameter
        space, ``ga_cos`` = cos(g0, g1) before the projection; with GA or ``grad_probe``, ``grad_cos`` =
        cos(G_p, G_l) at the backbone output (unprojected).
        """
        if not (self.cfg.ga or self.grad_probe):
            _, out = self.forward_train(images, labels, epoch, teacher_logits=teacher_logits)
            (out["loss"] * scale).backward()
            out["loss"] = out["loss"].detach()
            return out
        t = self._teacher(images, teacher_logits)
        if self.cfg.ga and self.cfg.ga_space == "params":
            return self._step_params(images, labels, epoch, scale, t)
        with self.autocast():
            f = self.features(images)
        fd = f.detach().requires_grad_(True)
        a = self._aux(fd)
        prob, logit, comps = self._prob_and_logit(fd, a, t, labels, epoch, split=True)
        (prob * scale).backward()
        acc = torch.promote_types(fd.dtype, torch.float32)
        g_p = fd.grad.to(acc)
        fd.grad = None
        total = prob.detach()
        if logit is not None:
            (logit * scale).backward()
            g_l = fd.grad.to(acc)
            total = total + logit.detach()
            dot = (g_l * g_p).sum()
            gp2 = (g_p * g_p).sum()
            comps["grad_cos"] = dot / (gp2.sqrt() * (g_l * g_l).sum().sqrt()).clamp_min(1e-30)
            if self.cfg.ga:
                coef = torch.where(dot < 0, dot / gp2.clamp_min(1e-30), torch.zeros_like(dot))
                g_l = g_l - coef * g_p
                comps["ga_conflict"] = (dot < 0).float()
            g = g_p + g_l
        else:
            g = g_p
        f.backward(g.to(f.dtype))
        comps["loss"] = total
        return comps

    def _step_params(self, images, labels, epoch, scale, t) -> dict:
        """The official gradient alignment: project g1 (logit term) off g0 (CE, KD) over all student
        parameters when <g1, g0> < 0, then accumulate g0 + g1 into ``.grad``."""
        with self.autocast():
            f = self.features(images)
        a = self._aux(f)
        prob, logit, comps = self._prob_and_logit(f, a, t, labels, epoch, split=True)
        comps["loss"] = prob.detach()
        if logit is None:  # logit weight 0 this epoch: nothing to align
            (prob * scale).backward()
            return comps
        comps["loss"] = comps["loss"] + logit.detach()
        params = [p for p in self.student.parameters() if p.requires_grad]
        g0 = torch.autograd.grad(prob * scale, params + [f], retain_graph=True, allow_unused=True)
        g1 = torch.autograd.grad(logit * scale, params + [f], allow_unused=True)
        acc = torch.promote_types(params[0].dtype, torch.float32)

        def dots(xs, ys):
            terms = [(x.to(acc) * y.to(acc)).sum() for x, y in zip(xs, ys) if x is not None and y is not None]
            return torch.stack(terms).sum() if terms else torch.zeros((), dtype=acc, device=f.device)

        dot, n0, n1 = dots(g0[:-1], g1[:-1]), dots(g0[:-1], g0[:-1]), dots(g1[:-1], g1[:-1])
        comps["ga_cos"] = dot / (n0.sqrt() * n1.sqrt()).clamp_min(1e-30)
        fp, fl = dots(g0[-1:], g1[-1:]), dots(g0[-1:], g0[-1:]).sqrt() * dots(g1[-1:], g1[-1:]).sqrt()
        comps["grad_cos"] = fp / fl.clamp_min(1e-30)
        conflict = dot < 0
        comps["ga_conflict"] = conflict.float()
        coef = torch.where(conflict, dot / n0.clamp_min(1e-30), torch.zeros_like(dot))
        for p, a0, a1 in zip(params, g0[:-1], g1[:-1]):  # g0 + (g1 - coef g0)
            if a0 is None and a1 is None:
                continue
            g = torch.zeros_like(p, dtype=acc)
            if a0 is not None:
                g = g + (1 - coef) * a0.to(acc)
            if a1 is not None:
                g = g + a1.to(acc)
            g = g.to(p.dtype)
            p.grad = g if p.grad is None else p.grad + g
        return comps


def build_distiller(student, teacher, cfg, *, autocast=None) -> Distiller:
    """The ``Distiller`` for ``cfg.method`` / ``cfg.loss`` (a ``dhkd.config.Config``)."""
    return Distiller(student, None if cfg.method == "ce" else teacher, cfg.loss, cfg.method,
                     autocast=autocast)
