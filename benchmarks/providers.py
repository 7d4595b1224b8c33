"""What the loss benchmarks time: input sets, the providers, their correctness checks, the GEMM floor.

Every provider turns one input set (a dict, see :func:`make_input_set`) into a scalar loss that
autograd can differentiate. Full providers compute the whole dual-head loss
    loss = CE(z1, y) + KD_T(z1, t) + BinaryKL-Norm_tau(z2, t),  z1 = x W1^T + b1, z2 = x W2^T + b2
(all three terms on, so no provider can skip work); partial peers (liger, cce) compute only part of it.
"""
from __future__ import annotations

import importlib.util
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from dhkd_kernels import fused_dual_head_kd_loss, reference

from .shapes import Shape

LOSS_OPTS = dict(ce_weight=1.0, kd_weight=1.0, logit_weight=1.0, kd_temperature=4.0,
                 logit_temperature=2.0, logit_loss="binary_kl_norm", ignore_index=-100, reduction="mean")
MODES = ("forward", "backward", "forward+backward")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
LEAVES = ("features", "head_weight", "head_bias", "aux_weight", "aux_bias")
POSITIONAL = LEAVES + ("teacher_logits", "labels")

# Correctness gate on the timed provider, relative (norm-wise) error against float64.
# fp32 leaves room for TF32 matmuls. Below fp32 the limit is LOWP_MARGIN x eager PyTorch's own error in
# that dtype, at least LOWP_FLOOR (eager bf16 measured ~1e-2 on the loss, ~4e-3 on gradients, C = 1k..32k).
# A gate against wrong results, not a precision test: tests/ holds the strict tolerances.
FP32_LIMITS = {"loss": 2e-3, "grad": 1e-2}
LOWP_MARGIN = 2.0
LOWP_FLOOR = {"loss": 2e-2, "grad": 2e-2}


def skip_unless_shape_runs_here(shape: Shape) -> None:
    """Skip a GPU-sized shape without CUDA, and a CPU-sized one where CUDA is present (the GPU shapes
    run instead)."""
    import pytest
    has_cuda = torch.cuda.is_available()
    if shape.device == "cuda" and not has_cuda:
        pytest.skip("GPU-sized shape: needs a CUDA device, none here")
    if shape.device == "cpu" and has_cuda:
        pytest.skip("CPU-sized shape: skipped where CUDA is present (the GPU shapes run instead)")


def make_input_set(shape: Shape, dtype: torch.dtype, device: torch.device, seed: int) -> dict:
    """Random inputs: features (N, D), head/aux weights (C, D) with std 1/sqrt(D) (logits ~ N(0, 1)),
    biases (C,) std 0.1, teacher logits (N, C) std 3, labels (N,) uniform. Never zeros."""
    g = torch.Generator(device=device).manual_seed(seed)
    n, d, c = shape.n, shape.d, shape.c

    def r(*size, std=1.0, grad=True):
        t = torch.randn(*size, generator=g, device=device, dtype=torch.float32).mul_(std).to(dtype)
        return t.requires_grad_(grad)

    return dict(features=r(n, d), head_weight=r(c, d, std=d**-0.5), head_bias=r(c, std=0.1),
                aux_weight=r(c, d, std=d**-0.5), aux_bias=r(c, std=0.1),
                teacher_logits=r(n, c, std=3.0, grad=False),
                labels=torch.randint(0, c, (n,), generator=g, device=device))


def input_bytes(inputs: dict) -> int:
    return sum(v.numel() * v.element_size() for v in inputs.values() if isinstance(v, torch.Tensor))


def clear_grads(inputs: dict) -> None:
    for k in LEAVES:
        inputs[k].grad = None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Norm-wise relative error |a - b| / |b| in float64 (inf when ``a`` has non-finite values)."""
    a, b = a.detach().double(), b.detach().double()
    if not torch.isfinite(a).all():
        return math.inf
    denom = b.norm().item()
    diff = (a - b).norm().item()
    return diff / denom if denom > 0 else diff


def _chunk_rows(c: int) -> int:
    return max(1, 2**24 // c)


def float64_reference(inputs: dict, opts: dict = LOSS_OPTS) -> tuple[torch.Tensor, dict]:
    """Loss and gradients of the float64 reference, accumulated over row chunks so the float64
    (N, C) logits never exist whole: loss = sum_chunks sum_rows(chunk) / |V| (exact for "mean")."""
    leaves = {k: inputs[k].detach().double().requires_grad_(True) for k in LEAVES}
    t, y = inputs["teacher_logits"], inputs["labels"]
    n_valid = (y != opts["ignore_index"]).sum().clamp(min=1).double()
    per_chunk = dict(opts, reduction="sum")
    total = torch.zeros((), dtype=torch.float64, device=t.device)
    step = _chunk_rows(t.shape[1])
    for s in range(0, t.shape[0], step):
        rows = slice(s, s + step)
        loss = reference.dual_head_kd_loss(
            leaves["features"][rows], leaves["head_weight"], leaves["head_bias"], leaves["aux_weight"],
            leaves["aux_bias"], t[rows].double(), y[rows], **per_chunk) / n_valid
        loss.backward()
        total += loss.detach()
    return total, {k: v.grad for k, v in leaves.items()}


def float64_main_ce(inputs: dict) -> torch.Tensor:
    """Mean cross-entropy of the main head alone in float64 (what the partial peers' CE computes)."""
    x, w, b, y = (inputs[k].detach() for k in ("features", "head_weight", "head_bias", "labels"))
    total = torch.zeros((), dtype=torch.float64, device=x.device)
    step = _chunk_rows(w.shape[0])
    with torch.no_grad():
        for s in range(0, x.shape[0], step):
            z = F.linear(x[s:s + step].double(), w.double(), b.double())
            total += reference.cross_entropy(z, y[s:s + step]).sum()
    return total / x.shape[0]


def loss_and_grads(fn: Callable, inputs: dict) -> tuple[torch.Tensor, dict]:
    clear_grads(inputs)
    loss = fn(inputs)
    loss.backward()
    grads = {k: inputs[k].grad for k in LEAVES if inputs[k].grad is not None}
    clear_grads(inputs)
    return loss.detach(), grads


def errors_against(fn: Callable, inputs: dict, ref: tuple[torch.Tensor, dict]) -> dict:
    """Relative errors of ``fn``'s loss and of every gradient against the float64 reference."""
    loss, grads = loss_and_grads(fn, inputs)
    ref_loss, ref_grads = ref
    missing = set(ref_grads) - set(grads)
    if missing:
        raise AssertionError(f"no gradient reached {sorted(missing)}")
    errs = {"loss": rel_err(loss, ref_loss)}
    errs.update({k: rel_err(grads[k], ref_grads[k]) for k in ref_grads})
    return errs


def limits_for(dtype: torch.dtype, eager_errors: dict | None) -> dict:
    """Per-quantity error limits: fixed for fp32; LOWP_MARGIN x eager error (+ floor) below fp32."""
    if dtype in (torch.float32, torch.float64):
        return {k: FP32_LIMITS["loss" if k == "loss" else "grad"] for k in ("loss",) + LEAVES}
    out = {}
    for k in ("loss",) + LEAVES:
        floor = LOWP_FLOOR["loss" if k == "loss" else "grad"]
        eager = eager_errors.get(k, 0.0) if eager_errors else 0.0
        out[k] = max(floor, LOWP_MARGIN * eager)
    return out


# ---------------------------------------------------------------------------------------- providers

def _args(inputs):
    return [inputs[k] for k in POSITIONAL]


@dataclass
class Provider:
    """A way to compute (part of) the loss. ``build(shape, dtype, device)`` returns fn(inputs) -> loss.

    ``unavailable(device)`` gives a skip reason or None; ``heads`` and ``extra_fwd_gemms`` describe
    the matmul work it does (for TFLOP/s); ``covers`` says which part of the op it computes.
    """

    name: str
    covers: str
    build: Callable
    unavailable: Callable = lambda device: None
    partial: bool = False
    heads: int = 2
    extra_fwd_gemms: int = 0
    info: dict = field(default_factory=dict)

    def flops(self, shape: Shape, mode: str) -> int:
        per_gemm = 2 * shape.n * shape.d * shape.c
        fwd, bwd = self.heads + self.extra_fwd_gemms, 2 * self.heads
        return per_gemm * {"forward": fwd, "backward": bwd, "forward+backward": fwd + bwd}[mode]


def _build_fused(shape, dtype, device):
    def fn(inputs):
        return fused_dual_head_kd_loss(*_args(inputs), **LOSS_OPTS)
    return fn


def fused_backend(device: torch.device) -> str:
    """The backend ``backend="auto"`` resolves to on ``device``."""
    from dhkd_kernels import functional
    try:
        return functional._resolve_backend("auto", device)
    except Exception:  # private helper; its name may change
        return "auto"


def _build_reference(shape, dtype, device):
    def fn(inputs):
        return reference.dual_head_kd_loss(*_args(inputs), **LOSS_OPTS)
    return fn


def _build_compiled(shape, dtype, device):
    torch._dynamo.reset()  # one fresh graph per (shape, dtype): no recompile limit, no dynamic shapes
    compiled = torch.compile(reference.dual_head_kd_loss, dynamic=False)

    def fn(inputs):
        return compiled(*_args(inputs), **LOSS_OPTS)
    return fn


def _needs_cuda_and(module: str, pip_name: str):
    def unavailable(device):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed (pip install {pip_name}); partial peer skipped"
        if device.type != "cuda":
            return f"{module} runs on CUDA only; partial peer skipped"
        return None
    return unavailable


def _build_liger(shape, dtype, device):
    from liger_kernel.transformers.functional import (liger_fused_linear_cross_entropy,
                                                      liger_fused_linear_jsd)
    g = torch.Generator(device=device).manual_seed(1234)
    # Liger's distillation losses take the teacher's hidden states and head, not its logits.
    teacher_hidden = torch.randn(shape.n, shape.d, generator=g, device=device).to(dtype)
    teacher_weight = (torch.randn(shape.c, shape.d, generator=g, device=device) * shape.d**-0.5).to(dtype)
    tau = LOSS_OPTS["logit_temperature"]

    def fn(inputs):
        x = inputs["features"]
        ce = liger_fused_linear_cross_entropy(x, inputs["head_weight"], inputs["labels"],
                                              bias=inputs["head_bias"])
        jsd = liger_fused_linear_jsd(x, inputs["aux_weight"], teacher_hidden, teacher_weight,
                                     None, 0.5, -100, tau)
        return ce + jsd

    def main_ce(inputs):
        return liger_fused_linear_cross_entropy(inputs["features"], inputs["head_weight"],
                                                inputs["labels"], bias=inputs["head_bias"])
    fn.main_ce = main_ce
    return fn


def _build_cce(shape, dtype, device):
    from cut_cross_entropy import linear_cross_entropy

    def fn(inputs):
        return linear_cross_entropy(inputs["features"], inputs["head_weight"], inputs["labels"],
                                    bias=inputs["head_bias"])
    fn.main_ce = fn
    return fn


PROVIDERS = {
    p.name: p for p in (
        Provider("fused", "the whole loss (fused_dual_head_kd_loss, backend='auto')", _build_fused),
        Provider("reference", "the whole loss (eager dhkd_kernels.reference)", _build_reference),
        Provider("compiled", "the whole loss (torch.compile of the reference)", _build_compiled),
        Provider("liger", "main-head CE (fused linear CE) + aux-head JSD against a teacher head "
                 "(fused linear JSD); no KD term, no BinaryKL-Norm; one extra teacher GEMM",
                 _build_liger, _needs_cuda_and("liger_kernel", "liger-kernel"), partial=True,
                 extra_fwd_gemms=1),
        Provider("cce", "main-head CE only (cut_cross_entropy.linear_cross_entropy)", _build_cce,
                 _needs_cuda_and("cut_cross_entropy", "cut-cross-entropy"), partial=True, heads=1),
    )
}


# ------------------------------------------------------------------------------------- GEMM floor

def gemm_floor_ops(inputs: dict, dz: tuple[torch.Tensor, torch.Tensor], mode: str) -> Callable:
    """The unavoidable GEMMs alone (cuBLAS / CPU BLAS): per head z = x W^T forward, and
    dX = dZ W, dW = dZ^T x backward (the two heads' dX fused into one addmm)."""
    x = inputs["features"].detach()
    w1, w2 = inputs["head_weight"].detach(), inputs["aux_weight"].detach()
    dz1, dz2 = dz

    def forward():
        return torch.mm(x, w1.t()), torch.mm(x, w2.t())

    def backward():
        dx = torch.addmm(torch.mm(dz1, w1), dz2, w2)
        return dx, torch.mm(dz1.t(), x), torch.mm(dz2.t(), x)

    if mode == "forward":
        return forward
    if mode == "backward":
        return backward
    return lambda: (forward(), backward())


def make_dz(shape: Shape, dtype: torch.dtype, device: torch.device, seed: int):
    g = torch.Generator(device=device).manual_seed(seed)
    return tuple(torch.randn(shape.n, shape.c, generator=g, device=device).mul_(0.01).to(dtype)
                 for _ in range(2))


class CudaEventTimer:
    """A pytest-benchmark timer made of CUDA events: the first call records a start event and returns 0,
    the second records an end event, waits for it and returns the GPU time between the two (seconds).

    Calls must come in pairs around the timed work (pytest-benchmark's runner does exactly that). The
    GPU must be idle at the first call (the harness synchronizes in its setup), so the measured span
    runs from the moment the host starts issuing work to the completion of the last kernel, host
    launch gaps included, without the latency of a host synchronize."""

    __name__ = "cuda_event_timer"

    def __init__(self):
        self._start = None

    def __call__(self) -> float:
        if self._start is None:
            self._start = torch.cuda.Event(enable_timing=True)
            self._start.record()
            return 0.0
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        end.synchronize()
        seconds = self._start.elapsed_time(end) / 1e3
        self._start = None
        return seconds


def make_timer(device: torch.device):
    """CUDA events on a GPU, ``time.perf_counter`` on the CPU (where calls are synchronous)."""
    return CudaEventTimer() if device.type == "cuda" else time.perf_counter


def time_median(fn: Callable, device: torch.device, *, rounds: int, warmup: int) -> float:
    """Median seconds of ``fn()`` over ``rounds`` calls, each from an idle device, after ``warmup`` calls."""
    timer = make_timer(device)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(rounds):
        sync(device)
        start = timer()
        fn()
        times.append(timer() - start)
    times.sort()
    return times[len(times) // 2]
