"""Cost model of the Triton backend: every kernel launch reports to it, CPU tests check it.

    from dhkd_kernels import cost
    with cost.record() as rec:
        loss = fused_dual_head_kd_loss(...)
        loss.backward()
    rec.launches, rec.matmul_flops, rec.hbm_bytes, rec.syncs, rec.estimate_s("H200")

The host code of :mod:`dhkd_kernels.ops.dual_head_kd` calls :func:`note` once per kernel it launches
(Triton kernels, cuBLAS products, any torch op that runs a kernel): the kernel's name, its grid, its
matmul FLOPs (tensor-core work), an estimate of the HBM bytes it must move (each operand read once
and each output written once: reuse through L2 is assumed, so this is a lower bound for the GEMMs
and close to exact for the memory-bound kernels) and whether it synchronises the host. Nothing is
recorded outside ``record()``; the cost of a call to ``note`` without a recorder is one list check.

The time estimate is a roofline per launch, plus a fixed launch cost:
    t = LAUNCH_S + max(flops / (peak_flops x efficiency of the engine), bytes / (HBM x MEM_EFF))
with the peak figures of :data:`GPUS` and the efficiencies below. The efficiencies are assumptions,
not measurements (no GPU has run this code yet); ``benchmarks/gpu_check.py`` measures the real thing.

Run ``python -m dhkd_kernels cost`` for the per-shape estimates of the benchmark shapes.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Dict, List, Optional, Tuple

# Peak dense tensor-core FLOP/s by operand kind, and HBM bytes/s (vendor data sheets, SXM parts).
GPUS: Dict[str, dict] = {
    "H100": dict(name="NVIDIA H100 SXM", bf16=989e12, fp16=989e12, tf32=494e12, fp32=67e12, hbm=3.35e12),
    "H200": dict(name="NVIDIA H200 SXM", bf16=989e12, fp16=989e12, tf32=494e12, fp32=67e12, hbm=4.8e12),
}
# Assumed fractions of peak (to be replaced by measured values): cuBLAS on large products reaches
# about 80% of the bf16 peak on Hopper (~790 TFLOP/s), a plain tl.dot Triton GEMM ~65%; memory-bound
# kernels stream at ~80% of HBM bandwidth; each launch costs ~3 us of dispatch and tail.
EFFICIENCY = {"cublas": 0.80, "triton-gemm": 0.65}
MEM_EFF = 0.80
LAUNCH_S = 3e-6


@dataclasses.dataclass(frozen=True)
class Launch:
    """One kernel launch: ``engine`` is "cublas", "triton-gemm" (tensor-core Triton GEMM), "triton"
    (memory-bound Triton kernel) or "torch" (a torch op running one kernel); ``kind`` the operand
    dtype of its matmul ("bf16", "fp16", "tf32", "fp32"), if any."""

    kernel: str
    engine: str
    grid: Tuple[int, ...] = ()
    flops: int = 0
    hbm_bytes: int = 0
    kind: str = ""
    sync: bool = False
    meta: str = ""        # Triton launches: their specialization (``launch_key``), to find the compiled facts
    width: int = 0        # the loops' extent: epilogue_kernel the classes of a row, grad_kernel the rows of a part
    aligned: bool = True  # cuBLAS: every operand's leading dimension a multiple of 16 bytes

    @property
    def programs(self) -> int:
        p = 1
        for g in self.grid:
            p *= g
        return p

    def estimate_s(self, gpu: str = "H200") -> float:
        spec = GPUS[gpu]
        t = self.hbm_bytes / (spec["hbm"] * MEM_EFF)
        if self.flops:
            rate = spec[self.kind or "bf16"] * EFFICIENCY.get(self.engine, EFFICIENCY["triton-gemm"])
            t = max(t, self.flops / rate)
        return LAUNCH_S + t


@dataclasses.dataclass
class Record:
    """The launches noted while this record was active (see :func:`record`)."""

    launches: List[Launch] = dataclasses.field(default_factory=list)

    @property
    def n_launches(self) -> int:
        return len(self.launches)

    @property
    def matmul_flops(self) -> int:
        return sum(x.flops for x in self.launches)

    @property
    def hbm_bytes(self) -> int:
        return sum(x.hbm_bytes for x in self.launches)

    @property
    def syncs(self) -> List[Launch]:
        return [x for x in self.launches if x.sync]

    def estimate_s(self, gpu: str = "H200") -> float:
        return sum(x.estimate_s(gpu) for x in self.launches)

    def by_kernel(self) -> Dict[str, int]:
        out: Dict[str, int] = {}
        for x in self.launches:
            out[x.kernel] = out.get(x.kernel, 0) + 1
        return out


_ACTIVE: List[Record] = []


@contextlib.contextmanager
def record():
    """Collect the launches of the code run inside the block (nested records all see them)."""
    rec = Record()
    _ACTIVE.append(rec)
    try:
        yield rec
    finally:
        _ACTIVE.remove(rec)


def recording() -> bool:
    return bool(_ACTIVE)


def launch_key(name: str, meta: dict, dtypes=()) -> str:
    """A Triton launch's specialization as text: the kernel, its meta-parameters (constexprs,
    num_warps, num_stages) and the dtypes of its tensor arguments (two launches whose constexprs agree
    compile differently for bf16 and fp32 buffers), the key under which the compile report stores its
    compiled facts."""
    key = name + "|" + ",".join(f"{k}={v}" for k, v in sorted(meta.items()) if isinstance(v, (bool, int, float, str)))
    return key + ("|" + ",".join(dtypes) if dtypes else "")


def note(kernel: str, engine: str, grid=(), flops: int = 0, hbm_bytes: int = 0, kind: str = "",
         sync: bool = False, meta: str = "", width: int = 0, aligned: bool = True) -> None:
    """Report one launch to the active records (no-op without one)."""
    if _ACTIVE:
        entry = Launch(kernel, engine, tuple(int(g) for g in grid), int(flops), int(hbm_bytes), kind, sync,
                       meta, int(width), bool(aligned))
        for rec in _ACTIVE:
            rec.launches.append(entry)


def floor_flops(n: int, c: int, d: int, da: Optional[int] = None, *, backward: bool = True,
                heads: int = 2) -> int:
    """Matmul FLOPs of the GEMM floor: per head z = X W^T (2 N C D), and with ``backward`` dX = dZ W and
    dW = dZ^T X (2 N C D each); ``da`` is the auxiliary head's width (default D)."""
    widths = [d, d if da is None else da][:heads]
    per = 3 if backward else 1
    return sum(per * 2 * n * c * w for w in widths)


def floor_estimate_s(n: int, c: int, d: int, da: Optional[int] = None, *, kind: str = "bf16",
                     gpu: str = "H200") -> float:
    """The GEMM floor's time on ``gpu`` at the assumed cuBLAS efficiency (no launch cost)."""
    return floor_flops(n, c, d, da) / (GPUS[gpu][kind] * EFFICIENCY["cublas"])


def _main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(description="Cost-model estimates of fused_dual_head_kd_loss "
                                "(forward+backward) at the benchmark shapes; estimates, not measurements.")
    p.add_argument("--gpu", default="H200", choices=sorted(GPUS))
    args = p.parse_args(argv)
    print(estimate_table(args.gpu))
    return 0


SHAPES = (  # name, N, D, C: the GPU benchmark shapes (benchmarks/shapes.py)
    ("imagenet-r18", 1024, 512, 1000), ("imagenet-r50", 256, 2048, 1000),
    ("imagenet-r50-bigbatch", 4096, 2048, 1000), ("imagenet21k", 2048, 2048, 21841),
    ("llm-32k", 8192, 4096, 32000), ("llm-128k", 8192, 4096, 128256),
)


def _v2(rec: "Record", facts, gpu: str):
    """Model v2's estimate (seconds) of a record, or None where a launch's compiled facts are missing."""
    from .compiled_model import estimate_s
    try:
        return estimate_s(rec, facts, gpu)
    except KeyError:
        return None


def _fmt(v, scale: float = 1e3, digits: int = 3) -> str:
    return "n/a" if v is None else f"{v * scale:.{digits}f}"


def estimate_table(gpu: str = "H200") -> str:
    """Markdown tables of both models' forward+backward estimates per benchmark shape (bf16, all terms on):
    v1 (FLOPs and bytes at assumed efficiencies) beside v2 (read from the compiled kernels)."""
    import triton

    from .compiled_model import breakdown, load_facts
    from .simulate import simulate
    spec = GPUS[gpu]
    try:
        facts = load_facts()
    except FileNotFoundError:
        facts = {}
    lines = [f"Cost-model estimates on {spec['name']} (bf16, CE + KD + BinaryKL-Norm, forward+backward). "
             f"v1: FLOPs and bytes at assumed efficiencies (cuBLAS {EFFICIENCY['cublas']:.0%}, Triton GEMM "
             f"{EFFICIENCY['triton-gemm']:.0%}, memory {MEM_EFF:.0%}, {LAUNCH_S * 1e6:.0f} us per launch); v2: read "
             f"from the sm_90 code triton {triton.__version__} compiles (dhkd_kernels/compiled_model.py). "
             "**Estimates, not measurements.** The floor is the aligned GEMM floor at cuBLAS's assumed 80%.", "",
             "| shape | N x D x C | plan | launches | matmul TFLOP | HBM GB | floor ms | v1 ms | v1 / floor | "
             "v2 ms | v2 / floor | v2's largest non-GEMM kernel | extra MiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, n, d, c in SHAPES:
        rec, plan = simulate(n, d, c, dtype="bf16")
        est, est2 = rec.estimate_s(gpu), _v2(rec, facts, gpu)
        floor = floor_estimate_s(n, c, d, gpu=gpu)
        top = "n/a"
        if est2 is not None:
            parts = {k: v for k, v in breakdown(rec, facts, gpu).items() if not k.startswith("cublas")
                     and k not in ("logits_kernel", "dx_kernel", "dw_kernel")}
            k = max(parts, key=parts.get)
            top = f"{k} {parts[k] * 1e6:.0f} us"
        lines.append(f"| {name} | {n}x{d}x{c} | {plan.describe()} | {rec.n_launches} | "
                     f"{rec.matmul_flops / 1e12:.3f} | {rec.hbm_bytes / 1e9:.2f} | {floor * 1e3:.3f} | "
                     f"{est * 1e3:.3f} | {est / floor:.2f} | {_fmt(est2)} | "
                     f"{'n/a' if est2 is None else f'{est2 / floor:.2f}'} | {top} | {plan.extra_bytes / 2**20:.0f} |")
    lines += ["", "The teacher as last hidden states + LM head (``teacher_features``, ``teacher_weight``; "
              "the DHKD recipe, CE + BinaryKL-Norm, KD off): the floor gains one teacher product, 2 N C D_t.", "",
              "| shape | D_t | plan | launches | matmul TFLOP | floor ms | v1 ms | v1 / floor | v2 ms | v2 / floor | "
              "extra MiB |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, n, d, c in SHAPES[-2:]:
        for dt in (4096, 8192):
            rec, plan = simulate(n, d, c, dtype="bf16", teacher_width=dt, kd_weight=0.0)
            est, est2 = rec.estimate_s(gpu), _v2(rec, facts, gpu)
            fl = (floor_flops(n, c, d) + 2 * n * c * dt)
            floor = fl / (spec["bf16"] * EFFICIENCY["cublas"])
            lines.append(f"| {name} | {dt} | {plan.describe()} | {rec.n_launches} | {rec.matmul_flops / 1e12:.3f} | "
                         f"{floor * 1e3:.3f} | {est * 1e3:.3f} | {est / floor:.2f} | {_fmt(est2)} | "
                         f"{'n/a' if est2 is None else f'{est2 / floor:.2f}'} | {plan.extra_bytes / 2**20:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(_main())
