"""The MNIST-1D experiment (``dhkd experiment mnist1d --quick``) and the trainer's diagnostics hook."""
from __future__ import annotations

import json
import math
import re

import pytest
import torch

from dhkd.cli import main
from dhkd.config import load_config
from dhkd.diagnostics import head_report
from dhkd.experiments.mnist1d import MAIN_COL, load_plan, slug, verdict
from dhkd.experiments.plots import final_value, load_metrics
from dhkd.train import Trainer
from tests.trainer_helpers import CONFIGS, FAST, dhkd_cache  # noqa: F401

QUIET = dict(log=lambda m: None)
HEAD_KEYS = {"norm_mean", "norm_cv", "cos_mean", "cos_std", "cos_etf_gap", "cos_etf_absdev",
             "cos_centered_etf_gap", "cos_centered_std", "nc1"}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory, dhkd_cache):  # noqa: F811
    out = tmp_path_factory.mktemp("exp") / "quick"
    assert main(["experiment", "mnist1d", "--quick", "--out", str(out)]) == 0
    return out


def _table_rows(md: str, student: str) -> dict:
    """{method: [cells]} of the first table under '## <student> student'."""
    section = md.split(f"## {student} student", 1)[1]
    rows = {}
    for line in section.splitlines():
        if line.startswith("| ") and not line.startswith("| method"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows.setdefault(cells[0], cells[1:])
        elif rows and not line.startswith("|"):
            break
    return rows


def test_quick_experiment_writes_table_and_plots(quick_run):
    plan = load_plan(quick=True)
    md = (quick_run / "results.md").read_text()
    for student in plan.students:
        rows = _table_rows(md, student)
        assert list(rows) == [m["name"] for m in plan.methods]
        for name in ("accuracy", "diagnostics"):
            png = quick_run / f"{name}_{student}.png"
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            assert f"![{name}]({png.name})" in md
    assert "CE+BinaryKL below both" in md and (quick_run / "teacher.pt").is_file()


def test_table_matches_per_run_metrics(quick_run):
    plan = load_plan(quick=True)
    md = (quick_run / "results.md").read_text()
    summary = json.loads((quick_run / "results.json").read_text())
    for student in plan.students:
        rows = _table_rows(md, student)
        for m in plan.methods:
            metrics = load_metrics(quick_run / "runs" / student / slug(m["name"]) / "seed0" / "metrics.jsonl")
            evals = [r for r in metrics if r.get("kind") == "eval"]
            assert [r["epoch"] for r in evals] == list(range(1, plan.epochs + 1))
            main_acc = final_value(evals, "val/acc1_main")
            assert summary["students"][student]["accuracy"][m["name"]][MAIN_COL] == [main_acc]
            cells = rows[m["name"]]
            assert cells[0] == f"{main_acc:.2f}" and cells[-1] == "1"
            if m["config"] == "dhkd.yaml":
                assert cells[1] == f"{final_value(evals, 'val/acc1_aux'):.2f}"
            else:
                assert cells[1] == "–" and "val/acc1_aux" not in evals[-1]


def test_rerun_reuses_finished_runs(quick_run, capsys):
    run = quick_run / "runs" / "mlp" / "ce" / "seed0" / "metrics.jsonl"
    before = run.stat().st_mtime_ns
    assert main(["experiment", "mnist1d", "--quick", "--out", str(quick_run)]) == 0
    assert run.stat().st_mtime_ns == before
    assert "14 already done" in capsys.readouterr().out


def test_diagnostics_hook_logs_head_reports_and_grad_cos(tmp_path, dhkd_cache):  # noqa: F811
    cfg = load_config(CONFIGS / "mnist1d/dhkd.yaml", FAST + ["train.epochs=2", "train.diagnostics=true",
                                                             "train.diagnostics_samples=300"])
    trainer = Trainer(cfg, tmp_path / "d", **QUIET)
    trainer.fit()
    evals = [r for r in load_metrics(tmp_path / "d" / "metrics.jsonl") if r["kind"] == "eval"]
    assert len(evals) == 2
    for row in evals:
        assert {k[len("diag/main/"):] for k in row if k.startswith("diag/main/")} == HEAD_KEYS
        assert {k[len("diag/aux/"):] for k in row if k.startswith("diag/aux/")} == HEAD_KEYS
        assert -1.0 <= row["diag/grad_cos"] <= 1.0
    # the last row is the head report of the final model on the first 300 validation signals
    w = trainer.student.head.weight
    x = torch.cat([x for x, _ in trainer.data.val])[:300]
    y = torch.cat([y for _, y in trainer.data.val])[:300]
    trainer.student.eval()
    with torch.no_grad():
        f, _ = trainer.student.forward_features(x)
    expect = head_report(w, f, y, 10)
    for k, v in expect.items():
        assert evals[-1][f"diag/main/{k}"] == pytest.approx(v, rel=1e-9, abs=1e-12), k
    expect_aux = head_report(trainer.student.aux_head.weight)
    assert evals[-1]["diag/aux/norm_cv"] == pytest.approx(expect_aux["norm_cv"], rel=1e-9)
    train_rows = [r for r in load_metrics(tmp_path / "d" / "metrics.jsonl") if r["kind"] == "train"]
    assert all("grad_cos" in r for r in train_rows)


def test_diagnostics_hook_single_head_and_off(tmp_path, dhkd_cache):  # noqa: F811
    on = load_config(CONFIGS / "mnist1d/ce_binary_kl.yaml", FAST + ["train.epochs=1", "train.diagnostics=true",
                                                                    "train.eval_teacher=false"])
    t_on = Trainer(on, tmp_path / "on", **QUIET)
    row = t_on.fit()
    assert not any(k.startswith("diag/aux/") for k in row)  # one head: no aux report
    assert set(k for k in row if k.startswith("diag/main/")) == {f"diag/main/{k}" for k in HEAD_KEYS}
    assert math.isfinite(row["diag/grad_cos"])
    off = load_config(CONFIGS / "mnist1d/ce_binary_kl.yaml", FAST + ["train.epochs=1", "train.eval_teacher=false"])
    t_off = Trainer(off, tmp_path / "off", **QUIET)
    row_off = t_off.fit()
    assert not any(k.startswith("diag/") for k in row_off)
    # the probe splits the backward in two but trains the same model
    for a, b in zip(t_on.student.parameters(), t_off.student.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    ce = load_config(CONFIGS / "mnist1d/ce.yaml", FAST + ["train.epochs=1", "train.diagnostics=true"])
    row_ce = Trainer(ce, tmp_path / "ce", **QUIET).fit()
    assert "diag/main/nc1" in row_ce and "diag/grad_cos" not in row_ce  # no logit-level loss


def test_verdict_on_known_tables():
    def table(**means):
        return {m.replace("_lin", " (linear aux)"): {MAIN_COL: [v - 1, v + 1]} for m, v in means.items()}

    collapse, dhkd_ok, lines = verdict(table(ce=70, kd=75, binary_kl=72, ce_binary_kl=65, dhkd_lin=76))
    assert collapse and dhkd_ok
    assert re.search(r"minus CE: -5\.00 ± 1\.41 points; minus BinaryKL: -7\.00 ± 1\.41", lines[0])
    assert "best single-head method (kd): +1.00" in lines[1]
    collapse, dhkd_ok, _ = verdict(table(ce=70, kd=75, binary_kl=72, ce_binary_kl=71, dhkd_lin=74))
    assert not collapse and not dhkd_ok


def test_bad_plan_arguments(capsys):
    with pytest.raises(ValueError, match="seeds"):
        load_plan(seeds=0)
    with pytest.raises(SystemExit) as exc:
        main(["experiment", "mnist1d", "--jobs", "0"])
    assert exc.value.code == 2 and "--jobs" in capsys.readouterr().err
    with pytest.raises(ValueError, match="diagnostics_samples"):
        load_config(CONFIGS / "mnist1d/ce.yaml", ["train.diagnostics_samples=0"])


def test_ga_runs_the_alignment_the_results_page_measured(tmp_path):
    """docs/results/mnist1d.md's `dhkd + ga` is the projection at the backbone output (what loss.ga meant
    then); loss.ga=true alone became the official parameter-space GA, so the plan pins ga_space."""
    from dhkd.experiments.mnist1d import student_runs
    plan = load_plan(quick=True)
    runs = [r for r in student_runs(plan, tmp_path, tmp_path / "t.pt") if r[1] == "dhkd + ga"]
    assert runs and all(cfg.loss.ga and cfg.loss.ga_space == "features" for *_, cfg, _ in runs)
    assert all(not cfg.loss.ga for _, name, _, cfg, _ in student_runs(plan, tmp_path, tmp_path / "t.pt")
               if name != "dhkd + ga")
