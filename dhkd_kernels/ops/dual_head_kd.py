"""The ``backend="triton"`` path: the dual-head KD loss at the cost of its matmuls.

Notation: z1 = X W1^T + b1 (main head), z2 = A W2^T + b2 (auxiliary head; A = X when ``aux_features``
is None), t the teacher logits, V the valid rows. Kernels: :mod:`._gemm_kernels` (Triton GEMMs) and
:mod:`._epilogue_kernels` (memory-bound loss epilogue, reductions, scaled copies).

**Work.** Per forward+backward exactly one z = X W^T, one dX = dZ W and one dW = dZ^T X per head
(12 N C D FLOPs with shared features): the logits of a block are stored once by the GEMM, the loss
epilogue turns them into dz in place, and the gradient products read that dz. Nothing is recomputed.
Without any gradient (eval, ``torch.no_grad()``) only the forward products run.

**Plans** (:func:`make_plan`; the rule is fixed, documented and checked by CPU tests):

* *resident* (N C (heads) (bytes per element) plus the backward's buffers fit the memory budget):
  the forward stores both heads' logits whole, the epilogue writes dz over them, and dz waits for
  the backward, which applies s = grad_output / max(|V|, 1) on the fly.
  - engine "triton" (matmul work below ``TRITON_MAX_FLOPS`` = 64 GFLOP per forward+backward, i.e.
    small problems whose time is mostly launches): ``logits_kernel`` (both heads, one launch, one load
    of each X tile for both), ``epilogue_kernel``, ``finalize_kernel``, then ``dx_kernel`` and
    ``dw_kernel`` (bias gradients included): 5 launches per forward+backward.
  - engine "cublas" (larger problems): the six products on cuBLAS (``torch.mm``; dX summed in an
    fp32 accumulator), the same epilogue and finalize, bias gradients from column-sum partials.
* *chunked* (the logits do not fit): always cuBLAS. The forward computes the gradients, the
  backward multiplies them by grad_output in place. The auxiliary head's gradient needs no row
  statistic, so it runs in class slabs over all rows: each slab's dW2 rows are final when the slab
  is done and dX accumulates in fp32. The main head's softmax needs whole rows, so it runs in row
  chunks over all classes: each chunk's dX rows are final and dW1 accumulates over the chunks (in
  W1's dtype: one rounding per chunk for 16-bit weights, 7-10 chunks at the LLM shapes).

**Memory bound** (extra device memory beyond inputs and their gradients): ``plan.extra_bytes``,
at most the budget (``set_memory_budget``, env ``DHKD_MEMORY_BUDGET_MB``, 512 MiB by default) except
when even the smallest chunk does not fit it (then the smallest chunk is used and extra_bytes says so).

**No host synchronisation:** the plan depends only on shapes, dtypes and flags; every scalar that
depends on data (|V|, grad_output) stays on the device. The op can be captured in a CUDA graph.

**Determinism:** every output element is written by one program in a fixed order, no atomics; cuBLAS
is deterministic for these products on a given GPU and library version.

Dtypes: matmul operands (features, weights, aux features) in one dtype of fp32/bf16/fp16: the
autocast dtype under ``torch.autocast``, otherwise the promoted dtype of the operands. Logits are
stored in the operand dtype (as eager PyTorch does); every loss formula, statistic and dz is fp32
arithmetic; biases and teacher logits are read in fp32. fp32 operands use TF32 iff PyTorch's CUDA
matmul setting asks for it.

torch.compile: the forward, the backward and the in-place gradient scaling are ``torch.library``
custom ops (``dhkd::dual_head_kd_fwd``, ``dhkd::dual_head_kd_bwd``, ``dhkd::scale_``) with fake
implementations and a registered autograd formula.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import List, Optional, Tuple

import torch
import triton
from torch import Tensor

from .. import cost
from . import _epilogue_kernels as E
from . import _gemm_kernels as G

__all__ = ["dual_head_kd_loss", "make_plan", "set_debug_poison", "set_engine", "set_memory_budget",
           "simulate", "TRITON_MAX_FLOPS"]

MEMORY_BUDGET_BYTES = int(float(os.environ.get("DHKD_MEMORY_BUDGET_MB", "512")) * 2**20)
TRITON_MAX_FLOPS = 64e9
PARTIAL_BYTES = 16 * 2**20  # bound on the column-sum partials of one epilogue launch
_ENGINE = os.environ.get("DHKD_ENGINE", "auto")
_POISON = os.environ.get("DHKD_DEBUG_POISON", "0") == "1"
_OPERAND_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_HAS_MM_DTYPE = hasattr(torch.ops.aten.addmm, "dtype_out")
F32 = torch.float32


def set_engine(kind: str) -> None:
    """Force the resident plan's engine: "triton", "cublas" or "auto" (the size rule, default).
    The chunked plan always runs on cuBLAS."""
    global _ENGINE
    if kind not in ("auto", "triton", "cublas"):
        raise ValueError(f"kind must be 'auto', 'triton' or 'cublas', got {kind!r}")
    _ENGINE = kind


def set_memory_budget(nbytes: int) -> None:
    """Bound on the op's extra device memory (bytes); larger problems are chunked to fit it."""
    global MEMORY_BUDGET_BYTES
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 1:
        raise ValueError(f"nbytes must be a positive int, got {nbytes!r}")
    MEMORY_BUDGET_BYTES = nbytes


def set_debug_poison(enabled: bool) -> None:
    """Fill kernel outputs with NaN before the kernels write them (debug/tests): unwritten = NaN."""
    global _POISON
    _POISON = bool(enabled)


# ----------------------------------------------------------------------------- devices, buffers

def _interpreted(device: torch.device) -> bool:
    return device.type == "cpu"


_SM_COUNT = {}


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 132 if device.type == "meta" else 2
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def _buffer(shape, dtype, device) -> Tensor:
    """Uninitialised output buffer (NaN-filled when poisoning, which costs one fill kernel)."""
    if _POISON and device.type != "meta":
        return torch.full(shape, float("nan") if dtype.is_floating_point else -1, dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _f32_placeholder(device) -> Tensor:
    """An fp32 pointer for a slot the kernel does not read (one specialization whatever is absent)."""
    return torch.empty(0, dtype=F32, device=device)


def _empty(device) -> Tensor:
    return torch.empty(0, dtype=F32, device=device)


def _kind(dtype: torch.dtype, tf32: bool) -> str:
    if dtype == torch.float32:
        return "tf32" if tf32 else "fp32"
    return "bf16" if dtype == torch.bfloat16 else "fp16"


def _dot_precision(dtype: torch.dtype, tf32: bool) -> str:
    """"ieee" only for fp32 with TF32 off; 16-bit operands keep Triton's default ("tf32", unused)."""
    return "ieee" if (dtype == torch.float32 and not tf32) else "tf32"


def _interp_bf16(dtype: torch.dtype, device: torch.device) -> bool:
    return dtype == torch.bfloat16 and _interpreted(device)


def _round16(v: int) -> int:
    return -(-v // 16) * 16


def _pow2(v: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(int(v), 1))))


# ----------------------------------------------------------------------------- the plan

@dataclasses.dataclass(frozen=True)
class Plan:
    """How one call runs (see the module docstring). ``rows``: main-head rows per chunk; ``slab``:
    auxiliary-head classes per slab (both the whole problem when resident)."""

    engine: str
    resident: bool
    rows: int
    slab: int
    extra_bytes: int
    mode: str = "slabs"  # chunked: "slabs" (aux head in class slabs, main in row chunks) or "rows" (both in rows)

    def describe(self) -> str:
        if self.resident:
            return f"resident/{self.engine}"
        if self.mode == "rows":
            return f"chunked/cublas (both heads in rows of {self.rows})"
        return f"chunked/cublas (rows {self.rows}, slab {self.slab})"


@dataclasses.dataclass(frozen=True)
class Work:
    """What a call computes: the terms (stats), the gradients, and the shapes."""

    n: int
    c: int
    d: int
    da: int
    elem: int
    shared: bool
    main: bool          # z1 needed (CE or KD term computed)
    kd_stats: bool
    aux: bool           # z2 needed (logit-level term computed)
    g_main: bool        # dz1 needed (some input gets a gradient through the main head)
    g_aux: bool
    need: Tuple[bool, bool, bool, bool, bool, bool]   # x, w1, b1, a, w2, b2
    f32: bool
    tensor_cores: bool  # 16-bit operands, or fp32 with TF32
    t_width: int = 0    # D_t when the teacher comes as features + head (its product runs inside)
    t_elem: int = 2
    fp16: bool = False
    none: bool = False

    @property
    def t_main(self) -> bool:
        """The main head's epilogue reads the teacher (KD)."""
        return self.main and self.kd_stats

    @property
    def teacher_product(self) -> bool:
        return self.t_width > 0 and (self.t_main or self.aux)

    @property
    def grad(self) -> bool:
        return self.g_main or self.g_aux

    def flops(self) -> int:
        per1 = 2 * self.n * self.c * self.d
        per2 = 2 * self.n * self.c * self.da
        f = per1 * self.main + per2 * self.aux
        need_x, need_w1, _, need_a, need_w2, _ = self.need
        if self.g_main:
            f += per1 * (int(need_x) + int(need_w1 or self.need[2]))
        if self.g_aux:
            f += per2 * (int(need_x if self.shared else need_a) + int(need_w2 or self.need[5]))
        return f + 2 * self.n * self.c * self.t_width * int(self.teacher_product)


def plan_to_list(plan: Plan) -> List[int]:
    """The plan as ints, to travel with the autograd context into the backward ops (the backward must
    run the forward's plan whatever the settings are by then)."""
    return [int(plan.resident), int(plan.engine == "cublas"), plan.rows, plan.slab, int(plan.mode == "rows"),
            plan.extra_bytes]


def plan_from_list(v) -> Plan:
    return Plan("cublas" if v[1] else "triton", bool(v[0]), int(v[2]), int(v[3]), int(v[5]),
                mode="rows" if v[4] else "slabs")


def _epi_config(r: int, w: int, colsum: bool, device) -> Tuple[int, int, int]:
    """(BLOCK_R, BLOCK_C, warps) of ``epilogue_kernel`` over a block of r rows x w classes."""
    if _interpreted(device):
        return 4, 16, 1
    # at least 4 rows with column sums: 2-row tiles with both column sums spilled 16 bytes (fp32, sm_90)
    br = _pow2(r // (2 * _sm_count(device)), 4 if colsum else 2, 16)
    if colsum:
        while br < 64 and triton.cdiv(r, br) * w * 4 > PARTIAL_BYTES:
            br *= 2
    # 2048-element tiles over 8 warps: 8 fp32 values per thread per live tile, which keeps the
    # heaviest variant (CE + KD + logit gradients and both column sums) free of spills on sm_90
    bc = min(_pow2(w, 16, 1024), max(64, 2048 // br))
    return br, bc, max(2, min(8, br * bc // 256))


def _resident_bytes(wk: Work, engine: str, device) -> int:
    n, c, d, da, e = wk.n, wk.c, wk.d, wk.da, wk.elem
    need_x, need_w1, need_b1, need_a, need_w2, need_b2 = wk.need
    total = n * c * e * (int(wk.main) + int(wk.aux)) + 5 * n * 4 + n * c * wk.t_elem * int(wk.teacher_product)
    if engine == "cublas" and wk.grad:
        br = _epi_config(n, c, True, device)[0]
        parts = 0 if wk.none else triton.cdiv(n, br) * c * 4  # reduction="none": dZ^T g instead
        total += parts * (int(wk.g_main and need_b1) + int(wk.g_aux and need_b2))
        if (wk.g_main and need_w1) or (wk.shared and wk.g_aux and need_w2):
            total += n * d * e
        if not wk.shared and wk.g_aux and need_w2:
            total += n * da * e
        if not wk.f32:
            total += 4 * (n * d * int(need_x) + n * da * int(need_a and not wk.shared))
        if wk.fp16:
            total += 4 * c * max(d * int(need_w1), da * int(need_w2))  # fp16: the fp32 dW of one head
    return total


def make_plan(wk: Work, device: torch.device) -> Plan:
    """The plan of one call: resident when its buffers fit the budget (engine by the size rule),
    otherwise chunked on cuBLAS with the largest chunks the budget allows."""
    budget = MEMORY_BUDGET_BYTES
    if _ENGINE != "auto":
        engine = _ENGINE
    else:
        # Triton GEMMs only on tensor cores (16-bit, or fp32 with TF32): IEEE fp32 goes to cuBLAS
        engine = "triton" if (wk.flops() < TRITON_MAX_FLOPS and wk.tensor_cores) else "cublas"
    need = _resident_bytes(wk, engine, device)
    if need <= budget or (wk.n * wk.c) == 0:
        return Plan(engine, True, wk.n, wk.c, need)
    n, c, d, da, e = wk.n, wk.c, wk.d, wk.da, wk.elem
    need_x, need_w1, need_b1, need_a, need_w2, need_b2 = wk.need
    th, te = wk.t_width > 0, wk.t_elem
    rows_mode = th and wk.t_main and wk.aux
    fixed = 5 * n * 4 + 16
    if wk.grad:
        if (wk.g_main and need_w1) or (wk.shared and wk.g_aux and need_w2):
            fixed += n * d * e
        if not wk.shared and wk.g_aux and need_w2:
            fixed += n * da * e
        if not wk.f32:
            fixed += 4 * (n * d * int(need_x) + n * da * int(need_a and not wk.shared))
        # fp32 bias accumulators over row chunks, and the column-sum partials live at once
        fixed += 4 * c * (int(need_b1) + int(need_b2 and rows_mode))
        n_partials = (int(need_b1) + int(need_b2)) if rows_mode else int(need_b1 or need_b2)
        fixed += n_partials * min(PARTIAL_BYTES, 4 * n * c)
    room = max(budget - fixed, 0)
    granule_r, granule_c = (4, 16) if _interpreted(device) else (64, 128)
    if rows_mode:
        # the main head needs the teacher too: both heads in row chunks, so that the teacher's product
        # runs once (dW2 then accumulates over chunks like dW1)
        per_row = c * (2 * e + te)
        rows = min(n, max(granule_r, room // per_row // granule_r * granule_r))
        return Plan("cublas", False, rows, c, fixed + rows * per_row, mode="rows")
    # class slabs of the aux head: its logits and (teacher head) the teacher's block, n x slab each
    per_col = n * (e + te * int(th))
    slab = min(c, max(granule_c, room // max(per_col, 1) // granule_c * granule_c)) if wk.aux else c
    slab_z = n * _round16(slab) * e * int(wk.aux)
    slab_t = n * _round16(slab) * te * int(th and wk.aux)
    # row chunks of the main head share the logits buffer; a teacher block only with the aux head off
    per_row_z, per_row_t = c * e, c * te * int(th and wk.t_main)
    if wk.main:
        # the buffers are allocated once: the rows must fit beside the slab phase's teacher buffer
        room_rows = max(room - max(slab_t, 0), 0) if not wk.t_main else room
        rows = min(n, max(granule_r, room_rows // max(per_row_z + per_row_t, 1) // granule_r * granule_r))
    else:
        rows = n
    zbuf = max(rows * per_row_z * int(wk.main), slab_z)
    tbuf = max(rows * per_row_t * int(wk.main), slab_t)
    return Plan("cublas", False, rows, slab, fixed + zbuf + tbuf)


# ----------------------------------------------------------------------------- launches

def _launch(kernel, grid, *args, name: str, engine: str = "triton", flops: int = 0, nbytes: int = 0,
            kind: str = "", **meta):
    """Launch a Triton kernel and report it. On ``meta`` tensors (cost simulation, compile report)
    nothing runs: the launch is only recorded, or compiled for the current target when
    ``_COMPILE_ON_META`` is set (the run-time specialization, see ``dhkd_kernels.compile_report``)."""
    cost.note(name, engine, grid, flops, nbytes, kind)
    dev = next(a.device for a in args if isinstance(a, Tensor))
    if dev.type == "meta":
        if _COMPILE_ON_META is not None:
            _COMPILE_ON_META(name, kernel.warmup(*args, grid=grid, **meta))
        return
    kernel[grid](*args, **meta)


_COMPILE_ON_META = None  # set by dhkd_kernels.compile_report


def _opts(warps: int, stages: int, device) -> dict:
    return {} if _interpreted(device) else dict(num_warps=warps, num_stages=stages)


def _mm(a: Tensor, b: Tensor, out: Tensor, *, beta: int = 0, kind: str) -> None:
    """out (+)= a @ b on cuBLAS (CPU BLAS in the tests); fp32 ``out`` with 16-bit operands accumulates
    in fp32 (``addmm.dtype_out``; on CPU, where that overload is missing, through fp32 copies)."""
    m, k = a.shape
    p = b.shape[1]
    nbytes = (m * k + k * p) * a.element_size() + m * p * out.element_size() * (1 + int(beta != 0))
    cost.note("cublas:addmm" if beta else "cublas:mm", "cublas", (), 2 * m * k * p, nbytes, kind)
    if out.dtype == a.dtype:
        if beta:
            out.addmm_(a, b)
        else:
            torch.mm(a, b, out=out)
    elif out.device.type != "cpu" and _HAS_MM_DTYPE:
        torch.ops.aten.addmm.dtype_out(out, a, b, out.dtype, beta=beta, alpha=1, out=out)
    else:
        if beta:
            out.addmm_(a.to(out.dtype), b.to(out.dtype))
        else:
            torch.mm(a.to(out.dtype), b.to(out.dtype), out=out)


def _scale(src: Tensor, out: Tensor, y: Tensor, g: Optional[Tensor], n_valid: Tensor, *, mask_rows: bool,
           mean: bool, ignore_index: int, row_g: bool = False) -> None:
    """out = s src (rows not in V zeroed with ``mask_rows``), s = g / max(|V|, 1) (mean) on the device.
    The flags are runtime arguments: one compiled specialization serves every use with these dtypes."""
    m, p = src.shape
    if m == 0 or p == 0:
        return
    dev = src.device
    bm, bp = (16, 16) if _interpreted(dev) else (32, 128)
    _launch(E.scale_kernel, (triton.cdiv(m, bm), triton.cdiv(p, bp)),
            src, out, y, g if g is not None else _f32_placeholder(dev), n_valid, m, p,
            src.stride(0), src.stride(1), out.stride(0), out.stride(1), ignore_index,
            int(mask_rows), int(g is not None), int(mean),
            name="scale_kernel", nbytes=m * p * (src.element_size() + out.element_size()),
            ROW_G=row_g, INTERP_BF16=_interp_bf16(out.dtype, dev), BLOCK_M=bm, BLOCK_P=bp, **_opts(4, 1, dev))


def _epilogue(wk, o, z1, z2, t, y, b1, b2, rows, cs1, cs2, *, r0, R, c0, W, main, aux, g_ce, g_kd, g_aux,
              acc_logit, colsum1, colsum2, br, bc, warps, t_row0=0, t_col0=0, w=None):
    """``epilogue_kernel`` over rows [r0, r0 + R) x classes [c0, c0 + W); ``t`` is the teacher logits
    tensor or the block of them computed inside (starting at row t_row0, class t_col0)."""
    dev = t.device
    dummy = rows
    g_main = g_ce or g_kd
    zb = wk.elem * (int(main) * (1 + 2 * int(g_main)) + int(aux) * (1 + int(g_aux)))
    tb = t.element_size() * (int(wk.kd_stats and main) + int(aux or g_kd))
    nbytes = R * W * (zb + tb) + triton.cdiv(R, br) * W * 4 * (int(colsum1) + int(colsum2)) + R * 24
    _launch(E.epilogue_kernel, (triton.cdiv(R, br),),
            z1 if z1 is not None else dummy, z2 if z2 is not None else dummy, t, y,
            b1 if b1 is not None else dummy, b2 if b2 is not None else dummy, rows,
            cs1 if cs1 is not None else dummy, cs2 if cs2 is not None else dummy,
            w if w is not None else dummy,
            wk.n, wk.c, R, W, r0, c0,
            z1.stride(0) if z1 is not None else 0, z2.stride(0) if z2 is not None else 0,
            t.stride(0), t.stride(1), t_row0, t_col0,
            o.ce_w, o.kd_w * o.kd_t, 1.0 / o.kd_t, o.kd_t * o.kd_t, o.lg_w, 1.0 / o.tau, o.tau * o.tau, o.eps,
            o.ignore_index, int(acc_logit),
            name="epilogue_kernel", nbytes=nbytes,
            MAIN=main, KD_STATS=main and wk.kd_stats, AUX=aux, GRAD_CE=g_ce, GRAD_KD=g_kd, GRAD_AUX=g_aux,
            KL_NORM=o.kl_norm, HAS_B1=b1 is not None and main, HAS_B2=b2 is not None and aux,
            COLSUM1=colsum1, COLSUM2=colsum2, ROW_W=w is not None,
            INTERP_BF16=_interp_bf16(z1.dtype if z1 is not None else z2.dtype, dev),
            BLOCK_R=br, BLOCK_C=bc, **_opts(warps, 1, dev))


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
    torch.addmm(tb[c0:c0 + cc], xf, wt, out=out)


def _finalize(wk, o, rows, y, loss, terms, correct, n_valid, per_row):
    dev = y.device
    _launch(E.finalize_kernel, (1,), rows, y, loss, terms, correct, n_valid,
            per_row if per_row is not None else rows,
            wk.n, o.ce_w, o.kd_w, o.lg_w, o.ignore_index, int(per_row is not None), int(o.mean),
            name="finalize_kernel", nbytes=wk.n * (16 + y.element_size()),
            CE_IN=bool(o.ce_w), KD_IN=bool(o.kd_w), LG_IN=bool(o.lg_w), HAVE_MAIN=wk.main, HAVE_AUX=wk.aux,
            BLOCK=16 if _interpreted(dev) else 1024,
            **_opts(4, 1, dev))


def _colsum(cs1, cs2, out1, out2, P, W, g, n_valid, *, acc, heads, mean):
    """Bias gradients from the epilogue's column-sum partials: heads 1, 2 or 3 (both)."""
    dev = n_valid.device
    block = 16 if _interpreted(dev) else 512
    any_cs = cs1 if cs1 is not None else cs2
    any_out = out1 if out1 is not None else out2
    _launch(E.colsum_kernel, (triton.cdiv(W, block), 2 if heads == 3 else 1),
            cs1 if cs1 is not None else any_cs, cs2 if cs2 is not None else any_cs,
            out1 if out1 is not None else any_out, out2 if out2 is not None else any_out,
            g if g is not None else _f32_placeholder(dev), n_valid, P, W, int(acc), 1 if heads == 2 else 0,
            int(g is not None), int(mean),
            name="colsum_kernel", nbytes=(P * W * 4 + W * 8) * (2 if heads == 3 else 1),
            BLOCK=block, **_opts(4, 1, dev))


# ----------------------------------------------------------------------------- options

@dataclasses.dataclass(frozen=True)
class _Opts:
    ce_w: float
    kd_w: float
    lg_w: float
    kd_t: float
    tau: float
    kl_norm: bool
    ignore_index: int
    mean: bool
    components: bool
    tf32: bool
    eps: float = 0.0     # label smoothing of the CE term
    none: bool = False   # reduction="none": per-row losses, per-row grad_output


def _work(x, w1, a, n: int, c: int, o: _Opts, needs, teacher=None) -> Work:
    shared = a is None
    need_x, need_w1, need_b1, need_a, need_w2, need_b2 = (bool(v) for v in needs)
    if shared:
        need_a = False
    main = bool(o.ce_w) or bool(o.kd_w) or o.components
    aux = bool(o.lg_w) or o.components
    g_main = (bool(o.ce_w) or bool(o.kd_w)) and (need_x or need_w1 or need_b1)
    g_aux = bool(o.lg_w) and ((need_x and shared) or need_a or need_w2 or need_b2)
    th = isinstance(teacher, (tuple, list))
    return Work(n, c, x.shape[1], (x if shared else a).shape[1], x.element_size(), shared, main,
                bool(o.kd_w) or o.components, aux, g_main, g_aux,
                (need_x, need_w1 and g_main, need_b1 and g_main, need_a, need_w2 and g_aux, need_b2 and g_aux),
                x.dtype == F32, x.dtype != F32 or o.tf32,
                teacher[1].shape[1] if th else 0, teacher[0].element_size() if th else 2, x.dtype == torch.float16, o.none)


# ----------------------------------------------------------------------------- forward

def _forward(x, w1, b1, a, w2, b2, t, y, o: _Opts, needs, row_weight=None, out_grads=None, plan=None):
    """Returns loss, terms, correct, n_valid and the six state tensors for the backward: resident:
    (dz1, dz2, cs1, cs2, -, -); chunked: the gradients for a grad_output of 1 (gx, gw1, gb1, ga, gw2,
    gb2). ``t`` is the teacher logits tensor or (features, weight, bias). Empty tensors fill unused
    slots. reduction="none": loss (N,), terms (3, N), correct (N,) bool. ``row_weight``/``out_grads``:
    the chunked plan's recompute for a per-row grad_output, written into the stored gradients."""
    dev = x.device
    n, c = y.shape[0], w1.shape[0]
    wk = _work(x, w1, a, n, c, o, needs, t)
    if plan is None:
        plan = make_plan(wk, dev)
    loss = _buffer((), F32, dev)
    terms = _buffer((3,), F32, dev)
    correct = torch.empty((), dtype=torch.int64, device=dev)
    n_valid = torch.empty((), dtype=torch.int64, device=dev)
    rows = _buffer((4, n), F32, dev)
    per_row = _buffer((n,), F32, dev) if o.none else None
    if plan.resident:
        state = _forward_resident(wk, plan, o, x, w1, b1, a, w2, b2, t, y, rows)
    else:
        state = _forward_chunked(wk, plan, o, x, w1, b1, a, w2, b2, t, y, rows, n_valid, needs,
                                 row_weight=row_weight, out_grads=out_grads)
    _finalize(wk, o, rows, y, loss, terms, correct, n_valid, per_row)
    if not plan.resident:
        _finish_chunked(wk, o, y, n_valid, state)
    state = [v if v is not None else _empty(dev) for v in state[:6]]
    if o.none:  # per-row results: the terms are rows 0-2 of the row buffer, correct is read only for components
        loss, terms = per_row, rows[:3]
        if o.components:
            correct = rows[3] > 0.5
            cost.note("torch:gt", "torch", (), 0, 5 * n)
        else:
            correct = torch.empty(n, dtype=torch.bool, device=dev)
    return (loss, terms, correct, n_valid, *state)


def _teacher_kind(t, tf32: bool) -> str:
    return _kind(t[0].dtype, tf32)


def _forward_resident(wk, plan, o, x, w1, b1, a, w2, b2, t, y, rows):
    dev = x.device
    n, c, dt = wk.n, wk.c, x.dtype
    a_ = x if wk.shared else a
    kind = _kind(dt, o.tf32)
    if n == 0 or not (wk.main or wk.aux):
        return [None] * 6
    if isinstance(t, (tuple, list)):
        if wk.teacher_product:
            tbuf = _buffer((n, c), t[0].dtype, dev)
            _teacher_block(t, 0, n, 0, c, tbuf, _teacher_kind(t, o.tf32))
            t = tbuf
        else:
            t = _f32_placeholder(dev).view(1, 0)
    z1 = _buffer((n, c), dt, dev) if wk.main else None
    z2 = _buffer((n, c), dt, dev) if wk.aux else None
    if plan.engine == "triton":
        interp = _interpreted(dev)
        bm, bn, bk = (16, 16, 16) if interp else (64, 128, 64 if wk.elem <= 2 else 32)
        flops = 2 * n * c * (wk.d * int(wk.main) + wk.da * int(wk.aux))
        nbytes = (n * wk.d + c * wk.d) * wk.elem * int(wk.main) + (n * wk.da + c * wk.da) * wk.elem * int(wk.aux) \
            - (n * wk.d * wk.elem if (wk.shared and wk.main and wk.aux) else 0) \
            + n * c * wk.elem * (int(wk.main) + int(wk.aux))
        _launch(G.logits_kernel, (triton.cdiv(n, bm) * triton.cdiv(c, bn),),
                x, w1, a_, w2, z1 if z1 is not None else z2, z2 if z2 is not None else z1,
                n, c, wk.d, wk.da,
                x.stride(0), x.stride(1), w1.stride(0), w1.stride(1), a_.stride(0), a_.stride(1),
                w2.stride(0), w2.stride(1), c, c,
                name="logits_kernel", engine="triton-gemm", flops=flops, nbytes=nbytes, kind=kind,
                MAIN=wk.main, AUX=wk.aux, SHARED=wk.shared, DOT_PRECISION=_dot_precision(dt, o.tf32),
                INTERP_BF16=_interp_bf16(dt, dev), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8,
                **_opts(4, 4 if wk.elem <= 2 else 3, dev))
    else:
        if wk.main:
            _mm(x, w1.t(), z1, kind=kind)
        if wk.aux:
            _mm(a_, w2.t(), z2, kind=kind)
    need_x, need_w1, need_b1, need_a, need_w2, need_b2 = wk.need
    # bias gradients of the cuBLAS engine from column-sum partials (reduction="none" weights its rows
    # by grad_output, which the backward does with a product instead)
    colsum1 = plan.engine == "cublas" and need_b1 and not o.none
    colsum2 = plan.engine == "cublas" and need_b2 and not o.none
    br, bc, warps = _epi_config(n, c, colsum1 or colsum2, dev)
    p = triton.cdiv(n, br)
    cs1 = _buffer((p, c), F32, dev) if colsum1 else None
    cs2 = _buffer((p, c), F32, dev) if colsum2 else None
    _epilogue(wk, o, z1, z2, t, y, b1, b2, rows, cs1, cs2, r0=0, R=n, c0=0, W=c, main=wk.main, aux=wk.aux,
              g_ce=wk.g_main and bool(o.ce_w), g_kd=wk.g_main and bool(o.kd_w), g_aux=wk.g_aux,
              acc_logit=False, colsum1=colsum1, colsum2=colsum2, br=br, bc=bc, warps=warps)
    return [z1 if wk.g_main else None, z2 if wk.g_aux else None, cs1, cs2, None, None]


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
                nbytes=n * y.element_size(), BLOCK=16 if _interpreted(dev) else 1024, **_opts(4, 1, dev))
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
        gb1_acc = _buffer((c,), F32, dev) if need_b1 else None
        gb2_acc = _buffer((c,), F32, dev) if (need_b2 and rows_mode) else None
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
        per = plan.rows * c
        zbuf = _buffer((2 * per,), dt, dev)
        tbuf = _buffer((per,), te, dev)
        for r0 in range(0, n, plan.rows):
            rc = min(plan.rows, n - r0)
            z1, z2 = zbuf[: rc * c].view(rc, c), zbuf[per: per + rc * c].view(rc, c)
            _mm(x[r0:r0 + rc], w1.t(), z1, kind=kind)
            _mm(a_[r0:r0 + rc], w2.t(), z2, kind=kind)
            tb_, tr0, tc0 = teacher(r0, rc, 0, c, tbuf[: rc * c].view(rc, c))
            cs_on1, cs_on2 = bool(need_b1), bool(need_b2)
            br, bc, warps = _epi_config(plan.rows, c, cs_on1 or cs_on2, dev)
            p = triton.cdiv(rc, br)
            cs1 = _buffer((p, c), F32, dev) if cs_on1 else None
            cs2 = _buffer((p, c), F32, dev) if cs_on2 else None
            _epilogue(wk, o, z1, z2, tb_, y, b1, b2, rows, cs1, cs2, r0=r0, R=rc, c0=0, W=c, main=True, aux=True,
                      g_ce=wk.g_main and bool(o.ce_w), g_kd=wk.g_main and bool(o.kd_w), g_aux=wk.g_aux,
                      acc_logit=False, colsum1=cs_on1, colsum2=cs_on2, br=br, bc=bc, warps=warps,
                      t_row0=tr0, t_col0=tc0, w=row_weight)
            if not wk.grad:
                continue
            if cs_on1 or cs_on2:
                _colsum(cs1, cs2, gb1_acc, gb2_acc, p, c, None, n_valid, acc=r0 > 0,
                        heads=3 if (cs_on1 and cs_on2) else (1 if cs_on1 else 2), mean=o.mean)
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

    slab_cols = _round16(plan.slab)
    zbuf = _buffer((max(plan.rows * c * int(wk.main), n * slab_cols * int(wk.aux)),), dt, dev)
    need_t = th is not None and (wk.aux or wk.t_main)
    tbuf = _buffer((max(plan.rows * c * int(wk.t_main), n * slab_cols * int(wk.aux)),), te, dev) if need_t else None
    x_acc_started = False
    if wk.aux:
        dxa = accx if wk.shared else acca  # where dz2 W2 goes
        for s0 in range(0, c, plan.slab):
            sc = min(plan.slab, c - s0)
            # row stride rounded up to 16 elements: every slab, the last included, has aligned rows
            # (and the epilogue one specialization for all of them)
            z2 = zbuf[: n * _round16(sc)].view(n, _round16(sc))[:, :sc]
            _mm(a_, w2[s0:s0 + sc].t(), z2, kind=kind)
            tb_, tr0, tc0 = teacher(0, n, s0, sc, None if tbuf is None else
                                    tbuf[: n * _round16(sc)].view(n, _round16(sc))[:, :sc])
            colsum2 = bool(need_b2)
            br, bc, warps = _epi_config(n, plan.slab, colsum2, dev)  # one config for every slab
            cs2 = _buffer((triton.cdiv(n, br), sc), F32, dev) if colsum2 else None
            _epilogue(wk, o, None, z2, tb_, y, None, b2, rows, None, cs2, r0=0, R=n, c0=s0, W=sc, main=False,
                      aux=True, g_ce=False, g_kd=False, g_aux=wk.g_aux, acc_logit=s0 > 0, colsum1=False,
                      colsum2=colsum2, br=br, bc=bc, warps=warps, t_row0=tr0, t_col0=tc0, w=row_weight)
            if not wk.g_aux:
                continue
            if colsum2:
                _colsum(None, cs2, None, gb2[s0:s0 + sc], triton.cdiv(n, br), sc, None, n_valid, acc=False,
                        heads=2, mean=o.mean)
            if need_w2:
                _mm(z2.t(), xs if wk.shared else as_, gw2[s0:s0 + sc], kind=kind)
            if dxa is not None:
                _mm(z2, w2[s0:s0 + sc], dxa, beta=int(s0 > 0), kind=kind)
                x_acc_started = wk.shared
    if wk.main:
        for r0 in range(0, n, plan.rows):
            rc = min(plan.rows, n - r0)
            z1 = zbuf[: rc * c].view(rc, c)
            _mm(x[r0:r0 + rc], w1.t(), z1, kind=kind)
            tb_, tr0, tc0 = (teacher(r0, rc, 0, c, tbuf[: rc * c].view(rc, c)) if (need_t and wk.t_main)
                             else (t if th is None else _f32_placeholder(dev).view(1, 0), 0, 0))
            colsum1 = bool(need_b1)
            br, bc, warps = _epi_config(plan.rows, c, colsum1, dev)  # one config for every chunk
            cs1 = _buffer((triton.cdiv(rc, br), c), F32, dev) if colsum1 else None
            _epilogue(wk, o, z1, None, tb_, y, b1, None, rows, cs1, None, r0=r0, R=rc, c0=0, W=c, main=True,
                      aux=False, g_ce=wk.g_main and bool(o.ce_w), g_kd=wk.g_main and bool(o.kd_w), g_aux=False,
                      acc_logit=False, colsum1=colsum1, colsum2=False, br=br, bc=bc, warps=warps,
                      t_row0=tr0, t_col0=tc0, w=row_weight)
            if not wk.g_main:
                continue
            if colsum1:
                _colsum(cs1, None, gb1_acc, None, triton.cdiv(rc, br), c, None, n_valid, acc=r0 > 0, heads=1,
                        mean=o.mean)
            if need_w1:
                _mm(z1.t(), xs[r0:r0 + rc], gw1, beta=int(r0 > 0), kind=kind)
            if need_x:
                _mm(z1, w1, accx[r0:r0 + rc], beta=int(x_acc_started), kind=kind)
    return [gx, gw1, gb1, ga, gw2, gb2, accx, acca, gb1_acc, gb2_acc]


def _zero(g: Tensor) -> None:
    g.zero_()
    cost.note("torch:zero_", "torch", (), 0, g.numel() * g.element_size())


def _finish_chunked(wk, o, y, n_valid, state):
    """dX (dA) from their accumulators times 1/|V| (and cast); the biases accumulated in fp32 over
    row chunks; zeros for the gradients no term reaches."""
    gx, gw1, gb1, ga, gw2, gb2, accx, acca, gb1_acc, gb2_acc = state
    need_x, need_w1, need_b1, need_a, need_w2, need_b2 = wk.need
    fed = [accx is not None, need_w1, need_b1, acca is not None, need_w2, need_b2]
    for g, acc in ((gx, accx), (ga, acca)):
        if g is not None and acc is not None:
            _scale(acc, g, y, None, n_valid, mask_rows=False, mean=o.mean, ignore_index=o.ignore_index)
    for g, acc in ((gb1, gb1_acc), (gb2, gb2_acc)):
        if g is not None and acc is not None:
            g.copy_(acc)
            cost.note("torch:copy_", "torch", (), 0, g.numel() * 6)
    for g, ok in zip((gx, gw1, gb1, ga, gw2, gb2), fed):
        if g is not None and not ok:
            _zero(g)


# ----------------------------------------------------------------------------- backward

def _backward(g, x, w1, b1, a, w2, b2, y, n_valid, state, o: _Opts, needs, c: int, plan: Plan):
    """Gradients [dx, dw1, db1, da, dw2, db2] of ``g * loss`` from the resident plan's dz (an empty
    tensor where no gradient was asked), with the engine the forward ran."""
    dev = x.device
    wk = _work(x, w1, a, x.shape[0], c, o, needs)
    shared = wk.shared
    dz1 = state[0] if wk.g_main else None
    dz2 = state[1] if wk.g_aux else None
    cs1 = state[2] if state[2].dim() == 2 else None
    cs2 = state[3] if state[3].dim() == 2 else None
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
            filled = _backward_cublas(wk, o, g, n_valid, x, w1, a, w2, y, dz1, dz2, cs1, cs2, *grads, kind, row_g)
    out = []
    for k, gr in enumerate(grads):
        if gr is None:
            out.append(_empty(dev))
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
        bm = 16 if interp else (64 if triton.cdiv(n, 128) * triton.cdiv(max(p1, p2), 128) < _sm_count(dev) else 128)
        bp = 16 if interp else 128
        flops = sum(2 * n * c * w * len(pr) for _, pr, w, _ in probs)
        nbytes = sum((n * c + c * w) * wk.elem * len(pr) + n * w * wk.elem for _, pr, w, _ in probs)
        _launch(G.dx_kernel, (triton.cdiv(n, bm) * triton.cdiv(max(p1, p2), bp), 2 if two else 1),
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
        bm, bp = (16, 16) if interp else (128, 128)
        pmax = max(h[5] for h in heads)
        flops = sum(2 * n * c * h[5] for h in heads)
        nbytes = sum((n * c + n * h[5] + c * h[5]) * wk.elem for h in heads)
        _, dza, xa, owa, oba, pa = h_a
        _, dzb, xb, owb, obb, pb = h_b
        _launch(G.dw_kernel, (triton.cdiv(c, bm) * triton.cdiv(pmax, bp), len(heads)),
                dza, dzb, xa, xb, y, owa, owb, oba if oba is not None else owa, obb if obb is not None else owb,
                g, n_valid, n, c, pa, pb, o.ignore_index,
                dza.stride(0), dzb.stride(0), xa.stride(0), xa.stride(1), xb.stride(0), xb.stride(1),
                owa.stride(0), owa.stride(1), owb.stride(0), owb.stride(1),
                name="dw_kernel", engine="triton-gemm", flops=flops, nbytes=nbytes, kind=kind,
                HEADS=which, BIAS1=oba is not None, BIAS2=obb is not None, HAS_G=True, ROW_G=row_g,
                MEAN=o.mean, DOT_PRECISION=prec, INTERP_BF16=ib, BLOCK_M=bm, BLOCK_P=bp, BLOCK_K=bk,
                GROUP_M=8, **_opts(8, 3, dev))
        for h, _, _, gw, gb, _ in heads:
            filled |= {k for k, gr in ((3 * h - 2, gw), (3 * h - 1, gb)) if gr is not None}
    return filled


def _backward_cublas(wk, o, g, n_valid, x, w1, a, w2, y, dz1, dz2, cs1, cs2, gx, gw1, gb1, ga, gw2, gb2, kind,
                     row_g=False):
    dev = x.device
    n, d, da, dt = wk.n, wk.d, wk.da, x.dtype
    shared = wk.shared
    filled = set()
    ii = o.ignore_index
    # dW = dZ^T (s X) over the valid rows: X scaled and masked once (N x D, cheap next to dZ). fp16: s X
    # would fall into fp16's subnormals (s = 1/|V|), so X is only masked (and weighted per row for
    # reduction="none"), the product is taken in fp32 and scaled before the cast
    fp16 = dt == torch.float16
    xs = as_ = None
    if (dz1 is not None and gw1 is not None) or (shared and dz2 is not None and gw2 is not None):
        xs = _buffer((n, d), dt, dev)
        _scale(x, xs, y, g if (row_g or not fp16) else None, n_valid, mask_rows=True, mean=o.mean and not fp16,
               ignore_index=ii, row_g=row_g)
    if not shared and dz2 is not None and gw2 is not None:
        as_ = _buffer((n, da), dt, dev)
        _scale(a, as_, y, g if (row_g or not fp16) else None, n_valid, mask_rows=True, mean=o.mean and not fp16,
               ignore_index=ii, row_g=row_g)
    for dz, gw, feats, k in ((dz1, gw1, xs, 1), (dz2, gw2, xs if shared else as_, 4)):
        if dz is None or gw is None:
            continue
        if fp16:
            tmp = _buffer(gw.shape, F32, dev)
            _mm(dz.t(), feats, tmp, kind=kind)
            _scale(tmp, gw, y, None if row_g else g, n_valid, mask_rows=False, mean=o.mean, ignore_index=ii)
        else:
            _mm(dz.t(), feats, gw, kind=kind)
        filled.add(k)
    # dX = s (dZ1 W1 + dZ2 W2) in an fp32 accumulator (gx itself for fp32), scaled and cast once
    pairs_x = ([(dz1, w1)] if dz1 is not None else []) + ([(dz2, w2)] if (shared and dz2 is not None) else [])
    for grad, pairs, name in ((gx, pairs_x, 0), (ga, [(dz2, w2)] if dz2 is not None else [], 3)):
        if grad is None or not pairs:
            continue
        acc = grad if wk.f32 else _buffer(grad.shape, F32, dev)
        for i, (dz, w) in enumerate(pairs):
            _mm(dz, w, acc, beta=int(i > 0), kind=kind)
        _scale(acc, grad, y, g, n_valid, mask_rows=False, mean=o.mean, ignore_index=ii, row_g=row_g)
        filled.add(name)
    h1 = dz1 is not None and gb1 is not None
    h2 = dz2 is not None and gb2 is not None
    if o.none:  # reduction="none": db = dZ^T g (the forward made no column-sum partials)
        gcol = _cast(g if row_g else g.expand(n), dt).reshape(n, 1)
        for dz, gb, k in ((dz1, gb1, 2), (dz2, gb2, 5)):
            if dz is not None and gb is not None:
                _mm(dz.t(), gcol, gb.view(-1, 1), kind=kind)
                filled.add(k)
        return filled
    if h1 or h2:
        p = cs1.shape[0] if h1 else cs2.shape[0]
        _colsum(cs1 if h1 else None, cs2 if h2 else None, gb1 if h1 else None, gb2 if h2 else None, p, wk.c,
                g, n_valid, acc=False, heads=3 if (h1 and h2) else (1 if h1 else 2), mean=o.mean)
        filled |= ({2} if h1 else set()) | ({5} if h2 else set())
    return filled


def _scale_grads(grads: List[Tensor], g: Tensor) -> None:
    """grads *= g in place (the chunked plan's backward), one launch per gradient."""
    g = g.reshape(())
    unused = torch.empty(0, dtype=torch.int64, device=g.device)  # labels / |V| slots, never read here
    for gr in grads:
        if gr.numel() == 0:
            continue
        flat = gr.view(gr.shape[0], -1) if gr.dim() > 1 else gr.view(1, -1)
        _scale(flat, flat, unused, g, unused, mask_rows=False, mean=False, ignore_index=0)


# ----------------------------------------------------------------------------- torch.library ops

def _on_device(device: torch.device):
    """Triton launches on the current CUDA device: make it the tensors' device."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _no_autocast(device: torch.device):
    if device.type == "meta":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, enabled=False)


def _opts_from(ce_w, kd_w, lg_w, kd_t, tau, kl_norm, ignore_index, mean, components, tf32, eps=0.0,
               none=False) -> _Opts:
    return _Opts(float(ce_w), float(kd_w), float(lg_w), float(kd_t), float(tau), bool(kl_norm),
                 int(ignore_index), bool(mean) and not none, bool(components), bool(tf32), float(eps), bool(none))


def _teacher_arg(t, tf, tw, tb):
    return t if t is not None else (tf, tw, tb)


def _fwd_impl(x, w1, b1, a, w2, b2, t, y, tf, tw, tb, ce_weight, kd_weight, logit_weight, kd_temperature,
              logit_temperature, kl_norm, ignore_index, mean, components, tf32, eps, none, needs):
    o = _opts_from(ce_weight, kd_weight, logit_weight, kd_temperature, logit_temperature, kl_norm,
                   ignore_index, mean, components, tf32, eps, none)
    with _no_autocast(x.device), _on_device(x.device):
        return tuple(_forward(x, w1, b1, a, w2, b2, _teacher_arg(t, tf, tw, tb), y, o, needs))


def _bwd_impl(grad, x, w1, b1, a, w2, b2, y, n_valid, state, n_classes, ce_weight, kd_weight, logit_weight,
              kd_temperature, logit_temperature, kl_norm, ignore_index, mean, tf32, eps, none, needs, plan):
    o = _opts_from(ce_weight, kd_weight, logit_weight, kd_temperature, logit_temperature, kl_norm,
                   ignore_index, mean, False, tf32, eps, none)
    with _no_autocast(x.device), _on_device(x.device):
        return _backward(grad, x, w1, b1, a, w2, b2, y, n_valid, list(state), o, needs, n_classes,
                         plan_from_list(plan))


def _scale_impl(grads, g):
    with _on_device(g.device):
        _scale_grads(grads, g)


def _regrad_impl(grads, g, x, w1, b1, a, w2, b2, t, y, tf, tw, tb, ce_weight, kd_weight, logit_weight,
                 kd_temperature, logit_temperature, kl_norm, ignore_index, mean, components, tf32, eps, none,
                 needs, plan):
    """The chunked plan with a per-row grad_output: one more pass of the forward's plan with the row
    weights folded into dz, writing the gradients into ``grads`` (the ones the forward stored)."""
    o = _opts_from(ce_weight, kd_weight, logit_weight, kd_temperature, logit_temperature, kl_norm,
                   ignore_index, mean, components, tf32, eps, none)
    with _no_autocast(x.device), _on_device(x.device):
        _forward(x, w1, b1, a, w2, b2, _teacher_arg(t, tf, tw, tb), y, o, needs,
                 row_weight=_row_weights(g, y, o.ignore_index), out_grads=list(grads), plan=plan_from_list(plan))


@torch.library.custom_op("dhkd::dual_head_kd_fwd", mutates_args=())
def _fwd_op(x: Tensor, w1: Tensor, b1: Optional[Tensor], a: Optional[Tensor], w2: Tensor,
            b2: Optional[Tensor], t: Optional[Tensor], y: Tensor, tf: Optional[Tensor], tw: Optional[Tensor],
            tb: Optional[Tensor], ce_weight: float, kd_weight: float, logit_weight: float, kd_temperature: float,
            logit_temperature: float, kl_norm: bool, ignore_index: int, mean: bool, components: bool,
            tf32: bool, eps: float, none: bool, needs: List[bool]
            ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _fwd_impl(x, w1, b1, a, w2, b2, t, y, tf, tw, tb, ce_weight, kd_weight, logit_weight, kd_temperature,
                     logit_temperature, kl_norm, ignore_index, mean, components, tf32, eps, none, needs)


@_fwd_op.register_fake
def _fwd_fake(x, w1, b1, a, w2, b2, t, y, tf, tw, tb, ce_weight, kd_weight, logit_weight, kd_temperature,
              logit_temperature, kl_norm, ignore_index, mean, components, tf32, eps, none, needs):
    o = _opts_from(ce_weight, kd_weight, logit_weight, kd_temperature, logit_temperature, kl_norm,
                   ignore_index, mean, components, tf32, eps, none)
    n, c = y.shape[0], w1.shape[0]
    wk = _work(x, w1, a, n, c, o, needs, _teacher_arg(t, tf, tw, tb))
    plan = make_plan(wk, x.device)
    e = x.new_empty((0,), dtype=F32)
    if o.none:
        head = [x.new_empty((n,), dtype=F32), x.new_empty((3, n), dtype=F32), x.new_empty((n,), dtype=torch.bool),
                x.new_empty((), dtype=torch.int64)]
    else:
        head = [x.new_empty((), dtype=F32), x.new_empty((3,), dtype=F32), x.new_empty((), dtype=torch.int64),
                x.new_empty((), dtype=torch.int64)]
    if plan.resident:
        if n == 0 or not (wk.main or wk.aux):
            return tuple(head + [e.clone() for _ in range(6)])
        colsum1 = plan.engine == "cublas" and wk.need[2] and not o.none
        colsum2 = plan.engine == "cublas" and wk.need[5] and not o.none
        p = triton.cdiv(n, _epi_config(n, c, colsum1 or colsum2, x.device)[0])
        state = [x.new_empty((n, c)) if wk.g_main else e.clone(),
                 x.new_empty((n, c)) if wk.g_aux else e.clone(),
                 x.new_empty((p, c), dtype=F32) if colsum1 else e.clone(),
                 x.new_empty((p, c), dtype=F32) if colsum2 else e.clone(), e.clone(), e.clone()]
    else:
        refs = (x, w1, b1, a, w2, b2)
        state = [r.new_empty(r.shape) if (need and r is not None) else e.clone() for r, need in zip(refs, needs)]
    return tuple(head + state)


@torch.library.custom_op("dhkd::dual_head_kd_bwd", mutates_args=())
def _bwd_op(grad: Tensor, x: Tensor, w1: Tensor, b1: Optional[Tensor], a: Optional[Tensor], w2: Tensor,
            b2: Optional[Tensor], y: Tensor, n_valid: Tensor, state: List[Tensor], n_classes: int,
            ce_weight: float, kd_weight: float, logit_weight: float, kd_temperature: float,
            logit_temperature: float, kl_norm: bool, ignore_index: int, mean: bool, tf32: bool, eps: float,
            none: bool, needs: List[bool], plan: List[int]) -> List[Tensor]:
    return _bwd_impl(grad, x, w1, b1, a, w2, b2, y, n_valid, state, n_classes, ce_weight, kd_weight,
                     logit_weight, kd_temperature, logit_temperature, kl_norm, ignore_index, mean, tf32, eps,
                     none, needs, plan)


@_bwd_op.register_fake
def _bwd_fake(grad, x, w1, b1, a, w2, b2, y, n_valid, state, n_classes, *scalars_and_needs):
    needs = scalars_and_needs[-2]
    refs = (x, w1, b1, None if a is None else a, w2, b2)
    return [r.new_empty(r.shape) if (need and r is not None) else x.new_empty((0,), dtype=F32)
            for r, need in zip(refs, needs)]


@torch.library.custom_op("dhkd::scale_", mutates_args=("grads",))
def _scale_op(grads: List[Tensor], g: Tensor) -> None:
    _scale_impl(grads, g)


@_scale_op.register_fake
def _scale_fake(grads, g):
    return None


@torch.library.custom_op("dhkd::regrad_", mutates_args=("grads",))
def _regrad_op(grads: List[Tensor], g: Tensor, x: Tensor, w1: Tensor, b1: Optional[Tensor], a: Optional[Tensor],
               w2: Tensor, b2: Optional[Tensor], t: Optional[Tensor], y: Tensor, tf: Optional[Tensor],
               tw: Optional[Tensor], tb: Optional[Tensor], ce_weight: float, kd_weight: float,
               logit_weight: float, kd_temperature: float, logit_temperature: float, kl_norm: bool,
               ignore_index: int, mean: bool, components: bool, tf32: bool, eps: float, none: bool,
               needs: List[bool], plan: List[int]) -> None:
    _regrad_impl(grads, g, x, w1, b1, a, w2, b2, t, y, tf, tw, tb, ce_weight, kd_weight, logit_weight,
                 kd_temperature, logit_temperature, kl_norm, ignore_index, mean, components, tf32, eps, none,
                 needs, plan)


@_regrad_op.register_fake
def _regrad_fake(grads, g, *args):
    return None


# The custom ops run their fake implementation on ``meta`` tensors; ``simulate`` swaps in the real
# implementations (same host code, launches recorded instead of run) through this table.
_OPS = {"bwd": _bwd_op, "scale": _scale_op, "regrad": _regrad_op}

_DOUBLE_BACKWARD = ("fused_dual_head_kd_loss (backend='{}') has no second derivative: its backward ran with "
                    "create_graph=True (double backward, e.g. a gradient penalty). Use backend='reference' "
                    "(plain PyTorch autograd) for higher-order gradients.")

_N_FWD_ARGS = 24  # tensors (11), scalars (12), needs


def _setup_context(ctx, inputs, output):
    x, w1, b1, a, w2, b2, t, y, tf, tw, tb = inputs[:11]
    scalars = inputs[11:23]
    needs = inputs[23]
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)  # no zero-filled gradients for the non-differentiable outputs
    o = _opts_from(*scalars)
    wk = _work(x, w1, a, y.shape[0], w1.shape[0], o, needs, _teacher_arg(t, tf, tw, tb))
    plan = make_plan(wk, x.device)  # what the forward just ran (same inputs, same settings)
    ctx.resident = plan.resident
    ctx.plan = plan_to_list(plan)
    ctx.n_classes = w1.shape[0]
    ctx.none = o.none
    if ctx.resident or not o.none:
        ctx.save_for_backward(x, w1, b1, a, w2, b2, y, output[3], *output[4:10])
    else:  # a per-row grad_output of the chunked plan recomputes from the inputs
        ctx.save_for_backward(x, w1, b1, a, w2, b2, y, output[3], *output[4:10], t, tf, tw, tb)
    # scalars for the backward op (everything but return_components) and the recompute (all)
    ctx.opts = tuple(scalars[:8]) + tuple(scalars[9:12])
    ctx.all_opts = tuple(scalars)
    ctx.needs = list(needs)


def _autograd_backward(ctx, g, *_unused):
    if torch.is_grad_enabled():
        raise RuntimeError(_DOUBLE_BACKWARD.format("triton"))
    if not ctx.resident and getattr(ctx, "consumed", False):
        from .chunked import SECOND_BACKWARD
        raise RuntimeError(SECOND_BACKWARD.format("triton") + " (the chunked plan of large problems)")
    saved = ctx.saved_tensors
    x, w1, b1, a, w2, b2, y, n_valid = saved[:8]
    state = list(saved[8:14])
    if g is None:  # the loss itself got no gradient: zero gradients
        g = torch.zeros((), dtype=F32, device=x.device)
        cost.note("torch:zeros", "torch", (), 0, 4)
    needs = ctx.needs
    if ctx.resident:
        grads = _OPS["bwd"](g, x, w1, b1, a, w2, b2, y, n_valid, state, ctx.n_classes, *ctx.opts, needs, ctx.plan)
    else:
        # the chunked plan's gradients were computed in the forward: scaled in place, once, by a scalar
        # grad_output (or the expanded scalar of .sum()); a per-row one recomputes them with its weights
        ctx.consumed = True
        grads = state
        live = [gr for gr, need in zip(grads, needs) if need and gr.numel()]
        g0, per_row = _grad_output(g)
        if per_row:
            t, tf, tw, tb = saved[14:18]
            _OPS["regrad"](grads, g0, x, w1, b1, a, w2, b2, t, y, tf, tw, tb, *ctx.all_opts, needs, ctx.plan)
        else:
            _OPS["scale"](live, g0.to(F32))
    out = [gr if need else None for gr, need in zip(grads, needs)]
    return tuple(out) + (None,) * (_N_FWD_ARGS - 6)


_fwd_op.register_autograd(_autograd_backward, setup_context=_setup_context)


class _DirectFn(torch.autograd.Function):
    """The custom op's autograd without its dispatch (``simulate`` on meta tensors only)."""

    @staticmethod
    def forward(ctx, *inputs):
        out = _fwd_impl(*inputs)
        _setup_context(ctx, inputs, out)
        return out

    @staticmethod
    def backward(ctx, g, *unused):
        return _autograd_backward(ctx, g, *unused)


@contextlib.contextmanager
def _direct():
    saved = dict(_OPS)
    _OPS.update(bwd=_bwd_impl, scale=_scale_impl, regrad=_regrad_impl, fwd=_DirectFn.apply)
    try:
        yield
    finally:
        _OPS.clear()
        _OPS.update(saved)


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
    if device_type == "meta":
        return None
    try:
        if torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
        return None
    except (TypeError, AttributeError):  # older signatures
        if device_type == "cuda" and torch.is_autocast_enabled():
            return torch.get_autocast_gpu_dtype()
        return None


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


def operand_dtype(mats, device_type: str) -> torch.dtype:
    """The one dtype of the matmul operands: autocast's under autocast, else their promoted dtype."""
    cdt = _autocast_dtype(device_type)
    if cdt is None:
        cdt = mats[0].dtype
        for m in mats[1:]:
            cdt = torch.promote_types(cdt, m.dtype)
    return cdt


def dual_head_kd_loss(features, head_weight, head_bias, aux_weight, aux_bias, teacher_logits, labels, *,
                      aux_features, ce_weight, kd_weight, logit_weight, kd_temperature, logit_temperature,
                      logit_loss, ignore_index, reduction, return_components, label_smoothing=0.0):
    """Run the Triton path; returns (loss, terms, correct, n_valid). Inputs must be validated.
    ``teacher_logits`` is the (N, C) tensor or a ``TeacherHead`` (its product runs inside).

    Raises TypeError for float64 features/weights/biases (use backend="torch" for float64).
    """
    from . import TeacherHead
    operands = {"features": features, "head_weight": head_weight, "head_bias": head_bias,
                "aux_weight": aux_weight, "aux_bias": aux_bias, "aux_features": aux_features}
    for name, v in operands.items():
        if v is not None and v.dtype == torch.float64:
            raise TypeError(f"backend='triton' supports float32/bfloat16/float16 {name}, got float64; "
                            "use backend='torch' (or 'auto') for float64")
    mats = [features, head_weight, aux_weight] + ([aux_features] if aux_features is not None else [])
    cdt = operand_dtype(mats, features.device.type)
    if cdt not in _OPERAND_DTYPES:
        raise TypeError(f"backend='triton' cannot run matmuls in {cdt}")
    x, w1, w2 = (_cast(m, cdt) for m in (features, head_weight, aux_weight))
    a = None if aux_features is None else _cast(aux_features, cdt)
    t = tf = tw = tb = None
    if isinstance(teacher_logits, TeacherHead):
        tdt = operand_dtype([teacher_logits.features, teacher_logits.weight], features.device.type)
        if tdt not in _OPERAND_DTYPES:
            tdt = cdt  # a float64 teacher head is computed in the student's operand dtype
        tf, tw = _cast(teacher_logits.features, tdt), _cast(teacher_logits.weight, tdt)
        tb = None if teacher_logits.bias is None else _contiguous(_cast(teacher_logits.bias, tdt))
    else:
        t = teacher_logits
    # the kernels index labels and biases with unit stride: strided or expanded views are copied
    # (N + 2C elements); gradients reach the original views through autograd
    labels = _contiguous(labels)
    head_bias = None if head_bias is None else _contiguous(head_bias)
    aux_bias = None if aux_bias is None else _contiguous(aux_bias)
    grad_on = torch.is_grad_enabled()
    needs = [grad_on and v is not None and v.requires_grad for v in (x, w1, head_bias, a, w2, aux_bias)]
    out = _OPS.get("fwd", _fwd_op)(
        x, w1, head_bias, a, w2, aux_bias, t, labels, tf, tw, tb, float(ce_weight), float(kd_weight),
        float(logit_weight), float(kd_temperature), float(logit_temperature), logit_loss == "binary_kl_norm",
        int(ignore_index), reduction == "mean", bool(return_components), _TF32_OVERRIDE or _tf32_enabled(),
        float(label_smoothing), reduction == "none", needs)
    loss, terms, correct, n_valid = out[:4]
    return loss, terms.detach(), correct, n_valid


# ----------------------------------------------------------------------------- simulation

@contextlib.contextmanager
def _tf32(enabled: bool):
    global _TF32_OVERRIDE
    saved, _TF32_OVERRIDE = _TF32_OVERRIDE, (enabled or None)
    try:
        yield
    finally:
        _TF32_OVERRIDE = saved


_TF32_OVERRIDE = None


def simulate(n: int, d: int, c: int, *, dtype: str = "bf16", da: Optional[int] = None, bias: bool = True,
             backward: bool = True, requires_grad=None, device: str = "meta", teacher_width: Optional[int] = None,
             **opts):
    """Run the real host code of one ``fused_dual_head_kd_loss(..., backend="triton")`` forward
    (+ backward) on ``meta`` tensors: nothing is computed, every launch is recorded. Returns
    (cost.Record, Plan). ``requires_grad``: the inputs that ask for gradients (default all of
    them when ``backward``); ``teacher_width`` D_t: the teacher as features + head instead of logits.
    Loss options default to all three terms on (the benchmarks' CE + KD + BinaryKL-Norm); ``dtype``
    "tf32" is fp32 with TF32 matmuls. With reduction="none" the backward is that of ``.sum()``."""
    from ..functional import fused_dual_head_kd_loss
    dt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "tf32": torch.float32}[dtype]
    dev = torch.device(device)
    names = ("features", "head_weight", "head_bias", "aux_features", "aux_weight", "aux_bias")
    if requires_grad is None:
        requires_grad = names if backward else ()
    shapes = dict(features=(n, d), head_weight=(c, d), head_bias=(c,), aux_features=(n, da or d),
                  aux_weight=(c, d if da is None else da), aux_bias=(c,))
    leaves = {k: torch.empty(*shapes[k], dtype=dt, device=dev).requires_grad_(k in requires_grad) for k in names}
    if da is None:
        leaves["aux_features"] = None
    if not bias:
        leaves["head_bias"] = leaves["aux_bias"] = None
    head = {}
    t = torch.empty(n, c, dtype=dt, device=dev)
    if teacher_width:
        t = None
        head = dict(teacher_features=torch.empty(n, teacher_width, dtype=dt, device=dev),
                    teacher_weight=torch.empty(c, teacher_width, dtype=dt, device=dev),
                    teacher_bias=torch.empty(c, dtype=dt, device=dev) if bias else None)
    y = torch.empty(n, dtype=torch.int64, device=dev)
    kw = dict(ce_weight=1.0, kd_weight=1.0, logit_weight=1.0, kd_temperature=4.0, logit_temperature=2.0,
              logit_loss="binary_kl_norm", ignore_index=-100, reduction="mean", return_components=False)
    kw.update(opts)
    o = _opts_from(kw["ce_weight"], kw["kd_weight"], kw["logit_weight"], kw["kd_temperature"],
                   kw["logit_temperature"], kw["logit_loss"] == "binary_kl_norm", kw["ignore_index"],
                   kw["reduction"] == "mean", kw["return_components"], dtype == "tf32",
                   kw.get("label_smoothing", 0.0), kw["reduction"] == "none")
    x, a = leaves["features"], leaves["aux_features"]
    needs = [backward and v is not None and v.requires_grad for v in
             (x, leaves["head_weight"], leaves["head_bias"], a, leaves["aux_weight"], leaves["aux_bias"])]
    teacher = t if t is not None else (head["teacher_features"], head["teacher_weight"], head["teacher_bias"])
    plan = make_plan(_work(x, leaves["head_weight"], a, n, c, o, needs, teacher), dev)
    with cost.record() as rec, torch.set_grad_enabled(backward), _direct(), _tf32(dtype == "tf32"):
        loss = fused_dual_head_kd_loss(x, leaves["head_weight"], leaves["head_bias"], leaves["aux_weight"],
                                       leaves["aux_bias"], t, y, aux_features=a, backend="triton", **head, **kw)
        if isinstance(loss, tuple):
            loss = loss[0]
        if backward and loss.requires_grad:
            (loss.sum() if loss.dim() else loss).backward()
    return rec, plan
