"""The loss's gradient pass over class tiles (the cuBLAS resident plan with bias gradients), launched
from :mod:`dhkd_kernels.ops._launch` after ``epilogue_kernel``'s statistics pass (PHASE 4).

``grad_kernel``  grid (cdiv(Cp, BLOCK_C), P) over the padded width Cp (the row stride): program (j, p)
    owns classes [j BLOCK_C, (j + 1) BLOCK_C) of the rows [p ROWS, (p + 1) ROWS) and walks those rows in
    BLOCK_R steps. It computes what the epilogue's pass 2 does (the same tile functions), from the rows'
    statistics (8, N) that PHASE 4 stored:
        dz1 written over z1, dz2 over z2 (zeros past C and in rows not in V, NaN in a row whose label
        is out of range), as in ``epilogue_kernel``;
        sums (2, P, Cp): the column sums of dz1 and dz2 over the program's rows (bias gradients
        without grad_output and 1/|V|, which the backward's ``scale_kernel`` applies with the P parts' sum);
        lgp (P, T): tau^2 sum of the logit-level loss over the program's valid rows and classes (NaN
        with a bad label), which ``finalize_kernel`` adds in a fixed order.
    Because a program keeps its classes across all its rows, the bias sums cost no extra pass over dz
    and only 8 P C bytes of partials (the row-tiled epilogue would need one partial row per program);
    the row loop keeps the grid at >= 4 programs per SM with P row parts.
    Traffic per logit: z1, t and z2 read once, dz1 and dz2 written once (2-byte logits: 10 bytes, the
    same as the epilogue's pass 2); the rows' statistics are 32 bytes per row and class tile (cached).

All offsets that multiply a stride are int64.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._epilogue_kernels import (LOG2E, _aux_terms, _main_grad, _row_bcast_load, _softcap, _store_rounded,
                                _teacher_cap)


@triton.jit
def _logit_tile(zp, valid, in_width, b, cap, inv_cap, HAS_B: tl.constexpr, CAP: tl.constexpr, FAST: tl.constexpr):
    """(z, dcap): a tile of stored logits at pointers zp (rows ``valid``, columns ``in_width`` of the
    padded buffer: 128-bit loads) plus the bias tile b, softcapped, with the softcap's derivative (1
    without CAP)."""
    z = tl.load(zp, mask=valid[:, None] & in_width, other=0.0).to(tl.float32)
    if HAS_B:
        z += b
    dcap = 1.0
    if CAP:
        z, dcap = _softcap(z, cap, inv_cap, FAST)
    return z, dcap


@triton.jit(do_not_specialize=["N", "ROWS"])
def grad_kernel(
    # pointers: logits z1, z2 (N, C) in buffers of row stride Cp (read, then overwritten with dz); teacher
    # (N, C); labels (N,); biases (C,); stats (8, N) fp32 rows' statistics (epilogue_kernel PHASE 4);
    # outputs: sums (2, P, Cp) fp32 column sums of dz1, dz2; lgp (P, T) fp32 logit-loss sums (T class tiles)
    z1_ptr, z2_ptr, t_ptr, y_ptr, b1_ptr, b2_ptr, stats_ptr, sums_ptr, lgp_ptr,
    # sizes: N rows, C classes; ROWS rows per row part
    N, C, ROWS,
    # strides in elements: the logits' (Cp, a multiple of 64: aligned 128-bit accesses), the teacher's
    # (its row stride is stride_tn_vec * VEC)
    stride_z, stride_tn_vec, stride_tc,
    # scalars: term weights and temperatures (kd_w_t = kd_w T), label smoothing, the LLM options
    ce_w, kd_w_t, inv_kd_t, lg_w, inv_tau, tau2, eps, ignore_index,
    cap, inv_cap, tcap, inv_tcap, zl_w, beta, log_beta, log_1mbeta,
    # meta-parameters: the gradients and terms (as epilogue_kernel's); SUM_B1/SUM_B2: the column sums of dz1/dz2
    GRAD_CE: tl.constexpr, GRAD_KD: tl.constexpr, GRAD_Z: tl.constexpr, AUX: tl.constexpr,
    GRAD_AUX: tl.constexpr, DIV: tl.constexpr, CAP: tl.constexpr, TCAP: tl.constexpr, KL_NORM: tl.constexpr,
    HAS_B1: tl.constexpr, HAS_B2: tl.constexpr, SMOOTH: tl.constexpr, SUM_B1: tl.constexpr, SUM_B2: tl.constexpr,
    INTERP_BF16: tl.constexpr, VEC: tl.constexpr, FAST: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    # Bytes per logit: z1, t, z2 read and dz1, dz2 written once; ~45 FLOPs (all terms), no tensor cores
    GRAD_MAIN: tl.constexpr = GRAD_CE or GRAD_KD or GRAD_Z
    stride_tn = stride_tn_vec * VEC
    tile = tl.program_id(0)
    part = tl.program_id(1)
    cols = tile * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    rows0 = tl.zeros((BLOCK_R, 1), tl.int32)
    cols2 = cols[None, :]
    cmask2 = cmask[None, :]
    b1 = _row_bcast_load(b1_ptr + cols2, cmask2, rows0) if HAS_B1 else 0.0
    b2 = _row_bcast_load(b2_ptr + cols2, cmask2, rows0) if HAS_B2 else 0.0
    inv_kd_t2 = inv_kd_t * LOG2E
    g2_w = 0.5 * lg_w / inv_tau if KL_NORM else lg_w / inv_tau
    acc1 = tl.zeros((BLOCK_R, BLOCK_C), tl.float32)
    acc2 = tl.zeros((BLOCK_R, BLOCK_C), tl.float32)
    lg_l = tl.zeros((BLOCK_R, BLOCK_C), tl.float32)
    r_begin = part.to(tl.int64) * ROWS
    r_end = tl.minimum(r_begin + ROWS, N)
    for r0 in range(r_begin, r_end, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R).to(tl.int64)
        rmask = rows < r_end
        y = tl.load(y_ptr + rows, mask=rmask, other=ignore_index).to(tl.int64)
        valid = rmask & (y != ignore_index)
        bad = valid & ((y < 0) | (y >= C))
        row_nan = tl.where(bad, float("nan"), 1.0)[:, None]
        m2d = valid[:, None] & cmask2
        out2d = rmask[:, None] & (cols2 < stride_z)
        zrow = rows[:, None] * stride_z
        if GRAD_KD or AUX:
            t = tl.load(t_ptr + rows[:, None] * stride_tn + cols2 * stride_tc, mask=m2d, other=0.0).to(tl.float32)
            t = _teacher_cap(t, tcap, inv_tcap, TCAP, FAST)
        else:
            t = tl.zeros((BLOCK_R, BLOCK_C), tl.float32)  # not read
        if GRAD_MAIN:
            sp = stats_ptr + rows
            m1 = tl.load(sp, mask=rmask, other=0.0)
            log_s1 = tl.load(sp + N, mask=rmask, other=0.0)
            q = tl.load(sp + 2 * N, mask=rmask, other=0.0)
            log_s1t = tl.zeros((BLOCK_R,), tl.float32)
            mt = tl.zeros((BLOCK_R,), tl.float32)
            log_st = tl.zeros((BLOCK_R,), tl.float32)
            kdiv = tl.zeros((BLOCK_R,), tl.float32)
            skn = tl.zeros((BLOCK_R,), tl.float32)
            if GRAD_KD:
                log_s1t = tl.load(sp + 3 * N, mask=rmask, other=0.0)
                mt = tl.load(sp + 4 * N, mask=rmask, other=0.0)
                log_st = tl.load(sp + 5 * N, mask=rmask, other=0.0)
                if DIV != 0:
                    kdiv = tl.load(sp + 6 * N, mask=rmask, other=0.0)
                    skn = tl.load(sp + 7 * N, mask=rmask, other=0.0)
            ok = valid & (~bad)
            is_y = cols2 == tl.where(ok, y, -1).to(tl.int32)[:, None]
            zp = z1_ptr + zrow + cols2
            z, dcap = _logit_tile(zp, valid, cols2 < stride_z, b1, cap, inv_cap, HAS_B1, CAP, FAST)
            g = _main_grad(z, t, is_y, m1, q, log_s1, log_s1t, mt, log_st, kdiv, skn, (log_s1 * LOG2E)[:, None],
                           (log_s1t * LOG2E)[:, None], (log_st * LOG2E)[:, None], ce_w, kd_w_t, inv_kd_t,
                           inv_kd_t2, eps, C, zl_w, beta, log_beta, log_1mbeta, GRAD_CE, GRAD_KD, GRAD_Z,
                           SMOOTH, DIV, FAST)
            if CAP:
                g = g * dcap
            g = tl.where(m2d, g, 0.0) * row_nan
            _store_rounded(zp, g, out2d, INTERP_BF16)
            if SUM_B1:
                acc1 += g
        if AUX:
            zp2 = z2_ptr + zrow + cols2
            z2, dcap2 = _logit_tile(zp2, valid, cols2 < stride_z, b2, cap, inv_cap, HAS_B2, CAP, FAST)
            live = m2d & (t != float("-inf"))  # -inf teacher: a masked class
            lg, g2 = _aux_terms(z2, t, live, inv_tau, KL_NORM, FAST)
            lg_l += lg * row_nan
            if GRAD_AUX:
                if CAP:  # (dcap2 of a padding column's garbage may be NaN)
                    g2 = tl.where(live, g2 * dcap2, 0.0)
                g2 = g2 * (row_nan * g2_w)
                _store_rounded(zp2, g2, out2d, INTERP_BF16)
                if SUM_B2:
                    acc2 += g2
    # the partials: one row of column sums per head and part, one logit-loss sum per program
    P = tl.num_programs(1)
    omask = cols < stride_z
    if SUM_B1:
        tl.store(sums_ptr + part.to(tl.int64) * stride_z + cols, tl.sum(acc1, 0), mask=omask)
    if SUM_B2:
        tl.store(sums_ptr + (P + part).to(tl.int64) * stride_z + cols, tl.sum(acc2, 0), mask=omask)
    if AUX:
        tl.store(lgp_ptr + part * tl.num_programs(0) + tile, tau2 * tl.sum(tl.sum(lg_l, 1), 0))
