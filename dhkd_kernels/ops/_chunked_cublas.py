"""The chunked plan (logits larger than the memory budget): cuBLAS products over class slabs and row
chunks; the forward computes the gradients (for a grad_output of 1), the backward scales them."""
from __future__ import annotations

from typing import List

import torch
from torch import Tensor

from . import _epilogue_kernels as E
from ._launch import (_buffer, _empty, _epilogue, _launch, _mm, _ones, _opts, _scale, _scale_jobs, _teacher_block,
                      _teacher_kind, _zero)
from ._plan import F32, _epi_config, _interpreted, _kind, _ld

def _forward_chunked(wk, plan, o, x, w1, b1, a, w2, b2, t, y, rows, n_valid, needs, row_weight=None,
                     out_grads=None):
    """Chunked plan (see the module docstring): mode "slabs" runs the auxiliary head in class slabs,
    then the main head in row chunks; mode "rows" (a teacher head both heads need) runs both heads in
    row chunks, computing each chunk's teacher logits once. Gradients are scaled by 1/|V| here (and
    by ``row_weight`` in the recompute of a per-row grad_output) and by grad_output in the backward."""
    dev = x.device
    n, c, d, da, dt = wk.n, wk.c, wk.d, wk.da, x.dtype
    a_ = x if wk.shared else a
    kind = _kind(dt, o.tf32)
    th = t if isinstance(t, (tuple, list)) else None
    need_x, need_w1, need_b1, need_a, need_w2, need_b2 = wk.need
    xs = as_ = accx = acca = gb1_acc = gb2_acc = None
    rows_mode = plan.mode == "rows"
    if wk.grad:
        _launch(E.count_kernel, (1,), y, n_valid, n, o.ignore_index, name="count_kernel",
                nbytes=n * y.element_size(), BLOCK=16 if _interpreted(dev) else 2048, **_opts(16, 1, dev))
        if (wk.g_main and need_w1) or (wk.shared and wk.g_aux and need_w2):
            xs = _buffer((n, d), dt, dev)
            _scale(x, xs, y, None, n_valid, mask_rows=True, mean=o.mean, ignore_index=o.ignore_index)
        if not wk.shared and wk.g_aux and need_w2:
            as_ = _buffer((n, da), dt, dev)
            _scale(a, as_, y, None, n_valid, mask_rows=True, mean=o.mean, ignore_index=o.ignore_index)
        if need_x and (wk.g_main or (wk.shared and wk.g_aux)):
            accx = _buffer((n, d), F32, dev) if not wk.f32 else None
        if need_a and wk.g_aux:
            acca = _buffer((n, da), F32, dev) if not wk.f32 else None
        # bias gradients: dZ^T 1 (dz is 0 on rows outside V) summed in fp32 by the products, scaled at the end
        gb1_acc = _buffer((c,), F32, dev) if need_b1 else None
        gb2_acc = _buffer((c,), F32, dev) if need_b2 else None
        ones = _ones(n if not rows_mode and wk.aux else plan.rows, dt, dev) if (need_b1 or need_b2) else None
    # every input that asked for a gradient gets one (zeros where no term reaches it)
    if out_grads is not None:  # the recompute writes into the gradients stored by the forward
        gx, gw1, gb1, ga, gw2, gb2 = (gr if (nd and r is not None) else None
                                      for gr, r, nd in zip(out_grads, (x, w1, b1, a, w2, b2), needs))
    else:
        gx, gw1, gb1, ga, gw2, gb2 = (_buffer(r.shape, r.dtype, dev) if (nd and r is not None) else None
                                      for r, nd in zip((x, w1, b1, a, w2, b2), needs))
    if wk.f32:
        accx = gx if (need_x and (wk.g_main or (wk.shared and wk.g_aux))) else None
        acca = ga if (need_a and wk.g_aux) else None
    te = th[0].dtype if th is not None else None
    tkind = _teacher_kind(th, o.tf32) if th is not None else ""

    def teacher(r0, rc, c0, cc, buf):
        """The teacher block for the epilogue and its (row, class) origin."""
        if th is None:
            return t, 0, 0
        _teacher_block(th, r0, rc, c0, cc, buf, tkind)
        return buf, r0, c0

    if rows_mode:
        ldc = _ld(c)
        per = plan.rows * ldc
        zbuf = _buffer((2 * per,), dt, dev)
        tbuf = _buffer((per,), te, dev)
        for r0 in range(0, n, plan.rows):
            rc = min(plan.rows, n - r0)
            z1 = zbuf[: rc * ldc].view(rc, ldc)[:, :c]
            z2 = zbuf[per: per + rc * ldc].view(rc, ldc)[:, :c]
            _mm(x[r0:r0 + rc], w1.t(), z1, kind=kind)
            _mm(a_[r0:r0 + rc], w2.t(), z2, kind=kind)
            tb_, tr0, tc0 = teacher(r0, rc, 0, c, tbuf[: rc * ldc].view(rc, ldc)[:, :c])
            br, bc, warps = _epi_config(plan.rows, c, wk.elem, dev)
            _epilogue(wk, o, z1, z2, tb_, y, b1, b2, rows, r0=r0, R=rc, c0=0, W=c, main=True, aux=True,
                      g_ce=wk.g_main and bool(o.ce_w), g_kd=wk.g_main and bool(o.kd_w), g_aux=wk.g_aux,
                      acc_logit=False, br=br, bc=bc, warps=warps, t_row0=tr0, t_col0=tc0, w=row_weight)
            if not wk.grad:
                continue
            for dz, acc in ((z1, gb1_acc), (z2, gb2_acc)):
                if acc is not None:
                    _mm(dz.t(), ones[:rc], acc.view(-1, 1), beta=int(r0 > 0), kind=kind)
            if need_w1:
                _mm(z1.t(), xs[r0:r0 + rc], gw1, beta=int(r0 > 0), kind=kind)
            if need_w2:
                _mm(z2.t(), (xs if wk.shared else as_)[r0:r0 + rc], gw2, beta=int(r0 > 0), kind=kind)
            if accx is not None:
                pairs = ([(z1, w1)] if wk.g_main else []) + ([(z2, w2)] if (wk.shared and wk.g_aux) else [])
                for i, (dz, w) in enumerate(pairs):
                    _mm(dz, w, accx[r0:r0 + rc], beta=int(i > 0), kind=kind)
            if acca is not None:
                _mm(z2, w2, acca[r0:r0 + rc], kind=kind)
        return [gx, gw1, gb1, ga, gw2, gb2, accx, acca, gb1_acc, gb2_acc]

    ldc, slab_cols = _ld(c), _ld(plan.slab)
    zbuf = _buffer((max(plan.rows * ldc * int(wk.main), n * slab_cols * int(wk.aux)),), dt, dev)
    need_t = th is not None and (wk.aux or wk.t_main)
    tbuf = _buffer((max(plan.rows * ldc * int(wk.t_main), n * slab_cols * int(wk.aux)),), te, dev) if need_t else None
    x_acc_started = False
    if wk.aux:
        dxa = accx if wk.shared else acca  # where dz2 W2 goes
        for s0 in range(0, c, plan.slab):
            sc = min(plan.slab, c - s0)
            # row stride rounded up to 16 elements: every slab, the last included, has aligned rows
            # (and the epilogue one specialization for all of them)
            z2 = zbuf[: n * _ld(sc)].view(n, _ld(sc))[:, :sc]
            _mm(a_, w2[s0:s0 + sc].t(), z2, kind=kind)
            tb_, tr0, tc0 = teacher(0, n, s0, sc, None if tbuf is None else
                                    tbuf[: n * _ld(sc)].view(n, _ld(sc))[:, :sc])
            br, bc, warps = _epi_config(n, plan.slab, wk.elem, dev)  # one config for every slab
            _epilogue(wk, o, None, z2, tb_, y, None, b2, rows, r0=0, R=n, c0=s0, W=sc, main=False,
                      aux=True, g_ce=False, g_kd=False, g_aux=wk.g_aux, acc_logit=s0 > 0,
                      br=br, bc=bc, warps=warps, t_row0=tr0, t_col0=tc0, w=row_weight)
            if not wk.g_aux:
                continue
            if gb2_acc is not None:
                _mm(z2.t(), ones, gb2_acc[s0:s0 + sc].view(-1, 1), kind=kind)
            if need_w2:
                _mm(z2.t(), xs if wk.shared else as_, gw2[s0:s0 + sc], kind=kind)
            if dxa is not None:
                _mm(z2, w2[s0:s0 + sc], dxa, beta=int(s0 > 0), kind=kind)
                x_acc_started = wk.shared
    if wk.main:
        for r0 in range(0, n, plan.rows):
            rc = min(plan.rows, n - r0)
            z1 = zbuf[: rc * ldc].view(rc, ldc)[:, :c]
            _mm(x[r0:r0 + rc], w1.t(), z1, kind=kind)
            tb_, tr0, tc0 = (teacher(r0, rc, 0, c, tbuf[: rc * ldc].view(rc, ldc)[:, :c]) if (need_t and wk.t_main)
                             else (t if th is None else _empty(dev).view(1, 0), 0, 0))
            br, bc, warps = _epi_config(plan.rows, c, wk.elem, dev)  # one config for every chunk
            _epilogue(wk, o, z1, None, tb_, y, b1, None, rows, r0=r0, R=rc, c0=0, W=c, main=True,
                      aux=False, g_ce=wk.g_main and bool(o.ce_w), g_kd=wk.g_main and bool(o.kd_w), g_aux=False,
                      acc_logit=False, br=br, bc=bc, warps=warps, t_row0=tr0, t_col0=tc0, w=row_weight)
            if not wk.g_main:
                continue
            if gb1_acc is not None:
                _mm(z1.t(), ones[:rc], gb1_acc.view(-1, 1), beta=int(r0 > 0), kind=kind)
            if need_w1:
                _mm(z1.t(), xs[r0:r0 + rc], gw1, beta=int(r0 > 0), kind=kind)
            if need_x:
                _mm(z1, w1, accx[r0:r0 + rc], beta=int(x_acc_started), kind=kind)
    return [gx, gw1, gb1, ga, gw2, gb2, accx, acca, gb1_acc, gb2_acc]


def _finish_chunked(wk, o, y, n_valid, state):
    """dX (dA) and the biases from their fp32 accumulators times 1/|V| (and cast); zeros for the
    gradients no term reaches."""
    gx, gw1, gb1, ga, gw2, gb2, accx, acca, gb1_acc, gb2_acc = state
    need_x, need_w1, need_b1, need_a, need_w2, need_b2 = wk.need
    fed = [accx is not None, need_w1, need_b1, acca is not None, need_w2, need_b2]
    jobs = [(acc, g, False) for g, acc in ((gx, accx), (ga, acca)) if g is not None and acc is not None]
    b1_on, b2_on = gb1 is not None and need_b1, gb2 is not None and need_b2
    bias = None
    if b1_on or b2_on:
        bias = (gb1_acc if b1_on else None, gb2_acc if b2_on else None, gb1 if b1_on else None,
                gb2 if b2_on else None)
    _scale_jobs(jobs, y, None, n_valid, mean=o.mean, ignore_index=o.ignore_index, bias=bias)
    for g, ok in zip((gx, gw1, gb1, ga, gw2, gb2), fed):
        if g is not None and not ok:
            _zero(g)


def _scale_grads(grads: List[Tensor], g: Tensor) -> None:
    """grads *= g in place (the chunked plan's backward), gradients of one shape and dtype paired in a launch."""
    g = g.reshape(())
    unused = torch.empty(0, dtype=torch.int64, device=g.device)  # labels / |V| slots, never read here
    jobs = [(flat, flat, False) for flat in (gr.view(gr.shape[0], -1) if gr.dim() > 1 else gr.view(1, -1)
                                             for gr in grads if gr.numel())]
    _scale_jobs(jobs, unused, g, unused, mean=False, ignore_index=0)

