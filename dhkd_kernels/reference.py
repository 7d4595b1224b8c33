"""Plain PyTorch reference of the dual-head KD loss: the oracle every fast path is tested against.

Written for clarity, not speed: it materializes both heads' (N, C) logits and lets autograd
differentiate them. Run it in float64 for an oracle; run it in bf16/fp16 to get eager PyTorch's own
error in that dtype.

Notation (one row i of the batch, classes c = 1..C):
    z1 = features @ head_weight.T + head_bias          main head, (N, C)
    z2 = aux_features @ aux_weight.T + aux_bias        auxiliary head, (N, C)
    t  = teacher_logits                                constant, (N, C)
    V  = rows whose label is not ``ignore_index``

    CE       = -sum_{i in V} log softmax(z1_i)[y_i]
    KD       = T^2 sum_{i in V} sum_c p_t (log p_t - log p_s),  p = softmax(. / T)
    BinaryKL = tau^2 sum_{i in V} sum_c [ s (log s - log sig(z2/tau)) + (1-s) (log(1-s) - log sig(-z2/tau)) ],
               s = sig(t/tau)
    BinaryKL-Norm = tau^2 sum_{i in V} sum_c log cosh((z2 - t) / (2 tau))

    total = ce_weight CE + kd_weight KD + logit_weight L_logit,   divided by |V| for reduction="mean".

BinaryKL-Norm: the official DHKD code writes it as 0.5 log(0.5/d) + 0.5 log(0.5/(1-d)) with
d = sig((z2 - t)/tau) clamped to [1e-8, 1 - 1e-8]. The clamp zeroes the gradient once |z2 - t| passes
about 18 tau, and in float32 ``1 - d`` rounds to 0 (log gives inf) past about 16.6 tau, before the
clamp can act. The expression equals log cosh((z2 - t)/(2 tau)) exactly, which this library computes as
|x| + log1p(exp(-2|x|)) - log 2 (and, for |x| < 1, as log1p(2 sinh(x/2)^2), which keeps the relative
accuracy of small values): finite for every finite gap, with the exact gradient (tau/2) tanh(x).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "LOGIT_LOSSES",
    "REDUCTIONS",
    "binary_kl",
    "binary_kl_norm",
    "cross_entropy",
    "dual_head_kd_loss",
    "log_cosh",
    "softmax_kd",
]

LOGIT_LOSSES = ("binary_kl_norm", "binary_kl")
REDUCTIONS = ("mean", "sum")


def log_cosh(x: torch.Tensor) -> torch.Tensor:
    """log cosh(x), finite for every finite x, accurate to rounding in relative terms.

    |x| >= 1: |x| + log1p(exp(-2|x|)) - log 2 (never overflows). |x| < 1: log1p(2 sinh(|x|/2)^2)
    (= log cosh x exactly), because the first form cancels against log 2 near 0 and loses all
    relative accuracy of the small value there.
    """
    a = x.abs()
    large = a + torch.log1p(torch.exp(-2.0 * a)) - math.log(2.0)
    small = torch.log1p(2.0 * torch.sinh(a.clamp(max=1.0) / 2.0) ** 2)
    return torch.where(a < 1.0, small, large)


def cross_entropy(z1: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-row CE, (N, C) x (N,) -> (N,). Labels must be valid class indices."""
    return -F.log_softmax(z1, dim=-1).gather(-1, labels.long().unsqueeze(-1)).squeeze(-1)


def softmax_kd(z1: torch.Tensor, t: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-row T^2 KL(softmax(t/T) || softmax(z1/T)), (N, C) -> (N,)."""
    log_ps = F.log_softmax(z1 / temperature, dim=-1)
    log_pt = F.log_softmax(t / temperature, dim=-1)
    return temperature**2 * (log_pt.exp() * (log_pt - log_ps)).sum(-1)


def binary_kl(z2: torch.Tensor, t: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-row tau^2 sum_c KL(Bernoulli(sig(t/tau)) || Bernoulli(sig(z2/tau))), (N, C) -> (N,)."""
    zs, ts = z2 / temperature, t / temperature
    pos = torch.sigmoid(ts) * (F.logsigmoid(ts) - F.logsigmoid(zs))
    neg = torch.sigmoid(-ts) * (F.logsigmoid(-ts) - F.logsigmoid(-zs))
    return temperature**2 * (pos + neg).sum(-1)


def binary_kl_norm(z2: torch.Tensor, t: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-row tau^2 sum_c log cosh((z2 - t) / (2 tau)), (N, C) -> (N,)."""
    return temperature**2 * log_cosh((z2 - t) / (2.0 * temperature)).sum(-1)


def dual_head_kd_loss(
    features: torch.Tensor,
    head_weight: torch.Tensor,
    head_bias: torch.Tensor | None,
    aux_weight: torch.Tensor,
    aux_bias: torch.Tensor | None,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    aux_features: torch.Tensor | None = None,
    ce_weight: float = 1.0,
    kd_weight: float = 0.0,
    logit_weight: float = 1.0,
    kd_temperature: float = 4.0,
    logit_temperature: float = 2.0,
    logit_loss: str = "binary_kl_norm",
    ignore_index: int = -100,
    reduction: str = "mean",
    return_components: bool = False,
):
    """The dual-head KD loss through autograd, in the dtype of ``features``.

    Same arguments and result as :func:`dhkd_kernels.fused_dual_head_kd_loss` (no validation here).
    Components: ``ce``, ``kd``, ``logit`` (unweighted, reduced like the total, detached),
    ``correct`` (rows of V whose first arg-max of z1 is the label) and ``n_valid`` (|V|).
    """
    if aux_features is None:
        aux_features = features
    z1 = F.linear(features, head_weight, head_bias)
    z2 = F.linear(aux_features, aux_weight, aux_bias)
    t = teacher_logits.to(z1.dtype)
    valid = labels != ignore_index
    y = torch.where(valid, labels, torch.zeros_like(labels)).long()

    ce = cross_entropy(z1, y)
    kd = softmax_kd(z1, t, kd_temperature)
    if logit_loss == "binary_kl_norm":
        logit = binary_kl_norm(z2.to(z1.dtype), t, logit_temperature)
    else:
        logit = binary_kl(z2.to(z1.dtype), t, logit_temperature)

    def reduce(per_row: torch.Tensor) -> torch.Tensor:
        total = torch.where(valid, per_row, torch.zeros_like(per_row)).sum()
        if reduction == "mean":
            total = total / valid.sum().clamp(min=1)
        return total

    terms = {"ce": reduce(ce), "kd": reduce(kd), "logit": reduce(logit)}
    loss = ce_weight * terms["ce"] + kd_weight * terms["kd"] + logit_weight * terms["logit"]
    if not return_components:
        return loss
    components = {k: v.detach() for k, v in terms.items()}
    components["correct"] = ((z1.argmax(-1) == y) & valid).sum()
    components["n_valid"] = valid.sum()
    return loss, components
