"""GPU check of the Triton path: correctness against float64, then a fwd+bwd timing table.

Usage (from the repository root, on a machine with a CUDA GPU):

    PYTHONPATH=$PWD python benchmarks/gpu_check.py --out results/gpu_check
    PYTHONPATH=$PWD python benchmarks/gpu_check.py --out /tmp/r --skip-compile --shapes rn18,rn50

1. Correctness (TF32 off): fp32 loss rel. error <= 1e-5 and gradient rel. errors <= 1e-4 against the
   float64 reference; bf16/fp16 errors <= 1.5 x eager PyTorch's own error in that dtype + a small
   floor; ``correct``/``n_valid`` equal to the torch path; bitwise run-to-run determinism.
2. Timing: forward+backward median ms (``triton.testing.do_bench``, return_mode="median") and peak
   extra memory for: fused (backend="triton"; Triton GEMMs in the backward, and with
   ``set_backward_matmul("cublas")``), eager reference (backend="reference"),
   torch.compile of the reference, and the GEMM floor (cuBLAS doing only X [W1;W2]^T, dZ [W1;W2] and
   dZ^T X). The aux head reads the features (aux_features=None), as in the issue's table.
   "extra memory" = peak allocated during one step minus what was allocated before it, minus the
   bytes of the gradients it produces.

Writes ``gpu_check.json`` and ``gpu_check.md`` into --out. Exit status 1 if a correctness check
failed, 2 if there is no CUDA GPU. Budget: under 5 minutes on an H100 (torch.compile of the
reference takes most of it; --skip-compile drops it).
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
    p.add_argument("--out", default="gpu_check_results", help="directory for gpu_check.json / .md")
    p.add_argument("--shapes", default=",".join(list(SHAPES) + list(FP32_SHAPES)),
                   help=f"comma list from {list(SHAPES) + list(FP32_SHAPES)}")
    p.add_argument("--skip-compile", action="store_true", help="do not time torch.compile(reference)")
    p.add_argument("--skip-bench", action="store_true", help="correctness checks only")
    p.add_argument("--smoke-cpu", action="store_true",
                   help="self-test of this script without a GPU: tiny correctness checks in the Triton "
                        "interpreter (TRITON_INTERPRET=1), no timing")
    p.add_argument("--skip-eager-above", type=float, default=60.0,
                   help="skip the eager/compiled reference when its logits would exceed this many GiB")
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

    torch.backends.cuda.matmul.allow_tf32 = False
    for (n, d, c), da in cases:
        for logit_loss in ("binary_kl_norm", "binary_kl"):
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
    return results


# ----------------------------------------------------------------------------- timing

def gemm_floor_fn(inp):
    """cuBLAS only: Z = X [W1;W2]^T, dX = dZ [W1;W2], dW = dZ^T X."""
    x = inp["features"].detach()
    w = torch.cat([inp["head_weight"].detach(), inp["aux_weight"].detach()], 0)
    dz = torch.empty(x.shape[0], w.shape[0], dtype=x.dtype, device=x.device)

    def step():
        torch.mm(x, w.t(), out=dz)
        torch.mm(dz, w)
        torch.mm(dz.t(), x)
    return step


def loss_step_fn(inp, backend=None, fn=None, bwd_matmul="triton"):
    from dhkd_kernels import fused_dual_head_kd_loss
    from dhkd_kernels.ops import dual_head_kd as dhk
    leaves = [inp[k] for k in LEAVES if inp[k] is not None]
    args = [inp[k] for k in POS]
    f = fn or (lambda *a: fused_dual_head_kd_loss(*a, backend=backend, **OPTS))

    def step():
        for p in leaves:
            p.grad = None
        dhk.set_backward_matmul(bwd_matmul)
        try:
            f(*args).backward()
        finally:
            dhk.set_backward_matmul("triton")
    return step


def measure(step, grad_bytes):
    from triton.testing import do_bench
    step()  # warm-up / compile
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before - grad_bytes
    ms = do_bench(step, warmup=25, rep=100, return_mode="median")
    return ms, max(extra, 0)


def bench(names, args, log):
    from dhkd_kernels import reference
    rows = []
    for name in names:
        n, d, c = SHAPES.get(name) or FP32_SHAPES[name]
        dtype = torch.float32 if name in FP32_SHAPES else torch.bfloat16
        torch.backends.cuda.matmul.allow_tf32 = False
        inp = make_inputs(n, d, c, dtype=dtype, ignore_frac=0.0)
        grad_bytes = sum(inp[k].numel() * inp[k].element_size() for k in LEAVES if inp[k] is not None)
        logits_gib = 2 * n * c * 4 / 2**30
        methods = [("fused", lambda: loss_step_fn(inp, "triton")),
                   ("fused, cuBLAS bwd", lambda: loss_step_fn(inp, "triton", bwd_matmul="cublas")),
                   ("gemm floor", lambda: gemm_floor_fn(inp))]
        if logits_gib <= args.skip_eager_above:
            methods.append(("eager reference", lambda: loss_step_fn(inp, "reference")))
            if not args.skip_compile:
                torch._dynamo.reset()
                compiled = torch.compile(lambda *a: reference.dual_head_kd_loss(*a, **OPTS), dynamic=False)
                methods.append(("torch.compile", lambda: loss_step_fn(inp, fn=compiled)))
        row = dict(shape=name, N=n, D=d, C=c, dtype=str(dtype)[6:])
        for label, make in methods:
            t0 = time.time()
            try:
                ms, extra = measure(make(), grad_bytes if label != "gemm floor" else 0)
                row[label] = dict(ms=ms, extra_mib=extra / 2**20)
                log(f"  {name} {label}: {ms:.3f} ms, extra {extra / 2**20:.0f} MiB ({time.time() - t0:.0f}s)")
            except torch.cuda.OutOfMemoryError:
                row[label] = dict(ms=None, extra_mib=None, error="OOM")
                log(f"  {name} {label}: OOM")
            except Exception as e:  # keep the table going; the error is recorded
                row[label] = dict(ms=None, extra_mib=None, error=f"{type(e).__name__}: {e}"[:300])
                log(f"  {name} {label}: {type(e).__name__}: {e}")
            torch.cuda.empty_cache()
        rows.append(row)
        del inp
        torch.cuda.empty_cache()
    return rows


def markdown(env, checks, rows):
    out = [f"# gpu_check ({env['date']})", "",
           f"GPU: {env['gpu']}; torch {env['torch']}; triton {env['triton']}; CUDA {env['cuda']}", ""]
    n_ok = sum(c["ok"] for c in checks)
    out += [f"## Correctness: {n_ok}/{len(checks)} checks passed", ""]
    out += [f"- {'ok' if c['ok'] else 'FAIL'} {c['check']}: {c['detail']}" for c in checks]
    if rows:
        labels = ["fused", "fused, cuBLAS bwd", "gemm floor", "eager reference", "torch.compile"]
        out += ["", "## fwd+bwd median ms (extra MiB)", "",
                "| shape (N, D, C) | dtype | " + " | ".join(labels) + " |",
                "|---|---|" + "---|" * len(labels)]
        for r in rows:
            cells = []
            for lab in labels:
                v = r.get(lab)
                if v is None:
                    cells.append("—")
                elif v.get("ms") is None:
                    cells.append(v.get("error", "error")[:40])
                else:
                    cells.append(f"{v['ms']:.3f} ({v['extra_mib']:.0f})")
            out.append(f"| {r['shape']} ({r['N']}, {r['D']}, {r['C']}) | {r['dtype']} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.smoke_cpu:
        os.environ["TRITON_INTERPRET"] = "1"  # before dhkd_kernels/triton compile anything
        checks = correctness(print, device="cpu", cases=CPU_CASES, det_shape=(20, 8, 35))
        return 0 if all(c["ok"] for c in checks) else 1
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU here; nothing to check (the CPU interpreter tests are "
              "tests/test_triton.py)", file=sys.stderr)
        return 2
    import triton
    os.makedirs(args.out, exist_ok=True)
    lines = []

    def log(msg):
        print(msg, flush=True)
        lines.append(msg)

    env = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
               cuda=torch.version.cuda, python=platform.python_version())
    log(f"gpu_check on {env['gpu']} (torch {env['torch']}, triton {env['triton']})")
    t0 = time.time()
    log("correctness:")
    try:
        checks = correctness(log)
    except Exception:
        checks = [dict(check="correctness run", ok=False, detail=traceback.format_exc()[-2000:])]
        log(checks[0]["detail"])
    log(f"correctness done in {time.time() - t0:.0f}s")
    rows = []
    if not args.skip_bench:
        names = [s for s in args.shapes.split(",") if s]
        unknown = [s for s in names if s not in SHAPES and s not in FP32_SHAPES]
        if unknown:
            raise SystemExit(f"--shapes: unknown {unknown}")
        log("timing:")
        rows = bench(names, args, log)
    with open(os.path.join(args.out, "gpu_check.json"), "w") as f:
        json.dump(dict(env=env, checks=checks, timings=rows, log=lines), f, indent=1)
    md = markdown(env, checks, rows)
    with open(os.path.join(args.out, "gpu_check.md"), "w") as f:
        f.write(md)
    print(md)
    log(f"total {time.time() - t0:.0f}s")
    return 0 if all(c["ok"] for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
