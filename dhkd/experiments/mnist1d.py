"""The MNIST-1D experiment of the DHKD paper's head-collapse claim (``dhkd experiment mnist1d``).

    run_experiment("runs/mnist1d_experiment", jobs=2)        # 2 students x 7 methods x 5 seeds
    run_experiment("runs/q", quick=True)                      # 1 seed, 2 epochs (CI)

The plan (sample count, epochs, seeds, students, methods and their config overrides) is
``DEFAULT_PLAN`` below (or a YAML file of the same shape, ``load_plan(path)``); every run is a method
config of ``configs/mnist1d/`` plus overrides. One 1-D CNN teacher is trained with ``teacher.yaml``
and cached as ``OUT/teacher.pt``; each student run (``OUT/runs/<student>/<method>/seed<k>/``) logs
head diagnostics (``train.diagnostics``) and is skipped when a finished run with the same config is
already there. Written to ``OUT``:
``results.md`` (tables of mean ± std over seeds of the final test accuracy of the main and auxiliary
heads, final-epoch diagnostics, the verdict on the paper's ordering), ``results.json`` (per-seed
values) and PNGs ``accuracy_<student>.png``, ``diagnostics_<student>.png``.
"""
from __future__ import annotations

import concurrent.futures
import datetime
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
from .plots import DEFAULT_DIAG_KEYS, final_value, load_metrics, markdown_table, plot_accuracy, plot_diagnostics, \
    summarize

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "mnist1d"
# What `dhkd experiment mnist1d` runs: every run is a method config of CONFIG_DIR plus the overrides
# ("section.key=value"); `common` applies to every run, the teacher included.
DEFAULT_PLAN = {
    "samples": 10000,   # MNIST-1D signals generated (80% train / 20% test); the package default is 5000
    "epochs": 30,       # teacher and students
    "seeds": 5,         # student seeds per (student, method); one teacher
    "quick": {"samples": 5000, "epochs": 2, "seeds": 1},  # --quick (CI)
    "common": ["train.progress=false", "train.tensorboard=false", "train.device=cpu", "train.log_every=1000"],
    "teacher": {"config": "teacher.yaml", "overrides": []},
    "students": {
        "mlp": {"overrides": ["student.name=mnist1d_mlp"]},
        # lr 0.1 (the MLP's) left the kd, binary_kl and dhkd CNN students at chance (10%) in a one-seed
        # probe (the network dies in the first epochs); 0.02 trains every method. Chosen once, for all.
        "cnn": {"overrides": ["student.name=mnist1d_cnn", "optim.lr=0.02"]},
    },
    "methods": [
        {"name": "ce", "config": "ce.yaml", "overrides": []},
        {"name": "kd", "config": "kd.yaml", "overrides": []},
        {"name": "binary_kl", "config": "binary_kl.yaml", "overrides": []},
        {"name": "ce_binary_kl", "config": "ce_binary_kl.yaml", "overrides": []},
        {"name": "dhkd (linear aux)", "config": "dhkd.yaml", "overrides": ["student.aux_head=linear"]},
        {"name": "dhkd (mlp aux)", "config": "dhkd.yaml", "overrides": ["student.aux_head=mlp"]},
        # ga_space=features: the projection at the backbone output that loss.ga meant when
        # docs/results/mnist1d.md was measured; loss.ga=true alone is now the official parameter-space GA.
        {"name": "dhkd + ga", "config": "dhkd.yaml",
         "overrides": ["student.aux_head=linear", "loss.ga=true", "loss.ga_space=features"]},
    ],
}
BASELINES = ("ce", "kd", "binary_kl", "ce_binary_kl")
DIAG_METHODS = ("ce", "binary_kl", "ce_binary_kl", "dhkd (linear aux)")
MAIN_COL, AUX_COL = "main acc (%)", "aux acc (%)"
DIAG_COLS = {"diag/main/norm_cv": "main norm CV", "diag/main/cos_std": "main cos std",
             "diag/main/cos_etf_absdev": "main ETF absdev", "diag/main/nc1": "main NC1",
             "diag/aux/cos_etf_absdev": "aux ETF absdev", "diag/grad_cos": "grad cos"}


@dataclass
class Plan:
    """What the experiment runs; see ``DEFAULT_PLAN``."""
    samples: int
    epochs: int
    seeds: int
    common: list = field(default_factory=list)
    teacher: dict = field(default_factory=dict)
    students: dict = field(default_factory=dict)
    methods: list = field(default_factory=list)


def _positive_int(key, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{key} must be a positive int, got {value!r}")
    return value


def _str_list(key, value) -> list:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{key} must be a list of 'section.key=value' strings, got {value!r}")
    return list(value)


def load_plan(path=None, *, quick: bool = False, seeds: int | None = None) -> Plan:
    """The experiment plan: ``DEFAULT_PLAN``, or a YAML file of the same shape at ``path``; ``quick`` takes
    the ``quick:`` sample count, epochs and seeds; ``seeds`` overrides the seed count. ValueError on a bad plan."""
    if path is None:
        path, data = "DEFAULT_PLAN", DEFAULT_PLAN
    else:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"{path}: the plan must be a mapping")
    known = {"samples", "epochs", "seeds", "quick", "common", "teacher", "students", "methods"}
    if set(data) - known:
        raise ValueError(f"{path}: unknown keys {sorted(set(data) - known)}")
    sizes = dict(data.get("quick") or {}) if quick else data
    plan = Plan(samples=_positive_int("samples", sizes.get("samples")),
                epochs=_positive_int("epochs", sizes.get("epochs")),
                seeds=_positive_int("seeds", sizes.get("seeds") if seeds is None else seeds),
                common=_str_list("common", data.get("common", [])))
    teacher = data.get("teacher") or {}
    plan.teacher = {"config": str(teacher.get("config", "teacher.yaml")),
                    "overrides": _str_list("teacher.overrides", teacher.get("overrides", []))}
    students = data.get("students")
    if not isinstance(students, dict) or not students:
        raise ValueError(f"{path}: students must be a non-empty mapping")
    plan.students = {str(k): _str_list(f"students.{k}.overrides", (v or {}).get("overrides", []))
                     for k, v in students.items()}
    methods = data.get("methods")
    if not isinstance(methods, list) or not methods:
        raise ValueError(f"{path}: methods must be a non-empty list")
    for k, m in enumerate(methods):
        if not isinstance(m, dict) or not isinstance(m.get("name"), str) or not isinstance(m.get("config"), str):
            raise ValueError(f"{path}: methods[{k}] needs a name and a config")
        plan.methods.append({"name": m["name"], "config": m["config"],
                             "overrides": _str_list(f"methods[{k}].overrides", m.get("overrides", []))})
    names = [m["name"] for m in plan.methods]
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: method names repeat: {names}")
    return plan


def slug(name: str) -> str:
    """A directory name for a method name: ``"dhkd + ga"`` -> ``"dhkd_ga"``."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def teacher_config(plan: Plan):
    from ..config import load_config
    return load_config(CONFIG_DIR / plan.teacher["config"],
                       plan.common + plan.teacher["overrides"]
                       + [f"data.mnist1d_samples={plan.samples}", f"train.epochs={plan.epochs}"])


def student_runs(plan: Plan, out, teacher_ckpt) -> list:
    """[(student, method, seed, Config, run_dir)] for every run of the plan, students outermost."""
    from ..config import load_config
    out = Path(out)
    runs = []
    for student, s_over in plan.students.items():
        for m in plan.methods:
            for seed in range(plan.seeds):
                over = plan.common + s_over + m["overrides"] + [
                    f"data.mnist1d_samples={plan.samples}", f"train.epochs={plan.epochs}", f"train.seed={seed}",
                    "train.diagnostics=true", "train.eval_teacher=false"]
                cfg = load_config(CONFIG_DIR / m["config"], over)
                if cfg.method != "ce":
                    cfg.teacher.checkpoint = str(teacher_ckpt)
                    cfg.teacher.train_config = None
                runs.append((student, m["name"], seed, cfg, out / "runs" / student / slug(m["name"]) / f"seed{seed}"))
    return runs


def _finished(cfg, run_dir: Path) -> bool:
    from ..config import dump_config
    try:
        same = (run_dir / "config.yaml").read_text(encoding="utf-8") == dump_config(cfg)
        rows = load_metrics(run_dir / "metrics.jsonl")
    except (OSError, ValueError):
        return False
    done = [r.get("epoch") for r in rows if r.get("kind") == "eval"]
    return same and (run_dir / "student.pt").is_file() and bool(done) and max(done) == cfg.train.epochs


def _train_one(cfg, run_dir) -> str:
    from ..train import Trainer
    run_dir = Path(run_dir)
    if not _finished(cfg, run_dir):
        Trainer(cfg, run_dir, log=lambda msg: None).fit()
    return str(run_dir)


def _init_worker(threads: int) -> None:
    import torch
    torch.set_num_threads(threads)


def _train_all(runs, jobs: int, log) -> None:
    todo = [(cfg, d) for _, _, _, cfg, d in runs if not _finished(cfg, d)]
    log(f"  {len(runs)} student runs, {len(runs) - len(todo)} already done, {jobs} process(es)")
    if jobs == 1:
        for k, (cfg, d) in enumerate(todo, 1):
            _train_one(cfg, d)
            log(f"  [{k}/{len(todo)}] {d}")
        return
    threads = max(1, (os.cpu_count() or 1) // jobs)
    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"),
                                                initializer=_init_worker, initargs=(threads,)) as pool:
        futures = [pool.submit(_train_one, cfg, d) for cfg, d in todo]
        for k, fut in enumerate(concurrent.futures.as_completed(futures), 1):
            log(f"  [{k}/{len(todo)}] {fut.result()}")


# ---------------------------------------------------------------- results

def collect(runs) -> dict:
    """``{student: {method: [rows of seed 0, rows of seed 1, ...]}}`` (eval rows of each metrics.jsonl)."""
    out: dict = {}
    for student, method, _, _, run_dir in runs:
        rows = [r for r in load_metrics(Path(run_dir) / "metrics.jsonl") if r.get("kind") == "eval"]
        out.setdefault(student, {}).setdefault(method, []).append(rows)
    return out


def accuracy_values(runs_by_method: dict) -> dict:
    """``{method: {MAIN_COL: [final main acc per seed], AUX_COL: [...] (dhkd variants only)}}``."""
    table = {}
    for method, runs in runs_by_method.items():
        cols = {MAIN_COL: [final_value(r, "val/acc1_main") for r in runs]}
        if all(any("val/acc1_aux" in row for row in r) for r in runs):
            cols[AUX_COL] = [final_value(r, "val/acc1_aux") for r in runs]
        table[method] = cols
    return table


def diagnostic_values(runs_by_method: dict) -> dict:
    """``{method: {column: [final-epoch value per seed]}}`` for the DIAG_COLS each run logged (finite)."""
    table = {}
    for method, runs in runs_by_method.items():
        cols = {}
        for key, col in DIAG_COLS.items():
            vals = []
            for r in runs:
                try:
                    vals.append(final_value(r, key))
                except KeyError:
                    break
            if len(vals) == len(runs) and all(math.isfinite(v) for v in vals):
                cols[col] = vals
        table[method] = cols
    return table


def verdict(acc: dict) -> tuple[bool, bool, list]:
    """The paper's ordering on one student's accuracy table (``accuracy_values``).

    Returns (collapse_holds, dhkd_holds, lines): collapse_holds is mean(ce_binary_kl) < mean(ce) and
    < mean(binary_kl) (False when one is missing); dhkd_holds is mean(dhkd (linear aux)) >= the best
    single-head mean (False when missing). ``lines`` spell out each difference in points, with its
    standard error sqrt(s1^2/n1 + s2^2/n2) when n > 1.
    """
    stats = {m: summarize(c[MAIN_COL]) for m, c in acc.items()}

    def diff(a, b):
        (ma, sa, na), (mb, sb, nb) = stats[a], stats[b]
        se = math.sqrt(sa ** 2 / na + sb ** 2 / nb) if na > 1 and nb > 1 else math.nan
        return ma - mb, se

    def fmt(d, se):
        return f"{d:+.2f}" + ("" if math.isnan(se) else f" ± {se:.2f}")

    lines = []
    collapse = False
    if all(m in stats for m in ("ce", "binary_kl", "ce_binary_kl")):
        d_ce, se_ce = diff("ce_binary_kl", "ce")
        d_bkl, se_bkl = diff("ce_binary_kl", "binary_kl")
        collapse = d_ce < 0 and d_bkl < 0
        lines.append(f"CE+BinaryKL minus CE: {fmt(d_ce, se_ce)} points; minus BinaryKL: {fmt(d_bkl, se_bkl)} "
                     f"points -> CE+BinaryKL below both: **{'yes' if collapse else 'no'}**")
    base = [m for m in BASELINES if m in stats]
    dhkd_ok = None
    for m in stats if base else ():
        best = max(base, key=lambda b: stats[b][0])
        if m.startswith("dhkd"):
            d, se = diff(m, best)
            ok = d >= 0
            if m == "dhkd (linear aux)":
                dhkd_ok = ok
            lines.append(f"{m} minus the best single-head method ({best}): {fmt(d, se)} points "
                         f"-> at or above the best: **{'yes' if ok else 'no'}**")
    return collapse, bool(dhkd_ok), lines


def compact_png(path) -> None:
    """Re-save a PNG with a 256-colour palette (about 3x smaller for line plots), atomically; no-op
    without Pillow (a matplotlib dependency)."""
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover
        return
    path = Path(path)
    with Image.open(path) as im:
        small = im.convert("RGB").quantize(colors=256)
    with atomic_path(path) as tmp:
        small.save(tmp, format="PNG", optimize=True)


def _machine() -> str:
    import torch
    return (f"{os.cpu_count()}-core CPU ({platform.machine()}, {platform.system()}), torch {torch.__version__}, "
            f"Python {platform.python_version()}")


def write_report(out, plan: Plan, results: dict, *, teacher_acc, wall_s: float, command: str, jobs: int,
                 reused: int = 0) -> dict:
    """results.md, results.json and the PNGs in ``out`` from ``collect``'s results; returns a summary."""
    out = Path(out)
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    n_train, n_test = int(plan.samples * 0.8), plan.samples - int(plan.samples * 0.8)
    md = ["# MNIST-1D: the head-collapse ordering of DHKD (Yang et al., arXiv 2411.08937)", "",
          f"- command: `{command}`",
          f"- data: MNIST-1D from `mnist1d.data.make_dataset`, {plan.samples} signals ({n_train} train / {n_test} "
          f"test), dataset seed 42",
          f"- teacher: 1-D CNN (`mnist1d_cnn`, CE), test top-1 {teacher_acc:.2f}%" if teacher_acc is not None
          else "- teacher: 1-D CNN (`mnist1d_cnn`, CE)",
          f"- {plan.epochs} epochs per run, {plan.seeds} seed(s) per (student, method), {jobs} process(es)",
          *[f"- {student} student overrides: `{' '.join(over)}`" for student, over in plan.students.items()],
          "- methods (config + overrides): " + "; ".join(
              f"{m['name']}: `{m['config']}{''.join(' ' + o for o in m['overrides'])}`" for m in plan.methods),
          f"- machine: {_machine()}",
          f"- date: {date}; wall time {wall_s:.0f} s (teacher, all runs, report)"
          + (f"; {reused} run(s) reused from an earlier invocation" if reused else ""), "",
          "Accuracy: the last epoch's test top-1, mean ± sample std over seeds. Diagnostics: last epoch; NC1 "
          "on the first 1000 test signals; grad cos = the epoch mean of cos(G_prob, G_logit) at the backbone "
          "output (logged only where both a probability-level and a logit-level loss are present).", ""]
    summary = {"students": {}, "teacher_acc": teacher_acc, "wall_s": wall_s, "reused_runs": reused,
               "samples": plan.samples,
               "epochs": plan.epochs, "seeds": plan.seeds}
    for student, by_method in results.items():
        acc = accuracy_values(by_method)
        diag = diagnostic_values(by_method)
        collapse, dhkd_ok, lines = verdict(acc)
        acc_png = plot_accuracy(by_method, out / f"accuracy_{student}.png", keys=("val/acc1_main",),
                                title=f"MNIST-1D, {student} student: main-head test accuracy")
        diag_runs = {m: r for m, r in by_method.items() if m in DIAG_METHODS} or by_method
        diag_png = plot_diagnostics(diag_runs, out / f"diagnostics_{student}.png", keys=DEFAULT_DIAG_KEYS,
                                    extra_keys=("diag/grad_cos",),
                                    title=f"MNIST-1D, {student} student: head diagnostics (solid main, dashed aux)")
        compact_png(acc_png)
        compact_png(diag_png)
        md += [f"## {student} student", "", markdown_table(acc, columns=[MAIN_COL, AUX_COL]),
               *[f"- {line}" for line in lines], "",
               markdown_table(diag, columns=[c for c in DIAG_COLS.values() if any(c in v for v in diag.values())],
                              digits=3), "",
               f"![accuracy]({Path(acc_png).name})", "", f"![diagnostics]({Path(diag_png).name})", ""]
        summary["students"][student] = {"accuracy": acc, "diagnostics": diag, "collapse_holds": collapse,
                                        "dhkd_holds": dhkd_ok, "verdict": lines}
    text = "\n".join(md)
    atomic_write_text(out / "results.md", text)
    atomic_write_text(out / "results.json", json.dumps(summary, indent=1))
    return summary




def run_experiment(out, *, quick: bool = False, seeds: int | None = None, jobs: int = 1, plan_path=None,
                   command: str | None = None, log=print) -> dict:
    """Teacher, every student run, then the report (see the module docstring); returns the summary."""
    import torch

    from ..config import ConfigError, to_dict
    from ..train import train_teacher
    if seeds is not None:
        _positive_int("seeds", seeds)
    _positive_int("jobs", jobs)
    t0 = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plan = load_plan(plan_path, quick=quick, seeds=seeds)
    ckpt = out / "teacher.pt"
    tcfg = teacher_config(plan)
    if ckpt.is_file() and torch.load(ckpt, map_location="cpu", weights_only=True).get("config") != to_dict(tcfg):
        raise ConfigError(f"{ckpt} was trained with another config (other --quick/sample count?); use another --out")
    log(f"dhkd experiment mnist1d: {plan.samples} signals, {plan.epochs} epochs, {plan.seeds} seed(s), "
        f"{len(plan.students)} students x {len(plan.methods)} methods -> {out}")
    if not ckpt.is_file():
        log("  training the teacher (1-D CNN, cross-entropy) ...")
        train_teacher(tcfg, ckpt, log=lambda msg: None)
    teacher_acc = torch.load(ckpt, map_location="cpu", weights_only=True).get("val_acc1")
    runs = student_runs(plan, out, ckpt)
    reused = sum(_finished(cfg, d) for _, _, _, cfg, d in runs)
    _train_all(runs, jobs, log)
    wall = time.perf_counter() - t0
    command = command or (f"dhkd experiment mnist1d{' --quick' if quick else ''} --out {out}"
                          f"{f' --seeds {seeds}' if seeds else ''} --jobs {jobs}")
    summary = write_report(out, plan, collect(runs), teacher_acc=teacher_acc, wall_s=wall, command=command,
                           jobs=jobs, reused=reused)
    log(f"  results in {out / 'results.md'} ({wall:.0f} s)")
    return summary


# ---------------------------------------------------------------- the demo (dhkd demo, make demo)

DEMO_METHODS = ("ce", "kd", "dhkd")
DEMO_NAMES = {"ce": "student MLP, CE only", "kd": "student MLP, KD (CE + softmax KD)",
              "dhkd": "student MLP, DHKD (main head)"}
def demo_config(method: str, epochs: int, teacher_checkpoint: str | None = None):
    """The config of one demo run: ``configs/mnist1d/<method>.yaml`` (``teacher.yaml`` for "teacher")
    with ``train.epochs=epochs``, no tqdm, no TensorBoard, and ``teacher_checkpoint`` as the teacher."""
    from ..config import load_config
    over = [f"train.epochs={epochs}", "train.progress=false", "train.tensorboard=false"]
    if method == "teacher":
        return load_config(CONFIG_DIR / "teacher.yaml", over)
    over += ["train.eval_teacher=false"]
    if method != "ce" and teacher_checkpoint is not None:
        over += [f"teacher.checkpoint={teacher_checkpoint}", "teacher.train_config=null"]
    return load_config(CONFIG_DIR / f"{method}.yaml", over)


def demo_teacher_checkpoint(epochs: int) -> Path:
    """Where the demo's teacher of ``epochs`` epochs is cached: the ``teacher.checkpoint`` of
    ``configs/mnist1d/*.yaml`` (so ``dhkd train`` with those configs reuses it) when ``epochs`` is
    ``teacher.yaml``'s, else the same name with ``_<epochs>ep``."""
    from ..config import expand_path, load_config
    path = Path(expand_path(load_config(CONFIG_DIR / "dhkd.yaml").teacher.checkpoint))
    if epochs == load_config(CONFIG_DIR / "teacher.yaml").train.epochs:
        return path
    return path.with_name(f"{path.stem}_{epochs}ep{path.suffix}")


def cached_teacher_matches(tcfg, checkpoint) -> bool:
    """Whether ``checkpoint`` exists and was trained with ``tcfg``'s training settings (a file without
    a saved config, e.g. one a person put there, counts as matching)."""
    import torch

    from ..config import to_dict
    from ..rundir import training_settings
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        return False
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True).get("config")
    return saved is None or training_settings(saved) == training_settings(to_dict(tcfg))


def run_demo(out, *, epochs: int = 30, seeds: int = 3, verbose: bool = False, stream=None) -> dict:
    """``dhkd demo``: the MNIST-1D teacher (trained once into the configs' cache, ``demo_teacher_checkpoint``),
    then MLP students with ce, kd and dhkd for ``seeds`` seeds each, under one tqdm bar over every
    epoch of every run (runs done, the current run, ETA); prints the accuracy table to ``stream``.
    Returns ``{method: [(main acc, aux acc or None) per seed]}``. On a CPU torch runs on one thread
    (unless OMP_NUM_THREADS says otherwise): the models are tiny, and more threads only contend with
    whatever else the machine runs."""
    import torch
    threads = torch.get_num_threads()
    if not torch.cuda.is_available() and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)
    try:
        return _run_demo(out, epochs=epochs, seeds=seeds, verbose=verbose, stream=stream)
    finally:
        torch.set_num_threads(threads)


def _run_demo(out, *, epochs: int, seeds: int, verbose: bool, stream) -> dict:
    import sys

    import torch

    from ..train import Trainer, train_teacher
    stream = stream or sys.stdout
    _positive_int("epochs", epochs)
    _positive_int("seeds", seeds)
    out = Path(out)
    t0 = time.perf_counter()
    say = (lambda msg: print(msg, file=stream, flush=True)) if verbose else (lambda msg: None)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    backend = "Triton kernels" if device == "cuda" else "chunked PyTorch path"
    print(f"dhkd demo: MNIST-1D (4000 train / 1000 test signals), {epochs} epochs each, device {device}, "
          f"fused loss via the {backend} (backend auto)", file=stream, flush=True)
    tcfg = demo_config("teacher", epochs)
    teacher_ckpt = demo_teacher_checkpoint(epochs)
    need_teacher = not cached_teacher_matches(tcfg, teacher_ckpt)
    runs = [(m, s) for m in DEMO_METHODS for s in range(seeds)]
    bar = _demo_bar(epochs * (len(runs) + need_teacher), disable=verbose)

    def runner(name: str, k: int):
        bar.set_description(f"{name} (run {k}/{len(runs) + need_teacher})")
        return lambda row: bar.update(1)

    if need_teacher:
        if teacher_ckpt.is_file():
            bar.write(f"  the cached teacher {teacher_ckpt} was trained with other settings: training it again")
        train_teacher(tcfg, teacher_ckpt, log=say, on_epoch=runner("teacher", 1))
    teacher_acc = torch.load(teacher_ckpt, map_location="cpu", weights_only=True).get("val_acc1")
    results: dict = {}
    for k, (method, seed) in enumerate(runs, 1 + need_teacher):
        cfg = demo_config(method, epochs, str(teacher_ckpt))
        cfg.train.seed = seed
        on_epoch = runner(f"{method} seed {seed + 1}/{seeds}", k)
        row = Trainer(cfg, out / f"{method}_seed{seed}", log=say, on_epoch=on_epoch).fit()
        results.setdefault(method, []).append((row["val/acc1_main"], row.get("val/acc1_aux")))
    bar.close()

    def stat(values):
        t = torch.tensor(values, dtype=torch.float64)
        spread = f" ± {t.std().item():.1f}" if len(values) > 1 else ""
        return f"{t.mean().item():.1f}%{spread}"

    lines = ["", f"{'model':<36}{'test top-1':>16}"]
    if teacher_acc is not None:
        lines.append(f"{'teacher: 1-D CNN':<36}{teacher_acc:>15.1f}%")
    for method, accs in results.items():
        lines.append(f"{DEMO_NAMES[method]:<36}{stat([a for a, _ in accs]):>16}")
    lines.append(f"{'  DHKD auxiliary head':<36}{stat([a for _, a in results['dhkd']]):>16}")
    if seeds > 1:
        lines.append(f"(mean ± standard deviation over {seeds} student seeds; one teacher)")
    lines.append(f"\nruns, checkpoints and metrics.jsonl in {out}/, the teacher in {teacher_ckpt} "
                 f"({time.perf_counter() - t0:.0f} s)")
    print("\n".join(lines), file=stream, flush=True)
    return results


def _demo_bar(total: int, *, disable: bool):
    """One tqdm bar (epochs of every run), on stderr; a stand-in without tqdm."""
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover (tqdm is in the train extra)
        disable = True
    if disable:
        class _Quiet:
            def update(self, n=1): pass
            def set_description(self, desc): pass
            def write(self, msg): print(msg)
            def close(self): pass
        return _Quiet()
    return tqdm(total=total, unit="epoch", desc="demo", dynamic_ncols=True, smoothing=0.1)
