"""Triton GEMMs of the dual-head KD loss for small and medium problems (the "triton" plan, see
:mod:`dhkd_kernels.ops.dual_head_kd`): three launches do the six products of both heads.

``logits_kernel``  grid (tiles,): z1 = X W1^T and z2 = A W2^T (no bias) into the logits buffers, in
    the operand dtype (as cuBLAS writes them in the "cublas" plan). When A is X (SHARED) one program
    computes the same (rows, classes) tile of both heads from one load of each X tile.
    FLOPs 2 N C (D + Da); bytes: X and A once per class-tile column (L2), W1 and W2 once per row-tile
    row, the logits written once.

``dx_kernel``  grid (tiles, problems): out1 = s (dZ1 W1 [+ dZ2 W2 with SUM2]) and, as a second
    problem, out2 = s dZ2 W2 (separate auxiliary features). FLOPs 2 N C D per product.

``dw_kernel``  grid (tiles, heads): dW_h = s dZ_h^T X_h over the rows of V only (the features of
    ignored rows are never read, so garbage there cannot reach a gradient), and with BIAS the bias
    gradient s sum_rows dZ_h from the same dZ tiles (programs of the first feature tile).

s = grad_output / max(|V|, 1) (or grad_output for "sum") is read from device memory (no host sync)
and applied to the fp32 accumulator; with ROW_G grad_output is per row (reduction="none"). Tiles are
visited in groups of GROUP_M rows of tiles so that neighbouring programs share operand tiles in L2.
``INTERP_BF16`` (interpreter only) upcasts bf16 tiles before ``tl.dot``, which triton 3.8's
interpreter computes wrongly for bf16, and rounds bf16 stores to nearest-even.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._epilogue_kernels import _scale_value, _store_rounded


@triton.jit
def _tile_ids(pid, n_m, n_n, GROUP_M: tl.constexpr):
    """(tile row, tile column) of program ``pid`` in grouped order."""
    width = GROUP_M * n_n
    group = pid // width
    first_m = group * GROUP_M
    size = tl.minimum(n_m - first_m, GROUP_M)
    return first_m + (pid % width) % size, (pid % width) // size


@triton.jit
def _tile(pid, M, P, P_MAX, BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, GROUP_M: tl.constexpr):
    """(live, rows, cols, row mask, col mask) of program ``pid``'s tile of an (M, P) output in a grid
    laid out for the widest problem (P_MAX); ``live`` is false past this problem's P."""
    pid_m, pid_p = _tile_ids(pid, tl.cdiv(M, BLOCK_M), tl.cdiv(P_MAX, BLOCK_P), GROUP_M)
    rm = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    rp = pid_p.to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P).to(tl.int64)
    return pid_p < tl.cdiv(P, BLOCK_P), rm, rp, rm < M, rp < P


@triton.jit
def _dot(acc, a, b, DOT_PRECISION: tl.constexpr, INTERP_BF16: tl.constexpr):
    if INTERP_BF16:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.jit
def _head_dot(acc, f_ptr, w_ptr, K, stride_fn, stride_fk, stride_wc, stride_wk, rows, cols, rmask, cmask, offs_k,
              DOT_PRECISION: tl.constexpr, INTERP_BF16: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc + f[rows] w[cols]^T over the K features: one head's logits tile."""
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        kmask = kk < K
        ft = tl.load(f_ptr + rows[:, None] * stride_fn + kk[None, :] * stride_fk,
                     mask=rmask[:, None] & kmask[None, :], other=0.0)
        wt = tl.load(w_ptr + cols[None, :] * stride_wc + kk[:, None] * stride_wk,
                     mask=cmask[None, :] & kmask[:, None], other=0.0)
        acc = _dot(acc, ft, wt, DOT_PRECISION, INTERP_BF16)
    return acc


@triton.jit
def logits_kernel(
    # pointers: x (N, D), w1 (C, D), a (N, Da), w2 (C, Da); outputs z1, z2 (N, C) row-major buffers
    x_ptr, w1_ptr, a_ptr, w2_ptr, z1_ptr, z2_ptr,
    # sizes
    N, C, D, DA,
    # strides, in elements
    stride_xn, stride_xd, stride_w1c, stride_w1d, stride_an, stride_ad, stride_w2c, stride_w2d,
    stride_z1, stride_z2,
    # meta-parameters
    MAIN: tl.constexpr, AUX: tl.constexpr, SHARED: tl.constexpr, DOT_PRECISION: tl.constexpr,
    INTERP_BF16: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid_m, pid_n = _tile_ids(tl.program_id(0), tl.cdiv(N, BLOCK_M), tl.cdiv(C, BLOCK_N), GROUP_M)
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    cols = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    rmask = rows < N
    cmask = cols < C
    offs_k = tl.arange(0, BLOCK_K).to(tl.int64)
    acc1 = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    acc2 = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    if SHARED and MAIN and AUX:
        for k0 in range(0, D, BLOCK_K):
            kk = k0 + offs_k
            kmask = kk < D
            xt = tl.load(x_ptr + rows[:, None] * stride_xn + kk[None, :] * stride_xd,
                         mask=rmask[:, None] & kmask[None, :], other=0.0)
            w1t = tl.load(w1_ptr + cols[None, :] * stride_w1c + kk[:, None] * stride_w1d,
                          mask=cmask[None, :] & kmask[:, None], other=0.0)
            w2t = tl.load(w2_ptr + cols[None, :] * stride_w2c + kk[:, None] * stride_w2d,
                          mask=cmask[None, :] & kmask[:, None], other=0.0)
            acc1 = _dot(acc1, xt, w1t, DOT_PRECISION, INTERP_BF16)
            acc2 = _dot(acc2, xt, w2t, DOT_PRECISION, INTERP_BF16)
    else:
        if MAIN:
            acc1 = _head_dot(acc1, x_ptr, w1_ptr, D, stride_xn, stride_xd, stride_w1c, stride_w1d, rows, cols,
                             rmask, cmask, offs_k, DOT_PRECISION, INTERP_BF16, BLOCK_K)
        if AUX:
            acc2 = _head_dot(acc2, a_ptr, w2_ptr, DA, stride_an, stride_ad, stride_w2c, stride_w2d, rows, cols,
                             rmask, cmask, offs_k, DOT_PRECISION, INTERP_BF16, BLOCK_K)
    # the classes past C are zeros (W masked to 0) in the buffers' padding: 128-bit stores
    if MAIN:
        _store_rounded(z1_ptr + rows[:, None] * stride_z1 + cols[None, :], acc1,
                       rmask[:, None] & (cols < stride_z1)[None, :], INTERP_BF16)
    if AUX:
        _store_rounded(z2_ptr + rows[:, None] * stride_z2 + cols[None, :], acc2,
                       rmask[:, None] & (cols < stride_z2)[None, :], INTERP_BF16)


@triton.jit
def _dx_tile(pid, dz_ptr, w_ptr, dz2_ptr, w2_ptr, out_ptr, g_ptr, nvalid_ptr, M, K, P, P_MAX,
             stride_dz, stride_wk, stride_wp, stride_dz2, stride_w2k, stride_w2p, stride_om, stride_op, row_g, mean,
             SUM2: tl.constexpr, HAS_G: tl.constexpr,
             DOT_PRECISION: tl.constexpr, INTERP_BF16: tl.constexpr, BLOCK_M: tl.constexpr,
             BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """One (BLOCK_M, BLOCK_P) tile of out = s (dz w [+ dz2 w2]). The K loop runs over dz's padded width
    (its row stride, a multiple of BLOCK_K whose columns past K the epilogue zeroed): the dz tiles need
    no class mask, so they load as aligned 128-bit vectors and pipeline like the W tiles."""
    live, rm, rp, mmask, pmask = _tile(pid, M, P, P_MAX, BLOCK_M, BLOCK_P, GROUP_M)
    if live:
        offs_k = tl.arange(0, BLOCK_K).to(tl.int64)
        acc = tl.zeros((BLOCK_M, BLOCK_P), tl.float32)
        for k0 in range(0, stride_dz, BLOCK_K):
            kk = k0 + offs_k
            kmask = kk < K
            at = tl.load(dz_ptr + rm[:, None] * stride_dz + kk[None, :], mask=mmask[:, None], other=0.0)
            bt = tl.load(w_ptr + kk[:, None] * stride_wk + rp[None, :] * stride_wp,
                         mask=kmask[:, None] & pmask[None, :], other=0.0)
            acc = _dot(acc, at, bt, DOT_PRECISION, INTERP_BF16)
        if SUM2:
            for k0 in range(0, stride_dz2, BLOCK_K):
                kk = k0 + offs_k
                kmask = kk < K
                at = tl.load(dz2_ptr + rm[:, None] * stride_dz2 + kk[None, :], mask=mmask[:, None], other=0.0)
                bt = tl.load(w2_ptr + kk[:, None] * stride_w2k + rp[None, :] * stride_w2p,
                             mask=kmask[:, None] & pmask[None, :], other=0.0)
                acc = _dot(acc, at, bt, DOT_PRECISION, INTERP_BF16)
        if row_g != 0:  # runtime flags: the scale is applied once per tile, after the K loop
            s = _scale_value(g_ptr, nvalid_ptr, False, mean != 0)
            acc = acc * (s * tl.load(g_ptr + rm, mask=mmask, other=0.0).to(tl.float32))[:, None]
        else:
            acc = acc * _scale_value(g_ptr, nvalid_ptr, HAS_G, mean != 0)
        _store_rounded(out_ptr + rm[:, None] * stride_om + rp[None, :] * stride_op, acc,
                       mmask[:, None] & pmask[None, :], INTERP_BF16)


@triton.jit(do_not_specialize=["row_g", "mean"])
def dx_kernel(
    # pointers: dz1, dz2 (M, K) row-major; w1 (K, P1), w2 (K, P2) (the head weights, (C, D) layout);
    # outputs out1 (M, P1), out2 (M, P2); grad_output () or (M,) with row_g; n_valid ()
    dz1_ptr, dz2_ptr, w1_ptr, w2_ptr, out1_ptr, out2_ptr, g_ptr, nvalid_ptr,
    # sizes: M rows, K classes, P1/P2 feature widths
    M, K, P1, P2,
    # strides, in elements
    stride_dz1, stride_dz2, stride_w1k, stride_w1p, stride_w2k, stride_w2p, stride_o1m, stride_o1p,
    stride_o2m, stride_o2p,
    # runtime flags: row_g != 0 scales row i by g[i] (reduction="none"); mean != 0 divides by max(|V|, 1)
    row_g, mean,
    # meta-parameters: SUM2 adds dz2 w2 into out1 (shared features); TWO: out2 is a second problem
    SUM2: tl.constexpr, TWO: tl.constexpr, HAS_G: tl.constexpr,
    DOT_PRECISION: tl.constexpr, INTERP_BF16: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    p_max = tl.maximum(P1, P2) if TWO else P1
    if tl.program_id(1) == 0:
        _dx_tile(pid, dz1_ptr, w1_ptr, dz2_ptr, w2_ptr, out1_ptr, g_ptr, nvalid_ptr, M, K, P1, p_max,
                 stride_dz1, stride_w1k, stride_w1p, stride_dz2, stride_w2k, stride_w2p, stride_o1m, stride_o1p, row_g, mean,
                 SUM2, HAS_G, DOT_PRECISION, INTERP_BF16, BLOCK_M, BLOCK_P, BLOCK_K, GROUP_M)
    else:
        _dx_tile(pid, dz2_ptr, w2_ptr, dz2_ptr, w2_ptr, out2_ptr, g_ptr, nvalid_ptr, M, K, P2, p_max,
                 stride_dz2, stride_w2k, stride_w2p, stride_dz2, stride_w2k, stride_w2p, stride_o2m, stride_o2p, row_g, mean,
                 False, HAS_G, DOT_PRECISION, INTERP_BF16, BLOCK_M, BLOCK_P, BLOCK_K, GROUP_M)


@triton.jit
def _dw_tile(pid, dz_ptr, x_ptr, y_ptr, ow_ptr, ob_ptr, g_ptr, nvalid_ptr, K, M, P, P_MAX, ignore_index,
             stride_dz, stride_xk, stride_xp, stride_om, stride_op,
             BIAS: tl.constexpr, HAS_G: tl.constexpr, ROW_G: tl.constexpr, MEAN: tl.constexpr,
             DOT_PRECISION: tl.constexpr, INTERP_BF16: tl.constexpr, BLOCK_M: tl.constexpr,
             BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """One (BLOCK_M classes, BLOCK_P features) tile of dW = s dz^T x over valid rows (+ bias)."""
    live, rm, rp, mmask, pmask = _tile(pid, M, P, P_MAX, BLOCK_M, BLOCK_P, GROUP_M)
    if live:
        offs_k = tl.arange(0, BLOCK_K).to(tl.int64)
        acc = tl.zeros((BLOCK_M, BLOCK_P), tl.float32)
        bacc = tl.zeros((BLOCK_M,), tl.float32)
        # 16-bit dz: the bias is a second product dz^T 1 on the tensor cores, so that dz stays a pure
        # shared-memory operand and its loads pipeline (a register read of the tile for a sum would make
        # every K step wait for its copy); every program computes it, the first feature tile stores it
        BIAS_DOT: tl.constexpr = BIAS and (not ROW_G) and (dz_ptr.dtype.element_ty != tl.float32)
        bacc2 = tl.zeros((BLOCK_M, 16), tl.float32)
        first = tl.min(rp, 0) == 0  # the programs of the first feature tile also sum the bias
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + offs_k
            yk = tl.load(y_ptr + kk, mask=kk < K, other=ignore_index).to(tl.int64)
            vk = (kk < K) & (yk != ignore_index)
            # classes masked by dz's padded width (a multiple of 16: aligned vector loads; the rows past M
            # are never stored), rows by K only: dz is 0 on the rows outside V (the epilogue wrote it),
            # so the dz tile does not wait for the labels
            at = tl.load(dz_ptr + kk[None, :] * stride_dz + rm[:, None],
                         mask=(rm < stride_dz)[:, None] & (kk < K)[None, :], other=0.0)
            bt = tl.load(x_ptr + kk[:, None] * stride_xk + rp[None, :] * stride_xp,
                         mask=vk[:, None] & pmask[None, :], other=0.0)
            if ROW_G:
                gk = tl.load(g_ptr + kk, mask=vk, other=0.0).to(tl.float32)
                bt = (bt.to(tl.float32) * gk[:, None]).to(x_ptr.dtype.element_ty)
                if BIAS:
                    if first:
                        bacc += tl.sum(at.to(tl.float32) * gk[None, :], 1)
            elif BIAS_DOT:
                ones = tl.full((BLOCK_K, 16), 1.0, tl.float32).to(at.dtype)
                bacc2 = _dot(bacc2, at, ones, DOT_PRECISION, INTERP_BF16)
            elif BIAS:
                if first:
                    bacc += tl.sum(at.to(tl.float32), 1)
            acc = _dot(acc, at, bt, DOT_PRECISION, INTERP_BF16)
        if BIAS_DOT:
            bacc = tl.max(bacc2, 1)  # 16 equal columns
        s = _scale_value(g_ptr, nvalid_ptr, HAS_G and not ROW_G, MEAN)
        _store_rounded(ow_ptr + rm[:, None] * stride_om + rp[None, :] * stride_op, acc * s,
                       mmask[:, None] & pmask[None, :], INTERP_BF16)
        if BIAS:
            if first:
                _store_rounded(ob_ptr + rm, bacc * s, mmask, INTERP_BF16)


@triton.jit
def dw_kernel(
    # pointers: dz1, dz2 (K rows, M classes) row-major; x1 (K, P1), x2 (K, P2) features of each head;
    # labels (K,); outputs w1 (M, P1), w2 (M, P2), bias b1, b2 (M,); grad_output; n_valid
    dz1_ptr, dz2_ptr, x1_ptr, x2_ptr, y_ptr, ow1_ptr, ow2_ptr, ob1_ptr, ob2_ptr, g_ptr, nvalid_ptr,
    # sizes: K rows, M classes, P1/P2 feature widths
    K, M, P1, P2, ignore_index,
    # strides, in elements
    stride_dz1, stride_dz2, stride_x1k, stride_x1p, stride_x2k, stride_x2p, stride_ow1m, stride_ow1p,
    stride_ow2m, stride_ow2p,
    # meta-parameters: grid axis 1 = the heads in HEADS (1: head 1, 2: head 2, 3: both)
    HEADS: tl.constexpr, BIAS1: tl.constexpr, BIAS2: tl.constexpr, HAS_G: tl.constexpr,
    ROW_G: tl.constexpr, MEAN: tl.constexpr, DOT_PRECISION: tl.constexpr, INTERP_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    p_max = tl.maximum(P1, P2) if HEADS == 3 else (P1 if HEADS == 1 else P2)
    second = tl.program_id(1) == 1
    if HEADS == 2:
        second = True
    if not second:
        _dw_tile(pid, dz1_ptr, x1_ptr, y_ptr, ow1_ptr, ob1_ptr, g_ptr, nvalid_ptr, K, M, P1, p_max, ignore_index,
                 stride_dz1, stride_x1k, stride_x1p, stride_ow1m, stride_ow1p,
                 BIAS1, HAS_G, ROW_G, MEAN, DOT_PRECISION, INTERP_BF16, BLOCK_M, BLOCK_P, BLOCK_K, GROUP_M)
    else:
        _dw_tile(pid, dz2_ptr, x2_ptr, y_ptr, ow2_ptr, ob2_ptr, g_ptr, nvalid_ptr, K, M, P2, p_max, ignore_index,
                 stride_dz2, stride_x2k, stride_x2p, stride_ow2m, stride_ow2p,
                 BIAS2, HAS_G, ROW_G, MEAN, DOT_PRECISION, INTERP_BF16, BLOCK_M, BLOCK_P, BLOCK_K, GROUP_M)
