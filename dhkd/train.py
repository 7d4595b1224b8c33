"""The trainer: one process, or one rank of a torchrun / DistributedDataParallel job.

    Trainer(cfg, "runs/x").fit()        # == dhkd train --config ... --out runs/x
    Trainer(cfg, out, rank=r, world_size=w)   # inside an initialized process group (docs/distributed.md)

Per optimizer step: ``accum_steps`` micro-batches of ``data.batch_size`` (global batch = batch_size x
world_size x accum_steps; the lr is ``optim.lr * global_batch / optim.base_batch``), then SGD/LARS and
a per-iteration lr schedule. Every epoch: top-1/top-5 of both heads on the validation set, a row in
``metrics.jsonl``, and ``last.pt`` (+ ``best.pt`` on a new best main-head top-1) written atomically.
``resume=True`` restores model, optimizer, scheduler, epoch, step and RNG states from ``last.pt``; the
data order is a function of (seed, epoch), so the resumed run continues exactly. The run directory's
lock, files and resume checks are ``dhkd.rundir.RunDir``'s; every path problem is reported before any
work (``dhkd.preflight``).
"""
from __future__ import annotations

import math
import os
import random
import time
from contextlib import nullcontext
from pathlib import Path
from urllib.error import URLError

import numpy as np
import torch

from .config import Config, ConfigError, config_from_dict, dump_config, expand_path, load_config, to_dict
from .data import build_data
from .distill import build_distiller
from .distributed import all_reduce_mean_, barrier, maybe_inject_fault, wrap_ddp
from .evaluation import evaluate, head_diagnostics, topk_correct  # noqa: F401 (topk_correct: re-exported)
from .optim import build_optimizer, build_scheduler, scaled_lr
from .preflight import batch_problem, check_start
from .rundir import (CHECKPOINT_FORMAT, RUN_KEYS, CheckpointError, FileLock, MetricsLog,  # noqa: F401
                     RunDir, RunDirError, load_checkpoint, read_checkpoint_file, save_checkpoint,
                     training_settings)

atomic_save = save_checkpoint  # the name earlier code used
SCHEDULE_KEYS = (("train", "epochs"), ("optim", "lr"), ("optim", "base_batch"), ("sched", None))


# ---------------------------------------------------------------- helpers

def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name!r} but CUDA is not available")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def set_deterministic(flag: bool, device: torch.device) -> None:
    if flag:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def rng_state(device: torch.device | None = None) -> dict:
    """CPU, python and numpy RNG states, plus the CUDA generator of ``device`` alone when it is a GPU
    (``get_rng_state_all`` would create a CUDA context on every GPU of the node, from every rank)."""
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                       "has_gauss": int(np_state[3]), "gauss": float(np_state[4])}}
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device | None = None) -> None:
    """Restore ``rng_state``'s states; the CUDA one into ``device``'s generator (a list from an older
    checkpoint: its entry for the device's index)."""
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    cuda = state.get("cuda")
    if cuda is not None and device is not None and device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        if isinstance(cuda, (list, tuple)):
            cuda = cuda[index] if index < len(cuda) else None
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, device)


# ---------------------------------------------------------------- teacher

def train_teacher(config, checkpoint: Path, *, device: str | None = None, log=print, on_epoch=None) -> dict:
    """Train a teacher with ``config`` (a ``Config`` or a YAML path; usually method ``ce``) and save its
    exported classifier (``{"model": state_dict}``, the format ``build_teacher`` reads) atomically to
    ``checkpoint``. Returns the final eval row.

    One process trains a given checkpoint at a time (a lock ``.NAME.lock`` beside it): another one
    waits, then uses the checkpoint the first one wrote (returning its ``{"val/acc1_main": ...}``).
    ``on_epoch(row)`` is called after every epoch of the teacher's run."""
    checkpoint = Path(checkpoint)
    overrides = [f"train.device={device}"] if device else []
    if isinstance(config, Config):
        tcfg = config_from_dict(to_dict(config), overrides)
    else:
        tcfg = load_config(config, overrides)
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(checkpoint.with_name(f".{checkpoint.name}.lock"), what="teacher checkpoint")
    waited = []

    def on_wait(pid):
        waited.append(pid)
        log(f"[dhkd] waiting for process {pid}, which is training the teacher {checkpoint}")
    lock.acquire(wait=True, on_wait=on_wait)
    try:
        if waited and checkpoint.is_file():
            saved = read_checkpoint_file(checkpoint)
            return {"val/acc1_main": saved.get("val_acc1")}
        run_dir = checkpoint.parent / f"{checkpoint.stem}_run"
        log(f"[dhkd] teacher checkpoint {checkpoint} missing: training {tcfg.student.name} in {run_dir}")
        trainer = Trainer(tcfg, run_dir, resume=_same_run(run_dir / "last.pt", tcfg), log=log, on_epoch=on_epoch)
        final = trainer.fit()
        atomic_save({"model": trainer.student.export_student().state_dict(), "config": to_dict(tcfg),
                     "val_acc1": final.get("val/acc1_main")}, checkpoint)
        return final
    finally:
        lock.release()


def _same_run(last: Path, cfg: Config) -> bool:
    """Whether ``last`` is a checkpoint of an interrupted run with ``cfg``'s training settings."""
    try:
        saved = load_checkpoint(last).get("config") or {}
    except CheckpointError:
        return False
    return training_settings(saved) == training_settings(to_dict(cfg))


def build_teacher_for(cfg: Config, device: torch.device, log=print, *, rank: int = 0, world_size: int = 1):
    """The frozen teacher of ``cfg`` on ``device`` (None for method ``ce``), training it first when
    ``teacher.checkpoint`` is missing and ``teacher.train_config`` says how. In a job of several
    processes rank 0 alone trains it (one process) while the others wait at a barrier."""
    from .models import build_teacher
    t = cfg.teacher
    if cfg.method == "ce" or t.name is None:
        return None
    ckpt = expand_path(t.checkpoint)
    if t.random_init or (ckpt is None and t.weights is None):
        ignored = [k for k in ("weights", "checkpoint") if getattr(t, k) is not None]
        if ignored:
            log(f"[dhkd] teacher.random_init=true: a randomly initialised {t.name} "
                f"({' and '.join('teacher.' + k for k in ignored)} ignored)")
        seed_everything(cfg.train.seed + 1)
        return build_teacher(t.name, num_classes=cfg.num_classes).to(device)
    if ckpt is not None and not os.path.isfile(ckpt):
        if t.train_config is None:
            raise FileNotFoundError(f"teacher checkpoint not found: {ckpt} (teacher.checkpoint); set "
                                    f"teacher.train_config to train one, or point teacher.checkpoint at a file")
        if rank == 0:
            train_teacher(expand_path(t.train_config), Path(ckpt), device=str(device), log=log)
    if ckpt is not None and world_size > 1:
        barrier()
    try:
        teacher = build_teacher(t.name, num_classes=cfg.num_classes, weights=t.weights, checkpoint=ckpt)
    except ValueError as exc:  # unreadable, or not this teacher's state dict
        raise ConfigError(f"teacher.checkpoint={t.checkpoint}: {exc}") from None
    except URLError as exc:  # torchvision fetches named weights on first use
        raise FileNotFoundError(
            f"teacher.weights={t.weights}: torchvision could not download them ({exc.reason}); fetch them "
            f"once on a machine with network access (they are cached under ~/.cache/torch) or set "
            f"teacher.checkpoint to a local file") from None
    return teacher.to(device)


# ---------------------------------------------------------------- trainer

def _schedule_changes(saved: dict, now: dict) -> list[str]:
    """``["train.epochs 2 -> 4", ...]``: the settings that shape the lr schedule and differ."""
    out = []
    for section, key in SCHEDULE_KEYS:
        keys = [key] if key else sorted(set(saved.get(section) or {}) | set(now.get(section) or {}))
        for k in keys:
            a, b = (saved.get(section) or {}).get(k), (now.get(section) or {}).get(k)
            if a != b:
                out.append(f"{section}.{k} {a} -> {b}")
    return out


def _meaning_changes(saved: dict, cfg: Config) -> list[str]:
    """Loss settings of a checkpoint's config (``saved``) that ``cfg`` reads differently: a config written
    before ``loss.ga_space`` existed had a 0-based ``logit_weight_off_epoch`` and a feature-space
    ``loss.ga``. Empty when the checkpoint is newer or ``cfg`` already keeps its meaning."""
    loss = saved.get("loss") if isinstance(saved, dict) else None
    if not isinstance(loss, dict) or "ga_space" in loss:
        return []
    out = []
    off = loss.get("logit_weight_off_epoch")
    if isinstance(off, int) and cfg.loss.logit_weight_off_epoch == off:
        out.append(f"loss.logit_weight_off_epoch={off} was 0-based when last.pt was written (the logit loss "
                   f"through epoch {off}); it is 1-based now and ends it one epoch earlier: set "
                   f"loss.logit_weight_off_epoch={off + 1} to keep the run's schedule")
    if loss.get("ga") and cfg.loss.ga and cfg.loss.ga_space == "params":
        out.append("loss.ga=true was the projection at the backbone output when last.pt was written; it is "
                   "the official parameter-space alignment now: set loss.ga_space=features to go on as the "
                   "run began")
    return out


def schedule_position(ckpt: dict, steps_per_epoch: int) -> int:
    """The scheduler step at which a run resumed from ``ckpt`` goes on, in this run's steps per epoch.

    The schedule's position is kept in epochs (and fractions of one): a checkpoint written after s
    steps of S per epoch resumes at s / S epochs = round(s / S * steps_per_epoch) steps of this run,
    whatever changed the steps per epoch (data.batch_size, world size, accum_steps,
    max_steps_per_epoch). A checkpoint without ``steps_per_epoch`` (older format) gives S = s / epoch."""
    step, epoch = int(ckpt["step"]), int(ckpt["epoch"])
    saved = ckpt.get("steps_per_epoch")
    if not saved:
        if epoch <= 0:
            return step
        saved = step / epoch
    return int(round(step * steps_per_epoch / saved))


class Trainer:
    """Builds everything from a ``Config`` and runs ``fit()``; see the module docstring.

    rank/world_size: the process's place in a data-parallel job (1 process: 0/1). With world_size > 1
    and an initialized process group the trainable student parts are wrapped in DDP (``self.ddp``), the
    teacher stays local; only rank 0 logs and writes files; ``all_reduce`` sums evaluation counts.
    resume: False, True (OUT/last.pt must exist) or "auto" (resume when OUT/last.pt exists).
    on_epoch: called with each epoch's eval row (progress bars).

    Before any work: every config path problem at once (``ConfigError``), then rank 0 creates and
    locks OUT (``RunDirError`` when another process holds it). A start that fails leaves no new OUT.
    """

    def __init__(self, cfg: Config, out_dir, *, resume: bool | str = False, rank: int = 0, world_size: int = 1,
                 log=print, on_epoch=None):
        if resume not in (False, True, "auto"):
            raise ValueError(f"resume must be False, True or 'auto', got {resume!r}")
        self.cfg = cfg
        self.out = Path(out_dir)
        self.rank, self.world_size = rank, world_size
        self.is_main = rank == 0
        self._print = log
        self.on_epoch = on_epoch
        self.run = None
        tr = cfg.train
        self.device = resolve_device(tr.device)
        distributed = world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized()
        if distributed and self.device.type == "cuda":
            local = torch.device("cuda", int(os.environ.get("LOCAL_RANK", torch.cuda.current_device())))
            if self.device.index is not None and self.device != local:
                raise ConfigError(f"train.device={tr.device!r}, but this rank's GPU is {local} (LOCAL_RANK); "
                                  f"use train.device=auto or cuda under torchrun")
            self.device = local
        if tr.sync_bn and distributed and self.device.type != "cuda":
            raise ConfigError("train.sync_bn=true needs CUDA: torch's SyncBatchNorm has no CPU implementation")
        self.amp = tr.amp == "bf16" or (tr.amp == "auto" and self.device.type == "cuda")
        self._distributed = distributed
        error = None
        try:
            check_start(cfg, self.out, resume=resume, world_size=world_size, check_out=self.is_main)
            restarted = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0"  # the old rank 0 may be exiting
            self.run = RunDir(self.out, is_main=self.is_main, tensorboard=tr.tensorboard, log=self.log,
                              lock_timeout_s=60.0 if restarted else 0.0)
        except (ConfigError, RunDirError, OSError) as exc:
            error = exc
        self._agree_to_start(error)
        try:
            self._build(cfg, resume)
        except BaseException:
            self.run.close(failed=True)
            raise

    def _agree_to_start(self, error: BaseException | None) -> None:
        """Raise ``error`` here, and a RunDirError on every other rank, when any rank cannot start."""
        if self._distributed:
            flag = torch.tensor([float(error is not None)], dtype=torch.float64, device=self.device)
            self.all_reduce(flag)
            if flag.item() and error is None:
                self.run.close(failed=True)
                raise RunDirError("another process of this job could not start (see rank 0's error)")
        if error is not None:
            raise error

    def _build(self, cfg: Config, resume) -> None:
        tr = cfg.train
        rank, world_size, distributed = self.rank, self.world_size, self._distributed
        set_deterministic(tr.deterministic, self.device)
        if resume == "auto":
            resume = self._last_checkpoint_exists()

        from .models import build_student
        try:  # before the teacher: a dataset problem costs no teacher training
            self.data = build_data(cfg, rank=rank, world_size=world_size, device=self.device)
        except ValueError as exc:
            raise exc if isinstance(exc, ConfigError) else ConfigError(str(exc)) from None
        if self.data.note:
            self.log(self.data.note)  # the input backend and what it guarantees (docs/training.md)
        if self.data.train is not None and self.data.num_train:
            bad = batch_problem(cfg, self.data.num_train, world_size)
            if bad:
                raise ConfigError(bad)
        self.accum = tr.accum_steps
        if tr.global_batch is not None:
            per_step = cfg.data.batch_size * world_size
            if tr.global_batch % per_step:
                raise ConfigError(f"train.global_batch={tr.global_batch} is not a multiple of data.batch_size "
                                  f"x processes = {per_step}")
            self.accum = tr.global_batch // per_step
        self.global_batch = cfg.data.batch_size * world_size * self.accum
        self.steps_per_epoch = len(self.data.train) // self.accum
        if tr.max_steps_per_epoch is not None:
            self.steps_per_epoch = min(self.steps_per_epoch, tr.max_steps_per_epoch)
        if self.steps_per_epoch < 1:
            raise ConfigError(f"train.accum_steps={self.accum} exceeds the {len(self.data.train)} batches "
                              f"per epoch")
        self.teacher = build_teacher_for(cfg, self.device, log=self.log, rank=rank, world_size=world_size)
        seed_everything(tr.seed)
        self.channels_last = tr.channels_last and self.data.kind == "image"
        self.student = build_student(cfg.student.name, num_classes=cfg.num_classes,
                                     aux_head=cfg.student.aux_head, aux_hidden=cfg.student.aux_hidden,
                                     aux_dropout=cfg.student.aux_dropout).to(self.device)
        if tr.sync_bn and distributed:
            self.student = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.student)
        if self.channels_last:
            self.student.to(memory_format=torch.channels_last)
            if self.teacher is not None:
                self.teacher.to(memory_format=torch.channels_last)
        self.distiller = build_distiller(self.student, self.teacher, cfg, autocast=self.autocast)
        self.distiller.grad_probe = tr.diagnostics
        if tr.compile:
            self.distiller.features = torch.compile(self.distiller.features)
            if self.distiller.teacher_forward is not None:
                self.distiller.teacher_forward = torch.compile(self.distiller.teacher_forward)

        self.lr = scaled_lr(cfg, self.global_batch)
        self.optimizer = build_optimizer(self.student, cfg, self.global_batch)
        self.scheduler = build_scheduler(self.optimizer, cfg, self.steps_per_epoch, self.global_batch)
        self.last_lr = self.optimizer.param_groups[0]["lr"]
        self.epoch = 0          # completed epochs
        self.step = 0           # optimizer steps
        self.best_acc1 = -1.0
        self.metrics = self.run.metrics
        self.resumed = bool(resume)
        if resume:
            self.resume(self.out / "last.pt")
        else:
            self.run.start_fresh(dump_config(cfg))
        self.ddp = None
        if distributed:
            self.ddp = wrap_ddp(self.distiller, self.device, find_unused_parameters=self._may_skip_aux_head())
            barrier()  # every rank has read the checkpoint before rank 0 writes the next one

    def _last_checkpoint_exists(self) -> bool:
        """``resume="auto"``: whether OUT/last.pt exists, the same answer on every rank."""
        seen = torch.tensor([float((self.out / "last.pt").is_file())], dtype=torch.float64, device=self.device)
        self.all_reduce(seen)
        if seen.item() not in (0.0, float(self.world_size)):
            raise CheckpointError(f"{self.out / 'last.pt'} is visible to {int(seen.item())} of {self.world_size} "
                                  f"processes: --out must be on a file system every node shares")
        return seen.item() > 0

    def _may_skip_aux_head(self) -> bool:
        """Whether a wrapped module can go without a gradient in some step (DDP's find_unused_parameters)."""
        if not self.distiller.uses_aux_head:
            return False  # the aux head is not wrapped (TrainedParts)
        c = self.cfg.loss
        return c.logit_weight == 0 or c.logit_weight_off_epoch is not None or (c.ce_weight == 0 and c.kd_weight == 0)

    def _ddp_hooks(self) -> bool:
        """DDP's own gradient all-reduce (overlapped with backward) serves one forward + one backward per
        micro-batch; gradient alignment (and the grad probe) run several backward passes, so their
        micro-batches run locally and ``sync_gradients`` averages the accumulated gradients once."""
        return self.ddp is not None and not (self.distiller.cfg.ga or self.distiller.grad_probe)

    def sync_gradients(self) -> None:
        """Average the accumulated gradients over ranks by hand (the micro-batches ran under no_sync)."""
        all_reduce_mean_([p.grad for p in self.student.parameters() if p.grad is not None])

    # -------------------------------------------------- hooks
    def log(self, msg: str) -> None:
        if self.is_main:
            self._print(msg)

    def autocast(self):
        if not self.amp:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def micro_batch_context(self, last: bool):
        """Context of one micro-batch's forward + backward: DDP's ``no_sync()`` except for the last
        micro-batch of a step whose gradients DDP all-reduces itself."""
        if self.ddp is None or (last and self._ddp_hooks()):
            return nullcontext()
        return self.ddp.no_sync()

    def micro_step(self, x: torch.Tensor, y: torch.Tensor, epoch: int) -> dict:
        """Forward + backward of one micro-batch (loss scaled by 1/accum); detached losses."""
        if not self._ddp_hooks():
            return self.distiller.train_step(x, y, epoch, scale=1.0 / self.accum)
        _, out = self.ddp(x, y, epoch)
        (out["loss"] * (1.0 / self.accum)).backward()
        out["loss"] = out["loss"].detach()
        return out

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over processes (identity for one process)."""
        if self.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(t)
        return t

    # -------------------------------------------------- checkpoints
    def state_dict(self, row: dict | None) -> dict:
        sched = self.scheduler.state_dict()
        sched["lr_lambdas"] = [None] * len(sched["lr_lambdas"])
        return {"format_version": CHECKPOINT_FORMAT, "epoch": self.epoch, "step": self.step,
                "steps_per_epoch": self.steps_per_epoch, "model": self.student.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": sched, "rng": rng_state(self.device), "best_acc1": self.best_acc1,
                "config": to_dict(self.cfg), "metrics": row or {}}

    def save(self, row: dict, is_best: bool) -> None:
        """``last.pt`` (and ``best.pt`` on a new best, written first): ``RunDir.save``."""
        if self.is_main:
            self.run.save(self.state_dict(row), is_best)

    def logged_terms(self, epoch: int) -> tuple[str, ...]:
        """The loss terms train rows carry at ``epoch``: those with a nonzero weight (method ``ce``
        has no ``kd``/``logit`` term; a logit weight switched off drops ``logit``)."""
        return tuple(k for k, w in zip(("ce", "kd", "logit"), self.distiller.loss_weights(epoch)) if w)

    def resume(self, path: Path) -> None:
        """Continue from ``path`` (OUT/last.pt): weights, optimizer, schedule position, RNG states. A
        schedule that this config changes (train.epochs, optim.lr, the global batch, sched.*) applies
        from the next step on, said in one line with the lr before and after."""
        ckpt = self.run.checkpoint_for_resume(to_dict(self.cfg))
        epoch = int(ckpt["epoch"])
        saved_groups = ckpt["optimizer"].get("param_groups") or [{}]
        try:
            self.student.load_state_dict(ckpt["model"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.scheduler.load_state_dict(ckpt["scheduler"])
        except (RuntimeError, KeyError, ValueError) as exc:
            raise CheckpointError(f"{path} does not match this model/optimizer: {exc}") from exc
        self.epoch, self.step = epoch, int(ckpt["step"])
        saved_lr = saved_groups[0].get("lr")
        self.scheduler.last_epoch = schedule_position(ckpt, self.steps_per_epoch)
        self.scheduler.base_lrs = [self.lr] * len(self.optimizer.param_groups)
        factor = self.scheduler.lr_lambdas[0](self.scheduler.last_epoch)
        for group in self.optimizer.param_groups:  # this config's schedule, from the next step on
            group["initial_lr"] = self.lr
            group["lr"] = self.lr * factor
        self.best_acc1 = float(ckpt.get("best_acc1", -1.0))
        set_rng_state(ckpt["rng"], self.device)
        self.run.finish_resume(ckpt)
        self.log(f"[dhkd] resumed from {path}: epoch {epoch}, step {self.step}")
        for note in _meaning_changes(ckpt.get("config") or {}, self.cfg):
            self.log(f"[dhkd] resume: {note}")
        total = self.cfg.train.epochs
        if epoch >= total:
            self.log(f"[dhkd] nothing left to train: the run has completed {epoch} of train.epochs={total} "
                     f"epochs (raise train.epochs to extend it)")
        else:
            changes = _schedule_changes(ckpt.get("config") or {}, to_dict(self.cfg))
            saved_peak = (ckpt["scheduler"].get("base_lrs") or [self.lr])[0]
            if not math.isclose(saved_peak, self.lr, rel_tol=1e-9):
                changes.append(f"peak lr {saved_peak:g} -> {self.lr:g} (global batch {self.global_batch})")
            new_lr = self.optimizer.param_groups[0]["lr"]
            if changes and saved_lr is not None:
                self.log(f"[dhkd] resume: {'; '.join(changes)}: the lr schedule changes, the next step's lr "
                         f"goes from {saved_lr:.4g} to {new_lr:.4g}")

    # -------------------------------------------------- evaluation (dhkd.evaluation)
    def evaluate(self, model=None) -> dict:
        """``dhkd.evaluation.evaluate`` of this run's student (or of ``model``) on its validation set."""
        distiller = getattr(self, "distiller", None)
        return evaluate(self.student, self.data, self.device, channels_last=self.channels_last,
                        autocast=self.autocast, all_reduce=self.all_reduce, model=model,
                        aux_trained=distiller is None or distiller.uses_aux_head,
                        broadcast_buffers=getattr(self, "ddp", None) is not None)

    def head_diagnostics(self) -> dict:
        """``dhkd.evaluation.head_diagnostics`` of this run's student."""
        return head_diagnostics(self.student, self.data, self.device, self.cfg, channels_last=self.channels_last,
                                autocast=self.autocast, aux_trained=self.distiller.uses_aux_head)

    # -------------------------------------------------- training
    def train_step(self, batches, epoch: int) -> dict:
        """One optimizer step over ``accum_steps`` (images, labels) micro-batches; detached stats."""
        stats = {}
        maybe_inject_fault(self.step + 1, self.rank)
        for i, (x, y) in enumerate(batches):
            with self.micro_batch_context(last=i == len(batches) - 1):
                out = self.micro_step(x, y, epoch)
            for k, v in out.items():
                v = v.detach().float() if torch.is_tensor(v) else torch.tensor(float(v))
                if k in ("correct", "n_valid"):
                    stats[k] = stats.get(k, 0) + v
                else:
                    stats[k] = stats.get(k, 0) + v / self.accum
        if self.ddp is not None and not self._ddp_hooks():
            self.sync_gradients()
        self.last_lr = self.optimizer.param_groups[0]["lr"]  # the lr this step uses (logged)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return stats

    def _progress(self, total: int, epoch: int):
        if not (self.is_main and self.cfg.train.progress):
            return None
        try:
            from tqdm.auto import tqdm
        except ImportError:
            return None
        return tqdm(total=total, desc=f"epoch {epoch + 1}/{self.cfg.train.epochs}", leave=False,
                    dynamic_ncols=True)

    def _window_means(self, sums: dict, bad: list) -> dict:
        """A log window's per-step means of ``sums`` (over all ranks) and ``nonfinite_steps``: the
        optimizer steps of the window whose loss was not finite on this process or on any other (the
        step's mean loss over the ranks is then not finite either). ``bad`` holds one 0/1 per step."""
        keys = sorted(sums)
        vals = torch.stack([torch.as_tensor(sums[k], dtype=torch.float64, device=self.device) for k in keys] +
                           [torch.as_tensor(b, dtype=torch.float64, device=self.device) for b in bad])
        if self.world_size > 1:
            vals = self.all_reduce(vals)
        n = len(bad)
        means = {k: float(v) / (n * self.world_size) for k, v in zip(keys, vals[:len(keys)])}
        means["nonfinite_steps"] = int((vals[len(keys):] > 0).sum())
        return means

    def train_epoch(self, epoch: int) -> dict:
        self.student.train()
        if self.world_size > 1:  # per-rank dropout masks, a function of (seed, epoch, rank) for resume
            torch.manual_seed(((self.cfg.train.seed * 1_000_003 + epoch) * 10_007 + self.rank) % 2**64)
        loader = self.data.train
        loader.set_epoch(epoch)
        it = iter(loader)
        bar = self._progress(self.steps_per_epoch, epoch)
        log_every = self.cfg.train.log_every
        terms = self.logged_terms(epoch)
        totals = torch.zeros(3, dtype=torch.float64, device=self.device)  # loss_sum steps correct
        n_seen = 0
        grad_cos = []
        win_t0, win_images, win_data, win_steps = time.perf_counter(), 0, 0.0, 0
        win, win_bad = {}, []  # window sums; per step: 1.0 where the loss was not finite
        for i in range(self.steps_per_epoch):
            batches = []
            for _ in range(self.accum):
                t0 = time.perf_counter()
                x, y = next(it)
                x = self.data.prepare(x, self.device, self.channels_last)
                y = y.to(self.device, non_blocking=True)
                win_data += time.perf_counter() - t0
                batches.append((x, y))
                win_images += y.shape[0] * self.world_size
            stats = self.train_step(batches, epoch)
            totals[0] += stats["loss"]
            totals[1] += 1
            totals[2] += stats.get("correct", 0)
            n_seen += sum(b[1].shape[0] for b in batches)
            if "grad_cos" in stats:
                grad_cos.append(stats["grad_cos"])
            for k in ("loss", *terms, "smooth", "grad_cos", "ga_cos", "ga_conflict"):
                if k in stats:
                    win[k] = win.get(k, 0) + stats[k]
            win_bad.append((~torch.isfinite(stats["loss"])).double())
            win_steps += 1
            if bar is not None:
                bar.update(1)
            if win_steps == log_every or i == self.steps_per_epoch - 1:
                means = self._window_means(win, win_bad)  # synchronizes the device
                loss = means.pop("loss")
                dt = time.perf_counter() - win_t0
                row = {"kind": "train", "epoch": epoch + 1, "step": self.step,
                       "lr": self.last_lr, "loss": loss,
                       "img_per_s": win_images / dt, "data_time_s": win_data / win_steps, **means}
                if self.distiller.method in ("binary_kl", "ce_binary_kl", "dhkd"):
                    row["logit_weight"] = self.distiller.loss_weights(epoch)[2]
                if not math.isfinite(loss) and self.cfg.loss.numerics == "exact":  # official*: logged, counted
                    raise FloatingPointError(f"loss is {loss} at epoch {epoch + 1}, step {self.step}")
                self.metrics.write(row)
                if bar is not None:
                    bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{row['img_per_s']:.0f}",
                                    data=f"{1000 * row['data_time_s']:.1f}ms")
                win_t0, win_images, win_data, win_steps = time.perf_counter(), 0, 0.0, 0
                win, win_bad = {}, []
        if bar is not None:
            bar.close()
        self.all_reduce(totals)
        out = {"train/loss": totals[0].item() / max(totals[1].item(), 1),
               "train/acc1_main": 100 * totals[2].item() / max(n_seen * self.world_size, 1)}
        if grad_cos and self.cfg.train.diagnostics and any(self.distiller.loss_weights(epoch)[:2]):
            out["diag/grad_cos"] = torch.stack(grad_cos).mean().item()
        return out

    def fit(self) -> dict:
        """Train from ``self.epoch`` to ``train.epochs`` (or ``train.stop_after_epoch``); the last eval
        row. The run directory's lock is released when it returns or raises."""
        try:
            return self._fit()
        finally:
            if self.run is not None:
                self.run.close()

    def _fit(self) -> dict:
        tr = self.cfg.train
        evals = [r for r in self.metrics.rows() if r.get("kind") == "eval"] if self.epoch else []
        last = evals[-1] if evals else {}
        trained = False
        if self.epoch == 0 and tr.eval_teacher and self.teacher is not None:
            row = {"kind": "teacher", "epoch": 0, "step": 0,
                   **{k.replace("val/", "val/teacher_"): v for k, v in self.evaluate(self.teacher).items()}}
            self.metrics.write(row)
            self.log(f"[dhkd] teacher {self.cfg.teacher.name}: val top-1 {row['val/teacher_acc1']:.2f}%")
        self.log(f"[dhkd] {self.cfg.method}: {self.cfg.student.name} on {self.cfg.data.dataset}, "
                 f"global batch {self.global_batch}, lr {self.lr:g}, {self.steps_per_epoch} steps/epoch, "
                 f"device {self.device}{' bf16' if self.amp else ''}")
        stop = tr.epochs if tr.stop_after_epoch is None else min(tr.epochs, tr.stop_after_epoch)
        while self.epoch < stop:
            epoch = self.epoch
            t0 = time.perf_counter()
            train_stats = self.train_epoch(epoch)
            val = self.evaluate()
            if tr.diagnostics:
                val.update(self.head_diagnostics())
            self.epoch = epoch + 1
            row = {"kind": "eval", "epoch": self.epoch, "step": self.step,
                   "lr": self.last_lr, **train_stats, **val,
                   "epoch_time_s": time.perf_counter() - t0}
            is_best = val["val/acc1_main"] > self.best_acc1
            if is_best:
                self.best_acc1 = val["val/acc1_main"]
            self.save(row, is_best)
            self.metrics.write(row)
            if self.world_size > 1:
                barrier()  # no rank starts the next epoch before last.pt is in place
            aux = f", aux {val['val/acc1_aux']:.2f}%" if self.distiller.uses_aux_head else ""
            self.log(f"[dhkd] epoch {self.epoch}/{tr.epochs}: train loss {row['train/loss']:.4f}, "
                     f"val top-1 main {val['val/acc1_main']:.2f}%{aux} ({row['epoch_time_s']:.1f}s)")
            last, trained = row, True
            if self.on_epoch is not None:
                self.on_epoch(row)
        if self.is_main and self.epoch >= tr.epochs and (trained or not (self.out / "student.pt").is_file()):
            self.run.save_student({"model": self.student.export_student().state_dict(), "config": to_dict(self.cfg)})
        self.metrics.close()
        if self.world_size > 1:
            barrier()  # every rank returns after rank 0's last writes
        return last


def evaluate_checkpoint(cfg: Config, checkpoint, *, log=print) -> dict:
    """Val metrics of a student checkpoint: a trainer checkpoint (``last.pt``/``best.pt``) or an
    exported ``student.pt`` (main head only)."""
    from .models import build_student, read_state_dict
    device = resolve_device(cfg.train.device)
    try:
        state = read_state_dict(checkpoint)
    except ValueError as exc:  # unreadable, or no state dict: the one line resume gives too
        raise CheckpointError(str(exc)) from None
    amp = cfg.train.amp == "bf16" or (cfg.train.amp == "auto" and device.type == "cuda")
    data = build_data(cfg, device=device, with_train=False)
    channels_last = cfg.train.channels_last and data.kind == "image"
    student = build_student(cfg.student.name, num_classes=cfg.num_classes, aux_head=cfg.student.aux_head,
                            aux_hidden=cfg.student.aux_hidden, aux_dropout=cfg.student.aux_dropout)

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16) if amp else nullcontext()

    def run(net, model=None):
        return evaluate(net.to(device), data, device, channels_last=channels_last, autocast=autocast,
                        all_reduce=lambda t: t, model=model)

    if any(k.startswith("aux_") for k in state):
        try:
            student.load_state_dict(state)
        except RuntimeError as exc:
            raise CheckpointError(f"{checkpoint} does not match student {cfg.student.name}: {exc}") from exc
        return run(student)
    exported = student.export_student()
    try:
        exported.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError(f"{checkpoint} does not match student {cfg.student.name}: {exc}") from exc
    result = run(student, exported.to(device).eval())
    return {k.replace("val/acc1", "val/acc1_main").replace("val/acc5", "val/acc5_main"): v
            for k, v in result.items()}
