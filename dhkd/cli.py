"""Command line.

    dhkd train --config FILE --out DIR [--resume [auto]] [section.key=value ...]
    torchrun --nproc_per_node=K -m dhkd train ...     (DDP; docs/distributed.md)
    dhkd eval  --checkpoint FILE --config FILE [section.key=value ...]
    dhkd demo  [--out DIR] [--epochs N]
    dhkd experiment {mnist1d,mnist1d100} [--quick] [--out DIR] [--seeds N] [--jobs J]
    dhkd bench --report BENCH.json [...] [--out DIR]   (from a checkout: uses benchmarks/report.py)

(also ``python -m dhkd ...``). The config and the overrides are checked before anything runs; errors
print one line and exit with status 2.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def _train(args) -> int:
    from .config import load_config
    from .distributed import destroy_distributed, init_distributed, leave_process
    from .train import Trainer
    args.resume = {None: False, "last": True, "auto": "auto"}[args.resume]
    cfg = load_config(args.config, args.overrides)
    out = Path(args.out)
    if args.resume is True and not (out / "last.pt").is_file():
        raise FileNotFoundError(f"--resume: no checkpoint {out / 'last.pt'}")
    info = init_distributed("cpu" if cfg.train.device == "cpu" else None)  # a world of 1 outside torchrun
    try:
        final = Trainer(cfg, out, resume=args.resume, rank=info.rank, world_size=info.world_size).fit()
    finally:
        destroy_distributed()
    if info.is_main:
        print(json.dumps({k: v for k, v in final.items() if k.startswith(("val/", "train/", "epoch"))}))
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
    """The demo's MNIST-1D configs (the same settings as ``configs/mnist1d/``): a 1-D CNN teacher
    (method ``ce``) and MLP students."""
    from .config import config_from_dict
    common = {"data": {"dataset": "mnist1d", "mnist1d_samples": 5000, "batch_size": 128},
              "optim": {"lr": 0.1, "base_batch": 128, "momentum": 0.9, "weight_decay": 5e-4},
              "sched": {"name": "cosine"},
              "train": {"epochs": epochs, "seed": 0, "log_every": 10, "progress": False}}
    if method == "teacher":
        return config_from_dict({**common, "method": "ce", "student": {"name": "mnist1d_cnn"}})
    loss = {"ce": {}, "kd": {"kd_weight": 1.0, "kd_temperature": 4.0},
            "dhkd": {"logit_weight": 1.0, "logit_temperature": 2.0, "logit_loss": "binary_kl_norm"}}[method]
    teacher = {} if method == "ce" else {"name": "mnist1d_cnn", "checkpoint": teacher_checkpoint}
    return config_from_dict({**common, "method": method, "student": {"name": "mnist1d_mlp", "aux_head": "linear"},
                             "teacher": teacher, "loss": {"backend": "auto", **loss}})


def _demo(args) -> int:
    """Teacher (cached in the run dir), then CE, KD and DHKD students; prints their accuracies."""
    import torch

    from .train import Trainer, train_teacher
    out = Path(args.out)
    t0 = time.perf_counter()
    quiet = (lambda msg: None) if not args.verbose else print
    teacher_ckpt = out / f"teacher_{args.epochs}ep.pt"  # never reuse a teacher trained for other epochs
    device = "cuda" if torch.cuda.is_available() else "cpu"
    backend = "Triton kernels" if device == "cuda" else "chunked PyTorch path"
    print(f"dhkd demo: MNIST-1D (4000 train / 1000 test signals), {args.epochs} epochs each, device {device}, "
          f"fused loss via the {backend} (backend auto)")
    if not teacher_ckpt.is_file():
        print("  training the teacher (1-D CNN, cross-entropy) ...", flush=True)
        train_teacher(demo_config("teacher", args.epochs), teacher_ckpt, log=quiet)
    teacher_acc = torch.load(teacher_ckpt, map_location="cpu", weights_only=True).get("val_acc1")
    results = {}
    for method in ("ce", "kd", "dhkd"):
        print(f"  training the MLP student with {method} ({args.seeds} seed(s)) ...", flush=True)
        for seed in range(args.seeds):
            cfg = demo_config(method, args.epochs, str(teacher_ckpt))
            cfg.train.eval_teacher = False
            cfg.train.seed = seed
            row = Trainer(cfg, out / f"{method}_seed{seed}", log=quiet).fit()
            results.setdefault(method, []).append((row["val/acc1_main"], row.get("val/acc1_aux")))

    def stat(values):
        t = torch.tensor(values, dtype=torch.float64)
        spread = f" ± {t.std().item():.1f}" if len(values) > 1 else ""
        return f"{t.mean().item():.1f}%{spread}"

    print()
    print(f"{'model':<36}{'test top-1':>16}")
    if teacher_acc is not None:
        print(f"{'teacher: 1-D CNN':<36}{teacher_acc:>15.1f}%")
    names = {"ce": "student MLP, CE only", "kd": "student MLP, KD (CE + softmax KD)",
             "dhkd": "student MLP, DHKD (main head)"}
    for method, accs in results.items():
        print(f"{names[method]:<36}{stat([a for a, _ in accs]):>16}")
    print(f"{'  DHKD auxiliary head':<36}{stat([a for _, a in results['dhkd']]):>16}")
    if args.seeds > 1:
        print(f"(mean ± standard deviation over {args.seeds} student seeds; one teacher)")
    print(f"\nruns, checkpoints and metrics.jsonl in {out}/  ({time.perf_counter() - t0:.0f} s)")
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
    try:
        from benchmarks.report import main as report_main
    except ImportError as err:
        raise SystemExit(f"dhkd bench: the benchmarks/ folder of a dhkd checkout must be importable "
                         f"(run from the repository root): {err}") from None
    return report_main([*args.report, "--out", args.out])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="dhkd", description="Dual-Head Knowledge Distillation trainer")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train from a YAML config")
    p.add_argument("--config", required=True, help="YAML config file")
    p.add_argument("--out", required=True, help="run directory (checkpoints, metrics.jsonl)")
    p.add_argument("--resume", choices=("last", "auto"), default=None,
                   help="'--resume': continue from OUT/last.pt; '--resume auto': continue from it if it "
                        "exists, else start fresh (for torchrun --max-restarts)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    p.set_defaults(func=_train)

    p = sub.add_parser("eval", help="evaluate a checkpoint on the config's validation set")
    p.add_argument("--checkpoint", required=True, help="last.pt, best.pt or an exported student.pt")
    p.add_argument("--config", required=True, help="YAML config file of the run")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    p.set_defaults(func=_eval)

    p = sub.add_parser("demo", help="DHKD vs CE vs KD on MNIST-1D (about 30 s on a 2-core CPU)")
    p.add_argument("--out", default="runs/demo", help="run directory (default runs/demo)")
    p.add_argument("--epochs", type=_positive_int, default=30, help="epochs per model (default 30)")
    p.add_argument("--seeds", type=_positive_int, default=3, help="student seeds per method (default 3)")
    p.add_argument("--verbose", action="store_true", help="print per-epoch progress")
    p.set_defaults(func=_demo)

    p = sub.add_parser("experiment", help="the MNIST-1D head experiments (tables, plots, results.md)")
    p.add_argument("name", choices=["mnist1d", "mnist1d100"],
                   help="mnist1d: the 10-class head-collapse experiment; mnist1d100: one head vs two heads, "
                        "100 classes (configs/mnist1d100/experiment.yaml)")
    p.add_argument("--quick", action="store_true", help="1 seed, 2 epochs, fewer signals, no lr grid (CI smoke run)")
    p.add_argument("--out", default=None,
                   help="run directory (default runs/<name>_experiment, with --quick runs/<name>_quick)")
    p.add_argument("--seeds", type=_positive_int, default=None, help="student seeds per method (default 5; --quick 1)")
    p.add_argument("--jobs", type=_positive_int, default=1, help="runs trained in parallel processes (default 1)")
    p.set_defaults(func=_experiment)

    p = sub.add_parser("bench", help="benchmark report from pytest-benchmark JSON (run from a checkout)")
    p.add_argument("--report", nargs="+", required=True, metavar="BENCH.json",
                   help="pytest-benchmark JSON file(s) written with --benchmark-json")
    p.add_argument("--out", default="bench-report", help="folder for benchmarks.md and the PNG charts")
    p.set_defaults(func=_bench)

    args, extra = parser.parse_known_args(_resume_value(sys.argv[1:] if argv is None else list(argv)))
    if extra and hasattr(args, "overrides") and not any(e.startswith("-") for e in extra):
        args.overrides += extra  # overrides on both sides of an option: a=1 --out D b=2
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    from .config import ConfigError
    from .train import CheckpointError
    try:
        return args.func(args)
    except (ConfigError, CheckpointError, FileNotFoundError) as exc:
        print(f"dhkd {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
