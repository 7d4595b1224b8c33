"""The trainer: one process, or one rank of a torchrun / DistributedDataParallel job.

    Trainer(cfg, "runs/x").fit()        # == dhkd train --config ... --out runs/x
    Trainer(cfg, out, rank=r, world_size=w)   # inside an initialized process group (docs/distributed.md)

Per optimizer step: ``accum_steps`` micro-batches of ``data.batch_size`` (global batch = batch_size x
world_size x accum_steps; the lr is ``optim.lr * global_batch / optim.base_batch``), then SGD/LARS and
a per-iteration lr schedule. Every epoch: top-1/top-5 of both heads on the validation set, a row in
``metrics.jsonl``, and ``last.pt`` (+ ``best.pt`` on a new best main-head top-1) written atomically.
``resume=True`` restores model, optimizer, scheduler, epoch, step and RNG states from ``last.pt``; the
data order is a function of (seed, epoch), so the resumed run continues exactly.
"""
from __future__ import annotations

import json
import math
import os
import random
import time
from contextlib import nullcontext
from pathlib import Path
from urllib.error import URLError

import numpy as np
import torch

from .atomic import atomic_path, atomic_write_text
from .config import Config, ConfigError, config_from_dict, dump_config, expand_path, load_config, to_dict
from .data import build_data
from .distill import build_distiller
from .distributed import all_reduce_mean_, barrier, broadcast_tensors, maybe_inject_fault, wrap_ddp
from .optim import build_optimizer, build_scheduler, scaled_lr

CHECKPOINT_FORMAT = 1
RUN_KEYS = (("method",), ("student", "name"), ("student", "aux_head"), ("data", "dataset"))


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: unreadable, truncated, of another format or run, or stale."""


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


def atomic_save(obj, path: Path) -> None:
    """``torch.save`` to a temporary file in the same directory, then ``os.replace``."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def load_checkpoint(path) -> dict:
    """A trainer checkpoint (``torch.load(weights_only=True)``); CheckpointError when unusable."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"cannot read checkpoint {path} (truncated or corrupt file?): "
                              f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
                              ) from exc
    if not isinstance(ckpt, dict) or "format_version" not in ckpt:
        raise CheckpointError(f"{path} is not a dhkd trainer checkpoint (no format_version)")
    if ckpt["format_version"] != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} has checkpoint format {ckpt['format_version']}, this dhkd reads "
                              f"format {CHECKPOINT_FORMAT}")
    return ckpt


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> list[torch.Tensor]:
    """Number of rows whose label is among the top-k logits, for each k (k capped at C)."""
    kmax = min(max(ks), logits.shape[1])
    top = logits.topk(kmax, dim=1).indices
    hit = top == labels.unsqueeze(1)
    return [hit[:, :min(k, kmax)].any(1).sum() for k in ks]


class MetricsLog:
    """``metrics.jsonl`` (one JSON object per line) plus TensorBoard scalars when installed."""

    def __init__(self, out_dir: Path, enabled: bool, tensorboard: bool):
        self.path = out_dir / "metrics.jsonl"
        self.enabled = enabled
        self.tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(out_dir / "tb"))
            except Exception:  # tensorboard not installed
                self.tb = None

    def rows(self) -> list[dict]:
        if not self.path.is_file():
            return []
        rows = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a crash
                break
        return rows

    def truncate_after(self, epoch: int) -> None:
        """Drop rows of epochs after ``epoch`` (left by an interrupted run), atomically."""
        if not self.enabled or not self.path.is_file():
            return
        keep = [r for r in self.rows() if r.get("epoch", 0) <= epoch]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in keep))

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("epoch", "step"):
                    self.tb.add_scalar(k if "/" in k else f"{row.get('kind', 'train')}/{k}", v, row.get("step", 0))
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


# ---------------------------------------------------------------- teacher

def train_teacher(config, checkpoint: Path, *, device: str | None = None, log=print) -> dict:
    """Train a teacher with ``config`` (a ``Config`` or a YAML path; usually method ``ce``) and save its
    exported classifier (``{"model": state_dict}``, the format ``build_teacher`` reads) atomically to
    ``checkpoint``. Returns the final eval row."""
    checkpoint = Path(checkpoint)
    overrides = [f"train.device={device}"] if device else []
    if isinstance(config, Config):
        tcfg = config_from_dict(to_dict(config), overrides)
    else:
        tcfg = load_config(config, overrides)
    run_dir = checkpoint.parent / f"{checkpoint.stem}_run"
    log(f"[dhkd] teacher checkpoint {checkpoint} missing: training {tcfg.student.name} in {run_dir}")
    trainer = Trainer(tcfg, run_dir, resume=(run_dir / "last.pt").is_file(), log=log)
    final = trainer.fit()
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    atomic_save({"model": trainer.student.export_student().state_dict(), "config": to_dict(tcfg),
                 "val_acc1": final.get("val/acc1_main")}, checkpoint)
    return final


def build_teacher_for(cfg: Config, device: torch.device, log=print, *, rank: int = 0, world_size: int = 1):
    """The frozen teacher of ``cfg`` on ``device`` (None for method ``ce``), training it first when
    ``teacher.checkpoint`` is missing and ``teacher.train_config`` says how. In a job of several
    processes rank 0 alone trains it (one process) while the others wait at a barrier."""
    from .models import build_teacher
    t = cfg.teacher
    if cfg.method == "ce" or t.name is None:
        return None
    ckpt = expand_path(t.checkpoint)
    if ckpt is None and t.weights is None:  # teacher.random_init (validated)
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
    except URLError as exc:  # torchvision fetches named weights on first use
        raise FileNotFoundError(
            f"teacher.weights={t.weights}: torchvision could not download them ({exc.reason}); fetch them "
            f"once on a machine with network access (they are cached under ~/.cache/torch) or set "
            f"teacher.checkpoint to a local file") from None
    return teacher.to(device)


# ---------------------------------------------------------------- trainer

class Trainer:
    """Builds everything from a ``Config`` and runs ``fit()``; see the module docstring.

    rank/world_size: the process's place in a data-parallel job (1 process: 0/1). With world_size > 1
    and an initialized process group the trainable student parts are wrapped in DDP (``self.ddp``), the
    teacher stays local; only rank 0 logs and writes files; ``all_reduce`` sums evaluation counts.
    resume: False, True (OUT/last.pt must exist) or "auto" (resume when OUT/last.pt exists).
    """

    def __init__(self, cfg: Config, out_dir, *, resume: bool | str = False, rank: int = 0, world_size: int = 1,
                 log=print):
        if resume not in (False, True, "auto"):
            raise ValueError(f"resume must be False, True or 'auto', got {resume!r}")
        self.cfg = cfg
        self.out = Path(out_dir)
        self.rank, self.world_size = rank, world_size
        self.is_main = rank == 0
        self._print = log
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
        set_deterministic(tr.deterministic, self.device)
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            for stale in self.out.glob(".*.pt.*.tmp"):  # left by a process killed while saving
                stale.unlink(missing_ok=True)
        if resume == "auto":
            resume = self._last_checkpoint_exists()

        from .models import build_student
        self.teacher = build_teacher_for(cfg, self.device, log=self.log, rank=rank, world_size=world_size)
        seed_everything(tr.seed)
        self.data = build_data(cfg, rank=rank, world_size=world_size, device=self.device)
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
        self.lr = scaled_lr(cfg, self.global_batch)
        self.optimizer = build_optimizer(self.student, cfg, self.global_batch)
        self.scheduler = build_scheduler(self.optimizer, cfg, self.steps_per_epoch, self.global_batch)
        self.last_lr = self.optimizer.param_groups[0]["lr"]
        self.epoch = 0          # completed epochs
        self.step = 0           # optimizer steps
        self.best_acc1 = -1.0
        self.metrics = MetricsLog(self.out, self.is_main, tr.tensorboard)
        if resume:
            self.resume(self.out / "last.pt")
        elif self.is_main:
            (self.out / "config.yaml").write_text(dump_config(cfg), encoding="utf-8")
            self.metrics.truncate_after(-1)  # a fresh run starts a fresh metrics.jsonl
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
                "model": self.student.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": sched, "rng": rng_state(self.device), "best_acc1": self.best_acc1,
                "config": to_dict(self.cfg), "metrics": row or {}}

    def save(self, row: dict, is_best: bool) -> None:
        """``best.pt`` (on a new best) before ``last.pt``: a crash between the two never leaves a
        ``last.pt`` whose ``best_acc1`` names an epoch that ``best.pt`` does not hold."""
        if not self.is_main:
            return
        state = self.state_dict(row)
        if is_best:
            atomic_save(state, self.out / "best.pt")
        atomic_save(state, self.out / "last.pt")

    def resume(self, path: Path) -> None:
        ckpt = load_checkpoint(path)
        saved = ckpt.get("config", {})
        now = to_dict(self.cfg)
        for keys in RUN_KEYS:
            a, b = saved, now
            for k in keys:
                a, b = (a or {}).get(k), (b or {}).get(k)
            if a != b:
                raise CheckpointError(f"{path} was written by a run with {'.'.join(keys)}={a!r}, "
                                      f"but this config has {b!r}")
        epoch = int(ckpt["epoch"])
        done = [r["epoch"] for r in self.metrics.rows() if r.get("kind") == "eval"]
        if done and max(done) > epoch:
            raise CheckpointError(
                f"{path} is from epoch {epoch}, but {self.metrics.path} records completed epoch {max(done)}: "
                f"the checkpoint is older than the run (was last.pt replaced?); refusing to resume")
        try:
            self.student.load_state_dict(ckpt["model"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.scheduler.load_state_dict(ckpt["scheduler"])
        except (RuntimeError, KeyError, ValueError) as exc:
            raise CheckpointError(f"{path} does not match this model/optimizer: {exc}") from exc
        self.epoch, self.step = epoch, int(ckpt["step"])
        saved_lr = self.scheduler.base_lrs[0]
        if not math.isclose(saved_lr, self.lr, rel_tol=1e-9):
            # another global batch (world size) or optim.lr: the peak lr follows this config's scaling rule
            self.scheduler.base_lrs = [self.lr] * len(self.optimizer.param_groups)
            for group in self.optimizer.param_groups:
                group["initial_lr"] = self.lr
                group["lr"] = self.lr * self.scheduler.lr_lambdas[0](self.scheduler.last_epoch)
            self.log(f"[dhkd] resume: peak lr {self.lr:g} at global batch {self.global_batch} "
                     f"(the checkpoint's run used {saved_lr:g})")
        self.best_acc1 = float(ckpt.get("best_acc1", -1.0))
        set_rng_state(ckpt["rng"], self.device)
        self.metrics.truncate_after(epoch)
        row = ckpt.get("metrics") or {}
        if self.is_main and epoch and row.get("epoch") == epoch and epoch not in done:
            self.metrics.write(row)  # the process died between last.pt and its metrics.jsonl row
        self.log(f"[dhkd] resumed from {path}: epoch {epoch}, step {self.step}")

    # -------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self, model=None) -> dict:
        """Top-1/top-5 of the student's main and auxiliary heads (or of ``model``'s logits) on val."""
        student = self.student
        if getattr(self, "ddp", None) is not None:  # rank 0's BatchNorm statistics on every rank
            broadcast_tensors(list(student.buffers()))
        was_training = student.training
        student.eval()
        counts = torch.zeros(6, dtype=torch.float64, device=self.device)  # m1 m5 a1 a5 n ce_sum
        for x, y in self.data.val:
            x = self.data.prepare(x, self.device, self.channels_last)
            y = y.to(self.device, non_blocking=True)
            with self.autocast():
                if model is not None:
                    z1, z2 = model(x), None
                else:
                    f, a = student.forward_features(x)
                    z1, z2 = student.head(f), student.aux_logits(f, a)
            z1 = z1.float()
            m1, m5 = topk_correct(z1, y)
            counts[0] += m1
            counts[1] += m5
            if z2 is not None:
                a1, a5 = topk_correct(z2.float(), y)
                counts[2] += a1
                counts[3] += a5
            counts[4] += y.numel()
            counts[5] += torch.nn.functional.cross_entropy(z1, y, reduction="sum").double()
        self.all_reduce(counts)
        student.train(was_training)
        n = max(counts[4].item(), 1.0)
        if model is not None:
            return {"val/acc1": 100 * counts[0].item() / n, "val/acc5": 100 * counts[1].item() / n}
        row = {"val/acc1_main": 100 * counts[0].item() / n, "val/acc5_main": 100 * counts[1].item() / n,
               "val/acc1_aux": 100 * counts[2].item() / n, "val/acc5_aux": 100 * counts[3].item() / n,
               "val/loss_ce_main": counts[5].item() / n, "val/n": int(counts[4].item())}
        distiller = getattr(self, "distiller", None)
        if distiller is not None and not distiller.uses_aux_head:  # an aux head no loss trained
            del row["val/acc1_aux"], row["val/acc5_aux"]
        return row

    @torch.no_grad()
    def head_diagnostics(self) -> dict:
        """``dhkd.diagnostics.head_report`` of the main head (``diag/main/<key>``) and, for method dhkd,
        of the auxiliary head (``diag/aux/<key>``), with NC1 on the first ``train.diagnostics_samples``
        validation samples of this process (eval mode; each head's NC1 on its own input features)."""
        from .diagnostics import head_report
        student = self.student
        was_training = student.training
        student.eval()
        feats, aux_feats, labels, n = [], [], [], 0
        for x, y in self.data.val:
            x = self.data.prepare(x, self.device, self.channels_last)
            with self.autocast():
                f, a = student.forward_features(x)
            feats.append(f.float())
            aux_feats.append(f.float() if a is None else a.float())
            labels.append(y.to(self.device))
            n += y.shape[0]
            if n >= self.cfg.train.diagnostics_samples:
                break
        student.train(was_training)
        k = self.cfg.train.diagnostics_samples
        f, a, y = torch.cat(feats)[:k], torch.cat(aux_feats)[:k], torch.cat(labels)[:k]
        c = self.cfg.num_classes
        row = {f"diag/main/{key}": v for key, v in head_report(student.head.weight, f, y, c).items()}
        if self.distiller.uses_aux_head:
            row.update({f"diag/aux/{key}": v for key, v in head_report(student.aux_head.weight, a, y, c).items()})
        return row

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

    def train_epoch(self, epoch: int) -> dict:
        self.student.train()
        if self.world_size > 1:  # per-rank dropout masks, a function of (seed, epoch, rank) for resume
            torch.manual_seed((self.cfg.train.seed * 1_000_003 + epoch) * 10_007 + self.rank)
        loader = self.data.train
        loader.set_epoch(epoch)
        it = iter(loader)
        bar = self._progress(self.steps_per_epoch, epoch)
        log_every = self.cfg.train.log_every
        totals = torch.zeros(3, dtype=torch.float64, device=self.device)  # loss_sum steps correct
        n_seen = 0
        grad_cos = []
        win_t0, win_images, win_data, win_steps = time.perf_counter(), 0, 0.0, 0
        win = {}
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
            for k in ("loss", "ce", "kd", "logit", "smooth", "grad_cos", "ga_cos", "ga_conflict"):
                if k in stats:
                    win[k] = win.get(k, 0) + stats[k]
            win["nonfinite_steps"] = win.get("nonfinite_steps", 0) + (~torch.isfinite(stats["loss"])).float()
            win_steps += 1
            if bar is not None:
                bar.update(1)
            if win_steps == log_every or i == self.steps_per_epoch - 1:
                if self.world_size > 1:  # the window's means over all ranks
                    keys = sorted(win)
                    vals = self.all_reduce(torch.stack([torch.as_tensor(win[k], dtype=torch.float64,
                                                                         device=self.device) for k in keys]))
                    win = dict(zip(keys, vals / self.world_size))
                means = {k: float(v) / win_steps for k, v in win.items()}  # synchronizes the device
                means["nonfinite_steps"] = int(round(means["nonfinite_steps"] * win_steps))
                loss = means.pop("loss")
                dt = time.perf_counter() - win_t0
                row = {"kind": "train", "epoch": epoch + 1, "step": self.step,
                       "lr": self.last_lr, "loss": loss,
                       "img_per_s": win_images / dt, "data_time_s": win_data / win_steps, **means}
                row["logit_weight"] = self.distiller.loss_weights(epoch)[2]
                if not math.isfinite(loss) and self.cfg.loss.numerics != "official":  # official: logged, counted
                    raise FloatingPointError(f"loss is {loss} at epoch {epoch + 1}, step {self.step}")
                self.metrics.write(row)
                if bar is not None:
                    bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{row['img_per_s']:.0f}",
                                    data=f"{1000 * row['data_time_s']:.1f}ms")
                win_t0, win_images, win_data, win_steps = time.perf_counter(), 0, 0.0, 0
                win = {}
        if bar is not None:
            bar.close()
        self.all_reduce(totals)
        out = {"train/loss": totals[0].item() / max(totals[1].item(), 1),
               "train/acc1_main": 100 * totals[2].item() / max(n_seen * self.world_size, 1)}
        if grad_cos and self.cfg.train.diagnostics and any(self.distiller.loss_weights(epoch)[:2]):
            out["diag/grad_cos"] = torch.stack(grad_cos).mean().item()
        return out

    def fit(self) -> dict:
        """Train from ``self.epoch`` to ``train.epochs`` (or ``train.stop_after_epoch``); the last eval row."""
        tr = self.cfg.train
        last = self.metrics.rows()[-1] if self.epoch and self.metrics.rows() else {}
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
            last = row
        if self.is_main and self.epoch >= tr.epochs:
            atomic_save({"model": self.student.export_student().state_dict(), "config": to_dict(self.cfg)},
                        self.out / "student.pt")
        self.metrics.close()
        if self.world_size > 1:
            barrier()  # every rank returns after rank 0's last writes
        return last


def evaluate_checkpoint(cfg: Config, checkpoint, *, log=print) -> dict:
    """Val metrics of a student checkpoint: a trainer checkpoint (``last.pt``/``best.pt``) or an
    exported ``student.pt`` (main head only)."""
    from .models import build_student, read_state_dict
    device = resolve_device(cfg.train.device)
    state = read_state_dict(checkpoint)
    trainer = Trainer.__new__(Trainer)
    trainer.cfg, trainer.device, trainer.world_size = cfg, device, 1
    trainer.amp = cfg.train.amp == "bf16" or (cfg.train.amp == "auto" and device.type == "cuda")
    trainer.data = build_data(cfg, device=device, with_train=False)
    trainer.channels_last = cfg.train.channels_last and trainer.data.kind == "image"
    student = build_student(cfg.student.name, num_classes=cfg.num_classes, aux_head=cfg.student.aux_head,
                            aux_hidden=cfg.student.aux_hidden, aux_dropout=cfg.student.aux_dropout)
    if any(k.startswith("aux_") for k in state):
        try:
            student.load_state_dict(state)
        except RuntimeError as exc:
            raise CheckpointError(f"{checkpoint} does not match student {cfg.student.name}: {exc}") from exc
        trainer.student = student.to(device)
        result = trainer.evaluate()
    else:
        exported = student.export_student()
        try:
            exported.load_state_dict(state)
        except RuntimeError as exc:
            raise CheckpointError(f"{checkpoint} does not match student {cfg.student.name}: {exc}") from exc
        trainer.student = student.to(device)
        result = trainer.evaluate(exported.to(device).eval())
        result = {k.replace("val/acc1", "val/acc1_main").replace("val/acc5", "val/acc5_main"): v
                  for k, v in result.items()}
    return result
