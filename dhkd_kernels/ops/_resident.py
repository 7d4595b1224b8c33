"""The resident plan: forward (logits of both heads stored whole, the epilogue writes dz over them) and
backward (dX, dW and bias gradients from the stored dz) on the Triton or the cuBLAS engine."""
from __future__ import annotations

import torch
from torch import Tensor

from .. import cost
from . import _gemm_kernels as G
from ._launch import (_buffer, _cast, _dot_precision, _empty, _epilogue, _grad_pass, _interp_bf16,
                      _launch, _logits_buffer, _logits_buffers, _mm, _ones, _opts, _scale, _scale_jobs,
                      _teacher_block, _teacher_kind, _zero)
from ._plan import (DW_TILES, DX_TILES, F32, LOGITS_TILES, Plan, _epi_config, _gemm_tiles, _interpreted, _kind,
                    _ld, _Opts, _work, cdiv)

def _forward_resident(wk, plan, o, x, w1, b1, a, w2, b2, t, y, rows, one_buffer=False):
    """Logits of both heads (one allocation with ``one_buffer``), the epilogue over them; returns the
    state [dz1, dz2, sums, lgp, None, None]: with ``plan.bias_parts`` (cuBLAS, bias gradients) the
    epilogue's statistics pass and ``grad_kernel`` run apart, sums (2, P, Cp) holding dz's column sums and
    lgp the logit-level loss sums for ``_finalize``; otherwise both None."""
    dev = x.device
    n, c, dt = wk.n, wk.c, x.dtype
    a_ = x if wk.shared else a
    kind = _kind(dt, o.tf32)
    if n == 0 or not (wk.main or wk.aux):
        return [None] * 6
    if isinstance(t, (tuple, list)):
        if wk.teacher_product:
            tbuf = _logits_buffer(n, c, t[0].dtype, dev)
            _teacher_block(t, 0, n, 0, c, tbuf, _teacher_kind(t, o.tf32))
            t = tbuf
        else:
            t = _empty(dev).view(1, 0)
    if one_buffer:
        z1, z2 = _logits_buffers(n, c, dt, dev, wk.main, wk.aux)
    else:
        z1 = _logits_buffer(n, c, dt, dev) if wk.main else None
        z2 = _logits_buffer(n, c, dt, dev) if wk.aux else None
    if plan.engine == "triton":
        interp = _interpreted(dev)
        bm, bn, bk = (16, 16, 16) if interp else (*_gemm_tiles(n, c, 1, dev, LOGITS_TILES),
                                                  64 if wk.elem <= 2 else 32)
        rec = cost.recording()  # FLOPs and bytes are only for the cost record
        flops = nbytes = 0
        if rec:
            flops = 2 * n * c * (wk.d * int(wk.main) + wk.da * int(wk.aux))
            nbytes = (n * wk.d + c * wk.d) * wk.elem * int(wk.main) + (n * wk.da + c * wk.da) * wk.elem * int(wk.aux) \
                - (n * wk.d * wk.elem if (wk.shared and wk.main and wk.aux) else 0) \
                + n * c * wk.elem * (int(wk.main) + int(wk.aux))
        _launch(G.logits_kernel, (cdiv(n, bm) * cdiv(c, bn),),
                x, w1, a_, w2, z1 if z1 is not None else z2, z2 if z2 is not None else z1,
                n, c, wk.d, wk.da,
                x.stride(0), x.stride(1), w1.stride(0), w1.stride(1), a_.stride(0), a_.stride(1),
                w2.stride(0), w2.stride(1), _ld(c), _ld(c),
                name="logits_kernel", engine="triton-gemm", flops=flops, nbytes=nbytes, kind=kind,
                MAIN=wk.main, AUX=wk.aux, SHARED=wk.shared, DOT_PRECISION=_dot_precision(dt, o.tf32),
                INTERP_BF16=_interp_bf16(dt, dev), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8,
                **_opts(4, 4 if wk.elem <= 2 else 3, dev))
    else:
        if wk.main:
            _mm(x, w1.t(), z1, kind=kind)
        if wk.aux:
            _mm(a_, w2.t(), z2, kind=kind)
    br, bc, warps = _epi_config(n, c, wk.elem, dev)
    if plan.bias_parts and o.shard is None:
        stats = _buffer((8, n), F32, dev)
        if wk.main:
            _epilogue(wk, o, z1, None, t, y, b1, None, rows, r0=0, R=n, c0=0, W=c, main=True, aux=False,
                      g_ce=False, g_kd=False, g_aux=False, acc_logit=False, br=br, bc=bc, warps=warps, phase=4,
                      stats=stats)
        sums, lgp = _grad_pass(wk, o, z1 if wk.g_main else None, z2, t, y, b1, b2, stats, g_main=wk.g_main,
                               g_aux=wk.g_aux, sum1=wk.need[2], sum2=wk.need[5], parts=plan.bias_parts)
        return [z1 if wk.g_main else None, z2 if wk.g_aux else None, sums, lgp, None, None]
    _epilogue(wk, o, z1, z2, t, y, b1, b2, rows, r0=0, R=n, c0=0, W=c, main=wk.main, aux=wk.aux,
              g_ce=wk.g_main and bool(o.ce_w), g_kd=wk.g_main and bool(o.kd_w), g_aux=wk.g_aux,
              acc_logit=False, br=br, bc=bc, warps=warps)
    return [z1 if wk.g_main else None, z2 if wk.g_aux else None, None, None, None, None]


# ----------------------------------------------------------------------------- backward

def _backward(g, x, w1, b1, a, w2, b2, y, n_valid, state, o: _Opts, needs, c: int, plan: Plan, wk=None):
    """Gradients [dx, dw1, db1, da, dw2, db2] of ``g * loss`` from the resident plan's dz (an empty
    tensor where no gradient was asked, None when the caller passes its ``wk``), with the engine the
    forward ran."""
    dev = x.device
    fill = wk is None
    if wk is None:
        wk = _work(x, w1, a, x.shape[0], c, o, needs)
    shared = wk.shared
    dz1 = state[0] if wk.g_main else None
    dz2 = state[1] if wk.g_aux else None
    sums = state[2] if (len(state) > 2 and state[2] is not None and state[2].numel()) else None
    kind = _kind(x.dtype, o.tf32)
    g, row_g = _grad_output(g)
    if row_g:
        g = _row_weights(g, y, o.ignore_index)
    refs = (x, w1, b1, None if shared else a, w2, b2)
    grads = [_buffer(r.shape, r.dtype, dev) if (nd and r is not None) else None for r, nd in zip(refs, needs)]
    filled = set()
    if wk.n > 0 and (dz1 is not None or dz2 is not None):
        if plan.engine == "triton":
            filled = _backward_triton(wk, o, g, n_valid, x, w1, a, w2, y, dz1, dz2, grads, kind, row_g)
        else:
            filled = _backward_cublas(wk, o, g, n_valid, x, w1, a, w2, y, dz1, dz2, *grads, kind, row_g, sums)
    out = []
    for k, gr in enumerate(grads):
        if gr is None:
            out.append(_empty(dev) if fill else None)
            continue
        if k not in filled:  # no term reaches this input: its gradient is zero
            _zero(gr)
        out.append(gr)
    return out


def _grad_output(g: Tensor):
    """(g, per_row): a scalar, the expanded scalar of ``.sum()`` (stride 0, read as a scalar), or
    per-row weights (N,) (reduction="none"; see _row_weights)."""
    if g.dim() == 0:
        return g, False
    if g.numel() == 0:
        return torch.zeros((), dtype=F32, device=g.device), False
    if g.numel() == 1 or g.stride(0) == 0:
        return g.as_strided((), ()), False
    return g, True


def _row_weights(g: Tensor, y: Tensor, ignore_index: int) -> Tensor:
    """Per-row grad_output as fp32, 0 at the rows outside V: a NaN or inf there (a grad_output the
    caller never meant for padding) must not reach a gradient through 0 x NaN."""
    from ..reference import valid_rows
    info = torch.iinfo(y.dtype)
    if info.min <= ignore_index <= info.max:
        cost.note("torch:ne", "torch", (), 0, y.numel() * (y.element_size() + 1))
    if g.dtype != F32:
        cost.note("torch:_to_copy", "torch", (), 0, g.numel() * (g.element_size() + 4))
    cost.note("torch:where", "torch", (), 0, g.numel() * 9)
    return torch.where(valid_rows(y, ignore_index), g.to(F32), 0.0)


def _backward_triton(wk, o, g, n_valid, x, w1, a, w2, y, dz1, dz2, grads, kind, row_g=False):
    """dX/dA in one launch of ``dx_kernel``, dW (and biases) of both heads in one of ``dw_kernel``."""
    dev = x.device
    n, c, d, da, dt = wk.n, wk.c, wk.d, wk.da, x.dtype
    gx, gw1, gb1, ga, gw2, gb2 = grads
    shared = wk.shared
    a_ = x if shared else a
    interp = _interpreted(dev)
    prec = _dot_precision(dt, o.tf32)
    ib = _interp_bf16(dt, dev)
    bk = 16 if interp else (64 if wk.elem <= 2 else 32)
    filled = set()
    rec = cost.recording()  # FLOPs and bytes are only for the cost record
    # problems of dx_kernel: (out, [(dz, w), ...], width)
    probs = []
    x_pairs = ([(dz1, w1)] if dz1 is not None else []) + ([(dz2, w2)] if (shared and dz2 is not None) else [])
    if gx is not None and x_pairs:
        probs.append((gx, x_pairs, d, 0))
    if ga is not None and dz2 is not None:
        probs.append((ga, [(dz2, w2)], da, 3))
    if probs:
        (o1, pairs1, p1, _), *rest = probs
        o2, pairs2, p2 = (rest[0][0], rest[0][1], rest[0][2]) if rest else (o1, pairs1, p1)
        (dza, wa), (dzb, wb) = pairs1[0], (pairs1[1] if len(pairs1) > 1 else pairs2[0])
        two = bool(rest)
        bm, bp = (16, 16) if interp else _gemm_tiles(n, max(p1, p2), 2 if two else 1, dev, DX_TILES)
        flops = sum(2 * n * c * w * len(pr) for _, pr, w, _ in probs) if rec else 0
        nbytes = sum((n * c + c * w) * wk.elem * len(pr) + n * w * wk.elem for _, pr, w, _ in probs) if rec else 0
        _launch(G.dx_kernel, (cdiv(n, bm) * cdiv(max(p1, p2), bp), 2 if two else 1),
                dza, dzb, wa, wb, o1, o2, g, n_valid, n, c, p1, p2,
                dza.stride(0), dzb.stride(0), wa.stride(0), wa.stride(1), wb.stride(0), wb.stride(1),
                o1.stride(0), o1.stride(1), o2.stride(0), o2.stride(1), int(row_g), int(o.mean),
                name="dx_kernel", engine="triton-gemm", flops=flops, nbytes=nbytes, kind=kind,
                SUM2=len(pairs1) > 1, TWO=two, HAS_G=True, DOT_PRECISION=prec,
                INTERP_BF16=ib, BLOCK_M=bm, BLOCK_P=bp, BLOCK_K=bk, GROUP_M=8,
                **_opts(4 if bm == 64 else 8, 3, dev))
        filled |= {k for _, _, _, k in probs}
    # heads of dw_kernel: (dz, features, weight grad, bias grad, width)
    heads = []
    if dz1 is not None and (gw1 is not None or gb1 is not None):
        heads.append((1, dz1, x, gw1 if gw1 is not None else _buffer(w1.shape, dt, dev), gb1, d))
    if dz2 is not None and (gw2 is not None or gb2 is not None):
        heads.append((2, dz2, a_, gw2 if gw2 is not None else _buffer(w2.shape, dt, dev), gb2, da))
    if heads:
        h_a, h_b = heads[0], heads[-1]
        which = 3 if len(heads) == 2 else h_a[0]
        pmax = max(h[5] for h in heads)
        bm, bp = (16, 16) if interp else _gemm_tiles(c, pmax, len(heads), dev, DW_TILES)
        flops = sum(2 * n * c * h[5] for h in heads) if rec else 0
        nbytes = sum((n * c + n * h[5] + c * h[5]) * wk.elem for h in heads) if rec else 0
        _, dza, xa, owa, oba, pa = h_a
        _, dzb, xb, owb, obb, pb = h_b
        _launch(G.dw_kernel, (cdiv(c, bm) * cdiv(pmax, bp), len(heads)),
                dza, dzb, xa, xb, y, owa, owb, oba if oba is not None else owa, obb if obb is not None else owb,
                g, n_valid, n, c, pa, pb, o.ignore_index,
                dza.stride(0), dzb.stride(0), xa.stride(0), xa.stride(1), xb.stride(0), xb.stride(1),
                owa.stride(0), owa.stride(1), owb.stride(0), owb.stride(1),
                name="dw_kernel", engine="triton-gemm", flops=flops, nbytes=nbytes, kind=kind,
                HEADS=which, BIAS1=oba is not None, BIAS2=obb is not None, HAS_G=True, ROW_G=row_g,
                MEAN=o.mean, DOT_PRECISION=prec, INTERP_BF16=ib, BLOCK_M=bm, BLOCK_P=bp, BLOCK_K=bk,
                GROUP_M=8, **_opts(8 if bm == 128 else 4, 3, dev))
        for h, _, _, gw, gb, _ in heads:
            filled |= {k for k, gr in ((3 * h - 2, gw), (3 * h - 1, gb)) if gr is not None}
    return filled


def _backward_cublas(wk, o, g, n_valid, x, w1, a, w2, y, dz1, dz2, gx, gw1, gb1, ga, gw2, gb2, kind,
                     row_g=False, sums=None):
    """``sums``: grad_kernel's column sums of dz (2, P, Cp) from the forward, or None (dZ^T 1 here)."""
    dev = x.device
    n, d, da, dt = wk.n, wk.d, wk.da, x.dtype
    shared = wk.shared
    filled = set()
    ii = o.ignore_index
    fp16 = dt == torch.float16
    # dX = s (dZ1 W1 + dZ2 W2) in an fp32 accumulator (gx itself for fp32), scaled and cast once below
    scaled = []  # scale jobs (src, out, mask_rows) of the scale s, launched together
    pairs_x = ([(dz1, w1)] if dz1 is not None else []) + ([(dz2, w2)] if (shared and dz2 is not None) else [])
    for grad, pairs, name in ((gx, pairs_x, 0), (ga, [(dz2, w2)] if dz2 is not None else [], 3)):
        if grad is None or not pairs:
            continue
        acc = grad if wk.f32 else _buffer(grad.shape, F32, dev)
        for i, (dz, w) in enumerate(pairs):
            _mm(dz, w, acc, beta=int(i > 0), kind=kind)
        scaled.append((acc, grad, False))
        filled.add(name)
    h1 = dz1 is not None and gb1 is not None
    h2 = dz2 is not None and gb2 is not None
    bias = None
    if h1 or h2:
        if sums is not None:
            sums = (sums[0] if h1 else None, sums[1] if h2 else None)
        else:
            # db = s dZ^T 1 summed in fp32 by one product per head (a per-row grad_output weights the
            # column instead)
            col = _cast(g, dt).reshape(n, 1) if row_g else _ones(n, dt, dev)
            sums = []
            for dz, on in ((dz1, h1), (dz2, h2)):
                acc = _buffer((wk.c,), F32, dev) if on else None
                if on:
                    _mm(dz.t(), col, acc.view(-1, 1), kind=kind)
                sums.append(acc)
        bias = (sums[0], sums[1], gb1 if h1 else None, gb2 if h2 else None)
        filled |= ({2} if h1 else set()) | ({5} if h2 else set())
    # dW = dZ^T (s X) over the valid rows: X scaled and masked once (N x D, cheap next to dZ), in the
    # launch that casts dX. fp16: s X would fall into fp16's subnormals (s = 1/|V|), so X is only masked
    # (and weighted per row for reduction="none"), the product is taken in fp32 and scaled before the cast
    xs = as_ = None
    feats = []
    if (dz1 is not None and gw1 is not None) or (shared and dz2 is not None and gw2 is not None):
        xs = _buffer((n, d), dt, dev)
        feats.append((x, xs, True))
    if not shared and dz2 is not None and gw2 is not None:
        as_ = _buffer((n, da), dt, dev)
        feats.append((a, as_, True))
    if fp16:
        for src, out, _ in feats:
            _scale(src, out, y, g if row_g else None, n_valid, mask_rows=True, mean=False, ignore_index=ii,
                   row_g=row_g)
        feats = []
    _scale_jobs(feats + scaled, y, g, n_valid, mean=o.mean, ignore_index=ii, row_g=row_g, bias=bias)
    for dz, gw, feats_, k in ((dz1, gw1, xs, 1), (dz2, gw2, xs if shared else as_, 4)):
        if dz is None or gw is None:
            continue
        if fp16:
            tmp = _buffer(gw.shape, F32, dev)
            _mm(dz.t(), feats_, tmp, kind=kind)
            _scale(tmp, gw, y, None if row_g else g, n_valid, mask_rows=False, mean=o.mean, ignore_index=ii)
        else:
            _mm(dz.t(), feats_, gw, kind=kind)
        filled.add(k)
    return filled

