"""examples/causal_lm_dhkd.py runs (fewer steps than its default) and its distillation loss falls; its
--vocab-parallel form runs under torchrun with two CPU ranks."""
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


def test_causal_lm_example_with_the_vocabulary_sharded_over_two_ranks():
    from tests.test_distributed import free_port
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(free_port()), str(ROOT / "examples" / "causal_lm_dhkd.py"),
                           "--vocab-parallel", "--steps", "12", "--teacher-steps", "4"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    out = proc.stdout
    assert "sharded over 2 ranks: [128, 128]" in out and "held-out next-token CE" in out
    diff = float(out.split("(difference ")[1].split(")")[0])
    assert diff <= 1e-5, out
    assert "replicated student parameters identical on every rank: True" in out
