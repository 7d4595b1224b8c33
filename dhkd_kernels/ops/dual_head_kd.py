"""The ``backend="triton"`` path: Triton kernels for the dual-head KD loss, forward and backward.

Plan (kernels in :mod:`._dual_head_kd_kernels`; z1 = X W1^T + b1, z2 = A W2^T + b2, t teacher):

Forward, ``fwd_partials_kernel``, grid = (row blocks, class splits), one launch (two for fp32
operands: one per head, to avoid register spills). Each program streams
its classes in BLOCK_C tiles, builds the z1 and z2 tiles with ``tl.dot`` over D in BLOCK_D steps and
folds them into per-row online statistics: running max / sum for softmax(z1), softmax(z1/T) and
softmax(t/T), the KD cross term, z1[y], the first arg-max of z1 and the summed logit loss. Only
9 floats per (split, row) are written; the (N, C) logits of either head never reach memory. Class
splits exist so that small batches still fill the GPU (flash-decoding style); a one-program
``finalize_kernel`` merges the splits with the same online-softmax algebra, reduces the valid rows in
a fixed order into loss/terms/correct/n_valid, and saves six floats per row for the backward (the
three softmaxes' maxima and log-sums kept apart, and 1 - p_y): 24 bytes per row.

Backward, per (class slab, row chunk): ``dz_kernel`` recomputes the z1/z2 tile with ``tl.dot`` and
writes dz1, dz2 (fp32 arithmetic, the one-hot subtracted in fp32, then rounded to the matmul dtype;
unscaled: grad_loss / max(|V|, 1) multiplies the fp32 GEMM results instead, so 16-bit dz cannot
underflow),
then ``mm_kernel`` (a plain Triton GEMM with fp32 accumulation) forms dX = dZ1 W1 (+ dZ2 W2 when the
aux head reads the features), dA = dZ2 W2, dW = dZ^T X; bias grads are fp32 column sums (torch).
Nothing besides the row statistics is kept between forward and backward. Trade-off: the
projections are computed twice (forward and backward), i.e. 4 GEMM-sized products instead of the
minimal 3, in exchange for O(N) saved state and no logits in memory.

Memory bound (extra, beyond inputs and gradients): 40 S B/row of split statistics (S splits) and
24 B/row saved; in the backward the dz buffers of one chunk, at most max(DZ_BUDGET_BYTES, 256 * 1024 * 16)
bytes (DZ_BUDGET_BYTES = 256 MiB by default, env ``DHKD_DZ_BUDGET_MB``); an fp32 accumulator for
dX (and dA) of N x D (N x Da) x 4 bytes only when the classes need several slabs and the inputs are
16-bit; an fp32 accumulator of slab x D x 4 bytes for dW only when the rows need several chunks and
the weights are 16-bit. The full class range fits one slab whenever N C (bytes per element) (heads)
fits the budget, e.g. every ImageNet shape; at N=8192, C=128256 bf16 the slab is 8192 classes.

Determinism: every output element is owned by one program and accumulated in a fixed order (no
atomics), so results are bitwise reproducible run to run on the same GPU and configuration.

Dtypes: matmul operands (features, weights, aux features) must share a dtype of fp32/bf16/fp16; under
``torch.autocast`` they are cast to the autocast dtype first (as autocast does for ``F.linear``),
otherwise mixed operand dtypes are promoted. Biases and teacher logits (any float dtype) are read
and used in fp32; all loss math is fp32. fp32 operands use TF32 in ``tl.dot`` iff PyTorch's CUDA
matmul setting asks for it (``allow_tf32``, or ``fp32_precision == "tf32"`` where reading
``allow_tf32`` raises after the newer API was used; ``set_float32_matmul_precision("high")`` sets both). float64 operands raise a TypeError here
(``backend="auto"`` sends float64 to the torch path).

Launch configs: fixed heuristics (``_tile_config``, ``_mm_config``), no autotuning at
first call; ``set_autotune(True)`` or env ``DHKD_AUTOTUNE=1`` switches to ``triton.autotune`` over
a few configs per kernel. Under ``TRITON_INTERPRET=1`` (CPU tensors) all blocks are 16.
``set_backward_matmul("cublas")`` (env ``DHKD_BWD_MATMUL=cublas``) runs dX/dW with torch.mm.

torch.compile: the forward and backward are ``torch.library.custom_op``s (``dhkd::dual_head_kd_fwd``,
``dhkd::dual_head_kd_bwd``) with fake implementations and a registered autograd formula.
"""
from __future__ import annotations

import contextlib
import os
from typing import List, Optional, Tuple

import torch
import triton
from torch import Tensor

from . import _dual_head_kd_kernels as K

__all__ = ["dual_head_kd_loss", "set_autotune", "set_backward_matmul", "set_debug_poison",
           "DZ_BUDGET_BYTES"]

DZ_BUDGET_BYTES = int(float(os.environ.get("DHKD_DZ_BUDGET_MB", "256")) * 2**20)
_AUTOTUNE = os.environ.get("DHKD_AUTOTUNE", "0") == "1"
_POISON = os.environ.get("DHKD_DEBUG_POISON", "0") == "1"
_BWD_MATMUL = os.environ.get("DHKD_BWD_MATMUL", "triton")
_OPERAND_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def set_autotune(enabled: bool) -> None:
    """Opt in (or out) of ``triton.autotune`` for all three kernels (default: heuristics only)."""
    global _AUTOTUNE
    _AUTOTUNE = bool(enabled)


def set_backward_matmul(kind: str) -> None:
    """Who runs dX = dZ W and dW = dZ^T X: "triton" (default, ``mm_kernel``) or "cublas" (torch.mm;
    bf16 partial products are rounded once per chunk before the fp32 accumulation; fp16 operands
    keep the Triton GEMM, whose fp32 result is scaled before rounding)."""
    global _BWD_MATMUL
    if kind not in ("triton", "cublas"):
        raise ValueError(f"kind must be 'triton' or 'cublas', got {kind!r}")
    _BWD_MATMUL = kind


def set_debug_poison(enabled: bool) -> None:
    """Fill kernel outputs with NaN before the kernels write them (debug/tests): unwritten = NaN."""
    global _POISON
    _POISON = bool(enabled)


def _buffer(shape, dtype, device) -> Tensor:
    if _POISON:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


# ----------------------------------------------------------------------------- launch configs

def _interpreted(device: torch.device) -> bool:
    return device.type != "cuda"


_SM_COUNT = {}


def _sm_count(device: torch.device) -> int:
    if _interpreted(device):
        return 2
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def _pow2_at_least(v: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(v, 1))))


# Tile choices for the two epilogue-heavy kernels were checked by compiling for sm_90 with ptxas -v
# (no GPU needed): 64 x 64 tiles with 8 warps use 170-221 registers and do not spill in bf16, while
# 64 x 128 tiles spill heavily once the KD epilogue is on. fp32 with both heads in one pass spills,
# hence two passes (one per head) for fp32, see _split_heads.
def _tile_config(n: int, c: int, elem: int, device) -> Tuple[dict, dict]:
    """Block sizes (meta) and launch options of the two epilogue kernels, ``fwd_partials_kernel`` and
    ``dz_kernel``, for an (n rows, c classes) problem with ``elem``-byte operands."""
    if _interpreted(device):
        return dict(BLOCK_N=16, BLOCK_C=16, BLOCK_D=16), {}
    meta = dict(BLOCK_N=_pow2_at_least(n, 16, 64), BLOCK_C=_pow2_at_least(c, 16, 64),
                BLOCK_D=64 if elem <= 2 else 32)
    warps = 8 if meta["BLOCK_N"] * meta["BLOCK_C"] >= 4096 else 4
    return meta, dict(num_warps=warps, num_stages=3)


_SPLIT_HEADS = None  # None: automatic (fp32 only); True/False: force (tests)


def _split_heads(dtype: torch.dtype) -> bool:
    """Run the forward as one launch per head (the teacher is then read twice)."""
    return dtype == torch.float32 if _SPLIT_HEADS is None else bool(_SPLIT_HEADS)


def _mm_config(m: int, p: int, elem: int, device) -> Tuple[dict, dict]:
    if _interpreted(device):
        return dict(BLOCK_M=16, BLOCK_P=16, BLOCK_K=16), {}
    meta = dict(BLOCK_M=_pow2_at_least(m, 16, 128), BLOCK_P=_pow2_at_least(p, 16, 128),
                BLOCK_K=64 if elem <= 2 else 32)
    warps = 8 if meta["BLOCK_M"] * meta["BLOCK_P"] >= 16384 else 4
    return meta, dict(num_warps=warps, num_stages=3)


# Autotuned variants (opt-in). BLOCK_C of the forward must divide the split width, which the host
# makes a multiple of _SPLIT_GRANULE.
_SPLIT_GRANULE = 128
_TUNED = {}
_AUTOTUNE_DO_BENCH = None  # tests: a stand-in for triton's benchmark (the interpreter has no timer)


def _tuned(name: str):
    if name in _TUNED:
        return _TUNED[name]
    cfg = triton.Config
    extra = {} if _AUTOTUNE_DO_BENCH is None else dict(do_bench=_AUTOTUNE_DO_BENCH)
    if name == "fwd":
        configs = [cfg(dict(BLOCK_N=bn, BLOCK_C=bc, BLOCK_D=bd), num_warps=w, num_stages=s)
                   for bn, bc, bd, w, s in [(64, 64, 64, 8, 3), (64, 64, 32, 8, 4), (128, 64, 64, 8, 3),
                                            (64, 128, 64, 8, 3), (32, 64, 64, 4, 3), (64, 64, 128, 8, 2)]]
        fn = triton.autotune(configs, key=["N", "C", "D", "DA"], **extra)(K.fwd_partials_kernel)
    elif name == "dz":
        configs = [cfg(dict(BLOCK_N=bn, BLOCK_C=bc, BLOCK_D=bd), num_warps=w, num_stages=s)
                   for bn, bc, bd, w, s in [(64, 64, 64, 8, 3), (64, 128, 64, 8, 3), (128, 64, 32, 8, 3),
                                            (64, 64, 32, 4, 4)]]
        fn = triton.autotune(configs, key=["n_rows", "n_cols", "D", "DA"], **extra)(K.dz_kernel)
    else:
        configs = [cfg(dict(BLOCK_M=bm, BLOCK_P=bp, BLOCK_K=bk), num_warps=w, num_stages=s)
                   for bm, bp, bk, w, s in [(128, 128, 64, 8, 3), (128, 128, 32, 8, 4), (64, 128, 64, 4, 3),
                                            (128, 64, 64, 4, 4), (64, 64, 64, 4, 3)]]
        # ACC launches read ``out``: restore it after every trial
        fn = triton.autotune(configs, key=["M", "P", "K", "K2"], restore_value=["out_ptr"],
                             **extra)(K.mm_kernel)
    _TUNED[name] = fn
    return fn


def _launch(name: str, kernel, grid_of, meta, opts, *args, **const):
    """Launch ``kernel`` with heuristic ``meta``, or its autotuned twin (grid from the tuned meta)."""
    if _AUTOTUNE and (_AUTOTUNE_DO_BENCH is not None or not _interpreted(args[0].device)):
        _tuned(name)[lambda m: grid_of(m)](*args, **const)
    else:
        kernel[grid_of(meta)](*args, **const, **meta, **opts)


# ----------------------------------------------------------------------------- host functions

def _dot_precision(dtype: torch.dtype, tf32: bool) -> str:
    """"ieee" only for fp32 with TF32 off; 16-bit operands keep Triton's default ("tf32", unused)."""
    return "ieee" if (dtype == torch.float32 and not tf32) else "tf32"


def _interp_bf16(dtype: torch.dtype, device: torch.device) -> bool:
    """The triton interpreter gets bf16 ``tl.dot`` and fp32->bf16 rounding wrong: fix both there only."""
    return dtype == torch.bfloat16 and _interpreted(device)


def _forward(x, w1, b1, a, w2, b2, t, y, ce_w, kd_w, lg_w, kd_t, tau, kl_norm, ignore_index, mean,
             components, tf32):
    """Returns loss (), terms (3,), correct (), n_valid (), stats (6, N) = max z1, log sum exp(z1 - max),
    1 - p_y, log sum exp((z1 - max)/T), max t/T, log sum exp(t/T - max)."""
    n, c = t.shape
    dev = x.device
    f32 = torch.float32
    need_ce = bool(ce_w) or components
    need_kd = bool(kd_w) or components
    need_logit = bool(lg_w) or components
    need_z1 = need_ce or need_kd
    if n == 0 or not (need_z1 or need_logit):
        n_valid = (y != ignore_index).sum()
        terms = torch.zeros(3, dtype=f32, device=dev)
        loss = terms.sum()
        return loss, terms, torch.zeros((), dtype=torch.int64, device=dev), n_valid, \
            torch.zeros(6, n, dtype=f32, device=dev)
    shared = a is None
    a_ = x if shared else a
    d, da = x.shape[1], a_.shape[1]
    meta, opts = _tile_config(n, c, x.element_size(), dev)
    tuned = _AUTOTUNE and (_AUTOTUNE_DO_BENCH is not None or not _interpreted(dev))
    granule = _SPLIT_GRANULE if tuned else meta["BLOCK_C"]
    row_blocks = triton.cdiv(n, meta["BLOCK_N"])
    n_tiles = triton.cdiv(c, granule)
    splits = max(1, min(n_tiles, triton.cdiv(2 * _sm_count(dev), row_blocks)))
    per_split = triton.cdiv(n_tiles, splits) * granule
    splits = triton.cdiv(c, per_split)
    part = _buffer((splits, K.NSTAT, n), f32, dev)
    stats = _buffer((6, n), f32, dev)
    if need_z1 and need_logit and _split_heads(x.dtype):
        passes = [(True, need_kd, False), (False, False, True)]
    else:
        passes = [(need_z1, need_kd, need_logit)]
    for p_z1, p_kd, p_logit in passes:
        _launch("fwd", K.fwd_partials_kernel,
                lambda m: (triton.cdiv(n, m["BLOCK_N"]), splits), meta, opts,
                x, w1, stats if b1 is None else b1, a_, w2, stats if b2 is None else b2, t, y, part,
                n, c, d, da, per_split,
                x.stride(0), x.stride(1), w1.stride(0), w1.stride(1), a_.stride(0), a_.stride(1),
                w2.stride(0), w2.stride(1), t.stride(0), t.stride(1),
                1.0 / kd_t, 1.0 / tau,
                HAS_B1=b1 is not None, HAS_B2=b2 is not None, NEED_Z1=p_z1, NEED_KD=p_kd,
                NEED_LOGIT=p_logit, KL_NORM=kl_norm, DOT_PRECISION=_dot_precision(x.dtype, tf32),
                INTERP_BF16=_interp_bf16(x.dtype, dev))
    loss = _buffer((), f32, dev)
    terms = _buffer((3,), f32, dev)
    correct = torch.empty((), dtype=torch.int64, device=dev)
    n_valid = torch.empty((), dtype=torch.int64, device=dev)
    K.finalize_kernel[(1,)](
        part, y, stats, loss, terms, correct, n_valid, n, splits, K.NSTAT * n,
        kd_t, 1.0 / kd_t, tau, float(ce_w), float(kd_w), float(lg_w), ignore_index,
        NEED_Z1=need_z1, NEED_KD=need_kd, NEED_LOGIT=need_logit, MEAN=mean,
        BLOCK_N=16 if _interpreted(dev) else 1024, **({} if _interpreted(dev) else dict(num_warps=4)))
    return loss, terms, correct, n_valid, stats


def _chunk_plan(n: int, c: int, bytes_per_logit: int, budget: int, device) -> Tuple[int, int]:
    """(rows per chunk, classes per slab) so that the dz buffers fit ``budget`` bytes."""
    granule, slab_min, rows_min = (16, 16, 16) if _interpreted(device) else (128, 1024, 256)
    if n * c * bytes_per_logit <= budget:
        return n, c
    slab = (budget // (n * bytes_per_logit)) // granule * granule
    if slab >= min(c, slab_min):
        return n, min(c, slab)
    slab = c if c * bytes_per_logit * rows_min <= budget else min(c, slab_min)
    rows = min(n, max(rows_min, budget // (slab * bytes_per_logit)))
    return rows, slab


def _mm(out, a, b, a2, b2, acc: bool, precision: str, scale: Tensor):
    """out (+)= scale (a @ b (+ a2 @ b2)), fp32 accumulation, any strides; scale a 0-dim fp32 tensor.

    fp16 always takes the Triton GEMM: cuBLAS would round the unscaled sum (before the 1/|V| of
    ``scale``) to fp16, which overflows past 65504 where the true gradient is finite."""
    if _BWD_MATMUL == "cublas" and a.dtype != torch.float16:
        r = a @ b if a2 is None else torch.addmm(a @ b, a2, b2)
        r = r.to(torch.float32) * scale
        if acc:
            out += r.to(out.dtype)
        else:
            out.copy_(r)
        return
    m, k = a.shape
    p = b.shape[1]
    has2 = a2 is not None
    k2 = a2.shape[1] if has2 else 0
    a2_, b2_ = (a2, b2) if has2 else (a, b)
    meta, opts = _mm_config(m, p, a.element_size(), out.device)
    _launch("mm", K.mm_kernel, lambda mt: (triton.cdiv(m, mt["BLOCK_M"]), triton.cdiv(p, mt["BLOCK_P"])),
            meta, opts,
            out, a, b, a2_, b2_, scale, m, p, k, k2,
            out.stride(0), out.stride(1), a.stride(0), a.stride(1), b.stride(0), b.stride(1),
            a2_.stride(0), a2_.stride(1), b2_.stride(0), b2_.stride(1),
            ACC=acc, HAS_SECOND=has2, DOT_PRECISION=precision,
            INTERP_BF16=_interp_bf16(a.dtype, out.device))


def _backward(g, x, w1, b1, a, w2, b2, t, y, stats, n_valid, ce_w, kd_w, lg_w, kd_t, tau, kl_norm,
              ignore_index, mean, tf32, needs):
    """Gradients [dx, dw1, db1, da, dw2, db2] of ``g * loss``; an empty tensor where not needed."""
    n, c = t.shape
    dev = x.device
    f32 = torch.float32
    shared = a is None
    a_ = x if shared else a
    need_x, need_w1, need_b1, need_a, need_w2, need_b2 = needs
    if shared:
        need_a = False
    dz1_on = bool(ce_w) or bool(kd_w)
    dz2_on = bool(lg_w)
    def zeros_if(flag, ref):
        # a fresh tensor per slot (custom-op outputs may not alias), contiguous like _bwd_fake's
        if flag and ref is not None:
            return torch.zeros(ref.shape, dtype=ref.dtype, device=dev)
        return torch.empty(0, dtype=f32, device=dev)

    dz1_on = dz1_on and (need_x or need_w1 or need_b1)
    dz2_on = dz2_on and ((need_x and shared) or need_a or need_w2 or need_b2)
    if n == 0 or not (dz1_on or dz2_on):
        return [zeros_if(need_x, x), zeros_if(need_w1, w1), zeros_if(need_b1, b1),
                zeros_if(need_a, a), zeros_if(need_w2, w2), zeros_if(need_b2, b2)]
    x_pairs = need_x and (dz1_on or (dz2_on and shared))
    a_pairs = need_a and dz2_on
    w1_on = need_w1 and dz1_on
    w2_on = need_w2 and dz2_on
    # outputs the kernels write completely start as _buffer (NaN when poisoning), the rest as zeros
    gx = _buffer(x.shape, x.dtype, dev) if x_pairs else zeros_if(need_x, x)
    ga = _buffer(a.shape, a.dtype, dev) if a_pairs else zeros_if(need_a, a)
    gw1 = _buffer(w1.shape, w1.dtype, dev) if w1_on else zeros_if(need_w1, w1)
    gw2 = _buffer(w2.shape, w2.dtype, dev) if w2_on else zeros_if(need_w2, w2)
    gb1, gb2 = zeros_if(need_b1, b1), zeros_if(need_b2, b2)

    # grad_loss / max(|V|, 1): applied in fp32 after the GEMMs, dz stays unscaled (see dz_kernel)
    scale = g.to(f32).reshape(())
    if mean:
        scale = scale / n_valid.clamp(min=1).to(f32)
    prec = _dot_precision(x.dtype, tf32)
    dt = x.dtype
    elem = x.element_size()
    rows, slab = _chunk_plan(n, c, elem * (int(dz1_on) + int(dz2_on)), DZ_BUDGET_BYTES, dev)
    n_slabs, n_chunks = triton.cdiv(c, slab), triton.cdiv(n, rows)
    dz1_buf = _buffer((rows, slab), dt, dev) if dz1_on else None
    dz2_buf = _buffer((rows, slab), dt, dev) if dz2_on else None
    d, da = x.shape[1], a_.shape[1]

    # dX/dA accumulate over slabs: in place for fp32, else in an fp32 buffer when several slabs
    gx_acc = (gx if (dt == f32 or n_slabs == 1) else _buffer((n, d), f32, dev)) \
        if x_pairs else None
    ga_acc = (ga if (dt == f32 or n_slabs == 1) else _buffer((n, da), f32, dev)) \
        if a_pairs else None
    slab_acc_needed = dt != f32 and n_chunks > 1
    gw1_acc = _buffer((slab, d), f32, dev) if (w1_on and slab_acc_needed) else None
    gw2_acc = _buffer((slab, da), f32, dev) if (w2_on and slab_acc_needed) else None
    gb1_acc = torch.zeros(c, dtype=f32, device=dev) if (need_b1 and dz1_on) else None
    gb2_acc = torch.zeros(c, dtype=f32, device=dev) if (need_b2 and dz2_on) else None
    dummy = stats
    meta_opts = {}

    for si in range(n_slabs):
        s0 = si * slab
        sc = min(slab, c - s0)
        for ri in range(n_chunks):
            r0 = ri * rows
            rc = min(rows, n - r0)
            dz1 = dz1_buf[:rc, :sc] if dz1_on else None
            dz2 = dz2_buf[:rc, :sc] if dz2_on else None
            key = (rc, sc)
            if key not in meta_opts:
                meta_opts[key] = _tile_config(rc, sc, elem, dev)
            meta, opts = meta_opts[key]
            _launch("dz", K.dz_kernel,
                    lambda m: (triton.cdiv(rc, m["BLOCK_N"]), triton.cdiv(sc, m["BLOCK_C"])), meta, opts,
                    x, w1, dummy if b1 is None else b1, a_, w2, dummy if b2 is None else b2, t, y, stats,
                    dummy if dz1 is None else dz1, dummy if dz2 is None else dz2,
                    n, d, da, r0, s0, rc, sc,
                    x.stride(0), x.stride(1), w1.stride(0), w1.stride(1), a_.stride(0), a_.stride(1),
                    w2.stride(0), w2.stride(1), t.stride(0), t.stride(1), slab, slab,
                    float(ce_w), float(kd_w) * kd_t, 1.0 / kd_t, float(lg_w), 1.0 / tau, ignore_index,
                    HAS_B1=b1 is not None, HAS_B2=b2 is not None, NEED_DZ1=dz1_on, CE_ON=bool(ce_w),
                    KD_ON=bool(kd_w), NEED_DZ2=dz2_on, KL_NORM=kl_norm, DOT_PRECISION=prec,
                    INTERP_BF16=_interp_bf16(dt, dev))
            if x_pairs:
                pairs = ([(dz1, w1[s0:s0 + sc])] if dz1_on else []) + \
                    ([(dz2, w2[s0:s0 + sc])] if (dz2_on and shared) else [])
                (pa, pb), second = pairs[0], (pairs[1] if len(pairs) > 1 else (None, None))
                _mm(gx_acc[r0:r0 + rc], pa, pb, second[0], second[1], si > 0, prec, scale)
            if a_pairs:
                _mm(ga_acc[r0:r0 + rc], dz2, w2[s0:s0 + sc], None, None, si > 0, prec, scale)
            if w1_on:
                out = gw1_acc[:sc] if gw1_acc is not None else gw1[s0:s0 + sc]
                _mm(out, dz1.t(), x[r0:r0 + rc], None, None, ri > 0, prec, scale)
            if w2_on:
                out = gw2_acc[:sc] if gw2_acc is not None else gw2[s0:s0 + sc]
                _mm(out, dz2.t(), a_[r0:r0 + rc], None, None, ri > 0, prec, scale)
            if gb1_acc is not None:
                gb1_acc[s0:s0 + sc] += dz1.sum(0, dtype=f32)
            if gb2_acc is not None:
                gb2_acc[s0:s0 + sc] += dz2.sum(0, dtype=f32)
        if gw1_acc is not None:
            gw1[s0:s0 + sc] = gw1_acc[:sc]
        if gw2_acc is not None:
            gw2[s0:s0 + sc] = gw2_acc[:sc]
    if x_pairs and gx_acc is not gx:
        gx.copy_(gx_acc)
    if a_pairs and ga_acc is not ga:
        ga.copy_(ga_acc)
    if gb1_acc is not None:
        gb1.copy_(gb1_acc * scale)
    if gb2_acc is not None:
        gb2.copy_(gb2_acc * scale)
    return [gx, gw1, gb1, ga, gw2, gb2]


# ----------------------------------------------------------------------------- torch.library ops

def _on_device(device: torch.device):
    """Triton launches on the current CUDA device: make it the tensors' device."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


@torch.library.custom_op("dhkd::dual_head_kd_fwd", mutates_args=())
def _fwd_op(x: Tensor, w1: Tensor, b1: Optional[Tensor], a: Optional[Tensor], w2: Tensor,
            b2: Optional[Tensor], t: Tensor, y: Tensor, ce_weight: float, kd_weight: float,
            logit_weight: float, kd_temperature: float, logit_temperature: float, kl_norm: bool,
            ignore_index: int, mean: bool, components: bool, tf32: bool
            ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    with torch.autocast(device_type=x.device.type, enabled=False), _on_device(x.device):
        return _forward(x, w1, b1, a, w2, b2, t, y, ce_weight, kd_weight, logit_weight, kd_temperature,
                        logit_temperature, kl_norm, ignore_index, mean, components, tf32)


@_fwd_op.register_fake
def _fwd_fake(x, w1, b1, a, w2, b2, t, y, *scalars):
    f32 = torch.float32
    return (x.new_empty((), dtype=f32), x.new_empty((3,), dtype=f32),
            x.new_empty((), dtype=torch.int64), x.new_empty((), dtype=torch.int64),
            x.new_empty((6, t.shape[0]), dtype=f32))


@torch.library.custom_op("dhkd::dual_head_kd_bwd", mutates_args=())
def _bwd_op(grad: Tensor, x: Tensor, w1: Tensor, b1: Optional[Tensor], a: Optional[Tensor], w2: Tensor,
            b2: Optional[Tensor], t: Tensor, y: Tensor, stats: Tensor, n_valid: Tensor, ce_weight: float,
            kd_weight: float, logit_weight: float, kd_temperature: float, logit_temperature: float,
            kl_norm: bool, ignore_index: int, mean: bool, tf32: bool, needs: List[bool]) -> List[Tensor]:
    with torch.autocast(device_type=x.device.type, enabled=False), _on_device(x.device):
        return _backward(grad, x, w1, b1, a, w2, b2, t, y, stats, n_valid, ce_weight, kd_weight,
                         logit_weight, kd_temperature, logit_temperature, kl_norm, ignore_index, mean,
                         tf32, needs)


@_bwd_op.register_fake
def _bwd_fake(grad, x, w1, b1, a, w2, b2, t, y, stats, n_valid, *scalars_and_needs):
    needs = scalars_and_needs[-1]
    refs = (x, w1, b1, a, w2, b2)
    # contiguous like the real outputs (empty_like would keep a transposed input's strides)
    return [r.new_empty(r.shape) if (need and r is not None) else x.new_empty((0,), dtype=torch.float32)
            for r, need in zip(refs, needs)]


def _setup_context(ctx, inputs, output):
    x, w1, b1, a, w2, b2, t, y = inputs[:8]
    (ce_w, kd_w, lg_w, kd_t, tau, kl_norm, ignore_index, mean, _components, tf32) = inputs[8:]
    ctx.save_for_backward(x, w1, b1, a, w2, b2, t, y, output[4], output[3])
    ctx.opts = (ce_w, kd_w, lg_w, kd_t, tau, kl_norm, ignore_index, mean, tf32)


def _autograd_backward(ctx, g_loss, *_unused):
    x, w1, b1, a, w2, b2, t, y, stats, n_valid = ctx.saved_tensors
    needs = [bool(v) for v in ctx.needs_input_grad[:6]]
    if g_loss is None:
        g_loss = torch.zeros((), dtype=torch.float32, device=x.device)
    grads = _bwd_op(g_loss, x, w1, b1, a, w2, b2, t, y, stats, n_valid, *ctx.opts, needs)
    out = [gr if need else None for gr, need in zip(grads, needs)]
    return tuple(out) + (None,) * 12


_fwd_op.register_autograd(_autograd_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- entry point

def _tf32_enabled(matmul=None) -> bool:
    """PyTorch's TF32 setting for CUDA matmuls: ``allow_tf32`` (traceable by dynamo), or, where
    reading it raises because the newer ``fp32_precision`` API was used (torch >= 2.9), that one."""
    matmul = torch.backends.cuda.matmul if matmul is None else matmul
    try:
        return bool(matmul.allow_tf32)
    except RuntimeError:
        return getattr(matmul, "fp32_precision", "ieee") == "tf32"


def _autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    try:
        if torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
        return None
    except (TypeError, AttributeError):  # older signatures
        if device_type == "cuda" and torch.is_autocast_enabled():
            return torch.get_autocast_gpu_dtype()
        return None


def dual_head_kd_loss(features, head_weight, head_bias, aux_weight, aux_bias, teacher_logits, labels, *,
                      aux_features, ce_weight, kd_weight, logit_weight, kd_temperature, logit_temperature,
                      logit_loss, ignore_index, reduction, return_components):
    """Run the Triton path; returns (loss, terms[3], correct, n_valid). Inputs must be validated.

    Raises TypeError for float64 features/weights/biases (use backend="torch" for float64).
    """
    operands = {"features": features, "head_weight": head_weight, "head_bias": head_bias,
                "aux_weight": aux_weight, "aux_bias": aux_bias, "aux_features": aux_features}
    for name, v in operands.items():
        if v is not None and v.dtype == torch.float64:
            raise TypeError(f"backend='triton' supports float32/bfloat16/float16 {name}, got float64; "
                            "use backend='torch' (or 'auto') for float64")
    mats = [features, head_weight, aux_weight] + ([aux_features] if aux_features is not None else [])
    cdt = _autocast_dtype(features.device.type)
    if cdt is None:
        cdt = mats[0].dtype
        for m in mats[1:]:
            cdt = torch.promote_types(cdt, m.dtype)
    if cdt not in _OPERAND_DTYPES:
        raise TypeError(f"backend='triton' cannot run matmuls in {cdt}")
    x, w1, w2 = (m.to(cdt) for m in (features, head_weight, aux_weight))
    a = None if aux_features is None else aux_features.to(cdt)
    # the kernels index labels and biases with unit stride (a strided or expanded view would be read
    # wrongly): copies of N + 2C elements; gradients reach the original views through autograd
    labels = labels.contiguous()
    head_bias = None if head_bias is None else head_bias.contiguous()
    aux_bias = None if aux_bias is None else aux_bias.contiguous()
    tf32 = _tf32_enabled()
    loss, terms, correct, n_valid, _stats = _fwd_op(
        x, w1, head_bias, a, w2, aux_bias, teacher_logits, labels, float(ce_weight), float(kd_weight),
        float(logit_weight), float(kd_temperature), float(logit_temperature),
        logit_loss == "binary_kl_norm", int(ignore_index), reduction == "mean", bool(return_components),
        tf32)
    return loss, terms.detach(), correct, n_valid
