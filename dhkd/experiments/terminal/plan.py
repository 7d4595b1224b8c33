"""The plan of ``dhkd experiment terminal``: datasets, arms, seeds, lr grid (``configs/terminal/experiment.yaml``).

An arm is a method of ``dhkd.distill`` plus loss settings; ``arm_config`` turns (arm, dataset, lr, seed)
into a validated ``dhkd.config.Config``, so a bad loss key or value is reported as the trainer reports
it. ``heads: 1`` with method ``dhkd`` keeps every term (CE, KD, the logit loss, gradient alignment) on
the main head (``loop.OneHeadDistiller``). Arms with ``numerics`` other than ``exact`` run the official
loop (see ``loop.train_run``). ``quick:`` holds the sizes of ``--quick``, merged key by key over the rest.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ...config import METHODS, ConfigError, config_from_dict

CONFIG_DIR = Path(__file__).resolve().parents[3] / "configs" / "terminal"
_TOP = {"seeds", "tuning_seeds", "lr_grid", "widen", "terminal", "common", "datasets", "arms", "contrasts",
        "ufm", "quick", "jobs_hint"}
_DATASET = {"data", "batch", "epochs", "teacher", "student", "refit_steps", "student_per_class", "eval_per_class"}
_ARM = {"name", "method", "heads", "aux_head", "loss", "lr_from"}


@dataclass
class Plan:
    seeds: list
    tuning_seeds: list
    lr_grid: list
    widen: int
    terminal: dict
    common: dict
    datasets: dict
    arms: list
    contrasts: list = field(default_factory=list)
    ufm: dict = field(default_factory=dict)
    path: str = ""

    def arm(self, name: str) -> dict:
        return next(a for a in self.arms if a["name"] == name)


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in (over or {}).items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def _err(path, key: str, msg: str):
    return ConfigError(f"{path}: {key}: {msg}")


def _int(path, key, value, minimum=1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _err(path, key, f"must be an int >= {minimum}, got {value!r}")
    return value


def load_plan(path=None, *, quick: bool = False, seeds: int | None = None) -> Plan:
    """The plan at ``path`` (default ``configs/terminal/experiment.yaml``); ConfigError naming the key on a
    bad value. ``seeds`` overrides the number of reported seeds (0..seeds-1)."""
    path = Path(path) if path is not None else CONFIG_DIR / "experiment.yaml"
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the plan must be a mapping")
    if set(data) - _TOP:
        raise _err(path, sorted(set(data) - _TOP)[0], "unknown key")
    if quick:
        data = _merge({k: v for k, v in data.items() if k != "quick"}, data.get("quick") or {})
    n_seeds = _int(path, "seeds", data.get("seeds") if seeds is None else seeds)
    tuning = data.get("tuning_seeds") or []
    if not isinstance(tuning, list) or not all(isinstance(s, int) and s >= n_seeds for s in tuning) or not tuning:
        raise _err(path, "tuning_seeds", f"must be a non-empty list of ints >= seeds ({n_seeds}), so that no "
                                         f"tuning seed is reported; got {tuning!r}")
    grid = data.get("lr_grid")
    if not isinstance(grid, list) or not grid or not all(isinstance(v, (int, float)) and v > 0 for v in grid):
        raise _err(path, "lr_grid", f"must be a non-empty list of positive numbers, got {grid!r}")
    term = data.get("terminal") or {"train_acc": 99.5, "by": 0.8}
    if not (0 < term.get("train_acc", 0) <= 100 and 0 < term.get("by", 0) <= 1):
        raise _err(path, "terminal", f"needs train_acc in (0, 100] and by in (0, 1], got {term!r}")
    datasets = data.get("datasets")
    if not isinstance(datasets, dict) or not datasets:
        raise _err(path, "datasets", "must be a non-empty mapping")
    for name, ds in datasets.items():
        if not isinstance(ds, dict) or set(ds) - _DATASET:
            raise _err(path, f"datasets.{name}", f"unknown keys {sorted(set(ds or {}) - _DATASET)}")
        if (ds.get("data") or {}).get("name") not in ("digits", "mnist1d100"):
            raise _err(path, f"datasets.{name}.data.name", "must be digits or mnist1d100")
        _int(path, f"datasets.{name}.epochs", ds.get("epochs"))
        _int(path, f"datasets.{name}.batch", ds.get("batch"))
        _int(path, f"datasets.{name}.teacher.epochs", (ds.get("teacher") or {}).get("epochs"))
        twd = (ds.get("teacher") or {}).get("weight_decay", 0.0)
        if isinstance(twd, bool) or not isinstance(twd, (int, float)) or twd < 0:
            raise _err(path, f"datasets.{name}.teacher.weight_decay", f"must be a number >= 0, got {twd!r}")
        cap = ds.get("eval_per_class") or {}
        if not isinstance(cap, dict) or set(cap) - {"val", "test"}:
            raise _err(path, f"datasets.{name}.eval_per_class", f"must map val and/or test to ints, got {cap!r}")
        for split, n in cap.items():
            _int(path, f"datasets.{name}.eval_per_class.{split}", n)
        if ds.get("student_per_class") is not None:
            _int(path, f"datasets.{name}.student_per_class", ds["student_per_class"])
    plan = Plan(seeds=list(range(n_seeds)), tuning_seeds=list(tuning), lr_grid=sorted(float(v) for v in grid),
                widen=_int(path, "widen", data.get("widen", 0), 0), terminal=term, common=data.get("common") or {},
                datasets=datasets, arms=[], ufm=data.get("ufm") or {}, path=str(path))
    for k, a in enumerate(data.get("arms") or []):
        key = f"arms[{k}]"
        if not isinstance(a, dict) or not isinstance(a.get("name"), str):
            raise _err(path, key, "needs a name")
        if set(a) - _ARM:
            raise _err(path, f"{key}.{sorted(set(a) - _ARM)[0]}", "unknown key")
        if a.get("method") not in METHODS:
            raise _err(path, f"{key}.method", f"must be one of {METHODS}, got {a.get('method')!r}")
        heads = a.get("heads", 2 if a["method"] == "dhkd" else 1)
        if heads not in (1, 2) or (heads == 2 and a["method"] != "dhkd"):
            raise _err(path, f"{key}.heads", f"must be 1, or 2 with method dhkd; got {heads!r}")
        plan.arms.append({"name": a["name"], "method": a["method"], "heads": heads,
                          "aux_head": a.get("aux_head", "linear"), "loss": dict(a.get("loss") or {}),
                          "lr_from": a.get("lr_from")})
    if not plan.arms:
        raise _err(path, "arms", "must be a non-empty list")
    names = [a["name"] for a in plan.arms]
    if len(set(names)) != len(names):
        raise _err(path, "arms", "names repeat")
    for a in plan.arms:
        src = a["lr_from"]
        if src is not None and (src not in names or plan.arm(src)["lr_from"]):
            raise _err(path, f"arm {a['name']!r}.lr_from", f"must name an arm that tunes its own lr, got {src!r}")
    for k, c in enumerate(data.get("contrasts") or []):
        if not (isinstance(c, list) and len(c) == 2 and all(x in names for x in c)):
            raise _err(path, f"contrasts[{k}]", f"must be [arm, arm] of known arms, got {c!r}")
        plan.contrasts.append(tuple(c))
    for ds in datasets:  # every arm's config must validate now, not after an hour of runs
        for a in plan.arms:
            arm_config(plan, ds, a, plan.lr_grid[0], 0)
    return plan


def arm_config(plan: Plan, dataset: str, arm: dict, lr: float, seed: int):
    """The validated ``Config`` of one run (method, loss, optim, sched, epochs, seed, batch)."""
    ds = plan.datasets[dataset]
    loss = {"backend": "auto", **arm["loss"]}
    if loss.get("numerics", "exact") != "exact":
        loss["backend"] = "reference"
    data = {"method": arm["method"], "student": {"aux_head": arm["aux_head"]},
            "data": {"batch_size": ds["batch"]},
            "loss": loss,
            "optim": {**(plan.common.get("optim") or {}), "lr": float(lr)},
            "sched": plan.common.get("sched") or {"name": "cosine"},
            "train": {"epochs": ds["epochs"], "seed": seed, "device": "cpu"}}
    if arm["method"] != "ce":  # a placeholder the config requires: every step gets precomputed teacher logits
        data["teacher"] = {"name": "mnist1d_mlp", "random_init": True}
    try:
        return config_from_dict(data)
    except ConfigError as exc:
        raise ConfigError(f"{plan.path}: arm {arm['name']!r}: {exc}") from None
