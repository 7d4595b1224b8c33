"""Command line.

    dhkd train --config FILE --out DIR [--resume [auto]] [section.key=value ...]
    torchrun --nproc_per_node=K -m dhkd train ...     (DDP; docs/distributed.md)
    dhkd eval  --checkpoint FILE --config FILE [section.key=value ...]
    dhkd demo  [--out DIR] [--epochs N] [--seeds N] [--verbose]
    dhkd experiment {mnist1d,mnist1d100,terminal} [--quick] [--out DIR] [--seeds N] [--jobs J]
    dhkd bench --report BENCH.json [...] [--out DIR] [--no-charts]   (a checkout's benchmarks/report.py)
    dhkd bench-data [--root DIR] [--backends ...] [--workers 0 2] [--device cpu|cuda]   (input pipeline img/s)

(also ``python -m dhkd ...``). The config, the overrides and the paths they name are checked before
anything runs, every problem reported at once; errors print one line each and exit with status 2.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path


def _train(args) -> int:
    import os

    from .config import ConfigError, load_config
    from .distributed import destroy_distributed, init_distributed, leave_process
    from .preflight import start_problems
    from .train import Trainer
    args.resume = {None: False, "last": True, "auto": "auto"}[args.resume]
    out = Path(args.out)
    problems: list = []
    try:
        cfg = load_config(args.config, args.overrides, partial=problems)  # bad keys left at their defaults
    except (ConfigError, FileNotFoundError) as exc:  # no config to check the paths of
        cfg, problems = None, getattr(exc, "problems", [str(exc)])
    world = int(os.environ.get("WORLD_SIZE", "1"))
    main_rank = os.environ.get("RANK", "0") == "0"
    if cfg is None:
        problems += start_problems(None, out, resume=args.resume, check_out=main_rank)
    else:
        problems += start_problems(cfg, out, resume=args.resume, world_size=world, check_out=main_rank)
    ConfigError.raise_for(problems)
    info = init_distributed("cpu" if cfg.train.device == "cpu" else None)  # a world of 1 outside torchrun
    try:
        trainer = Trainer(cfg, out, resume=args.resume, rank=info.rank, world_size=info.world_size)
        final = trainer.fit()
    finally:
        destroy_distributed()
    if info.is_main:
        print(json.dumps({k: v for k, v in final.items() if k.startswith(("val/", "train/", "epoch"))}), flush=True)
        print(f"[dhkd] wrote {trainer.run.written()}", file=sys.stderr, flush=True)  # stdout ends with the JSON
    if info.enabled:
        leave_process()
    return 0


def _eval(args) -> int:
    from .config import load_config
    from .train import evaluate_checkpoint
    cfg = load_config(args.config, args.overrides)
    print(json.dumps(evaluate_checkpoint(cfg, args.checkpoint)))
    return 0


def demo_config(method: str, epochs: int, teacher_checkpoint: str | None = None):
    """The demo's config of ``method`` ("teacher", "ce", "kd" or "dhkd"): ``configs/mnist1d/`` itself."""
    from .experiments.mnist1d import demo_config as config
    return config(method, epochs, teacher_checkpoint)


def _demo(args) -> int:
    """Teacher (the configs' cache), then CE, KD and DHKD students; one progress bar; their accuracies."""
    from .experiments.mnist1d import run_demo
    run_demo(Path(args.out), epochs=args.epochs, seeds=args.seeds, verbose=args.verbose)
    return 0


def _resume_value(argv: list) -> list:
    """``--resume auto`` -> ``--resume=auto``, a bare ``--resume`` -> ``--resume=last``, so that the
    token after a bare ``--resume`` stays an override."""
    out, i = [], 0
    while i < len(argv):
        if argv[i] == "--resume":
            auto = i + 1 < len(argv) and argv[i + 1] == "auto"
            out.append("--resume=auto" if auto else "--resume=last")
            i += 2 if auto else 1
        else:
            out.append(argv[i])
            i += 1
    return out


def _path(text: str) -> str:
    """A path argument that is not empty or blank: ``--out ""`` (an unset ``$OUT``) would otherwise be
    the current directory."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"expected a path, got {text!r} (an unset variable?)")
    return text


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {value}")
    return value


def _experiment(args) -> int:
    """The MNIST-1D experiments (``dhkd.experiments.mnist1d``, ``.mnist1d100``); prints their tables."""
    if args.name == "mnist1d100":
        from .experiments.mnist1d100 import run_experiment
    elif args.name == "terminal":
        from .experiments.terminal import run_experiment
    else:
        from .experiments.mnist1d import run_experiment
    out = Path(args.out or f"runs/{args.name}_{'quick' if args.quick else 'experiment'}")
    argv = [f"dhkd experiment {args.name}"] + (["--quick"] if args.quick else []) + ["--out", str(out)] + \
        ([f"--seeds {args.seeds}"] if args.seeds is not None else []) + [f"--jobs {args.jobs}"]
    run_experiment(out, quick=args.quick, seeds=args.seeds, jobs=args.jobs, command=" ".join(argv))
    print((out / "results.md").read_text(encoding="utf-8"))
    return 0


def _bench(args) -> int:
    """``dhkd bench --report BENCH.json ...``: the Markdown table and charts of ``benchmarks/report.py``."""
    checkout = Path(__file__).resolve().parents[1]  # the checkout of an editable install
    for root in (Path.cwd(), checkout):
        if (root / "benchmarks" / "report.py").is_file():
            if str(root) not in sys.path:
                sys.path.insert(0, str(root))
            break
    try:
        from benchmarks.report import main as report_main
    except ImportError as err:
        raise SystemExit(f"dhkd bench: needs benchmarks/report.py of a dhkd checkout (looked in {Path.cwd()} "
                         f"and {checkout}): {err}") from None
    return report_main([*args.report, "--out", args.out, *(["--no-charts"] if args.no_charts else [])])


def _bench_data(args) -> int:
    """``dhkd bench-data``: images/s of the ImageNet input backends alone (``dhkd.data.bench``)."""
    from .data.bench import run_bench_data
    if args.root is not None and not (Path(args.root) / "train").is_dir():
        raise FileNotFoundError(f"--root: expected an ImageFolder with {Path(args.root) / 'train'}")
    run_bench_data(root=args.root, backends=args.backends, workers=args.workers, batch_size=args.batch_size,
                   image_size=args.image_size, device=args.device, epochs=args.epochs, images=args.images,
                   json_path=args.json)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="dhkd", description="Dual-Head Knowledge Distillation trainer")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train from a YAML config")
    p.add_argument("--config", required=True, type=_path, help="YAML config file")
    p.add_argument("--out", required=True, type=_path, help="run directory (checkpoints, metrics.jsonl)")
    p.add_argument("--resume", choices=("last", "auto"), default=None,
                   help="'--resume': continue from OUT/last.pt; '--resume auto': continue from it if it "
                        "exists, else start fresh (for torchrun --max-restarts)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    p.set_defaults(func=_train)

    p = sub.add_parser("eval", help="evaluate a checkpoint on the config's validation set")
    p.add_argument("--checkpoint", required=True, type=_path, help="last.pt, best.pt or an exported student.pt")
    p.add_argument("--config", required=True, type=_path, help="YAML config file of the run")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    p.set_defaults(func=_eval)

    p = sub.add_parser("demo", help="DHKD vs CE vs KD on MNIST-1D, with one progress bar (timing: README)")
    p.add_argument("--out", default="runs/demo", type=_path, help="run directory (default runs/demo)")
    p.add_argument("--epochs", type=_positive_int, default=30, help="epochs per model (default 30)")
    p.add_argument("--seeds", type=_positive_int, default=3, help="student seeds per method (default 3)")
    p.add_argument("--verbose", action="store_true", help="print every run's per-epoch lines instead of the bar")
    p.set_defaults(func=_demo)

    p = sub.add_parser("experiment", help="the MNIST-1D head experiments (tables, plots, results.md)")
    p.add_argument("name", choices=["mnist1d", "mnist1d100", "terminal"],
                   help="mnist1d: the 10-class head-collapse experiment; mnist1d100: one head vs two heads, "
                        "100 classes (configs/mnist1d100/experiment.yaml); terminal: the claim in the terminal "
                        "phase and the torch-2.1.2 numerics (configs/terminal/experiment.yaml)")
    p.add_argument("--quick", action="store_true", help="1 seed, 2 epochs, fewer signals, no lr grid (CI smoke run)")
    p.add_argument("--out", default=None, type=_path,
                   help="run directory (default runs/<name>_experiment, with --quick runs/<name>_quick)")
    p.add_argument("--seeds", type=_positive_int, default=None, help="student seeds per method (default 5; --quick 1)")
    p.add_argument("--jobs", type=_positive_int, default=1, help="runs trained in parallel processes (default 1)")
    p.set_defaults(func=_experiment)

    p = sub.add_parser("bench", help="benchmark report from pytest-benchmark JSON (run from a checkout)")
    p.add_argument("--report", nargs="+", required=True, metavar="BENCH.json",
                   help="pytest-benchmark JSON file(s) written with --benchmark-json")
    p.add_argument("--out", default="bench-report", type=_path, help="folder for benchmarks.md and the PNG charts")
    p.add_argument("--no-charts", action="store_true", help="the Markdown table only")
    p.set_defaults(func=_bench)

    p = sub.add_parser("bench-data", help="images/s of the ImageNet input backends alone, on generated JPEGs")
    p.add_argument("--root", default=None, help="an ImageFolder with train/ (default: generated JPEGs)")
    p.add_argument("--backends", nargs="+", default=["torchvision", "gpu-decode", "dali"],
                   choices=["torchvision", "gpu-decode", "dali"])
    p.add_argument("--workers", nargs="+", type=int, default=[0, 2], help="worker counts (dali: threads)")
    p.add_argument("--batch-size", type=_positive_int, default=32)
    p.add_argument("--image-size", type=_positive_int, default=224)
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (gpu-decode and dali decode there)")
    p.add_argument("--epochs", type=_positive_int, default=3, help="timed epochs after one warm-up epoch")
    p.add_argument("--images", type=_positive_int, default=384, help="train images to generate")
    p.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    p.set_defaults(func=_bench_data)

    args, extra = parser.parse_known_args(_resume_value(sys.argv[1:] if argv is None else list(argv)))
    if extra and hasattr(args, "overrides") and not any(e.startswith("-") for e in extra):
        args.overrides += extra  # overrides on both sides of an option: a=1 --out D b=2
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    from .atomic import DiskFullError
    from .config import ConfigError
    from .data.images import BadImageError
    from .rundir import CheckpointError, RunDirError
    try:
        return args.func(args)
    except (ConfigError, CheckpointError, RunDirError, DiskFullError, FileNotFoundError) as exc:
        print(f"dhkd {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except (BadImageError, FloatingPointError) as exc:  # during training: one line, what to do next
        print(f"dhkd {args.command}: error: {_training_error(exc, getattr(args, 'out', None))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"dhkd {args.command}: {_interrupted(args)}", file=sys.stderr)
        return 130


def _interrupted(args) -> str:
    """One line for Ctrl-C: where the last checkpoint is and how to go on."""
    out = getattr(args, "out", None)
    if args.command != "train" or not out:
        return "interrupted"
    last = Path(out) / "last.pt"
    if not last.is_file():
        return f"interrupted before the first epoch ended: no checkpoint in {out}; start again to train"
    argv = ["dhkd", "train", "--config", str(args.config), "--out", str(out), "--resume",
            *getattr(args, "overrides", [])]
    return f"interrupted; {last} keeps the last finished epoch: resume with {shlex.join(argv)}"


def _training_error(exc: BaseException, out) -> str:
    """One line for an error that stops a run part-way: the unreadable image (also when a DataLoader
    worker raised it, where the message is the worker's whole traceback) or the non-finite loss, and
    what to do about it; OUT/last.pt, written at the end of every epoch, is kept."""
    from .data.images import BadImageError
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()] or [type(exc).__name__]
    msg = " ".join(lines)
    if "Original Traceback" in msg:  # a DataLoader worker's: its last line is "module.Type: message"
        msg = lines[-1].split(": ", 1)[-1]
    resume = f"; {out}/last.pt keeps the last finished epoch (dhkd train ... --resume)" if out else ""
    if isinstance(exc, BadImageError):
        return (f"bad image {msg}: fix or remove the file, or set data.bad_images=skip (torchvision and "
                f"gpu-decode backends){resume}")
    return f"{msg}: the training diverged; lower optim.lr (or raise sched.warmup_epochs){resume}"


if __name__ == "__main__":
    sys.exit(main())
