"""Peak extra host memory of the torch path (backend="torch") on CPU, measured as the growth of the
process's peak resident set (VmHWM) over one forward+backward, inputs and gradients excluded.

    python benchmarks/torch_path_memory.py [--n 1024 --d 256 --c 8192 --dtype fp32]

Each measurement runs in a fresh subprocess (VmHWM only grows) with glibc's mmap threshold at 64 KiB,
so every tensor buffer is mapped on allocation and unmapped on free: the peak RSS growth is then the
peak of live buffers, to within a page per buffer. A warm-up call at a tiny shape first loads the libraries.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, sys, torch
torch.set_num_threads(1)
from dhkd_kernels import fused_dual_head_kd_loss
n, d, c, dtype = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
dt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp64": torch.float64}[dtype]
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) * 1024
g = torch.Generator().manual_seed(0)
# warm-up at a tiny shape: library code, thread pools and kernel caches are not the op's memory
wx = torch.randn(4, 8).to(dt).requires_grad_(True)
ww = [torch.randn(*s).to(dt).requires_grad_(True) for s in ((7, 8), (7,), (7, 8), (7,))]
fused_dual_head_kd_loss(wx, *ww, torch.randn(4, 7).to(dt), torch.zeros(4, dtype=torch.long), kd_weight=1.0,
                        backend="torch").backward()
del wx, ww
leaf = lambda *s: torch.randn(*s, generator=g, dtype=dt).mul_(0.1).requires_grad_(True)  # no fp32 transient
x, w1, b1, w2, b2 = leaf(n, d), leaf(c, d), leaf(c), leaf(c, d), leaf(c)
t = torch.randn(n, c, generator=g, dtype=dt)
y = torch.randint(0, c, (n,), generator=g)
grads = [torch.empty_like(v) for v in (x, w1, b1, w2, b2)]  # the gradients' own bytes, touched
for v in grads: v.fill_(0)
del grads
base = hwm()
loss = fused_dual_head_kd_loss(x, w1, b1, w2, b2, t, y, kd_weight=1.0, backend="torch")
loss.backward()
grad_bytes = sum(v.grad.numel() * v.grad.element_size() for v in (x, w1, b1, w2, b2))
print(json.dumps(dict(n=n, d=d, c=c, dtype=dtype, peak_extra_mib=(hwm() - base) / 2**20)))
"""


def measure(n, d, c, dtype):
    import os
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0", OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", CHILD, str(n), str(d), str(c), dtype], capture_output=True,
                         text=True, check=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=1024)
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--c", default="1000,8192,32000")
    p.add_argument("--dtype", default="fp32,bf16")
    args = p.parse_args(argv)
    for dtype in args.dtype.split(","):
        for c in (int(v) for v in args.c.split(",")):
            print(json.dumps(measure(args.n, args.d, c, dtype)))


if __name__ == "__main__":
    main()
