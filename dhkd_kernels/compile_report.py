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


_INSTR = re.compile(r"^\s+/\*([0-9a-f]+)\*/\s+(?:@!?U?P[0-7T] )?([A-Z][A-Z0-9_.]*)(.*?);", re.M)
_BRANCH_TARGET = re.compile(r"0x([0-9a-f]+)")
_LOAD_WIDTH = {"128": 128, "64": 64, "U16": 16, "S16": 16, "U8": 8, "S8": 8}


def _sass(cubin: bytes) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        return subprocess.run([_cuobjdump(), "-sass", path], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(path)


def _width(op: str) -> int:
    """Bits per thread of a global load/store opcode (LDG.E.128 -> 128, LDG.E -> 32, LDG.E.U16 -> 16)."""
    for suffix, bits in _LOAD_WIDTH.items():
        if op.endswith("." + suffix):
            return bits
    return 32


def sass_metrics(sass: str) -> dict:
    """What the SASS says: its loops (a backward branch closes one: [target, branch]) with their
    instruction counts, the global load and store widths (whole kernel, and loads inside loops),
    cp.async (LDGSTS) and TMA (UTMALDG) loads, and barriers inside loops."""
    instrs = [(int(a, 16), op, rest) for a, op, rest in _INSTR.findall(sass)]
    loops = []
    for addr, op, rest in instrs:
        if op == "BRA":
            m = _BRANCH_TARGET.search(rest)
            if m and int(m.group(1), 16) < addr:
                loops.append((int(m.group(1), 16), addr))
    outer = [lp for lp in loops if not any(o != lp and o[0] <= lp[0] and lp[1] <= o[1] for o in loops)]

    def in_loop(addr):
        return any(lo <= addr <= hi for lo, hi in outer)

    loads, stores, loop_loads = {}, {}, {}
    for addr, op, _ in instrs:
        if op.startswith("LDG."):
            w = _width(op)
            loads[w] = loads.get(w, 0) + 1
            if in_loop(addr):
                loop_loads[w] = loop_loads.get(w, 0) + 1
        elif op.startswith("STG."):
            w = _width(op)
            stores[w] = stores.get(w, 0) + 1
    return dict(loop_instructions=[(hi - lo) // 16 + 1 for lo, hi in sorted(outer)], loads=loads,
                loop_loads=loop_loads, stores=stores,
                ldgsts=sum(op.startswith("LDGSTS") for _, op, _ in instrs),
                tma=sum(op.startswith("UTMALDG") for _, op, _ in instrs),
                loop_barriers=sum(op.startswith("BAR") and in_loop(a) for a, op, _ in instrs))


def _loop_bodies(ir: str) -> list:
    """The bodies of the scf.for loops of a TTGIR module (text between each ``scf.for`` and its brace)."""
    bodies = []
    for m in re.finditer(r"scf\.for\b", ir):
        start = ir.rindex("{", m.start(), ir.index("\n", m.end()))  # the brace that ends the loop's line
        depth, i = 0, start
        while i < len(ir):
            if ir[i] == "{":
                depth += 1
            elif ir[i] == "}":
                depth -= 1
                if depth == 0:
                    break
            i += 1
        bodies.append(ir[start:i])
    return bodies


def pipelining(ttgir: str):
    """For a kernel with dot products: True when every K loop that holds a dot takes its operands from
    asynchronous copies (cp.async or TMA) into shared memory, with no register tile stored to shared
    memory inside the loop (a synchronous operand load) and no wait for all outstanding dots
    (``pendings = 0``) inside it; None for a kernel without dots."""
    dot_loops = [b for b in _loop_bodies(ttgir) if re.search(r"warp_group_dot |tt\.dot ", b)]
    if not dot_loops:
        return None
    return all(("async_copy_global_to_local" in b or "async_tma_copy" in b)
               and not re.search(r"ttg\.local_alloc %", b) and "pendings = 0" not in b for b in dot_loops)


OPTION_CASES = {  # the LLM options at one LLM shape: their epilogue and finalize variants
    "softcap+z-loss": dict(softcap=30.0, teacher_softcap=50.0, z_loss_weight=1e-4),
    "reverse-kl": dict(kd_divergence="reverse_kl"),
    "jsd": dict(kd_divergence="jsd", jsd_beta=0.5),
}


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

    def on_compile(name, kernel, launch_key):
        key = hashlib.sha1(kernel.asm["cubin"]).hexdigest()
        keys.setdefault(key, set()).add(launch_key)
        if key not in seen:
            ptx = kernel.asm.get("ptx", "")
            md = kernel.metadata
            names = kernel.src.fn.arg_names
            consts = {names[k[0]] if isinstance(k, tuple) else str(k): v
                      for k, v in (getattr(kernel.src, "constants", None) or getattr(kernel.src, "constexprs", {})).items()}
            seen[key] = dict(kernel=name, num_warps=md.num_warps, num_stages=md.num_stages,
                             shared=int(md.shared), wgmma="wgmma" in ptx, **_resources(kernel.asm["cubin"]),
                             pipelined=pipelining(kernel.asm.get("ttgir", "")),
                             **sass_metrics(_sass(kernel.asm["cubin"])))
            seen[key]["constexprs"] = {k: v for k, v in consts.items() if isinstance(v, (bool, int, str))}
            cx = seen[key]["constexprs"]
            if name in ("epilogue_kernel", "grad_kernel"):  # SASS instructions per thread per logit, summed over the passes
                per_thread = cx["BLOCK_R"] * cx["BLOCK_C"] / (md.num_warps * 32)
                seen[key]["instr_per_logit"] = round(sum(seen[key]["loop_instructions"]) / per_thread, 1)
        where.setdefault(key, []).append(where_now[0])

    where_now = [None]
    keys = {}
    previous = driver._active  # no default driver exists on a machine without a GPU
    driver.set_active(_stand_in_driver(arch))
    _launch._COMPILE_ON_META = on_compile
    try:
        for shape in shapes:
            n, d, c = by_name[shape]
            for dtype in dtypes:
                where_now[0] = f"{shape}/{dtype}"
                simulate(n, d, c, dtype=dtype)
                if shape.startswith("llm"):  # the teacher as hidden states + LM head (cost table 2)
                    where_now[0] = f"{shape}/{dtype}/teacher-head"
                    simulate(n, d, c, dtype=dtype, teacher_width=4096, kd_weight=0.0)
                if shape == "llm-128k" and dtype == "bf16":  # the LLM options, each on
                    for label, opts in OPTION_CASES.items():
                        where_now[0] = f"{shape}/{dtype}/{label}"
                        simulate(n, d, c, dtype=dtype, **opts)
    finally:
        _launch._COMPILE_ON_META = None
        driver._active = previous
    out = []
    for key, rec in seen.items():
        rec = dict(rec, launched_at=sorted(set(where[key])), id=key[:12],
                   launch_keys=sorted(keys[key]))
        out.append(rec)
    return out


def _widths(d: dict) -> str:
    return " ".join(f"{k}:{v}" for k, v in sorted(((int(k), v) for k, v in d.items()), reverse=True)) or "-"


def markdown(records: list, arch: int = 90) -> str:
    import triton
    lines = [f"Compile report, sm_{arch}, triton {triton.__version__}, run-time specialization "
             "(`python -m dhkd_kernels compile-report`). Loads: global loads by bits per thread (bits:count, "
             "whole kernel / inside loops); cp.async: LDGSTS count; pipelined: every dot loop fed by async "
             "copies with no full wait inside; instr/logit: SASS instructions per thread per logit in the "
             "epilogue's class loops.", "",
             "| kernel | config | warps/stages | registers | stack (spill) B | shared KiB | wgmma | loads | "
             "loads in loops | cp.async | pipelined | instr/logit | launched at |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(records, key=lambda r: (r["kernel"], str(r["launched_at"]))):
        cfg = ", ".join(f"{k}={v}" for k, v in r["constexprs"].items() if k.startswith("BLOCK") or k in
                        ("HEADS", "SUM2", "TWO", "MAIN", "AUX", "SHARED", "KD_STATS", "GRAD_CE", "GRAD_KD",
                         "GRAD_AUX", "VEC")
                        or (k in ("ZLOSS", "CAP", "TCAP", "ZL_IN") and v) or (k == "DIV" and v))
        at = r["launched_at"]
        at_s = ", ".join(at[:3]) + (f" (+{len(at) - 3})" if len(at) > 3 else "")
        pipe = {True: "yes", False: "**no**", None: "-"}[r.get("pipelined")]
        lines.append(f"| {r['kernel']} | {cfg} | {r['num_warps']}/{r['num_stages']} | {r['regs']} | {r['stack']} | "
                     f"{r['shared'] / 1024:.0f} | {'yes' if r['wgmma'] else 'no'} | {_widths(r['loads'])} | "
                     f"{_widths(r['loop_loads'])} | {r['ldgsts']} | {pipe} | {r.get('instr_per_logit', '-')} | "
                     f"{at_s} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, default=90)
    p.add_argument("--json", default=None, help="write the records as JSON here")
    p.add_argument("--facts", action="store_true",
                   help="write the compiled facts the cost model reads (dhkd_kernels/compiled/sm<arch>-triton-<v>.json)")
    p.add_argument("--shapes", default=",".join(SHAPE_NAMES))
    p.add_argument("--dtypes", default=",".join(DTYPES))
    args = p.parse_args(argv)
    records = collect(args.shapes.split(","), args.dtypes.split(","), args.arch)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(records, f, indent=1)
    if args.facts:
        from .compiled_model import facts_from_records, facts_path
        path = facts_path(arch=args.arch)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            json.dump(facts_from_records(records), f, indent=1, sort_keys=True)
        os.replace(path + ".tmp", path)
    print(markdown(records, args.arch))
    bad = [r for r in records if r["stack"] != 0 or r["local"] != 0]
    if bad:
        print(f"\n{len(bad)} kernel(s) spill: " + ", ".join(r["kernel"] for r in bad), file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
