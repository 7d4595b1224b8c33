"""One GPU lease, the whole picture: headline timings, GPU correctness and training throughput.

    python benchmarks/gpu_check.py --out DIR                    # on a GPU machine, ~6 min on an H200
    python benchmarks/gpu_check.py --plan-only                  # CPU: distinct compiles and time, per stage
    python benchmarks/gpu_check.py --smoke-cpu --out DIR        # CPU: the whole pipeline at toy sizes
    python benchmarks/gpu_check.py --out DIR --wheels .whl      # also time Liger-Kernel / cut-cross-entropy

Stages, in the order a user needs them, each in its own subprocess with its own wall-clock budget
counted from its own start, each writing ``DIR/stage_<name>.{json,md}`` atomically as it goes, so a
crash, an OOM or a sticky CUDA error loses at most the stage in progress:

1. ``headline``: forward+backward median ms and peak extra memory, bf16 at every GPU benchmark shape
   and fp32 at imagenet-r50-bigbatch. Providers: the fused loss under its automatic plan and under the
   other resident engine where one applies, the cuBLAS GEMM floor, the torch path, Liger-Kernel's fused
   linear cross-entropy and cut-cross-entropy when importable (partial peers: main-head CE only), then,
   while the budget lasts, torch.compile of the reference. Written after every shape.
2. ``correctness``: a compact matrix against float64 (fp32 with TF32 on and off, bf16, fp16, both logit
   losses, ignored rows, Da != D, a forced chunked plan with several slabs and chunks, N = 1 / C = 1,
   garbage in ignored rows, bitwise determinism, CUDA-graph capture); at most 34 distinct compiles.
3. ``train``: the ResNet-34 -> ResNet-18 DHKD step at batch 256 (bf16 autocast, channels_last), eager
   and torch.compile, fused loss against the eager loss; img/s and the loss's share of the step.

``DIR/gpu_check.{json,md}`` combine the stages (status, compile count and compile time of each).
``benchmarks/report.py gpu DIR/gpu_check.json`` renders the docs section and charts from it.
Exit status: 0 all stages ran and every check passed, 1 a check failed or a stage crashed, 2 no GPU.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

STAGES = ("headline", "correctness", "train")
BUDGET_S = {"headline": 140.0, "correctness": 115.0, "train": 115.0}  # 370 s in all
TOTAL_BUDGET_S = 370.0
# kernel v3's specializations (GEMM tiles by shape, VEC; 31 today: the cuBLAS cases run the split gradient
# pass) at 2.5 s each, within 115 s
MAX_CORRECTNESS_COMPILES = 34
GRACE_S = 45.0           # a stage is killed this long after its budget (its start-up and last write)
CALL_LIMIT_S = 540.0     # one device call (600 s) less a minute for the transfers and the machine's start
# what one full run can take: every stage's kill timeout, plus this process's own start-up
WORST_CASE_S = sum(BUDGET_S.values()) + GRACE_S * len(STAGES) + 15.0
assert WORST_CASE_S <= CALL_LIMIT_S, WORST_CASE_S
OPTS = dict(ce_weight=1.0, kd_weight=1.0, logit_weight=1.0, kd_temperature=4.0, logit_temperature=2.0,
            logit_loss="binary_kl_norm")
LEAVES = ("features", "head_weight", "head_bias", "aux_weight", "aux_bias", "aux_features")
POS = ("features", "head_weight", "head_bias", "aux_weight", "aux_bias", "teacher_logits", "labels")
# Assumptions of the --plan-only estimate (seconds), replaced by the measured figures each run records:
T_STAGE_START = 15.0     # interpreter, torch import, CUDA context, first inputs
T_TRITON_COMPILE = 2.5   # one distinct Triton specialization (2.7 s measured on the 2-core CI machine)
T_INDUCTOR = 25.0        # one torch.compile graph of the reference, forward + backward (16 compile threads)
T_INDUCTOR_MODEL = 40.0  # torch.compile of one ResNet (the training stage compiles the student and the teacher)
T_CASE = 0.6             # warm-up and timing overhead of one timed case, besides its kernels
CALLS_PER_CASE = 20      # do_bench(warmup=10, rep=60 ms): about 20 calls of a slow case
TORCH_PATH_MAX_LOGITS = 50_000_000  # the torch path is timed up to N C = 50M (the ImageNet shapes)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--out", default=None, help="results directory (default gpu_check_results)")
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma list from {STAGES}")
    p.add_argument("--budget-s", type=float, default=None,
                   help="seconds for the stage named by --stage (default: its share, see BUDGET_S)")
    p.add_argument("--plan-only", action="store_true",
                   help="CPU: count each stage's distinct Triton compiles as the JIT would specialize them "
                        "on sm_90, estimate the wall time, exit 1 if a stage or the total exceeds its budget")
    p.add_argument("--smoke-cpu", action="store_true",
                   help="run the stages at toy sizes on CPU (Triton interpreter): tests the pipeline, not the GPU")
    p.add_argument("--wheels", default=None,
                   help="directory of liger-kernel / cut-cross-entropy wheels to install for the run (docs/benchmarks.md)")
    p.add_argument("--stage", default=None, help=argparse.SUPPRESS)  # internal: run one stage in this process
    p.add_argument("--crash-stage", default=None,
                   help="test switch: make this stage abort part-way (the others must keep their results)")
    args = p.parse_args(argv)
    for s in args.stages.split(","):
        if s not in STAGES:
            raise SystemExit(f"--stages: unknown stage {s!r}; choose from {STAGES}")
    return args


# ----------------------------------------------------------------------------- files

def write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def environment(smoke=False) -> dict:
    import torch
    env = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               torch=torch.__version__, cuda=torch.version.cuda, python=platform.python_version(),
               gpu=None, driver=None, triton=None)
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        pass
    if smoke:
        env["gpu"] = "none (--smoke-cpu: Triton interpreter on CPU, toy sizes)"
    elif torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
        try:
            env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[0]
        except Exception:
            env["driver"] = None
    return env


class StageOutput:
    """A stage's results, rewritten atomically (JSON and Markdown) whenever ``save`` is called."""

    def __init__(self, out_dir, name, env, budget_s):
        self.out_dir, self.name = out_dir, name
        self.t0 = time.time()
        self.data = dict(stage=name, env=env, budget_s=budget_s, status="running", rows=[], checks=[], log=[],
                         compiles=0, compile_s=0.0)

    def elapsed(self) -> float:
        return time.time() - self.t0

    def log(self, msg: str) -> None:
        print(f"[{self.name} {self.elapsed():5.0f}s] {msg}", flush=True)
        self.data["log"].append(msg)

    def save(self, status=None) -> None:
        if status:
            self.data["status"] = status
        self.data["wall_s"] = self.elapsed()
        os.makedirs(self.out_dir, exist_ok=True)
        write_atomic(os.path.join(self.out_dir, f"stage_{self.name}.json"), json.dumps(self.data, indent=1))
        write_atomic(os.path.join(self.out_dir, f"stage_{self.name}.md"), stage_markdown(self.data))


# ----------------------------------------------------------------------------- compile accounting

def our_kernels():
    from dhkd_kernels.ops import _epilogue_kernels as E
    from dhkd_kernels.ops import _gemm_kernels as G
    import triton
    out = []
    for mod in (E, G):
        for v in vars(mod).values():
            if isinstance(v, triton.runtime.jit.JITFunction) and "kernel" in v.fn.__name__:
                out.append(v)
    return out


def compiled_count() -> int:
    """Specializations compiled so far by this process's dhkd kernels (every Triton version keeps the
    kernel cache first in ``device_caches[device]``)."""
    total = 0
    for k in our_kernels():
        for entry in getattr(k, "device_caches", {}).values():
            total += len(entry[0])
    return total


class CompileClock:
    """Compile count and time of a block: Triton compiles of our kernels and torch.compile warm-ups."""

    def __init__(self, stage: StageOutput):
        self.stage = stage

    def __enter__(self):
        self.n0, self.t0 = compiled_count(), time.time()
        return self

    def __exit__(self, *exc):
        new = compiled_count() - self.n0
        self.stage.data["compiles"] += new
        if new:  # the first call of a case pays its compiles; its time is an upper bound on theirs
            self.stage.data["compile_s"] += time.time() - self.t0
        return False


# ----------------------------------------------------------------------------- inputs and timing

def make_inputs(n, d, c, *, dtype, device, da=None, bias=True, ignore_frac=0.1, seed=0, logit_scale=2.0,
                teacher_scale=3.0):
    import torch
    g = torch.Generator(device=device).manual_seed(seed)

    def r(*shape, std=1.0):
        return torch.randn(*shape, generator=g, device=device) * std

    out = dict(features=r(n, d), head_weight=r(c, d, std=logit_scale / math.sqrt(d)),
               head_bias=r(c, std=0.1) if bias else None,
               aux_weight=r(c, da or d, std=logit_scale / math.sqrt(da or d)),
               aux_bias=r(c, std=0.1) if bias else None, aux_features=None if da is None else r(n, da))
    out = {k: (None if v is None else v.to(dtype).requires_grad_(True)) for k, v in out.items()}
    out["teacher_logits"] = r(n, c, std=teacher_scale).to(dtype)
    y = torch.randint(0, c, (n,), generator=g, device=device)
    if ignore_frac:
        y[torch.rand(n, generator=g, device=device) < ignore_frac] = -100
    out["labels"] = y
    return out


def recast(inp, dtype):
    out = {}
    for k, v in inp.items():
        if v is None or k == "labels":
            out[k] = v
        elif k == "teacher_logits":
            out[k] = v.detach().to(dtype)
        else:
            out[k] = v.detach().to(dtype).requires_grad_(True)
    return out


def rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    if not bool((a.isfinite()).all()):
        return float("inf")
    nb = b.norm().item()
    return (a - b).norm().item() / nb if nb > 0 else (a - b).norm().item()


def loss_and_grads(inp, backend, **opts):
    from dhkd_kernels import fused_dual_head_kd_loss
    inp = recast(inp, inp["features"].dtype)
    loss = fused_dual_head_kd_loss(*[inp[k] for k in POS], aux_features=inp["aux_features"], backend=backend,
                                   **opts)
    (2.0 * loss).backward()
    return loss.detach(), {k: inp[k].grad for k in LEAVES if inp[k] is not None}


class CudaMemory:
    """The allocator counters ``peak_extra_bytes`` reads (a stand-in replaces it in the tests)."""

    sync = staticmethod(lambda: __import__("torch").cuda.synchronize())
    allocated = staticmethod(lambda: __import__("torch").cuda.memory_allocated())
    reset_peak = staticmethod(lambda: __import__("torch").cuda.reset_peak_memory_stats())
    peak = staticmethod(lambda: __import__("torch").cuda.max_memory_allocated())


def peak_extra_bytes(step, clear, grad_bytes, mem=CudaMemory):
    """Peak bytes one ``step`` allocates beyond what is live before it (inputs; the previous step's
    gradients freed by ``clear`` first) and beyond the ``grad_bytes`` of gradients it leaves."""
    clear()
    mem.sync()
    mem.reset_peak()
    before = mem.allocated()
    step()
    mem.sync()
    return mem.peak() - before - grad_bytes


def time_ms(step, device_type: str, rep_ms: float = 60.0) -> float:
    """Median ms of ``step`` after warm-up: CUDA events on a GPU (``triton.testing.do_bench``),
    ``time.perf_counter`` on CPU."""
    if device_type == "cuda":
        from triton.testing import do_bench
        return float(do_bench(step, warmup=10, rep=rep_ms, return_mode="median"))
    t0 = time.perf_counter()  # CPU (--smoke-cpu): one call after the warm-up, a pipeline check only
    step()
    return (time.perf_counter() - t0) * 1e3


def _free(device_type):
    if device_type == "cuda":
        import torch
        try:
            torch.cuda.empty_cache()
        except Exception:  # a sticky CUDA error makes even this raise; the stage ends right after
            pass


def _sticky(e: BaseException) -> bool:
    msg = str(e).lower()
    return any(s in msg for s in ("illegal memory access", "device-side assert", "unspecified launch failure",
                                  "cuda error: misaligned", "an illegal instruction"))


# ----------------------------------------------------------------------------- providers

def _leaves(inp):
    return [inp[k] for k in LEAVES if inp[k] is not None]


def loss_step(inp, fn):
    """(step, clear) for one forward+backward of ``fn(*positional, aux_features=...)``."""
    leaves = _leaves(inp)
    args = [inp[k] for k in POS]

    def clear():
        for p in leaves:
            p.grad = None

    def step():
        clear()
        fn(*args, aux_features=inp["aux_features"]).backward()
    return step, clear


def fused_fn(engine=None, backend="triton"):
    from dhkd_kernels import fused_dual_head_kd_loss
    from dhkd_kernels.ops import _plan

    def fn(*args, aux_features=None):
        saved = _plan._ENGINE
        try:
            if engine:
                _plan._ENGINE = engine
            return fused_dual_head_kd_loss(*args, aux_features=aux_features, backend=backend, **OPTS)
        finally:
            _plan._ENGINE = saved
    return fn


def floor_step(inp):
    """cuBLAS only, the aligned GEMM floor: Z = X [W1;W2]^T, dX = dZ [W1;W2], dW = dZ^T X, with Z's row
    stride padded to a multiple of 64 elements as the fused loss pads its own (an odd 2C, 43682 at
    imagenet21k, would put cuBLAS off its TMA/wgmma kernels and flatter the fused loss's ratio)."""
    import torch
    x = inp["features"].detach()
    w = torch.cat([inp["head_weight"].detach(), inp["aux_weight"].detach()], 0)
    c2 = w.shape[0]
    dz = torch.empty(x.shape[0], -(-c2 // 64) * 64, dtype=x.dtype, device=x.device)[:, :c2]

    def step():
        torch.mm(x, w.t(), out=dz)
        torch.mm(dz, w)
        torch.mm(dz.t(), x)
    return step, lambda: None


def peer_fns():
    """Partial peers that import: name -> fn computing main-head CE from features + head weight."""
    peers = {}
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        def liger(*args, aux_features=None):
            return liger_fused_linear_cross_entropy(args[0], args[1], args[6], bias=args[2])
        peers["liger FLCE (main-head CE only)"] = liger
    except Exception:
        pass
    try:
        from cut_cross_entropy import linear_cross_entropy

        def cce(*args, aux_features=None):
            return linear_cross_entropy(args[0], args[1], args[6], bias=args[2])
        peers["cut-cross-entropy (main-head CE only)"] = cce
    except Exception:
        pass
    return peers


def headline_cases(smoke=False):
    """[(shape name, N, D, C, dtype name)] in the order they are timed."""
    from benchmarks import shapes
    if smoke:
        return [("toy", 16, 8, 24, "bf16"), ("toy", 16, 8, 24, "fp32")]
    cases = [(s.name, s.n, s.d, s.c, "bf16") for s in shapes.GPU_SHAPES]
    s = shapes.get("imagenet-r50-bigbatch")
    return cases + [(s.name, s.n, s.d, s.c, "fp32")]


# torch.compile of the reference, in this order while the headline budget lasts: the ImageNet-1k shapes
# first (the "5x faster than torch.compile" target), then the LLM and ImageNet-21k shapes
COMPILE_PRIORITY = ("imagenet-r18", "imagenet-r50-bigbatch", "llm-128k", "imagenet21k", "imagenet-r50", "llm-32k")


def _variants(n, d, c, dtname):
    """The fused plans to time at a shape: the automatic one, and the other resident engine where the
    logits fit and tensor cores apply (names as Plan.describe())."""
    plan = _plan_of(n, d, c, dtname)
    out = [("fused " + plan.describe(), None)]
    if plan.resident and dtname != "fp32":
        other = "cublas" if plan.engine == "triton" else "triton"
        out.append((f"fused resident/{other}", other))
    return out


def _plan_of(n, d, c, dtname, engine=None):
    import torch
    from dhkd_kernels.ops import _plan
    from dhkd_kernels.ops import dual_head_kd as dhk
    dt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtname]
    o = dhk._opts_from(1.0, 1.0, 1.0, 4.0, 2.0, True, -100, True, False, False)
    x = torch.empty(n, d, dtype=dt, device="meta")
    w = torch.empty(c, d, dtype=dt, device="meta")
    saved = _plan._ENGINE
    try:
        if engine:
            _plan._ENGINE = engine
        return dhk.make_plan(dhk._work(x, w, None, n, c, o, [True] * 6), torch.device("meta"))
    finally:
        _plan._ENGINE = saved


def stage_headline(st: StageOutput, args) -> None:
    import torch
    from dhkd_kernels import reference
    dev = "cpu" if args.smoke_cpu else "cuda"
    budget = st.data["budget_s"]
    peers = {} if args.smoke_cpu else peer_fns()
    st.data["peers"] = sorted(peers) or ["none importable (see docs/benchmarks.md, --wheels)"]
    rows = st.data["rows"]
    inputs_cache = {}
    for name, n, d, c, dtname in headline_cases(args.smoke_cpu):
        dt = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtname]
        row = dict(shape=name, N=n, D=d, C=c, dtype=dtname, cells={})
        rows.append(row)
        if st.elapsed() > budget:
            row["skipped"] = "time budget"
            st.save()
            continue
        if dev == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = False
        try:
            inp = make_inputs(n, d, c, dtype=dt, device=dev, ignore_frac=0.0, seed=1)
        except Exception as e:
            row["error"] = f"inputs: {type(e).__name__}: {e}"[:300]
            st.save()
            _free(dev)
            continue
        grad_bytes = sum(v.numel() * v.element_size() for v in _leaves(inp))
        providers = [(label, (lambda eng=eng: loss_step(inp, fused_fn(eng)))) for label, eng in _variants(n, d, c, dtname)]
        providers += [("gemm floor", lambda: floor_step(inp))]
        if n * c <= TORCH_PATH_MAX_LOGITS:
            providers += [("torch path", lambda: loss_step(inp, fused_fn(backend="torch")))]
        providers += [(label, (lambda f=f: loss_step(inp, f))) for label, f in peers.items()]
        for label, make in providers:
            if st.elapsed() > budget:
                row["cells"][label] = dict(error="skipped: time budget")
                continue
            if _time_cell(st, row, label, make, grad_bytes if label != "gemm floor" else 0, dev):
                return
        if name in COMPILE_PRIORITY[:3] or args.smoke_cpu:
            inputs_cache[(name, dtname)] = (inp, grad_bytes)
        else:
            del inp
        _free(dev)
        st.save()
    # torch.compile of the reference, while the budget lasts (its compile dominates its cost)
    if args.smoke_cpu:
        order = list(inputs_cache)[:1]
    else:
        order = [(s, "bf16") for s in COMPILE_PRIORITY]
    for key in order:
        row = next((r for r in rows if (r["shape"], r["dtype"]) == key), None)
        if row is None or "skipped" in row:
            continue
        left = budget - st.elapsed()
        if left < (5 if args.smoke_cpu else T_INDUCTOR + 5):
            row["cells"]["torch.compile(reference)"] = dict(error="skipped: time budget")
            continue
        if key in inputs_cache:
            inp, grad_bytes = inputs_cache[key]
        else:
            dt = torch.bfloat16
            inp = make_inputs(row["N"], row["D"], row["C"], dtype=dt, device=dev, ignore_frac=0.0, seed=1)
            grad_bytes = sum(v.numel() * v.element_size() for v in _leaves(inp))
        torch._dynamo.reset()
        compiled = torch.compile(lambda *a, aux_features=None: reference.dual_head_kd_loss(
            *a, aux_features=aux_features, **OPTS), dynamic=False,
            backend="aot_eager" if args.smoke_cpu else "inductor")  # CPU smoke: the code path, not inductor
        if _time_cell(st, row, "torch.compile(reference)", lambda: loss_step(inp, compiled), grad_bytes, dev,
                      inductor=True):
            return
        inputs_cache.pop(key, None)
        del inp
        _free(dev)
        st.save()


def _time_cell(st, row, label, make, grad_bytes, dev, inductor=False) -> bool:
    """Time one provider at one shape into ``row``; returns True when the stage must stop (a sticky
    CUDA error), after saving what it has."""
    t0 = time.time()
    try:
        with CompileClock(st):
            step, clear = make()
            step()  # compile / warm-up
        if inductor:
            st.data["compile_s"] += time.time() - t0
            st.data.setdefault("inductor_graphs", 0)
            st.data["inductor_graphs"] += 1
        extra = peak_extra_bytes(step, clear, grad_bytes) if dev == "cuda" else None
        ms = time_ms(step, dev)
        clear()
        row["cells"][label] = dict(ms=ms, extra_mib=None if extra is None else extra / 2**20)
        st.log(f"{row['shape']} {row['dtype']} {label}: {ms:.3f} ms"
               + ("" if extra is None else f", extra {extra / 2**20:.0f} MiB") + f" ({time.time() - t0:.0f}s)")
    except Exception as e:
        row["cells"][label] = dict(error=("OOM" if "out of memory" in str(e).lower()
                                          else f"{type(e).__name__}: {e}"[:300]))
        st.log(f"{row['shape']} {label}: {row['cells'][label]['error']}")
        if _sticky(e):
            st.save(status="stopped: sticky CUDA error")
            return True
    finally:
        _free(dev)
    return False


# ----------------------------------------------------------------------------- correctness

def correctness_cases(smoke=False):
    """(name, shape kwargs, dtype, tf32, engine, budget bytes, loss opts, kind)."""
    if smoke:
        return [("bf16 shared", dict(n=20, d=8, c=35), "bf16", False, None, None, {}, "ref"),
                ("fp32 Da != D binary_kl", dict(n=9, d=5, c=7, da=3), "fp32", False, None, None,
                 dict(logit_loss="binary_kl"), "ref"),
                ("chunked plan", dict(n=40, d=6, c=45), "fp32", False, "cublas", 2048, {}, "ref"),
                ("determinism", dict(n=20, d=8, c=35), "bf16", False, None, None, {}, "det")]
    # Shapes chosen so that specializations are shared: N, D multiples of 16, C never one (1000, 4999,
    # 128250), so most cases reuse the kernels an earlier case compiled (--plan-only counts them).
    base = dict(n=320, d=96, c=1000)
    return [
        ("bf16 resident/triton", base, "bf16", False, None, None, {}, "ref"),
        ("garbage in ignored rows, masked classes", base, "bf16", False, None, None, {}, "garbage"),
        ("bitwise determinism", base, "bf16", False, None, None, {}, "det"),
        ("CUDA-graph capture", base, "bf16", False, None, None, {}, "graph"),
        ("bf16 Da=64", dict(base, da=64), "bf16", False, None, None, {}, "ref"),
        ("fp16 binary_kl", base, "fp16", False, None, None, dict(logit_loss="binary_kl"), "ref"),
        ("fp32 TF32 on (Triton GEMMs)", base, "fp32", True, None, None, dict(logit_loss="binary_kl"), "ref"),
        ("fp32 TF32 off (cuBLAS)", base, "fp32", False, None, None, {}, "ref"),
        ("bf16 chunked plan, several slabs and row chunks", dict(n=512, d=128, c=4999), "bf16", False, "cublas",
         4 * 2**20, {}, "ref"),
        ("bitwise determinism, chunked", dict(n=512, d=128, c=4999), "bf16", False, "cublas", 4 * 2**20, {}, "det"),
        ("bf16 C=128250", dict(n=256, d=128, c=128250), "bf16", False, None, None, {}, "ref"),
        ("bf16 teacher head, reduction none, label smoothing", dict(base, dt=64), "bf16", False, None, None,
         dict(reduction="none", label_smoothing=0.1), "ref"),
    ]


def _with_plan(engine, budget, tf32):
    import contextlib

    import torch
    from dhkd_kernels.ops import _plan

    @contextlib.contextmanager
    def ctx():
        saved = _plan._ENGINE, _plan.MEMORY_BUDGET_BYTES
        saved_tf32 = torch.backends.cuda.matmul.allow_tf32 if torch.cuda.is_available() else None
        try:
            if engine:
                _plan._ENGINE = engine
            if budget:
                _plan.MEMORY_BUDGET_BYTES = budget
            if saved_tf32 is not None:
                torch.backends.cuda.matmul.allow_tf32 = tf32
            yield
        finally:
            _plan._ENGINE, _plan.MEMORY_BUDGET_BYTES = saved
            if saved_tf32 is not None:
                torch.backends.cuda.matmul.allow_tf32 = saved_tf32
    return ctx()


def _check_ref(inp, dt, tf32, opts):
    """Errors against float64 of the same (rounded) inputs; the limit: 1e-5/1e-4 for fp32 (TF32: eager's
    own TF32 error), else 1.5 x eager PyTorch's error in that dtype + a floor."""
    import torch
    opts = dict(OPTS, **opts)
    ref_loss, ref_g = loss_and_grads(recast(inp, torch.float64), "reference", **opts)
    loss, g = loss_and_grads(inp, "triton", **opts)
    errs = {"loss": rel(loss, ref_loss), **{k: rel(g[k], ref_g[k]) for k in g}}
    if dt == torch.float32 and not tf32:
        limits = {k: (1e-5 if k == "loss" else 1e-4) for k in errs}
    else:
        e_loss, e_g = loss_and_grads(inp, "reference", **opts)
        eager = {"loss": rel(e_loss, ref_loss), **{k: rel(e_g[k], ref_g[k]) for k in e_g}}
        floor = {torch.bfloat16: 2e-3, torch.float16: 3e-4, torch.float32: 1e-4}[dt]
        limits = {k: 1.5 * eager[k] + floor for k in errs}
    bad = [f"{k} {v:.1e} > {limits[k]:.1e}" for k, v in errs.items() if not v <= limits[k]]
    return not bad, ("; ".join(bad) or " ".join(f"{k}={v:.1e}" for k, v in errs.items()))


def _check_det(inp):
    import torch
    l1, g1 = loss_and_grads(inp, "triton", **OPTS)
    l2, g2 = loss_and_grads(inp, "triton", **OPTS)
    ok = torch.equal(l1, l2) and all(torch.equal(g1[k], g2[k]) for k in g1)
    return ok, "two runs bitwise equal" if ok else "runs differ"


def _check_garbage(inp):
    """NaN in the features/teacher of ignored rows and -inf teacher logits (masked classes): finite,
    and equal to the clean batch without those rows."""
    import torch
    y = inp["labels"].clone()
    y[::7] = -100
    dirty = recast(inp, inp["features"].dtype)
    with torch.no_grad():
        dirty["features"][::7] = float("nan")
        dirty["teacher_logits"][::7] = float("nan")
        dirty["teacher_logits"][:, 5] = float("-inf")
    dirty["labels"] = y
    keep = y != -100
    clean = recast(dirty, dirty["features"].dtype)
    for k in ("features", "teacher_logits", "labels"):
        clean[k] = clean[k][keep].detach()
    clean["features"].requires_grad_(True)
    ld, gd = loss_and_grads(dirty, "triton", **OPTS)
    lc, gc = loss_and_grads(clean, "triton", **OPTS)
    errs = [rel(ld, lc)] + [rel(gd[k], gc[k]) for k in ("head_weight", "aux_weight")]
    ok = bool(torch.isfinite(ld)) and max(errs) < 1e-2
    return ok, f"max rel {max(errs):.1e}, loss finite: {bool(torch.isfinite(ld))}"


def _check_graph(inp):
    import torch
    from dhkd_kernels import fused_dual_head_kd_loss
    static = recast(inp, inp["features"].dtype)
    args = [static[k] for k in POS]

    def run():
        for v in _leaves(static):
            v.grad = None
        loss = fused_dual_head_kd_loss(*args, backend="triton", **OPTS)
        loss.backward()
        return loss

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        run()
        run()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    for v in _leaves(static):
        v.grad = None
    with torch.cuda.graph(graph):
        loss = fused_dual_head_kd_loss(*args, backend="triton", **OPTS)
        loss.backward()
    fresh = make_inputs(inp["features"].shape[0], inp["features"].shape[1], inp["head_weight"].shape[0],
                        dtype=inp["features"].dtype, device="cuda", seed=99)
    with torch.no_grad():
        for k in POS:
            if static[k] is not None:
                static[k].copy_(fresh[k])
    graph.replay()
    torch.cuda.synchronize()
    want, want_g = loss_and_grads(fresh, "triton", **OPTS)
    ok = torch.equal(2.0 * loss.detach(), 2.0 * want) and torch.equal(2.0 * static["head_weight"].grad,
                                                                      want_g["head_weight"])
    return ok, "replay on new inputs equals eager" if ok else "replay differs from eager"


def stage_correctness(st: StageOutput, args) -> None:
    import torch
    dev = "cpu" if args.smoke_cpu else "cuda"
    dts = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    crash_at = 2 if args.crash_stage == "correctness" else None
    for i, (name, shape, dtname, tf32, engine, budget, opts, kind) in enumerate(correctness_cases(args.smoke_cpu)):
        if i == crash_at:
            st.log("--crash-stage: aborting this stage on purpose")
            os.abort()
        if st.elapsed() > st.data["budget_s"]:
            st.data["checks"].append(dict(check=name, ok=None, detail="skipped: time budget"))
            continue
        if kind == "graph" and dev != "cuda":
            continue
        try:
            with _with_plan(engine, budget, tf32), CompileClock(st):
                inp = make_inputs(**shape, dtype=dts[dtname], device=dev, seed=i)
                fn = {"ref": lambda: _check_ref(inp, dts[dtname], tf32, opts), "det": lambda: _check_det(inp),
                      "garbage": lambda: _check_garbage(inp), "graph": lambda: _check_graph(inp)}[kind]
                ok, detail = fn()
        except Exception as e:
            ok, detail = False, f"{type(e).__name__}: {e}"[:400]
            if _sticky(e):
                st.data["checks"].append(dict(check=name, ok=False, detail=detail))
                st.save(status="stopped: sticky CUDA error")
                return
        st.data["checks"].append(dict(check=name, ok=bool(ok), detail=detail))
        st.log(f"[{'ok' if ok else 'FAIL'}] {name}: {detail}")
        st.save()
        _free(dev)


# ----------------------------------------------------------------------------- training step

def stage_train(st: StageOutput, args) -> None:
    """Eager, then torch.compile: each builds (and compiles) the networks once and times the step with
    the fused loss and with the eager reference loss on the same models."""
    import torch
    if args.smoke_cpu:
        st.data["rows"].append(dict(variant="all", error="skipped: the training stage needs CUDA"))
        return
    from benchmarks.test_bench_train_step import BATCH, build_step
    dev = torch.device("cuda")
    for compiled in (False, True):
        mode = "torch.compile" if compiled else "eager"
        if st.elapsed() > st.data["budget_s"] - (2 * T_INDUCTOR_MODEL if compiled else 10):
            st.data["rows"].append(dict(variant=f"bf16 {mode}", error="skipped: time budget"))
            st.save()
            continue
        try:
            t0 = time.time()
            with CompileClock(st):
                step, next_batch, check = build_step("bf16", compiled, "fused", dev)
                for loss in ("fused", "reference"):
                    step(*next_batch(), loss=loss)
                    step(*next_batch(), loss=loss)
            if compiled:
                st.data["compile_s"] += time.time() - t0
        except Exception as e:
            st.data["rows"].append(dict(variant=f"bf16 {mode}", error=f"{type(e).__name__}: {e}"[:300]))
            st.log(f"{mode}: {st.data['rows'][-1]['error']}")
            if _sticky(e):
                st.save(status="stopped: sticky CUDA error")
                return
            st.save()
            continue
        for loss in ("fused", "reference"):
            label = f"bf16 {mode}, {loss} loss"
            row = dict(variant=label, batch=BATCH, channels_last=True, warmup_s=time.time() - t0)
            st.data["rows"].append(row)
            try:
                err, (feats, aux, t, y) = check(loss=loss)
                times = []
                for _ in range(15):
                    b = next_batch()
                    t1 = time.perf_counter()
                    step(*b, loss=loss)  # synchronizes
                    times.append(time.perf_counter() - t1)
                med = sorted(times)[len(times) // 2]
                loss_ms = time_ms(step.loss_only_fn(feats, aux, t, y, loss=loss), "cuda", rep_ms=30.0)
                step.zero_grad()
                row.update(step_ms=med * 1e3, images_per_s=BATCH / med, loss_ms=loss_ms,
                           loss_share=loss_ms / (med * 1e3), check_rel_err_loss=err)
                st.log(f"{label}: {BATCH / med:.0f} img/s, loss {loss_ms:.2f} ms "
                       f"({100 * loss_ms / (med * 1e3):.1f}% of the step)")
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {e}"[:300]
                st.log(f"{label}: {row['error']}")
                if _sticky(e):
                    st.save(status="stopped: sticky CUDA error")
                    return
            finally:
                _free("cuda")
            st.save()


# ----------------------------------------------------------------------------- markdown

def _cell(v):
    if v is None:
        return "—"
    if "ms" in v:
        return f"{v['ms']:.3f}" + ("" if v.get("extra_mib") is None else f" ({v['extra_mib']:.0f})")
    return v.get("error", "?")[:40]


def stage_markdown(d: dict) -> str:
    env = d["env"]
    out = [f"## gpu_check stage `{d['stage']}` ({env.get('date')})", "",
           f"GPU: {env.get('gpu')}; driver {env.get('driver')}; torch {env.get('torch')}; triton "
           f"{env.get('triton')}; CUDA {env.get('cuda')}. Status: {d['status']}; {d.get('wall_s', 0):.0f} s of a "
           f"{d['budget_s']:.0f} s budget; {d['compiles']} Triton compiles ({d['compile_s']:.0f} s incl. torch.compile).", ""]
    if d["stage"] == "headline" and d["rows"]:
        labels = []
        for r in d["rows"]:
            for k in r["cells"]:
                if k not in labels:
                    labels.append(k)
        out += ["Forward+backward median ms (peak extra MiB beyond inputs and gradients):", "",
                "| shape (N, D, C) | dtype | " + " | ".join(labels) + " |", "|---|---|" + "---|" * len(labels)]
        for r in d["rows"]:
            cells = [("skipped: " + r["skipped"]) if "skipped" in r else _cell(r["cells"].get(k)) for k in labels]
            out.append(f"| {r['shape']} ({r['N']}, {r['D']}, {r['C']}) | {r['dtype']} | " + " | ".join(cells) + " |")
        if d.get("peers"):
            out += ["", "Partial peers: " + ", ".join(d["peers"])]
    if d["checks"]:
        n_ok = sum(1 for c in d["checks"] if c["ok"])
        out += [f"Checks: {n_ok}/{len(d['checks'])} passed", ""]
        out += [f"- {'ok' if c['ok'] else ('skipped' if c['ok'] is None else 'FAIL')} {c['check']}: {c['detail']}"
                for c in d["checks"]]
    if d["stage"] == "train" and d["rows"]:
        from benchmarks.report import train_table
        out += train_table(d["rows"])
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------- orchestration

def run_stage(name: str, args) -> int:
    """One stage in this process (the orchestrator starts each in a subprocess)."""
    import torch
    if args.smoke_cpu:
        os.environ["TRITON_INTERPRET"] = "1"
    env = environment(args.smoke_cpu)
    budget = args.budget_s if args.budget_s is not None else BUDGET_S[name]
    st = StageOutput(args.out, name, env, budget)
    if not args.smoke_cpu and not torch.cuda.is_available():
        st.save(status="skipped: no CUDA GPU")
        return 2
    if args.wheels and not args.smoke_cpu:
        install_peers(args.wheels, st)
    st.save()
    fn = {"headline": stage_headline, "correctness": stage_correctness, "train": stage_train}[name]
    try:
        if args.crash_stage == name and name != "correctness":
            st.log("--crash-stage: aborting this stage on purpose")
            st.save()
            os.abort()
        fn(st, args)
        if st.data["status"] == "running":
            st.save(status="done")
    except Exception:
        st.log(traceback.format_exc()[-3000:])
        st.save(status="error")
        return 1
    failed = any(c["ok"] is False for c in st.data["checks"])
    return 1 if failed or st.data["status"] != "done" else 0


def install_peers(wheels: str, st: StageOutput) -> None:
    """pip-install the peer wheels found in ``wheels`` (no index, no dependencies) into a private
    directory on sys.path, so the device's own environment is left as it is."""
    target = os.path.join(os.path.abspath(wheels), "_site")
    names = [f for f in os.listdir(wheels) if f.endswith(".whl")] if os.path.isdir(wheels) else []
    if not names:
        st.log(f"--wheels {wheels}: no wheels there; peers skipped")
        return
    if not os.path.isdir(target):
        proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target",
                               target] + [os.path.join(wheels, f) for f in names], capture_output=True, text=True)
        st.log(f"installed {len(names)} peer wheels (rc {proc.returncode}) {proc.stderr[-300:]}")
    sys.path.insert(0, target)


def combine(out_dir: str, stages, statuses) -> dict:
    combined = dict(stages={}, env=None)
    for name in stages:
        path = os.path.join(out_dir, f"stage_{name}.json")
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
        except (OSError, json.JSONDecodeError):
            d = dict(stage=name, status="no results", rows=[], checks=[], compiles=0, compile_s=0.0)
        if statuses.get(name) and d.get("status") in ("running", None):
            d["status"] = statuses[name]
        combined["stages"][name] = d
        combined["env"] = combined["env"] or d.get("env")
    write_atomic(os.path.join(out_dir, "gpu_check.json"), json.dumps(combined, indent=1))
    md = ["# gpu_check", ""] + [stage_markdown(d) if "env" in d else f"## stage `{n}`: {d['status']}\n"
                                for n, d in combined["stages"].items()]
    write_atomic(os.path.join(out_dir, "gpu_check.md"), "\n".join(md))
    return combined


def orchestrate(args) -> int:
    import torch
    stages = args.stages.split(",")
    if not args.smoke_cpu and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU here (try --plan-only or --smoke-cpu)", file=sys.stderr)
        return 2
    out = os.path.abspath(args.out or "gpu_check_results")
    os.makedirs(out, exist_ok=True)
    statuses, rc = {}, 0
    for name in stages:
        budget = args.budget_s if args.budget_s is not None else BUDGET_S[name]
        cmd = [sys.executable, os.path.abspath(__file__), "--stage", name, "--out", out, "--budget-s", str(budget)]
        for flag, val in (("--smoke-cpu", args.smoke_cpu), ("--wheels", args.wheels),
                          ("--crash-stage", args.crash_stage)):
            if val:
                cmd += [flag] if val is True else [flag, val]
        env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        t0 = time.time()
        try:
            proc = subprocess.run(cmd, env=env, timeout=budget + GRACE_S)
            code = proc.returncode
            statuses[name] = None if code in (0, 1) else f"crashed (exit {code})"
        except subprocess.TimeoutExpired:
            code = -9
            statuses[name] = f"killed after {budget + GRACE_S:.0f} s"
        print(f"[gpu_check] stage {name}: exit {code} after {time.time() - t0:.0f}s", flush=True)
        rc = rc or (1 if code else 0)
        combine(out, stages, statuses)
    print(open(os.path.join(out, "gpu_check.md"), encoding="utf-8").read())
    return rc


# ----------------------------------------------------------------------------- plan only

def plan_only(args) -> int:
    """Distinct Triton specializations per stage, counted by running the host code of every case on
    meta tensors under a stand-in sm_90 driver with a JIT cache hook that records each launch's
    specialization key and skips the compile; then the estimated wall time per stage."""
    os.environ.pop("TRITON_INTERPRET", None)
    import torch
    import triton
    from dhkd_kernels import compile_report, cost
    from dhkd_kernels.ops import _launch
    from dhkd_kernels.simulate import simulate
    from triton.runtime.driver import driver

    keys = set()

    def hook(*, key, fn, **kwargs):
        keys.add((fn.name, str(key)))
        return True  # skip the compile: only the specialization is wanted

    previous = driver._active
    driver.set_active(compile_report._stand_in_driver(90))
    old_hook = triton.knobs.runtime.jit_cache_hook
    triton.knobs.runtime.jit_cache_hook = hook
    _launch._COMPILE_ON_META = lambda name, kernel, key: None
    report = {}
    try:
        def count(run_cases):
            keys.clear()
            run_cases()
            return len(keys)

        # headline: every timed fused variant at every shape
        est = {}

        def headline():
            secs = 0.0
            for name, n, d, c, dtname in headline_cases():
                for _, eng in _variants(n, d, c, dtname):
                    with _with_plan(eng, None, False):
                        rec, _ = simulate(n, d, c, dtype=dtname)
                    secs += T_CASE + CALLS_PER_CASE * rec.estimate_s()
                floor = cost.floor_estimate_s(n, c, d, kind="bf16")
                secs += T_CASE + CALLS_PER_CASE * floor
                if n * c <= TORCH_PATH_MAX_LOGITS:
                    secs += T_CASE + CALLS_PER_CASE * 8 * floor  # the torch path, ~8x the floor
            est["headline"] = secs
        n_head = count(headline)
        mandatory = T_STAGE_START + n_head * T_TRITON_COMPILE + est["headline"]
        fit = max(0, min(len(COMPILE_PRIORITY), int((BUDGET_S["headline"] - mandatory) // (T_INDUCTOR + 5))))
        report["headline"] = dict(compiles=n_head, inductor_graphs=fit, estimate_s=mandatory + fit * T_INDUCTOR,
                                  mandatory_s=mandatory, compile_shapes=list(COMPILE_PRIORITY[:fit]))

        def correctness():
            for name, shape, dtname, tf32, engine, budget, opts, kind in correctness_cases():
                sim_dtype = "tf32" if tf32 else dtname
                o = {k: v for k, v in opts.items()}
                with _with_plan(engine, budget, tf32):
                    simulate(shape["n"], shape["d"], shape["c"], dtype=sim_dtype, da=shape.get("da"), **o)
        n_corr = count(correctness)
        report["correctness"] = dict(compiles=n_corr, inductor_graphs=0,
                                     estimate_s=T_STAGE_START + n_corr * T_TRITON_COMPILE
                                     + len(correctness_cases()) * 2 * T_CASE)

        def train():
            simulate(BATCH_TRAIN, 512, 1000, dtype="bf16", kd_weight=0.0)
        n_train = count(train)
        report["train"] = dict(compiles=n_train, inductor_graphs=2,
                               estimate_s=T_STAGE_START + n_train * T_TRITON_COMPILE + 2 * T_INDUCTOR_MODEL
                               + 4 * 20 * 0.05)
    finally:
        triton.knobs.runtime.jit_cache_hook = old_hook
        _launch._COMPILE_ON_META = None
        driver._active = previous
    ok = True
    total = 0.0
    print("| stage | distinct Triton compiles | torch.compile graphs | estimated s | budget s |")
    print("|---|---|---|---|---|")
    for name in STAGES:
        r = report[name]
        total += r["estimate_s"]
        fits = r.get("mandatory_s", r["estimate_s"]) <= BUDGET_S[name]
        if name == "correctness" and r["compiles"] > MAX_CORRECTNESS_COMPILES:
            fits = False
        ok &= fits
        print(f"| {name} | {r['compiles']} | {r['inductor_graphs']} | {r['estimate_s']:.0f} | {BUDGET_S[name]:.0f} |"
              + ("" if fits else " OVER"))
    print(f"\nheadline: torch.compile of the reference fits at {report['headline']['inductor_graphs']} of "
          f"{len(COMPILE_PRIORITY)} shapes ({', '.join(report['headline']['compile_shapes']) or 'none'}); the others "
          "are marked skipped.")
    print(f"estimated total {total:.0f} s (budget {TOTAL_BUDGET_S:.0f} s; the headline stage stops its "
          f"torch.compile cells at its own budget, {BUDGET_S['headline']:.0f} s). Assumed: {T_TRITON_COMPILE} s per "
          f"Triton compile, {T_INDUCTOR} s per torch.compile graph, {T_INDUCTOR_MODEL} s per compiled ResNet.")
    if sum(BUDGET_S.values()) > TOTAL_BUDGET_S:
        ok = False
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        write_atomic(os.path.join(args.out, "plan.json"), json.dumps(report, indent=1))
    return 0 if ok else 1


BATCH_TRAIN = 256


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.plan_only:
        return plan_only(args)
    if args.stage:
        if args.stage not in STAGES:
            raise SystemExit(f"--stage: unknown {args.stage!r}")
        return run_stage(args.stage, args)
    return orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())
