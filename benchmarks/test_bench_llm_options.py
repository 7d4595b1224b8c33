"""The LLM options (kd_divergence, softcaps, z-loss) and the vocabulary-parallel form.

GPU: llm-32k and llm-128k (bf16, CE + KD + BinaryKL-Norm, forward+backward) on the triton backend, one
case per option against the default call, so that the table shows what each option costs. CPU: the
same option sets at cpu-small on the torch backend, and a two-rank sharded run (gloo, two processes
spawned once; each rank times its own steps after warm-up, the medians are reported in extra_info,
and the time pytest-benchmark records is that of the whole spawned run). Every case is checked once
(finite loss; the sharded run against the unsharded op) before it is timed. Nothing asserts on time.
"""
from __future__ import annotations

import statistics
import time

import pytest
import torch

from . import shapes as shape_registry
from .providers import skip_unless_shape_runs_here, sync

OPTION_SETS = {
    "default": {},
    "reverse_kl": dict(kd_divergence="reverse_kl"),
    "jsd": dict(kd_divergence="jsd", jsd_beta=0.5),
    "softcaps": dict(softcap=30.0, teacher_softcap=30.0),
    "z_loss": dict(z_loss_weight=1e-4),
}
BASE = dict(ce_weight=1.0, kd_weight=1.0, logit_weight=1.0, kd_temperature=4.0, logit_temperature=2.0)
CASES = [(shape, name) for shape in ("llm-32k", "llm-128k", "cpu-small") for name in OPTION_SETS]


def _inputs(shape, device, dtype):
    g = torch.Generator(device=device).manual_seed(0)
    n, d, c = shape.n, shape.d, shape.c

    def r(*size, std=1.0, grad=False):
        return torch.randn(*size, generator=g, device=device).mul_(std).to(dtype).requires_grad_(grad)

    return [r(n, d, grad=True), r(c, d, std=d**-0.5, grad=True), r(c, std=0.1, grad=True),
            r(c, d, std=d**-0.5, grad=True), r(c, std=0.1, grad=True), r(n, c, std=3.0),
            torch.randint(0, c, (n,), generator=g, device=device)]


@pytest.mark.parametrize("shape_name,option", CASES, ids=["-".join(c) for c in CASES])
def test_llm_option(benchmark, shape_name, option):
    from dhkd.distributed import leave_process
    from dhkd_kernels import fused_dual_head_kd_loss
    shape = shape_registry.get(shape_name)
    skip_unless_shape_runs_here(shape)
    device = torch.device(shape.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    backend = "triton" if device.type == "cuda" else "torch"
    args = _inputs(shape, device, dtype)
    leaves = [a for a in args if a.requires_grad]

    def step():
        loss = fused_dual_head_kd_loss(*args, backend=backend, **BASE, **OPTION_SETS[option])
        loss.backward()
        for v in leaves:
            v.grad = None
        sync(device)
        return loss

    assert torch.isfinite(step().detach()).all()
    benchmark.extra_info.update(shape=shape.dims, backend=backend, dtype=str(dtype).replace("torch.", ""),
                                option=option, mode="forward+backward")
    benchmark.pedantic(step, rounds=5 if device.type == "cpu" else 20, iterations=1, warmup_rounds=1)


# ------------------------------------------------------------------ two ranks, the head sharded

def _sharded_worker(rank, world, port, out):
    import datetime
    import os

    import torch.distributed as dist

    from dhkd.distributed import leave_process
    from dhkd_kernels import fused_dual_head_kd_loss
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    try:
        shape = shape_registry.get("cpu-small")
        args = _inputs(shape, torch.device("cpu"), torch.float32)
        c = shape.c
        lo, hi = rank * c // world, (rank + 1) * c // world
        x, w1, b1, w2, b2, t, y = args
        shard = [x, w1[lo:hi].detach().clone().requires_grad_(), b1[lo:hi].detach().clone().requires_grad_(),
                 w2[lo:hi].detach().clone().requires_grad_(), b2[lo:hi].detach().clone().requires_grad_(),
                 t[:, lo:hi].contiguous(), y]
        kw = dict(backend="torch", vocab_parallel_group=dist.group.WORLD, vocab_start=lo, vocab_size=c, **BASE)
        full = fused_dual_head_kd_loss(*args, backend="torch", **BASE)
        got = fused_dual_head_kd_loss(*shard, **kw)
        err = abs(got.item() - full.item()) / max(abs(full.item()), 1e-6)
        times = []
        for i in range(13):
            dist.barrier()
            t0 = time.perf_counter()
            fused_dual_head_kd_loss(*shard, **kw).backward()
            times.append(time.perf_counter() - t0)
        out[rank] = (err, statistics.median(times[3:]))
    finally:
        dist.destroy_process_group()
    leave_process()  # see its docstring: gloo's C++ teardown can abort a finished worker


def test_two_rank_sharded_cpu(benchmark):
    if torch.cuda.is_available():
        pytest.skip("the CPU sharded case: skipped where CUDA is present")
    import torch.multiprocessing as mp

    from tests.test_distributed import free_port
    world = 2
    results = {}

    def run():
        out = mp.Manager().dict()
        mp.spawn(_sharded_worker, args=(world, free_port(), out), nprocs=world, join=True)
        results.update(out)

    benchmark.pedantic(run, rounds=1, iterations=1)
    assert set(results) == set(range(world))
    assert all(err < 1e-5 for err, _ in results.values()), results
    benchmark.extra_info.update(shape=shape_registry.get("cpu-small").dims, backend="torch", ranks=world,
                                step_median_s={str(r): round(v[1], 6) for r, v in sorted(results.items())},
                                note="pytest-benchmark's time is the whole spawned run; the per-step medians "
                                     "(after 3 warm-up steps) are step_median_s")
