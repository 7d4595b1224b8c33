"""The ``backend="torch"`` path: a chunked PyTorch implementation with an analytic backward.

Rows are processed in chunks of ``max(1, chunk_elements // C)`` rows. For each chunk the forward
computes both heads' logits, the per-row losses and, when any input needs a gradient, the logit
gradients dz1, dz2 and their products with the weights and features, so ``backward`` only scales
stored gradients by ``grad_output`` (the same plan as Liger-Kernel's fused linear losses).

Memory bound: about ten fp32 (fp64 for float64 inputs) buffers of one chunk, i.e. at most
~10 * 4 * max(chunk_elements, C) bytes (40 MiB at the default 2**20) on top of the inputs, plus fp32
copies of half-precision weights and fp32 gradient accumulators of the inputs' sizes. The full (N, C)
logits are never held.

Gradients of the per-element losses (s = softmax, sig = sigmoid):
    dCE/dz1       = s(z1) - onehot(y)
    dKD/dz1       = T (s(z1/T) - s(t/T))
    dBinaryKL/dz2 = tau (sig(z2/tau) - sig(t/tau))
    dBKLNorm/dz2  = (tau / 2) tanh((z2 - t) / (2 tau))
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..reference import binary_kl, binary_kl_norm

DEFAULT_CHUNK_ELEMENTS = 2**20


def row_losses_and_grads(z1, z2, t, y, *, kd_temperature, logit_temperature, logit_loss,
                         need_ce, need_kd, need_logit, need_grad, ce_weight, kd_weight, logit_weight):
    """Per-row CE, KD and logit losses of one chunk and the weighted logit gradients.

    The logit losses are the reference's own per-row formulas (so this path's float32 rounding is
    eager float32's); the gradients are the closed forms in the module docstring.

    z1, z2, t: (n, C) in the compute dtype; y: (n,) int64 valid class indices.
    Returns (ce, kd, logit) each (n,) or None, and (dz1, dz2) = d(weighted row loss)/dz (or None).
    """
    ce = kd = logit = dz1 = dz2 = None
    if need_ce:
        # log_softmax shifts by the row max before the log-sum-exp, so p_y - 1 keeps its small
        # value for confident rows (z - lse would round lse at the scale of the max logit)
        log_p = F.log_softmax(z1, dim=-1)
        ce = -log_p.gather(-1, y.unsqueeze(-1)).squeeze(-1)
        if need_grad and ce_weight:
            dz1 = log_p.exp_()
            dz1.scatter_add_(-1, y.unsqueeze(-1), torch.full_like(ce, -1.0).unsqueeze(-1))
            dz1.mul_(ce_weight)
    if need_kd:
        T = kd_temperature
        zs, ts = z1 / T, t / T
        log_ps = F.log_softmax(zs, dim=-1)
        log_pt = F.log_softmax(ts, dim=-1)
        pt = log_pt.exp()
        kd = T * T * (pt * (log_pt - log_ps)).sum(-1)
        if need_grad and kd_weight:
            g = (log_ps.exp() - pt).mul_(kd_weight * T)
            dz1 = g if dz1 is None else dz1.add_(g)
    if need_logit:
        tau = logit_temperature
        if logit_loss == "binary_kl_norm":
            logit = binary_kl_norm(z2, t, tau)
            if need_grad and logit_weight:
                dz2 = torch.tanh((z2 - t) / (2.0 * tau)).mul_(logit_weight * tau / 2.0)
        else:
            logit = binary_kl(z2, t, tau)
            if need_grad and logit_weight:
                dz2 = (torch.sigmoid(z2 / tau) - torch.sigmoid(t / tau)).mul_(logit_weight * tau)
    return (ce, kd, logit), (dz1, dz2)


class ChunkedDualHeadKD(torch.autograd.Function):
    """Autograd Function of the torch path; see the module docstring for the plan and memory bound."""

    @staticmethod
    def forward(ctx, features, head_weight, head_bias, aux_features, aux_weight, aux_bias,
                teacher_logits, labels, opts):
        shared = aux_features is None
        aux_x = features if shared else aux_features
        inputs = (features, head_weight, head_bias, aux_x, aux_weight, aux_bias)
        cdt = torch.float64 if any(x is not None and x.dtype == torch.float64 for x in inputs) \
            else torch.float32
        need_grad = any(ctx.needs_input_grad[:6])
        n, c = teacher_logits.shape
        ce_w, kd_w, lg_w = opts["ce_weight"], opts["kd_weight"], opts["logit_weight"]
        comps = opts["return_components"]
        need = dict(need_ce=bool(ce_w) or comps, need_kd=bool(kd_w) or comps,
                    need_logit=bool(lg_w) or comps)

        valid_all = labels != opts["ignore_index"]
        n_valid = valid_all.sum()
        scale = 1.0
        if opts["reduction"] == "mean":
            scale = 1.0 / max(int(n_valid), 1)

        dev = features.device
        w1 = head_weight.to(cdt)
        w2 = aux_weight.to(cdt)
        b1 = None if head_bias is None else head_bias.to(cdt)
        b2 = None if aux_bias is None else aux_bias.to(cdt)
        sums = torch.zeros(3, dtype=cdt, device=dev)
        correct = torch.zeros((), dtype=torch.int64, device=dev)
        if need_grad:
            gx = torch.empty(features.shape, dtype=cdt, device=dev)
            ga = None if shared else torch.empty(aux_x.shape, dtype=cdt, device=dev)
            gw1 = torch.zeros_like(w1)
            gw2 = torch.zeros_like(w2)
            gb1 = torch.zeros(c, dtype=cdt, device=dev)
            gb2 = torch.zeros(c, dtype=cdt, device=dev)

        rows = max(1, opts["chunk_elements"] // max(c, 1))
        for s in range(0, n, rows):
            e = min(n, s + rows)
            x = features[s:e].to(cdt)
            a = x if shared else aux_x[s:e].to(cdt)
            z1 = F.linear(x, w1, b1)
            z2 = F.linear(a, w2, b2)
            t = teacher_logits[s:e].to(cdt)
            valid = valid_all[s:e]
            y = torch.where(valid, labels[s:e], torch.zeros_like(labels[s:e])).long()
            losses, (dz1, dz2) = row_losses_and_grads(
                z1, z2, t, y, kd_temperature=opts["kd_temperature"],
                logit_temperature=opts["logit_temperature"], logit_loss=opts["logit_loss"],
                need_grad=need_grad, ce_weight=ce_w, kd_weight=kd_w, logit_weight=lg_w, **need)
            vmask = valid.to(cdt)
            for k, term in enumerate(losses):
                if term is not None:
                    sums[k] += (term * vmask).sum()
            if comps:
                correct += ((z1.argmax(-1) == y) & valid).sum()
            if not need_grad:
                continue
            row_scale = (vmask * scale).unsqueeze(-1)
            dz1 = torch.zeros_like(z1) if dz1 is None else dz1.mul_(row_scale)
            dz2 = torch.zeros_like(z2) if dz2 is None else dz2.mul_(row_scale)
            gx[s:e] = dz1 @ w1
            if shared:
                gx[s:e] += dz2 @ w2
            else:
                ga[s:e] = dz2 @ w2
            gw1.addmm_(dz1.t(), x)
            gw2.addmm_(dz2.t(), a)
            gb1 += dz1.sum(0)
            gb2 += dz2.sum(0)

        terms = sums * scale
        loss = ce_w * terms[0] + kd_w * terms[1] + lg_w * terms[2]
        if need_grad:
            ctx.save_for_backward(
                gx.to(features.dtype), None if shared else ga.to(aux_x.dtype),
                gw1.to(head_weight.dtype), None if head_bias is None else gb1.to(head_bias.dtype),
                gw2.to(aux_weight.dtype), None if aux_bias is None else gb2.to(aux_bias.dtype))
        ctx.mark_non_differentiable(terms, correct, n_valid)
        return loss, terms, correct, n_valid

    @staticmethod
    def backward(ctx, grad_loss, *_):
        gx, ga, gw1, gb1, gw2, gb2 = ctx.saved_tensors
        needs = ctx.needs_input_grad

        def scaled(g, k):
            return g * grad_loss.to(g.dtype) if (g is not None and needs[k]) else None

        return (scaled(gx, 0), scaled(gw1, 1), scaled(gb1, 2), scaled(ga, 3), scaled(gw2, 4),
                scaled(gb2, 5), None, None, None)


def chunked_dual_head_kd_loss(features, head_weight, head_bias, aux_weight, aux_bias, teacher_logits,
                              labels, *, aux_features, chunk_elements=None, **opts):
    """Run the torch path; returns (loss, terms[3], correct, n_valid). Inputs must be validated."""
    opts["chunk_elements"] = chunk_elements or DEFAULT_CHUNK_ELEMENTS
    with torch.autocast(device_type=features.device.type, enabled=False):
        return ChunkedDualHeadKD.apply(features, head_weight, head_bias, aux_features, aux_weight,
                                       aux_bias, teacher_logits, labels, opts)
