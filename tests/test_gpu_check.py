"""benchmarks/gpu_check.py on CPU: the compile/time plan fits its budget, the staged pipeline runs end
to end at toy sizes (Triton interpreter), a stage forced to crash leaves the other stages' results,
and the report renders the GPU section from the combined JSON."""
from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(*args, timeout=900):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_plan_only_fits_the_budget(tmp_path):
    """Distinct Triton compiles per stage, counted as the JIT specializes them for sm_90 (meta tensors,
    a stand-in driver, a cache hook that skips the compile): the correctness stage stays within
    MAX_CORRECTNESS_COMPILES (34) and every stage's estimated time within its budget, the total within 6
    minutes."""
    proc = _run("--plan-only", "--out", str(tmp_path), timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
    plan = json.loads((tmp_path / "plan.json").read_text())
    mod = _module()
    assert plan["correctness"]["compiles"] <= mod.MAX_CORRECTNESS_COMPILES == 34
    assert plan["headline"]["compiles"] > 5 and plan["train"]["compiles"] >= 5
    assert plan["headline"]["mandatory_s"] <= mod.BUDGET_S["headline"]
    assert sum(mod.BUDGET_S.values()) <= mod.TOTAL_BUDGET_S == 370.0
    assert "imagenet-r18" in plan["headline"]["compile_shapes"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU run is the script itself")
def test_stages_are_independent_a_crash_keeps_the_others(tmp_path):
    """The whole pipeline at toy sizes with the correctness stage forced to abort part-way: the
    headline and training stages finish and keep their files, the correctness stage keeps the checks
    it had written, the combined report says it crashed, and the run exits 1."""
    proc = _run("--smoke-cpu", "--out", str(tmp_path), "--crash-stage", "correctness")
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    combined = json.loads((tmp_path / "gpu_check.json").read_text())
    stages = combined["stages"]
    assert stages["headline"]["status"] == "done"
    rows = stages["headline"]["rows"]
    assert rows and all("ms" in v for v in rows[0]["cells"].values()), rows
    assert {"gemm floor", "torch path", "torch.compile(reference)"} <= set(rows[0]["cells"])
    assert any(k.startswith("fused resident/") for k in rows[0]["cells"])
    assert stages["correctness"]["status"].startswith("crashed")
    assert 1 <= len(stages["correctness"]["checks"]) and all(c["ok"] for c in stages["correctness"]["checks"])
    assert stages["train"]["status"] == "done"
    for name in ("headline", "correctness", "train"):
        assert (tmp_path / f"stage_{name}.json").exists() and (tmp_path / f"stage_{name}.md").exists()
    assert not list(tmp_path.glob("*.tmp"))
    md = (tmp_path / "gpu_check.md").read_text()
    assert "crashed" in md and "Checks:" in md
    # the report renders the docs section from it, and replaces a marked section in a document
    doc = tmp_path / "doc.md"
    doc.write_text("before\n<!-- gpu-check:start -->\nold\n<!-- gpu-check:end -->\nafter\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    rep = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "report.py"), str(tmp_path / "gpu_check.json"),
                          "--out", str(tmp_path / "r"), "--update-doc", str(doc)], capture_output=True, text=True,
                         env=env, timeout=300)
    assert rep.returncode == 0, rep.stderr
    section = (tmp_path / "r" / "gpu_section.md").read_text()
    assert "Measured on" in section and "torch 2." in section and "× floor" in section
    text = doc.read_text()
    assert text.startswith("before\n") and text.endswith("after\n") and "old" not in text and "Measured on" in text


def test_stage_timeouts_fit_one_device_call():
    """Every stage's kill timeout (budget + grace) plus start-up stays within one device call."""
    gc = _module()
    assert gc.WORST_CASE_S == sum(gc.BUDGET_S.values()) + gc.GRACE_S * len(gc.STAGES) + 15.0
    assert gc.WORST_CASE_S <= 540.0


def test_bad_arguments_are_refused():
    mod = _module()
    with pytest.raises(SystemExit, match="unknown stage"):
        mod.parse_args(["--stages", "headline,trian"])
    with pytest.raises(SystemExit) as exc:
        mod.parse_args(["--help"])
    assert exc.value.code == 0


def test_peak_extra_memory_excludes_inputs_and_gradients():
    """Extra memory = peak during one step beyond what is live before it and beyond the gradients it
    leaves; the previous step's gradients are freed first (else they would be subtracted twice)."""
    mod = _module()
    grads_b, transient_b = 700, 300

    class Mem:
        live, high = 1000, 1000

        @classmethod
        def alloc(cls, b):
            cls.live += b
            cls.high = max(cls.high, cls.live)

        sync = staticmethod(lambda: None)
        allocated = classmethod(lambda cls: cls.live)
        peak = classmethod(lambda cls: cls.high)

        @classmethod
        def reset_peak(cls):
            cls.high = cls.live

    state = {"grads": False}

    def clear():
        if state["grads"]:
            Mem.alloc(-grads_b)
            state["grads"] = False

    def step():
        clear()
        Mem.alloc(transient_b)
        Mem.alloc(grads_b)
        Mem.alloc(-transient_b)
        state["grads"] = True

    step()
    assert mod.peak_extra_bytes(step, clear, grads_b, mem=Mem) == transient_b


def test_stage_markdown_marks_skips_and_errors():
    mod = _module()
    d = dict(stage="headline", env=dict(date="d", gpu="g", driver="1", torch="t", triton="tr", cuda="c"),
             status="done", budget_s=150, wall_s=10, compiles=3, compile_s=4.0, checks=[], peers=["none"],
             rows=[dict(shape="a", N=1, D=2, C=3, dtype="bf16",
                        cells={"fused resident/triton": dict(ms=0.5, extra_mib=12.0),
                               "gemm floor": dict(error="skipped: time budget")}),
                   dict(shape="b", N=4, D=5, C=6, dtype="bf16", cells={}, skipped="time budget")])
    md = mod.stage_markdown(d)
    assert "0.500 (12)" in md and "skipped: time budget" in md and "3 Triton compiles" in md
