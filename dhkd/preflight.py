"""What would stop a run, found before anything runs: every path and size problem of a config at once.

    problems = start_problems(cfg, "runs/x")          # [] when the run can start
    check_start(cfg, "runs/x")                         # ConfigError listing all of them

Checked: ``--out`` (a file, not writable), ``--resume`` without ``OUT/last.pt``, the dataset's
directories, the teacher's checkpoint (or the config that trains it, itself checked), and whether one
batch fits into the training set (MNIST-1D, MNIST-1D-100, CIFAR-100 and synthetic sizes follow from the
config; ImageNet's is counted when its folders are read, still before the teacher is built).
"""
from __future__ import annotations

import os
from pathlib import Path

from .config import Config, ConfigError, expand_path, load_config
from .rundir import out_dir_problems

CIFAR100_TRAIN = 50_000


def train_set_size(cfg: Config) -> int | None:
    """Training samples of ``cfg.data`` when they follow from the config (None for ImageNet)."""
    d = cfg.data
    if d.dataset == "mnist1d":  # mnist1d's make_dataset: n // 10 signals per class, 80% train
        return int((d.mnist1d_samples // 10) * 10 * 0.8)
    if d.dataset == "mnist1d100":  # dhkd.mnist1d100: per class 60% train
        from .mnist1d100 import NUM_CLASSES, split_sizes
        try:
            return split_sizes(d.mnist1d_samples)["train"] * NUM_CLASSES
        except ValueError:  # an empty split: a config problem of its own (dhkd.config)
            return None
    if d.dataset == "synthetic":
        return d.synthetic_train_samples
    if d.dataset == "cifar100":
        return CIFAR100_TRAIN
    return None


def batch_problem(cfg: Config, n_train: int, world_size: int = 1) -> str | None:
    """The problem when ``n_train`` samples over ``world_size`` processes hold no full optimizer step
    (None as well when the batch settings are themselves invalid: dhkd.config reports those)."""
    bs, tr = cfg.data.batch_size, cfg.train
    if bs < 1 or tr.accum_steps < 1 or (tr.global_batch is not None and tr.global_batch < 1) or world_size < 1:
        return None
    accum = tr.global_batch // (bs * world_size) if tr.global_batch else tr.accum_steps
    per_rank = n_train // world_size
    if per_rank // bs >= max(accum, 1):
        return None
    where = (f"the {n_train} training samples of {cfg.data.dataset}" if world_size == 1 else
             f"the {per_rank} training samples per process ({n_train} over {world_size} processes)")
    if bs > per_rank:
        return f"data.batch_size={bs} is larger than {where}"
    return f"one optimizer step (data.batch_size={bs} x {accum} accumulation steps) needs more than {where}"


def _data_problems(cfg: Config) -> list[str]:
    d = cfg.data
    if d.dataset not in ("cifar100", "imagenet") or not d.root:
        if d.dataset in ("mnist1d", "mnist1d100") and d.root and os.path.exists(expand_path(d.root)) \
                and not os.path.isdir(expand_path(d.root)):
            return [f"data.root={d.root} is a file (for {d.dataset} it is the cache directory)"]
        return []
    root = expand_path(d.root)
    if d.dataset == "cifar100":
        expected = os.path.join(root, "cifar-100-python")
        if not os.path.isdir(expected):
            return [f"data.root={d.root}: CIFAR-100 not found: expected the directory {expected} (the python "
                    f"version, cifar-100-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html, "
                    f"extracted there; dhkd does not download datasets)"]
        return []
    missing = [os.path.join(root, s) for s in ("train", "val") if not os.path.isdir(os.path.join(root, s))]
    if missing:
        return [f"data.root={d.root}: ImageNet not found: expected the director{'ies' if len(missing) > 1 else 'y'} "
                f"{' and '.join(missing)} (ImageFolders: one sub-directory of images per class)"]
    return []


def _loss_backend_problems(cfg: Config) -> list[str]:
    """``loss.backend=triton`` where its kernels cannot run: no triton package, or a CPU device
    without the Triton interpreter (TRITON_INTERPRET=1)."""
    if cfg.loss.backend != "triton":
        return []
    import importlib.util

    import torch
    if importlib.util.find_spec("triton") is None:
        return ["loss.backend=triton needs the triton package, which is not installed here; use "
                "loss.backend=auto or torch"]
    device = cfg.train.device
    cuda = torch.cuda.is_available() and device != "cpu"
    if not cuda and os.environ.get("TRITON_INTERPRET", "0") != "1":
        where = "train.device=cpu" if device == "cpu" else "this machine has no CUDA device"
        return [f"loss.backend=triton runs on CUDA, but {where}; use loss.backend=auto or torch (or set "
                f"TRITON_INTERPRET=1 to run the kernels in the slow interpreter)"]
    return []


def _overwrite_problems(cfg: Config, out: Path) -> list[str]:
    """A fresh run writes OUT/config.yaml: refuse when that file is the config being read (the
    user's file, comments and all, would be replaced by the resolved dump)."""
    source, target = getattr(cfg, "source", None), out / "config.yaml"
    if source is None or not target.exists():
        return []
    try:
        same = os.path.samefile(source, target)
    except OSError:
        return []
    if not same:
        return []
    return [f"--config {source} is {target}, which a fresh run replaces with the resolved config: copy it "
            f"elsewhere and pass the copy, or pass --resume to continue that run"]


def samples_problems(cfg: Config) -> list[str]:
    """A data set too small for its own splits (MNIST-1D-100: 4 signals per class)."""
    d = cfg.data
    if d.dataset != "mnist1d100" or d.mnist1d_samples <= 0:
        return []
    from .mnist1d100 import split_sizes
    try:
        split_sizes(d.mnist1d_samples)
    except ValueError as exc:  # too few signals per class for train / val / test
        return [f"data.mnist1d_samples={d.mnist1d_samples}: {exc} (mnist1d100 needs at least 400, "
                f"4 per class)"]
    return []


def _teacher_problems(cfg: Config) -> list[str]:
    t = cfg.teacher
    if cfg.method == "ce" or t.name is None or t.random_init or t.checkpoint is None:
        return []
    ckpt = expand_path(t.checkpoint)
    if os.path.isdir(ckpt):
        return [f"teacher.checkpoint={t.checkpoint} is a directory, not a checkpoint file"]
    if os.path.isfile(ckpt):
        return []
    if t.train_config is None:
        return [f"teacher.checkpoint: teacher checkpoint not found: {ckpt}; set teacher.train_config to "
                f"train one, or point teacher.checkpoint at a file"]
    tc = expand_path(t.train_config)
    if not os.path.isfile(tc):
        return [f"teacher.train_config: config file not found: {tc} (it trains the missing teacher "
                f"checkpoint {ckpt})"]
    problems: list = []
    try:
        tcfg = load_config(tc, partial=problems)
    except ConfigError as exc:
        problems.extend(exc.problems)
        tcfg = None
    if tcfg is not None:
        problems += samples_problems(tcfg)
    problems = [f"teacher.train_config: {p}" for p in problems]
    if tcfg is not None:
        problems += out_dir_problems(Path(ckpt).parent, label=f"teacher.checkpoint={t.checkpoint}: its folder")
        n = train_set_size(tcfg)
        bad = batch_problem(tcfg, n) if n is not None else None
        if bad:
            problems.append(f"teacher.train_config: {bad}")
    return problems


def start_problems(cfg: Config | None, out=None, *, resume=False, world_size: int = 1,
                   check_out: bool = True) -> list[str]:
    """Every problem that would stop ``cfg`` from training into ``out``, one line each."""
    problems = []
    if out is not None and check_out:
        problems += out_dir_problems(out)
        if resume is True and not (Path(out) / "last.pt").is_file():
            problems.append(f"--resume: no checkpoint {Path(out) / 'last.pt'}")
    if cfg is None:  # the config itself could not be read
        return problems
    problems += samples_problems(cfg) + _data_problems(cfg)
    problems += _loss_backend_problems(cfg)
    fresh = resume is False or (resume == "auto" and not (Path(out) / "last.pt").is_file()) if out else False
    if out is not None and check_out and fresh:
        problems += _overwrite_problems(cfg, Path(out))
    gb, per_step = cfg.train.global_batch, cfg.data.batch_size * world_size
    if gb is not None and per_step > 0 and gb % per_step:
        problems.append(f"train.global_batch={gb} is not a multiple of data.batch_size x processes = {per_step}")
    n = train_set_size(cfg)
    bad = batch_problem(cfg, n, world_size) if n is not None else None
    if bad:
        problems.append(bad)
    problems += _teacher_problems(cfg)
    return problems


def check_start(cfg: Config, out=None, **kwargs) -> None:
    """ConfigError listing every ``start_problems`` of ``cfg``."""
    ConfigError.raise_for(start_problems(cfg, out, **kwargs))
