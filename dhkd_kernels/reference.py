"""Plain PyTorch reference of the dual-head KD loss: the oracle every fast path is tested against.

Written for clarity, not speed: it materializes both heads' (N, C) logits and lets autograd
differentiate them. Run it in float64 for an oracle. In bf16/fp16 it follows the loss-dtype rule of
every backend: the two products in the 16-bit dtype (autocast's under autocast), the loss math and the
result in float32.

Notation (one row i of the batch, classes c = 1..C):
    z1 = features @ head_weight.T + head_bias          main head, (N, C)
    z2 = aux_features @ aux_weight.T + aux_bias        auxiliary head, (N, C)
    t  = teacher_logits                                constant, (N, C)
    V  = rows whose label is not ``ignore_index``

    CE       = -sum_{i in V} log softmax(z1_i)[y_i]      (label smoothing eps: (1 - eps) CE_i + eps mean_c CE_ic,
                                                     exactly F.cross_entropy(..., label_smoothing=eps))
    KD       = T^2 sum_{i in V} sum_c p_t (log p_t - log p_s),  p = softmax(. / T)
    BinaryKL = tau^2 sum_{i in V} sum_c [ s (log s - log sig(z2/tau)) + (1-s) (log(1-s) - log sig(-z2/tau)) ],
               s = sig(t/tau)
    BinaryKL-Norm = tau^2 sum_{i in V} sum_c log cosh((z2 - t) / (2 tau))

    total = ce_weight CE + kd_weight KD + logit_weight L_logit + z_loss_weight Z,
            divided by |V| for reduction="mean";
    a term whose weight is 0 is not part of the total (a NaN in it cannot reach the loss).

Options (defaults reproduce the formulas above):
    softcap=cap: z1 and z2 are replaced by cap tanh(z / cap) (after the bias) before every term that
        reads them (CE, KD, the logit-level loss, z-loss, ``correct``); teacher_softcap=cap does the
        same to t (a -inf teacher logit stays -inf: still a masked class).
    kd_divergence: the divergence of the KD term between s = softmax(z1/T) and p = softmax(t/T),
        always scaled by T^2:
        "forward_kl" (default)  KL(p || s)
        "reverse_kl"            KL(s || p) = sum_c s (log s - log p), over the classes the teacher
                                does not mask (a masked class contributes nothing; the true KL(s || p)
                                would be +inf as soon as s puts mass on it)
        "jsd"                   generalised Jensen-Shannon with jsd_beta = b in [0, 1]:
                                b KL(p || m) + (1 - b) KL(s || m),  m = b p + (1 - b) s,
                                with the endpoints taken as their named divergences, as in TRL's
                                GKD and Liger-Kernel's (fused linear) JSD: b = 0 is KL(p || s)
                                (forward) and b = 1 is KL(s || p) (reverse). (The mixture formula
                                itself is 0 at both endpoints; the special cases are deliberate.)
        0 log 0 = 0 wherever p = 0 (masked or underflowed classes).
    z_loss_weight=lambda: Z = sum_{i in V} logsumexp(z1_i)^2 (PaLM's z-loss on the softcapped z1, at
        temperature 1).

Rows not in V do not influence anything: their features and teacher logits are replaced by zeros
before any arithmetic, so garbage (NaN included) in padding rows never reaches a result. A teacher
logit of -inf marks a class masked out for that row: its teacher probability is 0 in KD, with
0 log 0 = 0 as in ``F.kl_div`` (the same wherever p_t underflows to 0: xlogy), and it contributes nothing (value and gradient 0) to BinaryKL and
BinaryKL-Norm. A valid row whose teacher logits are all -inf has no teacher distribution: its KD
is NaN. Other non-finite teacher logits (+inf, NaN) in valid rows give a NaN loss.

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
    "valid_rows",
    "REDUCTIONS",
    "binary_kl",
    "binary_kl_norm",
    "cross_entropy",
    "dual_head_kd_loss",
    "log_cosh",
    "softmax_kd",
    "apply_softcap",
    "softmax_divergence",
    "z_loss",
]

LOGIT_LOSSES = ("binary_kl_norm", "binary_kl")
KD_DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
REDUCTIONS = ("mean", "sum", "none")


def _operand_dtype(mats, device_type: str) -> torch.dtype:
    """The autocast dtype under autocast (as for ``F.linear``), else the operands' promoted dtype."""
    try:
        if torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
    except (TypeError, AttributeError, RuntimeError):
        pass
    cdt = mats[0].dtype
    for m in mats[1:]:
        cdt = torch.promote_types(cdt, m.dtype)
    return cdt


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


def valid_rows(labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """(N,) bool: labels != ignore_index compared as values (an ignore_index outside the labels' dtype
    range matches no label, rather than wrapping around to one)."""
    info = torch.iinfo(labels.dtype)
    if not info.min <= ignore_index <= info.max:
        return torch.ones(labels.shape, dtype=torch.bool, device=labels.device)
    return labels != ignore_index


def cross_entropy(z1: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Per-row CE, (N, C) x (N,) -> (N,), as ``F.cross_entropy(..., label_smoothing=eps)``:
    (1 - eps) (-log p_y) + eps mean_c (-log p_c). Labels must be valid class indices."""
    log_p = F.log_softmax(z1, dim=-1)
    ce = -log_p.gather(-1, labels.long().unsqueeze(-1)).squeeze(-1)
    if label_smoothing:
        ce = (1.0 - label_smoothing) * ce - label_smoothing * log_p.mean(-1)
    return ce


def softmax_kd(z1: torch.Tensor, t: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-row T^2 KL(softmax(t/T) || softmax(z1/T)), (N, C) -> (N,); 0 log 0 = 0 wherever p_t = 0."""
    log_ps = F.log_softmax(z1 / temperature, dim=-1)
    log_pt = F.log_softmax(t / temperature, dim=-1)
    pt = log_pt.exp()
    # xlogy: wherever pt = 0 (t = -inf, or a probability that underflows) the term is 0, its limit,
    # not 0 * (-inf) = NaN; a NaN teacher stays NaN
    per_class = torch.where(pt == 0, torch.zeros_like(pt), pt * (log_pt - log_ps))
    kd = temperature**2 * per_class.sum(-1)
    # a row whose teacher logits are all -inf has no teacher distribution: NaN, as on every backend
    return torch.where(torch.isneginf(t).all(-1), torch.full_like(kd, float("nan")), kd)


def softmax_divergence(z1: torch.Tensor, t: torch.Tensor, temperature: float, divergence: str = "forward_kl",
                       beta: float = 0.5) -> torch.Tensor:
    """Per-row T^2 D(s, p) with s = softmax(z1/T), p = softmax(t/T), (N, C) -> (N,), for the
    ``kd_divergence`` options (module docstring): forward KL(p || s), reverse KL(s || p) over the
    classes the teacher does not mask, or the generalised JSD (beta = 0: forward, beta = 1: reverse).
    A row whose teacher logits are all -inf is NaN."""
    if divergence == "jsd" and beta == 0.0:
        divergence = "forward_kl"
    elif divergence == "jsd" and beta == 1.0:
        divergence = "reverse_kl"
    if divergence == "forward_kl":
        return softmax_kd(z1, t, temperature)
    log_ps = F.log_softmax(z1 / temperature, dim=-1)
    log_pt = F.log_softmax(t / temperature, dim=-1)
    keep = t != float("-inf")
    zero = torch.zeros((), dtype=log_pt.dtype, device=log_pt.device)
    if divergence == "reverse_kl":
        # a masked class (log p = -inf) is left out of the sum; log p is replaced there first so that
        # no inf reaches the gradient of the dropped branch
        safe_log_pt = torch.where(keep, log_pt, zero)
        per_class = torch.where(keep, log_ps.exp() * (log_ps - safe_log_pt), zero)
    else:
        pt, ps = log_pt.exp(), log_ps.exp()
        log_m = torch.logaddexp(log_pt + math.log(beta), log_ps + math.log1p(-beta))
        # xlogy for the teacher side: p = 0 (masked or underflowed) contributes 0
        teacher_side = torch.where(pt == 0, zero, pt * (log_pt - log_m))
        per_class = beta * teacher_side + (1.0 - beta) * ps * (log_ps - log_m)
    kd = temperature**2 * per_class.sum(-1)
    return torch.where(torch.isneginf(t).all(-1), torch.full_like(kd, float("nan")), kd)


def apply_softcap(z: torch.Tensor, cap: float | None) -> torch.Tensor:
    """cap tanh(z / cap) (None: z unchanged); -inf stays -inf (a masked teacher class)."""
    if cap is None:
        return z
    capped = cap * torch.tanh(z / cap)
    return torch.where(torch.isneginf(z), z, capped)


def z_loss(z1: torch.Tensor) -> torch.Tensor:
    """Per-row logsumexp(z1)^2, (N, C) -> (N,)."""
    return torch.logsumexp(z1, dim=-1) ** 2


def _masked_classes(z2: torch.Tensor, t: torch.Tensor):
    """Teacher -inf = a masked class: (z2, t) with those entries zeroed, and the keep mask."""
    keep = t != float("-inf")
    zero = torch.zeros((), dtype=z2.dtype, device=z2.device)
    return torch.where(keep, z2, zero), torch.where(keep, t, zero), keep


def binary_kl(z2: torch.Tensor, t: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-row tau^2 sum_c KL(Bernoulli(sig(t/tau)) || Bernoulli(sig(z2/tau))), (N, C) -> (N,)."""
    z2, t, keep = _masked_classes(z2, t)
    zs, ts = z2 / temperature, t / temperature
    pos = torch.sigmoid(ts) * (F.logsigmoid(ts) - F.logsigmoid(zs))
    neg = torch.sigmoid(-ts) * (F.logsigmoid(-ts) - F.logsigmoid(-zs))
    return temperature**2 * torch.where(keep, pos + neg, torch.zeros_like(pos)).sum(-1)


def binary_kl_norm(z2: torch.Tensor, t: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-row tau^2 sum_c log cosh((z2 - t) / (2 tau)), (N, C) -> (N,)."""
    z2, t, keep = _masked_classes(z2, t)
    val = log_cosh((z2 - t) / (2.0 * temperature))
    return temperature**2 * torch.where(keep, val, torch.zeros_like(val)).sum(-1)


def weighted_loss(per_row: dict, weights: dict, valid: torch.Tensor, reduction: str, z1: torch.Tensor,
                  z2: torch.Tensor):
    """(loss, terms): each (N,) per-row term summed over the valid rows (divided by |V| for "mean", per
    row for "none") and their weighted sum. A term whose weight is 0 is not part of the loss, yet every
    input stays in the graph with a zero gradient (like ``0 * term`` would, but a NaN in that term,
    e.g. from the teacher, cannot leak through)."""

    def reduce(v: torch.Tensor) -> torch.Tensor:
        total = torch.where(valid, v, torch.zeros_like(v))
        if reduction == "none":
            return total
        total = total.sum()
        if reduction == "mean":
            total = total / valid.sum().clamp(min=1)
        return total

    terms = {k: reduce(v) for k, v in per_row.items()}
    never = torch.zeros((), dtype=torch.bool, device=z1.device)
    if reduction == "none":
        loss = torch.where(never, z1.sum(-1) + z2.sum(-1), torch.zeros_like(per_row["ce"]))
    else:
        loss = torch.where(never, z1.sum() + z2.sum(), torch.zeros((), dtype=z1.dtype, device=z1.device))
    for k, w in weights.items():
        if w:
            loss = loss + w * terms[k]
    return loss, terms


def dual_head_kd_loss(
    features: torch.Tensor,
    head_weight: torch.Tensor,
    head_bias: torch.Tensor | None,
    aux_weight: torch.Tensor,
    aux_bias: torch.Tensor | None,
    teacher_logits: torch.Tensor | None,
    labels: torch.Tensor,
    *,
    aux_features: torch.Tensor | None = None,
    teacher_features: torch.Tensor | None = None,
    teacher_weight: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
    ce_weight: float = 1.0,
    kd_weight: float = 0.0,
    logit_weight: float = 1.0,
    kd_temperature: float = 4.0,
    logit_temperature: float = 2.0,
    logit_loss: str = "binary_kl_norm",
    ignore_index: int = -100,
    reduction: str = "mean",
    return_components: bool = False,
    kd_divergence: str = "forward_kl",
    jsd_beta: float = 0.5,
    softcap: float | None = None,
    teacher_softcap: float | None = None,
    z_loss_weight: float = 0.0,
):
    """The dual-head KD loss through autograd: matmuls in the operands' dtype, loss math in fp32.

    Same arguments and result as :func:`dhkd_kernels.fused_dual_head_kd_loss` (no validation here).
    The operands (features, weights, aux features) are used in one dtype: the autocast dtype under
    ``torch.autocast``, otherwise their promoted dtype (the rule of every backend); biases are cast to
    it, so z1 and z2 are exactly eager ``F.linear``'s. Everything after the two products (softmaxes,
    logs, sums, the result) is float32, float64 for float64 operands. With
    ``teacher_features``/``teacher_weight``/``teacher_bias`` instead of ``teacher_logits`` the teacher
    logits are their product, without a gradient. ``reduction="none"`` returns the (N,) per-row weighted
    losses (0 for rows outside V), also when every weight is 0. Components: ``ce``, ``kd``, ``logit``
    (unweighted, reduced like the total or per row, detached; computed even when their weight is 0, so
    they may be NaN without affecting the loss), ``correct`` (rows of V whose first arg-max of the
    (softcapped) z1 is the label: a count, or per row), ``n_valid`` (|V|), and ``z_loss`` (reduced like
    ``ce``) only when ``z_loss_weight`` is not 0. The options ``kd_divergence``, ``jsd_beta``,
    ``softcap``, ``teacher_softcap`` and ``z_loss_weight`` are defined in the module docstring.
    """
    if teacher_logits is None:
        tdt = _operand_dtype([teacher_features, teacher_weight], teacher_features.device.type)
        with torch.no_grad():
            teacher_logits = F.linear(teacher_features.to(tdt), teacher_weight.to(tdt),
                                      None if teacher_bias is None else teacher_bias.to(tdt))
    mats = [features, head_weight, aux_weight] + ([aux_features] if aux_features is not None else [])
    cdt = _operand_dtype(mats, features.device.type)
    with torch.autocast(features.device.type, enabled=False):
        return _loss(features, head_weight, head_bias, aux_weight, aux_bias, teacher_logits, labels, cdt,
                     aux_features=aux_features, label_smoothing=label_smoothing, ce_weight=ce_weight,
                     kd_weight=kd_weight, logit_weight=logit_weight, kd_temperature=kd_temperature,
                     logit_temperature=logit_temperature, logit_loss=logit_loss, ignore_index=ignore_index,
                     reduction=reduction, return_components=return_components,
                     kd_divergence=kd_divergence, jsd_beta=jsd_beta, softcap=softcap,
                     teacher_softcap=teacher_softcap, z_loss_weight=z_loss_weight)


def _loss(features, head_weight, head_bias, aux_weight, aux_bias, teacher_logits, labels, cdt, *,
          aux_features, label_smoothing, ce_weight, kd_weight, logit_weight, kd_temperature,
          logit_temperature, logit_loss, ignore_index, reduction, return_components,
          kd_divergence="forward_kl", jsd_beta=0.5, softcap=None, teacher_softcap=None, z_loss_weight=0.0):
    ldt = torch.float64 if cdt == torch.float64 else torch.float32
    features, head_weight, aux_weight = (m.to(cdt) for m in (features, head_weight, aux_weight))
    head_bias = None if head_bias is None else head_bias.to(cdt)
    aux_bias = None if aux_bias is None else aux_bias.to(cdt)
    valid = valid_rows(labels, ignore_index)
    vcol = valid.unsqueeze(-1)
    zero = torch.zeros((), dtype=cdt, device=features.device)
    # rows outside V are zeroed before any arithmetic: their garbage cannot reach a result
    features = torch.where(vcol, features, zero)
    aux_features = features if aux_features is None else torch.where(vcol, aux_features.to(cdt), zero)
    z1 = F.linear(features, head_weight, head_bias).to(ldt)
    z2 = F.linear(aux_features, aux_weight, aux_bias).to(ldt)
    t = torch.where(vcol, teacher_logits.to(ldt), torch.zeros((), dtype=ldt, device=z1.device))
    y = torch.where(valid, labels, torch.zeros_like(labels)).long()
    z1, z2, t = apply_softcap(z1, softcap), apply_softcap(z2, softcap), apply_softcap(t, teacher_softcap)

    ce = cross_entropy(z1, y, label_smoothing)
    kd = softmax_divergence(z1, t, kd_temperature, kd_divergence, jsd_beta)
    if logit_loss == "binary_kl_norm":
        logit = binary_kl_norm(z2, t, logit_temperature)
    else:
        logit = binary_kl(z2, t, logit_temperature)

    per_row = {"ce": ce, "kd": kd, "logit": logit}
    weights = {"ce": ce_weight, "kd": kd_weight, "logit": logit_weight}
    if z_loss_weight:
        per_row["z_loss"] = z_loss(z1)
        weights["z_loss"] = z_loss_weight
    loss, terms = weighted_loss(per_row, weights, valid, reduction, z1, z2)
    if not return_components:
        return loss
    components = {k: v.detach() for k, v in terms.items()}
    correct = (z1.argmax(-1) == y) & valid
    components["correct"] = correct if reduction == "none" else correct.sum()
    components["n_valid"] = valid.sum()
    return loss, components
