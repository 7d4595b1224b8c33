"""The Triton backend's cost model, checked on CPU: the real host code runs on ``meta`` tensors
(``dual_head_kd.simulate``), where nothing computes and any host synchronisation would raise, and
every launch it reports is checked against the GEMM floor, the launch bounds and the memory bound.
A dispatch mode independently counts the torch operations that would launch kernels, so a launch
the host code forgets to report fails the test."""
from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks import shapes as bench_shapes
from dhkd_kernels import cost
from dhkd_kernels.ops import _plan
from dhkd_kernels.ops import dual_head_kd as dhk
from dhkd_kernels.simulate import simulate

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHAPES = {name: (n, d, c) for name, n, d, c in cost.SHAPES}
DTYPES = ("bf16", "fp16", "fp32", "tf32")
# launches per forward+backward, by plan (a chunked plan adds per slab and per row chunk)
RESIDENT_TRITON_MAX = 5
# cuBLAS: 2 logits products, epilogue, finalize, 2 dX into fp32, a column of ones, 2 bias products dZ^T 1,
# one scale launch (masked, scaled X; dX's cast; both biases), 2 dW (10 with the split form: statistics
# pass and grad_kernel, no dZ^T 1); fp16: 3 more (X masked apart; each head's dW in fp32, scaled and cast)
RESIDENT_CUBLAS_MAX = 12


def test_cost_shapes_are_the_benchmark_shapes():
    assert {(s.name, s.n, s.d, s.c) for s in bench_shapes.GPU_SHAPES} == set(cost.SHAPES)


def _bound(plan, n, c, dtype="bf16") -> int:
    if plan.resident:
        return RESIDENT_TRITON_MAX if plan.engine == "triton" else RESIDENT_CUBLAS_MAX + 3 * (dtype == "fp16")
    slabs = -(-c // plan.slab)
    chunks = -(-n // plan.rows)
    return 12 + 5 * slabs + 5 * chunks


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(SHAPES))
def test_floor_flops_launches_memory_no_sync(name, dtype):
    """Forward+backward at every benchmark shape: matmul FLOPs equal the floor (one z, one dX and one
    dW product per head, no recomputation), launches stay within their bound, nothing synchronises,
    and the extra memory stays under the default 512 MiB."""
    n, d, c = SHAPES[name]
    rec, plan = simulate(n, d, c, dtype=dtype)
    assert rec.matmul_flops == cost.floor_flops(n, c, d) == 12 * n * c * d
    assert not rec.syncs
    assert rec.n_launches <= _bound(plan, n, c, dtype), (plan, rec.by_kernel())
    assert plan.extra_bytes <= 512 * 2**20, plan
    if name == "imagenet-r18" and dtype != "fp32":
        assert rec.n_launches <= 6, rec.by_kernel()  # the bound at (1024, 512, 1000)


LLM_OPTIONS = {"reverse_kl": dict(kd_divergence="reverse_kl"), "jsd": dict(kd_divergence="jsd", jsd_beta=0.5),
               "softcaps+z-loss": dict(softcap=30.0, teacher_softcap=30.0, z_loss_weight=1e-4)}


@pytest.mark.parametrize("option", list(LLM_OPTIONS))
@pytest.mark.parametrize("name", ["imagenet-r18", "imagenet21k", "llm-128k"])
def test_llm_options_keep_the_floor_and_the_launches(name, option):
    """Each LLM option on: the same matmul FLOPs (the floor), the same launches as the default call
    (the options live inside the epilogue), no synchronisation."""
    n, d, c = SHAPES[name]
    base, base_plan = simulate(n, d, c)
    rec, plan = simulate(n, d, c, **LLM_OPTIONS[option])
    assert plan == base_plan
    assert rec.matmul_flops == cost.floor_flops(n, c, d)
    assert not rec.syncs
    assert rec.by_kernel() == base.by_kernel()


@pytest.mark.parametrize("name", list(SHAPES))
def test_no_gradient_runs_only_the_forward_products(name):
    n, d, c = SHAPES[name]
    rec, plan = simulate(n, d, c, backward=False)
    assert rec.matmul_flops == cost.floor_flops(n, c, d, backward=False) == 4 * n * c * d
    assert not any(x.kernel in ("dx_kernel", "dw_kernel", "scale_kernel") for x in rec.launches)


@pytest.mark.parametrize("name", ["imagenet-r18", "imagenet21k", "llm-32k"])
def test_floor_with_separate_aux_features_and_partial_grads(name):
    n, d, c = SHAPES[name]
    da = d // 2
    rec, _ = simulate(n, d, c, da=da)
    assert rec.matmul_flops == cost.floor_flops(n, c, d, da) == 6 * n * c * (d + da)
    # only the weights train (frozen features): forward products plus the two dW products
    rec, _ = simulate(n, d, c, requires_grad=("head_weight", "aux_weight"))
    assert rec.matmul_flops == 4 * n * c * d + 4 * n * c * d
    # only the aux head's loss: the main head's product never runs
    rec, _ = simulate(n, d, c, ce_weight=0.0, kd_weight=0.0)
    assert rec.matmul_flops == 6 * n * c * d


def test_mixed_dtypes_report_their_casts():
    """fp32 features with bf16 weights: the promotion casts (real kernels on a GPU) are reported."""
    import torch
    meta = torch.device("meta")
    x = torch.empty(64, 32, device=meta, requires_grad=True)
    w1, w2 = (torch.empty(100, 32, dtype=torch.bfloat16, device=meta, requires_grad=True) for _ in range(2))
    t = torch.empty(64, 100, device=meta)
    y = torch.empty(64, dtype=torch.int64, device=meta)
    from dhkd_kernels import fused_dual_head_kd_loss
    with _CountOps() as mode, cost.record() as rec, dhk._direct():
        fused_dual_head_kd_loss(x, w1, None, w2, None, t, y, backend="triton").backward()
    ops = [o for o in mode.ops if o not in ("ones_like",)]
    assert len(ops) == len([r for r in rec.launches if r.engine in ("cublas", "torch")]), sorted(ops)
    assert rec.by_kernel().get("torch:_to_copy", 0) >= 2


def test_memory_budget_is_configurable(monkeypatch):
    n, d, c = SHAPES["llm-128k"]
    for mib in (300, 512, 1024):
        monkeypatch.setattr(_plan, "MEMORY_BUDGET_BYTES", mib * 2**20)
        rec, plan = simulate(n, d, c)
        assert plan.extra_bytes <= mib * 2**20
        assert rec.matmul_flops == 12 * n * c * d


# kernels that launch nothing: allocation, views, metadata
_NO_KERNEL = {"empty", "empty_strided", "view", "_unsafe_view", "as_strided", "t", "transpose", "permute",
              "expand", "slice", "select", "unsqueeze", "squeeze", "alias", "detach", "reshape", "unbind",
              "split", "narrow", "lift_fresh", "_to_copy_noop", "sym_size", "sym_stride", "sym_numel",
              "sym_storage_offset", "is_same_size", "_has_compatible_shallow_copy_type", "promote_types"}


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in _NO_KERNEL:
            self.ops.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name,dtype,opts", [
    ("imagenet-r18", "bf16", {}), ("imagenet-r50-bigbatch", "bf16", {}), ("imagenet-r18", "fp32", {}),
    ("llm-32k", "bf16", {}), ("imagenet-r50-bigbatch", "bf16", dict(reduction="none", return_components=True)),
    ("imagenet-r18", "bf16", dict(teacher_width=1024, label_smoothing=0.1)),
    ("llm-32k", "bf16", dict(teacher_width=4096, kd_weight=1.0)), ("llm-32k", "bf16", dict(teacher_width=4096,
                                                                                            kd_weight=0.0)),
], ids=str)
def test_every_torch_launch_is_reported(name, dtype, opts):
    """The torch/cuBLAS operations the host code runs (counted by a dispatch mode, outside the
    Triton launches) are exactly the non-Triton launches it reports; the caller's own ones_like and
    sum (the seed gradient of loss.backward(), the .sum() of per-row losses) are not the op's."""
    n, d, c = SHAPES[name]
    with _CountOps() as mode:
        rec, _ = simulate(n, d, c, dtype=dtype, **opts)
    ops = [o for o in mode.ops if o not in ("ones_like", "sum")]
    reported = [x for x in rec.launches if x.engine in ("cublas", "torch")]
    assert len(ops) == len(reported), (sorted(ops), sorted(x.kernel for x in reported))


def test_estimate_table_and_docs_are_current():
    """``python -m dhkd_kernels cost`` prints the per-shape estimate that docs/kernel-performance.md shows."""
    proc = subprocess.run([sys.executable, "-m", "dhkd_kernels", "cost"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = proc.stdout.strip()
    assert "llm-128k" in table and "Estimates, not measurements" in table
    assert table in (ROOT / "docs" / "kernel-performance.md").read_text(), \
        "docs/kernel-performance.md's cost table is stale: rerun python -m dhkd_kernels cost"


def test_record_is_scoped():
    with cost.record() as outer:
        cost.note("k", "triton", (1,), 0, 10)
        with cost.record() as inner:
            cost.note("m", "cublas", (), 100, 20, "bf16")
    cost.note("outside", "triton")
    assert outer.n_launches == 2 and inner.n_launches == 1
    assert inner.matmul_flops == 100 and outer.hbm_bytes == 30
    assert inner.estimate_s("H100") > cost.LAUNCH_S
