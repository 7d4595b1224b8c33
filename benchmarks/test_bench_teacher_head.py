"""The LLM form: the teacher as last hidden states + LM head, its logits computed inside the op.

Shapes llm-32k and llm-128k (bf16) with teacher widths D_t = 4096 and 8192; forward+backward of the
DHKD recipe (CE on the main head, BinaryKL-Norm on the auxiliary head against the teacher head).
Providers: the fused loss with ``teacher_features``/``teacher_weight``; the GEMM floor plus the teacher
product (cuBLAS alone); Liger-Kernel's fused linear JSD plus fused linear CE (a partial peer: JSD is not
BinaryKL-Norm, but it does the same GEMMs from the same teacher head). CUDA only: skipped elsewhere with
the reason. Each case is checked once before it is timed (the fused loss against the same loss given
the materialized teacher logits). Nothing asserts on time.
"""
from __future__ import annotations

import importlib.util
import math

import pytest
import torch

from . import shapes as shape_registry
from .providers import make_timer, rel_err, sync

TEACHER_WIDTHS = (4096, 8192)
OPTS = dict(ce_weight=1.0, kd_weight=0.0, logit_weight=1.0, logit_temperature=2.0, logit_loss="binary_kl_norm")
CASES = [(name, dt, prov) for name in ("llm-32k", "llm-128k") for dt in TEACHER_WIDTHS
         for prov in ("fused teacher head", "gemm floor + teacher", "liger fljsd+flce")]


def _inputs(shape, dt_width, device):
    g = torch.Generator(device=device).manual_seed(0)
    n, d, c = shape.n, shape.d, shape.c

    def r(*size, std=1.0, grad=False):
        return torch.randn(*size, generator=g, device=device).mul_(std).to(torch.bfloat16).requires_grad_(grad)

    return dict(x=r(n, d, grad=True), w1=r(c, d, std=d**-0.5, grad=True), b1=r(c, std=0.1, grad=True),
                w2=r(c, d, std=d**-0.5, grad=True), b2=r(c, std=0.1, grad=True),
                tf=r(n, dt_width), tw=r(c, dt_width, std=dt_width**-0.5),
                y=torch.randint(0, c, (n,), generator=g, device=device))


def _fused(inp):
    from dhkd_kernels import fused_dual_head_kd_loss
    return fused_dual_head_kd_loss(inp["x"], inp["w1"], inp["b1"], inp["w2"], inp["b2"], None, inp["y"],
                                   teacher_features=inp["tf"], teacher_weight=inp["tw"], **OPTS)


def _floor_step(inp):
    x, w = inp["x"].detach(), torch.cat([inp["w1"].detach(), inp["w2"].detach()], 0)
    tf, tw = inp["tf"], inp["tw"]
    dz = torch.empty(x.shape[0], w.shape[0], dtype=x.dtype, device=x.device)

    def step():
        torch.mm(tf, tw.t())
        torch.mm(x, w.t(), out=dz)
        torch.mm(dz, w)
        torch.mm(dz.t(), x)
    return step


def _liger(inp):
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy, liger_fused_linear_jsd
    ce = liger_fused_linear_cross_entropy(inp["x"], inp["w1"], inp["y"], bias=inp["b1"])
    return ce + liger_fused_linear_jsd(inp["x"], inp["w2"], inp["tf"], inp["tw"], None, 0.5, -100, 2.0)


@pytest.mark.parametrize("shape_name,dt_width,provider", CASES)
def test_teacher_head(benchmark, shape_name, dt_width, provider):
    if not torch.cuda.is_available():
        pytest.skip("the LLM teacher-head shapes need a CUDA device, none here")
    if provider.startswith("liger") and importlib.util.find_spec("liger_kernel") is None:
        pytest.skip("liger_kernel is not installed (pip install liger-kernel); partial peer skipped")
    device = torch.device("cuda")
    shape = shape_registry.get(shape_name)
    inp = _inputs(shape, dt_width, device)
    leaves = [inp[k] for k in ("x", "w1", "b1", "w2", "b2")]

    def clear():
        for v in leaves:
            v.grad = None

    if provider == "gemm floor + teacher":
        step = _floor_step(inp)
    else:
        fn = _fused if provider.startswith("fused") else _liger

        def step():
            clear()
            fn(inp).backward()
    if provider.startswith("fused"):  # checked once: the same loss with the teacher logits given whole
        from dhkd_kernels import fused_dual_head_kd_loss
        with torch.no_grad():
            t = torch.mm(inp["tf"], inp["tw"].t())
            want = fused_dual_head_kd_loss(inp["x"], inp["w1"], inp["b1"], inp["w2"], inp["b2"], t, inp["y"], **OPTS)
            got = _fused(inp)
            del t
        assert rel_err(got, want) < 1e-3
    step()
    sync(device)
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    sync(device)
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    benchmark.group = f"teacher head {shape_name} D_t={dt_width}"
    benchmark.pedantic(step, rounds=10, warmup_rounds=2, iterations=1, timer=make_timer(device))
    flops = 12 * shape.n * shape.c * shape.d + 2 * shape.n * shape.c * dt_width
    benchmark.extra_info.update(shape=shape_name, provider=provider, teacher_width=dt_width, dtype="bf16",
                                floor_flops=flops, peak_extra_mib=peak, partial=provider.startswith("liger"))
    clear()
    assert math.isfinite(peak)
