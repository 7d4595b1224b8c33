"""One head vs two heads with the same logit loss on 100-class MNIST-1D (``dhkd experiment mnist1d100``).

    run_experiment("runs/mnist1d100", jobs=2)     # the plan of configs/mnist1d100/experiment.yaml
    run_experiment("runs/q", quick=True)           # 1 seed, 2 epochs, no lr grid (CI)

Data: ``dhkd.mnist1d100`` (100 smooth templates through ``mnist1d.data.make_dataset``; train / val /
test, cached). The teacher (``teacher.yaml``) is trained once with ``dhkd.train.train_teacher`` and
cached under ``cache_dir()/mnist1d100/`` by a hash of its config; its logits on the training split
are computed once per output folder (``OUT/teacher_logits.npz``) and handed to every step, so no run
pays the teacher's forward pass.

Each run is a method config plus the plan's overrides, trained by ``train_run``: the trainer's pieces
(``build_student``, ``build_distiller``, whose ``train_step`` does the losses, gradient alignment and
official numerics, ``build_optimizer``, ``build_scheduler``, ``EpochSampler``) in a loop that, unlike
``Trainer.fit``, evaluates the test split every epoch (val at the last epoch, for the lr choice), writes
no checkpoints and records a non-finite loss as an event instead of stopping. Per epoch it also
measures, on a fixed probe of 1024 training signals in eval mode: max |z|/tau of the main head,
max |z_L - t|/tau of the head the logit loss trains, the cosine between the CE and logit-loss gradients
on the main head's W (``dhkd.diagnostics.head_gradient_cosine``; for two-head arms the logit loss is
evaluated on the main head, i.e. the conflict the second head avoids) and at the backbone output. At
the end, on the whole training split: train top-1, NC1 and the logit maxima. Runs are stored as
``OUT/runs/<arm>/lr<lr>_seed<k>.json`` and reused when their config is unchanged. Written to OUT:
``results.md``, ``results.json``, PNGs.
"""
from __future__ import annotations

import concurrent.futures
import datetime
import hashlib
import json
import math
import multiprocessing
import os
import platform
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..atomic import atomic_path, atomic_write_text
from .mnist1d import _positive_int, _str_list

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "mnist1d100"
PROBE = 1024
GAP_OFFICIAL = 16.6  # (z - t)/tau (or z/tau) above which float32 makes the official losses infinite


@dataclass
class Plan:
    """What the experiment runs; see ``configs/mnist1d100/experiment.yaml``."""
    samples: int
    epochs: int
    seeds: int
    lr_grid: list
    teacher_epochs: int | None
    common: list = field(default_factory=list)
    teacher: dict = field(default_factory=dict)
    arms: list = field(default_factory=list)
    contrasts: list = field(default_factory=list)


def load_plan(path=None, *, quick: bool = False, seeds: int | None = None) -> Plan:
    """The plan at ``path`` (default ``configs/mnist1d100/experiment.yaml``); ``quick`` takes its ``quick:``
    sizes, ``seeds`` overrides the seed count. ValueError naming the key on a bad plan."""
    path = Path(path) if path is not None else CONFIG_DIR / "experiment.yaml"
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"{path}: the plan must be a mapping")
    known = {"samples", "epochs", "seeds", "lr_grid", "quick", "common", "teacher", "arms", "contrasts"}
    if set(data) - known:
        raise ValueError(f"{path}: unknown keys {sorted(set(data) - known)}")
    sizes = {**data, **(data.get("quick") or {})} if quick else data
    grid = sizes.get("lr_grid") or []
    if not isinstance(grid, list) or not all(isinstance(v, (int, float)) and v > 0 for v in grid):
        raise ValueError(f"{path}: lr_grid must be a list of positive numbers, got {grid!r}")
    teacher_epochs = sizes.get("teacher_epochs") if quick else None
    plan = Plan(samples=_positive_int("samples", sizes.get("samples")),
                epochs=_positive_int("epochs", sizes.get("epochs")),
                seeds=_positive_int("seeds", sizes.get("seeds") if seeds is None else seeds),
                lr_grid=[float(v) for v in grid],
                teacher_epochs=None if teacher_epochs is None else _positive_int("teacher_epochs", teacher_epochs),
                common=_str_list("common", data.get("common", [])))
    teacher = data.get("teacher") or {}
    plan.teacher = {"config": str(teacher.get("config", "teacher.yaml")),
                    "overrides": _str_list("teacher.overrides", teacher.get("overrides", []))}
    arms = data.get("arms")
    if not isinstance(arms, list) or not arms:
        raise ValueError(f"{path}: arms must be a non-empty list")
    for k, a in enumerate(arms):
        if not isinstance(a, dict) or not isinstance(a.get("name"), str) or not isinstance(a.get("config"), str):
            raise ValueError(f"{path}: arms[{k}] needs a name and a config")
        extra = set(a) - {"name", "config", "overrides", "lr_from"}
        if extra:
            raise ValueError(f"{path}: arms[{k}] has unknown keys {sorted(extra)}")
        plan.arms.append({"name": a["name"], "config": a["config"], "lr_from": a.get("lr_from"),
                          "overrides": _str_list(f"arms[{k}].overrides", a.get("overrides", []))})
    names = [a["name"] for a in plan.arms]
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: arm names repeat")
    for a in plan.arms:
        src = a["lr_from"]
        if src is not None and (src not in names or next(b for b in plan.arms if b["name"] == src)["lr_from"]):
            raise ValueError(f"{path}: arm {a['name']!r}: lr_from must name an arm that tunes its own lr, got {src!r}")
    for k, c in enumerate(data.get("contrasts") or []):
        if not (isinstance(c, list) and len(c) == 2 and all(x in names for x in c)):
            raise ValueError(f"{path}: contrasts[{k}] must be [arm, arm] of known arms, got {c!r}")
        plan.contrasts.append(tuple(c))
    return plan


def slug(name: str) -> str:
    """A directory name for an arm: ``"2h CE+BKL-Norm (DHKD)"`` -> ``"2h_ce_bkl_norm_dhkd"``."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


# ---------------------------------------------------------------- configs

def teacher_config(plan: Plan):
    from ..config import load_config
    over = plan.common + plan.teacher["overrides"] + [f"data.mnist1d_samples={plan.samples}",
                                                       "train.progress=false", "train.tensorboard=false"]
    if plan.teacher_epochs is not None:
        over.append(f"train.epochs={plan.teacher_epochs}")
    return load_config(CONFIG_DIR / plan.teacher["config"], over)


def arm_config(plan: Plan, arm: dict, lr: float | None, seed: int, teacher_ckpt):
    """The Config of one run: the arm's method config + common + arm overrides + sizes, seed, lr."""
    from ..config import load_config
    over = plan.common + arm["overrides"] + [f"data.mnist1d_samples={plan.samples}", f"train.epochs={plan.epochs}",
                                             f"train.seed={seed}"]
    if lr is not None:
        over.append(f"optim.lr={lr}")
    cfg = load_config(CONFIG_DIR / arm["config"], over)
    if cfg.method != "ce":
        cfg.teacher.checkpoint = str(teacher_ckpt)
        cfg.teacher.train_config = None
    return cfg


def teacher_checkpoint(tcfg) -> Path:
    """``cache_dir()/mnist1d100/teacher_<hash of the config>.pt``: one teacher per teacher config."""
    from ..config import cache_dir, dump_config
    digest = hashlib.sha256(dump_config(tcfg).encode()).hexdigest()[:12]
    return cache_dir() / "mnist1d100" / f"teacher_{tcfg.student.name}_{digest}.pt"


# ---------------------------------------------------------------- one run

class PrecomputedTeacher:
    """Stands in for the teacher in a ``Distiller``: every step passes the cached logits instead."""

    def eval(self):
        return self

    def __call__(self, x):
        raise RuntimeError("the mnist1d100 runs pass precomputed teacher_logits to every step")


def _tensors(arrays: dict) -> dict:
    import torch
    return {k: torch.from_numpy(v) for k, v in arrays.items()}


def _forward(student, x, chunk: int = 4096):
    """Eval-mode (features, main logits, aux logits) of ``x`` in chunks, without autograd."""
    import torch
    fs, z1s, z2s = [], [], []
    with torch.no_grad():
        for k in range(0, x.shape[0], chunk):
            f, a = student.forward_features(x[k:k + chunk])
            fs.append(f)
            z1s.append(student.head(f))
            z2s.append(student.aux_logits(f, a))
    return torch.cat(fs), torch.cat(z1s), torch.cat(z2s)


def _acc(z, y) -> float:
    return 100.0 * (z.argmax(1) == y).double().mean().item()


def _probe(student, cfg, x, y, t) -> dict:
    """Logit maxima and gradient cosines of the CE and logit losses on the probe (eval mode)."""
    import torch

    from dhkd_kernels import fused_dual_head_kd_loss

    from ..diagnostics import backbone_gradient_cosine, head_gradient_cosine
    tau = cfg.loss.logit_temperature
    two = cfg.method == "dhkd"
    with torch.no_grad():
        f, a = student.forward_features(x)
        z1, z2 = student.head(f), student.aux_logits(f, a)
    zl = z2 if two else z1
    row = {"max_abs_z_main_tau": (z1.abs().max() / tau).item(),
           "max_abs_gap_tau": ((zl - t).abs().max() / tau).item(),
           "max_z_logit_head_tau": (zl.max() / tau).item()}
    if cfg.method in ("ce", "kd"):
        return row
    w1, b1 = student.head.weight, student.head.bias
    opts = dict(kd_weight=0.0, logit_temperature=tau, logit_loss=cfg.loss.logit_loss, backend="torch")
    ce = fused_dual_head_kd_loss(f, w1, b1, w1, b1, t, y, ce_weight=1.0, logit_weight=0.0, **opts)
    lg = fused_dual_head_kd_loss(f, w1, b1, w1, b1, t, y, ce_weight=0.0, logit_weight=1.0, **opts)
    w = head_gradient_cosine(ce, lg, w1)
    row.update({"w_cos": w["cos"], "w_row_cos": w["row_cos_mean"], "w_row_conflict": w["row_conflict_frac"]})
    fd = f.detach().requires_grad_(True)
    w2, b2, af = (student.aux_head.weight, student.aux_head.bias, a) if two else (w1, b1, None)
    ce_f = fused_dual_head_kd_loss(fd, w1, b1, w1, b1, t, y, ce_weight=1.0, logit_weight=0.0, **opts)
    lg_f = fused_dual_head_kd_loss(fd, w1, b1, w2, b2, t, y, aux_features=None if af is None else af.detach(),
                                   ce_weight=0.0, logit_weight=1.0, **opts)
    row["feat_cos"] = backbone_gradient_cosine(fd, ce_f, lg_f)
    return row


def build_run(cfg, n_train: int):
    """(student, distiller, optimizer, scheduler, sampler) of one run. The student is built right after
    ``seed_everything(cfg.train.seed)`` and the batch order is ``EpochSampler(seed=cfg.train.seed)``'s, so
    runs of any two arms with the same seed start from the same weights and see the same batches."""
    from ..data import EpochSampler
    from ..distill import build_distiller
    from ..models import build_student
    from ..optim import build_optimizer, build_scheduler
    from ..train import seed_everything
    seed_everything(cfg.train.seed)
    s = cfg.student
    student = build_student(s.name, num_classes=cfg.num_classes, aux_head=s.aux_head, aux_hidden=s.aux_hidden,
                            aux_dropout=s.aux_dropout)
    distiller = build_distiller(student, PrecomputedTeacher(), cfg)
    batch = cfg.data.batch_size
    optimizer = build_optimizer(student, cfg, batch)
    scheduler = build_scheduler(optimizer, cfg, n_train // batch, batch)
    return student, distiller, optimizer, scheduler, EpochSampler(n_train, shuffle=True, seed=cfg.train.seed)


def train_run(cfg, data: dict, teacher_logits, *, log=None) -> dict:
    """Train one student of ``cfg`` on ``data`` (``dhkd.mnist1d100.arrays`` as tensors) with the cached
    ``teacher_logits`` (train split, (n, 100)); returns ``{"rows": per-epoch dicts, "final": {...},
    "events": non-finite-loss steps, "first_event": [epoch, step] or None, "cpu_s", "wall_s"}``."""
    from ..diagnostics import head_report, nc1
    t0, c0 = time.perf_counter(), time.process_time()
    x, y, t = data["x"], data["y"], teacher_logits
    student, distiller, optimizer, scheduler, sampler = build_run(cfg, x.shape[0])
    batch = cfg.data.batch_size
    steps = x.shape[0] // batch
    probe = slice(0, min(PROBE, x.shape[0]))
    rows, events, first_event = [], 0, None
    for epoch in range(cfg.train.epochs):
        student.train()
        sampler.set_epoch(epoch)
        order = sampler.indices()
        total, n_ok, n_bad, ga_hits, ga_cos = 0.0, 0, 0, 0.0, 0.0
        for b in range(steps):
            i = order[b * batch:(b + 1) * batch]
            out = distiller.train_step(x[i], y[i], epoch, teacher_logits=t[i])
            loss = float(out["loss"])
            if math.isfinite(loss):
                total, n_ok = total + loss, n_ok + 1
            else:
                n_bad += 1
                first_event = first_event or [epoch + 1, b]
            if "ga_conflict" in out:
                ga_hits += float(out["ga_conflict"])
                ga_cos += float(out.get("ga_cos", out.get("grad_cos", 0.0)))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        events += n_bad
        student.eval()
        row = {"epoch": epoch + 1, "train_loss": total / n_ok if n_ok else math.nan, "nonfinite_steps": n_bad}
        if "ga_conflict" in out:
            row.update({"ga_projected": ga_hits / steps, "ga_cos": ga_cos / steps})
        for split in ("val", "test") if epoch + 1 == cfg.train.epochs else ("test",):  # val: the lr choice
            _, z1, z2 = _forward(student, data[f"x_{split}"])
            row[f"{split}_acc"] = _acc(z1, data[f"y_{split}"])
            if cfg.method == "dhkd":
                row[f"{split}_acc_aux"] = _acc(z2, data[f"y_{split}"])
        row.update(_probe(student, cfg, x[probe], y[probe], t[probe]))
        rows.append(row)
        if log is not None:
            log(f"    epoch {epoch + 1}: test {row['test_acc']:.2f}%")
    f, z1, z2 = _forward(student, x)
    tau = cfg.loss.logit_temperature
    zl = z2 if cfg.method == "dhkd" else z1
    final = {"train_acc": _acc(z1, y), "nc1": nc1(f, y, cfg.num_classes),
             "etf_absdev": head_report(student.head.weight)["cos_etf_absdev"],
             "max_abs_z_main_tau": (z1.abs().max() / tau).item(),
             "max_abs_gap_tau": ((zl - t).abs().max() / tau).item()}
    if cfg.method == "dhkd":
        final["train_acc_aux"] = _acc(z2, y)
    return {"rows": rows, "final": final, "events": events, "first_event": first_event,
            "cpu_s": time.process_time() - c0, "wall_s": time.perf_counter() - t0}


# ---------------------------------------------------------------- jobs

_WORKER: dict = {}


def _init_worker(threads: int, data_path: str, logits_path: str) -> None:
    import numpy as np
    import torch
    torch.set_num_threads(threads)
    with np.load(data_path) as f:
        _WORKER["data"] = _tensors({k: f[k] for k in f.files})
    with np.load(logits_path) as f:
        _WORKER["t"] = torch.from_numpy(f["train"])


def _job(cfg, path: str, meta: dict) -> str:
    """Train one run unless ``path`` holds it for this config; write its JSON atomically."""
    from ..config import dump_config
    if _done(cfg, path):
        return path
    result = train_run(cfg, _WORKER["data"], _WORKER["t"])
    result.update(meta, config=dump_config(cfg))
    atomic_write_text(Path(path), json.dumps(result))
    return path


def _done(cfg, path) -> bool:
    from ..config import dump_config
    try:
        return json.loads(Path(path).read_text(encoding="utf-8")).get("config") == dump_config(cfg)
    except (OSError, ValueError):
        return False


def _run_jobs(jobs_list, jobs: int, init_args, log) -> None:
    todo = [j for j in jobs_list if not _done(j[0], j[1])]
    log(f"  {len(jobs_list)} runs, {len(jobs_list) - len(todo)} already done, {jobs} process(es)")
    if not todo:
        return
    if jobs == 1:
        _init_worker(max(1, os.cpu_count() or 1), *init_args)
        for k, job in enumerate(todo, 1):
            _job(*job)
            log(f"  [{k}/{len(todo)}] {job[1]}")
        return
    threads = max(1, (os.cpu_count() or 1) // jobs)
    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"),
                                                initializer=_init_worker, initargs=(threads, *init_args)) as pool:
        futures = [pool.submit(_job, *job) for job in todo]
        for k, fut in enumerate(concurrent.futures.as_completed(futures), 1):
            log(f"  [{k}/{len(todo)}] {fut.result()}")


def _cost(cfg) -> float:
    """Relative cost of a run, to start the slow ones first."""
    return 2.0 if cfg.loss.ga else 1.0


# ---------------------------------------------------------------- results

def _mean_std(values) -> tuple:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return math.nan, math.nan, 0
    n = len(vals)
    mean = sum(vals) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1)) if n > 1 else math.nan
    return mean, std, n


def _fmt(values, digits: int = 2) -> str:
    mean, std, n = _mean_std(values)
    if n == 0:
        return "–"
    return f"{mean:.{digits}f}" if n == 1 or math.isnan(std) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def summarize_run(run: dict) -> dict:
    """Per-run numbers the tables use: last/best test top-1, best epoch, diagnostics at the last epoch."""
    rows, final = run["rows"], run["final"]
    last = rows[-1]
    best = max(rows, key=lambda r: (r["test_acc"], -r["epoch"]))
    out = {"last": last["test_acc"], "best": best["test_acc"], "best_epoch": best["epoch"],
           "val_last": last["val_acc"], "aux_last": last.get("test_acc_aux"),
           "events": run["events"], "first_event": run["first_event"], "cpu_s": run["cpu_s"],
           "max_abs_z_main_tau": max(final["max_abs_z_main_tau"], max(r["max_abs_z_main_tau"] for r in rows)),
           "max_abs_gap_tau": max(final["max_abs_gap_tau"], max(r["max_abs_gap_tau"] for r in rows)),
           **{k: final[k] for k in ("train_acc", "nc1", "etf_absdev")}}
    for key in ("w_cos", "w_row_conflict", "feat_cos", "ga_projected"):
        if key in last:
            out[key] = last[key]
            out[key + "_mean"] = sum(r[key] for r in rows) / len(rows)
    return out


def choose_lr(plan: Plan, results: dict) -> dict:
    """``{arm: (lr or None, {lr: seed-0 last-epoch val top-1})}``: the grid's best (ties: the smaller lr);
    arms with ``lr_from`` take their source's; without a grid every arm keeps its config's lr (None)."""
    chosen = {}
    for arm in plan.arms:
        if arm["lr_from"] or not plan.lr_grid:
            continue
        vals = {lr: results[(arm["name"], lr, 0)]["rows"][-1]["val_acc"] for lr in plan.lr_grid}
        best = max(plan.lr_grid, key=lambda lr: (vals[lr], -lr))
        chosen[arm["name"]] = (best, vals)
    for arm in plan.arms:
        if arm["lr_from"]:
            chosen[arm["name"]] = (chosen[arm["lr_from"]][0] if plan.lr_grid else None, {})
        elif not plan.lr_grid:
            chosen[arm["name"]] = (None, {})
    return chosen


def paired(a: list, b: list) -> dict:
    """Paired differences a_k - b_k of per-seed values: mean, sample std, n, wins (a > b), ties."""
    d = [x - y for x, y in zip(a, b)]
    mean, std, n = _mean_std(d)
    return {"mean": mean, "std": std, "n": n, "wins": sum(v > 0 for v in d), "ties": sum(v == 0 for v in d),
            "diffs": d}


def _machine() -> str:
    import torch
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else math.nan
    return (f"{os.cpu_count()}-core CPU ({platform.machine()}, {platform.system()}), torch {torch.__version__}, "
            f"Python {platform.python_version()}; load average at the end {load:.1f}")


def _plots(out: Path, plan: Plan, by_arm: dict) -> list:
    from .mnist1d import compact_png
    from .plots import plot_accuracy, plot_diagnostics
    runs = {a: [r["rows"] for r in rs] for a, rs in by_arm.items()}
    main = [a["name"] for a in plan.arms if a["name"] in ("CE", "KD", "1h CE+BKL", "2h CE+BKL", "1h CE+BKL-Norm",
                                                           "2h CE+BKL-Norm (DHKD)", "DHKD+GA")]
    main = main or [a["name"] for a in plan.arms][:6]
    pngs = [plot_accuracy({a: runs[a] for a in main}, out / "accuracy.png", keys=("test_acc",),
                          title="MNIST-1D-100: test top-1 of the main head per epoch (mean ± std over seeds)")]
    contrast = [a for a in main if a not in ("CE", "KD")] + [a["name"] for a in plan.arms if "official" in a["name"]]
    pngs.append(plot_diagnostics({a: runs[a] for a in contrast if a in runs}, out / "diagnostics.png", keys=(),
                                 extra_keys=("w_cos", "feat_cos", "max_abs_gap_tau", "train_loss"),
                                 title="CE vs logit-loss gradient cosine on the main head's W and at the backbone "
                                       "output; max |z_L - t|/tau on the probe"))
    for p in pngs:
        compact_png(p)
    return pngs


def write_report(out, plan: Plan, results: dict, chosen: dict, *, teacher: dict, wall_s: float, command: str,
                 jobs: int) -> dict:
    """results.md, results.json and the PNGs from the runs; returns the summary."""
    out = Path(out)
    by_arm, per_seed = {}, {}
    for arm in plan.arms:
        name, lr = arm["name"], chosen[arm["name"]][0]
        rs = [results[(name, lr, seed)] for seed in range(plan.seeds)]
        by_arm[name] = rs
        per_seed[name] = [summarize_run(r) for r in rs]
    from ..mnist1d100 import split_sizes
    sizes = split_sizes(plan.samples)
    cpu = sum(r["cpu_s"] for r in results.values())
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    md = ["# MNIST-1D-100: one head vs two heads with the same logit loss", "",
          f"- command: `{command}`",
          f"- data: `dhkd.mnist1d100`, {plan.samples} signals from 100 smooth templates, per class "
          f"{sizes['train']} train / {sizes['val']} val / {sizes['test']} test",
          f"- teacher: `{teacher['name']}`, {teacher['epochs']} epochs CE; val top-1 {teacher['val']:.2f}%, "
          f"test top-1 {teacher['test']:.2f}%, train top-1 {teacher['train']:.2f}%, max |t|/tau on train "
          f"{teacher['max_abs_t_tau']:.1f} (tau = 2)",
          f"- students: {plan.epochs} epochs, {plan.seeds} paired seed(s) per arm; lr grid "
          f"{plan.lr_grid or 'none (config lr)'} chosen on seed 0's last-epoch val top-1",
          f"- machine: {_machine()}", f"- date: {date}; wall time {wall_s:.0f} s with {jobs} process(es); "
          f"CPU time of all runs {cpu:.0f} s ({len(results)} runs)", ""]
    md += ["## Accuracy (test top-1, %, mean ± std over seeds)", "",
           "last = last epoch; best = best epoch (max over epochs, the official code's number); aux = the "
           "auxiliary head, last epoch.", "",
           "| arm | lr | last | best | best epoch | aux (last) | seeds |", "|---|---|---|---|---|---|---|"]
    for arm in plan.arms:
        name, v = arm["name"], per_seed[arm["name"]]
        lr = chosen[name][0]
        md.append(f"| {name} | {'config' if lr is None else f'{lr:g}'} | {_fmt([s['last'] for s in v])} | "
                  f"{_fmt([s['best'] for s in v])} | {_fmt([s['best_epoch'] for s in v], 1)} | "
                  f"{_fmt([s['aux_last'] for s in v])} | {len(v)} |")
    md += ["", "## Paired differences (a − b, test top-1 points; mean ± std over seeds, a > b in k of n seeds)", "",
           "| a | b | last | wins | best | wins |", "|---|---|---|---|---|---|"]
    contrasts = {}
    for a, b in plan.contrasts:
        pl = paired([s["last"] for s in per_seed[a]], [s["last"] for s in per_seed[b]])
        pb = paired([s["best"] for s in per_seed[a]], [s["best"] for s in per_seed[b]])
        contrasts[f"{a} - {b}"] = {"last": pl, "best": pb}

        def cell(p):
            return "–" if p["n"] == 0 else (f"{p['mean']:+.2f}" + ("" if p["n"] < 2 else f" ± {p['std']:.2f}"))
        md.append(f"| {a} | {b} | {cell(pl)} | {pl['wins']}/{pl['n']} | {cell(pb)} | {pb['wins']}/{pb['n']} |")
    md += ["", "## Diagnostics (mean ± std over seeds)", "",
           "train = top-1 on the training split (eval mode), last epoch. NC1 on the training features, last epoch. "
           "max |z|/τ: the main head; max gap/τ: max |z_L − t|/τ of the head the logit loss trains (the official "
           f"float32 losses are infinite past {GAP_OFFICIAL}); both the max over the epochs' probes and the last "
           "epoch's training split. W cos: cos(∂CE/∂W, ∂L/∂W) on the main head's W, last epoch (for two-head arms "
           "L evaluated on the main head: the conflict the aux head avoids); W conflict: the fraction of classes "
           "whose row cosine is < 0; feat cos: the same two losses at the backbone output, each on the head it "
           "trains. non-finite: steps with a non-finite loss, summed over seeds. GA: fraction of all training steps that projected.",
           "", "| arm | train | NC1 | ETF absdev | max \\|z\\|/τ | max gap/τ | W cos | W conflict | feat cos | "
           "non-finite | GA |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for arm in plan.arms:
        v = per_seed[arm["name"]]

        def col(key, digits=3):
            return _fmt([s.get(key) for s in v], digits) if any(key in s for s in v) else "–"
        ev = sum(s["events"] for s in v)
        runs_ev = sum(s["events"] > 0 for s in v)
        md.append(f"| {arm['name']} | {col('train_acc', 2)} | {col('nc1')} | {col('etf_absdev')} | "
                  f"{col('max_abs_z_main_tau', 1)} | {col('max_abs_gap_tau', 1)} | {col('w_cos')} | "
                  f"{col('w_row_conflict')} | {col('feat_cos')} | {ev} ({runs_ev}/{len(v)} runs) | "
                  f"{col('ga_projected_mean')} |")
    if plan.lr_grid:
        md += ["", "## Learning-rate choice (seed 0, last-epoch val top-1, %)", "",
               "| arm | " + " | ".join(f"lr {lr:g}" for lr in plan.lr_grid) + " | chosen |",
               "|---|" + "---|" * (len(plan.lr_grid) + 1)]
        for arm in plan.arms:
            lr, vals = chosen[arm["name"]]
            cells = [f"{vals[g]:.2f}" if g in vals else "–" for g in plan.lr_grid]
            src = f" (from {arm['lr_from']})" if arm["lr_from"] else ""
            md.append(f"| {arm['name']} | " + " | ".join(cells) + f" | {lr:g}{src} |")
    pngs = _plots(out, plan, by_arm)
    md += [""] + [f"![{Path(p).stem}]({Path(p).name})" for p in pngs] + [""]
    summary = {"plan": {"samples": plan.samples, "epochs": plan.epochs, "seeds": plan.seeds, "lr_grid": plan.lr_grid},
               "teacher": teacher, "wall_s": wall_s, "cpu_s": cpu, "jobs": jobs,
               "lr": {k: v[0] for k, v in chosen.items()}, "lr_grid_val": {k: v[1] for k, v in chosen.items()},
               "arms": per_seed, "contrasts": contrasts}
    atomic_write_text(out / "results.md", "\n".join(md))
    atomic_write_text(out / "results.json", json.dumps(summary, indent=1, default=str))
    return summary


# ---------------------------------------------------------------- driver

def _teacher_logits(tcfg, ckpt: Path, data: dict, path: Path) -> dict:
    """The teacher's logits on every split (``path``, .npz, atomically) and its accuracies."""
    import numpy as np
    import torch

    from ..models import build_teacher
    teacher = build_teacher(tcfg.student.name, num_classes=tcfg.num_classes, checkpoint=str(ckpt)).eval()
    logits = {}
    with torch.no_grad():
        for split, key in (("train", ""), ("val", "_val"), ("test", "_test")):
            x = data["x" + key]
            logits[split] = torch.cat([teacher(x[k:k + 4096]) for k in range(0, x.shape[0], 4096)]).numpy()
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **logits)
    acc = {s: 100.0 * float((logits[s].argmax(1) == data["y" + k].numpy()).mean())
           for s, k in (("train", ""), ("val", "_val"), ("test", "_test"))}
    return {**acc, "max_abs_t_tau": float(np.abs(logits["train"]).max() / 2.0)}


def run_experiment(out, *, quick: bool = False, seeds: int | None = None, jobs: int = 1, plan_path=None,
                   command: str | None = None, log=print) -> dict:
    """Data, teacher, the lr-grid runs, the seed runs, then the report; returns the summary. One process
    uses ``out`` at a time (its ``.dhkd.lock``, as a run directory's): another one is refused at once."""
    from ..rundir import LOCK_NAME, FileLock
    _positive_int("jobs", jobs)
    t0 = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lock = FileLock(out / LOCK_NAME, what="experiment folder").acquire()  # RunDirLocked: another one runs here
    try:
        return _run_experiment(out, t0, quick=quick, seeds=seeds, jobs=jobs, plan_path=plan_path, command=command,
                               log=log)
    finally:
        lock.release()


def write_data(path: Path, raw: dict) -> None:
    """``OUT/data.npz`` (what the worker processes train on) holding ``raw``, written atomically unless it
    already does: a folder last used with another plan (``--quick``, another sample count) holds other
    signals, which the teacher logits computed from ``raw`` would not match."""
    import numpy as np
    if path.is_file():
        try:
            with np.load(path) as f:
                if set(f.files) == set(raw) and all(np.array_equal(f[k], v) for k, v in raw.items()):
                    return
        except (OSError, ValueError):  # unreadable: rewrite it
            pass
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **raw)


def _run_experiment(out: Path, t0: float, *, quick, seeds, jobs, plan_path, command, log) -> dict:
    from ..mnist1d100 import arrays
    from ..train import train_teacher
    plan = load_plan(plan_path, quick=quick, seeds=seeds)
    tcfg = teacher_config(plan)
    log(f"dhkd experiment mnist1d100: {plan.samples} signals, {plan.epochs} epochs, {plan.seeds} seed(s), "
        f"{len(plan.arms)} arms, lr grid {plan.lr_grid or 'none'} -> {out}")
    raw = arrays(plan.samples, tcfg.data.mnist1d_seed)
    data_path = out / "data.npz"
    write_data(data_path, raw)
    ckpt = teacher_checkpoint(tcfg)
    if not ckpt.is_file():
        log(f"  training the teacher ({tcfg.student.name}, {tcfg.train.epochs} epochs) into {ckpt} ...")
        train_teacher(tcfg, ckpt, log=lambda msg: None)
    data = _tensors(raw)
    logits_path = out / "teacher_logits.npz"
    teacher = {"name": tcfg.student.name, "epochs": tcfg.train.epochs, "checkpoint": str(ckpt),
               **_teacher_logits(tcfg, ckpt, data, logits_path)}
    log(f"  teacher: val {teacher['val']:.2f}%, test {teacher['test']:.2f}%")
    init_args = (str(data_path), str(logits_path))

    def job(arm, lr, seed):
        cfg = arm_config(plan, arm, lr, seed, ckpt)
        path = out / "runs" / slug(arm["name"]) / f"lr{'cfg' if lr is None else f'{lr:g}'}_seed{seed}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        return cfg, str(path), {"arm": arm["name"], "lr": lr, "seed": seed}

    tuned = [a for a in plan.arms if not a["lr_from"]]
    first = [job(a, lr, 0) for a in tuned for lr in (plan.lr_grid or [None])]
    _run_jobs(sorted(first, key=lambda j: -_cost(j[0])), jobs, init_args, log)
    results = {}

    def load(jobs_list):
        for cfg, path, meta in jobs_list:
            results[(meta["arm"], meta["lr"], meta["seed"])] = json.loads(Path(path).read_text(encoding="utf-8"))
    load(first)
    chosen = choose_lr(plan, results)
    second = [job(a, chosen[a["name"]][0], seed) for a in plan.arms for seed in range(plan.seeds)
              if (a["name"], chosen[a["name"]][0], seed) not in results]
    _run_jobs(sorted(second, key=lambda j: -_cost(j[0])), jobs, init_args, log)
    load(second)
    wall = time.perf_counter() - t0
    command = command or f"dhkd experiment mnist1d100{' --quick' if quick else ''} --out {out} --jobs {jobs}"
    summary = write_report(out, plan, results, chosen, teacher=teacher, wall_s=wall, command=command, jobs=jobs)
    log(f"  results in {out / 'results.md'} ({wall:.0f} s)")
    return summary
