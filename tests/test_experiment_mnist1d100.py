"""The 100-class experiment (``dhkd experiment mnist1d100 --quick``): the report, run reuse, paired seeds, the
lr choice, paired differences, non-finite events."""
from __future__ import annotations

import json
import math

import pytest
import torch

from dhkd.cli import main
from dhkd.experiments import mnist1d100 as exp


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache100")
    mp = pytest.MonkeyPatch()
    mp.setenv("DHKD_CACHE", str(cache))
    out = tmp_path_factory.mktemp("exp100") / "quick"
    assert main(["experiment", "mnist1d100", "--quick", "--out", str(out), "--jobs", "2"]) == 0
    yield out
    mp.undo()


def _table(md: str, heading: str) -> dict:
    """{first cell: [cells]} of the table under ``heading``."""
    section = md.split(heading, 1)[1]
    rows = {}
    for line in section.splitlines()[1:]:
        if line.startswith("| ") and not line.startswith("| arm") and not line.startswith("| a |"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0]] = cells[1:]
        elif rows and not line.startswith("|"):
            break
    return rows


def test_quick_report_holds_every_arm_and_matches_the_runs(quick_run):
    plan = exp.load_plan(quick=True)
    md = (quick_run / "results.md").read_text()
    acc = _table(md, "## Accuracy")
    assert list(acc) == [a["name"] for a in plan.arms]
    for arm in plan.arms:
        run = json.loads((quick_run / "runs" / exp.slug(arm["name"]) / "lrcfg_seed0.json").read_text())
        assert [r["epoch"] for r in run["rows"]] == list(range(1, plan.epochs + 1))
        last = run["rows"][-1]["test_acc"]
        best = max(r["test_acc"] for r in run["rows"])
        assert acc[arm["name"]][1:3] == [f"{last:.2f}", f"{best:.2f}"]
        two = "2h" in arm["name"] or "DHKD" in arm["name"]
        assert (acc[arm["name"]][4] != "–") == two
    diag = _table(md, "## Diagnostics")
    assert diag["CE"][5] == "–" and diag["1h CE+BKL"][5] != "–"  # W cos only where a logit loss is trained
    assert diag["DHKD+GA"][-1] != "–" and diag["2h CE+BKL-Norm (DHKD)"][-1] == "–"
    pairs = _table(md, "## Paired differences")
    assert "2h CE+BKL" in pairs
    for name in ("accuracy", "diagnostics"):
        assert (quick_run / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"![{name}]({name}.png)" in md
    summary = json.loads((quick_run / "results.json").read_text())
    assert set(summary["arms"]) == {a["name"] for a in plan.arms}
    assert summary["contrasts"]["2h CE+BKL - 1h CE+BKL"]["last"]["n"] == 1


def test_rerun_reuses_the_runs(quick_run):
    path = quick_run / "runs" / "ce" / "lrcfg_seed0.json"
    before = path.stat().st_mtime_ns
    assert main(["experiment", "mnist1d100", "--quick", "--out", str(quick_run)]) == 0
    assert path.stat().st_mtime_ns == before


def test_seeds_are_paired_across_arms():
    plan = exp.load_plan(quick=True)
    arms = {a["name"]: a for a in plan.arms}
    built = {}
    for name, seed in (("CE", 1), ("2h CE+BKL-Norm (DHKD)", 1), ("1h CE+BKL", 1), ("CE", 2)):
        cfg = exp.arm_config(plan, arms[name], 0.05, seed, "/nonexistent/teacher.pt")
        student, _, _, _, sampler = exp.build_run(cfg, 1000)
        sampler.set_epoch(3)
        built[name, seed] = (student.state_dict(), sampler.indices())
    ref_state, ref_order = built["CE", 1]
    for key in (("2h CE+BKL-Norm (DHKD)", 1), ("1h CE+BKL", 1)):
        state, order = built[key]
        assert all(torch.equal(ref_state[k], state[k]) for k in ref_state)
        assert torch.equal(order, ref_order)
    state, order = built["CE", 2]
    assert not torch.equal(ref_state["head.weight"], state["head.weight"]) and not torch.equal(order, ref_order)


def _fake(val):
    return {"rows": [{"val_acc": val}]}


def test_lr_choice_on_val_with_ties_to_the_smaller_lr():
    plan = exp.load_plan()
    tuned = [a["name"] for a in plan.arms if not a["lr_from"]]
    results = {}
    for name in tuned:
        for lr, val in zip(plan.lr_grid, (50.0, 60.0, 60.0) if name == "CE" else (70.0, 65.0, 40.0)):
            results[name, lr, 0] = _fake(val)
    chosen = exp.choose_lr(plan, results)
    assert chosen["CE"] == (plan.lr_grid[1], dict(zip(plan.lr_grid, (50.0, 60.0, 60.0))))
    assert chosen["KD"][0] == plan.lr_grid[0]
    official = next(a for a in plan.arms if a["lr_from"])
    assert chosen[official["name"]][0] == chosen[official["lr_from"]][0]
    quick = exp.load_plan(quick=True)
    assert all(v == (None, {}) for v in exp.choose_lr(quick, {}).values())


def test_paired_differences():
    p = exp.paired([70.0, 71.0, 69.5], [69.0, 71.5, 68.5])
    assert p["diffs"] == [1.0, -0.5, 1.0] and p["n"] == 3 and p["wins"] == 2 and p["ties"] == 0
    assert p["mean"] == pytest.approx(0.5) and p["std"] == pytest.approx(math.sqrt(0.75))


@pytest.mark.parametrize("text, match", [
    ("samples: 100\nepochs: 1\nseeds: 1\narms: [{name: a, config: ce.yaml}]\nbogus: 1\n", "unknown keys"),
    ("samples: 100\nepochs: 1\nseeds: 1\narms: [{name: a, config: ce.yaml, lr_from: b}]\n", "lr_from"),
    ("samples: 100\nepochs: 1\nseeds: 1\narms: [{name: a, config: ce.yaml}]\ncontrasts: [[a, b]]\n", "contrasts"),
    ("samples: 100\nepochs: 0\nseeds: 1\narms: [{name: a, config: ce.yaml}]\n", "epochs"),
    ("samples: 100\nepochs: 1\nseeds: 1\nlr_grid: [0.1, -1]\narms: [{name: a, config: ce.yaml}]\n", "lr_grid"),
])
def test_bad_plans(tmp_path, text, match):
    path = tmp_path / "plan.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=match):
        exp.load_plan(path)


def _tiny_data(n=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    data = {}
    for key, m in (("", n), ("_val", 64), ("_test", 64)):
        data["x" + key] = torch.randn(m, 40, generator=g)
        data["y" + key] = torch.randint(0, 100, (m,), generator=g)
    return data, 10 * torch.randn(n, 100, generator=g)


@pytest.mark.parametrize("numerics", ["official", "exact"])
def test_non_finite_losses_are_events_and_training_goes_on(numerics):
    """tau = 0.05: official BinaryKL-Norm is infinite in every step (gaps >> 16.6 tau); the run counts the
    steps and finishes with finite weights. The exact loss has none."""
    plan = exp.load_plan(quick=True)
    arm = next(a for a in plan.arms if a["name"] == "2h CE+BKL-Norm (DHKD)")
    extra = ["loss.logit_temperature=0.05"] + (["loss.numerics=official", "loss.backend=reference"]
                                               if numerics == "official" else [])
    cfg = exp.arm_config(plan, {**arm, "overrides": arm["overrides"] + extra}, 0.05, 0, "/x.pt")
    data, t = _tiny_data()
    run = exp.train_run(cfg, data, t)
    steps = 256 // cfg.data.batch_size * cfg.train.epochs
    if numerics == "official":
        assert run["events"] == steps and run["first_event"] == [1, 0]
        assert [r["nonfinite_steps"] for r in run["rows"]] == [steps // cfg.train.epochs] * cfg.train.epochs
    else:
        assert run["events"] == 0 and run["first_event"] is None
    assert all(math.isfinite(r["test_acc"]) for r in run["rows"])
    assert run["rows"][-1]["max_abs_gap_tau"] > exp.GAP_OFFICIAL
    assert -1 <= run["rows"][-1]["w_cos"] <= 1 and 0 <= run["final"]["train_acc"] <= 100


def test_one_process_per_experiment_folder(tmp_path, capsys):
    """The folder is locked as the trainer locks a run directory: a second `dhkd experiment mnist1d100`
    on it stops at once with one line naming the holder (exit 2), before any data or teacher work."""
    from dhkd.rundir import LOCK_NAME, FileLock, RunDirLocked
    out = tmp_path / "exp"
    out.mkdir()
    held = FileLock(out / LOCK_NAME).acquire()
    try:
        with pytest.raises(RunDirLocked, match="experiment folder .* is in use by process"):
            exp.run_experiment(out, quick=True, log=lambda m: None)
        assert main(["experiment", "mnist1d100", "--quick", "--out", str(out)]) == 2
        assert "is in use by process" in capsys.readouterr().err
    finally:
        held.release()
    assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]


def test_data_file_follows_the_plan(tmp_path):
    """OUT/data.npz is what the workers train on, against teacher logits computed from this plan's data: a
    folder used before with another plan (--quick, another sample count) must not keep its old signals."""
    import numpy as np
    path = tmp_path / "data.npz"
    small = {"x": np.zeros((6, 40), np.float32), "y": np.arange(6)}
    large = {"x": np.ones((12, 40), np.float32), "y": np.arange(12)}
    exp.write_data(path, small)
    exp.write_data(path, large)
    with np.load(path) as f:
        assert np.array_equal(f["x"], large["x"]) and np.array_equal(f["y"], large["y"])
    before = path.stat().st_mtime_ns
    exp.write_data(path, {k: v.copy() for k, v in large.items()})
    assert path.stat().st_mtime_ns == before  # the same arrays: left as it is
