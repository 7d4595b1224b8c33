"""Model v2 (dhkd_kernels/compiled_model.py), read from the committed compiled facts of triton 3.6 and
3.8: every launch at every benchmark shape has its facts, every kernel the model puts above 10 us
runs at least one full wave, and the issue's targets as model estimates. Estimates, not measurements:
no GPU has timed this code."""
from __future__ import annotations

import subprocess
import sys

import pytest

from dhkd_kernels import cost
from dhkd_kernels.compiled_model import estimate_launch_s, estimate_s, launch_bounds_s, load_facts, occupancy
from dhkd_kernels.simulate import simulate

SHAPES = {name: (n, d, c) for name, n, d, c in cost.SHAPES}
H200_SMS = 132


VERSIONS = ("3.6", "3.8")
# The issue's targets as model-v2 estimates (bf16, H200, CE + KD + BinaryKL-Norm, forward+backward), per
# Triton: met ones as the issue states them; missed ones at today's value, as regression bounds only
# (docs/kernel-performance.md says why each is missed).
MET = {v: {"llm-128k": 1.15, "llm-32k": 1.15, "imagenet21k": 1.15, "imagenet-r18-us": 40.0} for v in ("3.6", "3.8")}
MISSED = {v: {"imagenet-r50-bigbatch": 1.50} for v in ("3.6", "3.8")}


@pytest.fixture(scope="module", params=VERSIONS)
def version(request):
    return request.param


@pytest.fixture(scope="module")
def facts(version):
    """The committed facts of each Triton the project checks (tests/test_compile_report.py keeps them
    current): the GPU image's 3.6 and the installed 3.8."""
    return load_facts(version)


@pytest.fixture(scope="module")
def bf16():
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


def test_targets_met_in_the_model(version, facts, bf16):
    for name, bound in MET[version].items():
        if name == "imagenet-r18-us":
            assert estimate_s(bf16["imagenet-r18"][0], facts) <= bound * 1e-6
        else:
            assert _ratio(name, bf16, facts) <= bound, (version, name)
    assert bf16["llm-128k"][1].extra_bytes <= 512 * 2**20


def test_targets_not_met_stay_where_they_are(version, facts, bf16):
    for name, bound in MISSED[version].items():
        assert _ratio(name, bf16, facts) <= bound, (version, name)


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


def test_epilogue_is_memory_bound_at_every_shape(facts, bf16):
    """The loss epilogue's issue time (SASS instructions per loop body x trips) stays within its memory
    time at every benchmark shape: its instruction count is not what bounds it. The cuBLAS plan's split
    form: grad_kernel alone, and the statistics pass with grad_kernel together (the statistics pass
    alone is issue-bound at imagenet21k, whose odd C leaves the teacher's loads scalar)."""
    for name, (rec, _) in bf16.items():
        split = any(x.kernel == "grad_kernel" for x in rec.launches)
        issue = memory = 0.0
        for launch in rec.launches:
            if launch.kernel in ("epilogue_kernel", "grad_kernel"):
                b = launch_bounds_s(launch, facts)
                issue, memory = issue + b["issue"], memory + b["memory"]
                if launch.kernel == "grad_kernel" or not split:
                    assert b["issue"] <= b["memory"], (name, launch.kernel, b)
        assert issue <= memory, (name, issue, memory)
