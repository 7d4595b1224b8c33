"""Triton kernels of the dual-head KD loss (launched from :mod:`dhkd_kernels.ops.dual_head_kd`).

Four kernels:

``fwd_partials_kernel``  grid (row blocks, class splits). Each program takes BLOCK_N rows and one
    contiguous split of the classes, computes z1 = X W1^T + b1 and z2 = A W2^T + b2 tile by tile with
    ``tl.dot`` over D in BLOCK_D steps and folds every (BLOCK_N, BLOCK_C) tile into running per-row
    statistics (online log-sum-exp). It writes NSTAT floats per (split, row); the logits never reach
    memory. Per (split, row), with m1 = max z1, mt = max t/T, ms = m1/T, T = kd temperature:
        0 m1       1 s1 = sum exp(z1 - m1)        2 s1T = sum exp((z1 - m1)/T)
        3 z1[y]    4 first index of m1 (as float; exact below 2**24)
        5 mt       6 st = sum exp(t/T - mt)       7 K = sum exp(t/T - mt) ((t/T - mt) - (z1/T - ms))
        8 sum_c l(z2, t)  with l the unscaled per-element logit loss (log cosh or Bernoulli KL)
        9 s1n = sum_{c != y} exp(z1 - m1)
    so that KD/T^2 = K/st - log st + log s1T, CE = (m1 - z1[y]) + log s1 and 1 - p_y = s1n / s1
    (no cancellation for confident rows, where p_y - 1 computed as exp(.) - 1 would lose its digits).
    Traffic per program: BLOCK_N (D + Da) activations, split x (D + Da) weights, BLOCK_N x split
    teacher; FLOPs 2 BLOCK_N split (D + Da) on tensor cores plus ~30 per logit in the epilogue.

``finalize_kernel``  one program: merges the splits of every row with the same online-softmax
    algebra, writes six floats per row, the only state kept for the backward: m1, log s1,
    q = 1 - p_y, log s1T, mt, log st (maxima and log-sums kept apart, so the backward forms
    (z1 - m1) - log s1 rather than z1 - lse, whose rounding is at the scale of the largest logit), and
    reduces the valid rows in a fixed order into loss, terms, correct and n_valid.

``dz_kernel``  grid (row blocks, class blocks) of one (row chunk, class slab): recomputes the z1, z2
    tile with ``tl.dot`` and writes, in fp32 arithmetic then rounded to the buffer dtype,
        dz1 = valid (ce_w (softmax(z1) - onehot(y)) + kd_w T (softmax(z1/T) - softmax(t/T)))
        dz2 = valid lg_w (tau/2) tanh((z2 - t)/(2 tau))      [BinaryKL-Norm]
        dz2 = valid lg_w tau (sig(z2/tau) - sig(t/tau))       [BinaryKL]
    from the saved row statistics; the target column of the CE term is -q. The scalar grad_loss / max(|V|, 1) (or grad_loss for "sum") is
    applied in fp32 after the GEMMs instead, so that small probabilities divided by |V| do not
    underflow in a 16-bit dz (fp16's smallest normal is 6e-5).

``mm_kernel``  out (+)= scale (A B (+ A2 B2)): a plain tiled GEMM with fp32 accumulation and arbitrary
    strides, scale a device scalar, used for dX = dZ W and dW = dZ^T X. With ACC it reads and adds the previous value of
    ``out`` (read-modify-write by the owning program only: deterministic, no atomics).

``INTERP_BF16`` is set only under TRITON_INTERPRET with bfloat16 operands, where the interpreter of
triton 3.8 gets two things wrong: bf16 ``tl.dot`` (garbage) and the fp32 -> bf16 cast (truncates).
It converts the dot tiles to fp32 (bf16 products are exact in fp32, so this matches the GPU's
bf16 x bf16 -> fp32 ``tl.dot`` up to summation order) and rounds to nearest before bf16 stores.

All row/column indices that multiply a stride are int64, so N*C and C*D may exceed 2**31.
"""
from __future__ import annotations

import triton
import triton.language as tl

NSTAT = 10
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _sigmoid(v):
    """sig(v) without overflow: exp of a non-positive argument only."""
    e = tl.exp(-tl.abs(v))
    return tl.where(v >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@triton.jit
def _log_cosh(u):
    """log cosh(u) for u >= 0 with small relative error everywhere: u + log(1 + e^-2u) - log 2 cancels
    against log 2 near 0, so below 0.4 the Taylor series to u^10 is used (truncation < 4e-7 relative)."""
    u2 = u * u
    series = u2 * (0.5 + u2 * (-1.0 / 12.0 + u2 * (1.0 / 45.0 + u2 * (-17.0 / 2520.0 + u2 * (31.0 / 14175.0)))))
    return tl.where(u < 0.4, series, u + tl.log(1.0 + tl.exp(-2.0 * u)) - LN2)


@triton.jit
def _tanh_abs(u):
    """tanh(u) for u >= 0: (1 - e^-2u) / (1 + e^-2u), and its series below 0.1 where 1 - e^-2u cancels."""
    e = tl.exp(-2.0 * u)
    u2 = u * u
    series = u * (1.0 + u2 * (-1.0 / 3.0 + u2 * (2.0 / 15.0 + u2 * (-17.0 / 315.0))))
    return tl.where(u < 0.1, series, (1.0 - e) / (1.0 + e))


@triton.jit
def _rtne_bf16(v):
    """fp32 -> fp32 holding the round-to-nearest-even bf16 value (used only under the interpreter,
    whose fp32 -> bf16 cast truncates; on GPUs ``.to(tl.bfloat16)`` already rounds to nearest)."""
    bits = v.to(tl.uint32, bitcast=True)
    bits = (bits + (((bits >> 16) & 1) + 0x7FFF)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _project(acc, x_ptr, w_ptr, rows64, rmask, cols64, cmask, K,
             stride_xn, stride_xk, stride_wc, stride_wk,
             DOT_PRECISION: tl.constexpr, INTERP_BF16: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc (BLOCK_N, BLOCK_C) += X[rows, :] W[cols, :]^T, K in BLOCK_K steps."""
    offs_k = tl.arange(0, BLOCK_K)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        kmask = kk < K
        # int64: a transposed operand has stride_xk = N (stride_wk = C), and K N may exceed 2**31
        kk64 = kk.to(tl.int64)
        xt = tl.load(x_ptr + rows64[:, None] * stride_xn + kk64[None, :] * stride_xk,
                     mask=rmask[:, None] & kmask[None, :], other=0.0)
        wt = tl.load(w_ptr + cols64[None, :] * stride_wc + kk64[:, None] * stride_wk,
                     mask=cmask[None, :] & kmask[:, None], other=0.0)
        if INTERP_BF16:
            xt = xt.to(tl.float32)
            wt = wt.to(tl.float32)
        acc = tl.dot(xt, wt, acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def fwd_partials_kernel(
    # pointers: inputs (x/a: (N, D)/(N, Da); w1/w2: (C, D)/(C, Da); b1/b2: (C,); t: (N, C); y: (N,)),
    # output part: (S, NSTAT, N) fp32 contiguous
    x_ptr, w1_ptr, b1_ptr, a_ptr, w2_ptr, b2_ptr, t_ptr, y_ptr, part_ptr,
    # sizes
    N, C, D, DA, CLASSES_PER_SPLIT,
    # strides, in elements
    stride_xn, stride_xd, stride_w1c, stride_w1d, stride_an, stride_ad, stride_w2c, stride_w2d,
    stride_tn, stride_tc,
    # scalars: 1/T (kd), 1/tau (logit)
    inv_kd_t, inv_tau,
    # meta-parameters
    HAS_B1: tl.constexpr, HAS_B2: tl.constexpr, NEED_Z1: tl.constexpr, NEED_KD: tl.constexpr,
    NEED_LOGIT: tl.constexpr, KL_NORM: tl.constexpr, DOT_PRECISION: tl.constexpr,
    INTERP_BF16: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    rows64 = rows.to(tl.int64)
    y = tl.load(y_ptr + rows64, mask=rmask, other=-1).to(tl.int64)
    c_start = pid_s * CLASSES_PER_SPLIT
    c_end = tl.minimum(C, c_start + CLASSES_PER_SPLIT)
    neg_inf = float("-inf")

    # finite "minus infinity" for the running maxima: exp(start - max) = 0 and no inf - inf = NaN
    m1 = tl.full((BLOCK_N,), -1.0e30, tl.float32)
    s1 = tl.zeros((BLOCK_N,), tl.float32)
    s1n = tl.zeros((BLOCK_N,), tl.float32)
    s1t = tl.zeros((BLOCK_N,), tl.float32)
    zy = tl.zeros((BLOCK_N,), tl.float32)
    amax = tl.zeros((BLOCK_N,), tl.int32)
    mt = tl.full((BLOCK_N,), -1.0e30, tl.float32)
    st = tl.zeros((BLOCK_N,), tl.float32)
    kacc = tl.zeros((BLOCK_N,), tl.float32)
    lsum = tl.zeros((BLOCK_N,), tl.float32)

    for c0 in range(c_start, c_end, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        cmask = cols < c_end
        cols64 = cols.to(tl.int64)
        tile_mask = rmask[:, None] & cmask[None, :]
        t_ptrs = t_ptr + rows64[:, None] * stride_tn + cols64[None, :] * stride_tc
        # the teacher tile is loaded after each GEMM, not held across it (register pressure)
        if NEED_Z1:
            z1 = tl.zeros((BLOCK_N, BLOCK_C), tl.float32)
            z1 = _project(z1, x_ptr, w1_ptr, rows64, rmask, cols64, cmask, D,
                          stride_xn, stride_xd, stride_w1c, stride_w1d, DOT_PRECISION, INTERP_BF16, BLOCK_D)
            if HAS_B1:
                z1 += tl.load(b1_ptr + cols64, mask=cmask, other=0.0).to(tl.float32)[None, :]
            z1m = tl.where(cmask[None, :], z1, neg_inf)
            tmax = tl.max(z1m, 1)
            m_new = tl.maximum(m1, tmax)
            tidx = tl.min(tl.where(z1m == tmax[:, None], cols[None, :], 2147483647), 1)
            amax = tl.where(tmax > m1, tidx, amax)
            e1 = tl.exp(z1m - m_new[:, None])
            s1 = s1 * tl.exp(m1 - m_new) + tl.sum(e1, 1)
            s1n = s1n * tl.exp(m1 - m_new) + tl.sum(tl.where(cols64[None, :] == y[:, None], 0.0, e1), 1)
            zy += tl.sum(tl.where(cols64[None, :] == y[:, None], z1, 0.0), 1)
            if NEED_KD:
                t = tl.load(t_ptrs, mask=tile_mask, other=0.0).to(tl.float32)
                s1t = s1t * tl.exp((m1 - m_new) * inv_kd_t) \
                    + tl.sum(tl.exp((z1m - m_new[:, None]) * inv_kd_t), 1)
                tt = tl.where(cmask[None, :], t * inv_kd_t, neg_inf)
                mt_new = tl.maximum(mt, tl.max(tt, 1))
                alpha_t = tl.exp(mt - mt_new)
                # re-anchor K at the new maxima: K <- a (K + st ((ms' - ms) - (mt' - mt)))
                shift = (m_new - m1) * inv_kd_t - (mt_new - mt)
                kacc = alpha_t * (kacc + tl.where(st > 0, st * shift, 0.0))
                st = st * alpha_t
                e = tl.exp(tt - mt_new[:, None])
                st += tl.sum(e, 1)
                gap = (t * inv_kd_t - mt_new[:, None]) - (z1 - m_new[:, None]) * inv_kd_t
                kacc += tl.sum(tl.where(cmask[None, :], e * gap, 0.0), 1)
                mt = mt_new
            m1 = m_new
        if NEED_LOGIT:
            z2 = tl.zeros((BLOCK_N, BLOCK_C), tl.float32)
            z2 = _project(z2, a_ptr, w2_ptr, rows64, rmask, cols64, cmask, DA,
                          stride_an, stride_ad, stride_w2c, stride_w2d, DOT_PRECISION, INTERP_BF16, BLOCK_D)
            if HAS_B2:
                z2 += tl.load(b2_ptr + cols64, mask=cmask, other=0.0).to(tl.float32)[None, :]
            t = tl.load(t_ptrs, mask=tile_mask, other=0.0).to(tl.float32)
            if KL_NORM:
                val = _log_cosh(tl.abs((z2 - t) * (0.5 * inv_tau)))
            else:
                zs = z2 * inv_tau
                ts = t * inv_tau
                sp_z = tl.maximum(-zs, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(zs)))
                sp_t = tl.maximum(-ts, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(ts)))
                val = sp_z - sp_t + (zs - ts) * _sigmoid(-ts)
            lsum += tl.sum(tl.where(cmask[None, :], val, 0.0), 1)

    # stat k at p + k N, reached by pointer += N steps (never k * N in int32); only the stats of the
    # parts this launch computed are written (the two heads may run as separate launches)
    p = part_ptr + pid_s.to(tl.int64) * 10 * N + rows64
    if NEED_Z1:
        tl.store(p, m1, mask=rmask)
        tl.store(p + N, s1, mask=rmask)
    p += N + N
    if NEED_KD:
        tl.store(p, s1t, mask=rmask)
    p += N
    if NEED_Z1:
        tl.store(p, zy, mask=rmask)
        tl.store(p + N, amax.to(tl.float32), mask=rmask)
    p += N + N
    if NEED_KD:
        tl.store(p, mt, mask=rmask)
        tl.store(p + N, st, mask=rmask)
        tl.store(p + N + N, kacc, mask=rmask)
    p += N + N + N
    if NEED_LOGIT:
        tl.store(p, lsum, mask=rmask)
    p += N
    if NEED_Z1:
        tl.store(p, s1n, mask=rmask)


@triton.jit
def dz_kernel(
    # pointers: inputs as in fwd_partials_kernel; stats (6, N) fp32 from finalize_kernel;
    # outputs dz1/dz2 (rows, cols) of one chunk, in the matmul dtype
    x_ptr, w1_ptr, b1_ptr, a_ptr, w2_ptr, b2_ptr, t_ptr, y_ptr, stats_ptr, dz1_ptr, dz2_ptr,
    # sizes: chunk = rows [row0, row0 + n_rows) x classes [col0, col0 + n_cols)
    N, D, DA, row0, col0, n_rows, n_cols,
    # strides, in elements
    stride_xn, stride_xd, stride_w1c, stride_w1d, stride_an, stride_ad, stride_w2c, stride_w2d,
    stride_tn, stride_tc, stride_dz1, stride_dz2,
    # scalars
    ce_w, kd_w_t, inv_kd_t, lg_w, inv_tau, ignore_index,
    # meta-parameters
    HAS_B1: tl.constexpr, HAS_B2: tl.constexpr, NEED_DZ1: tl.constexpr, CE_ON: tl.constexpr,
    KD_ON: tl.constexpr, NEED_DZ2: tl.constexpr, KL_NORM: tl.constexpr, DOT_PRECISION: tl.constexpr,
    INTERP_BF16: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    lrows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    lcols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    rmask = lrows < n_rows
    cmask = lcols < n_cols
    rows64 = row0 + lrows.to(tl.int64)
    cols64 = col0 + lcols.to(tl.int64)
    tile_mask = rmask[:, None] & cmask[None, :]
    y = tl.load(y_ptr + rows64, mask=rmask, other=ignore_index).to(tl.int64)
    valid = rmask & (y != ignore_index)
    lrows64 = lrows.to(tl.int64)
    if KD_ON or NEED_DZ2:
        t = tl.load(t_ptr + rows64[:, None] * stride_tn + cols64[None, :] * stride_tc,
                    mask=tile_mask, other=0.0).to(tl.float32)
    if NEED_DZ1:
        z1 = tl.zeros((BLOCK_N, BLOCK_C), tl.float32)
        z1 = _project(z1, x_ptr, w1_ptr, rows64, rmask, cols64, cmask, D,
                      stride_xn, stride_xd, stride_w1c, stride_w1d, DOT_PRECISION, INTERP_BF16, BLOCK_D)
        if HAS_B1:
            z1 += tl.load(b1_ptr + cols64, mask=cmask, other=0.0).to(tl.float32)[None, :]
        g = tl.zeros((BLOCK_N, BLOCK_C), tl.float32)
        sp = stats_ptr + rows64
        m1 = tl.load(sp, mask=rmask, other=0.0)
        if CE_ON:
            log_s1 = tl.load(sp + N, mask=rmask, other=0.0)
            q = tl.load(sp + N + N, mask=rmask, other=0.0)
            p1 = tl.exp((z1 - m1[:, None]) - log_s1[:, None])
            g += ce_w * tl.where(cols64[None, :] == y[:, None], -q[:, None], p1)
        if KD_ON:
            sp += N + N + N
            log_s1t = tl.load(sp, mask=rmask, other=0.0)
            mt = tl.load(sp + N, mask=rmask, other=0.0)
            log_st = tl.load(sp + N + N, mask=rmask, other=0.0)
            g += kd_w_t * (tl.exp((z1 - m1[:, None]) * inv_kd_t - log_s1t[:, None])
                           - tl.exp((t * inv_kd_t - mt[:, None]) - log_st[:, None]))
        g = tl.where(valid[:, None], g, 0.0)
        if INTERP_BF16:
            g = _rtne_bf16(g)
        tl.store(dz1_ptr + lrows64[:, None] * stride_dz1 + lcols[None, :],
                 g.to(dz1_ptr.dtype.element_ty), mask=tile_mask)
    if NEED_DZ2:
        z2 = tl.zeros((BLOCK_N, BLOCK_C), tl.float32)
        z2 = _project(z2, a_ptr, w2_ptr, rows64, rmask, cols64, cmask, DA,
                      stride_an, stride_ad, stride_w2c, stride_w2d, DOT_PRECISION, INTERP_BF16, BLOCK_D)
        if HAS_B2:
            z2 += tl.load(b2_ptr + cols64, mask=cmask, other=0.0).to(tl.float32)[None, :]
        if KL_NORM:
            u = (z2 - t) * (0.5 * inv_tau)
            th = _tanh_abs(tl.abs(u))
            g2 = tl.where(u < 0, -th, th) * (0.5 * lg_w / inv_tau)
        else:
            g2 = (_sigmoid(z2 * inv_tau) - _sigmoid(t * inv_tau)) * (lg_w / inv_tau)
        g2 = tl.where(valid[:, None], g2, 0.0)
        if INTERP_BF16:
            g2 = _rtne_bf16(g2)
        tl.store(dz2_ptr + lrows64[:, None] * stride_dz2 + lcols[None, :],
                 g2.to(dz2_ptr.dtype.element_ty), mask=tile_mask)


@triton.jit
def mm_kernel(
    # pointers: out (M, P) (+)= scale * (a (M, K) b (K, P) [+ a2 (M, K2) b2 (K2, P)]); scale () fp32
    out_ptr, a_ptr, b_ptr, a2_ptr, b2_ptr, scale_ptr,
    # sizes
    M, P, K, K2,
    # strides, in elements
    stride_om, stride_op, stride_am, stride_ak, stride_bk, stride_bp,
    stride_a2m, stride_a2k, stride_b2k, stride_b2p,
    # meta-parameters
    ACC: tl.constexpr, HAS_SECOND: tl.constexpr, DOT_PRECISION: tl.constexpr, INTERP_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rp = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    mmask = rm < M
    pmask = rp < P
    rm64 = rm.to(tl.int64)
    rp64 = rp.to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_P), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = (k0 + offs_k).to(tl.int64)
        kmask = kk < K
        at = tl.load(a_ptr + rm64[:, None] * stride_am + kk[None, :] * stride_ak,
                     mask=mmask[:, None] & kmask[None, :], other=0.0)
        bt = tl.load(b_ptr + kk[:, None] * stride_bk + rp64[None, :] * stride_bp,
                     mask=kmask[:, None] & pmask[None, :], other=0.0)
        if INTERP_BF16:
            at = at.to(tl.float32)
            bt = bt.to(tl.float32)
        acc = tl.dot(at, bt, acc, input_precision=DOT_PRECISION)
    if HAS_SECOND:
        for k0 in range(0, K2, BLOCK_K):
            kk = (k0 + offs_k).to(tl.int64)
            kmask = kk < K2
            at = tl.load(a2_ptr + rm64[:, None] * stride_a2m + kk[None, :] * stride_a2k,
                         mask=mmask[:, None] & kmask[None, :], other=0.0)
            bt = tl.load(b2_ptr + kk[:, None] * stride_b2k + rp64[None, :] * stride_b2p,
                         mask=kmask[:, None] & pmask[None, :], other=0.0)
            if INTERP_BF16:
                at = at.to(tl.float32)
                bt = bt.to(tl.float32)
            acc = tl.dot(at, bt, acc, input_precision=DOT_PRECISION)
    acc = acc * tl.load(scale_ptr)
    optrs = out_ptr + rm64[:, None] * stride_om + rp64[None, :] * stride_op
    omask = mmask[:, None] & pmask[None, :]
    if ACC:
        acc += tl.load(optrs, mask=omask, other=0.0).to(tl.float32)
    if INTERP_BF16:
        if out_ptr.dtype.element_ty == tl.bfloat16:
            acc = _rtne_bf16(acc)
    tl.store(optrs, acc.to(out_ptr.dtype.element_ty), mask=omask)


@triton.jit
def finalize_kernel(
    # pointers: part (S, NSTAT, N) fp32 from fwd_partials_kernel; y (N,); outputs: stats (6, N) fp32,
    # loss () fp32, terms (3,) fp32, correct () int64, n_valid () int64
    part_ptr, y_ptr, stats_ptr, loss_ptr, terms_ptr, correct_ptr, nvalid_ptr,
    # sizes; split_stride = NSTAT * N
    N, S, split_stride,
    # scalars
    kd_t, inv_kd_t, tau, ce_w, kd_w, lg_w, ignore_index,
    # meta-parameters
    NEED_Z1: tl.constexpr, NEED_KD: tl.constexpr, NEED_LOGIT: tl.constexpr, MEAN: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """One program: merges the class splits of every row (online-softmax algebra), writes the three
    row log-sum-exps for the backward and reduces the valid rows in a fixed order (deterministic)."""
    ce_acc = tl.zeros((BLOCK_N,), tl.float32)
    kd_acc = tl.zeros((BLOCK_N,), tl.float32)
    lg_acc = tl.zeros((BLOCK_N,), tl.float32)
    ok_acc = tl.zeros((BLOCK_N,), tl.int64)
    nv_acc = tl.zeros((BLOCK_N,), tl.int64)
    for r0 in range(0, N, BLOCK_N):
        rows = r0 + tl.arange(0, BLOCK_N)
        rmask = rows < N
        rows64 = rows.to(tl.int64)
        y = tl.load(y_ptr + rows64, mask=rmask, other=ignore_index).to(tl.int64)
        valid = rmask & (y != ignore_index)
        mx = tl.full((BLOCK_N,), -1.0e30, tl.float32)
        mtx = tl.full((BLOCK_N,), -1.0e30, tl.float32)
        p = part_ptr + rows64
        for s in range(0, S):
            if NEED_Z1:
                mx = tl.maximum(mx, tl.load(p, mask=rmask, other=0.0))
            if NEED_KD:
                mtx = tl.maximum(mtx, tl.load(p + N + N + N + N + N, mask=rmask, other=0.0))
            p += split_stride
        s1 = tl.zeros((BLOCK_N,), tl.float32)
        s1n = tl.zeros((BLOCK_N,), tl.float32)
        s1t = tl.zeros((BLOCK_N,), tl.float32)
        zy = tl.zeros((BLOCK_N,), tl.float32)
        first = tl.full((BLOCK_N,), -1.0, tl.float32)
        st = tl.zeros((BLOCK_N,), tl.float32)
        kacc = tl.zeros((BLOCK_N,), tl.float32)
        lsum = tl.zeros((BLOCK_N,), tl.float32)
        p = part_ptr + rows64
        for s in range(0, S):
            # stat k of this split lives at p + k N; pointers advance by N (no k * N in int32)
            if NEED_Z1:
                m1 = tl.load(p, mask=rmask, other=0.0)
            p1 = p + N
            p2 = p1 + N
            p3 = p2 + N
            p4 = p3 + N
            p5 = p4 + N
            p6 = p5 + N
            p7 = p6 + N
            p8 = p7 + N
            p9 = p8 + N
            if NEED_Z1:
                # masked rows read 1 so that their (unused) logs stay finite
                s1 += tl.load(p1, mask=rmask, other=1.0) * tl.exp(m1 - mx)
                s1n += tl.load(p9, mask=rmask, other=0.0) * tl.exp(m1 - mx)
                zy += tl.load(p3, mask=rmask, other=0.0)
                idx = tl.load(p4, mask=rmask, other=0.0)
                # splits are in class order: the first split holding the max has the first index
                first = tl.where((m1 == mx) & (first < 0), idx, first)
            if NEED_KD:
                s1t += tl.load(p2, mask=rmask, other=1.0) * tl.exp((m1 - mx) * inv_kd_t)
                mt = tl.load(p5, mask=rmask, other=0.0)
                st_s = tl.load(p6, mask=rmask, other=1.0)
                alpha = tl.exp(mt - mtx)
                kacc += alpha * (tl.load(p7, mask=rmask, other=0.0)
                                 + st_s * ((mx - m1) * inv_kd_t - (mtx - mt)))
                st += alpha * st_s
            if NEED_LOGIT:
                lsum += tl.load(p8, mask=rmask, other=0.0)
            p += split_stride
        sp = stats_ptr + rows64
        nv_acc += valid.to(tl.int64)
        zero = tl.zeros((BLOCK_N,), tl.float32)
        if NEED_Z1:
            # confident row (target is the max, s1 = 1 + s1n with s1n small): log1p by its series,
            # since log(1 + x) rounds x to the fp32 spacing of 1
            x1 = s1n
            log_s1 = tl.where((zy == mx) & (x1 < 1e-3), x1 * (1.0 - x1 * (0.5 - x1 * (1.0 / 3.0))), tl.log(s1))
            tl.store(sp, mx, mask=rmask)
            tl.store(sp + N, log_s1, mask=rmask)
            tl.store(sp + N + N, s1n / s1, mask=rmask)
            ce_acc += tl.where(valid, (mx - zy) + log_s1, 0.0)
            ok_acc += (valid & (first.to(tl.int64) == y)).to(tl.int64)
        else:
            tl.store(sp, zero, mask=rmask)
            tl.store(sp + N, zero, mask=rmask)
            tl.store(sp + N + N, zero, mask=rmask)
        sp += N + N + N
        if NEED_KD:
            log_s1t = tl.log(s1t)
            log_st = tl.log(st)
            tl.store(sp, log_s1t, mask=rmask)
            tl.store(sp + N, mtx, mask=rmask)
            tl.store(sp + N + N, log_st, mask=rmask)
            kd_acc += tl.where(valid, kd_t * kd_t * (kacc / st - log_st + log_s1t), 0.0)
        else:
            tl.store(sp, zero, mask=rmask)
            tl.store(sp + N, zero, mask=rmask)
            tl.store(sp + N + N, zero, mask=rmask)
        if NEED_LOGIT:
            lg_acc += tl.where(valid, tau * tau * lsum, 0.0)
    n_valid = tl.sum(nv_acc, 0)
    ce = tl.sum(ce_acc, 0)
    kd = tl.sum(kd_acc, 0)
    lg = tl.sum(lg_acc, 0)
    if MEAN:
        denom = tl.maximum(n_valid, 1).to(tl.float32)
        ce = ce / denom
        kd = kd / denom
        lg = lg / denom
    tl.store(terms_ptr, ce)
    tl.store(terms_ptr + 1, kd)
    tl.store(terms_ptr + 2, lg)
    tl.store(loss_ptr, ce_w * ce + kd_w * kd + lg_w * lg)
    tl.store(correct_ptr, tl.sum(ok_acc, 0))
    tl.store(nvalid_ptr, n_valid)
