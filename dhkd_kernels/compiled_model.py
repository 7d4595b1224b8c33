"""The cost model read from the compiled kernels (model v2): each Triton launch is costed from what
sm_90 compiles for its exact specialization, not from assumed efficiencies alone.

Facts per specialization (``compiled/sm90-triton-<version>.json``, written by
``python -m dhkd_kernels compile-report --facts``): registers, shared memory, warps, whether every dot
loop is pipelined (operands from asynchronous copies, no full wait inside the loop), and the SASS
instruction count of each loop body. Per launch, with P programs on an H200 (132 SMs, 4 warp
schedulers each, 1.98 GHz):

    occupancy   = programs per SM from registers (64K per SM), shared memory (227 KiB), 64 warps
    fill        = min(1, P / SMs)                            (a partial wave leaves SMs idle)
    latency     = min(1, resident warps per SM / 16)         (too few warps cannot hide memory latency;
                                                              1 for a pipelined GEMM: its copies do)
    t_tensor    = FLOPs / (peak x (0.65 pipelined | 0.35 not) x fill)
    t_memory    = bytes / (HBM x 0.80 x fill x latency)
    t_issue     = P x warps x sum(loop body x trips) / (4 x clock x SMs x fill x latency)
    t           = 3 us + max(t_tensor, t_memory, t_issue)

cuBLAS products keep the roofline of model v1 at 80% of peak when every operand's leading dimension is
a multiple of 16 bytes, and 30% when one is not (no TMA/wgmma kernels: cuBLAS ran the three
imagenet21k-sized products with ld = 43682 in 4.2 ms on an H100 against about 1.4 ms at full
efficiency, 2026-11-26). The fractions are assumptions until ``benchmarks/gpu_check.py`` measures them;
host overhead is measured separately (``python -m dhkd_kernels host-overhead``), never added here.
"""
from __future__ import annotations

import json
import os
from typing import Dict, Optional

from .cost import GPUS, LAUNCH_S, MEM_EFF, Launch, Record

SM = {"H100": dict(sms=132, clock=1.98e9), "H200": dict(sms=132, clock=1.98e9)}
REGS_PER_SM = 65536
SMEM_PER_SM = 227 * 1024
MAX_WARPS_PER_SM = 64
HIDING_WARPS = 16
TRITON_EFF = {True: 0.65, False: 0.35}
CUBLAS_EFF = {True: 0.80, False: 0.30}
LOOP_BLOCK = {"grad_kernel": "BLOCK_R"}  # kernels whose loop walks rows, not classes
FACTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "compiled")


def facts_path(triton_version: Optional[str] = None, arch: int = 90) -> str:
    if triton_version is None:
        import triton
        triton_version = triton.__version__
    major_minor = ".".join(triton_version.split(".")[:2])
    return os.path.join(FACTS_DIR, f"sm{arch}-triton-{major_minor}.json")


def facts_from_records(records: list) -> Dict[str, dict]:
    """Compile-report records keyed by every launch key that compiled to them."""
    out = {}
    for r in records:
        fact = {k: r[k] for k in ("kernel", "num_warps", "regs", "shared", "stack", "pipelined",
                                  "loop_instructions")}
        # the loop step of the launch's width: classes (epilogue_kernel), rows (grad_kernel's row loop)
        fact["loop_block"] = r["constexprs"].get(LOOP_BLOCK.get(r["kernel"], "BLOCK_C"), 0)
        for key in r["launch_keys"]:
            out[key] = fact
    return out


def load_facts(triton_version: Optional[str] = None) -> Dict[str, dict]:
    path = facts_path(triton_version)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no compiled facts at {path}: run python -m dhkd_kernels compile-report --facts")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def occupancy(fact: dict) -> int:
    """Programs resident per SM."""
    warps = fact["num_warps"]
    by_regs = REGS_PER_SM // max(1, fact["regs"] * 32 * warps)
    by_smem = SMEM_PER_SM // fact["shared"] if fact["shared"] else 64
    return max(1, min(by_regs, by_smem, MAX_WARPS_PER_SM // warps))


def estimate_launch_s(launch: Launch, facts: Dict[str, dict], gpu: str = "H200") -> float:
    return LAUNCH_S + max(launch_bounds_s(launch, facts, gpu).values())


def launch_bounds_s(launch: Launch, facts: Dict[str, dict], gpu: str = "H200") -> Dict[str, float]:
    """The three bounds of one launch, in seconds, without the launch cost: {"tensor", "memory",
    "issue"} (cuBLAS products and torch ops: tensor and memory only)."""
    spec, sm = GPUS[gpu], SM[gpu]
    peak = spec[launch.kind or "bf16"]
    if launch.engine not in ("triton", "triton-gemm"):
        t_memory = launch.hbm_bytes / (spec["hbm"] * MEM_EFF)
        t_tensor = launch.flops / (peak * CUBLAS_EFF[launch.aligned]) if launch.flops else 0.0
        return dict(tensor=t_tensor, memory=t_memory)
    fact = facts.get(launch.meta)
    if fact is None:
        raise KeyError(f"no compiled facts for {launch.meta}: regenerate them (compile-report --facts)")
    programs = launch.programs
    fill = min(1.0, programs / sm["sms"])
    resident = min(occupancy(fact), -(-programs // sm["sms"])) * fact["num_warps"]
    # a pipelined GEMM hides memory latency with its multi-stage asynchronous copies, other kernels
    # with resident warps
    latency = 1.0 if fact["pipelined"] else min(1.0, resident / HIDING_WARPS)
    t_tensor = launch.flops / (peak * TRITON_EFF[bool(fact["pipelined"])] * fill) if launch.flops else 0.0
    t_memory = launch.hbm_bytes / (spec["hbm"] * MEM_EFF * fill * latency)
    trips = -(-launch.width // fact["loop_block"]) if (launch.width and fact["loop_block"]) else 1
    warp_instr = programs * fact["num_warps"] * sum(fact["loop_instructions"]) * trips
    t_issue = warp_instr / (4 * sm["clock"] * sm["sms"] * fill * latency)
    return dict(tensor=t_tensor, memory=t_memory, issue=t_issue)


def estimate_s(rec: Record, facts: Dict[str, dict], gpu: str = "H200") -> float:
    return sum(estimate_launch_s(x, facts, gpu) for x in rec.launches)


def breakdown(rec: Record, facts: Dict[str, dict], gpu: str = "H200") -> Dict[str, float]:
    """Estimated seconds per kernel name (summed over its launches)."""
    out: Dict[str, float] = {}
    for x in rec.launches:
        out[x.kernel] = out.get(x.kernel, 0.0) + estimate_launch_s(x, facts, gpu)
    return out
