"""The plan of one call of the Triton backend: which engine, resident or chunked, and how large the
chunks are, decided from shapes, dtypes and flags only (never from data), within the memory budget.

* *resident*: both heads' logits (and the backward's buffers) fit the budget; the forward stores the
  logits whole, the epilogue writes dz over them, dz waits for the backward. Engine "triton" (matmul
  work below ``TRITON_MAX_FLOPS``, tensor cores): 5 launches; engine "cublas": the six products on
  cuBLAS.
* *chunked*: the logits do not fit; always cuBLAS, the auxiliary head in class slabs over all rows and
  the main head in row chunks (mode "slabs"), or both heads in row chunks when a teacher head feeds both
  (mode "rows").

Memory bound: ``plan.extra_bytes`` (extra device memory beyond inputs and their gradients) is at most
the budget (``set_memory_budget``, env ``DHKD_MEMORY_BUDGET_MB``, 512 MiB by default), except when even
the smallest chunk does not fit it (then extra_bytes says so).
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import List, NamedTuple, Optional, Tuple

import torch

from .._validation import env_choice, env_memory_budget_bytes

F32 = torch.float32

MEMORY_BUDGET_BYTES = env_memory_budget_bytes("DHKD_MEMORY_BUDGET_MB", 512)
TRITON_MAX_FLOPS = 128e9  # see docs/kernels.md: the cuBLAS plan's launches and copies against Triton's GEMM efficiency
_ENGINE = env_choice("DHKD_ENGINE", ("auto", "triton", "cublas"), "auto")

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


@contextlib.contextmanager
def settings(*, engine: Optional[str] = None, memory_budget: Optional[int] = None):
    """Temporarily force the engine and/or the memory budget (bytes), as ``set_engine`` and
    ``set_memory_budget`` would; restored on exit (tests, benchmarks)."""
    global _ENGINE, MEMORY_BUDGET_BYTES
    saved = _ENGINE, MEMORY_BUDGET_BYTES
    try:
        if engine is not None:
            set_engine(engine)
        if memory_budget is not None:
            set_memory_budget(memory_budget)
        yield
    finally:
        _ENGINE, MEMORY_BUDGET_BYTES = saved


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


def _kind(dtype: torch.dtype, tf32: bool) -> str:
    if dtype == torch.float32:
        return "tf32" if tf32 else "fp32"
    return "bf16" if dtype == torch.bfloat16 else "fp16"


LD_ALIGN = 64  # the logits/dz buffers' row stride, in elements: aligned for cuBLAS, TMA and 128-bit loads


def _ld(c: int) -> int:
    """Row stride of a logits/dz buffer of ``c`` classes: c rounded up to a multiple of ``LD_ALIGN``."""
    return -(-c // LD_ALIGN) * LD_ALIGN


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) in plain Python (``triton.cdiv`` goes through Triton's JIT machinery on the host)."""
    return -(-a // b)


def _pow2(v: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, 1 << (max(int(v), 1) - 1).bit_length()))


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
    # resident cuBLAS with bias gradients: the row parts of grad_kernel, whose class-tiled gradient pass
    # sums dz's columns (0: the epilogue writes dz and each bias gradient is a product dZ^T 1)
    bias_parts: int = 0

    def describe(self) -> str:
        if self.resident:
            return f"resident/{self.engine}"
        if self.mode == "rows":
            return f"chunked/cublas (both heads in rows of {self.rows})"
        return f"chunked/cublas (rows {self.rows}, slab {self.slab})"


class Work(NamedTuple):
    """What a call computes: the terms (stats), the gradients, and the shapes (a NamedTuple: built on
    every call, hashed as the plan cache's key)."""

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
    t_head: bool = False  # the teacher comes as features + head (D_t may be 0: logits = its bias)

    @property
    def t_main(self) -> bool:
        """The main head's epilogue reads the teacher (KD)."""
        return self.main and self.kd_stats

    @property
    def teacher_product(self) -> bool:
        return self.t_head and (self.t_main or self.aux)

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


def kd_scale(c: int) -> float:
    """2^-ceil(log2 C): the epilogue's KD log-ratio sums over C classes are kept times this, so that
    they stay finite wherever the loss is (a sum of C terms, each bounded by the loss's own range)."""
    return 2.0 ** -max(0, (c - 1).bit_length())


def plan_to_list(plan: Plan) -> List[int]:
    """The plan as ints, to travel with the autograd context into the backward ops (the backward must
    run the forward's plan whatever the settings are by then)."""
    return [int(plan.resident), int(plan.engine == "cublas"), plan.rows, plan.slab, int(plan.mode == "rows"),
            plan.extra_bytes, plan.bias_parts]


def plan_from_list(v) -> Plan:
    key = tuple(int(x) for x in v)
    plan = _FROM_LIST.get(key)
    if plan is None:
        if len(_FROM_LIST) >= _PLAN_CACHE_SIZE:
            _FROM_LIST.clear()
        plan = _FROM_LIST[key] = Plan("cublas" if v[1] else "triton", bool(v[0]), int(v[2]), int(v[3]), int(v[5]),
                                      mode="rows" if v[4] else "slabs", bias_parts=int(v[6]) if len(v) > 6 else 0)
    return plan


_FROM_LIST: dict = {}


def _epi_config(r: int, w: int, elem: int, device) -> Tuple[int, int, int]:
    """(BLOCK_R, BLOCK_C, warps) of ``epilogue_kernel`` over a block of r rows x w classes of ``elem``-byte
    logits: tiles of 16 bytes of logits per thread (one 128-bit load per thread and tile; the lane-wise
    statistics of the heaviest variant, CE + KD + logit gradients, stay in registers) over 4 warps for
    16-bit logits (1024 elements) and 8 for fp32 (1024), and rows per program chosen for at least 16
    warps' worth of programs per SM while r allows (one row per program at the least): 4-warp programs
    keep 16 warps on an SM even at the 160 registers triton 3.6 gives some 16-bit variants, where 8-warp
    ones would fit one program."""
    if _interpreted(device):  # small tiles exercise the tails; wide rows take wider ones (numpy per step)
        return 4, (16 if w <= 1024 else 4096), 1
    warps = 4 if elem <= 2 else 8  # fp32: 4-warp programs spill 8-16 bytes at an odd C (both Tritons)
    tile = warps * 32 * 16 // elem
    br = _pow2(r // (8 // warps * 2 * _sm_count(device)), 1, 16)
    bc = min(_pow2(w, 16, 1024), max(64, tile // br))
    return br, bc, max(2, min(warps, br * bc * elem // 512))  # 16 bytes of logits per thread


def _grad_config(n: int, c: int, device) -> Tuple[int, int, int, int]:
    """(BLOCK_R, BLOCK_C, warps, rows per part) of ``grad_kernel`` over n rows x c classes: 16 x 64 tiles
    over 4 warps (8 classes of a row per thread: 128-bit accesses of 16-bit logits), and the rows split
    into parts until the grid holds 4 programs per SM (16 warps hide the memory latency) or a part is
    one row block; the interpreter takes 4 x 16 tiles (tails)."""
    br, bc, warps = (4, 16, 1) if _interpreted(device) else (16, 64, 4)
    tiles = cdiv(_ld(c), bc)
    parts = max(1, min(cdiv(n, br), cdiv(4 * _sm_count(device), tiles)))
    rows = cdiv(cdiv(n, parts), br) * br
    return br, bc, warps, rows


def grad_parts(n: int, c: int, device) -> int:
    """The row parts of ``grad_kernel`` (its grid's second axis) over n rows x c classes."""
    return cdiv(n, _grad_config(n, c, device)[3]) if n else 0


LOGITS_TILES = ((64, 128), (64, 64), (64, 32))   # (BLOCK_M, BLOCK_N): 4 warps, one warpgroup
DX_TILES = ((128, 128), (64, 128), (64, 64), (64, 32))
DW_TILES = ((128, 128), (128, 64), (64, 64), (64, 32))


def _gemm_tiles(m: int, p: int, copies: int, device, tiles) -> Tuple[int, int]:
    """The largest output tile of ``tiles`` (largest first) that still gives every SM a program: one full
    wave at least, where the problem allows it (else the tile with the most programs). ``copies``:
    problems sharing the grid (the second grid axis)."""
    sms = _sm_count(device)
    for bm, bp in tiles:
        if cdiv(m, bm) * cdiv(p, bp) * copies >= sms:
            return bm, bp
    return tiles[-1]


def _cublas_grad_bytes(wk: Work) -> int:
    """The cuBLAS products' gradient buffers: the masked, scaled features for dW (N D elem, and N D_a
    elem for separate auxiliary features), fp32 dX accumulators for 16-bit inputs, and per head with a
    bias an fp32 column sum dZ^T 1 (4 C) with its column of ones (N elem). (need_b* implies that head's
    gradient.)"""
    n, c, d, da, e = wk.n, wk.c, wk.d, wk.da, wk.elem
    need_x, need_w1, need_b1, need_a, need_w2, need_b2 = wk.need
    total = (4 * c + n * e) * (int(need_b1) + int(need_b2))
    if (wk.g_main and need_w1) or (wk.shared and wk.g_aux and need_w2):
        total += n * d * e
    if not wk.shared and wk.g_aux and need_w2:
        total += n * da * e
    if not wk.f32:
        total += 4 * (n * d * int(need_x) + n * da * int(need_a and not wk.shared))
    return total


def _resident_bytes(wk: Work, engine: str, device) -> int:
    n, c, d, da, e = wk.n, wk.c, wk.d, wk.da, wk.elem
    need_x, need_w1, need_b1, need_a, need_w2, need_b2 = wk.need
    total = n * _ld(c) * (e * (int(wk.main) + int(wk.aux)) + wk.t_elem * int(wk.teacher_product)) + 5 * n * 4
    if engine == "cublas" and wk.grad:
        total += _cublas_grad_bytes(wk)
        if wk.fp16:
            total += 4 * c * max(d * int(need_w1), da * int(need_w2))  # fp16: the fp32 dW of one head
    return total


def _balanced(total: int, most: int, granule: int) -> int:
    """The chunk size, at most ``most``, that splits ``total`` into as few chunks as ``most`` does but
    of nearly equal sizes (rounded up to ``granule``): the last chunk fills the GPU like the others."""
    if most >= total:
        return most
    return min(most, cdiv(cdiv(total, cdiv(total, most)), granule) * granule)


def make_plan(wk: Work, device: torch.device) -> Plan:
    """The plan of one call: resident when its buffers fit the budget (engine by the size rule),
    otherwise chunked on cuBLAS with the largest chunks the budget allows."""
    budget = MEMORY_BUDGET_BYTES
    if _ENGINE != "auto":
        engine = _ENGINE
    else:
        # Triton GEMMs only on tensor cores (16-bit, or fp32 with TF32): IEEE fp32 goes to cuBLAS
        engine = "triton" if (wk.flops() < TRITON_MAX_FLOPS and wk.tensor_cores) else "cublas"
    if min(wk.d, wk.da) == 0 and (wk.need[2] or wk.need[5]):
        # a head with no features: dw_kernel has no feature tile to store its bias gradient from
        engine = "cublas"
    need = _resident_bytes(wk, engine, device)
    if need <= budget or (wk.n * wk.c) == 0:
        parts = 0
        if engine == "cublas" and wk.n > 0 and (wk.need[2] or wk.need[5]) and not wk.none:
            # bias sums from grad_kernel's partials instead of dZ^T 1 (its fp32 sum and column of ones),
            # and the rows' statistics it reads
            parts = grad_parts(wk.n, wk.c, device)
            tiles = cdiv(_ld(wk.c), _grad_config(wk.n, wk.c, device)[1])
            need += 8 * parts * _ld(wk.c) + 32 * wk.n + 4 * parts * tiles \
                - (4 * wk.c + wk.n * wk.elem) * (int(wk.need[2]) + int(wk.need[5]))
        return Plan(engine, True, wk.n, wk.c, need, bias_parts=parts)
    n, c, e = wk.n, wk.c, wk.elem
    th, te = wk.t_head, wk.t_elem
    rows_mode = th and wk.t_main and wk.aux
    fixed = 5 * n * 4 + 16 + (_cublas_grad_bytes(wk) if wk.grad else 0)
    room = max(budget - fixed, 0)
    granule_r, granule_c = (4, 16) if _interpreted(device) else (64, 128)
    if rows_mode:
        # the main head needs the teacher too: both heads in row chunks, so that the teacher's product
        # runs once (dW2 then accumulates over chunks like dW1)
        per_row = _ld(c) * (2 * e + te)
        rows = _balanced(n, min(n, max(granule_r, room // per_row // granule_r * granule_r)), granule_r)
        return Plan("cublas", False, rows, c, fixed + rows * per_row, mode="rows")
    # class slabs of the aux head: its logits and (teacher head) the teacher's block, n x slab each
    per_col = n * (e + te * int(th))
    slab = _balanced(c, min(c, max(granule_c, room // max(per_col, 1) // granule_c * granule_c)), granule_c) \
        if wk.aux else c
    slab_z = n * _ld(slab) * e * int(wk.aux)
    slab_t = n * _ld(slab) * te * int(th and wk.aux)
    # row chunks of the main head share the logits buffer; a teacher block only with the aux head off
    per_row_z, per_row_t = _ld(c) * e, _ld(c) * te * int(th and wk.t_main)
    if wk.main:
        # the buffers are allocated once: the rows must fit beside the slab phase's teacher buffer
        room_rows = max(room - max(slab_t, 0), 0) if not wk.t_main else room
        rows = _balanced(n, min(n, max(granule_r, room_rows // max(per_row_z + per_row_t, 1) // granule_r * granule_r)),
                         granule_r)
    else:
        rows = n
    zbuf = max(rows * per_row_z * int(wk.main), slab_z)
    tbuf = max(rows * per_row_t * int(wk.main), slab_t)
    return Plan("cublas", False, rows, slab, fixed + zbuf + tbuf)


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
    # the LLM options: the softmax term's divergence (0 forward KL, 1 reverse KL, 2 generalised JSD
    # with beta strictly inside (0, 1): its end points are the two KLs), the student's and the teacher's
    # softcaps (0: off) and the z-loss weight
    div: int = 0
    beta: float = 0.5
    cap: float = 0.0
    tcap: float = 0.0
    zl_w: float = 0.0
    shard: object = None  # the sharded form's VocabShard (eager calls only)


def _work(x, w1, a, n: int, c: int, o: _Opts, needs, teacher=None) -> Work:
    shared = a is None
    need_x, need_w1, need_b1, need_a, need_w2, need_b2 = (bool(v) for v in needs)
    if shared:
        need_a = False
    main = bool(o.ce_w) or bool(o.kd_w) or bool(o.zl_w) or o.components
    aux = bool(o.lg_w) or o.components
    g_main = (bool(o.ce_w) or bool(o.kd_w) or bool(o.zl_w)) and (need_x or need_w1 or need_b1)
    g_aux = bool(o.lg_w) and ((need_x and shared) or need_a or need_w2 or need_b2)
    th = isinstance(teacher, (tuple, list))
    return Work(n, c, x.shape[1], (x if shared else a).shape[1], x.element_size(), shared, main,
                bool(o.kd_w) or o.components, aux, g_main, g_aux,
                (need_x, need_w1 and g_main, need_b1 and g_main, need_a, need_w2 and g_aux, need_b2 and g_aux),
                x.dtype == F32, x.dtype != F32 or o.tf32,
                teacher[1].shape[1] if th else 0, teacher[0].element_size() if th else 2, x.dtype == torch.float16,
                o.none, th)


def _opts_from(ce_w, kd_w, lg_w, kd_t, tau, kl_norm, ignore_index, mean, components, tf32, eps=0.0,
               none=False, extra=()) -> _Opts:
    """``extra``: () or the LLM options as numbers (div, beta, cap, tcap, zl_w), see :func:`llm_extra`."""
    div, beta, cap, tcap, zl_w = (tuple(extra) or (0, 0.5, 0.0, 0.0, 0.0))
    return _Opts(float(ce_w), float(kd_w), float(lg_w), float(kd_t), float(tau), bool(kl_norm),
                 int(ignore_index), bool(mean) and not none, bool(components), bool(tf32), float(eps), bool(none),
                 int(div), float(beta), float(cap), float(tcap), float(zl_w))


DIVERGENCES = {"forward_kl": 0, "reverse_kl": 1, "jsd": 2}


def llm_extra(kd_divergence: str = "forward_kl", jsd_beta: float = 0.5, softcap=None, teacher_softcap=None,
              z_loss_weight: float = 0.0) -> tuple:
    """The LLM options as the op's numbers (div, beta, cap, tcap, zl_w), () at their defaults (the
    default path's options and plan keys stay what they were). The generalised JSD's end points are the
    two KLs (beta = 0: forward, 1: reverse), as in the reference."""
    div = DIVERGENCES[kd_divergence]
    if div == 2 and jsd_beta in (0.0, 1.0):
        div = 1 if jsd_beta == 1.0 else 0
    out = (div, float(jsd_beta) if div == 2 else 0.5, float(softcap or 0.0), float(teacher_softcap or 0.0),
           float(z_loss_weight))
    return () if out == (0, 0.5, 0.0, 0.0, 0.0) else out


_OPTS: dict = {}


def opts_cached(*scalars) -> _Opts:
    """``_opts_from`` memoized on its scalars, for the op's implementations (called three to four times
    a step with the same values; not for code torch.compile traces)."""
    if len(scalars) > 12 and isinstance(scalars[12], list):  # the custom op's List[float]
        scalars = scalars[:12] + (tuple(scalars[12]),)
    o = _OPTS.get(scalars)
    if o is None:
        if len(_OPTS) >= _PLAN_CACHE_SIZE:
            _OPTS.clear()
        o = _OPTS[scalars] = _opts_from(*scalars)
    return o



_PLAN_CACHE: dict = {}
_PLAN_CACHE_SIZE = 512


def plan_for(wk: Work, device: torch.device) -> Plan:
    """``make_plan`` through a cache keyed by everything the plan depends on: the work (shapes, dtypes,
    terms, gradients), the device kind and its SM count, the engine setting and the memory budget.
    A changed shape, flag or setting is a new key; it never reuses another call's plan."""
    key = (wk, device.type, _sm_count(device), _ENGINE, MEMORY_BUDGET_BYTES)
    plan = _PLAN_CACHE.get(key)
    if plan is None:
        if len(_PLAN_CACHE) >= _PLAN_CACHE_SIZE:
            _PLAN_CACHE.clear()
        plan = _PLAN_CACHE[key] = make_plan(wk, device)
    return plan
