"""``results.md``, ``results.json`` and the plots of ``dhkd experiment terminal``, with the gates and the
pre-registered decision rules applied (the rules' text: docs/results/terminal.md).

Per run (``summarize_run``): test top-1 at the last epoch, at the epoch of best val top-1, and at the best
test epoch (the official code's number: optimistic, it selects on the test set); the first epoch with
train top-1 >= the terminal threshold; the head re-fit's test top-1; the last epoch's diagnostics; the
maxima of the logit statistics over the epochs; non-finite steps; the collapse epoch (the first epoch
with non-finite weights or test top-1 <= 2x chance).
"""
from __future__ import annotations

import datetime
import json
import math
import os
import platform
from pathlib import Path

from ...atomic import atomic_write_text
from .stats import excludes_zero, fmt_mean, fmt_paired, mean_std, paired

OFFICIAL_LIMIT = 16.6
DIAG = ("nc/main/nc1", "nc/main/nc2_norm_w", "nc/main/nc2_angle_w", "nc/main/nc2_angle_m", "nc/main/nc3",
        "nc/main/nc4", "w_cos", "w_cos_cm", "w_conflict", "radial_ce", "radial_l", "feat_cos")


def summarize_run(run: dict, *, threshold: float, num_classes: int) -> dict:
    rows = run["rows"]
    last = rows[-1]
    best_val = max(rows, key=lambda r: (r["val_acc"] if math.isfinite(r["val_acc"]) else -1, -r["epoch"]))
    best_test = max(rows, key=lambda r: (r["test_acc"] if math.isfinite(r["test_acc"]) else -1, -r["epoch"]))
    reach = next((r["epoch"] for r in rows if r["train_acc"] >= threshold), None)
    chance2 = 200.0 / num_classes
    low = [not r["finite_weights"] or r["test_acc"] <= chance2 for r in rows]
    above = [k for k, r in enumerate(rows) if not low[k]]
    nan_at = next((r["epoch"] for r in rows if not r["finite_weights"]), None)
    stays = next((rows[k]["epoch"] for k in range(len(rows)) if all(low[k:]) and any(j < k for j in above)), None)
    collapse = nan_at if nan_at is not None else stays
    out = {"last": last["test_acc"], "best_val": best_val["test_acc"], "best_val_epoch": best_val["epoch"],
           "best_test": best_test["test_acc"], "best_test_epoch": best_test["epoch"], "train_last": last["train_acc"],
           "aux_last": last.get("test_acc_aux"), "terminal_epoch": reach, "epochs": len(rows),
           "refit_test": run["final"]["refit_test"], "events": run["events"], "first_event": run["first_event"],
           "broken_epochs": sum(bool(r.get("epoch_broken")) for r in rows), "collapse_epoch": collapse,
           "ga_projected": sum(r.get("ga_projected", 0.0) for r in rows) / len(rows), "cpu_s": run["cpu_s"]}
    out["refit_gain"] = out["refit_test"] - out["last"]
    for k in DIAG:
        out[k] = last.get(k, math.nan)
    for k in ("max_z_tau", "max_gap_tau", "max_pos_gap_tau", "max_abs_z_main_tau"):
        out[k] = last.get(k, math.nan)
        vals = [r.get("step_" + k, math.nan) for r in rows]
        vals = [v for v in vals if math.isfinite(v)]
        out["step_" + k] = max(vals) if vals else math.nan
    return out


def _machine() -> str:
    import torch
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else math.nan
    return (f"{os.cpu_count()}-core CPU ({platform.machine()}), torch {torch.__version__}, Python "
            f"{platform.python_version()}; load average at the end {load:.1f}")


def _commit() -> str:
    import subprocess
    try:
        root = Path(__file__).resolve().parents[3]
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (sha or "unknown") + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def gates(plan, per_seed: dict, teacher: dict, threshold: float, epochs: int) -> dict:
    """Teacher gap (KD - CE >= 3, teacher - KD >= 2, test top-1 means) and terminal phase (every seed of an
    exact-numerics arm reaches train top-1 >= threshold by round(by * epochs))."""
    by = int(round(plan.terminal["by"] * epochs))
    out = {"by_epoch": by, "threshold": threshold, "terminal": {}}
    ce, kd = (mean_std([s["last"] for s in per_seed.get(a, [])])[0] for a in ("CE", "KD"))
    out["kd_minus_ce"], out["teacher_minus_kd"] = kd - ce, teacher["test"] - kd
    out["teacher_gap_ok"] = out["kd_minus_ce"] >= 3 and out["teacher_minus_kd"] >= 2
    for a in plan.arms:
        if a["loss"].get("numerics", "exact") != "exact":
            continue
        reach = [s["terminal_epoch"] for s in per_seed[a["name"]]]
        out["terminal"][a["name"]] = {"reach": reach, "ok": all(r is not None and r <= by for r in reach)}
    out["terminal_ok"] = all(v["ok"] for v in out["terminal"].values())
    return out


def decision_rules(plan, per_seed: dict, gate: dict) -> list:
    """The pre-registered rules, per logit-loss family present in the plan; each a dict with the numbers,
    ``verdict`` ("supported", "not supported", or "no verdict" when the dataset misses a gate: the teacher
    gap, or the terminal phase of an exact-numerics arm) and ``supported`` (the verdict is "supported")."""
    rules = []
    families = [("BKL-Norm", "1h CE+BKL-Norm", "DHKD"), ("BKL", "1h CE+BKL", None)]
    for alone, one, two in families:
        if not all(n in per_seed for n in ("CE", alone, one)):
            continue
        v = {n: per_seed[n] for n in ("CE", alone, one) + ((two,) if two and two in per_seed else ())}
        terminal = all(gate["terminal"].get(n, {}).get("ok", False) for n in v)
        d_ce = paired([s["last"] for s in v[one]], [s["last"] for s in v["CE"]])
        d_alone = paired([s["last"] for s in v[one]], [s["last"] for s in v[alone]])
        r1 = d_ce["mean"] < -1 and d_alone["mean"] < -1 and d_ce["hi"] < 0 and d_alone["hi"] < 0
        rule = {"family": alone, "terminal": terminal, "one_minus_ce": d_ce, "one_minus_alone": d_alone,
                "r1_one_head_below_both": r1}
        if two and two in v:
            d2 = paired([s["last"] for s in v[two]], [s["last"] for s in v[one]])
            rule["two_minus_one"] = d2
            rule["r2_two_heads_better"] = d2["mean"] > 0 and excludes_zero(d2)
        gap = min(mean_std([s["last"] for s in v["CE"]])[0], mean_std([s["last"] for s in v[alone]])[0]) - \
            mean_std([s["last"] for s in v[one]])[0]
        rec = mean_std([s["refit_gain"] for s in v[one]])[0]
        rule.update(gap=gap, refit_recovery=rec, r3_refit_recovers_half=gap > 0 and rec >= gap / 2)
        wc, fc = mean_std([s["w_cos_cm"] for s in v[one]])[0], mean_std([s["feat_cos"] for s in v[one]])[0]
        rule.update(w_cos_cm=wc, feat_cos=fc, r4_conflict_in_head_only=wc < 0 < fc)
        keys = ["r1_one_head_below_both", "r3_refit_recovers_half", "r4_conflict_in_head_only"]
        keys += ["r2_two_heads_better"] if "r2_two_heads_better" in rule else []
        gated = terminal and gate["teacher_gap_ok"] and gate["terminal_ok"]
        rule["verdict"] = "no verdict" if not gated else ("supported" if all(rule[k] for k in keys)
                                                          else "not supported")
        rule["supported"] = rule["verdict"] == "supported"
        rules.append(rule)
    return rules


def numerics_rule(plan, per_seed: dict) -> dict:
    """Official-semantics runs: collapsed or not, and whether the statistic their loss saturates on
    (z/tau for BinaryKL, (z - t)/tau for BinaryKL-Norm) passed +16.6 in a training step's batch (train mode,
    before the optimizer step; the first non-finite step's batch included)."""
    out = {}
    for a in plan.arms:
        numerics = a["loss"].get("numerics", "exact")
        if numerics == "exact":
            continue
        stat = "max_pos_gap_tau" if a["loss"].get("logit_loss", "binary_kl_norm") == "binary_kl_norm" else "max_z_tau"
        cases = []
        for s in per_seed[a["name"]]:
            ev = s["first_event"] or {}
            vals = [v for v in (ev.get("batch_" + stat), s["step_" + stat]) if v is not None and math.isfinite(v)]
            crossed = max(vals) if vals else math.nan
            cases.append({"collapsed": s["collapse_epoch"] is not None, "collapse_epoch": s["collapse_epoch"],
                          "first_event_epoch": ev.get("epoch"), "crossed": crossed >= OFFICIAL_LIMIT, "stat": crossed})
        consistent = sum(c["collapsed"] == c["crossed"] for c in cases)
        out[a["name"]] = {"numerics": numerics, "stat": stat, "cases": cases, "consistent": consistent,
                          "n": len(cases)}
    return out


def numerics_verdict(plan, per_seed: dict, num: dict) -> str:
    """The numerics hypothesis over every ``official_torch21`` arm: "untested" when no run crossed 16.6;
    "supported" when every run collapsed exactly when it crossed and no counterpart (the exact arm it takes
    its lr from, and the ``official`` arms) collapsed; "not supported" otherwise."""
    t21 = [v for v in num.values() if v["numerics"] == "official_torch21"]
    if not t21 or not any(c["crossed"] for v in t21 for c in v["cases"]):
        return "untested"
    counterparts = {a["lr_from"] for a in plan.arms
                    if a["loss"].get("numerics") == "official_torch21" and a.get("lr_from")}
    counterparts |= {a["name"] for a in plan.arms if a["loss"].get("numerics") == "official"}
    calm = all(s["collapse_epoch"] is None for n in counterparts for s in per_seed.get(n, []))
    exact = all(v["consistent"] == v["n"] for v in t21)
    return "supported" if exact and calm else "not supported"


def _plots(folder: Path, name: str, plan, runs: dict) -> list:
    from ..mnist1d import compact_png
    from ..plots import plot_accuracy, plot_diagnostics
    rows = {a: [r["rows"] for r in rs] for a, rs in runs.items()}
    main = [a for a in ("CE", "KD", "BKL-Norm", "1h CE+BKL-Norm", "DHKD", "DHKD official (MLP+GA)") if a in rows]
    num = [a["name"] for a in plan.arms if a["loss"].get("numerics", "exact") != "exact" and a["name"] in rows]
    pngs = []
    try:
        pngs.append(plot_accuracy({a: rows[a] for a in main}, folder / "accuracy.png", keys=("test_acc", "train_acc"),
                                  title=f"{name}: test (solid) and train (dashed) top-1, main head"))
        pngs.append(plot_diagnostics({a: rows[a] for a in main}, folder / "collapse.png",
                                     keys=("nc1", "nc2_angle_w", "nc3", "nc4"), prefix="nc",
                                     extra_keys=("w_cos_cm", "feat_cos", "radial_l", "step_max_gap_tau"),
                                     title=f"{name}: neural-collapse metrics (main solid, aux dashed) and the "
                                           "CE / BinaryKL-Norm gradients"))
        if num:
            pngs.append(plot_accuracy({a: rows[a] for a in num}, folder / "numerics.png", keys=("test_acc",),
                                      title=f"{name}: official numerics arms, test top-1"))
    except ValueError:
        pass
    for p in pngs:
        compact_png(p)
    return pngs


def _f(x, digits=2, sign=False) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    return f"{x:+.{digits}f}" if sign else f"{x:.{digits}f}"


def dataset_section(name: str, plan, d: dict, folder: Path) -> tuple[list, dict]:
    """Markdown lines and the JSON summary of one dataset."""
    teacher, chosen, runs = d["teacher"], d["chosen"], d["runs"]
    epochs = plan.datasets[name]["epochs"]
    thr = plan.terminal["train_acc"]
    c = teacher["num_classes"]
    per_seed = {a: [summarize_run(r, threshold=thr, num_classes=c) for r in rs] for a, rs in runs.items()}
    gate = gates(plan, per_seed, teacher, thr, epochs)
    ds = plan.datasets[name]
    md = [f"## {name}", "",
          f"- data: {ds['data']}; train/val/test {teacher['n']['train']}/{teacher['n']['val']}/{teacher['n']['test']}",
          f"- teacher: {ds['teacher']}; test {teacher['test']:.2f}%, val {teacher['val']:.2f}%, train "
          f"{teacher['train']:.2f}%, max |t|/τ {teacher['max_abs_t_tau']:.1f}",
          f"- students: {ds['student']}, {epochs} epochs, batch {ds['batch']}; wall time of this dataset "
          f"{d['wall_s']:.0f} s", "",
          "### Gates", "",
          f"- teacher gap: KD − CE = {_f(gate['kd_minus_ce'], 2, True)} (gate ≥ 3), teacher − KD = "
          f"{_f(gate['teacher_minus_kd'], 2, True)} (gate ≥ 2): **{'pass' if gate['teacher_gap_ok'] else 'FAIL'}**",
          f"- terminal phase: train top-1 ≥ {thr}% by epoch {gate['by_epoch']} of {epochs} in every seed of every "
          f"exact-numerics arm: **{'pass' if gate['terminal_ok'] else 'FAIL'}**; per arm, the epoch each seed "
          "reached it (– = never):", ""]
    md.append("  " + "; ".join(f"{a}: {','.join('–' if r is None else str(r) for r in v['reach'])}"
                               f"{'' if v['ok'] else ' (fail)'}" for a, v in gate["terminal"].items()))
    md += ["", "### Accuracy (test top-1, %, mean ± std over the reported seeds)", "",
           "last = last epoch; best-val = at the epoch of best val top-1; best-test = the best test epoch, as the "
           "official code reports (optimistic: it selects on the test set); refit = a fresh CE head on the "
           "frozen final backbone; train = train top-1 at the last epoch. lr: * = the choice sits on an edge of "
           "the grid explored.", "",
           "| arm | lr | last | best-val | best-test | train | refit | refit − last | aux (last) | seeds |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for a in plan.arms:
        v, ch = per_seed[a["name"]], chosen[a["name"]]
        lr = f"{ch['lr']:g}{'*' if ch.get('edge') else ''}" + (f" (= {ch['from']})" if ch.get("from") else "")
        md.append(f"| {a['name']} | {lr} | {fmt_mean([s['last'] for s in v])} | "
                  f"{fmt_mean([s['best_val'] for s in v])} | {fmt_mean([s['best_test'] for s in v])} | "
                  f"{fmt_mean([s['train_last'] for s in v])} | {fmt_mean([s['refit_test'] for s in v])} | "
                  f"{fmt_mean([s['refit_gain'] for s in v])} | {fmt_mean([s['aux_last'] for s in v])} | {len(v)} |")
    md += ["", "### Paired differences (a − b, test top-1 points: mean [95% CI] (a > b in k of n seeds))", "",
           "| a | b | last | best-val | best-test |", "|---|---|---|---|---|"]
    contrasts = {}
    for a, b in plan.contrasts:
        cell = {k: paired([s[k] for s in per_seed[a]], [s[k] for s in per_seed[b]])
                for k in ("last", "best_val", "best_test")}
        contrasts[f"{a} - {b}"] = cell
        md.append(f"| {a} | {b} | {fmt_paired(cell['last'])} | {fmt_paired(cell['best_val'])} | "
                  f"{fmt_paired(cell['best_test'])} |")
    md += ["", "### Neural collapse and the gradients, last epoch (mean ± std over seeds)", "",
           "Main head, on the whole training split in eval mode. NC2: CV of the row norms of W and mean "
           "|cos + 1/(C−1)| of the rows of W and of the centred class means M; NC3 = ‖W/‖W‖ − M/‖M‖‖; NC4 = "
           "fraction of training samples where the head and the nearest class mean disagree. W cos: "
           "cos(∂CE/∂W, ∂L/∂W) with L = the arm's logit loss (BinaryKL-Norm for CE/KD) on the main head; "
           "cm: L's common mode removed; conflict: fraction of class rows with a negative (cm) cosine; radial: "
           "⟨∂·/∂W, W⟩/‖W‖ (negative grows the head); feat cos: at the backbone output, L on the head it trains.",
           "", "| arm | NC1 | NC2 norm W | NC2 angle W | NC2 angle M | NC3 | NC4 | W cos | W cos cm | conflict | "
           "radial CE | radial L | feat cos |", "|---|" + "---|" * 12]
    for a in plan.arms:
        v = per_seed[a["name"]]
        md.append(f"| {a['name']} | " + " | ".join(fmt_mean([s[k] for s in v], 3) for k in DIAG) + " |")
    md += ["", "### Numerics and events", "",
           "max z/τ, max |z − t|/τ: the head the logit loss trains (main head: max |z1|/τ), the max over every "
           f"training step's batch (train mode, before the step); the official float32 losses are infinite past "
           f"{OFFICIAL_LIMIT}; 'end': the same on the training split in eval mode at the last epoch. non-finite: "
           "steps, summed over seeds (runs with any); broken: epochs cut short by a nan loss (official loop); "
           "collapse: the first epoch with non-finite weights, or from which test top-1 stays ≤ 2× chance, per "
           "seed; GA: mean fraction of steps that projected.", "",
           "| arm | max \\|z1\\|/τ | max z/τ | max \\|z − t\\|/τ | end z/τ | end \\|z − t\\|/τ | non-finite | "
           "first event (epoch) | broken | collapse | GA |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for a in plan.arms:
        v = per_seed[a["name"]]
        ev = sum(s["events"] for s in v)
        first = ",".join(str((s["first_event"] or {}).get("epoch", "–")) for s in v)
        coll = ",".join("–" if s["collapse_epoch"] is None else str(s["collapse_epoch"]) for s in v)
        md.append(f"| {a['name']} | {fmt_mean([s['step_max_abs_z_main_tau'] for s in v], 1)} | "
                  f"{fmt_mean([s['step_max_z_tau'] for s in v], 1)} | {fmt_mean([s['step_max_gap_tau'] for s in v], 1)} | "
                  f"{fmt_mean([s['max_z_tau'] for s in v], 1)} | {fmt_mean([s['max_gap_tau'] for s in v], 1)} | "
                  f"{ev} ({sum(s['events'] > 0 for s in v)}/{len(v)}) | "
                  f"{first} | {sum(s['broken_epochs'] for s in v)} | {coll} | "
                  f"{fmt_mean([s['ga_projected'] for s in v], 3)} |")
    lrs = sorted({lr for ch in chosen.values() for lr in ch["vals"]})
    md += ["", f"### Learning-rate choice (mean last-epoch val top-1 over tuning seeds {plan.tuning_seeds}, %)", "",
           "| arm | " + " | ".join(f"{lr:g}" for lr in lrs) + " | chosen |", "|---|" + "---|" * (len(lrs) + 1)]
    for a in plan.arms:
        ch = chosen[a["name"]]
        cells = [_f(ch["vals"].get(lr)) for lr in lrs]
        md.append(f"| {a['name']} | " + " | ".join(cells) + f" | {ch['lr']:g}{'*' if ch.get('edge') else ''}"
                  f"{' (= ' + ch['from'] + ')' if ch.get('from') else ''} |")
    rules = decision_rules(plan, per_seed, gate)
    num = numerics_rule(plan, per_seed)
    md += ["", "### The decision rules applied", ""]
    for r in rules:
        md.append(f"- **{r['family']}** (all compared arms terminal: {'yes' if r['terminal'] else 'no'}): "
                  f"R1 one head − CE {fmt_paired(r['one_minus_ce'])}, one head − {r['family']} alone "
                  f"{fmt_paired(r['one_minus_alone'])} → {'met' if r['r1_one_head_below_both'] else 'not met'}; "
                  + (f"R2 two heads − one head {fmt_paired(r['two_minus_one'])} → "
                     f"{'met' if r['r2_two_heads_better'] else 'not met'}; " if "two_minus_one" in r else "")
                  + f"R3 gap {_f(r['gap'], 2, True)}, re-fit recovers {_f(r['refit_recovery'], 2, True)} → "
                  f"{'met' if r['r3_refit_recovers_half'] else 'not met'}; R4 W cos cm {_f(r['w_cos_cm'], 3, True)}, "
                  f"feat cos {_f(r['feat_cos'], 3, True)} → {'met' if r['r4_conflict_in_head_only'] else 'not met'}. "
                  + (f"**Claim {r['verdict']}.**" if r["verdict"] != "no verdict" else
                     "**No verdict**: the dataset misses a gate (see Gates), whatever R1–R4 show."))
    for a, v in num.items():
        cases = "; ".join(f"{'collapsed at ' + str(c['collapse_epoch']) if c['collapsed'] else 'no collapse'}, "
                          f"{v['stat']} {_f(c['stat'], 1)}" for c in v["cases"])
        md.append(f"- numerics, **{a}** ({v['numerics']}): collapse ⇔ {v['stat']} ≥ {OFFICIAL_LIMIT} in "
                  f"{v['consistent']}/{v['n']} seeds ({cases})")
    num_verdict = numerics_verdict(plan, per_seed, num)
    if num:
        md.append(f"- **numerics hypothesis: {num_verdict}** (untested: no official_torch21 run crossed "
                  f"{OFFICIAL_LIMIT}; supported: every one collapsed exactly when it crossed, and no exact or "
                  "`official` counterpart collapsed)")
    if d["ufm"]:
        md += ["", "### Unconstrained-features model (free H and W, main head W1; see dhkd/experiments/terminal/ufm.py)",
               "", "| variant | train | ‖W1‖ | NC1 | NC2 norm W | NC2 angle W | NC3 | W cos cm | radial CE | radial L |",
               "|---|---|---|---|---|---|---|---|---|---|"]
        for k, u in d["ufm"].items():
            md.append(f"| {k} | {_f(u['train_acc'])} | {_f(u['w_norm'], 3)} | {_f(u['nc1'], 4)} | "
                      f"{_f(u['nc2_norm_w'], 4)} | {_f(u['nc2_angle_w'], 4)} | {_f(u['nc3'], 4)} | "
                      f"{_f(u['w_cos_cm'], 3, True)} | {_f(u['radial_ce'], 4, True)} | {_f(u['radial_l'], 4, True)} |")
    pngs = _plots(folder, name, plan, runs)
    md += [""] + [f"![{name} {Path(p).stem}]({name}/{Path(p).name})" for p in pngs] + [""]
    summary = {"teacher": teacher, "gates": gate, "lr": chosen, "arms": per_seed, "contrasts": contrasts,
               "rules": rules, "numerics": num, "numerics_verdict": num_verdict, "ufm": d["ufm"], "wall_s": d["wall_s"]}
    return md, summary


def write_report(out, plan, per_ds: dict, *, quick: bool, wall_s: float, command: str, jobs: int) -> dict:
    out = Path(out)
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    cpu = sum(s["cpu_s"] for d in per_ds.values() for rs in d["runs"].values() for s in rs)
    title = "# Terminal phase: " + ("QUICK run (a smoke run of the design, not the experiment)" if quick else
                                   "full run")
    md = [title, "", f"- command: `{command}`", f"- commit: {_commit()}", f"- machine: {_machine()}",
          f"- date: {date}; wall time {wall_s:.0f} s with {jobs} process(es); CPU time of the reported runs {cpu:.0f} s",
          f"- reported seeds {plan.seeds}; tuning seeds {plan.tuning_seeds}; lr grid {plan.lr_grid} (widened up to "
          f"{plan.widen}× per edge)", ""]
    summary = {"quick": quick, "wall_s": wall_s, "command": command, "date": date, "datasets": {}}
    for name, d in per_ds.items():
        lines, s = dataset_section(name, plan, d, out / name)
        md += lines
        summary["datasets"][name] = s
    atomic_write_text(out / "results.md", "\n".join(md))
    atomic_write_text(out / "results.json", json.dumps(summary, indent=1, default=str))
    return summary
