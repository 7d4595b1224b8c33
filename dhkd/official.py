"""The official DHKD code's loss formulas, float-for-float, for reproduction (``loss.numerics: official``
and ``official_torch21``).

Plain PyTorch through autograd on materialized (N, C) logits, in the inputs' dtype; ``dhkd_kernels``
stays exact. With s = sig(., clamped to [eps, 1 - eps]), eps = 1e-8, and KL(p, log q) = p (log p - log q)
with 0 log 0 = 0 (``F.kl_div``, as the official ``KLDivLoss(reduction="none")``):

    BinaryKL      = tau^2 / N sum_ic [KL(s_t, log s_z) + KL(1 - s_t, log(1 - s_z))],  s_z = s(z/tau), s_t = s(t/tau)
    BinaryKL-Norm = tau^2 / N sum_ic [KL(1/2, log d) + KL(1/2, log(1 - d))],          d = s((z - t)/tau)
    KD            = T^2 / N sum_ic KL(softmax(t/T), log_softmax(z/T))
    CE            = F.cross_entropy(z1, y)  (mean over the batch)

What float32 does to the values: 1 - 1e-8 rounds to 1.0, so the top clamp does not change the value. Once
x = z/tau (BinaryKL) or (z - t)/tau (BinaryKL-Norm) passes about 16.6, sig(x) rounds to 1, 1 - s is 0 and
its log is -inf: the loss is inf (nan for BinaryKL when sig(t/tau) rounds to 1 too). In float64 the top
threshold moves out to about 36.7. BinaryKL-Norm equals log cosh((z - t)/(2 tau)) where no clamp acts
(see ``dhkd_kernels.reference``).

The gradient at that point depends on the PyTorch version, through the clamp's backward rule, which
passes the gradient where lo <= s <= hi. Both rules are emulated here (:class:`ClampGrad`), so a run
does not depend on the installed torch:

``official`` (``clamp_rule="exact"``, the rule of the torch this project installs, pinned by a test):
    the bounds are compared in float64, so s = 1.0 is above hi = 1 - 1e-8 and gets no gradient. Training
    goes on with inf/nan loss values and no gradient on the saturated logits.
``official_torch21`` (``clamp_rule="rounded"``, torch 2.1.2, the version the official code pins):
    the bounds are rounded to the input's dtype first; in float32 hi rounds to 1.0, s = 1.0 is inside,
    the gradient passes, d log(1 - s)/ds = -inf and the sigmoid's backward makes it inf * 0 = nan: the
    weights become nan at the next optimizer step and the run collapses to chance.

At the bottom (x < -18.4) both rules hold s at 1e-8 and give no gradient.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

EPS = 1e-8
NUMERICS = {"official": "exact", "official_torch21": "rounded"}  # loss.numerics -> clamp rule

__all__ = ["EPS", "NUMERICS", "ClampGrad", "clamp", "official_binary_kl", "official_binary_kl_norm",
           "official_dual_head_loss", "official_kd"]


class ClampGrad(torch.autograd.Function):
    """``x.clamp(lo, hi)`` whose backward passes the gradient where lo <= x <= hi, compared either with
    the bounds in float64 (``rule="exact"``) or rounded to x's dtype (``rule="rounded"``, torch 2.1.2)."""

    @staticmethod
    def forward(ctx, x, lo: float, hi: float, rule: str):
        if rule == "rounded":
            inside = (x >= torch.tensor(lo, dtype=x.dtype)) & (x <= torch.tensor(hi, dtype=x.dtype))
        elif rule == "exact":
            xd = x.double()
            inside = (xd >= lo) & (xd <= hi)
        else:
            raise ValueError(f"clamp rule must be 'exact' or 'rounded', got {rule!r}")
        ctx.save_for_backward(inside)
        return x.clamp(lo, hi)

    @staticmethod
    def backward(ctx, grad):
        inside, = ctx.saved_tensors
        return torch.where(inside, grad, torch.zeros_like(grad)), None, None, None


def clamp(x: torch.Tensor, lo: float, hi: float, rule: str = "exact") -> torch.Tensor:
    """:class:`ClampGrad` applied: values of ``x.clamp(lo, hi)``, gradient by ``rule``."""
    return ClampGrad.apply(x, lo, hi, rule)


def _kl(log_q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    return F.kl_div(log_q, p, reduction="none")


def official_binary_kl(z: torch.Tensor, t: torch.Tensor, tau: float, eps: float = EPS,
                       clamp_rule: str = "exact") -> torch.Tensor:
    """BinaryKL of the official code: (N, C) student and teacher logits -> scalar (sum over classes, / N)."""
    s_z = clamp(torch.sigmoid(z / tau), eps, 1 - eps, clamp_rule)
    s_t = clamp(torch.sigmoid(t / tau), eps, 1 - eps, clamp_rule)
    loss = _kl(torch.log(s_z), s_t) + _kl(torch.log(1 - s_z), 1 - s_t)
    return tau ** 2 * loss.sum() / z.shape[0]


def official_binary_kl_norm(z: torch.Tensor, t: torch.Tensor, tau: float, eps: float = EPS,
                            clamp_rule: str = "exact") -> torch.Tensor:
    """BinaryKL-Norm of the official code: (N, C) student and teacher logits -> scalar."""
    d = clamp(torch.sigmoid((z - t) / tau), eps, 1 - eps, clamp_rule)
    half = torch.full_like(d, 0.5)
    loss = _kl(torch.log(d), half) + _kl(torch.log(1 - d), 1 - half)
    return tau ** 2 * loss.sum() / z.shape[0]


def official_kd(z: torch.Tensor, t: torch.Tensor, temperature: float) -> torch.Tensor:
    """Softmax KD of the official code: T^2 mean_i sum_c KL(softmax(t/T) || softmax(z/T))."""
    log_ps = F.log_softmax(z / temperature, dim=1)
    p_t = F.softmax(t / temperature, dim=1)
    return temperature ** 2 * _kl(log_ps, p_t).sum(1).mean()


def official_dual_head_loss(features, head_weight, head_bias, aux_weight, aux_bias, teacher_logits, labels, *,
                            aux_features=None, ce_weight=1.0, kd_weight=0.0, logit_weight=1.0, kd_temperature=4.0,
                            logit_temperature=2.0, logit_loss="binary_kl_norm", return_components=False,
                            numerics="official", **_):
    """``dhkd_kernels.fused_dual_head_kd_loss``'s arguments and result with the official formulas.

    z1 = features W1^T + b1, z2 = aux_features W2^T + b2 (N, C); total = ce_weight CE(z1) + kd_weight KD(z1)
    + logit_weight L(z2); a term whose weight is 0 is not computed (reported as 0). ``numerics`` (a key of
    ``NUMERICS``) picks the clamp's gradient rule. No ``ignore_index``
    (every label must be a class). Components as the fused loss: unweighted ``ce``, ``kd``, ``logit``,
    ``correct``, ``n_valid``.
    """
    z1 = F.linear(features, head_weight, head_bias)
    t = teacher_logits.detach().to(z1.dtype)
    zero = z1.new_zeros(())
    ce = F.cross_entropy(z1, labels) if ce_weight else zero
    kd = official_kd(z1, t, kd_temperature) if kd_weight else zero
    if logit_weight:
        z2 = F.linear(features if aux_features is None else aux_features, aux_weight, aux_bias)
        fn = official_binary_kl_norm if logit_loss == "binary_kl_norm" else official_binary_kl
        logit = fn(z2, t, logit_temperature, clamp_rule=NUMERICS[numerics])
    else:
        logit = zero
    loss = ce_weight * ce + kd_weight * kd + logit_weight * logit
    if not return_components:
        return loss
    return loss, {"ce": ce.detach(), "kd": kd.detach(), "logit": logit.detach(),
                  "correct": (z1.detach().argmax(1) == labels).sum(), "n_valid": torch.tensor(labels.shape[0])}
