"""What the GPU would compile, without a GPU: registers, spills, shared memory and wgmma use of every
Triton kernel the loss launches, specialized exactly as at run time.

    python -m dhkd_kernels compile-report [--arch 90] [--json OUT.json] [--shapes imagenet-r18,...]

How: the real host code (``dhkd_kernels.simulate``) runs forward + backward on ``meta`` tensors under
a stand-in Triton driver that reports an sm_<arch> target. Every launch goes through
``JITFunction.warmup`` with the launch's own arguments, so the specialization (16-divisible sizes and
pointers, sizes equal to 1, dtypes, constexprs, num_warps/num_stages) is the one a GPU run would
compile; meta tensors have data pointers at the same offsets from a 0 base as the caching
allocator's 512-byte-aligned blocks. The cubins are read with Triton's bundled ``cuobjdump``
(REG = registers per thread, STACK = the stack frame, which holds the spills; LOCAL = local memory),
the PTX is searched for ``wgmma`` (Hopper tensor-core instructions), and shared memory is Triton's
own figure. Must run without TRITON_INTERPRET (the kernels must be JIT functions, not interpreted).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile

SHAPE_NAMES = ("imagenet-r18", "imagenet-r50", "imagenet-r50-bigbatch", "imagenet21k", "llm-32k", "llm-128k")
DTYPES = ("bf16", "fp32", "tf32")  # fp32 = TF32 off (PyTorch's default), tf32 = TF32 on


def _stand_in_driver(arch: int):
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.backends.driver import DriverBase

    class StandIn(DriverBase):
        """Reports an NVIDIA sm_<arch> device; runs nothing."""

        @classmethod
        def is_active(cls):
            return True

        def __init__(self):
            pass

        def map_python_to_cpp_type(self, ty):
            return ty

        def get_current_target(self):
            return GPUTarget("cuda", arch, 32)

        def get_active_torch_device(self):
            return torch.device("meta")

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_benchmarker(self):
            raise RuntimeError("the stand-in driver cannot time kernels")

    return StandIn()


def _cuobjdump() -> str:
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def _resources(cubin: bytes) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        out = subprocess.run([_cuobjdump(), "--dump-resource-usage", path], capture_output=True, text=True,
                             check=True).stdout
    finally:
        os.unlink(path)
    found = {k: int(v) for k, v in re.findall(r"\b(REG|STACK|LOCAL|SHARED):(\d+)", out)}
    return dict(regs=found.get("REG", -1), stack=found.get("STACK", -1), local=found.get("LOCAL", -1))


def collect(shapes=SHAPE_NAMES, dtypes=DTYPES, arch: int = 90) -> list:
    """One record per distinct compiled kernel: name, where it was launched (shape, dtype), its
    constexprs and launch options, and the resources read from the cubin."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("the compile report needs TRITON_INTERPRET unset (compiled, not interpreted, kernels)")
    from triton.runtime.driver import driver

    from . import cost
    from .ops import _launch
    from .simulate import simulate

    by_name = {name: (n, d, c) for name, n, d, c in cost.SHAPES}
    seen = {}
    where = {}

    def on_compile(name, kernel):
        key = hashlib.sha1(kernel.asm["cubin"]).hexdigest()
        if key not in seen:
            ptx = kernel.asm.get("ptx", "")
            md = kernel.metadata
            names = kernel.src.fn.arg_names
            consts = {names[k[0]] if isinstance(k, tuple) else str(k): v
                      for k, v in (getattr(kernel.src, "constants", None) or getattr(kernel.src, "constexprs", {})).items()}
            seen[key] = dict(kernel=name, num_warps=md.num_warps, num_stages=md.num_stages,
                             shared=int(md.shared), wgmma="wgmma" in ptx, **_resources(kernel.asm["cubin"]))
            seen[key]["constexprs"] = {k: v for k, v in consts.items() if isinstance(v, (bool, int, str))}
        where.setdefault(key, []).append(where_now[0])

    where_now = [None]
    previous = driver._active  # no default driver exists on a machine without a GPU
    driver.set_active(_stand_in_driver(arch))
    _launch._COMPILE_ON_META = on_compile
    try:
        for shape in shapes:
            n, d, c = by_name[shape]
            for dtype in dtypes:
                where_now[0] = f"{shape}/{dtype}"
                simulate(n, d, c, dtype=dtype)
    finally:
        _launch._COMPILE_ON_META = None
        driver._active = previous
    out = []
    for key, rec in seen.items():
        rec = dict(rec, launched_at=sorted(set(where[key])), id=key[:12])
        out.append(rec)
    return out


def markdown(records: list, arch: int = 90) -> str:
    lines = [f"Compile report, sm_{arch}, run-time specialization (`python -m dhkd_kernels compile-report`):", "",
             "| kernel | config | warps/stages | registers | stack (spill) B | shared KiB | wgmma | launched at |",
             "|---|---|---|---|---|---|---|---|"]
    for r in sorted(records, key=lambda r: (r["kernel"], str(r["launched_at"]))):
        cfg = ", ".join(f"{k}={v}" for k, v in r["constexprs"].items() if k.startswith("BLOCK") or k in
                        ("HEADS", "SUM2", "TWO", "MAIN", "AUX", "SHARED", "KD_STATS", "GRAD_CE", "GRAD_KD",
                         "GRAD_AUX", "COLSUM1", "COLSUM2"))
        at = r["launched_at"]
        at_s = ", ".join(at[:3]) + (f" (+{len(at) - 3})" if len(at) > 3 else "")
        lines.append(f"| {r['kernel']} | {cfg} | {r['num_warps']}/{r['num_stages']} | {r['regs']} | {r['stack']} | "
                     f"{r['shared'] / 1024:.0f} | {'yes' if r['wgmma'] else 'no'} | {at_s} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, default=90)
    p.add_argument("--json", default=None, help="write the records as JSON here")
    p.add_argument("--shapes", default=",".join(SHAPE_NAMES))
    p.add_argument("--dtypes", default=",".join(DTYPES))
    args = p.parse_args(argv)
    records = collect(args.shapes.split(","), args.dtypes.split(","), args.arch)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(records, f, indent=1)
    print(markdown(records, args.arch))
    bad = [r for r in records if r["stack"] != 0 or r["local"] != 0]
    if bad:
        print(f"\n{len(bad)} kernel(s) spill: " + ", ".join(r["kernel"] for r in bad), file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
