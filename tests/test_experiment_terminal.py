"""``dhkd experiment terminal`` (issue 20): NC metrics on constructed inputs with known answers, the
gradient-conflict measures, the paired CI, the plan's errors, and a tiny plan end to end (seconds)."""
from __future__ import annotations

import json
import math

import pytest
import torch

from dhkd.cli import main
from dhkd.config import ConfigError
from dhkd.experiments.terminal import metrics, stats
from dhkd.experiments.terminal.plan import load_plan

TINY = """
seeds: 2
tuning_seeds: [10]
lr_grid: [0.1]
widen: 1
terminal: {train_acc: 99.5, by: 0.8}
common:
  optim: {momentum: 0.9, weight_decay: 5.0e-4, base_batch: 128}
  sched: {name: cosine}
datasets:
  digits:
    data: {name: digits}
    student_per_class: 30
    eval_per_class: {val: 20}
    batch: 64
    epochs: 2
    refit_steps: 10
    teacher: {model: mlp, width: 32, epochs: 2, lr: 0.1, weight_decay: 1.0e-3}
    student: {model: mlp, width: 16}
ufm: {per_class: 4, d: 12, steps: 20, lr: 0.5}
arms:
  - {name: CE, method: ce}
  - {name: BKL-Norm, method: binary_kl, loss: {ce_weight: 0.0}}
  - {name: 1h CE+BKL-Norm, method: ce_binary_kl}
  - {name: 1h CE+KD+BKL-Norm+GA, method: dhkd, heads: 1, loss: {kd_weight: 1.0, ga: true}}
  - {name: DHKD, method: dhkd, aux_head: mlp}
  - {name: "DHKD [torch21]", method: dhkd, lr_from: DHKD,
     loss: {numerics: official_torch21, logit_temperature: 0.02}}
contrasts:
  - [1h CE+BKL-Norm, CE]
  - [DHKD, 1h CE+BKL-Norm]
"""


def simplex_etf(c: int, d: int, scale: float = 3.0) -> torch.Tensor:
    """(C, d) rows of a simplex ETF: the centred standard basis, scaled, rotated into d dimensions."""
    m = torch.eye(c, dtype=torch.float64) - 1.0 / c
    q, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    return scale * m @ q[:c]


def test_a_collapsed_head_scores_zero_on_nc1_to_nc4():
    c, d, per = 5, 8, 4
    m = simplex_etf(c, d)
    y = torch.arange(c).repeat_interleave(per)
    offset = 7.0 * torch.ones(d, dtype=torch.float64)  # a global mean, which the metrics remove
    h, w = m[y] + offset, 2.0 * m
    out = metrics.nc_metrics(h, y, w, -(w @ offset), c)  # the bias undoes the offset in the logits
    for key in ("nc2_norm_m", "nc2_norm_w", "nc2_angle_m", "nc2_angle_w", "nc3", "nc4"):
        assert out[key] == pytest.approx(0.0, abs=1e-9), key
    assert out["nc1"] == pytest.approx(0.0, abs=1e-12)


def test_nc_metrics_grow_with_within_class_noise_and_a_skewed_head():
    c, d, per = 4, 6, 50
    m = simplex_etf(c, d)
    y = torch.arange(c).repeat_interleave(per)
    noise = torch.randn(c * per, d, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    w = m.clone()
    w[0] *= 2.0  # unequal norms, and no longer proportional to M
    out = metrics.nc_metrics(m[y] + 0.5 * noise, y, w, None, c)
    assert out["nc1"] > 0.01 and out["nc2_norm_w"] > 0.2 and out["nc3"] > 0.1
    assert out["nc2_norm_m"] < 0.2  # the class means are still nearly equinorm
    bad = metrics.nc_metrics(torch.full((c * per, d), float("nan"), dtype=torch.float64), y, w, None, c)
    assert all(math.isnan(v) for v in bad.values())


def test_head_conflict_signs_on_a_collapsed_head():
    """CE on a separable ETF head wants a larger W (negative radial component); BinaryKL-Norm towards
    teacher logits t = z (no gap) has no gradient at all: cosine 0, no conflicting rows."""
    c, d = 4, 6
    m = simplex_etf(c, d)
    y = torch.arange(c).repeat_interleave(3)
    h, w = m[y], m.clone()
    out = metrics.head_conflict(h, y, w, None, h @ w.T, 2.0, "binary_kl_norm")
    assert out["radial_ce"] < 0 and out["radial_l"] == 0.0 and out["w_cos_cm"] == 0.0 and out["w_conflict"] == 0.0
    # teacher logits above the student's by one common shift: BinaryKL-Norm's gradient is pure common mode,
    # which CE cannot see: nothing is left of it once the common mode is removed
    out = metrics.head_conflict(h, y, w, None, h @ w.T + 5.0, 2.0, "binary_kl_norm")
    assert out["w_cos_cm"] == 0.0 and out["w_conflict"] == 0.0


def test_paired_ci_and_wins():
    p = stats.paired([3.0, 5.0, 7.0], [2.0, 3.0, 4.0])  # d = 1, 2, 3
    assert p["mean"] == 2.0 and p["std"] == 1.0 and p["wins"] == 3 and p["n"] == 3
    half = 4.303 / math.sqrt(3)
    assert p["lo"] == pytest.approx(2.0 - half) and p["hi"] == pytest.approx(2.0 + half)
    assert not stats.excludes_zero(p)  # [-0.48, +4.48]: three seeds this spread do not exclude 0
    q = stats.paired([4.0, 5.5, 7.0], [2.0, 3.0, 4.0])  # d = 2, 2.5, 3: CI 2.5 -+ 4.303 * 0.5 / sqrt(3)
    assert q["lo"] == pytest.approx(2.5 - 4.303 * 0.5 / math.sqrt(3)) and stats.excludes_zero(q)
    assert math.isnan(stats.paired([1.0], [0.0])["lo"]) and stats.fmt_paired(stats.paired([], [])) == "–"
    assert stats.t975(4) == 2.776 and stats.t975(100) == 1.96


@pytest.mark.parametrize("edit, key", [
    (lambda t: t.replace("seeds: 2\n", "seeds: 2\nbogus: 1\n"), "bogus"),
    (lambda t: t.replace("tuning_seeds: [10]", "tuning_seeds: [1]"), "tuning_seeds"),
    (lambda t: t.replace("{name: CE, method: ce}", "{name: CE, method: cee}"), "arms[0].method"),
    (lambda t: t.replace("loss: {ce_weight: 0.0}", "loss: {ce_weigth: 0.0}"), "ce_weigth"),
    (lambda t: t.replace("lr_from: DHKD", "lr_from: nope"), "lr_from"),
    (lambda t: t.replace("epochs: 2\n    refit", "epochs: 0\n    refit"), "datasets.digits.epochs"),
    (lambda t: t.replace("student_per_class: 30", "student_per_class: 0"), "datasets.digits.student_per_class"),
    (lambda t: t.replace("weight_decay: 1.0e-3}", "weight_decay: -1}"), "datasets.digits.teacher.weight_decay"),
    (lambda t: t.replace("{val: 20}", "{train: 20}"), "datasets.digits.eval_per_class"),
    (lambda t: t.replace("{val: 20}", "{val: 0}"), "datasets.digits.eval_per_class.val"),
])
def test_bad_plan_values_name_their_key(tmp_path, edit, key):
    path = tmp_path / "plan.yaml"
    path.write_text(edit(TINY))
    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]")):
        load_plan(path)


def test_the_shipped_plans_load():
    full, quick = load_plan(), load_plan(quick=True)
    assert len(full.seeds) >= 5 and not set(full.tuning_seeds) & set(full.seeds)
    assert set(full.datasets) == set(quick.datasets) == {"digits", "mnist1d100"}
    for plan in (full, quick):  # the teacher trains on more than the students see (its gap over them)
        for name, ds in plan.datasets.items():
            per_class = ds["student_per_class"]
            if name == "mnist1d100":
                assert per_class < 0.6 * ds["data"]["samples"] / 100
            else:
                assert per_class < 0.6 * 1797 / 10
    assert quick.datasets["mnist1d100"]["epochs"] < full.datasets["mnist1d100"]["epochs"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("terminal")
    plan = root / "plan.yaml"
    plan.write_text(TINY)
    from dhkd.experiments.terminal import run_experiment
    out = root / "out"
    summary = run_experiment(out, plan_path=plan, log=lambda msg: None)
    return out, plan, summary


def test_tiny_plan_end_to_end(tiny_run):
    out, _, summary = tiny_run
    md = (out / "results.md").read_text(encoding="utf-8")
    for heading in ("### Gates", "### Paired differences", "### Neural collapse", "### The decision rules applied",
                    "### Unconstrained-features model", "### Learning-rate choice"):
        assert heading in md
    s = summary["datasets"]["digits"]
    assert set(s["arms"]) == {"CE", "BKL-Norm", "1h CE+BKL-Norm", "1h CE+KD+BKL-Norm+GA", "DHKD", "DHKD [torch21]"}
    # one lr in the grid: it is both edges, widened once each side
    assert set(s["lr"]["CE"]["vals"]) == {0.05, 0.1, 0.2}
    assert s["lr"]["DHKD [torch21]"]["lr"] == s["lr"]["DHKD"]["lr"]
    run = json.loads(next((out / "digits" / "runs" / "dhkd").glob("*_seed0.json")).read_text())
    row = run["rows"][-1]
    assert "nc/aux/nc1" in row and "w_cos_cm" in row and "feat_cos" in row and "max_gap_tau" in row
    # tau = 0.02: the gaps pass 16.6 tau at once; torch 2.1.2's clamp rule makes the weights nan,
    # the official loop breaks the epoch after the step, and the run is at chance from then on
    t21 = s["numerics"]["DHKD [torch21]"]
    assert t21["consistent"] == t21["n"] == 2 and all(c["collapsed"] and c["crossed"] for c in t21["cases"])
    for k in s["arms"]["DHKD [torch21]"]:
        assert k["broken_epochs"] == 2 and k["first_event"]["epoch"] == 1
    assert s["arms"]["1h CE+KD+BKL-Norm+GA"][0]["ga_projected"] >= 0.0
    assert summary["datasets"]["digits"]["ufm"]["CE"]["train_acc"] >= 0


def test_students_train_on_a_per_class_subset_of_the_teachers_split(tiny_run):
    """``student_per_class``: the teacher trains on the whole training split, the students (and their
    teacher logits) on its first 30 signals per class; val and test are shared (``eval_per_class``: val
    capped at its first 20 per class, for the teacher's accuracy too)."""
    import numpy as np

    from dhkd.experiments.terminal.data import digits, student_subset
    out, _, _ = tiny_run
    info = json.loads((out / "digits" / "teacher.json").read_text())
    assert info["n"]["train"] == 300 and info["n_teacher"]["train"] == 1078
    assert info["n"]["test"] == info["n_teacher"]["test"] == 450
    assert info["n"]["val"] == info["n_teacher"]["val"] == 200
    full = digits(0)
    with np.load(out / "digits" / "data.npz") as f, np.load(out / "digits" / "teacher_logits.npz") as g:
        assert np.bincount(f["y"]).tolist() == [30] * 10
        keep = student_subset(full["y"], 30)
        assert np.array_equal(f["x"], full["x"][keep]) and np.array_equal(f["x_test"], full["x_test"])
        assert np.array_equal(f["x_val"], full["x_val"][student_subset(full["y_val"], 20)])
        assert g["val"].shape == (200, 10)
        assert g["train"].shape == (300, 10) and g["test"].shape == (450, 10)
    with pytest.raises(ConfigError, match="student_per_class"):
        student_subset(full["y"], 1000)


def test_one_head_arm_trains_no_aux_head(tiny_run):
    """``heads: 1`` with method dhkd keeps every term on the main head: the aux head never moves."""
    from dhkd.experiments.terminal.data import build_student, digits, tensors
    from dhkd.experiments.terminal.loop import make_distiller
    from dhkd.experiments.terminal.plan import arm_config
    _, plan_path, _ = tiny_run
    plan = load_plan(plan_path)
    arm = plan.arm("1h CE+KD+BKL-Norm+GA")
    cfg = arm_config(plan, "digits", arm, 0.1, 0)
    data = tensors(digits())
    student = build_student({"model": "mlp", "width": 8}, 64, 10)
    before = student.aux_head.weight.detach().clone()
    d = make_distiller(student, cfg, 1)
    d.train_step(data["x"][:32], data["y"][:32], 0, teacher_logits=torch.randn(32, 10))
    assert student.aux_head.weight.grad is None or not student.aux_head.weight.grad.any()
    assert student.head.weight.grad.abs().sum() > 0 and torch.equal(before, student.aux_head.weight)


def test_rerun_reuses_runs_and_a_foreign_folder_is_refused(tiny_run, tmp_path, capsys):
    out, plan, _ = tiny_run
    import time
    t0 = time.perf_counter()
    from dhkd.experiments.terminal import run_experiment
    run_experiment(out, plan_path=plan, log=lambda msg: None)  # every run reused
    assert time.perf_counter() - t0 < 30
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    assert main(["experiment", "terminal", "--quick", "--out", str(mine)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "did not write" in err[0]
    assert (mine / "notes.txt").read_text() == "keep me"


def test_collapse_means_nan_weights_or_staying_at_chance_after_being_above():
    from dhkd.experiments.terminal.report import summarize_run

    def run(accs, finite=None):
        rows = [{"epoch": k + 1, "test_acc": a, "val_acc": a, "train_acc": a, "finite_weights": True}
                for k, a in enumerate(accs)]
        for k in finite or []:
            rows[k]["finite_weights"] = False
        return {"rows": rows, "final": {"refit_test": 0.0}, "events": 0, "first_event": None, "cpu_s": 0.0}
    summary = lambda *a, **k: summarize_run(run(*a, **k), threshold=99.5, num_classes=100)  # noqa: E731
    assert summary([1.0, 5.0, 30.0])["collapse_epoch"] is None  # a slow start is not a collapse
    assert summary([1.0, 30.0, 1.5, 1.0])["collapse_epoch"] == 3
    assert summary([30.0, 1.0, 30.0])["collapse_epoch"] is None  # it came back
    assert summary([30.0, 31.0, 1.0], finite=[2])["collapse_epoch"] == 3
    s = summary([10.0, 99.6, 99.7])
    assert s["terminal_epoch"] == 2 and s["best_test_epoch"] == 3 and s["last"] == 99.7


def _seed(last, collapse=None, **kw):
    return dict(last=last, refit_gain=kw.get("refit", 5.0), w_cos_cm=kw.get("wc", -0.5), feat_cos=kw.get("fc", 0.2),
                collapse_epoch=collapse, first_event=None, step_max_z_tau=kw.get("z", 10.0),
                step_max_pos_gap_tau=kw.get("gap", 10.0))


def _gate(teacher_gap_ok=True, terminal=True, arms=("CE", "BKL-Norm", "1h CE+BKL-Norm", "DHKD")):
    return {"teacher_gap_ok": teacher_gap_ok, "terminal_ok": terminal,
            "terminal": {a: {"ok": terminal} for a in arms}}


def test_the_rules_give_no_verdict_when_a_gate_fails_and_otherwise_follow_r1_to_r4():
    """The pre-registered rules: a dataset that misses the teacher-gap gate or the terminal gate gives no
    verdict whatever R1-R4 show; with the gates met, every rule met is "supported", one missed is not."""
    from dhkd.experiments.terminal.report import decision_rules
    per_seed = {"CE": [_seed(60 + k) for k in range(5)], "BKL-Norm": [_seed(61 + k) for k in range(5)],
                "1h CE+BKL-Norm": [_seed(55 + k + 0.1 * k * k) for k in range(5)],
                "DHKD": [_seed(62 + k) for k in range(5)]}
    (rule,) = decision_rules(None, per_seed, _gate())
    assert rule["r1_one_head_below_both"] and rule["r2_two_heads_better"] and rule["r3_refit_recovers_half"]
    assert rule["r4_conflict_in_head_only"] and rule["verdict"] == "supported" and rule["supported"]
    for gate in (_gate(teacher_gap_ok=False), _gate(terminal=False), dict(_gate(), terminal_ok=False)):
        (rule,) = decision_rules(None, per_seed, gate)
        assert rule["verdict"] == "no verdict" and not rule["supported"]
    per_seed["1h CE+BKL-Norm"] = [_seed(55 + k + 0.1 * k * k, fc=-0.1) for k in range(5)]  # R4 missed
    (rule,) = decision_rules(None, per_seed, _gate())
    assert rule["verdict"] == "not supported"


def test_the_numerics_verdict_needs_a_crossing_and_calm_counterparts():
    from types import SimpleNamespace

    from dhkd.experiments.terminal.report import numerics_rule, numerics_verdict
    plan = SimpleNamespace(arms=[
        {"name": "BKL", "loss": {"logit_loss": "binary_kl"}, "lr_from": None},
        {"name": "BKL [torch21]", "loss": {"logit_loss": "binary_kl", "numerics": "official_torch21"},
         "lr_from": "BKL"},
        {"name": "BKL [official]", "loss": {"logit_loss": "binary_kl", "numerics": "official"}, "lr_from": "BKL"}])

    def verdict(t21, exact=None, official=None):
        per_seed = {"BKL": exact or [_seed(60.0)], "BKL [torch21]": t21, "BKL [official]": official or [_seed(60.0)]}
        return numerics_verdict(plan, per_seed, numerics_rule(plan, per_seed))
    assert verdict([_seed(60.0, z=12.0), _seed(60.0, z=15.0)]) == "untested"
    assert verdict([_seed(1.0, collapse=4, z=20.0), _seed(60.0, z=12.0)]) == "supported"
    assert verdict([_seed(60.0, z=20.0)]) == "not supported"  # crossed without collapsing
    assert verdict([_seed(1.0, collapse=4, z=12.0), _seed(1.0, collapse=2, z=20.0)]) == "not supported"
    assert verdict([_seed(1.0, collapse=4, z=20.0)], exact=[_seed(1.0, collapse=3)]) == "not supported"
    assert verdict([_seed(1.0, collapse=4, z=20.0)], official=[_seed(1.0, collapse=3)]) == "not supported"
