"""Host overhead of ``fused_dual_head_kd_loss(..., backend="triton")``: the Python and dispatch time of
one forward+backward with every kernel launch and cuBLAS product skipped, on this machine's CPU.

    python -m dhkd_kernels host-overhead [--shape imagenet-r18] [--dtype bf16] [--repeat 300]

It runs the real entry point, plan cache, ``torch.library`` custom ops and autograd on CPU tensors (the
Triton path in its interpreter configuration, with launches skipped), so what it times is what a GPU
run spends on the host besides launching its five to fourteen kernels (each Triton launch costs some
10 us more of host time on top, measured separately by ``gpu_check.py`` on a GPU). For scale it also
times an empty ``torch.autograd.Function`` and an empty ``torch.library`` custom op with a registered
autograd, forward+backward. Process CPU time per call, the smallest of five medians after warm-up (a
shared machine's wall clock counts other processes' time too); the CPU-only host check of the label
values, which CUDA labels skip, is left out.
"""

import argparse
import os
import statistics
import time


def _median_us(fn, repeat: int, warmup: int = 20, rounds: int = 5) -> float:
    """The smallest of ``rounds`` medians of this process's CPU time per call: on a shared machine the
    wall clock also counts the time other processes held the core."""
    for _ in range(warmup):
        fn()
    medians = []
    for _ in range(rounds):
        times = []
        for _ in range(max(1, repeat // rounds)):
            t0 = time.process_time()
            fn()
            times.append(time.process_time() - t0)
        medians.append(statistics.median(times))
    return min(medians) * 1e6


def _baselines(repeat: int):
    import torch

    class Empty(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.new_empty(())

        @staticmethod
        def backward(ctx, g):
            return None

    @torch.library.custom_op("dhkd_bench::empty", mutates_args=())
    def empty_op(x: torch.Tensor) -> torch.Tensor:
        return x.new_empty(())

    @empty_op.register_fake
    def _(x):
        return x.new_empty(())

    empty_op.register_autograd(lambda ctx, g: None, setup_context=lambda ctx, inputs, output: None)
    x = torch.zeros(4, requires_grad=True)
    fn_us = _median_us(lambda: Empty.apply(x).backward(), repeat)
    op_us = _median_us(lambda: empty_op(x).backward(), repeat)
    return fn_us, op_us


def measure(shape: str = "imagenet-r18", dtype: str = "bf16", repeat: int = 300) -> dict:
    """Median host microseconds per forward+backward (launches skipped), with the baselines."""
    os.environ["TRITON_INTERPRET"] = "1"  # CPU tensors take the Triton path; nothing is launched
    import torch

    from . import functional, fused_dual_head_kd_loss
    from .cost import SHAPES
    from .ops._launch import skip_launches

    n, d, c = {name: (n, d, c) for name, n, d, c in SHAPES}[shape]
    dt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    g = torch.Generator().manual_seed(0)

    def leaf(*s):
        return torch.randn(*s, generator=g).to(dt).requires_grad_(True)

    x, w1, b1, w2, b2 = leaf(n, d), leaf(c, d), leaf(c), leaf(c, d), leaf(c)
    t = torch.randn(n, c, generator=g).to(dt)
    y = torch.randint(0, c, (n,), generator=g)

    def step():
        loss = fused_dual_head_kd_loss(x, w1, b1, w2, b2, t, y, kd_weight=1.0, backend="triton")
        loss.backward()
        for v in (x, w1, b1, w2, b2):
            v.grad = None

    # CPU labels are checked on the host (a reduction and a read); CUDA ones are not: not counted here
    saved, functional.check_label_values = functional.check_label_values, lambda *args: None
    try:
        with skip_launches():
            step_us = _median_us(step, repeat)
    finally:
        functional.check_label_values = saved
    fn_us, op_us = _baselines(repeat)
    return dict(shape=shape, dtype=dtype, step_us=step_us, empty_function_us=fn_us, empty_custom_op_us=op_us,
                threads=torch.get_num_threads())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="imagenet-r18")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    p.add_argument("--repeat", type=int, default=300)
    args = p.parse_args(argv)
    if args.repeat < 1:
        p.error("--repeat must be at least 1")
    r = measure(args.shape, args.dtype, args.repeat)
    import platform
    print(f"host overhead of one forward+backward, launches skipped ({r['shape']}, {r['dtype']}, "
          f"{platform.processor() or platform.machine()}, {r['threads']} torch threads): {r['step_us']:.0f} us "
          f"(median of {args.repeat}); for scale: empty autograd.Function {r['empty_function_us']:.0f} us, "
          f"empty torch.library custom op with autograd {r['empty_custom_op_us']:.0f} us")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
