"""DDP under torchrun on CPU (gloo): 2 ranks against one process, exact distributed evaluation, and a
worker killed mid-epoch under ``torchrun --max-restarts 1``.

Three torchrun launches in all (process start-up dominates): one runs several small trainings in the
same 2 processes (``WORKER``), the others run the CLI with a fault injected into rank 1, and with
rank 1 killed by SIGKILL from the test.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dhkd.config import load_config
from dhkd.train import Trainer, evaluate_checkpoint, load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "mnist1d" / "dhkd.yaml"
QUIET = {"log": lambda msg: None}

# Runs in one launch: name -> overrides on top of base(). Global batch 64 everywhere (2 ranks).
RUNS = {
    "plain": ["train.epochs=2"],                                      # DDP's own all-reduce
    "accum": ["train.global_batch=64", "data.batch_size=16"],        # 2 micro-batches: no_sync, then sync
    "ga": ["loss.ga=true", "data.batch_size=16", "train.accum_steps=2"],  # two backward passes
    "kd": ["method=kd", "loss.kd_weight=1.0"],                         # single head: aux head unwrapped
    "head_off": ["loss.logit_weight_off_epoch=2", "train.epochs=2"],   # aux head idle in (1-based) epoch 2
    "synthetic": ["method=ce", "data.dataset=synthetic", "data.synthetic_shape=[40]", "data.num_classes=10",
                  "data.synthetic_train_samples=256", "data.synthetic_val_samples=203"],  # uneven shards
}

WORKER = """
import json, sys
from pathlib import Path
import torch
from dhkd.config import load_config
from dhkd.distributed import destroy_distributed, init_distributed, leave_process
from dhkd.train import Trainer

out, runs = Path(sys.argv[1]), json.loads(Path(sys.argv[2]).read_text())
info = init_distributed("cpu")
for name, overrides in runs.items():
    t = Trainer(load_config(sys.argv[3], overrides), out / name, rank=info.rank, world_size=info.world_size)
    t.fit()
    torch.save(t.student.state_dict(), out / name / f"rank{info.rank}.pt")
destroy_distributed()
leave_process()  # see its docstring: no C++ teardown after DDP
"""


def torchrun(args, *, env_extra=None, timeout=240):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **(env_extra or {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    return log


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    """The 2-rank runs of ``RUNS`` (the first one trains the teacher on rank 0)."""
    tmp = tmp_path_factory.mktemp("ddp")
    data, teacher_yaml = tmp / "data", tmp / "teacher.yaml"
    teacher_yaml.write_text(
        "method: ce\nstudent: {name: mnist1d_cnn}\n"
        f"data: {{dataset: mnist1d, root: '{data}', mnist1d_samples: 1015, batch_size: 64}}\n"
        "optim: {lr: 0.1, base_batch: 64}\nsched: {name: constant}\n"
        "train: {epochs: 1, max_steps_per_epoch: 4, device: cpu, progress: false, tensorboard: false}\n")
    base = [f"data.root={data}", "data.mnist1d_samples=1015", "data.batch_size=32", "data.eval_batch_size=16",
            f"teacher.checkpoint={tmp / 'teacher.pt'}", f"teacher.train_config={teacher_yaml}",
            "train.epochs=1", "train.max_steps_per_epoch=3", "train.device=cpu", "train.progress=false",
            "train.tensorboard=false", "train.log_every=2"]
    runs = {name: base + extra for name, extra in RUNS.items()}
    (tmp / "runs.json").write_text(json.dumps(runs))
    (tmp / "worker.py").write_text(WORKER)
    log = torchrun([str(tmp / "worker.py"), str(tmp), str(tmp / "runs.json"), str(CONFIG)])
    return {"tmp": tmp, "base": base, "runs": runs, "log": log}


def cfg_of(ddp, name, *extra):
    return load_config(CONFIG, ddp["runs"][name] + list(extra))


def ranks(ddp, name):
    return [torch.load(ddp["tmp"] / name / f"rank{r}.pt", weights_only=True) for r in range(2)]


def read_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_close_states(a: dict, b: dict, **tol):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], msg=lambda m: f"{k}: {m}", **tol)


def test_teacher_trained_once_on_rank_0(ddp):
    assert ddp["log"].count("missing: training mnist1d_cnn") == 1
    assert (ddp["tmp"] / "teacher.pt").is_file()


@pytest.mark.parametrize("name", ["plain", "accum", "kd", "head_off", "synthetic"])
def test_two_ranks_equal_one_process_with_the_global_batch(ddp, name, tmp_path):
    """Both ranks end with identical weights, equal (float tolerance) to one process whose batch is the
    global batch (2 x 32): with the rank-strided sampler, step s of one process sees exactly the union
    of the ranks' batches, the mean of the two per-rank means is the mean over the union, and the lr
    is scaled by the same global batch. The MNIST-1D MLP has no BatchNorm nor dropout."""
    r0, r1 = ranks(ddp, name)
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k
    single = Trainer(cfg_of(ddp, name, "data.batch_size=64", "train.global_batch=null"), tmp_path / "single",
                     **QUIET)
    dist_run = load_checkpoint(ddp["tmp"] / name / "last.pt")
    assert single.global_batch == 64  # the 2-rank run's lr was scaled by the same global batch:
    assert dist_run["optimizer"]["param_groups"][0]["initial_lr"] == single.lr
    single.fit()
    assert single.step == dist_run["step"]
    assert_close_states(single.student.state_dict(), r0, rtol=1e-5, atol=1e-6)
    if name == "kd":  # single-head method: the aux head never trains
        init = Trainer(cfg_of(ddp, name, "train.epochs=1"), tmp_path / "init", **QUIET).student.state_dict()
        for k in ("aux_head.weight", "aux_head.bias"):
            assert torch.equal(r0[k], init[k])


def test_gradient_alignment_averages_per_rank_gradients(ddp, tmp_path):
    """GA under DDP (two backward passes per micro-batch, no_sync + one manual all-reduce per step)
    equals averaging, per optimizer step, the gradients each rank computes alone on its own shard with
    accumulation, emulated here in one process with two rank-0/rank-1 trainers."""
    r0, r1 = ranks(ddp, "ga")
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k
    cfg = cfg_of(ddp, "ga")
    ts = [Trainer(cfg, tmp_path / f"emu{r}", rank=r, world_size=2, **QUIET) for r in range(2)]
    assert ts[0].ddp is None and ts[0].global_batch == 64
    for epoch in range(cfg.train.epochs):
        its = []
        for t in ts:
            t.student.train()
            t.data.train.set_epoch(epoch)
            its.append(iter(t.data.train))
        for _ in range(ts[0].steps_per_epoch):
            for t, it in zip(ts, its):
                for _ in range(t.accum):
                    x, y = next(it)
                    t.distiller.train_step(t.data.prepare(x, t.device), y, epoch, scale=1.0 / t.accum)
            for p0, p1 in zip(ts[0].student.parameters(), ts[1].student.parameters()):
                if p0.grad is not None:
                    p0.grad = (p0.grad + p1.grad) / 2
            ts[0].optimizer.step()
            ts[0].scheduler.step()
            for t in ts:
                t.optimizer.zero_grad(set_to_none=True)
            ts[1].student.load_state_dict(ts[0].student.state_dict())
    assert_close_states(ts[0].student.state_dict(), r0, rtol=1e-5, atol=1e-6)
    rows = read_rows(ddp["tmp"] / "ga")
    assert any("grad_cos" in r for r in rows if r["kind"] == "train")


@pytest.mark.parametrize("name,n_val", [("plain", 202), ("synthetic", 203)])
def test_distributed_eval_equals_single_process_exactly(ddp, name, n_val):
    """The eval row of the 2-rank run (shards of 101/101 or 102/101 samples, last batches short) has the
    same correct-counts as evaluating its last.pt in one process."""
    rows = read_rows(ddp["tmp"] / name)
    last = [r for r in rows if r["kind"] == "eval"][-1]
    single = evaluate_checkpoint(cfg_of(ddp, name), ddp["tmp"] / name / "last.pt")
    assert last["val/n"] == single["val/n"] == n_val
    keys = [k for k in single if k.startswith(("val/acc", "val/n")) and k in last]
    assert "val/acc1_main" in keys and "val/acc5_main" in keys
    for k in keys:
        assert last[k] == single[k], k  # equal counts -> equal floats
    assert last["val/loss_ce_main"] == pytest.approx(single["val/loss_ce_main"], rel=1e-6)


def test_killed_worker_restarts_from_last_checkpoint(ddp):
    """torchrun --max-restarts 1 with the CLI and --resume auto: rank 1 exits before optimizer step 5
    (epoch 2 of 2, 3 steps each) in the first launch; torchrun restarts both ranks, which resume from
    epoch 1's last.pt and finish. The result equals the uninterrupted 2-rank run ("plain") exactly."""
    out = ddp["tmp"] / "killed"
    log = torchrun(["--max-restarts", "1", "-m", "dhkd", "train", "--config", str(CONFIG), "--out", str(out),
                    "--resume", "auto", *ddp["runs"]["plain"]], env_extra={"DHKD_FAULT_AT_STEP": "5"})
    assert "DHKD_FAULT_AT_STEP=5: rank 1 exits" in log
    assert "resumed from" in log and "epoch 1, step 3" in log
    ckpt = load_checkpoint(out / "last.pt")
    assert (ckpt["epoch"], ckpt["step"]) == (2, 6)
    rows = read_rows(out)
    assert [r["epoch"] for r in rows if r["kind"] == "eval"] == [1, 2]
    assert not list(out.glob(".*.tmp"))
    straight = torch.load(ddp["tmp"] / "plain" / "rank0.pt", weights_only=True)
    for k, v in ckpt["model"].items():
        assert torch.equal(v, straight[k]), k
    assert set(torch.load(out / "student.pt", weights_only=True)["model"]) == \
        {k for k in straight if not k.startswith("aux_")}


def _workers_of(agent_pid: int) -> dict:
    """{RANK: pid} of the worker processes a torchrun agent started (Linux /proc)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            env = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == agent_pid:
            for item in env:
                if item.startswith(b"RANK="):
                    found[int(item[5:])] = int(entry.name)
    return found


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the workers through /proc")
def test_sigkill_of_a_worker_mid_epoch_restarts_the_job(ddp):
    """SIGKILL from outside (no hook): as soon as epoch 1's eval row is in metrics.jsonl, rank 1 is
    killed in the middle of the long epoch 2; torchrun restarts both ranks, which resume from epoch 1
    and finish; the final checkpoint loads and every epoch is recorded once."""
    import signal
    import time
    out = ddp["tmp"] / "sigkill"
    out.mkdir()
    overrides = ddp["runs"]["synthetic"] + ["train.epochs=2", "train.max_steps_per_epoch=null", "data.batch_size=8",
                                            "data.synthetic_train_samples=16000", "train.log_every=500"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--max-restarts", "1",
           "-m", "dhkd", "train", "--config", str(CONFIG), "--out", str(out), "--resume", "auto", *overrides]
    with open(out / "log.txt", "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            killed, deadline = None, time.monotonic() + 180
            metrics = out / "metrics.jsonl"
            while killed is None and time.monotonic() < deadline and proc.poll() is None:
                if metrics.is_file() and '"kind": "eval"' in metrics.read_text():
                    workers = _workers_of(proc.pid)
                    if 1 in workers:
                        os.kill(workers[1], signal.SIGKILL)
                        killed = workers[1]
                time.sleep(0.01)
            assert killed is not None, "the run ended before epoch 2"
            assert proc.wait(timeout=180) == 0, (out / "log.txt").read_text()[-3000:]
        finally:
            if proc.poll() is None:
                proc.kill()
    text = (out / "log.txt").read_text()
    assert "resumed from" in text and "epoch 1, step" in text
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["epoch"] == 2 and ckpt["step"] == 2 * (16000 // 2 // 8)
    rows = read_rows(out)
    assert [r["epoch"] for r in rows if r["kind"] == "eval"] == [1, 2]
