"""Neural-collapse metrics of a linear head and the CE / logit-loss gradient conflict in it.

Notation: features H (N, d) entering the head, labels y (N,), head z = W h + b with W (C, d); class
means mu_c, global mean mu_G, centred means M (C, d) with rows mu_c - mu_G (Papyan, Han & Donoho 2020).
Everything is computed in float64 on detached inputs and returned as Python floats.

    NC1        tr(Sigma_W Sigma_B^+) / C                    (``dhkd.diagnostics.nc1``)
    NC2        equinorm: CV of ||M_c|| and of ||w_c||; equiangularity: mean_{i<j} |cos_ij + 1/(C-1)|
               of the rows of M and of W (0 for a simplex ETF)
    NC3        || W/||W||_F - M/||M||_F ||_F                  (self-duality; 0 when W is proportional to M)
    NC4        fraction of samples where argmax_c (W h + b)_c != argmin_c ||h - mu_c|| (nearest class mean)

The gradient conflict (:func:`head_conflict`) is on the full batch: with G = dL/dz (N, C), dL/dW = G^T H.
CE's G sums to 0 over the classes of every sample; a per-class sigmoid loss's need not, and that common
mode (G 1/C per sample) is invisible to softmax, so it is removed from the logit loss's G before the
cosine: G_cm = G - mean_c G.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ...diagnostics import backbone_gradient_cosine, gradient_cosine, nc1, pairwise_cosine_stats

_F64 = torch.float64


def class_means(h: torch.Tensor, y: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(means (C, d), centred means M (C, d) = means - mu_G) of features h (N, d); float64.
    Absent classes get mu_G (a zero row of M)."""
    h = h.detach().to(_F64)
    mu_g = h.mean(0, keepdim=True)
    counts = torch.bincount(y, minlength=num_classes).clamp_min(1).to(_F64).unsqueeze(1)
    sums = torch.zeros(num_classes, h.shape[1], dtype=_F64).index_add_(0, y, h)
    present = torch.bincount(y, minlength=num_classes).unsqueeze(1) > 0
    means = torch.where(present, sums / counts, mu_g)
    return means, means - mu_g


def _cv(rows: torch.Tensor) -> float:
    n = rows.norm(dim=1)
    return (n.std(unbiased=False) / n.mean()).item() if n.mean() > 0 else math.nan


def nc_metrics(h: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
               num_classes: int) -> dict:
    """``{nc1, nc2_norm_m, nc2_norm_w, nc2_angle_m, nc2_angle_w, nc3, nc4}`` of one head on (h, y);
    all nan when h or W is not finite."""
    keys = ("nc1", "nc2_norm_m", "nc2_norm_w", "nc2_angle_m", "nc2_angle_w", "nc3", "nc4")
    w = weight.detach().to(_F64)
    if not (torch.isfinite(h).all() and torch.isfinite(w).all()):
        return dict.fromkeys(keys, math.nan)
    means, m = class_means(h, y, num_classes)
    hd = h.detach().to(_F64)
    z = hd @ w.T + (0.0 if bias is None else bias.detach().to(_F64))
    nearest = torch.cdist(hd, means).argmin(1)
    return {"nc1": nc1(hd, y, num_classes),
            "nc2_norm_m": _cv(m), "nc2_norm_w": _cv(w),
            "nc2_angle_m": pairwise_cosine_stats(m)["mean_abs_dev"],
            "nc2_angle_w": pairwise_cosine_stats(w)["mean_abs_dev"],
            "nc3": (w / w.norm() - m / m.norm()).norm().item(),
            "nc4": (z.argmax(1) != nearest).double().mean().item()}


def logit_loss(z: torch.Tensor, t: torch.Tensor, tau: float, kind: str) -> torch.Tensor:
    """The exact logit loss, mean over the batch: tau^2 sum_c log cosh((z - t)/(2 tau)) (binary_kl_norm)
    or tau^2 sum_c KL(Bern(sig(t/tau)) || Bern(sig(z/tau))) (binary_kl); (N, C) -> scalar."""
    from dhkd_kernels import reference
    fn = reference.binary_kl_norm if kind == "binary_kl_norm" else reference.binary_kl
    return fn(z, t, tau).mean()


def head_conflict(h: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  t: torch.Tensor, tau: float, kind: str) -> dict:
    """CE vs the logit loss ``kind`` on one head (full batch, float64).

    ``w_cos`` = cos(dCE/dW, dL/dW); ``w_cos_cm`` the same with L's common mode removed; ``w_conflict`` the
    fraction of classes whose row cosine (common mode removed) is < 0; ``radial_ce``, ``radial_l`` =
    <dCE/dW, W>/||W||_F and <dL/dW, W>/||W||_F (a gradient step changes ||W||^2 by -2 lr <g, W>: a negative
    radial component grows the head)."""
    hd, w = h.detach().to(_F64), weight.detach().to(_F64)
    if not (torch.isfinite(hd).all() and torch.isfinite(w).all()):
        return dict.fromkeys(("w_cos", "w_cos_cm", "w_conflict", "radial_ce", "radial_l"), math.nan)
    z = (hd @ w.T + (0.0 if bias is None else bias.detach().to(_F64))).requires_grad_(True)
    g_ce, = torch.autograd.grad(F.cross_entropy(z, y), z)
    g_l, = torch.autograd.grad(logit_loss(z, t.to(_F64), tau, kind), z)
    a, b, b_cm = g_ce.T @ hd, g_l.T @ hd, (g_l - g_l.mean(1, keepdim=True)).T @ hd
    ua, ub = F.normalize(a, dim=1), F.normalize(b_cm, dim=1)
    wn = w.norm().clamp_min(1e-300)
    return {"w_cos": gradient_cosine(a, b), "w_cos_cm": gradient_cosine(a, b_cm),
            "w_conflict": ((ua * ub).sum(1) < 0).double().mean().item(),
            "radial_ce": ((a * w).sum() / wn).item(), "radial_l": ((b * w).sum() / wn).item()}


def feature_cosine(student, h: torch.Tensor, y: torch.Tensor, t: torch.Tensor, tau: float, kind: str,
                   two_heads: bool) -> float:
    """cos(dCE/dH, dL/dH) at the backbone output H (N, d): CE on the main head, L on the head it trains
    (the aux head, through its MLP if any, for two-head arms; else the main head). Eval mode, no_grad-free."""
    if not torch.isfinite(h).all():
        return math.nan
    fd = h.detach().clone().requires_grad_(True)
    z1 = student.head(fd)
    zl = student.aux_logits(fd) if two_heads else z1
    return backbone_gradient_cosine(fd, F.cross_entropy(z1, y), logit_loss(zl, t, tau, kind))


def logit_maxima(z_main: torch.Tensor, z_logit: torch.Tensor, t: torch.Tensor, tau: float) -> dict:
    """``max_abs_z_main_tau`` = max |z1|/tau, ``max_z_tau`` = max z_L/tau, ``max_gap_tau`` = max |z_L - t|/tau
    and ``max_pos_gap_tau`` = max (z_L - t)/tau of the head the logit loss trains. The official float32
    losses are infinite once z/tau (BinaryKL) or (z - t)/tau (BinaryKL-Norm) passes about +16.6; a gap
    below -18.4 only meets the bottom clamp (finite, no gradient)."""
    return {"max_abs_z_main_tau": (z_main.abs().max() / tau).item(),
            "max_z_tau": (z_logit.max() / tau).item(),
            "max_gap_tau": ((z_logit - t).abs().max() / tau).item(),
            "max_pos_gap_tau": ((z_logit - t).max() / tau).item()}
