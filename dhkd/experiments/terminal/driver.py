"""``dhkd experiment terminal``: per dataset, the teacher, the lr tuning, the reported seeds, the UFM, the report.

Procedure (per dataset of the plan):

1. The data (``data.load``; val/test capped at ``eval_per_class``) and the teacher (CE, the plan's
   teacher model, its own ``weight_decay`` if given), trained once per output folder on the whole training
   split; its logits on every split are stored (``OUT/<dataset>/teacher_logits.npz``) and every student
   step uses them. With ``student_per_class`` the students' training split (``data.npz``) and its teacher
   logits are the first n samples of every class of the teacher's (``data.student_subset``).
2. lr tuning: every arm without ``lr_from`` runs every lr of ``lr_grid`` with each of ``tuning_seeds``
   (never reported). The lr with the best mean last-epoch val top-1 is kept (ties: the smaller). When it
   is the smallest or largest lr tried, the grid is extended past that edge by a factor 2, up to
   ``widen`` times per edge; a choice still on an edge is flagged in the report.
3. The reported seeds (0..seeds-1, paired: the same seed gives every arm the same initial backbone and
   main head and the same batch order) at the chosen lr; arms with ``lr_from`` take their source's lr.
4. The UFM control (``ufm.run_ufm``) on the teacher's logits of a class-balanced training subset.

Runs are stored as ``OUT/<dataset>/runs/<arm>/lr<lr>_seed<k>.json`` and reused when their config is
unchanged, so an interrupted experiment continues where it stopped. One process uses OUT at a time
(its lock); a folder that holds files this experiment did not write is refused (nothing the user wrote
is overwritten).
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import json
import math
import multiprocessing
import os
import re
import time
from pathlib import Path

from ...atomic import atomic_path, atomic_write_text
from .plan import Plan, arm_config, load_plan

MARKER = ".dhkd-experiment-terminal"
LOOP_VERSION = 3  # bump when loop.train_run measures something new: stored runs of another version are rerun


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


# ---------------------------------------------------------------- worker processes

_WORKER: dict = {}


def _worker_data(data_path: str, logits_path: str):
    import numpy as np
    import torch

    from .data import tensors
    key = (data_path, logits_path)
    if key not in _WORKER:
        with np.load(data_path) as f:
            data = tensors({k: f[k] for k in f.files})
        with np.load(logits_path) as f:
            t = torch.from_numpy(f["train"])
        _WORKER.clear()
        _WORKER[key] = (data, t)
    return _WORKER[key]


def _init_worker(threads: int) -> None:
    import torch
    torch.set_num_threads(threads)


def _job(job: dict) -> str:
    """Train one run unless its JSON holds it for this config; write the JSON atomically."""
    from ...config import dump_config
    from .loop import train_run
    cfg = job["cfg"]
    if _done(cfg, job["path"]):
        return job["path"]
    data, t = _worker_data(job["data_path"], job["logits_path"])
    result = train_run(cfg, job["heads"], job["spec"], data, t, refit_steps=job["refit_steps"])
    result.update(job["meta"], config=dump_config(cfg), loop_version=LOOP_VERSION)
    atomic_write_text(Path(job["path"]), json.dumps(result))
    return job["path"]


def _done(cfg, path) -> bool:
    from ...config import dump_config
    try:
        run = json.loads(Path(path).read_text(encoding="utf-8"))
        return run.get("config") == dump_config(cfg) and run.get("loop_version") == LOOP_VERSION
    except (OSError, ValueError):
        return False


def run_jobs(jobs_list: list, jobs: int, log) -> None:
    todo = [j for j in jobs_list if not _done(j["cfg"], j["path"])]
    log(f"  {len(jobs_list)} runs, {len(jobs_list) - len(todo)} already done, {jobs} process(es)")
    if not todo:
        return
    threads = max(1, int(os.environ.get("OMP_NUM_THREADS") or 0) or (os.cpu_count() or 1) // jobs)
    if jobs == 1:
        _init_worker(threads)
        for k, job in enumerate(todo, 1):
            _job(job)
            log(f"  [{k}/{len(todo)}] {job['path']}")
        return
    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"),
                                                initializer=_init_worker, initargs=(threads,)) as pool:
        futures = [pool.submit(_job, job) for job in todo]
        for k, fut in enumerate(concurrent.futures.as_completed(futures), 1):
            log(f"  [{k}/{len(todo)}] {fut.result()}")


# ---------------------------------------------------------------- teacher and data

def _save_npz(path: Path, arrays: dict) -> None:
    import numpy as np
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)


def prepare(plan: Plan, name: str, folder: Path, log) -> dict:
    """Data (``folder/data.npz``), the teacher and its logits (``folder/teacher_logits.npz``); returns the
    teacher's accuracies. The teacher is retrained only when its settings or the data changed."""
    import numpy as np
    import torch

    from .data import load, student_subset, tensors
    from .loop import forward_all
    ds = plan.datasets[name]
    raw, num_classes = load(ds["data"])
    folder.mkdir(parents=True, exist_ok=True)
    per_class, eval_cap = ds.get("student_per_class"), ds.get("eval_per_class")
    keyed = [ds["data"], ds["teacher"], plan.common, per_class] + ([eval_cap] if eval_cap else [])
    digest = hashlib.sha256(json.dumps(keyed, sort_keys=True).encode())
    digest.update(b"".join(np.ascontiguousarray(raw[k]).tobytes() for k in sorted(raw)))
    key = digest.hexdigest()[:16]
    info_path = folder / "teacher.json"
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
        if info.get("key") == key and (folder / "teacher_logits.npz").is_file() and (folder / "data.npz").is_file():
            return info
    except (OSError, ValueError):
        pass
    for split, n in (eval_cap or {}).items():  # val/test capped at their first n samples per class
        keep = student_subset(raw["y_" + split], int(n))
        raw = {**raw, "x_" + split: raw["x_" + split][keep], "y_" + split: raw["y_" + split][keep]}
    data = tensors(raw)
    tspec = ds["teacher"]
    teacher_arm = {"name": "teacher", "method": "ce", "heads": 1, "aux_head": "linear", "loss": {}, "lr_from": None}
    common = plan.common
    if "weight_decay" in tspec:  # the teacher's own weight decay (the students keep common.optim's)
        common = {**common, "optim": {**(common.get("optim") or {}), "weight_decay": float(tspec["weight_decay"])}}
    tplan = Plan(**{**plan.__dict__, "common": common, "datasets": {name: {**ds, "epochs": tspec["epochs"]}}})
    cfg = arm_config(tplan, name, teacher_arm, tspec.get("lr", 0.05), 0)
    log(f"  {name}: training the teacher ({tspec.get('model')}, {tspec['epochs']} epochs)")
    zeros = torch.zeros(data["x"].shape[0], num_classes)
    run = _train_teacher(cfg, tspec, data, zeros)
    student = run.pop("model")
    logits = {}
    for split, k in (("train", ""), ("val", "_val"), ("test", "_test")):
        logits[split] = forward_all(student, data["x" + k])[2].numpy()
    acc = {s: 100.0 * float((logits[s].argmax(1) == raw["y" + k]).mean())
           for s, k in (("train", ""), ("val", "_val"), ("test", "_test"))}
    n_teacher = {s: int(raw["y" + k].shape[0]) for s, k in (("train", ""), ("val", "_val"), ("test", "_test"))}
    if per_class is not None:  # the students train on a subset of the teacher's training split
        keep = student_subset(raw["y"], int(per_class))
        raw = {**raw, "x": raw["x"][keep], "y": raw["y"][keep]}
        logits["train"] = logits["train"][keep]
    _save_npz(folder / "data.npz", raw)
    _save_npz(folder / "teacher_logits.npz", logits)
    info = {"key": key, "model": tspec, "epochs": tspec["epochs"], "num_classes": num_classes, **acc,
            "max_abs_t_tau": float(abs(logits["train"]).max() / 2.0), "wall_s": run["wall_s"],
            "student_per_class": per_class, "n_teacher": n_teacher,
            "n": {s: int(raw["y" + k].shape[0]) for s, k in (("train", ""), ("val", "_val"), ("test", "_test"))}}
    atomic_write_text(info_path, json.dumps(info, indent=1))
    return info


def _train_teacher(cfg, spec, data, zeros) -> dict:
    """The teacher: ``loop.train_run``'s loop without the per-epoch measurements (CE, one head)."""
    from ...data import EpochSampler
    from ...optim import build_optimizer, build_scheduler
    from ...train import seed_everything
    from .data import build_student
    from .loop import make_distiller
    t0 = time.perf_counter()
    seed_everything(cfg.train.seed)
    x, y = data["x"], data["y"]
    model = build_student(spec, x.shape[1], zeros.shape[1])
    distiller = make_distiller(model, cfg, 1)
    batch = cfg.data.batch_size
    steps = x.shape[0] // batch
    opt = build_optimizer(model, cfg, batch)
    sched = build_scheduler(opt, cfg, steps, batch)
    sampler = EpochSampler(x.shape[0], shuffle=True, seed=cfg.train.seed)
    for epoch in range(cfg.train.epochs):
        model.train()
        sampler.set_epoch(epoch)
        order = sampler.indices()
        for b in range(steps):
            i = order[b * batch:(b + 1) * batch]
            distiller.train_step(x[i], y[i], epoch, teacher_logits=zeros[i])
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
    model.eval()
    return {"model": model, "wall_s": time.perf_counter() - t0}


# ---------------------------------------------------------------- lr tuning

def choose_lr(vals: dict) -> float:
    """The lr with the best mean val top-1 over the tuning seeds (ties: the smaller lr)."""
    return max(sorted(vals), key=lambda lr: (vals[lr], -lr))


def _val(run: dict) -> float:
    v = run["rows"][-1]["val_acc"]
    return v if math.isfinite(v) else -1.0


def tune(plan: Plan, name: str, make_job, jobs: int, log) -> dict:
    """``{arm: {"lr", "vals": {lr: mean val}, "edge": bool}}`` for arms without lr_from; see the module
    docstring for the rule and the widening."""
    grids = {a["name"]: list(plan.lr_grid) for a in plan.arms if not a["lr_from"]}
    widened = {a: {"lo": 0, "hi": 0} for a in grids}
    results: dict = {}
    while True:
        batch = [make_job(plan.arm(a), lr, s) for a, grid in grids.items() for lr in grid for s in plan.tuning_seeds
                 if (a, lr, s) not in results]
        run_jobs(batch, jobs, log)
        for j in batch:
            m = j["meta"]
            results[(m["arm"], m["lr"], m["seed"])] = json.loads(Path(j["path"]).read_text(encoding="utf-8"))
        grow = False
        for a, grid in grids.items():
            vals = {lr: sum(_val(results[(a, lr, s)]) for s in plan.tuning_seeds) / len(plan.tuning_seeds)
                    for lr in grid}
            best = choose_lr(vals)
            if best == min(grid) and widened[a]["lo"] < plan.widen:
                grid.insert(0, best / 2)
                widened[a]["lo"] += 1
                grow = True
            elif best == max(grid) and widened[a]["hi"] < plan.widen:
                grid.append(best * 2)
                widened[a]["hi"] += 1
                grow = True
        if not grow:
            break
    chosen = {}
    for a, grid in grids.items():
        vals = {lr: sum(_val(results[(a, lr, s)]) for s in plan.tuning_seeds) / len(plan.tuning_seeds) for lr in grid}
        best = choose_lr(vals)
        chosen[a] = {"lr": best, "vals": vals, "edge": best in (min(grid), max(grid)) and len(grid) > 1}
    for a in plan.arms:
        if a["lr_from"]:
            chosen[a["name"]] = {**chosen[a["lr_from"]], "vals": {}, "from": a["lr_from"]}
    return chosen


# ---------------------------------------------------------------- driver

def _check_folder(out: Path) -> None:
    from ...rundir import LOCK_NAME, RunDirError
    if out.exists() and not out.is_dir():
        raise RunDirError(f"{out} is not a directory")
    if out.is_dir() and not (out / MARKER).exists():
        foreign = [p.name for p in out.iterdir() if p.name != LOCK_NAME]
        if foreign:
            raise RunDirError(f"{out} holds files this experiment did not write ({', '.join(sorted(foreign)[:3])}"
                              f"{', ...' if len(foreign) > 3 else ''}); choose an empty or new --out folder")


def run_experiment(out, *, quick: bool = False, seeds: int | None = None, jobs: int = 1, plan_path=None,
                   command: str | None = None, log=print) -> dict:
    """The whole experiment into ``out``; returns the summary (also ``out/results.json``)."""
    from ...rundir import LOCK_NAME, FileLock
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs must be a positive int, got {jobs!r}")
    plan = load_plan(plan_path, quick=quick, seeds=seeds)  # a bad plan stops before any folder is made
    out = Path(out)
    _check_folder(out)
    out.mkdir(parents=True, exist_ok=True)
    lock = FileLock(out / LOCK_NAME, what="experiment folder").acquire()
    try:
        (out / MARKER).touch()
        return _run(plan, out, quick=quick, jobs=jobs, command=command, log=log)
    finally:
        lock.release()


def _run(plan: Plan, out: Path, *, quick: bool, jobs: int, command, log) -> dict:
    import numpy as np
    import torch

    from .report import write_report
    from .ufm import run_ufm
    t0 = time.perf_counter()
    log(f"dhkd experiment terminal{' --quick' if quick else ''}: {list(plan.datasets)}, {len(plan.arms)} arms, "
        f"seeds {plan.seeds}, tuning seeds {plan.tuning_seeds}, lr grid {plan.lr_grid} -> {out}")
    per_ds = {}
    for name, ds in plan.datasets.items():
        folder = out / name
        t_ds = time.perf_counter()
        teacher = prepare(plan, name, folder, log)
        log(f"  {name}: teacher val {teacher['val']:.2f}%, test {teacher['test']:.2f}%, train {teacher['train']:.2f}%")

        def make_job(arm, lr, seed, name=name, ds=ds, folder=folder):
            cfg = arm_config(plan, name, arm, lr, seed)
            path = folder / "runs" / slug(arm["name"]) / f"lr{lr:g}_seed{seed}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            return {"cfg": cfg, "heads": arm["heads"], "spec": ds["student"], "path": str(path),
                    "data_path": str(folder / "data.npz"), "logits_path": str(folder / "teacher_logits.npz"),
                    "refit_steps": int(ds.get("refit_steps", 200)),
                    "meta": {"arm": arm["name"], "lr": lr, "seed": seed, "dataset": name}}

        chosen = tune(plan, name, make_job, jobs, log)
        reported = [make_job(a, chosen[a["name"]]["lr"], s) for a in plan.arms for s in plan.seeds]
        run_jobs(reported, jobs, log)
        runs = {}
        for j in reported:
            m = j["meta"]
            runs.setdefault(m["arm"], []).append(json.loads(Path(j["path"]).read_text(encoding="utf-8")))
        ufm = {}
        if plan.ufm:
            with np.load(folder / "data.npz") as f:
                y_all = torch.from_numpy(f["y"])
            with np.load(folder / "teacher_logits.npz") as f:
                t_all = torch.from_numpy(f["train"])
            per = int(plan.ufm.get("per_class", 20))
            idx = torch.cat([torch.nonzero(y_all == c).flatten()[:per] for c in range(int(y_all.max()) + 1)])
            d_ufm = max(int(plan.ufm.get("d", 64)), int(t_all.shape[1]))  # a simplex ETF needs d >= C - 1
            ufm = run_ufm(y_all[idx], t_all[idx], d=d_ufm, steps=int(plan.ufm.get("steps", 2000)),
                          lr=float(plan.ufm.get("lr", 0.5)))
        per_ds[name] = {"teacher": teacher, "chosen": chosen, "runs": runs, "ufm": ufm,
                        "wall_s": time.perf_counter() - t_ds}
        log(f"  {name}: done in {per_ds[name]['wall_s']:.0f} s")
    wall = time.perf_counter() - t0
    command = command or f"dhkd experiment terminal{' --quick' if quick else ''} --out {out} --jobs {jobs}"
    summary = write_report(out, plan, per_ds, quick=quick, wall_s=wall, command=command, jobs=jobs)
    log(f"  results in {out / 'results.md'} ({wall:.0f} s)")
    return summary
