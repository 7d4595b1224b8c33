"""examples/causal_lm_dhkd.py runs (fewer steps than its default) and its distillation loss falls."""
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_causal_lm_example_runs_and_the_loss_falls():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "causal_lm_dhkd.py"), "--steps", "60",
                           "--teacher-steps", "40"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "distillation loss: first" in proc.stdout and "held-out next-token CE" in proc.stdout
