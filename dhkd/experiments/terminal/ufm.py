"""The unconstrained-features model (UFM): the paper's argument inside its own model, in seconds.

Free features H (N, d) and heads W1 (C, d), b1 (and W2, b2 for two heads) are the only parameters
(Mixon et al. 2020; Zhu et al. 2021), trained full-batch by gradient descent with momentum on

    CE(H W1^T + b1, y) + lw L_tau(H Wl^T + bl, t) + (wd_h / 2) ||H||_F^2 / N + (wd_w / 2) (||W1||^2 + ||W2||^2)

with Wl = W1 (one head) or W2 (two heads), L = BinaryKL-Norm, t the real teacher's logits on the same
training samples. Under CE alone the UFM's minimizers are a simplex ETF (NC1 = 0, NC2 = 0, NC3 = 0).
The question the paper raises: does the logit loss on the same head keep W1 away from it, and does a
second head give the ETF back?
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import metrics

VARIANTS = {"CE": (0.0, 1), "BKL-Norm alone": (None, 1), "1h CE+BKL-Norm": (1.0, 1), "2h CE+BKL-Norm": (1.0, 2),
            "1h CE+BKL-Norm x0.1": (0.1, 1)}


def run_ufm(y: torch.Tensor, t: torch.Tensor, *, d: int, steps: int, lr: float, wd_h: float = 5e-4,
            wd_w: float = 5e-4, tau: float = 2.0, seed: int = 0, variants=VARIANTS) -> dict:
    """``{variant: {"train_acc", nc metrics of W1, head_conflict of W1}}`` after ``steps`` full-batch steps.
    ``variants`` maps a name to (logit weight, heads); a weight of None means CE off and L weight 1."""
    c = t.shape[1]
    out = {}
    for name, (lw, heads) in variants.items():
        g = torch.Generator().manual_seed(seed)
        n = y.shape[0]
        h = (0.1 * torch.randn(n, d, generator=g, dtype=torch.float64)).requires_grad_(True)
        w1 = (0.1 * torch.randn(c, d, generator=g, dtype=torch.float64)).requires_grad_(True)
        w2 = (0.1 * torch.randn(c, d, generator=g, dtype=torch.float64)).requires_grad_(True)
        b1 = torch.zeros(c, dtype=torch.float64, requires_grad=True)
        b2 = torch.zeros(c, dtype=torch.float64, requires_grad=True)
        td = t.to(torch.float64)
        params = [h, w1, b1] + ([w2, b2] if heads == 2 else [])
        opt = torch.optim.SGD(params, lr=lr, momentum=0.9)
        ce_w, l_w = (0.0, 1.0) if lw is None else (1.0, lw)
        for _ in range(steps):
            opt.zero_grad()
            z1 = h @ w1.T + b1
            zl = h @ w2.T + b2 if heads == 2 else z1
            loss = ce_w * F.cross_entropy(z1, y) + (l_w * metrics.logit_loss(zl, td, tau, "binary_kl_norm") if l_w else 0)
            loss = loss + 0.5 * wd_h * h.square().sum() / n + 0.5 * wd_w * (w1.square().sum() + w2.square().sum())
            loss.backward()
            opt.step()
        with torch.no_grad():
            z1 = h @ w1.T + b1
        row = {"train_acc": 100.0 * (z1.argmax(1) == y).double().mean().item(),
               "w_norm": w1.detach().norm().item()}
        row.update(metrics.nc_metrics(h.detach(), y, w1.detach(), b1.detach(), c))
        row.update(metrics.head_conflict(h.detach(), y, w1.detach(), b1.detach(), td, tau, "binary_kl_norm"))
        out[name] = row
    return out
