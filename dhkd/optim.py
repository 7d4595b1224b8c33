"""Optimizers and learning-rate schedules: SGD / LARS, linear lr scaling, per-iteration warmup + step/cosine."""
from __future__ import annotations

import math

import torch
from torch import nn

from .config import Config


class LARS(torch.optim.Optimizer):
    """SGD with layer-wise adaptive rate scaling (You et al. 2017), per parameter tensor p with grad g:

        trust = eta |p| / (|g| + wd |p|)   (1 when |p| or |g| is 0, or for groups with ``lars=False``)
        u = trust (g + wd p);  buf = momentum buf + u;  p -= lr (u + momentum buf if nesterov else buf)
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 eta: float = 0.001, nesterov: bool = False):
        if lr <= 0 or eta <= 0 or weight_decay < 0 or not 0 <= momentum < 1:
            raise ValueError(f"bad LARS settings lr={lr} eta={eta} weight_decay={weight_decay} momentum={momentum}")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta,
                                      nesterov=nesterov, lars=True))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            wd, mom, eta = group["weight_decay"], group["momentum"], group["eta"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if group["lars"]:
                    pn, gn = p.norm(), g.norm()
                    trust = torch.where((pn > 0) & (gn > 0), eta * pn / (gn + wd * pn), torch.ones_like(pn))
                else:
                    trust = None
                u = g.add(p, alpha=wd) if wd else g.clone()
                if trust is not None:
                    u.mul_(trust)
                if mom:
                    state = self.state[p]
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        buf = state["momentum_buffer"] = u.clone()
                    else:
                        buf.mul_(mom).add_(u)
                    u = u.add(buf, alpha=mom) if group["nesterov"] else buf
                p.add_(u, alpha=-group["lr"])
        return loss


def param_groups(model: nn.Module, weight_decay: float, no_decay_norm_bias: bool) -> list[dict]:
    """Trainable parameters; with ``no_decay_norm_bias`` the 1-D ones (norm scales/shifts, biases) get
    weight_decay 0 and no LARS scaling."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not no_decay_norm_bias:
        return [{"params": [p for _, p in params], "weight_decay": weight_decay}]
    decay = [p for _, p in params if p.ndim > 1]
    plain = [p for _, p in params if p.ndim <= 1]
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": plain, "weight_decay": 0.0, "lars": False}]


def scaled_lr(cfg: Config, global_batch: int) -> float:
    """lr = optim.lr * global_batch / optim.base_batch (linear scaling, Goyal et al. 2017)."""
    return cfg.optim.lr * global_batch / cfg.optim.base_batch


def build_optimizer(model: nn.Module, cfg: Config, global_batch: int) -> torch.optim.Optimizer:
    o = cfg.optim
    groups = param_groups(model, o.weight_decay, o.no_decay_norm_bias)
    lr = scaled_lr(cfg, global_batch)
    if o.name == "lars":
        return LARS(groups, lr=lr, momentum=o.momentum, weight_decay=o.weight_decay, eta=o.lars_eta,
                    nesterov=o.nesterov)
    for g in groups:
        g.pop("lars", None)
    return torch.optim.SGD(groups, lr=lr, momentum=o.momentum, weight_decay=o.weight_decay,
                           nesterov=o.nesterov)


class LRFactor:
    """Multiplier of the peak lr at optimizer step ``s`` (0-based), with S steps per epoch and E epochs.

    warmup (W = warmup_epochs * S steps), for s < W: (s + 1) / W; or, with ``sched.warmup_from_base_lr``
    (Goyal et al. 2017: from the unscaled lr to the scaled one), f0 + (1 - f0) s / W with
    f0 = min(1, base_batch / global_batch); then
    step: gamma ** #(milestones <= s // S); cosine: m + (1 - m)(1 + cos(pi (s - W) / (E S - W))) / 2;
    constant: 1.
    """

    def __init__(self, cfg: Config, steps_per_epoch: int, global_batch: int | None = None):
        s = cfg.sched
        self.name, self.milestones, self.gamma = s.name, list(s.milestones), s.gamma
        self.min_factor = s.min_lr_factor
        self.steps_per_epoch = steps_per_epoch
        self.warmup = int(round(s.warmup_epochs * steps_per_epoch))
        self.total = cfg.train.epochs * steps_per_epoch
        self.start = None
        if s.warmup_from_base_lr:
            if global_batch is None:
                raise ValueError("sched.warmup_from_base_lr needs the global batch")
            self.start = min(1.0, cfg.optim.base_batch / global_batch)

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            if self.start is not None:
                return self.start + (1 - self.start) * step / self.warmup
            return (step + 1) / self.warmup
        if self.name == "step":
            epoch = step // self.steps_per_epoch
            return self.gamma ** sum(1 for m in self.milestones if m <= epoch)
        if self.name == "cosine":
            span = max(1, self.total - self.warmup)
            progress = min(1.0, (step - self.warmup) / span)
            return self.min_factor + (1 - self.min_factor) * 0.5 * (1 + math.cos(math.pi * progress))
        return 1.0


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: Config, steps_per_epoch: int,
                    global_batch: int | None = None):
    """A per-iteration ``LambdaLR`` (call ``.step()`` after every optimizer step)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, LRFactor(cfg, steps_per_epoch, global_batch))
