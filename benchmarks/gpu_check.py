"""GPU check of the Triton path: correctness against float64, then a fwd+bwd timing table.

Usage (from the repository root, on a machine with a CUDA GPU):

    PYTHONPATH=$PWD python benchmarks/gpu_check.py --out results/gpu_check
    PYTHONPATH=$PWD python benchmarks/gpu_check.py --out /tmp/r --skip-compile --shapes rn18,rn50

1. Correctness (TF32 off): fp32 loss rel. error <= 1e-5 and gradient rel. errors <= 1e-4 against the
   float64 reference; bf16/fp16 errors <= 1.5 x eager PyTorch's own error in that dtype + a small
   floor; ``correct``/``n_valid`` equal to the torch path; bitwise run-to-run determinism.
2. Timing: forward+backward median ms (``triton.testing.do_bench``, return_mode="median") and peak
   extra memory for: fused (backend="triton"; Triton GEMMs in the backward, and with
   ``set_backward_matmul("cublas")``, and for bf16 with the forward forced to one launch per
   head), eager reference (backend="reference"),
   torch.compile of the reference, and the GEMM floor (cuBLAS doing only X [W1;W2]^T, dZ [W1;W2] and
   dZ^T X). The aux head reads the features (aux_features=None), as in the issue's table.
   "extra memory" = peak allocated during one step, measured from a state with the previous step's
   gradients freed, minus the inputs already allocated and the bytes of the gradients it produces.
   Before a shape is timed, its fused loss is checked against the chunked torch path and the
   cuBLAS-backward variant's gradients against the Triton-backward ones.

Writes ``gpu_check.json`` and ``gpu_check.md`` into --out after the correctness stage and after
every timed shape, so a run cut short still leaves its results. A case that raises (OOM included)
is recorded and the run goes on. Exit status 1 if a correctness check failed, 2 if there is no CUDA
GPU. Budget: under 5 minutes on an H100 (torch.compile of the reference takes most of it;
--skip-compile drops it); once --budget-s seconds have passed, the remaining timings are skipped
and marked so.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import time
import traceback

import torch

SHAPES = {  # name: (N, D, C) in bf16, from the issue
    "rn18": (1024, 512, 1000),
    "rn50": (4096, 2048, 1000),
    "in21k": (2048, 2048, 21841),
    "llm": (8192, 4096, 128256),
}
FP32_SHAPES = {"rn50-fp32": (4096, 2048, 1000)}
OPTS = dict(ce_weight=1.0, kd_weight=0.5, logit_weight=1.0, kd_temperature=4.0, logit_temperature=2.0)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--out", default=None,
                   help="directory for gpu_check.json / .md (default gpu_check_results on a GPU; "
                        "--smoke-cpu writes only when given)")
    p.add_argument("--shapes", default=",".join(list(SHAPES) + list(FP32_SHAPES)),
                   help=f"comma list from {list(SHAPES) + list(FP32_SHAPES)}")
    p.add_argument("--skip-compile", action="store_true", help="do not time torch.compile(reference)")
    p.add_argument("--skip-bench", action="store_true", help="correctness checks only")
    p.add_argument("--smoke-cpu", action="store_true",
                   help="self-test of this script without a GPU: tiny correctness checks in the Triton "
                        "interpreter (TRITON_INTERPRET=1), no timing")
    p.add_argument("--skip-eager-above", type=float, default=60.0,
                   help="skip the eager/compiled reference when its logits would exceed this many GiB")
    p.add_argument("--budget-s", type=float, default=270.0,
                   help="skip (and mark) the timings still to run once this many seconds have passed")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- inputs

def make_inputs(n, d, c, *, dtype, device="cuda", da=None, bias=True, ignore_frac=0.1, seed=0,
                logit_scale=2.0, teacher_scale=3.0):
    """Leaves (requires_grad) for the loss; generated in float32 on the device, then cast."""
    g = torch.Generator(device=device).manual_seed(seed)

    def r(*shape, std=1.0):
        return torch.randn(*shape, generator=g, device=device) * std

    x = r(n, d).to(dtype).requires_grad_(True)
    w1 = r(c, d, std=logit_scale / math.sqrt(d)).to(dtype).requires_grad_(True)
    a = None if da is None else r(n, da).to(dtype).requires_grad_(True)
    w2 = r(c, da or d, std=logit_scale / math.sqrt(da or d)).to(dtype).requires_grad_(True)
    b1 = r(c, std=0.1).to(dtype).requires_grad_(True) if bias else None
    b2 = r(c, std=0.1).to(dtype).requires_grad_(True) if bias else None
    t = r(n, c, std=teacher_scale).to(dtype)
    y = torch.randint(0, c, (n,), generator=g, device=device)
    if ignore_frac:
        y[torch.rand(n, generator=g, device=device) < ignore_frac] = -100
    return dict(features=x, head_weight=w1, head_bias=b1, aux_weight=w2, aux_bias=b2, teacher_logits=t,
                labels=y, aux_features=a)


LEAVES = ("features", "head_weight", "head_bias", "aux_weight", "aux_bias", "aux_features")
POS = ("features", "head_weight", "head_bias", "aux_weight", "aux_bias", "teacher_logits", "labels")


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


def run(inp, backend, grad_scale=2.0, **opts):
    from dhkd_kernels import fused_dual_head_kd_loss
    inp = recast(inp, inp["features"].dtype)
    loss = fused_dual_head_kd_loss(*[inp[k] for k in POS], aux_features=inp["aux_features"], backend=backend,
                                   **opts)
    (loss * grad_scale).backward()
    return loss.detach(), {k: inp[k].grad for k in LEAVES if inp[k] is not None}


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    if not torch.isfinite(a).all():
        return float("inf")
    nb = b.norm().item()
    return (a - b).norm().item() / nb if nb > 0 else (a - b).norm().item()


# ----------------------------------------------------------------------------- correctness

GPU_CASES = [((300, 96, 128), None), ((300, 96, 256), 64), ((257, 128, 21841), None),
             ((64, 64, 128256), None), ((33, 3, 7), 5), ((1, 16, 1), None)]
CPU_CASES = [((9, 5, 7), 3), ((1, 3, 1), None)]


def correctness(log, device="cuda", cases=GPU_CASES, det_shape=(4096, 256, 1000)):
    results = []

    def record(name, ok, detail):
        results.append(dict(check=name, ok=bool(ok), detail=detail))
        log(f"  [{'ok' if ok else 'FAIL'}] {name}: {detail}")

    def guarded(name, fn):
        """Run one case; an exception (OOM included) becomes a failed check and the run goes on."""
        try:
            fn()
        except Exception as e:
            record(name, False, f"{type(e).__name__}: {e}"[:500])
        finally:
            if device == "cuda":
                torch.cuda.empty_cache()

    torch.backends.cuda.matmul.allow_tf32 = False
    for (n, d, c), da in cases:
        for logit_loss in ("binary_kl_norm", "binary_kl"):
            guarded(f"N={n} D={d} C={c} Da={da} {logit_loss}",
                    lambda: _check_case(record, device, n, d, c, da, logit_loss))
    guarded("components and determinism", lambda: _check_components(record, device, det_shape))
    return results


def _check_case(record, device, n, d, c, da, logit_loss):
    """fp32 vs float64 (TF32 off), then bf16/fp16 vs eager PyTorch's own error in that dtype."""
    opts = dict(OPTS, logit_loss=logit_loss)
    base = make_inputs(n, d, c, dtype=torch.float32, da=da, seed=n + c, device=device)
    ref_loss, ref_grads = run(recast(base, torch.float64), "reference", **opts)
    loss, grads = run(base, "triton", **opts)
    errs = {"loss": rel(loss, ref_loss), **{k: rel(grads[k], ref_grads[k]) for k in grads}}
    ok = errs["loss"] <= 1e-5 and all(v <= 1e-4 for k, v in errs.items() if k != "loss")
    record(f"fp32 N={n} D={d} C={c} Da={da} {logit_loss}", ok,
           " ".join(f"{k}={v:.1e}" for k, v in errs.items()))
    for dtype, floor in ((torch.bfloat16, 2e-3), (torch.float16, 3e-4)):
        if c > 30000 and dtype == torch.float16:
            continue
        low = recast(base, dtype)
        # the oracle sees the same rounded inputs: float64 of the bf16/fp16 values
        ref_loss, ref_grads = run(recast(low, torch.float64), "reference", **opts)
        loss, grads = run(low, "triton", **opts)
        e_loss, e_grads = run(low, "reference", **opts)
        bad = []
        for k in ["loss"] + list(grads):
            mine = rel(loss, ref_loss) if k == "loss" else rel(grads[k], ref_grads[k])
            eager = rel(e_loss, ref_loss) if k == "loss" else rel(e_grads[k], ref_grads[k])
            if not mine <= 1.5 * eager + floor:
                bad.append(f"{k}: {mine:.2e} vs eager {eager:.2e}")
        record(f"{str(dtype)[6:]} N={n} D={d} C={c} Da={da} {logit_loss}", not bad,
               "; ".join(bad) or "within 1.5x eager + floor")


def _check_components(record, device, det_shape):
    from dhkd_kernels import fused_dual_head_kd_loss
    inp = make_inputs(*det_shape, dtype=torch.bfloat16, seed=3, logit_scale=8.0, device=device)
    args = [inp[k] for k in POS]
    _, tri = fused_dual_head_kd_loss(*args, backend="triton", return_components=True, **OPTS)
    _, ref = fused_dual_head_kd_loss(*args, backend="torch", return_components=True, **OPTS)
    record("components vs torch path", int(tri["correct"]) == int(ref["correct"])
           and int(tri["n_valid"]) == int(ref["n_valid"]),
           f"correct {int(tri['correct'])}/{int(ref['correct'])}, n_valid {int(tri['n_valid'])}")
    l1, g1 = run(inp, "triton", **OPTS)
    l2, g2 = run(inp, "triton", **OPTS)
    record("bitwise determinism", torch.equal(l1, l2) and all(torch.equal(g1[k], g2[k]) for k in g1), "2 runs")


# ----------------------------------------------------------------------------- timing

def _noop():
    pass


def gemm_floor_fn(inp):
    """cuBLAS only: Z = X [W1;W2]^T, dX = dZ [W1;W2], dW = dZ^T X. Returns (step, clear)."""
    x = inp["features"].detach()
    w = torch.cat([inp["head_weight"].detach(), inp["aux_weight"].detach()], 0)
    dz = torch.empty(x.shape[0], w.shape[0], dtype=x.dtype, device=x.device)

    def step():
        torch.mm(x, w.t(), out=dz)
        torch.mm(dz, w)
        torch.mm(dz.t(), x)
    return step, _noop


def loss_step_fn(inp, backend=None, fn=None, bwd_matmul="triton", split_heads=None):
    """(step, clear): one forward+backward of the loss; ``clear`` frees the leaves' gradients.
    ``split_heads`` forces the forward to one launch per head (None: the library's default)."""
    from dhkd_kernels import fused_dual_head_kd_loss
    from dhkd_kernels.ops import dual_head_kd as dhk
    leaves = [inp[k] for k in LEAVES if inp[k] is not None]
    args = [inp[k] for k in POS]
    f = fn or (lambda *a: fused_dual_head_kd_loss(*a, backend=backend, **OPTS))

    def clear():
        for p in leaves:
            p.grad = None

    def step():
        clear()
        dhk.set_backward_matmul(bwd_matmul)
        saved, dhk._SPLIT_HEADS = dhk._SPLIT_HEADS, split_heads
        try:
            f(*args).backward()
        finally:
            dhk.set_backward_matmul("triton")
            dhk._SPLIT_HEADS = saved
    return step, clear


class CudaMemory:
    """The allocator counters ``peak_extra_bytes`` reads (a stand-in replaces it in the tests)."""

    sync = staticmethod(lambda: torch.cuda.synchronize())
    allocated = staticmethod(lambda: torch.cuda.memory_allocated())
    reset_peak = staticmethod(lambda: torch.cuda.reset_peak_memory_stats())
    peak = staticmethod(lambda: torch.cuda.max_memory_allocated())


def peak_extra_bytes(step, clear, grad_bytes, mem=CudaMemory):
    """Peak bytes one ``step`` allocates beyond what is live before it (inputs, the previous step's
    gradients already freed by ``clear``) and beyond the ``grad_bytes`` of gradients it leaves.
    Taking the baseline while the old gradients are still alive would subtract them twice (the step
    frees them first), under-reporting by ``grad_bytes``."""
    clear()
    mem.sync()
    mem.reset_peak()
    before = mem.allocated()
    step()
    mem.sync()
    return mem.peak() - before - grad_bytes


def measure(step, clear, grad_bytes):
    from triton.testing import do_bench
    step()  # warm-up / compile
    extra = peak_extra_bytes(step, clear, grad_bytes)
    ms = do_bench(step, warmup=25, rep=100, return_mode="median")
    clear()
    return ms, extra


def check_timed_shape(inp, name, record):
    """Before timing a shape: its fused loss against the chunked torch path, and the cuBLAS-backward
    variant's gradients against the Triton-backward ones (same dz, different GEMMs)."""
    from dhkd_kernels import fused_dual_head_kd_loss
    args = [inp[k] for k in POS]
    with torch.no_grad():
        fused = fused_dual_head_kd_loss(*args, backend="triton", **OPTS)
        torch_path = fused_dual_head_kd_loss(*args, backend="torch", **OPTS)
    e = rel(fused, torch_path)
    tol = 1e-5 if inp["features"].dtype == torch.float32 else 1e-3
    record(f"{name}: fused loss vs torch path", e <= tol, f"rel {e:.1e} (<= {tol:.0e})")
    grads = {}
    for kind in ("triton", "cublas"):
        step, clear = loss_step_fn(inp, "triton", bwd_matmul=kind)
        step()
        grads[kind] = {k: inp[k].grad.clone() for k in LEAVES if inp[k] is not None}
        clear()
    errs = {k: rel(grads["cublas"][k], grads["triton"][k]) for k in grads["triton"]}
    del grads
    ok = all(v <= 1e-2 for v in errs.values())
    record(f"{name}: cuBLAS-backward grads vs Triton-backward", ok,
           " ".join(f"{k}={v:.1e}" for k, v in errs.items()))


def bench(names, args, log, record=None, on_row=None, t_start=None):
    """Timing rows; ``record(check, ok, detail)`` receives the pre-timing checks, ``on_row(rows)``
    is called after every shape (incremental results), past ``args.budget_s`` seconds since
    ``t_start`` the remaining timings are skipped and marked."""
    from dhkd_kernels import reference
    t_start = time.time() if t_start is None else t_start
    record = record or (lambda *a: None)
    rows = []
    for name in names:
        n, d, c = SHAPES.get(name) or FP32_SHAPES[name]
        dtype = torch.float32 if name in FP32_SHAPES else torch.bfloat16
        torch.backends.cuda.matmul.allow_tf32 = False
        row = dict(shape=name, N=n, D=d, C=c, dtype=str(dtype)[6:])
        rows.append(row)
        if time.time() - t_start > args.budget_s:
            row["skipped"] = "time budget"
            log(f"  {name}: skipped (time budget of {args.budget_s:.0f}s spent)")
            if on_row:
                on_row(rows)
            continue
        inp = None
        try:
            inp = make_inputs(n, d, c, dtype=dtype, ignore_frac=0.0)
            check_timed_shape(inp, name, record)
        except Exception as e:  # OOM included: record and go on with the next shape
            record(f"{name}: inputs and pre-timing checks", False, f"{type(e).__name__}: {e}"[:300])
            row["error"] = f"{type(e).__name__}"
            del inp
            torch.cuda.empty_cache()
            if on_row:
                on_row(rows)
            continue
        grad_bytes = sum(inp[k].numel() * inp[k].element_size() for k in LEAVES if inp[k] is not None)
        logits_gib = 2 * n * c * 4 / 2**30
        methods = [("fused", lambda: loss_step_fn(inp, "triton")),
                   ("fused, cuBLAS bwd", lambda: loss_step_fn(inp, "triton", bwd_matmul="cublas")),
                   ("gemm floor", lambda: gemm_floor_fn(inp))]
        if dtype != torch.float32:
            # one forward launch per head (the fp32 default): compiled for sm_90, the bf16 forward
            # with both heads in one launch spills ~750 bytes/thread, one head per launch 0-64
            methods.insert(2, ("fused, 2-pass fwd", lambda: loss_step_fn(inp, "triton", split_heads=True)))
        if logits_gib <= args.skip_eager_above:
            methods.append(("eager reference", lambda: loss_step_fn(inp, "reference")))
            if not args.skip_compile:
                torch._dynamo.reset()
                compiled = torch.compile(lambda *a: reference.dual_head_kd_loss(*a, **OPTS), dynamic=False)
                methods.append(("torch.compile", lambda: loss_step_fn(inp, fn=compiled)))
        for label, make in methods:
            if time.time() - t_start > args.budget_s:
                row[label] = dict(ms=None, extra_mib=None, error="skipped: time budget")
                log(f"  {name} {label}: skipped (time budget)")
                continue
            t0 = time.time()
            try:
                step, clear = make()
                ms, extra = measure(step, clear, grad_bytes if label != "gemm floor" else 0)
                row[label] = dict(ms=ms, extra_mib=extra / 2**20)
                log(f"  {name} {label}: {ms:.3f} ms, extra {extra / 2**20:.0f} MiB ({time.time() - t0:.0f}s)")
            except torch.cuda.OutOfMemoryError:
                row[label] = dict(ms=None, extra_mib=None, error="OOM")
                log(f"  {name} {label}: OOM")
            except Exception as e:  # keep the table going; the error is recorded
                row[label] = dict(ms=None, extra_mib=None, error=f"{type(e).__name__}: {e}"[:300])
                log(f"  {name} {label}: {type(e).__name__}: {e}")
            finally:
                for k in LEAVES:
                    if inp[k] is not None:
                        inp[k].grad = None
                torch.cuda.empty_cache()
        del inp
        torch.cuda.empty_cache()
        if on_row:
            on_row(rows)
    return rows


def markdown(env, checks, rows):
    out = [f"# gpu_check ({env['date']})", "",
           f"GPU: {env['gpu']}; torch {env['torch']}; triton {env['triton']}; CUDA {env['cuda']}", ""]
    n_ok = sum(c["ok"] for c in checks)
    out += [f"## Correctness: {n_ok}/{len(checks)} checks passed", ""]
    out += [f"- {'ok' if c['ok'] else 'FAIL'} {c['check']}: {c['detail']}" for c in checks]
    if rows:
        labels = ["fused", "fused, cuBLAS bwd", "fused, 2-pass fwd", "gemm floor", "eager reference",
                  "torch.compile"]
        out += ["", "## fwd+bwd median ms (extra MiB)", "",
                "| shape (N, D, C) | dtype | " + " | ".join(labels) + " |",
                "|---|---|" + "---|" * len(labels)]
        for r in rows:
            cells = []
            for lab in labels:
                v = r.get(lab)
                if v is None:
                    cells.append(f"skipped: {r['skipped']}" if "skipped" in r else r.get("error", "—"))
                elif v.get("ms") is None:
                    cells.append(v.get("error", "error")[:40])
                else:
                    cells.append(f"{v['ms']:.3f} ({v['extra_mib']:.0f})")
            out.append(f"| {r['shape']} ({r['N']}, {r['D']}, {r['C']}) | {r['dtype']} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def write_results(out_dir, env, checks, rows, lines):
    """gpu_check.json and gpu_check.md, each written to a temporary file and moved into place."""
    os.makedirs(out_dir, exist_ok=True)
    payloads = {"gpu_check.json": json.dumps(dict(env=env, checks=checks, timings=rows, log=lines), indent=1),
                "gpu_check.md": markdown(env, checks, rows)}
    for fname, text in payloads.items():
        path = os.path.join(out_dir, fname)
        with open(path + ".tmp", "w") as f:
            f.write(text)
        os.replace(path + ".tmp", path)
    return payloads["gpu_check.md"]


def main(argv=None) -> int:
    args = parse_args(argv)
    names = [s for s in args.shapes.split(",") if s]
    unknown = [s for s in names if s not in SHAPES and s not in FP32_SHAPES]
    if unknown:  # before minutes of correctness checks, not after
        raise SystemExit(f"--shapes: unknown {unknown}; choose from {list(SHAPES) + list(FP32_SHAPES)}")
    lines = []

    def log(msg):
        print(msg, flush=True)
        lines.append(msg)

    env = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               gpu=None, torch=torch.__version__, triton=None, cuda=torch.version.cuda,
               python=platform.python_version())
    if args.smoke_cpu:
        os.environ["TRITON_INTERPRET"] = "1"  # before dhkd_kernels/triton compile anything
        import triton
        env.update(gpu="none (Triton interpreter on CPU, --smoke-cpu)", triton=triton.__version__)
        checks = correctness(log, device="cpu", cases=CPU_CASES, det_shape=(20, 8, 35))
        if args.out:
            write_results(args.out, env, checks, [], lines)
        return 0 if all(c["ok"] for c in checks) else 1
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU here; nothing to check (the CPU interpreter tests are "
              "tests/test_triton.py)", file=sys.stderr)
        return 2
    import triton
    out_dir = args.out or "gpu_check_results"
    env.update(gpu=torch.cuda.get_device_name(), triton=triton.__version__)
    log(f"gpu_check on {env['gpu']} (torch {env['torch']}, triton {env['triton']})")
    t0 = time.time()
    log("correctness:")
    try:
        checks = correctness(log)
    except Exception:
        checks = [dict(check="correctness run", ok=False, detail=traceback.format_exc()[-2000:])]
        log(checks[0]["detail"])
    log(f"correctness done in {time.time() - t0:.0f}s")
    write_results(out_dir, env, checks, [], lines)
    rows = []
    if not args.skip_bench:
        log("timing:")

        def record(name, ok, detail):
            checks.append(dict(check=name, ok=bool(ok), detail=detail))
            log(f"  [{'ok' if ok else 'FAIL'}] {name}: {detail}")

        rows = bench(names, args, log, record=record, t_start=t0,
                     on_row=lambda rs: write_results(out_dir, env, checks, rs, lines))
    log(f"total {time.time() - t0:.0f}s")
    print(write_results(out_dir, env, checks, rows, lines))
    return 0 if all(c["ok"] for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
