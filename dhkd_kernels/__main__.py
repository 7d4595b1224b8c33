"""``python -m dhkd_kernels cost [--gpu H200]`` (cost-model estimates per benchmark shape),
``python -m dhkd_kernels compile-report [...]`` (what sm_90 compiles, without a GPU) and
``python -m dhkd_kernels host-overhead [...]`` (host time of one forward+backward, launches skipped)."""
import sys


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("cost", "compile-report", "host-overhead"):
        print(__doc__.strip())
        return 2
    if argv[0] == "cost":
        from .cost import _main
    elif argv[0] == "host-overhead":
        from .host_overhead import main as _main
    else:
        from .compile_report import main as _main
    return _main(argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
