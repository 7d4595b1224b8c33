"""Model v2 (dhkd_kernels/compiled_model.py), read from the committed compiled facts of the installed
Triton: every launch at every benchmark shape has its facts, every kernel the model puts above 10 us
runs at least one full wave, and the issue's targets as model estimates. Estimates, not measurements:
no GPU has timed this code."""
from __future__ import annotations

import subprocess
import sys

import pytest

from dhkd_kernels import cost
from dhkd_kernels.compiled_model import estimate_launch_s, estimate_s, load_facts, occupancy
from dhkd_kernels.simulate import simulate

SHAPES = {name: (n, d, c) for name, n, d, c in cost.SHAPES}
H200_SMS = 132


@pytest.fixture(scope="module")
def facts():
    return load_facts()


@pytest.fixture(scope="module")
def bf16(facts):
    return {name: simulate(n, d, c, dtype="bf16") for name, (n, d, c) in SHAPES.items()}


@pytest.mark.parametrize("dtype", ["bf16", "fp32", "tf32"])
def test_every_benchmark_launch_has_compiled_facts(facts, dtype):
    for name, (n, d, c) in SHAPES.items():
        rec, _ = simulate(n, d, c, dtype=dtype)
        for launch in rec.launches:
            if launch.engine in ("triton", "triton-gemm"):
                assert launch.meta in facts, f"{name}/{dtype}: no compiled facts for {launch.meta}"


def test_kernels_above_10_us_fill_a_wave(facts, bf16):
    for name, (rec, _) in bf16.items():
        for launch in rec.launches:
            if launch.engine in ("triton", "triton-gemm") and estimate_launch_s(launch, facts) > 10e-6:
                assert launch.programs >= H200_SMS, (name, launch.kernel, launch.grid)


def _ratio(name, bf16, facts):
    n, d, c = SHAPES[name]
    rec, _ = bf16[name]
    return estimate_s(rec, facts) / cost.floor_estimate_s(n, c, d)


def test_targets_met_in_the_model(facts, bf16):
    """The issue's targets that model v2 meets: <= 1.15x the aligned GEMM floor at the LLM shapes and
    <= 40 us of GPU time at imagenet-r18."""
    assert _ratio("llm-128k", bf16, facts) <= 1.15
    assert _ratio("llm-32k", bf16, facts) <= 1.15
    rec, _ = bf16["imagenet-r18"]
    assert estimate_s(rec, facts) <= 40e-6
    assert bf16["llm-128k"][1].extra_bytes <= 512 * 2**20


def test_targets_not_met_stay_where_they_are(facts, bf16):
    """Not met in the model (docs/kernel-performance.md says why): imagenet21k (target 1.15x; the epilogue is
    issue-bound at ~147 SASS instructions per logit with the odd C's scalar teacher loads) and
    imagenet-r50-bigbatch (target 1.4x; Triton GEMMs at an assumed 65% of peak against cuBLAS's 80%
    cap it near 1.25x before the epilogue). These bounds guard against regressions only."""
    assert _ratio("imagenet21k", bf16, facts) <= 1.25
    assert _ratio("imagenet-r50-bigbatch", bf16, facts) <= 1.55


def test_occupancy_from_registers_and_shared_memory():
    assert occupancy(dict(num_warps=8, regs=128, shared=0)) == 2
    assert occupancy(dict(num_warps=4, regs=255, shared=0)) == 2
    assert occupancy(dict(num_warps=4, regs=64, shared=160 * 1024)) == 1
    assert occupancy(dict(num_warps=4, regs=32, shared=0)) == 16  # 64 warps per SM at most


def test_host_overhead_command_prints_its_measurement():
    proc = subprocess.run([sys.executable, "-m", "dhkd_kernels", "host-overhead", "--repeat", "10"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "host overhead of one forward+backward, launches skipped (imagenet-r18, bf16" in proc.stdout
    bad = subprocess.run([sys.executable, "-m", "dhkd_kernels", "host-overhead", "--repeat", "0"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "--repeat" in bad.stderr
