"""The ``backend="torch"`` path: chunked PyTorch with an analytic backward (the CPU and float64 path).

Rows are processed in chunks of ``max(1, chunk_elements // C)`` rows. For each chunk the forward
computes both heads' logits (one product per head, in the matmul operands' dtype, as eager PyTorch
does), the per-row losses in fp32 (fp64 for float64 operands) and, when any input needs a gradient,
dz1, dz2 and their products dX = dZ W and dW = dZ^T X: the matmul work is the GEMM floor, nothing is
recomputed, and ``backward`` only multiplies the stored gradients by ``grad_output`` (into new
tensors, so a call can be back-propagated more than once).

Rows outside V (label == ignore_index) are zeroed before any arithmetic, so garbage there (NaN
included) reaches no result. A teacher logit of -inf is a masked class (see ``reference``). Nothing
reads a device value on the host: |V| and the mean's 1/|V| stay tensors, so on CUDA the path does not
synchronise; a valid row whose label is outside [0, C) there gets a NaN loss and NaN gradients (CPU
labels are checked before the call).

Memory bound, beyond inputs and gradients: about eight buffers of one chunk in the epilogue dtype
(fp32: 8 x 4 x max(chunk_elements, C) bytes, ~32 MiB at the default 2**20 elements; docs/kernels.md
has the measured peak) and fp32 copies of one chunk's 16-bit logits. For 16-bit operands every
gradient is held in fp32 from the forward until the backward has scaled it by grad_output (twice the
inputs' gradient bytes; one rounding to 16 bits, after the scaling and after the sum over row chunks,
where eager autograd rounds once too), and off CUDA the dX products read fp32 copies of the weights.

Gradients of the per-element losses (s = softmax, sig = sigmoid):
    dCE/dz1       = s(z1) - onehot(y)
    dKD/dz1       = T (s(z1/T) - s(t/T))
    dBinaryKL/dz2 = tau (sig(z2/tau) - sig(t/tau))
    dBKLNorm/dz2  = (tau / 2) tanh((z2 - t) / (2 tau))
    dZ/dz1        = 2 logsumexp(z1) s(z1)                          (z-loss)
    softcap       z -> cap tanh(z / cap): each dz above times 1 / cosh^2(z / cap), in the same chunk
Reverse KL and the generalised JSD: see :mod:`._divergence`. The LLM options cost a Python-level branch
each; at their defaults the path runs exactly as without them. A softcap holds one more chunk buffer per
head (its derivative) until the chunk's dz is formed.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .._validation import env_flag
from ..reference import binary_kl, valid_rows
from . import TeacherHead
from ._divergence import softmax_divergence_terms
from .vocab_parallel import main_head_sharded, reduce_features_grad_, reduce_rows_

DEFAULT_CHUNK_ELEMENTS = 2**20
_POISON = env_flag("DHKD_DEBUG_POISON")  # as the triton op: unwritten gradient memory reads as NaN


def _empty(*shape, dtype, device):
    """``torch.empty``, NaN-filled under DHKD_DEBUG_POISON=1 (or ``_POISON`` set by a test)."""
    out = torch.empty(*shape, dtype=dtype, device=device)
    return out.fill_(float("nan")) if _POISON else out

SECOND_BACKWARD = ("fused_dual_head_kd_loss (backend='{}') computes its gradients in the forward and scales "
                   "them in place in the backward, so one call can be back-propagated once: a second "
                   "backward through it (retain_graph=True) is not supported. Call the loss again, or use "
                   "backend='torch' or 'reference'.")

_DOUBLE_BACKWARD = ("fused_dual_head_kd_loss (backend='torch') has no second derivative: its backward ran with "
                    "create_graph=True (double backward, e.g. a gradient penalty). Use backend='reference' "
                    "(plain PyTorch autograd) for higher-order gradients.")


def main_head(z, t, y, o, *, kd_stats, grad_ce, grad_kd, grad_z=False):
    """CE (label-smoothed when o["label_smoothing"] > 0), the KD divergence (o["kd_divergence"]) and, when
    o["z_loss_weight"] is set, the z-loss logsumexp(z)^2 per row of one chunk, and the weighted dz1 (or
    None): returns (ce, kd or None, z_loss or None, dz). ``z`` (n, C) is consumed."""
    ce_w, kd_w, T = o["ce_weight"], o["kd_weight"], o["kd_temperature"]
    zl_w = o.get("z_loss_weight", 0.0)
    eps = o.get("label_smoothing", 0.0)
    c = z.shape[-1]
    zl = zdz = None
    if zl_w:
        lse = torch.logsumexp(z, dim=-1)
        zl = lse.square()
    lp = F.log_softmax(z, dim=-1)
    lp_y = lp.gather(-1, y.unsqueeze(-1))
    ce = -lp_y.squeeze(-1)
    if eps:
        ce = (1.0 - eps) * ce - eps * lp.mean(-1)
    kd = dz = None
    if grad_z:  # d(lambda lse^2)/dz = 2 lambda lse softmax(z)
        zdz = lp.exp().mul_(lse.mul(2.0 * zl_w).unsqueeze(-1))
    if grad_ce:
        # dCE/dz = p - (1 - eps) onehot - eps / C; the target column p_y - 1 as expm1(log p_y), exact
        # for confident rows (p_y - 1 in fp32 is not)
        dz = lp.exp_()
        if eps:
            dz.sub_(eps / c)
        dz.mul_(ce_w)
        dz.scatter_(-1, y.unsqueeze(-1), torch.expm1(lp_y).add_(eps - eps / c).mul_(ce_w))
    del lp
    if zdz is not None:
        dz = zdz if dz is None else dz.add_(zdz)
    divergence, beta = o.get("kd_divergence", "forward_kl"), o.get("jsd_beta", 0.5)
    if divergence == "jsd" and beta in (0.0, 1.0):  # the endpoints are the named divergences
        divergence = "forward_kl" if beta == 0.0 else "reverse_kl"
    if kd_stats:
        log_ps = F.log_softmax(z.mul_(1.0 / T), dim=-1)
        log_pt = F.log_softmax(t / T, dim=-1)
        masked = torch.isneginf(t)
        kd, g = softmax_divergence_terms(log_ps, log_pt, masked, T, divergence, beta, grad=grad_kd)
        kd = torch.where(masked.all(-1), float("nan"), kd)  # no teacher distribution at all
        if grad_kd:
            g.mul_(kd_w * T)
            dz = g if dz is None else dz.add_(g)
    return ce, kd, zl, dz


def _softcap(z, cap, *, grad):
    """z -> cap tanh(z / cap) in place, and the derivative 1 - tanh^2 = 1 / cosh^2 (accurate where tanh
    saturates) when ``grad``, else None."""
    u = z.mul_(1.0 / cap)
    d = torch.cosh(u).square_().reciprocal_() if grad else None
    return u.tanh_().mul_(cap), d


def _softcap_teacher(t, cap):
    """cap tanh(t / cap), keeping -inf (a masked class) as it is."""
    return torch.where(torch.isneginf(t), t, torch.tanh(t / cap).mul_(cap))


_LN2 = 0.6931471805599453


def _log_cosh(a):
    """log cosh(a) for a >= 0: log1p(cosh a - 1) with cosh a - 1 = expm1(a)^2 / (2 (1 + expm1(a)))
    (exact to rounding, small a included; vectorized expm1 where sinh is not) up to 20, a - log 2 beyond
    (where e^(-2a) is below fp32's and fp64's resolution of the result)."""
    em = torch.expm1(a.clamp(max=20.0))
    small = em.square().div_(em.add(1.0).mul_(2.0)).log1p_()
    return torch.where(a > 20.0, a - _LN2, small)


def aux_head(z2, t, o, *, grad):
    """The logit-level loss per row of one chunk and the weighted dz2 (or None). ``z2`` is consumed.

    A masked class (t = -inf) is given the gap 0, whose loss and gradient are both 0."""
    tau, lg_w = o["logit_temperature"], o["logit_weight"]
    keep = t != float("-inf")
    dz = None
    if o["logit_loss"] == "binary_kl_norm":
        u = z2.sub_(t).mul_(0.5 / tau).masked_fill_(~keep, 0.0)
        logit = (tau * tau) * _log_cosh(u.abs()).sum(-1)
        if grad:
            dz = u.tanh_().mul_(lg_w * tau / 2.0)
    else:
        t0 = torch.where(keep, t, 0.0)
        z2.masked_fill_(~keep, 0.0)
        logit = binary_kl(z2, t0, tau)
        if grad:
            dz = torch.sigmoid(z2.mul_(1.0 / tau)).sub_(torch.sigmoid(t0.mul_(1.0 / tau))).mul_(lg_w * tau)
    return logit, dz


def _logits(x, w, b, edt):
    """x w^T + b in the epilogue dtype: one product with the bias in the operands' dtype (accumulated
    in fp32 and rounded once, as eager ``F.linear`` does), then widened to edt. Adding the bias after
    rounding x w^T would round differently from eager and, for 16-bit operands, could be further from
    the exact logits than eager's own error."""
    z = F.linear(x, w, None if b is None else b.to(x.dtype))
    return z if z.dtype == edt else z.to(edt)


_HAS_MM_DTYPE = hasattr(torch.ops.aten.mm, "dtype")


def _addmm(acc, a, b, edt, b_edt=None):
    """acc + a @ b in edt, into acc (acc None: a new a @ b). 16-bit operands are multiplied as they are,
    accumulated in fp32 and not rounded back to 16 bits: one mixed-precision product on CUDA, fp32
    copies of the operands elsewhere (``b_edt``: b's copy, when the caller reuses it)."""
    global _HAS_MM_DTYPE
    if a.dtype != edt and a.device.type == "cuda" and _HAS_MM_DTYPE:
        try:
            prod = torch.ops.aten.mm.dtype(a, b, edt)
        except (RuntimeError, NotImplementedError):  # a build without it for these dtypes: fp32 copies
            _HAS_MM_DTYPE = False
        else:
            return prod if acc is None else acc.add_(prod)
    if a.dtype != edt:
        a, b = a.to(edt), (b.to(edt) if b_edt is None else b_edt)
    return a @ b if acc is None else acc.addmm_(a, b)


def _teacher_rows(teacher, s, e, edt):
    """Rows [s, e) of the teacher logits in the epilogue dtype: a slice of the tensor, or the product of
    the teacher head for those rows only (the (N, C) teacher logits are never formed)."""
    if isinstance(teacher, TeacherHead):
        tf, tw = teacher.features[s:e], teacher.weight
        tdt = torch.promote_types(tf.dtype, tw.dtype)
        z = F.linear(tf.to(tdt), tw.to(tdt)).to(edt)
        return z if teacher.bias is None else z.add_(teacher.bias.to(edt))
    return teacher[s:e].to(edt)


def _run(features, head_weight, head_bias, aux_features, aux_weight, aux_bias, teacher, labels, opts, *,
         need_grad, row_weight=None, needs=(True,) * 6):
    """One pass over the row chunks: per-row terms (3, N), (4, N) with the z-loss (rows outside V 0, bad
    labels NaN), the per-row correct flags, |V|, and with ``need_grad`` the gradients of
    sum_i w_i (ce_w CE_i + kd_w KD_i + lg_w L_i [+ zl_w Z_i]) with w_i = row_weight[i] (or 1) times 1/|V|
    for "mean"."""
    shared = aux_features is None
    mdt = features.dtype
    edt = torch.float64 if mdt == torch.float64 else torch.float32
    n = labels.shape[0]
    c = head_weight.shape[0]
    dev = features.device
    ce_w, kd_w, lg_w = opts["ce_weight"], opts["kd_weight"], opts["logit_weight"]
    zl_w = opts.get("z_loss_weight", 0.0)
    cap, tcap = opts.get("softcap"), opts.get("teacher_softcap")
    comps = opts["return_components"]
    main = bool(ce_w) or bool(kd_w) or bool(zl_w) or comps
    kd_stats = bool(kd_w) or comps
    aux = bool(lg_w) or comps
    g_main = need_grad and (bool(ce_w) or bool(kd_w) or bool(zl_w))
    g_aux = need_grad and bool(lg_w)

    vp = opts.get("vocab_parallel")  # a VocabShard: this rank holds classes [start, start + c) of vp.total
    valid_all = valid_rows(labels, opts["ignore_index"])
    n_valid = valid_all.sum()
    # a valid row with a label outside [0, C): NaN loss and NaN gradients (never a host sync)
    bad_all = valid_all & ((labels < 0) | (labels >= (c if vp is None else vp.total)))
    row_factor = torch.where(bad_all, float("nan"), valid_all.to(edt))
    scale = (1.0 / n_valid.clamp(min=1).to(edt)) if opts["reduction"] == "mean" \
        else torch.ones((), dtype=edt, device=dev)
    if row_weight is None:
        grad_factor = row_factor * scale
    else:  # 0 at the rows outside V, even where the caller's grad_output holds NaN or inf
        grad_factor = row_factor * scale * torch.where(valid_all, row_weight.to(edt), 0.0)
    vcol = valid_all.unsqueeze(-1)
    zero = torch.zeros((), dtype=mdt, device=dev)
    b1, b2 = head_bias, aux_bias
    per_row = torch.zeros(4 if zl_w else 3, n, dtype=edt, device=dev)
    correct = torch.zeros(n, dtype=torch.bool, device=dev)
    aux_x = features if shared else aux_features
    grads = None
    rows = max(1, opts["chunk_elements"] // max(c, 1))
    if vp is not None:  # the same row chunks on every rank (their collectives must match)
        rows = max(1, opts["chunk_elements"] // -(-vp.total // vp.world))
    if need_grad:
        # every gradient is held in edt (fp32 for 16-bit operands) until the backward has scaled it by
        # grad_output: one rounding to the input's dtype, after the scaling, as in eager autograd
        gx = _empty(features.shape, dtype=edt, device=dev)
        ga = None if shared else _empty(aux_x.shape, dtype=edt, device=dev)
        gw, gb = [None, None], [None, None]
        w32 = [None, None]  # edt copies of 16-bit weights for the dX products off CUDA, made once

    for s in range(0, n, rows):
        e = min(n, s + rows)
        v = vcol[s:e]
        x = torch.where(v, features[s:e], zero)  # rows outside V never reach a result
        a = x if shared else torch.where(v, aux_x[s:e], zero)
        t = torch.where(v, _teacher_rows(teacher, s, e, edt), torch.zeros((), dtype=edt, device=dev))
        if tcap is not None:
            t = _softcap_teacher(t, tcap)
        ok = valid_all[s:e] & ~bad_all[s:e]
        y = torch.where(ok, labels[s:e], torch.zeros_like(labels[s:e])).long()
        rf = row_factor[s:e]
        dz1 = dz2 = None
        if main:
            z1 = _logits(x, head_weight, b1, edt)
            d1 = None
            if cap is not None:  # the softcap's derivative is applied to dz1 below
                z1, d1 = _softcap(z1, cap, grad=g_main)
            if vp is not None:  # global statistics from O(n) per-row all-reduces; kd is this rank's part
                ce, kd, zl, dz1, right = main_head_sharded(
                    z1, t, y, ok, opts, vp, kd_stats=kd_stats, grad_ce=g_main and bool(ce_w),
                    grad_kd=g_main and bool(kd_w), grad_z=g_main and bool(zl_w), comps=comps)
                if comps:
                    correct[s:e] = right
            else:
                if comps:
                    correct[s:e] = (z1.argmax(-1) == y) & ok
                ce, kd, zl, dz1 = main_head(z1, t, y, opts, kd_stats=kd_stats, grad_ce=g_main and bool(ce_w),
                                            grad_kd=g_main and bool(kd_w), grad_z=g_main and bool(zl_w))
            del z1
            if d1 is not None and dz1 is not None:
                dz1.mul_(d1)
            del d1
            per_row[0, s:e] = ce * rf
            if kd is not None:
                per_row[1, s:e] = kd * rf
            if zl is not None:
                per_row[3, s:e] = zl * rf
        if aux:
            z2 = _logits(a, aux_weight, b2, edt)
            d2 = None
            if cap is not None:
                z2, d2 = _softcap(z2, cap, grad=g_aux)
            logit, dz2 = aux_head(z2, t, opts, grad=g_aux)
            del z2
            if d2 is not None and dz2 is not None:
                dz2.mul_(d2)
            del d2
            per_row[2, s:e] = logit * rf
        if not need_grad:
            continue
        row_scale = grad_factor[s:e].unsqueeze(-1)
        gx_rows = None
        for head, dz, w, feats, to_x in ((0, dz1, head_weight, x, True), (1, dz2, aux_weight, a, shared)):
            if dz is None:
                continue
            dz.mul_(row_scale)
            need_w, need_b = needs[1 + 3 * head], needs[2 + 3 * head]
            need_in = needs[0] if to_x else needs[3]
            if need_b:
                part = dz.sum(0)
                gb[head] = part if gb[head] is None else gb[head].add_(part)
            dzm = dz.to(mdt)  # the products' operands in the operand dtype
            if need_w:  # only the products whose input asked for a gradient
                gw[head] = _addmm(gw[head], dzm.t(), feats, edt)
            if need_in:
                if w.dtype != edt and not (dev.type == "cuda" and _HAS_MM_DTYPE) and w32[head] is None:
                    w32[head] = w.to(edt)
                if to_x:
                    gx_rows = _addmm(gx_rows, dzm, w, edt, w32[head])
                else:
                    ga[s:e] = _addmm(None, dzm, w, edt, w32[head])
        gx[s:e] = 0 if gx_rows is None else gx_rows
        if not shared and (dz2 is None or not needs[3]):
            ga[s:e] = 0
    if vp is not None and n:  # the KD and logit-level rows hold this rank's partial sums so far
        reduce_rows_(per_row, slice(1, 3), vp)
        if need_grad and needs[0]:
            reduce_features_grad_(gx, vp)
        if need_grad and not shared and needs[3]:
            reduce_features_grad_(ga, vp)
    if need_grad:  # a head with no dz (no term, no rows, no gradient wanted) contributes zeros
        gw = [torch.zeros(m.shape, dtype=edt, device=dev) if g is None and needs[1 + 3 * h] else g
              for h, (g, m) in enumerate(zip(gw, (head_weight, aux_weight)))]
        gb = [torch.zeros(c, dtype=edt, device=dev) if g is None and needs[2 + 3 * h] else g
              for h, g in enumerate(gb)]
        grads = (gx, ga, gw[0], None if head_bias is None else gb[0],
                 gw[1], None if aux_bias is None else gb[1])
    return per_row, correct, n_valid, scale, grads


class ChunkedDualHeadKD(torch.autograd.Function):
    """Autograd Function of the torch path; see the module docstring for the plan and memory bound.
    The matmul operands arrive in one dtype (cast by :func:`chunked_dual_head_kd_loss`)."""

    @staticmethod
    def forward(ctx, features, head_weight, head_bias, aux_features, aux_weight, aux_bias, teacher_logits,
                labels, teacher_features, teacher_weight, teacher_bias, opts):
        teacher = teacher_logits if teacher_logits is not None else \
            TeacherHead(teacher_features, teacher_weight, teacher_bias)
        need_grad = any(ctx.needs_input_grad[:6])
        needs = tuple(ctx.needs_input_grad[:6])
        per_row, correct, n_valid, scale, grads = _run(
            features, head_weight, head_bias, aux_features, aux_weight, aux_bias, teacher, labels, opts,
            need_grad=need_grad, needs=needs)
        weights = (opts["ce_weight"], opts["kd_weight"], opts["logit_weight"]) + \
            ((opts["z_loss_weight"],) if opts.get("z_loss_weight") else ())
        none = opts["reduction"] == "none"
        terms = per_row if none else per_row.sum(-1) * scale
        loss = torch.zeros(terms.shape[1:], dtype=terms.dtype, device=terms.device)
        for k, w in enumerate(weights):
            if w:  # a term outside the loss cannot reach it, NaN or not
                loss = loss + w * terms[k]
        correct_out = correct if none else correct.sum()
        if need_grad:
            ctx.opts = opts
            ctx.needs = needs
            ctx.grad_dtypes = tuple(None if m is None else m.dtype for m in (features, head_weight, head_bias,
                                                                             aux_features, aux_weight, aux_bias))
            ctx.n_grads = len(grads)
            if none:  # a non-uniform grad_output recomputes with per-row weights: keep the inputs, under
                # autograd's version checks (an in-place change before the backward raises)
                ctx.save_for_backward(*grads, features, head_weight, head_bias, aux_features, aux_weight, aux_bias,
                                      teacher_logits, labels, teacher_features, teacher_weight, teacher_bias)
            else:
                ctx.save_for_backward(*grads)
        ctx.mark_non_differentiable(terms, correct_out, n_valid)
        return loss, terms, correct_out, n_valid

    @staticmethod
    def backward(ctx, grad_loss, *_):
        if torch.is_grad_enabled():
            raise RuntimeError(_DOUBLE_BACKWARD)
        needs = ctx.needs_input_grad
        saved = ctx.saved_tensors
        stored = saved[:ctx.n_grads]
        if grad_loss.dim() == 0 or grad_loss.numel() <= 1 or grad_loss.stride(0) == 0:
            # a scalar, or the expanded scalar of .sum(): the stored gradients times one number (new
            # tensors, so the call can be back-propagated again: retain_graph=True, gradcheck)
            g0 = grad_loss if grad_loss.dim() == 0 else (
                grad_loss.as_strided((), ()) if grad_loss.numel() else grad_loss.new_zeros(()))
            grads = [None if gr is None else gr * g0.to(gr.dtype) for gr in stored]
        else:  # per-row weights (reduction="none"): one more pass with the weights folded into dz
            (x, w1, b1, a, w2, b2, t, y, tf, tw, tb) = saved[ctx.n_grads:]
            teacher = t if t is not None else TeacherHead(tf, tw, tb)
            grads = list(_run(x, w1, b1, a, w2, b2, teacher, y, ctx.opts, need_grad=True, row_weight=grad_loss,
                              needs=ctx.needs)[4])
        gx, ga, gw1, gb1, gw2, gb2 = grads
        out = [g.to(dt) if (g is not None and needs[k]) else None
               for k, (g, dt) in enumerate(zip((gx, gw1, gb1, ga, gw2, gb2), ctx.grad_dtypes))]
        return tuple(out) + (None,) * 6


def chunked_dual_head_kd_loss(features, head_weight, head_bias, aux_weight, aux_bias, teacher_logits,
                              labels, *, aux_features, chunk_elements=None, **opts):
    """Run the torch path; returns (loss, terms[3] (terms[4] with the z-loss: ce, kd, logit, z_loss),
    correct, n_valid). Inputs must be validated.

    The matmul operands are cast to one dtype first (autocast's, else their promoted dtype; the
    gradients flow back through the casts to each input's dtype)."""
    from ..reference import _operand_dtype
    opts["chunk_elements"] = chunk_elements or DEFAULT_CHUNK_ELEMENTS
    mats = [features, head_weight, aux_weight] + ([aux_features] if aux_features is not None else [])
    mdt = _operand_dtype(mats, features.device.type)
    features, head_weight, aux_weight = (m.to(mdt) for m in (features, head_weight, aux_weight))
    aux_features = None if aux_features is None else aux_features.to(mdt)
    if isinstance(teacher_logits, TeacherHead):
        teacher = (None,) + tuple(teacher_logits)
    else:
        teacher = (teacher_logits, None, None, None)
    with torch.autocast(device_type=features.device.type, enabled=False):
        return ChunkedDualHeadKD.apply(features, head_weight, head_bias, aux_features, aux_weight,
                                       aux_bias, teacher[0], labels, *teacher[1:], opts)
