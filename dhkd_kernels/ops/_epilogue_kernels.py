"""Memory-bound Triton kernels of the dual-head KD loss: the loss epilogue over stored logits, the
row reduction, bias column sums and scaled copies (launched from :mod:`dhkd_kernels.ops.dual_head_kd`).

Notation: z1 = X W1^T (main head) and z2 = A W2^T (auxiliary head) as stored by the GEMMs, without
bias (the biases b1, b2 are added here, in fp32); t the teacher logits; y the labels; V the valid
rows (label != ignore_index). A *block of logits* is rows [row0, row0 + R) x classes [col0, col0 + W)
of the (N, C) problem, stored with row strides ``stride_z1`` / ``stride_z2``.

``epilogue_kernel``  grid (cdiv(R, BLOCK_R),): each program owns BLOCK_R rows of the block and walks
    its classes in BLOCK_C tiles, at most twice:
      pass 1 (main head, needs the whole row: W = C): online max m1, s1n = sum exp(z1 - m1) without
        the target, s1T = sum exp((z1 - m1)/T), the first arg-max, and for KD the teacher's max mt,
        st = sum exp(t/T - mt) and the cross term K = sum exp(t/T - mt) ((t/T - mt) - (z1 - m1)/T),
        kept per (row, group of GROUP adjacent classes) and re-anchored once per group and tile when a
        max moves; then s1 = s1n + exp(z1[y] - m1) and
            CE = (m1 - z1[y]) + log s1,   KD/T^2 = K/st - log st + log s1T,   1 - p_y = s1n / s1;
      pass 2: dz1 = ce_w (softmax(z1) - onehot(y)) + kd_w T (softmax(z1/T) - softmax(t/T)) with the
        target column -ce_w (1 - p_y) (no cancellation for confident rows), written over z1; the
        elementwise logit loss of z2 summed per row, and its gradient
            dz2 = lg_w (tau/2) tanh((z2 - t)/(2 tau))   [BinaryKL-Norm]
            dz2 = lg_w tau (sig(z2/tau) - sig(t/tau))    [BinaryKL]
        written over z2. dz carries no grad_output and no 1/|V| (the products apply them), except the per-row
        weights of ROW_W (the chunked plan's recompute for a per-row grad_output).
    Per row it writes ce, kd, the logit-loss sum (added to the previous value with acc_logit, for class
    slabs) and correct into ``rows`` (4, N) ((5, N) with the z-loss). dz is written over the buffer's
    padded width (row stride, a multiple of 64), zeros past W; loads of z are masked by that width,
    128-bit vectors. The bias
    gradients are not summed here (no per-program partials to bound the grid): the Triton GEMM plan
    sums them inside ``dw_kernel``, the resident cuBLAS plan in ``grad_kernel`` (:mod:`._grad_kernel`,
    after PHASE 4: pass 1 only, the rows' final statistics stored), the chunked plans as dZ^T 1.
    Rows not in V read as zeros (garbage, NaN included, in ignored rows never reaches a result) and get
    zero terms and gradients; a row of V whose label is outside [0, C) gets NaN terms and NaN dz.
    A teacher logit of -inf is a class masked out for that row: probability 0 in KD (0 log 0 = 0) and
    no contribution (value and gradient 0) to the logit-level loss.
    The LLM options are compile-time branches (kernels.md has the formulas): CAP/TCAP softcap the
    student's logits (both heads) and the teacher's on every read, dz times the exact derivative;
    ZLOSS adds lse^2 per row (stored after kd; correct moves one row down) and GRAD_Z 2 lse softmax(z1)
    to dz1; DIV 1 (reverse KL) keeps two more lane sums in pass 1; DIV 2 (generalised JSD) runs one
    more pass over z1 and t between the two.
    Traffic per logit: z1 read twice and dz1 written once (2-byte logits: 6 bytes), the teacher read
    once or twice, z2 read and dz2 written once; ~40 FLOPs per logit, no tensor cores.

``finalize_kernel``  one program: reduces ``rows`` over the valid rows in a fixed order into loss,
    terms (3,), correct and n_valid; with per_row also the (N,) weighted per-row losses.

``scale_kernel``  grid (JOBS x the tiles of one job + the bias tiles,): the backward's scaled copies and
    bias gradients in one launch. Up to two scale jobs of one shape (M, P): out = scale * in (any
    strides, dtype cast), optionally zeroing the rows not in V (the masked, pre-scaled features of the
    dW products; dX's fp32 accumulator cast to the gradient); and the bias job: out = scale * sum for
    the fp32 column sums of dz of one or both heads, summed over their P parts (grad_kernel's row
    parts; 1 for dZ^T 1) in a fixed order. scale = grad_output / max(|V|, 1) as device scalars.

``count_kernel``  one program: n_valid = |V|.

``INTERP_BF16`` is set only under TRITON_INTERPRET with bfloat16 buffers, whose fp32 -> bf16 cast
truncates in the interpreter of triton 3.8; it rounds to nearest-even before such stores.
All offsets that multiply a stride are int64.
"""
from __future__ import annotations

import triton
import triton.language as tl

LN2 = tl.constexpr(0.6931471805599453)


LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _exp(x, FAST: tl.constexpr):
    """e^x. FAST (compiled code): one MUFU.EX2 of x log2(e) with flush-to-zero (results below 2^-126
    become 0; the non-ftz form adds a subnormal fix-up of three instructions per call)."""
    if FAST:
        return _exp2(x * LOG2E, FAST)
    else:
        return tl.exp(x)


@triton.jit
def _exp2(x, FAST: tl.constexpr):
    """2^x: one MUFU.EX2 (flush-to-zero) under FAST."""
    if FAST:
        return tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        return tl.exp2(x)


@triton.jit
def _log(x, FAST: tl.constexpr):
    """log x. FAST: MUFU.LG2 (absolute error below 2^-22 on [0.5, 2]) times log 2, for arguments in
    [1, 2] whose log is added to a larger term; otherwise libdevice's logf."""
    if FAST:
        return tl.inline_asm_elementwise("lg2.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32,
                                         is_pure=True, pack=1) * LN2
    else:
        return tl.log(x)


@triton.jit
def _rcp(x, FAST: tl.constexpr):
    """1 / x. FAST: MUFU.RCP without the IEEE division's range fix-ups (arguments in [1, 2] here)."""
    if FAST:
        return tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        return 1.0 / x


@triton.jit
def _sigmoid(v, FAST: tl.constexpr = False):
    """sig(v) without overflow: exp of a non-positive argument only."""
    e = _exp(-tl.abs(v), FAST)
    return tl.where(v >= 0, 1.0, e) * _rcp(1.0 + e, FAST)


@triton.jit
def _log_cosh_e(u, e, FAST: tl.constexpr):
    """log cosh(u) given e = e^-2u (shared with tanh)."""
    u2 = u * u
    series = u2 * (0.5 + u2 * (-1.0 / 12.0 + u2 * (1.0 / 45.0 + u2 * (-17.0 / 2520.0 + u2 * (31.0 / 14175.0)))))
    return tl.where(u < 0.4, series, u + _log(1.0 + e, FAST) - LN2)


@triton.jit
def _tanh_abs_e(u, e, FAST: tl.constexpr):
    """tanh(u) for u >= 0 given e = e^-2u: (1 - e) / (1 + e), and its series below 0.1 where 1 - e
    cancels."""
    u2 = u * u
    series = u * (1.0 + u2 * (-1.0 / 3.0 + u2 * (2.0 / 15.0 + u2 * (-17.0 / 315.0))))
    return tl.where(u < 0.1, series, (1.0 - e) * _rcp(1.0 + e, FAST))


@triton.jit
def _softcap(z, cap, inv_cap, FAST: tl.constexpr):
    """(cap tanh(z / cap), its derivative 1 - tanh^2 = 4 e / (1 + e)^2 with e = e^(-2|z|/cap), accurate
    where tanh saturates). +-inf give +-cap and derivative 0; NaN stays NaN."""
    u = tl.abs(z) * inv_cap
    e = _exp(-2.0 * u, FAST)
    r = _rcp(1.0 + e, FAST)
    th = _tanh_abs_e(u, e, FAST)
    return tl.where(z < 0, -th, th) * cap, 4.0 * e * r * r


@triton.jit
def _teacher_cap(t, tcap, inv_tcap, TCAP: tl.constexpr, FAST: tl.constexpr):
    """The teacher's softcap (TCAP): tcap tanh(t / tcap), -inf kept (a masked class)."""
    if TCAP:
        capped, _ = _softcap(t, tcap, inv_tcap, FAST)
        t = tl.where(t == float("-inf"), t, capped)
    return t


@triton.jit
def _log1p(u):
    """log(1 + u) accurate for small u (Kahan: the rounding of 1 + u is divided out)."""
    w = 1.0 + u
    return tl.where(w == 1.0, u, tl.log(w) * (u / (w - 1.0)))


@triton.jit
def _binary_kl(zs, ts):
    """KL(Bern(sig(ts)) || Bern(sig(zs))) elementwise, accurate for small gaps d = zs - ts too.

    In the frame where ts >= 0 (KL(s||p) = KL(1-s||1-p) allows flipping both signs), with a = sig(-ts)
    <= 1/2: KL = log1p(a expm1(-d)) + a d. |d| < 0.05: series for expm1(-d) + d and log1p(u) - u (they
    cancel to a (1 - a) d^2 / 2 otherwise); |d| < 1: that closed form; beyond: the softplus form."""
    flip = ts < 0
    tf = tl.where(flip, -ts, ts)
    dl = tl.where(flip, ts - zs, zs - ts)
    a = _sigmoid(-tf)
    g1 = dl * dl * (0.5 - dl * (1.0 / 6.0 - dl * (1.0 / 24.0 - dl * (1.0 / 120.0 - dl * (1.0 / 720.0)))))
    u = a * (g1 - dl)  # a expm1(-d)
    h = -u * u * (0.5 - u * (1.0 / 3.0 - u * (0.25 - u * (0.2 - u * (1.0 / 6.0)))))  # log1p(u) - u
    small = a * g1 + h
    mid = _log1p(a * (tl.exp(-dl) - 1.0)) + a * dl
    sp_z = tl.maximum(-zs, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(zs)))
    sp_t = tl.maximum(-ts, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(ts)))
    large = sp_z - sp_t + (zs - ts) * _sigmoid(-ts)
    ad = tl.abs(dl)
    return tl.where(ad < 0.05, small, tl.where(ad < 1.0, mid, large))


@triton.jit
def _jsd_terms(z, t, m1, log_s1t, mt, log_st, inv_t, beta, log_beta, log_1mbeta, FAST: tl.constexpr):
    """Per class of the generalised JSD, with log s = (z - m1)/T - log_s1t and log p = t/T - mt - log_st
    (rows' normalizers known): (beta p log(p/m) + (1 - beta) s log(s/m), a = (1 - beta) log(s/m), s),
    m = beta p + (1 - beta) s, log m by a stable logaddexp (p = 0 where the teacher masks the class)."""
    ls = (z - m1[:, None]) * inv_t - log_s1t[:, None]
    lp = (t * inv_t - mt[:, None]) - log_st[:, None]
    a = lp + log_beta
    b = ls + log_1mbeta
    hi = tl.maximum(a, b)
    lm = hi + tl.log(1.0 + _exp(-tl.abs(a - b), FAST))
    s = _exp(ls, FAST)
    p = _exp(lp, FAST)
    val = beta * tl.where(p > 0, p * (lp - lm), 0.0) + (1.0 - beta) * s * (ls - lm)
    return val, (1.0 - beta) * (ls - lm), s


@triton.jit
def _main_grad(z, t, is_y, m1, q, log_s1, log_s1t, mt, log_st, kdiv, skn, ls1_2, ls1t_2, lst_2, ce_w, kd_w_t,
               inv_kd_t, inv_kd_t2, eps, C, zl_w, beta, log_beta, log_1mbeta, GRAD_CE: tl.constexpr, GRAD_KD: tl.constexpr,
               GRAD_Z: tl.constexpr, SMOOTH: tl.constexpr, DIV: tl.constexpr, FAST: tl.constexpr):
    """d loss / d z1 of a (BLOCK_R, BLOCK_C) tile of softcapped logits z (teacher t, is_y the target
    columns) from its rows' statistics (BLOCK_R,) and the log2-unit offsets ls1_2 = log s1 log2(e),
    ls1t_2, lst_2 (BLOCK_R, 1); before the softcap's derivative and the row masks:
        ce_w (softmax(z) - (1 - eps) onehot(y) - eps/C)    (target column -(1 - p_y) + eps - eps/C)
      + 2 zl_w lse softmax(z)                              (GRAD_Z)
      + kd_w T d(divergence)/dz                            (DIV 0 forward KL, 1 reverse KL, 2 JSD)"""
    g = tl.zeros_like(z)
    dzm = z - m1[:, None]
    if GRAD_CE or GRAD_Z:
        p1 = _exp2(dzm * LOG2E - ls1_2, FAST)
    if GRAD_CE:
        gce = tl.where(is_y, eps - q[:, None], p1)
        if SMOOTH:
            gce = gce - eps / C
        g += ce_w * gce
    if GRAD_Z:  # d lse^2 / dz = 2 lse softmax(z)
        g += (2.0 * zl_w * (m1 + log_s1))[:, None] * p1
    if GRAD_KD:
        if DIV == 0:
            g += kd_w_t * (_exp2(dzm * inv_kd_t2 - ls1t_2, FAST)
                           - _exp2((t * inv_kd_t - mt[:, None]) * LOG2E - lst_2, FAST))
        if DIV == 1:
            # s_i (L_i + 1 - F - S_K) on the teacher's classes, -s_i (F + S_K) elsewhere
            ls = (z - m1[:, None]) * inv_kd_t - log_s1t[:, None]
            lratio = ls - ((t * inv_kd_t - mt[:, None]) - log_st[:, None])
            off = (kdiv + skn)[:, None]
            g += kd_w_t * _exp(ls, FAST) * tl.where(t != float("-inf"), lratio + 1.0 - off, -off)
        if DIV == 2:
            _, av, sv = _jsd_terms(z, t, m1, log_s1t, mt, log_st, inv_kd_t, beta, log_beta, log_1mbeta, FAST)
            g += kd_w_t * sv * (av - kdiv[:, None])
    return g


@triton.jit
def _aux_terms(z2, t, live, inv_tau, KL_NORM: tl.constexpr, FAST: tl.constexpr):
    """(the logit-level loss, the direction of its gradient) per element of a tile of z2 (softcapped)
    and t, 0 where not ``live`` (outside the rows and classes, or a class the teacher masks):
        BinaryKL-Norm: log cosh u and tanh u, u = (z2 - t) / (2 tau)   (dz2 = lg_w (tau/2) tanh u)
        BinaryKL:      KL(sig(t/tau) || sig(z2/tau)) and sig(z2/tau) - sig(t/tau)   (dz2 = lg_w tau ...)"""
    if KL_NORM:
        # a class not live gets u = 0: log cosh 0 = tanh 0 = 0, no further mask
        u = tl.where(live, z2 - t, 0.0) * (0.5 * inv_tau)
        ua = tl.abs(u)
        e2u = _exp2(ua * (-2.0 * LOG2E), FAST)  # e^(-2|u|), shared by log cosh and tanh
        lc = _log_cosh_e(ua, e2u, FAST)
        th = _tanh_abs_e(ua, e2u, FAST)
        return lc, tl.where(u < 0, -th, th)
    else:
        zs = tl.where(live, z2, 0.0) * inv_tau
        ts = tl.where(live, t, 0.0) * inv_tau
        return (tl.where(live, _binary_kl(zs, ts), 0.0),
                tl.where(live, _sigmoid(zs, FAST) - _sigmoid(ts, FAST), 0.0))


@triton.jit
def _main_logits(z1_ptr, b1_ptr, row_off, row_ok, cols, cmask, rows0, stride_z1, cap, inv_cap,
                 HAS_B1: tl.constexpr, CAP: tl.constexpr, FAST: tl.constexpr):
    """A tile of the main head's logits as the loss reads them: the stored z1 (loads masked by the
    buffer's padded width, a multiple of 16: 128-bit loads), plus the bias, softcapped. The row part
    (row_off = row x stride, row_ok, rows0 = zeros) is (BLOCK_R, 1) or (BLOCK_R, 1, 1), the class part
    (cols, cmask) (1, BLOCK_C) or (1, NG, GROUP)."""
    z = tl.load(z1_ptr + row_off + cols, mask=row_ok & (cols < stride_z1), other=0.0).to(tl.float32)
    if HAS_B1:
        z += _row_bcast_load(b1_ptr + cols, cmask, rows0)
    if CAP:
        z, _ = _softcap(z, cap, inv_cap, FAST)
    return z


@triton.jit
def _row_bcast_load(ptrs, mask, rows0):
    """A bias tile (ptrs, mask: a leading dimension of 1) loaded as an fp32 tile with rows0's BLOCK_R rows
    (rows0: zeros), the same in every row: one (L1-cached) vector load per row in the tile's own layout,
    instead of a 1-D load whose layout conversion goes through shared memory with a barrier at every
    iteration of the class loop."""
    return tl.load(ptrs + rows0, mask=mask & (rows0 == 0), other=0.0).to(tl.float32)


@triton.jit
def _rtne_bf16(v):
    """fp32 -> fp32 holding the round-to-nearest-even bf16 value (interpreter only, see module doc)."""
    bits = v.to(tl.uint32, bitcast=True)
    bits = (bits + (((bits >> 16) & 1) + 0x7FFF)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _store_rounded(ptrs, v, mask, INTERP_BF16: tl.constexpr):
    if INTERP_BF16:
        v = _rtne_bf16(v)
    tl.store(ptrs, v.to(ptrs.dtype.element_ty), mask=mask)


@triton.jit
def _stats_tile(m_l, sn_l, a_l, zs_l, s1t_l, mt_l, st_l, k_l, sk_l, r_l, c0, y_g,
                z1_ptr, b1_ptr, t_ptr, zrow3, valid3, t_rows3, rows0_3, goffs, gbase, W, stride_z1, stride_tc,
                t_col0, cap, inv_cap, tcap, inv_tcap, inv_kd_t, inv_kd_t2, kscale, kl2s,
                MASKED: tl.constexpr, KD_STATS: tl.constexpr, SMOOTH: tl.constexpr, DIV: tl.constexpr,
                HAS_B1: tl.constexpr, CAP: tl.constexpr, TCAP: tl.constexpr, FAST: tl.constexpr,
                GROUP: tl.constexpr):
    """Pass 1 over the (BLOCK_R, NG, GROUP) tile of classes [c0, c0 + BLOCK_C): the lanes' running
    statistics (see epilogue_kernel) updated and returned. MASKED: the row's last, partial tile (class
    masks); the full tiles before it load and reduce without any class mask (uniform predicates, 128-bit
    bias loads)."""
    neg_inf = float("-inf")
    cols = (c0 + goffs)[None, :, :]
    if MASKED:
        cmask = cols < W
    else:
        cmask = rows0_3 == 0  # every class of a full tile
    z = _main_logits(z1_ptr, b1_ptr, zrow3, valid3, cols, cmask, rows0_3, stride_z1, cap, inv_cap, HAS_B1, CAP,
                     FAST)
    zm = tl.where(cmask, z, neg_inf) if MASKED else z
    gmax = tl.max(zm, 2)
    m_new = tl.maximum(m_l, gmax)
    a_l = tl.where(gmax > m_l, c0 + gbase[None, :], a_l)
    # exponentials in log2 units: e^x = 2^(x log2 e); forward KL's K in the same units
    dz = zm - m_new[:, :, None]
    dz2 = dz * LOG2E
    # the target excluded: y_g is its class relative to each lane's group (one compare per element
    # against a constant)
    sn_l = sn_l * _exp2((m_l - m_new) * LOG2E, FAST) + tl.sum(
        tl.where(tl.arange(0, GROUP)[None, None, :] == y_g, 0.0, _exp2(dz2, FAST)), 2)
    if SMOOTH:
        zs_l += tl.sum(tl.where(cmask, z, 0.0) if MASKED else z, 2)
    if KD_STATS:
        alpha_s = _exp2((m_l - m_new) * inv_kd_t2, FAST)
        dzt2 = dz2 * inv_kd_t
        u = _exp2(dzt2, FAST)
        s1t_l = s1t_l * alpha_s + tl.sum(u, 2)
        if MASKED:
            t = tl.load(t_ptr + t_rows3 + (cols - t_col0) * stride_tc, mask=valid3 & cmask, other=0.0)
        else:
            # the tile's first class as a 64-bit offset: the GROUP classes of a thread then sit at
            # constant offsets from one address (no per-element 64-bit address arithmetic)
            tp = t_ptr + t_rows3 + (c0 - t_col0).to(tl.int64) * stride_tc
            t = tl.load(tp + goffs[None, :, :] * stride_tc, mask=valid3)
        t = _teacher_cap(t.to(tl.float32), tcap, inv_tcap, TCAP, FAST)
        # t/T as the gradient pass computes it: the two passes' teacher probabilities agree to the bit
        tt = tl.where(cmask, t * inv_kd_t, neg_inf) if MASKED else t * inv_kd_t
        mt_new = tl.maximum(mt_l, tl.max(tt, 2))
        alpha_t = _exp2((mt_l - mt_new) * LOG2E, FAST)
        shift = (m_new - m_l) * inv_kd_t - (mt_new - mt_l)
        dtt = tt - mt_new[:, :, None]
        dtt2 = dtt * LOG2E
        e = _exp2(dtt2, FAST)
        if DIV == 0:
            k_l = alpha_t * (k_l + tl.where(st_l > 0, st_l * (shift * kl2s), 0.0))
            k_l += kscale * tl.sum(tl.where(e > 0, e * (dtt2 - dzt2), 0.0), 2)
        st_l = st_l * alpha_t + tl.sum(e, 2)
        if DIV == 1:
            # u-weighted log-ratios over the teacher's classes, anchored at the lanes' maxima, in
            # natural units and the gradient pass's own arithmetic ((z - m)/T - (t/T - m_t)):
            # where the student's softmax saturates, the gradient's offset cancels exactly
            keep = tt != neg_inf
            r_l = alpha_s * (r_l - tl.where(sk_l > 0, sk_l * (shift * kscale), 0.0))
            sk_l = sk_l * alpha_s
            r_l += kscale * tl.sum(tl.where(keep, u * (dz * inv_kd_t - dtt), 0.0), 2)
            sk_l += tl.sum(tl.where(keep, u, 0.0), 2)
        mt_l = mt_new
    return m_new, sn_l, a_l, zs_l, s1t_l, mt_l, st_l, k_l, sk_l, r_l


@triton.jit(do_not_specialize=["R", "W_VEC", "acc_logit"])
def epilogue_kernel(
    # pointers: stored logits of the block (read, then overwritten with dz); teacher (N, C) or its block
    # (row/column offsets t_row0/t_col0 subtracted); labels (N,); biases (C,) (any float dtype); rows (4 or 5, N)
    # fp32 per-row terms; w (N,) per-row weights of dz (ROW_W); stats (K, R) the block's per-row
    # statistics of the sharded form's phases (PHASE 1 and 3 write them, 2 and 3 read them) or, PHASE 4,
    # the rows' final statistics (8, R) for grad_kernel (the split gradient pass: pass 2 skipped)
    z1_ptr, z2_ptr, t_ptr, y_ptr, b1_ptr, b2_ptr, rows_ptr, w_ptr, stats_ptr,
    # sizes: N rows and C classes of the problem; the block is rows [row0, row0 + R), classes
    # [col0, col0 + W) with W = W_VEC * VEC (VEC divides W and the teacher's row stride: vector loads);
    # y_off: the global id of local class 0 (the sharded form's vocab_start; 0 otherwise)
    N, C, R, W_VEC, row0, col0, y_off,
    # strides, in elements (the teacher's row stride is stride_tn_vec * VEC); the teacher block starts at
    # row t_row0, column t_col0 of the problem
    stride_z1, stride_z2, stride_tn_vec, stride_tc, t_row0, t_col0,
    # scalars: term weights and temperatures (kd_w_t = kd_w T); eps: label smoothing of CE;
    # acc_logit: add to the previous logit sums
    ce_w, kd_w_t, inv_kd_t, kd_t2, lg_w, inv_tau, tau2, eps, ignore_index, acc_logit,
    # kscale: a power of two <= 1/C scaling the KD log-ratio sums K and R (finite while the loss is)
    kscale,
    # the LLM options: softcaps of the student (both heads) and the teacher with their inverses, the
    # z-loss weight, the JSD mixture's beta, log(beta) and log(1 - beta)
    cap, inv_cap, tcap, inv_tcap, zl_w, beta, log_beta, log_1mbeta,
    # meta-parameters: which terms (stats) and which gradients; DIV: the softmax term's divergence (0
    # forward KL, 1 reverse KL, 2 JSD); CAP/TCAP: softcaps on; ZLOSS/GRAD_Z: the z-loss and its gradient
    MAIN: tl.constexpr, KD_STATS: tl.constexpr, AUX: tl.constexpr, GRAD_CE: tl.constexpr,
    GRAD_KD: tl.constexpr, GRAD_AUX: tl.constexpr, ZLOSS: tl.constexpr, GRAD_Z: tl.constexpr,
    DIV: tl.constexpr, CAP: tl.constexpr, TCAP: tl.constexpr, PHASE: tl.constexpr, KL_NORM: tl.constexpr,
    HAS_B1: tl.constexpr,
    HAS_B2: tl.constexpr, ROW_W: tl.constexpr, SMOOTH: tl.constexpr, INTERP_BF16: tl.constexpr,
    VEC: tl.constexpr, FAST: tl.constexpr, GROUP: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # Bytes per logit: z1 read twice and dz1 written once, the teacher read once per pass that needs it,
    # z2 read and dz2 written once; no tensor-core work. Every row statistic is kept per lane (per
    # (row, group of GROUP classes) in pass 1, per element in pass 2) across the class loop and reduced
    # across the tile once, after it: no cross-warp reduction inside the loops.
    W = W_VEC * VEC
    stride_tn = stride_tn_vec * VEC
    pid = tl.program_id(0).to(tl.int64)
    lrows = pid * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    rmask = lrows < R
    grows = row0 + lrows
    y = tl.load(y_ptr + grows, mask=rmask, other=ignore_index).to(tl.int64)
    valid = rmask & (y != ignore_index)
    bad = valid & ((y < 0) | (y >= C))
    # NaN for a bad label's row, 1 otherwise: a multiplier rather than a mask (fewer live predicates)
    row_nan = tl.where(bad, float("nan"), 1.0)
    if ROW_W:
        row_nan = row_nan * tl.load(w_ptr + grows, mask=rmask, other=0.0).to(tl.float32)
    t_rows = (grows - t_row0)[:, None] * stride_tn
    # the label as a local class id (-1 where this block's classes do not hold it): class ids fit in
    # int32, cheaper compares
    y_loc = (y - y_off).to(tl.int32)
    y32 = tl.where(valid & (~bad) & (y_loc >= 0) & (y_loc < W), y_loc, -1)
    neg_inf = float("-inf")
    nan = float("nan")
    GRAD_MAIN: tl.constexpr = GRAD_CE or GRAD_KD or GRAD_Z
    offs = tl.arange(0, BLOCK_C)
    rows0 = tl.zeros((BLOCK_R, 1), tl.int32)  # the row part of bias tiles (_row_bcast_load)

    m1 = tl.full((BLOCK_R,), -1.0e30, tl.float32)
    log_s1 = tl.zeros((BLOCK_R,), tl.float32)
    q = tl.zeros((BLOCK_R,), tl.float32)
    log_s1t = tl.zeros((BLOCK_R,), tl.float32)
    mt = tl.full((BLOCK_R,), -1.0e30, tl.float32)
    log_st = tl.zeros((BLOCK_R,), tl.float32)
    ce = tl.zeros((BLOCK_R,), tl.float32)
    kd = tl.zeros((BLOCK_R,), tl.float32)
    correct = tl.zeros((BLOCK_R,), tl.float32)
    zl = tl.zeros((BLOCK_R,), tl.float32)
    kdiv = tl.zeros((BLOCK_R,), tl.float32)   # reverse KL / JSD per row, unscaled (the gradient's offset)
    skn = tl.zeros((BLOCK_R,), tl.float32)    # reverse KL: the student's mass on the teacher's classes
    if MAIN and (PHASE < 2 or PHASE == 4):
        # ---------------------------------------------------------------- pass 1: row statistics of z1
        # (the main head's block is whole rows: col0 = 0, W = C). The tile is (BLOCK_R, NG, GROUP): each
        # thread holds GROUP adjacent classes of a row (one 128-bit load), and the running statistics
        # live per lane = (row, group): max m, sn = sum exp(z - m) without the target, st1 = sum
        # exp((z - m)/T), the first arg-max; teacher: max mt, st = sum exp(t/T - mt), K = sum
        # exp(t/T - mt) ((t/T - mt) - (z - m)/T). A lane's anchors move once per tile (the max of its
        # GROUP classes, reduced inside the thread), so the rescaling exponentials cost 1/GROUP per logit.
        # s = sum exp(z - m) is sn plus the target's term, added after the loop (no cancellation in 1 - p_y).
        NG: tl.constexpr = BLOCK_C // GROUP
        goffs = tl.arange(0, NG)[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
        m_l = tl.full((BLOCK_R, NG), -1.0e30, tl.float32)
        sn_l = tl.zeros((BLOCK_R, NG), tl.float32)
        a_l = tl.zeros((BLOCK_R, NG), tl.int32)
        zs_l = tl.zeros((BLOCK_R, NG), tl.float32)
        s1t_l = tl.zeros((BLOCK_R, NG), tl.float32)
        mt_l = tl.full((BLOCK_R, NG), -1.0e30, tl.float32)
        st_l = tl.zeros((BLOCK_R, NG), tl.float32)
        k_l = tl.zeros((BLOCK_R, NG), tl.float32)
        sk_l = tl.zeros((BLOCK_R, NG), tl.float32)  # reverse KL: sum_keep u and sum_keep u (log-ratio)
        r_l = tl.zeros((BLOCK_R, NG), tl.float32)
        t_rows3 = t_rows[:, :, None]
        rows0_3 = tl.zeros((BLOCK_R, 1, 1), tl.int32)
        gbase = tl.arange(0, NG) * GROUP
        # the label's class relative to each lane's group of the tile
        y_g = tl.where(y32 >= 0, y32, -2**30)[:, None, None] - gbase[None, :, None]
        inv_kd_t2 = inv_kd_t * LOG2E
        kl2s = kscale * LOG2E
        zrow3 = lrows[:, None, None] * stride_z1
        valid3 = valid[:, None, None]
        w_full = (W // BLOCK_C) * BLOCK_C
        for c0 in range(0, w_full, BLOCK_C):
            m_l, sn_l, a_l, zs_l, s1t_l, mt_l, st_l, k_l, sk_l, r_l = _stats_tile(
                m_l, sn_l, a_l, zs_l, s1t_l, mt_l, st_l, k_l, sk_l, r_l, c0, y_g, z1_ptr, b1_ptr, t_ptr, zrow3,
                valid3, t_rows3, rows0_3, goffs, gbase, W, stride_z1, stride_tc, t_col0, cap, inv_cap, tcap,
                inv_tcap, inv_kd_t, inv_kd_t2, kscale, kl2s, False, KD_STATS, SMOOTH, DIV, HAS_B1, CAP, TCAP, FAST,
                GROUP)
            y_g -= BLOCK_C
        if w_full < W:
            m_l, sn_l, a_l, zs_l, s1t_l, mt_l, st_l, k_l, sk_l, r_l = _stats_tile(
                m_l, sn_l, a_l, zs_l, s1t_l, mt_l, st_l, k_l, sk_l, r_l, w_full, y_g, z1_ptr, b1_ptr, t_ptr,
                zrow3, valid3, t_rows3, rows0_3, goffs, gbase, W, stride_z1, stride_tc, t_col0, cap, inv_cap,
                tcap, inv_tcap, inv_kd_t, inv_kd_t2, kscale, kl2s, True, KD_STATS, SMOOTH, DIV, HAS_B1, CAP, TCAP,
                FAST, GROUP)
        # the lanes reduced once: anchors moved to the row maxima (K from log2 units)
        k_l = k_l * LN2
        m1 = tl.max(m_l, 1)
        sc = _exp(m_l - m1[:, None], FAST)
        s1n = tl.sum(sn_l * sc, 1)
        # the first arg-max: the first group holding the row max (lanes keep the first group that raised
        # their max), read again to find the first of its classes equal to it
        g1 = tl.min(tl.where(m_l == m1[:, None], a_l, 2**30), 1)
        fcols = g1[:, None] + tl.arange(0, GROUP)[None, :]
        fmask = fcols < W
        zf = tl.load(z1_ptr + lrows[:, None] * stride_z1 + fcols, mask=valid[:, None] & fmask, other=0.0).to(tl.float32)
        if HAS_B1:
            zf += tl.load(b1_ptr + fcols, mask=fmask, other=0.0).to(tl.float32)
        if CAP:
            zf, _ = _softcap(zf, cap, inv_cap, FAST)
        amax = tl.min(tl.where(fmask & (zf == m1[:, None]), fcols, 2**30), 1)
        amax = tl.where(amax == 2**30, tl.where(g1 == 2**30, 0, g1), amax).to(tl.int64)
        ok = y32 >= 0  # the label is valid and one of this block's classes
        zy = tl.load(z1_ptr + lrows * stride_z1 + tl.where(ok, y32, 0), mask=ok, other=0.0).to(tl.float32)
        if HAS_B1:
            zy += tl.load(b1_ptr + tl.where(ok, y32, 0), mask=ok, other=0.0).to(tl.float32)
        if CAP:
            zy, _ = _softcap(zy, cap, inv_cap, FAST)
        s1 = s1n + tl.where(ok, _exp(zy - m1, FAST), 0.0)
        # confident row (the target is the max and s1 = 1 + s1n with s1n small): log1p by its series,
        # since log(1 + x) rounds x to the fp32 spacing of 1
        log_s1 = tl.where((zy == m1) & (s1n < 1e-3), s1n * (1.0 - s1n * (0.5 - s1n * (1.0 / 3.0))), tl.log(s1))
        q = s1n / s1
        ce = (m1 - zy) + log_s1
        if SMOOTH:
            # label smoothing: (1 - eps) CE + eps mean_c (-log p_c) = CE - eps (mean_c z_c - z_y)
            ce = ce - eps * (tl.sum(zs_l, 1) / C - zy)
        correct = tl.where(amax == y, 1.0, 0.0)
        if ZLOSS:
            lse = m1 + log_s1
            zl = lse * lse
        if KD_STATS:
            sc_t = _exp((m_l - m1[:, None]) * inv_kd_t, FAST)
            log_s1t = tl.log(tl.sum(s1t_l * sc_t, 1))
            mt = tl.max(mt_l, 1)
            at = _exp(mt_l - mt[:, None], FAST)
            st = tl.sum(st_l * at, 1)
            shift = (m1[:, None] - m_l) * inv_kd_t - (mt[:, None] - mt_l)
            log_st = tl.log(st)
            # K and R come scaled by kscale (a power of two): unscaled after the normalization
            if DIV == 0:
                kacc = tl.sum(at * (k_l + tl.where(st_l > 0, st_l * (shift * kscale), 0.0)), 1)
                kd = kd_t2 * ((kacc / st) / kscale - log_st + log_s1t)
            if DIV == 1:
                # KL(s || p) over the teacher's classes = (R + SK (log st - log s1t)) / S1t, with
                # R = sum_keep u ((z - m1)/T - (t/T - mt)), SK = sum_keep u, u = e^((z - m1)/T)
                inv_s1t = 1.0 / tl.sum(s1t_l * sc_t, 1)
                racc = tl.sum(sc_t * (r_l - tl.where(sk_l > 0, sk_l * (shift * kscale), 0.0)), 1)
                skn = tl.sum(sc_t * sk_l, 1) * inv_s1t
                kdiv = (racc * inv_s1t) / kscale + skn * (log_st - log_s1t)
                kd = kd_t2 * kdiv

    if MAIN and PHASE == 1:
        # the sharded form's statistics of this block's classes, anchored at its own maxima (PHASE 1)
        sp = stats_ptr + lrows
        tl.store(sp, m1, mask=rmask)
        tl.store(sp + R, s1n, mask=rmask)
        tl.store(sp + 2 * R, tl.where(ok, zy, neg_inf), mask=rmask)
        if SMOOTH:
            tl.store(sp + 3 * R, tl.sum(zs_l, 1), mask=rmask)
        tl.store(sp + 10 * R, (amax + y_off).to(tl.float32), mask=rmask)
        if KD_STATS:
            tl.store(sp + 4 * R, tl.sum(s1t_l * sc_t, 1), mask=rmask)
            tl.store(sp + 5 * R, mt, mask=rmask)
            tl.store(sp + 6 * R, st, mask=rmask)
            if DIV == 0:
                tl.store(sp + 7 * R, kacc, mask=rmask)
            if DIV == 1:
                tl.store(sp + 8 * R, racc, mask=rmask)
                tl.store(sp + 9 * R, tl.sum(sc_t * sk_l, 1), mask=rmask)
    if MAIN and (PHASE == 2 or PHASE == 3):
        # the group's statistics (PHASE 2: the gradient pass; PHASE 3: the JSD's per-class sums)
        sp = stats_ptr + lrows
        m1 = tl.load(sp, mask=rmask, other=0.0)
        log_s1 = tl.load(sp + R, mask=rmask, other=0.0)
        q = tl.load(sp + 2 * R, mask=rmask, other=0.0)
        log_s1t = tl.load(sp + 3 * R, mask=rmask, other=0.0)
        mt = tl.load(sp + 4 * R, mask=rmask, other=0.0)
        log_st = tl.load(sp + 5 * R, mask=rmask, other=0.0)
        kdiv = tl.load(sp + 6 * R, mask=rmask, other=0.0)
        skn = tl.load(sp + 7 * R, mask=rmask, other=0.0)
    if MAIN and DIV == 2 and (((PHASE == 0 or PHASE == 4) and KD_STATS) or PHASE == 3):
        # generalised JSD: one more pass, per class, with the rows' normalizers known
        jv_l = tl.zeros((BLOCK_R, BLOCK_C), tl.float32)
        js_l = tl.zeros((BLOCK_R, BLOCK_C), tl.float32)
        for c0 in range(0, W, BLOCK_C):
            cols = c0 + offs
            cmask = cols < W
            m2d = valid[:, None] & cmask[None, :]
            z = _main_logits(z1_ptr, b1_ptr, lrows[:, None] * stride_z1, valid[:, None], cols[None, :],
                             cmask[None, :], rows0, stride_z1, cap, inv_cap, HAS_B1, CAP, FAST)
            t = tl.load(t_ptr + t_rows + (cols - t_col0)[None, :] * stride_tc,
                        mask=m2d, other=0.0).to(tl.float32)
            t = _teacher_cap(t, tcap, inv_tcap, TCAP, FAST)
            val, av, sv = _jsd_terms(z, t, m1, log_s1t, mt, log_st, inv_kd_t, beta, log_beta, log_1mbeta, FAST)
            jv_l += tl.where(m2d, val, 0.0)
            js_l += tl.where(m2d, sv * av, 0.0)
        if PHASE != 3:
            kdiv = tl.sum(js_l, 1)  # sum_j s_j a_j: the gradient's offset
            kd = kd_t2 * tl.sum(jv_l, 1)
        else:
            tl.store(stats_ptr + lrows + 8 * R, tl.sum(jv_l, 1), mask=rmask)
            tl.store(stats_ptr + lrows + 9 * R, tl.sum(js_l, 1), mask=rmask)

    if MAIN and PHASE == 4:
        # the rows' statistics as PHASE 2 (and grad_kernel) read them: the gradient pass runs apart
        sp = stats_ptr + lrows
        tl.store(sp, m1, mask=rmask)
        tl.store(sp + R, log_s1, mask=rmask)
        tl.store(sp + 2 * R, q, mask=rmask)
        if KD_STATS:
            tl.store(sp + 3 * R, log_s1t, mask=rmask)
            tl.store(sp + 4 * R, mt, mask=rmask)
            tl.store(sp + 5 * R, log_st, mask=rmask)
            if DIV != 0:
                tl.store(sp + 6 * R, kdiv, mask=rmask)
                tl.store(sp + 7 * R, skn, mask=rmask)

    # -------------------------------------------------------------------- pass 2: dz1, logit loss, dz2
    # dz is written over the buffer's whole padded width (zeros past W): the Triton GEMMs read dz
    # without a class mask, and the stores are 128-bit
    lg_l = tl.zeros((BLOCK_R, BLOCK_C), tl.float32)
    w_out = W
    if GRAD_MAIN:
        w_out = stride_z1
    elif GRAD_AUX:
        w_out = stride_z2
    if (GRAD_MAIN or AUX) and (PHASE == 0 or PHASE == 2):
        # the exponentials' row offsets in log2 units, and the label's class relative to the tile
        ls1_2 = (log_s1 * LOG2E)[:, None]
        ls1t_2 = (log_s1t * LOG2E)[:, None]
        lst_2 = (log_st * LOG2E)[:, None]
        inv_kd_t2 = inv_kd_t * LOG2E
        y_c0 = tl.where(y32 >= 0, y32 - col0, -2**30)[:, None]
        g2_scale = (row_nan * (0.5 * lg_w / inv_tau if KL_NORM else lg_w / inv_tau))[:, None]
        for c0 in range(0, w_out, BLOCK_C):
            cols = c0 + offs
            cmask = cols < W
            gcols = col0 + cols
            m2d = valid[:, None] & cmask[None, :]
            out2d = rmask[:, None] & (cols < w_out)[None, :]
            if GRAD_KD or AUX:
                t = tl.load(t_ptr + t_rows + (gcols - t_col0)[None, :] * stride_tc,
                            mask=m2d, other=0.0).to(tl.float32)
                t = _teacher_cap(t, tcap, inv_tcap, TCAP, FAST)
            else:
                t = tl.zeros((BLOCK_R, BLOCK_C), tl.float32)  # not read
            if GRAD_MAIN:
                zp = z1_ptr + lrows[:, None] * stride_z1 + cols[None, :]
                z = tl.load(zp, mask=valid[:, None] & (cols < stride_z1)[None, :], other=0.0).to(tl.float32)
                if HAS_B1:
                    z += _row_bcast_load(b1_ptr + gcols[None, :], cmask[None, :], rows0)
                if CAP:
                    z, dcap = _softcap(z, cap, inv_cap, FAST)
                g = _main_grad(z, t, offs[None, :] == y_c0, m1, q, log_s1, log_s1t, mt, log_st, kdiv, skn,
                               ls1_2, ls1t_2, lst_2, ce_w, kd_w_t, inv_kd_t, inv_kd_t2, eps, C, zl_w, beta, log_beta,
                               log_1mbeta, GRAD_CE, GRAD_KD, GRAD_Z, SMOOTH, DIV, FAST)
                if CAP:
                    g = g * dcap
                g = tl.where(m2d, g, 0.0) * row_nan[:, None]
                _store_rounded(zp, g, out2d, INTERP_BF16)
            y_c0 -= BLOCK_C
            if AUX:
                zp2 = z2_ptr + lrows[:, None] * stride_z2 + cols[None, :]
                z2 = tl.load(zp2, mask=valid[:, None] & (cols < stride_z2)[None, :], other=0.0).to(tl.float32)
                if HAS_B2:
                    z2 += _row_bcast_load(b2_ptr + gcols[None, :], cmask[None, :], rows0)
                if CAP:
                    z2, dcap2 = _softcap(z2, cap, inv_cap, FAST)
                live = m2d & (t != neg_inf)  # -inf teacher: a masked class
                lg, g2 = _aux_terms(z2, t, live, inv_tau, KL_NORM, FAST)
                lg_l += lg
                if GRAD_AUX:
                    if CAP:  # (dcap2 of a padding column's garbage may be NaN)
                        g2 = tl.where(live, g2 * dcap2, 0.0)
                    _store_rounded(zp2, g2 * g2_scale, out2d, INTERP_BF16)
    lg = tl.sum(lg_l, 1)

    # ------------------------------------------------------------------------------ per-row terms
    # row indices and labels re-derived here rather than held across the loops (shorter live ranges)
    lrows = pid * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    rmask = lrows < R
    grows = row0 + lrows
    y = tl.load(y_ptr + grows, mask=rmask, other=ignore_index).to(tl.int64)
    valid = rmask & (y != ignore_index)
    bad = valid & ((y < 0) | (y >= C))
    rp = rows_ptr + grows
    if MAIN and (PHASE == 0 or PHASE == 4):
        tl.store(rp, tl.where(bad, nan, tl.where(valid, ce, 0.0)), mask=rmask)
        tl.store(rp + N, tl.where(bad, nan, tl.where(valid, kd, 0.0)), mask=rmask)
        if ZLOSS:
            tl.store(rp + 3 * N, tl.where(bad, nan, tl.where(valid, zl, 0.0)), mask=rmask)
        tl.store(rp + (3 + ZLOSS) * N, tl.where(valid & (~bad), correct, 0.0), mask=rmask)
    if AUX and (PHASE == 0 or PHASE == 2):
        lg = tl.where(bad, nan, tl.where(valid, tau2 * lg, 0.0))
        if acc_logit != 0:
            lg += tl.load(rp + 2 * N, mask=rmask, other=0.0)
        tl.store(rp + 2 * N, lg, mask=rmask)


@triton.jit(do_not_specialize=["per_row", "mean", "n_lgp"])
def finalize_kernel(
    # pointers: rows (4 or 5, N) fp32 from epilogue_kernel; labels (N,); outputs loss (), terms (3 or 4,),
    # correct () int64, n_valid () int64, per_row (N,) fp32 (written when per_row != 0)
    rows_ptr, y_ptr, loss_ptr, terms_ptr, correct_ptr, nvalid_ptr, per_row_ptr,
    # lgp (n_lgp,): grad_kernel's sums of the logit-level loss (LG_PARTS), read instead of row 2
    lgp_ptr, n_lgp,
    # sizes and scalars; per_row != 0 writes the (N,) weighted per-row losses (not with LG_PARTS)
    N, ce_w, kd_w, lg_w, zl_w, ignore_index, per_row, mean,
    # meta-parameters: which terms exist (a term absent from the loss is never added to it, so a NaN
    # in an unused term cannot reach the loss) and which rows were written; ZL_IN: rows hold the
    # z-loss at row 3 (correct at row 4)
    CE_IN: tl.constexpr, KD_IN: tl.constexpr, LG_IN: tl.constexpr, ZL_IN: tl.constexpr, HAVE_MAIN: tl.constexpr,
    HAVE_AUX: tl.constexpr, LG_PARTS: tl.constexpr, BLOCK: tl.constexpr,
):
    ce_acc = tl.zeros((BLOCK,), tl.float32)
    kd_acc = tl.zeros((BLOCK,), tl.float32)
    lg_acc = tl.zeros((BLOCK,), tl.float32)
    zl_acc = tl.zeros((BLOCK,), tl.float32)
    ok_acc = tl.zeros((BLOCK,), tl.int64)
    nv_acc = tl.zeros((BLOCK,), tl.int64)
    for r0 in range(0, N, BLOCK):
        r = r0 + tl.arange(0, BLOCK).to(tl.int64)
        rmask = r < N
        y = tl.load(y_ptr + r, mask=rmask, other=ignore_index).to(tl.int64)
        valid = rmask & (y != ignore_index)
        nv_acc += valid.to(tl.int64)
        row = tl.zeros((BLOCK,), tl.float32)
        if HAVE_MAIN:
            ce = tl.where(valid, tl.load(rows_ptr + r, mask=rmask, other=0.0), 0.0)
            kd = tl.where(valid, tl.load(rows_ptr + N + r, mask=rmask, other=0.0), 0.0)
            ce_acc += ce
            kd_acc += kd
            ok_acc += tl.where(valid, tl.load(rows_ptr + (3 + ZL_IN) * N + r, mask=rmask, other=0.0),
                               0.0).to(tl.int64)
            if CE_IN:
                row += ce_w * ce
            if KD_IN:
                row += kd_w * kd
            if ZL_IN:
                zl_r = tl.where(valid, tl.load(rows_ptr + 3 * N + r, mask=rmask, other=0.0), 0.0)
                zl_acc += zl_r
                row += zl_w * zl_r
        if HAVE_AUX and not LG_PARTS:
            lg = tl.where(valid, tl.load(rows_ptr + 2 * N + r, mask=rmask, other=0.0), 0.0)
            lg_acc += lg
            if LG_IN:
                row += lg_w * lg
        if per_row != 0:
            tl.store(per_row_ptr + r, row, mask=rmask)
    if HAVE_AUX and LG_PARTS:
        for k0 in range(0, n_lgp, BLOCK):
            k = k0 + tl.arange(0, BLOCK)
            lg_acc += tl.load(lgp_ptr + k, mask=k < n_lgp, other=0.0)
    n_valid = tl.sum(nv_acc, 0)
    ce = tl.sum(ce_acc, 0)
    kd = tl.sum(kd_acc, 0)
    lg = tl.sum(lg_acc, 0)
    zl = tl.sum(zl_acc, 0)
    if mean != 0:
        denom = tl.maximum(n_valid, 1).to(tl.float32)
        ce = ce / denom
        kd = kd / denom
        lg = lg / denom
        zl = zl / denom
    loss = 0.0
    if CE_IN:
        loss += ce_w * ce
    if KD_IN:
        loss += kd_w * kd
    if LG_IN:
        loss += lg_w * lg
    if ZL_IN:
        loss += zl_w * zl
        tl.store(terms_ptr + 3, zl)
    tl.store(terms_ptr, ce)
    tl.store(terms_ptr + 1, kd)
    tl.store(terms_ptr + 2, lg)
    tl.store(loss_ptr, loss)
    tl.store(correct_ptr, tl.sum(ok_acc, 0))
    tl.store(nvalid_ptr, n_valid)


@triton.jit
def _scale_value(g_ptr, nvalid_ptr, has_g, mean):
    """grad_output (or 1) divided by max(|V|, 1) for the mean (or 1): device scalars, no host sync.
    ``has_g``/``mean`` may be constexprs or runtime flags."""
    s = 1.0
    if has_g:
        s = tl.load(g_ptr).to(tl.float32)
    if mean:
        s = s / tl.maximum(tl.load(nvalid_ptr), 1).to(tl.float32)
    return s


@triton.jit
def _scale_tile(in_ptr, out_ptr, y_ptr, g_ptr, s, rm, rp, M, P, stride_im, stride_ip, stride_om, stride_op,
                ignore_index, mask_rows, ROW_G: tl.constexpr, INTERP_BF16: tl.constexpr):
    """out = s in over the tile rows rm x columns rp (times g[row] with ROW_G), rows not in V zeroed
    with mask_rows."""
    mmask = rm < M
    m2d = mmask[:, None] & (rp < P)[None, :]
    srow = tl.zeros_like(rm).to(tl.float32) + s
    if ROW_G:
        srow = srow * tl.load(g_ptr + rm, mask=mmask, other=0.0).to(tl.float32)
    keep = m2d
    if mask_rows != 0:
        y = tl.load(y_ptr + rm, mask=mmask, other=ignore_index).to(tl.int64)
        keep = keep & (y != ignore_index)[:, None]
    v = tl.load(in_ptr + rm[:, None] * stride_im + rp[None, :] * stride_ip, mask=keep, other=0.0).to(tl.float32)
    v = tl.where(keep, v * srow[:, None], 0.0)
    _store_rounded(out_ptr + rm[:, None] * stride_om + rp[None, :] * stride_op, v, m2d, INTERP_BF16)


@triton.jit
def _bias_tile(sum_ptr, out_ptr, s, cols, W, PARTS, stride_parts, INTERP_BF16: tl.constexpr,
               BLOCK_PARTS: tl.constexpr, BLOCK_W: tl.constexpr):
    """out[cols] = s sum_p sum[p, cols] over the PARTS fp32 parts in a fixed order, BLOCK_PARTS of them
    loaded at once (independent loads in flight, not a chain of PARTS latencies)."""
    cmask = cols < W
    total = tl.zeros((BLOCK_PARTS, BLOCK_W), tl.float32)
    for p0 in range(0, PARTS, BLOCK_PARTS):
        p = p0 + tl.arange(0, BLOCK_PARTS).to(tl.int64)
        total += tl.load(sum_ptr + p[:, None] * stride_parts + cols[None, :],
                         mask=(p < PARTS)[:, None] & cmask[None, :], other=0.0)
    _store_rounded(out_ptr + cols, tl.sum(total, 0) * s, cmask, INTERP_BF16)


@triton.jit(do_not_specialize=["ignore_index", "mask_a", "mask_b", "W", "PARTS", "stride_parts", "head0", "has_g",
                               "mean"])
def scale_kernel(
    # scale jobs a and b (JOBS of them, the same shape): out = s in over (M, P), any strides and dtypes,
    # rows not in V zeroed where mask_a / mask_b; labels (M,); grad_output () (or (M,) with ROW_G); n_valid ()
    a_in, a_out, b_in, b_out, y_ptr, g_ptr, nvalid_ptr,
    M, P, stride_aim, stride_aip, stride_aom, stride_aop, stride_bim, stride_bip, stride_bom, stride_bop,
    ignore_index, mask_a, mask_b,
    # the bias job (BIAS): one or two heads' fp32 column sums of dz, PARTS parts (PARTS, >= W) of row
    # stride stride_parts, into the (W,) bias gradients (their dtype); head0: the first bias programs' head
    sum1_ptr, sum2_ptr, bias1_ptr, bias2_ptr, W, PARTS, stride_parts, head0,
    # the scale s = grad_output (has_g; per row with ROW_G) / max(|V|, 1) (mean)
    has_g, mean,
    # meta-parameters: INTERP_BF16 / BIAS_BF16: the jobs' / the biases' outputs are bf16 in the interpreter
    JOBS: tl.constexpr, BIAS: tl.constexpr, ROW_G: tl.constexpr, INTERP_BF16: tl.constexpr, BIAS_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_PARTS: tl.constexpr,
):
    # Bytes: each job's in and out once; the bias job 4 PARTS per column and head, plus the bias. The
    # programs: JOBS x cdiv(M, BLOCK_M) cdiv(P, BLOCK_P) scale tiles, then heads x cdiv(W, BLOCK_W) bias
    # tiles (one launch for the backward's scaled copies and bias gradients)
    pid = tl.program_id(0)
    if ROW_G:  # the per-row grad_output weights the scale jobs' rows; the bias columns are weighted already
        s = _scale_value(g_ptr, nvalid_ptr, False, mean != 0)
    else:
        s = _scale_value(g_ptr, nvalid_ptr, has_g != 0, mean != 0)
    tiles_p = tl.cdiv(P, BLOCK_P)
    tiles = tl.cdiv(M, BLOCK_M) * tiles_p
    if pid < JOBS * tiles:
        t = pid % tiles
        rm = (t // tiles_p).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
        rp = (t % tiles_p).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P).to(tl.int64)
        if pid < tiles:
            _scale_tile(a_in, a_out, y_ptr, g_ptr, s, rm, rp, M, P, stride_aim, stride_aip, stride_aom, stride_aop,
                        ignore_index, mask_a, ROW_G, INTERP_BF16)
        else:
            _scale_tile(b_in, b_out, y_ptr, g_ptr, s, rm, rp, M, P, stride_bim, stride_bip, stride_bom, stride_bop,
                        ignore_index, mask_b, ROW_G, INTERP_BF16)
    elif BIAS:
        q = pid - JOBS * tiles
        bt = tl.cdiv(W, BLOCK_W)
        cols = (q % bt).to(tl.int64) * BLOCK_W + tl.arange(0, BLOCK_W).to(tl.int64)
        if q // bt + head0 == 0:
            _bias_tile(sum1_ptr, bias1_ptr, s, cols, W, PARTS, stride_parts, BIAS_BF16, BLOCK_PARTS, BLOCK_W)
        else:
            _bias_tile(sum2_ptr, bias2_ptr, s, cols, W, PARTS, stride_parts, BIAS_BF16, BLOCK_PARTS, BLOCK_W)


@triton.jit
def count_kernel(y_ptr, nvalid_ptr, N, ignore_index, BLOCK: tl.constexpr):
    acc = tl.zeros((BLOCK,), tl.int64)
    for r0 in range(0, N, BLOCK):
        r = r0 + tl.arange(0, BLOCK).to(tl.int64)
        y = tl.load(y_ptr + r, mask=r < N, other=ignore_index).to(tl.int64)
        acc += ((r < N) & (y != ignore_index)).to(tl.int64)
    tl.store(nvalid_ptr, tl.sum(acc, 0))
