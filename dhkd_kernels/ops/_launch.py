"""Launches of the Triton backend: every kernel and cuBLAS product goes through a helper here that
reports it to :mod:`dhkd_kernels.cost` (kernel, grid, FLOPs, bytes), and output buffers are made here
(NaN-poisoned with ``set_debug_poison``). On ``meta`` tensors nothing runs: launches are only recorded,
or compiled for the current target when ``_COMPILE_ON_META`` is set (``dhkd_kernels.compile_report``).
"""
from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch
from torch import Tensor

from .. import cost
from .._validation import env_flag
from . import _epilogue_kernels as E
from ._grad_kernel import grad_kernel
from ._plan import F32, _grad_config, cdiv, _interpreted, _kind, _ld, kd_scale

_POISON = env_flag("DHKD_DEBUG_POISON")


def _torch_version(v: str = torch.__version__):
    return tuple(int(x) for x in v.split("+")[0].split(".")[:2])


def accumulate_mode(version=None, device_type: str = "cuda") -> str:
    """How ``_mm`` accumulates a 16-bit product into an fp32 ``out``:
    "dtype_out": cuBLAS writes fp32 directly (``aten.addmm.dtype_out``; torch >= 2.10 on CUDA: the
    overload is missing before 2.8 and refuses 16-bit operands with an fp32 out on 2.8-2.9);
    "round16": the product in the operand dtype (cuBLAS accumulates in fp32 and rounds the result once,
    as eager PyTorch's own product does), then added in fp32: one extra read and write of the output;
    "fp32_copies": CPU (the tests' BLAS), operands copied to fp32."""
    if device_type == "cpu":
        return "fp32_copies"
    version = _torch_version() if version is None else tuple(version)
    return "dtype_out" if version >= (2, 10) else "round16"


_ACCUMULATE = {dev: accumulate_mode(device_type=dev) for dev in ("cuda", "cpu", "meta")}

def set_debug_poison(enabled: bool) -> None:
    """Fill kernel outputs with NaN before the kernels write them (debug/tests): unwritten = NaN."""
    global _POISON
    _POISON = bool(enabled)


def _buffer(shape, dtype, device) -> Tensor:
    """Uninitialised output buffer (NaN-filled when poisoning, which costs one fill kernel)."""
    if _POISON and device.type != "meta":
        return torch.full(shape, float("nan") if dtype.is_floating_point else -1, dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _logits_buffer(n: int, c: int, dtype, device) -> Tensor:
    """An (n, c) logits/dz buffer with row stride ``_ld(c)`` (the padding columns belong to it)."""
    return _buffer((n, _ld(c)), dtype, device)[:, :c]


def _logits_buffers(n: int, c: int, dtype, device, first: bool, second: bool):
    """(z1, z2): the two heads' (n, c) buffers of :func:`_logits_buffer` from one allocation, None for a
    head that is off."""
    if not (first and second):
        one = _logits_buffer(n, c, dtype, device) if (first or second) else None
        return (one if first else None), (one if second else None)
    both = _buffer((2, n, _ld(c)), dtype, device)[:, :, :c]
    return both[0], both[1]


def _empty(device) -> Tensor:
    """An empty fp32 tensor: the pointer for a kernel argument that is not read (one specialization
    whatever is absent), or an unused slot of the op's outputs."""
    return torch.empty(0, dtype=F32, device=device)


def _dot_precision(dtype: torch.dtype, tf32: bool) -> str:
    """"ieee" only for fp32 with TF32 off; 16-bit operands keep Triton's default ("tf32", unused)."""
    return "ieee" if (dtype == torch.float32 and not tf32) else "tf32"


def _interp_bf16(dtype: torch.dtype, device: torch.device) -> bool:
    return dtype == torch.bfloat16 and _interpreted(device)


# ----------------------------------------------------------------------------- launches

def _launch(kernel, grid, *args, name: str, engine: str = "triton", flops: int = 0, nbytes: int = 0,
            kind: str = "", width: int = 0, **meta):
    """Launch a Triton kernel and report it. On ``meta`` tensors (cost simulation, compile report)
    nothing runs: the launch is only recorded, or compiled for the current target when
    ``_COMPILE_ON_META`` is set (the run-time specialization, see ``dhkd_kernels.compile_report``)."""
    if cost.recording():
        cost.note(name, engine, grid, flops, nbytes, kind, meta=cost.launch_key(name, meta, _dtypes(args)),
                  width=width)
    dev = next(a.device for a in args if isinstance(a, Tensor))
    if dev.type == "meta":
        if _COMPILE_ON_META is not None:
            _COMPILE_ON_META(name, kernel.warmup(*args, grid=grid, **meta),
                             cost.launch_key(name, meta, _dtypes(args)))
        return
    if not _SKIP:
        kernel[grid](*args, **meta)


def _dtypes(args) -> tuple:
    """The dtypes of a launch's tensor arguments, for its launch key."""
    return tuple(str(a.dtype).replace("torch.", "") for a in args if isinstance(a, Tensor))


_COMPILE_ON_META = None  # set by dhkd_kernels.compile_report
_SKIP = False  # set by skip_launches(): host code only (dhkd_kernels.host_overhead)


@contextlib.contextmanager
def skip_launches():
    """Run the host code with every kernel launch and cuBLAS product skipped (host-overhead measurement)."""
    global _SKIP
    saved, _SKIP = _SKIP, True
    try:
        yield
    finally:
        _SKIP = saved


def _opts(warps: int, stages: int, device) -> dict:
    return {} if _interpreted(device) else dict(num_warps=warps, num_stages=stages)


def _aligned(t: Tensor) -> bool:
    """A matrix cuBLAS can feed to its TMA/wgmma kernels: a unit stride and a leading dimension of a
    multiple of 16 bytes (a vector or a one-column matrix counts as aligned)."""
    if t.dim() < 2 or min(t.shape) <= 1:
        return True
    ld = t.stride(0) if t.stride(1) == 1 else (t.stride(1) if t.stride(0) == 1 else 0)
    return ld * t.element_size() % 16 == 0


def _mm(a: Tensor, b: Tensor, out: Tensor, *, beta: int = 0, kind: str) -> None:
    """out (+)= a @ b on cuBLAS (CPU BLAS in the tests); an fp32 ``out`` with 16-bit operands as
    :func:`accumulate_mode` says for this torch."""
    m, k = a.shape
    p = b.shape[1]
    nbytes = (m * k + k * p) * a.element_size() + m * p * out.element_size() * (1 + int(beta != 0))
    if p == 1:  # a matrix-vector product (dZ^T 1: bias gradients): memory-bound, not tensor-core work
        cost.note("cublas:gemv", "cublas", (), 0, nbytes, kind)
    else:
        cost.note("cublas:addmm" if beta else "cublas:mm", "cublas", (), 2 * m * k * p, nbytes, kind,
                  aligned=all(_aligned(t) for t in (a, b, out)))
    mode = _ACCUMULATE.get(out.device.type, "dtype_out")
    if _SKIP:
        return
    if out.dtype == a.dtype:
        if beta:
            out.addmm_(a, b)
        else:
            torch.mm(a, b, out=out)
    elif mode == "dtype_out":
        torch.ops.aten.addmm.dtype_out(out, a, b, out.dtype, beta=beta, alpha=1, out=out)
    elif mode == "round16":
        prod = torch.mm(a, b)
        cost.note("torch:add_" if beta else "torch:copy_", "torch", (), 0, m * p * (a.element_size() + 8))
        if beta:
            out.add_(prod)
        else:
            out.copy_(prod)
    else:
        if beta:
            out.addmm_(a.to(out.dtype), b.to(out.dtype))
        else:
            torch.mm(a.to(out.dtype), b.to(out.dtype), out=out)


def _scale(src: Tensor, out: Tensor, y: Tensor, g: Optional[Tensor], n_valid: Tensor, *, mask_rows: bool,
           mean: bool, ignore_index: int, row_g: bool = False) -> None:
    """out = s src (rows not in V zeroed with ``mask_rows``), s = g / max(|V|, 1) (mean) on the device."""
    _scales([(src, out, mask_rows)], y, g, n_valid, mean=mean, ignore_index=ignore_index, row_g=row_g)


def _scales(jobs, y: Tensor, g: Optional[Tensor], n_valid: Tensor, *, mean: bool, ignore_index: int,
            row_g: bool = False, bias=None) -> None:
    """One launch of ``scale_kernel``: up to two scale jobs (src, out, mask_rows) of one shape (see
    :func:`_scale`) and, with ``bias`` = (sum1, sum2, out1, out2), the bias gradients of one or both heads,
    out_h = s sum_h (fp32 column sums of dz: (C,), or (P, >= C) parts summed in order), all with the
    scale s = g / max(|V|, 1) (g = 1 when None; no 1/|V| unless ``mean``; g per row with ``row_g``, then
    not on the biases). The flags are runtime arguments: one compiled specialization serves every use
    with these dtypes."""
    jobs = [j for j in jobs if j[0].numel()]
    if len(jobs) > 2 or len({(tuple(j[0].shape), j[1].dtype) for j in jobs}) > 1:
        raise RuntimeError("scale_kernel takes at most two scale jobs of one shape and output dtype")
    if not jobs and bias is None:
        return
    dev = n_valid.device
    interp = _interpreted(dev)
    m, p = jobs[0][0].shape if jobs else (0, 0)
    # scale tiles: 8 x 128 over 4 warps, sizes and row strides specialized (multiples of 16: 128-bit
    # accesses); the interpreter takes small tiles (tails) or long ones for long inputs (numpy per program)
    bm, bp = ((16 if m <= 1024 else 1024), (16 if p <= 1024 else 1024)) if interp else (8, 128)
    ja = jobs[0] if jobs else (n_valid, n_valid, False)  # (no scale job: pointers that are not read)
    jb = jobs[-1] if jobs else ja
    nbytes = sum(j[0].numel() * (j[0].element_size() + j[1].element_size()) for j in jobs)
    if bias is not None:
        sum1, sum2, out1, out2 = bias
        s_any = sum1 if sum1 is not None else sum2
        o_any = out1 if out1 is not None else out2
        heads = int(sum1 is not None) + int(sum2 is not None)
        w = o_any.shape[0]  # both heads' biases have C entries
        parts, stride_parts = (1, 0) if s_any.dim() == 1 else (s_any.shape[0], s_any.stride(0))
        # 128 columns a program (a grid of C / 64 programs), 16 parts at once
        bw = (16 if w <= 1024 else 1024) if interp else 128
        bias_args = (sum1 if sum1 is not None else s_any, sum2 if sum2 is not None else s_any,
                     out1 if out1 is not None else o_any, out2 if out2 is not None else o_any,
                     w, parts, stride_parts, int(sum1 is None))
        bias_programs = cdiv(w, bw) * heads
        nbytes += w * (4 * parts + o_any.element_size()) * heads
        ob = o_any
    else:
        dummy = _empty(dev)
        bias_args = (dummy, dummy, dummy, dummy, 0, 0, 0, 0)
        bias_programs, bw, ob = 0, 16, None
    strides = [s_ for t_ in (*ja[:2], *jb[:2]) for s_ in t_.stride()] if jobs else [0] * 8
    _launch(E.scale_kernel, (len(jobs) * cdiv(m, bm) * cdiv(p, bp) + bias_programs,),
            *ja[:2], *jb[:2], y, g if g is not None else _empty(dev), n_valid, m, p, *strides, ignore_index,
            int(ja[2]), int(jb[2]), *bias_args, int(g is not None), int(mean),
            name="scale_kernel", nbytes=nbytes,
            JOBS=len(jobs), BIAS=bias is not None, ROW_G=row_g,
            INTERP_BF16=bool(jobs) and _interp_bf16(ja[1].dtype, dev),
            BIAS_BF16=ob is not None and _interp_bf16(ob.dtype, dev),
            BLOCK_M=bm, BLOCK_P=bp, BLOCK_W=bw, BLOCK_PARTS=4 if interp else 16, **_opts(4, 1, dev))


def _scale_jobs(jobs, y, g, n_valid, *, mean, ignore_index, row_g=False, bias=None) -> None:
    """The scale jobs (src, out, mask_rows) in launches of ``scale_kernel`` that pair jobs of one shape
    and output dtype, ``bias`` (see ``_scales``) in the first (or alone)."""
    groups = {}
    for job in jobs:
        groups.setdefault((tuple(job[0].shape), job[1].dtype), []).append(job)
    launches = [js[i:i + 2] for js in groups.values() for i in range(0, len(js), 2)]
    if bias is not None and not launches:
        launches = [[]]
    for k, js in enumerate(launches):
        _scales(js, y, g, n_valid, mean=mean, ignore_index=ignore_index, row_g=row_g, bias=bias if k == 0 else None)


def _epilogue(wk, o, z1, z2, t, y, b1, b2, rows, *, r0, R, c0, W, main, aux, g_ce, g_kd, g_aux,
              acc_logit, br, bc, warps, t_row0=0, t_col0=0, w=None, phase=0, stats=None):
    """``epilogue_kernel`` over rows [r0, r0 + R) x classes [c0, c0 + W); ``t`` is the teacher logits
    tensor or the block of them computed inside (starting at row t_row0, class t_col0). The sharded
    form (``o.shard``) runs the main head's block in phases around the group's collectives
    (:func:`._sharded.sharded_epilogue`); ``phase``/``stats``: one of those phases."""
    if o.shard is not None and main and phase == 0:
        from ._sharded import sharded_epilogue
        return sharded_epilogue(wk, o, z1, z2, t, y, b1, b2, rows, r0=r0, R=R, c0=c0, W=W, aux=aux, g_ce=g_ce,
                                g_kd=g_kd, g_aux=g_aux, acc_logit=acc_logit, br=br, bc=bc, warps=warps,
                                t_row0=t_row0, t_col0=t_col0, w=w)
    dev = t.device
    dummy = rows
    g_main = wk.g_main and (g_ce or g_kd or bool(o.zl_w))
    vec = _teacher_vec(t, W, c0 - t_col0)
    c_all = wk.c if o.shard is None else o.shard.total
    nbytes = 0
    if cost.recording():  # bytes are only for the cost record
        jsd = main and wk.kd_stats and o.div == 2  # one more pass over z1 and t: the JSD's row sums
        zb = wk.elem * (int(main) * (1 + 2 * int(g_main) + int(jsd)) + int(aux) * (1 + int(g_aux)))
        tb = t.element_size() * (int(wk.kd_stats and main) + int(aux or g_kd) + int(jsd))
        nbytes = R * W * (zb + tb) + R * 24
    _launch(E.epilogue_kernel, (cdiv(R, br),),
            z1 if z1 is not None else dummy, z2 if z2 is not None else dummy, t, y,
            b1 if b1 is not None else dummy, b2 if b2 is not None else dummy, rows,
            w if w is not None else dummy, stats if stats is not None else dummy,
            wk.n, c_all, R, W // vec, r0, c0,
            0 if o.shard is None else o.shard.start,
            z1.stride(0) if z1 is not None else 0, z2.stride(0) if z2 is not None else 0,
            t.stride(0) // vec, t.stride(1), t_row0, t_col0,
            o.ce_w, o.kd_w * o.kd_t, 1.0 / o.kd_t, o.kd_t * o.kd_t, o.lg_w, 1.0 / o.tau, o.tau * o.tau, o.eps,
            o.ignore_index, int(acc_logit), kd_scale(c_all), *_llm_scalars(o),
            name="epilogue_kernel", nbytes=nbytes,
            MAIN=main, KD_STATS=main and wk.kd_stats, AUX=aux, GRAD_CE=g_ce, GRAD_KD=g_kd, GRAD_AUX=g_aux,
            ZLOSS=main and bool(o.zl_w), GRAD_Z=main and g_main and bool(o.zl_w), DIV=o.div, CAP=o.cap > 0,
            TCAP=o.tcap > 0, PHASE=phase,
            KL_NORM=o.kl_norm, HAS_B1=b1 is not None and main, HAS_B2=b2 is not None and aux,
            ROW_W=w is not None, SMOOTH=o.eps != 0.0, VEC=vec, FAST=not _interpreted(dev),
            GROUP=16 // (z1 if z1 is not None else z2).element_size(),
            INTERP_BF16=_interp_bf16(z1.dtype if z1 is not None else z2.dtype, dev),
            BLOCK_R=br, BLOCK_C=bc, width=max(z.stride(0) for z in (z1, z2) if z is not None), **_opts(warps, 1, dev))


def _teacher_vec(t, width: int, col_off: int) -> int:
    """The largest vector (<= 16 bytes of teacher) dividing a block's width, the teacher's row stride and
    the block's column offset in it: the width and the teacher's row stride reach the kernels as
    multiples of it (vector loads of the teacher and the biases); 1 for an odd C. Without a teacher
    term (``t`` empty) only the width matters."""
    unread = t.numel() == 0
    vec = 8 if unread else (16 // t.element_size() if t.stride(1) == 1 else 1)
    while vec > 1 and (width % vec or (not unread and (t.stride(0) % vec or col_off % vec))):
        vec //= 2
    return vec


def _grad_pass(wk, o, z1, z2, t, y, b1, b2, stats, *, g_main, g_aux, sum1, sum2, parts):
    """``grad_kernel`` over all rows and classes (after ``epilogue_kernel``'s PHASE 4 wrote ``stats``):
    dz over z1/z2 (the heads with g_main/g_aux), the column sums of dz1/dz2 (sum1/sum2) and the
    logit-level loss sums. Returns (sums (2, P, Cp) fp32 or None, lgp (P T,) fp32 or None)."""
    dev = y.device
    n, c = wk.n, wk.c
    z = z1 if z1 is not None else z2
    br, bc, warps, rows = _grad_config(n, c, dev)
    cp = z.stride(0)
    tiles = cdiv(cp, bc)
    if parts != cdiv(n, rows):
        raise RuntimeError(f"the plan's {parts} row parts differ from grad_kernel's {cdiv(n, rows)}")
    sums = _buffer((2, parts, cp), F32, dev) if (sum1 or sum2) else None
    lgp = _buffer((parts * tiles,), F32, dev) if wk.aux else None
    vec = _teacher_vec(t, bc, 0)
    nbytes = 0
    if cost.recording():
        nbytes = n * c * (wk.elem * (2 * int(g_main) + int(wk.aux) * (1 + int(g_aux)))
                          + t.element_size() * int(wk.aux or (g_main and wk.kd_stats and bool(o.kd_w)))) \
            + n * 32 + (8 * parts * cp if sums is not None else 0)  # the (8, N) statistics: 32 N bytes, L2-resident
    dummy = stats
    _launch(grad_kernel, (tiles, parts),
            z1 if z1 is not None else z, z2 if z2 is not None else z, t, y,
            b1 if b1 is not None else dummy, b2 if b2 is not None else dummy, stats,
            sums if sums is not None else dummy, lgp if lgp is not None else dummy,
            n, c, rows, cp, t.stride(0) // vec, t.stride(1),
            o.ce_w, o.kd_w * o.kd_t, 1.0 / o.kd_t, o.lg_w, 1.0 / o.tau, o.tau * o.tau, o.eps, o.ignore_index,
            *_llm_scalars(o),
            name="grad_kernel", nbytes=nbytes,
            GRAD_CE=g_main and bool(o.ce_w), GRAD_KD=g_main and bool(o.kd_w), GRAD_Z=g_main and bool(o.zl_w),
            AUX=wk.aux, GRAD_AUX=g_aux, DIV=o.div, CAP=o.cap > 0, TCAP=o.tcap > 0, KL_NORM=o.kl_norm,
            HAS_B1=b1 is not None and g_main, HAS_B2=b2 is not None and wk.aux, SMOOTH=o.eps != 0.0,
            SUM_B1=sum1, SUM_B2=sum2, INTERP_BF16=_interp_bf16(z.dtype, dev), VEC=vec, FAST=not _interpreted(dev),
            BLOCK_R=br, BLOCK_C=bc, width=rows, **_opts(warps, 1, dev))
    return sums, lgp


def _llm_scalars(o) -> tuple:
    """The epilogue's run-time scalars of the LLM options: caps and their inverses (1 when off), the
    z-loss weight, and the JSD mixture's beta with log(beta), log(1 - beta) (finite inside (0, 1))."""
    beta = o.beta if o.div == 2 else 0.5
    return (o.cap or 1.0, 1.0 / (o.cap or 1.0), o.tcap or 1.0, 1.0 / (o.tcap or 1.0), o.zl_w, beta,
            math.log(beta), math.log1p(-beta))


def _teacher_block(th, r0, rc, c0, cc, out, kind):
    """out (rc, cc) = rows [r0, r0 + rc) x classes [c0, c0 + cc) of the teacher logits, from its
    features and head (cuBLAS; the bias, if any, in the same product)."""
    tf, tw, tb = th
    xf, wt = tf[r0:r0 + rc], tw[c0:c0 + cc].t()
    if tb is None:
        _mm(xf, wt, out, kind=kind)
        return
    cost.note("cublas:addmm", "cublas", (), 2 * rc * cc * tf.shape[1],
              (rc + cc) * tf.shape[1] * tf.element_size() + rc * cc * out.element_size(), kind)
    if not _SKIP:
        torch.addmm(tb[c0:c0 + cc], xf, wt, out=out)


def _finalize(wk, o, rows, y, loss, terms, correct, n_valid, per_row, lgp=None):
    """``lgp``: grad_kernel's logit-loss sums, read instead of the rows' (not with ``per_row``)."""
    dev = y.device
    _launch(E.finalize_kernel, (1,), rows, y, loss, terms, correct, n_valid,
            per_row if per_row is not None else rows, lgp if lgp is not None else rows,
            0 if lgp is None else lgp.numel(),
            wk.n, o.ce_w, o.kd_w, o.lg_w, o.zl_w, o.ignore_index, int(per_row is not None), int(o.mean),
            name="finalize_kernel", nbytes=wk.n * (16 + 4 * int(bool(o.zl_w)) + y.element_size()),
            CE_IN=bool(o.ce_w), KD_IN=bool(o.kd_w), LG_IN=bool(o.lg_w), ZL_IN=bool(o.zl_w), HAVE_MAIN=wk.main,
            HAVE_AUX=wk.aux, LG_PARTS=lgp is not None,
            BLOCK=16 if _interpreted(dev) else 2048,
            **_opts(16, 1, dev))  # one program: 16 warps keep enough loads in flight


def _ones(n: int, dtype, device) -> Tensor:
    """An (n, 1) column of ones: dZ^T 1 is a bias gradient as one cuBLAS product reading dz once."""
    cost.note("torch:fill_", "torch", (), 0, n * torch.finfo(dtype).bits // 8)
    return torch.ones((n, 1), dtype=dtype, device=device)


def _teacher_kind(t, tf32: bool) -> str:
    return _kind(t[0].dtype, tf32)


def _zero(g: Tensor) -> None:
    g.zero_()
    cost.note("torch:zero_", "torch", (), 0, g.numel() * g.element_size())



def _cast(v: Tensor, dtype: torch.dtype) -> Tensor:
    """v in ``dtype``; a cast that copies is reported to the cost model, and so is the cast of its
    gradient back to v's dtype that autograd will run in the backward."""
    if v.dtype != dtype:
        nbytes = v.numel() * (v.element_size() + torch.finfo(dtype).bits // 8)
        cost.note("torch:_to_copy", "torch", (), 0, nbytes)
        if v.requires_grad and torch.is_grad_enabled():
            cost.note("torch:_to_copy (backward, autograd)", "torch", (), 0, nbytes)
    return v.to(dtype)


def _contiguous(v: Tensor) -> Tensor:
    if not v.is_contiguous():
        cost.note("torch:clone", "torch", (), 0, 2 * v.numel() * v.element_size())
    return v.contiguous()
