"""Distillers: one small module per run that turns a batch into named losses through
``dhkd_kernels.fused_dual_head_kd_loss`` (the (N, C) logits are never materialized in training).

Methods (``method:`` in the config), with W1 the main head, W2 the auxiliary head, f the backbone
features and t the teacher's logits:

    ce            ce_weight CE(W1 f, y)                                        (no teacher)
    kd            ce_weight CE(W1 f, y) + kd_weight KD_T(W1 f, t)
    binary_kl     logit_weight L_tau(W1 f, t)                                  (one head)
    ce_binary_kl  ce_weight CE(W1 f, y) + logit_weight L_tau(W1 f, t)         (one head: collapses)
    dhkd          ce_weight CE(W1 f, y) + kd_weight KD_T(W1 f, t) + logit_weight L_tau(W2 a, t)
                  with a = f (linear aux head) or the aux MLP's hidden output.

L is BinaryKL-Norm or BinaryKL (``loss.logit_loss``). Single-head methods pass W1 as both the head and
the auxiliary weights; the fused loss then returns the summed gradient. Weights of terms a method does
not use are ignored. ``loss.logit_weight_off_epoch`` sets the logit weight to 0 from that epoch on.

Label smoothing eps replaces CE by (1 - eps) CE + eps U with U = -mean_c log softmax(z1)_c. The fused
loss has no smoothing term, so U comes from a second fused call: with zero teacher logits and T = 1 its
KD term is KD = U - log C, hence U = KD + log C (same gradient).

Gradient alignment (``loss.ga``, method dhkd): with G_p = dL_prob/df and G_l = dL_logit/df, the
gradients of the probability-level terms (CE, KD) and of the logit term w.r.t. the backbone's output
features (N, D), if <G_l, G_p> < 0 (one inner product over the micro-batch) G_l is replaced by its
projection onto the normal plane of G_p, G_l - <G_l, G_p>/|G_p|^2 G_p. The heads (and the aux MLP)
keep their own gradients; the backbone receives G_p + G_l. Two backward passes through the heads, one
through the backbone.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from dhkd_kernels import fused_dual_head_kd_loss

from .config import METHODS, LossConfig

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
    alignment needs its own). ``forward(images)`` is inference with the main head.
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
        """(ce, kd, logit) weights of this method at ``epoch`` (0-based)."""
        c = self.cfg
        logit = c.logit_weight
        if c.logit_weight_off_epoch is not None and epoch >= c.logit_weight_off_epoch:
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
        if c.backend == "reference":  # plain autograd in the weights' dtype, outside autocast (A/B)
            f = f.to(w1.dtype)
            af = None if af is None else af.to(w2.dtype)
            context = torch.autocast(f.device.type, enabled=False)
        else:  # the fused loss casts its matmul operands to the autocast dtype, loss math in fp32
            context = self.autocast()
        with context:
            return fused_dual_head_kd_loss(
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
    def forward_train(self, images: torch.Tensor, labels: torch.Tensor, epoch: int = 0):
        """(None, losses) for one batch: ``losses["loss"]`` has a graph, the rest are detached."""
        t = self.teacher_logits(images, self.student.head.out_features)
        with self.autocast():
            f = self.features(images)
        a = self._aux(f)
        loss, _, comps = self._prob_and_logit(f, a, t, labels, epoch, split=False)
        comps["loss"] = loss
        return None, comps

    def train_step(self, images: torch.Tensor, labels: torch.Tensor, epoch: int = 0,
                   scale: float = 1.0) -> dict:
        """Forward + backward of ``scale * loss`` (grads accumulate); returns detached losses."""
        if not (self.cfg.ga or self.grad_probe):
            _, out = self.forward_train(images, labels, epoch)
            (out["loss"] * scale).backward()
            out["loss"] = out["loss"].detach()
            return out
        t = self.teacher_logits(images, self.student.head.out_features)
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


def build_distiller(student, teacher, cfg, *, autocast=None) -> Distiller:
    """The ``Distiller`` for ``cfg.method`` / ``cfg.loss`` (a ``dhkd.config.Config``)."""
    return Distiller(student, None if cfg.method == "ce" else teacher, cfg.loss, cfg.method,
                     autocast=autocast)
