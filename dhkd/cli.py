"""Command line: ``dhkd demo`` (a self-check of the fused loss until the trainer lands)."""
from __future__ import annotations

import argparse
import sys


def _demo(_args) -> int:
    import torch

    from dhkd_kernels import fused_dual_head_kd_loss, reference

    g = torch.Generator().manual_seed(0)
    n, d, c = 256, 64, 100
    args = [torch.randn(n, d, generator=g, dtype=torch.float64, requires_grad=True),
            torch.randn(c, d, generator=g, dtype=torch.float64, requires_grad=True) * 0.1,
            torch.zeros(c, dtype=torch.float64),
            torch.randn(c, d, generator=g, dtype=torch.float64) * 0.1,
            None,
            torch.randn(n, c, generator=g, dtype=torch.float64) * 4,
            torch.randint(0, c, (n,), generator=g)]
    fused = fused_dual_head_kd_loss(*args, kd_weight=1.0, backend="torch")
    ref = reference.dual_head_kd_loss(*args, kd_weight=1.0)
    print(f"fused loss {fused.item():.10f}  reference {ref.item():.10f}  |diff| {abs(fused - ref).item():.2e}")
    return 0 if torch.allclose(fused, ref, rtol=1e-10, atol=0) else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="dhkd", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="run the demo").set_defaults(func=_demo)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
