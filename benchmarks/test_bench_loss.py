"""Speed and memory of the dual-head KD loss: providers x modes x dtypes x shapes.

Run: ``pytest benchmarks/ --benchmark-only [--benchmark-json BENCH.json]``; see docs/benchmarks.md.
Each case is checked once against a float64 reference before it is timed; nothing here asserts on time.
"""
from __future__ import annotations

import gc
import itertools
import math
import platform
import time

import pytest
import torch

from . import shapes as shape_registry
from .providers import (DTYPES, MODES, PROVIDERS, clear_grads, errors_against, float64_main_ce,
                        float64_reference, fused_backend, gemm_floor_ops, limits_for, make_timer,
                        make_dz, make_input_set, rel_err, skip_unless_shape_runs_here, sync, time_median)

FLOOR = "gemm-floor"
CASES = [(s.name, dt, p, m) for s in shape_registry.SHAPES for dt in DTYPES
         for p in (FLOOR, *PROVIDERS) for m in MODES]

# Timing plan per device kind: seconds of timed rounds to aim for, round bounds, warm-up rounds.
PLAN = {"cuda": dict(budget=1.0, min_rounds=5, max_rounds=200, warmup=3),
        "cpu": dict(budget=0.25, min_rounds=3, max_rounds=20, warmup=1)}


def _versions() -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"torch": torch.__version__, "triton": triton_version}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


class ShapeState:
    """Everything shared by the cases of one (shape, dtype): rotating input sets, the float64
    reference, built providers and their check results, GEMM-floor medians. Only one lives at a time."""

    def __init__(self, shape, dtype, device):
        self.shape, self.dtype, self.device = shape, dtype, device
        set_bytes = self._set_bytes()
        n_sets = 2 if device.type == "cpu" or set_bytes > 2**30 else 4
        self.sets = [make_input_set(shape, dtype, device, seed) for seed in range(n_sets)]
        self.dz = make_dz(shape, dtype, device, 100)  # one pair: each GEMM reads it once per call
        self.fns, self.checks, self.floor = {}, {}, {}
        self._ref64 = None
        self._eager = None

    def _set_bytes(self):
        s, e = self.shape, torch.finfo(self.dtype).bits // 8
        return e * (s.n * s.d + 2 * s.c * s.d + 2 * s.c + s.n * s.c) + 8 * s.n

    @property
    def ref64(self):
        if self._ref64 is None:
            self._ref64 = float64_reference(self.sets[0])
        return self._ref64

    def eager_errors(self):
        if self.dtype == torch.float32:
            return None
        if self._eager is None:
            try:
                self._eager = errors_against(self.provider_fn("reference"), self.sets[0], self.ref64)
            except torch.cuda.OutOfMemoryError:
                self._eager = {}  # eager does not fit: the floors alone set the limits
        return self._eager

    def provider_fn(self, name):
        if name not in self.fns:
            self.fns[name] = PROVIDERS[name].build(self.shape, self.dtype, self.device)
        return self.fns[name]

    def check(self, name):
        """Build provider ``name`` and check it once on input set 0 (loss and all gradients)."""
        if name in self.checks:
            return self.checks[name]
        provider = PROVIDERS[name]
        inputs = self.sets[0]
        ref = None if provider.partial else self.ref64
        sync(self.device)
        t0 = time.perf_counter()
        fn = self.provider_fn(name)
        if provider.partial:
            # partial peers: their main-head CE against float64; their whole loss must be finite
            ce = fn.main_ce(inputs).detach()
            loss = fn(inputs)
            loss.backward()
            clear_grads(inputs)
            sync(self.device)
            first_s = time.perf_counter() - t0
            errs = {"loss": rel_err(ce, float64_main_ce(inputs))}
            assert math.isfinite(loss.item()), f"{name}: non-finite loss {loss.item()}"
        else:
            errs = errors_against(fn, inputs, ref)
            sync(self.device)
            first_s = time.perf_counter() - t0  # first forward+backward, compilation included
        limits = limits_for(self.dtype, self.eager_errors())
        bad = {k: (v, limits[k]) for k, v in errs.items() if not v <= limits[k]}
        assert not bad, f"{name} {self.shape.name} {self.dtype}: error above limit {bad}"
        info = {"check_rel_err_loss": errs["loss"],
                "check_rel_err_grad_max": max((v for k, v in errs.items() if k != "loss"), default=None),
                "first_call_s": first_s}
        self.checks[name] = info
        return info

    def floor_median(self, mode):
        """Median seconds of the GEMM floor for ``mode`` (own timer, same sync discipline)."""
        if mode not in self.floor:
            ops = [gemm_floor_ops(s, self.dz, mode) for s in self.sets]
            cyc = itertools.cycle(ops)
            plan = PLAN[self.device.type]
            self.floor[mode] = time_median(lambda: next(cyc)(), self.device,
                                           rounds=max(plan["min_rounds"], 10), warmup=plan["warmup"])
        return self.floor[mode]


_STATE: dict = {}


def state_for(shape, dtype, device) -> ShapeState:
    key = (shape.name, dtype, device)
    if _STATE.get("key") != key:
        _STATE.clear()
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        _STATE["key"], _STATE["state"] = key, ShapeState(shape, dtype, device)
    return _STATE["state"]


def _case_id(case):
    return "-".join(case)


@pytest.mark.parametrize("shape_name,dtype_name,provider,mode", CASES, ids=map(_case_id, CASES))
def test_loss(benchmark, shape_name, dtype_name, provider, mode):
    shape = shape_registry.get(shape_name)
    skip_unless_shape_runs_here(shape)
    device = torch.device(shape.device)
    if provider != FLOOR:
        reason = PROVIDERS[provider].unavailable(device)
        if reason:
            pytest.skip(reason)
    dtype = DTYPES[dtype_name]
    reason = None
    try:
        _run_case(benchmark, shape, dtype, device, provider, mode)
    except torch.cuda.OutOfMemoryError:
        reason = f"out of memory on {device_name(device)} ({shape.name}, {dtype_name}, {provider})"
    except (AssertionError, pytest.skip.Exception):
        raise
    except Exception as e:  # a third-party peer that rejects this case (version, dtype) is skipped, not failed
        if provider == FLOOR or not PROVIDERS[provider].partial:
            raise
        reason = f"{provider} raised {type(e).__name__}: {str(e)[:160]}"
    if reason:  # outside the except blocks, so the traceback and the tensors its frames hold are gone
        _STATE.clear()
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        pytest.skip(reason)


def _run_case(benchmark, shape, dtype, device, provider, mode):
    st = state_for(shape, dtype, device)
    plan = PLAN[device.type]
    order = itertools.cycle(range(len(st.sets)))
    box = {}
    info = {}

    if provider == FLOOR:
        ops = [gemm_floor_ops(s, st.dz, mode) for s in st.sets]
        z = ops[0]() if mode == "forward" else None
        if z is not None:  # what is timed: the logits GEMM, against float64 on the first rows
            x, w = st.sets[0]["features"].detach()[:256], st.sets[0]["head_weight"].detach()
            err = rel_err(z[0][:256], x.double() @ w.double().t())
            assert err <= (2e-2 if dtype == torch.bfloat16 else 2e-3), f"GEMM floor error {err}"
            info["check_rel_err_loss"] = err

        def setup():
            sync(device)
            return (ops[next(order)],), {}

        def target(op):
            box["out"] = op()
        covers, partial, flops = "cuBLAS/BLAS doing only the unavoidable GEMMs", False, \
            shape_registry.flops(shape, mode)
    else:
        p = PROVIDERS[provider]
        info.update(st.check(provider))
        fn = st.provider_fn(provider)
        if provider == "fused":
            info["backend"] = fused_backend(device)

        def setup():
            inputs = st.sets[next(order)]
            clear_grads(inputs)
            if mode == "backward":
                box["loss"] = fn(inputs)
            sync(device)
            return (inputs,), {}

        def target(inputs):
            if mode == "forward":
                box["loss"] = fn(inputs)
            elif mode == "backward":
                box["loss"].backward()
            else:
                loss = fn(inputs)
                loss.backward()
                box["loss"] = loss
        covers, partial, flops = p.covers, p.partial, p.flops(shape, mode)

    def teardown(inputs_or_op):
        box.clear()
        if isinstance(inputs_or_op, dict):
            clear_grads(inputs_or_op)

    timer = make_timer(device)

    def one_call():
        args, _ = setup()
        start = timer()
        target(*args)
        dt = timer() - start
        teardown(*args)
        return dt

    one_call()
    t1 = one_call()
    rounds = int(min(plan["max_rounds"], max(plan["min_rounds"], math.ceil(plan["budget"] / max(t1, 1e-6)))))
    benchmark.group = f"{shape.name} {DTYPES_NAME[dtype]} {mode}"
    if device.type == "cuda":
        benchmark._timer = timer  # pytest-benchmark reads this attribute when it builds each round's runner
    benchmark.pedantic(target, setup=setup, teardown=teardown, rounds=rounds,
                       warmup_rounds=plan["warmup"], iterations=1)

    peak_extra = None
    if device.type == "cuda":
        args, _ = setup()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        target(*args)
        sync(device)
        peak_extra = torch.cuda.max_memory_allocated(device) - base
        teardown(*args)

    info.update(
        provider=provider, covers=covers, partial=partial, shape=shape.name, n=shape.n, d=shape.d,
        c=shape.c, dtype=DTYPES_NAME[dtype], mode=mode, device=device.type,
        device_name=device_name(device), **_versions(), threads=torch.get_num_threads(),
        input_sets=len(st.sets), rounds=rounds, flops=flops,
        peak_extra_bytes=peak_extra,
        peak_extra_mib=None if peak_extra is None else peak_extra / 2**20,
    )
    stats = getattr(getattr(benchmark, "stats", None), "stats", None)
    if stats is not None:
        median = stats.median
        floor = st.floor_median(mode)
        info.update(median_ms=median * 1e3, tflops=flops / median / 1e12, gemm_floor_ms=floor * 1e3,
                    gemm_floor_ratio=median / floor)
    benchmark.extra_info.update(info)


DTYPES_NAME = {v: k for k, v in DTYPES.items()}
