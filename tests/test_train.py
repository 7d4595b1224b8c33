"""Trainer: exact resume, checkpoint errors, missing data, export, metrics, schedules, CLI."""
from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch

from dhkd.cli import main
from dhkd.config import ConfigError, load_config
from dhkd.data import EpochSampler
from dhkd.optim import LARS, LRFactor, build_optimizer
from dhkd.train import CheckpointError, Trainer, load_checkpoint
from tests.trainer_helpers import CONFIGS, FAST, dhkd_cache  # noqa: F401

QUIET = dict(log=lambda m: None)
# MLP aux head: its dropout draws from the RNG, so exact resume needs the RNG state restored.
RUN = FAST + ["student.aux_head=mlp", "train.epochs=2", "train.eval_teacher=false", "train.log_every=100"]


def eval_rows(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "epoch_time_s"} for r in rows if r["kind"] == "eval"]


def cfg(*extra, method="dhkd"):
    return load_config(CONFIGS / f"mnist1d/{method}.yaml", RUN + list(extra))


def test_resume_equals_uninterrupted_run(tmp_path, dhkd_cache):  # noqa: F811
    straight = Trainer(cfg("loss.ga=true"), tmp_path / "a", **QUIET)
    straight.fit()
    Trainer(cfg("loss.ga=true", "train.stop_after_epoch=1"), tmp_path / "b", **QUIET).fit()
    assert load_checkpoint(tmp_path / "b" / "last.pt")["epoch"] == 1
    assert len(eval_rows(tmp_path / "b")) == 1
    resumed = Trainer(cfg("loss.ga=true"), tmp_path / "b", resume=True, **QUIET)
    assert (resumed.epoch, resumed.step) == (1, straight.steps_per_epoch)
    resumed.fit()
    a, b = eval_rows(tmp_path / "a"), eval_rows(tmp_path / "b")
    assert len(a) == 2 and a == b
    for (name, p), q in zip(straight.student.state_dict().items(), resumed.student.state_dict().values()):
        assert torch.equal(p, q), name
    # the run without a restored RNG state would differ: a fresh run with another seed does
    other = Trainer(cfg("loss.ga=true", "train.seed=1"), tmp_path / "c", **QUIET)
    other.fit()
    assert eval_rows(tmp_path / "c") != a


def test_checkpoints_metrics_and_export(tmp_path, dhkd_cache):  # noqa: F811
    out = tmp_path / "run"
    trainer = Trainer(cfg(), out, **QUIET)
    final = trainer.fit()
    assert {p.name for p in out.iterdir()} >= {"last.pt", "best.pt", "student.pt", "metrics.jsonl", "config.yaml"}
    assert not [p for p in out.iterdir() if "tmp" in p.name]
    rows = eval_rows(out)
    assert [r["epoch"] for r in rows] == [1, 2]
    for key in ("val/acc1_main", "val/acc5_main", "val/acc1_aux", "val/acc5_aux", "train/loss"):
        assert key in rows[-1]
    assert all(any("acc" in k for k in r) for r in rows)
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["epoch"] == 2 and ckpt["metrics"]["val/acc1_main"] == final["val/acc1_main"]
    best = load_checkpoint(out / "best.pt")
    assert best["best_acc1"] == max(r["val/acc1_main"] for r in rows)

    exported = trainer.student.export_student()
    assert not [n for n, _ in exported.named_modules() if "aux" in n]
    assert not [k for k in exported.state_dict() if "aux" in k]
    saved = torch.load(out / "student.pt", weights_only=True)["model"]
    assert saved.keys() == exported.state_dict().keys()
    x = torch.randn(7, 40)
    trainer.student.eval()
    torch.testing.assert_close(exported.eval()(x), trainer.student(x))


def test_cli_train_resume_and_eval(tmp_path, dhkd_cache, capsys):  # noqa: F811
    out = tmp_path / "run"
    args = ["--config", str(CONFIGS / "mnist1d/kd.yaml"), "--out", str(out), *RUN[:-1]]
    assert main(["train", *args, "train.stop_after_epoch=1"]) == 0
    assert main(["train", *args, "--resume"]) == 0
    got = capsys.readouterr()
    final = json.loads(got.out.strip().splitlines()[-1])
    assert final["epoch"] == 2
    assert got.err.strip().splitlines()[-1] == (f"[dhkd] wrote {out} (best.pt, config.yaml, last.pt, "
                                                f"metrics.jsonl, student.pt)")
    for ckpt in ("last.pt", "student.pt"):
        assert main(["eval", "--checkpoint", str(out / ckpt), "--config", str(CONFIGS / "mnist1d/kd.yaml"),
                     "train.device=cpu", "student.aux_head=mlp"]) == 0
        got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert got["val/acc1_main"] == pytest.approx(final["val/acc1_main"])
    rc = main(["train", "--config", str(CONFIGS / "mnist1d/kd.yaml"), "--out", str(tmp_path / "none"), "--resume"])
    assert rc == 2 and "no checkpoint" in capsys.readouterr().err


def test_truncated_checkpoint_is_a_clear_error(tmp_path, dhkd_cache):  # noqa: F811
    out = tmp_path / "run"
    Trainer(cfg("train.stop_after_epoch=1"), out, **QUIET).fit()
    data = (out / "last.pt").read_bytes()
    (out / "last.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        Trainer(cfg(), out, resume=True, **QUIET)
    (out / "last.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        Trainer(cfg(), out, resume=True, **QUIET)


def test_older_epoch_checkpoint_is_a_clear_error(tmp_path, dhkd_cache):  # noqa: F811
    out = tmp_path / "run"
    Trainer(cfg("train.stop_after_epoch=1"), out, **QUIET).fit()
    shutil.copy(out / "last.pt", tmp_path / "epoch1.pt")
    Trainer(cfg(), out, resume=True, **QUIET).fit()
    shutil.copy(tmp_path / "epoch1.pt", out / "last.pt")
    with pytest.raises(CheckpointError, match="from epoch 1.*completed epoch 2.*older than the run"):
        Trainer(cfg(), out, resume=True, **QUIET)


def test_checkpoint_of_another_run_or_format(tmp_path, dhkd_cache):  # noqa: F811
    out = tmp_path / "run"
    Trainer(cfg("train.stop_after_epoch=1"), out, **QUIET).fit()
    with pytest.raises(CheckpointError, match="method='dhkd'"):
        Trainer(cfg(method="kd"), out, resume=True, **QUIET)
    ckpt = torch.load(out / "last.pt", weights_only=True)
    ckpt["format_version"] = 0
    torch.save(ckpt, out / "last.pt")
    with pytest.raises(CheckpointError, match="format 0"):
        Trainer(cfg(), out, resume=True, **QUIET)


def test_resume_drops_rows_of_an_interrupted_epoch(tmp_path, dhkd_cache):  # noqa: F811
    out = tmp_path / "run"
    Trainer(cfg("train.stop_after_epoch=1", "train.log_every=5"), out, **QUIET).fit()
    with open(out / "metrics.jsonl", "a") as f:  # a crash mid-epoch 2 left a step row and half a line
        f.write(json.dumps({"kind": "train", "epoch": 2, "step": 99, "loss": 1.0}) + "\n{\"kind\": ")
    Trainer(cfg("train.log_every=5"), out, resume=True, **QUIET).fit()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["step"] != 99 for r in rows) and [r["epoch"] for r in rows if r["kind"] == "eval"] == [1, 2]


def test_crash_between_checkpoint_files_keeps_best_consistent(tmp_path, dhkd_cache, monkeypatch):  # noqa: F811
    """A crash in the middle of an epoch's checkpoint writes never leaves a last.pt whose best accuracy
    is not the one best.pt holds; resuming then finishes with best.pt at the best epoch."""
    import dhkd.train as train_mod
    out = tmp_path / "run"
    Trainer(cfg("train.stop_after_epoch=1"), out, **QUIET).fit()
    trainer = Trainer(cfg(), out, resume=True, **QUIET)
    trainer.best_acc1 = -1.0  # epoch 2 is a new best
    real_replace, calls = os.replace, []

    def crash_on_second(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError("killed")
        real_replace(src, dst)
    monkeypatch.setattr(train_mod.os, "replace", crash_on_second)
    with pytest.raises(OSError, match="killed"):
        trainer.fit()
    monkeypatch.setattr(train_mod.os, "replace", real_replace)
    last, best = load_checkpoint(out / "last.pt"), load_checkpoint(out / "best.pt")
    assert best["metrics"]["val/acc1_main"] == pytest.approx(last["best_acc1"]) or best["epoch"] > last["epoch"]
    Trainer(cfg(), out, resume=True, **QUIET).fit()
    last, best = load_checkpoint(out / "last.pt"), load_checkpoint(out / "best.pt")
    assert best["metrics"]["val/acc1_main"] == pytest.approx(last["best_acc1"])


def test_resume_restores_the_row_of_a_crash_after_the_checkpoint(tmp_path, dhkd_cache, monkeypatch):  # noqa: F811
    """A process that dies after writing last.pt but before its metrics.jsonl row loses no epoch row."""
    from dhkd.train import MetricsLog
    out = tmp_path / "run"
    real_write = MetricsLog.write

    def die_on_eval(self, row):
        if row.get("kind") == "eval":
            raise KeyboardInterrupt
        real_write(self, row)
    monkeypatch.setattr(MetricsLog, "write", die_on_eval)
    with pytest.raises(KeyboardInterrupt):
        Trainer(cfg("train.stop_after_epoch=1"), out, **QUIET).fit()
    monkeypatch.setattr(MetricsLog, "write", real_write)
    assert load_checkpoint(out / "last.pt")["epoch"] == 1 and eval_rows(out) == []
    Trainer(cfg(), out, resume=True, **QUIET).fit()
    assert [r["epoch"] for r in eval_rows(out)] == [1, 2]


@pytest.mark.parametrize("path, expected", [
    ("cifar100/resnet32x4_resnet8x4_dhkd.yaml", "cifar-100-python"),
    ("imagenet/r34_r18_dhkd.yaml", "train"),
])
def test_missing_dataset_dir_is_a_clear_error(path, expected, tmp_path):
    """Reported before anything runs, without a teacher.checkpoint=null besides random_init, and no
    run directory is left behind."""
    root = tmp_path / "nowhere"
    c = load_config(CONFIGS / path, FAST + [f"data.root={root}", "teacher.random_init=true", "train.compile=false"])
    with pytest.raises(ConfigError, match=f"data.root={root}: .* not found: expected the director.*{root}/{expected}"):
        Trainer(c, tmp_path / "run", **QUIET)
    assert not (tmp_path / "run").exists()


def test_missing_teacher_checkpoint_is_a_clear_error(tmp_path):
    c = load_config(CONFIGS / "mnist1d/dhkd.yaml", FAST + [f"teacher.checkpoint={tmp_path}/t.pt",
                                                           "teacher.train_config=null"])
    with pytest.raises(ConfigError, match="teacher.checkpoint: teacher checkpoint not found"):
        Trainer(c, tmp_path / "run", **QUIET)


def test_lr_scaling_warmup_and_schedules():
    c = load_config(CONFIGS / "imagenet/r34_r18_dhkd_large_batch.yaml")
    # Goyal et al.: the warmup starts at the unscaled lr 0.1 (1/32 of 3.2) and reaches 3.2 after 5 epochs
    f = LRFactor(c, steps_per_epoch=10, global_batch=8192)
    assert f(0) == pytest.approx(1 / 32) and f(25) == pytest.approx(1 / 32 + 31 / 32 / 2)
    assert f(49) == pytest.approx(1 / 32 + 31 / 32 * 49 / 50) and f(50) == 1.0
    assert f(299) == 1.0 and f(300) == pytest.approx(0.1) and f(600) == pytest.approx(0.01)
    c.sched.warmup_from_base_lr = False
    f = LRFactor(c, steps_per_epoch=10)
    assert f(0) == pytest.approx(1 / 50) and f(49) == pytest.approx(1.0)
    assert f(299) == 1.0 and f(300) == pytest.approx(0.1) and f(600) == pytest.approx(0.01)
    c.sched.name, c.sched.min_lr_factor = "cosine", 0.0
    f = LRFactor(c, steps_per_epoch=10)
    assert f(50) == pytest.approx(1.0) and f(525) == pytest.approx(0.5) and f(1000) == pytest.approx(0.0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    opt = build_optimizer(model, c, global_batch=8192)
    assert opt.param_groups[0]["lr"] == pytest.approx(3.2)
    c.optim.no_decay_norm_bias = True
    opt = build_optimizer(model, c, global_batch=512)
    assert [g["weight_decay"] for g in opt.param_groups] == [1e-4, 0.0]
    assert [len(g["params"]) for g in opt.param_groups] == [1, 3]
    assert opt.param_groups[0]["lr"] == pytest.approx(0.2)


def test_trainer_warmup_from_base_lr(tmp_path, dhkd_cache):  # noqa: F811
    """The first step runs at optim.lr (the lr at base_batch), the first post-warmup step at the scaled lr."""
    t = Trainer(cfg("optim.lr=0.1", "optim.base_batch=32", "sched.name=constant", "sched.warmup_epochs=1",
                    "sched.warmup_from_base_lr=true", "train.max_steps_per_epoch=4"), tmp_path, **QUIET)
    assert t.lr == pytest.approx(0.4) and t.optimizer.param_groups[0]["lr"] == pytest.approx(0.1)
    assert [t.scheduler.lr_lambdas[0](s) for s in range(5)] == pytest.approx([0.25, 0.4375, 0.625, 0.8125, 1.0])


def test_logged_lr_is_the_lr_the_epoch_trained_with(tmp_path, dhkd_cache):  # noqa: F811
    """With a milestone at epoch 1, epoch 1's rows show the peak lr and epoch 2's the decayed one (the lr
    the logged steps used, not the next step's)."""
    t = Trainer(cfg("sched.name=step", "sched.milestones=[1]", "train.max_steps_per_epoch=3",
                    "train.log_every=3"), tmp_path, **QUIET)
    t.fit()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["kind"], r["epoch"]) for r in rows] == [("train", 1), ("eval", 1), ("train", 2), ("eval", 2)]
    assert [r["lr"] for r in rows] == pytest.approx([t.lr, t.lr, t.lr * 0.1, t.lr * 0.1])


def test_rng_state_touches_only_the_training_gpu(monkeypatch):
    """Checkpoint RNG states hold the CUDA generator of the trainer's device only: the *_all variants
    create a CUDA context on every GPU of the node (from every rank on resume). CUDA calls are faked."""
    from dhkd.train import rng_state, set_rng_state
    calls = []

    def forbidden(*a, **k):
        raise AssertionError("get/set_rng_state_all touches every GPU")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", forbidden)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", forbidden)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda d: calls.append(("get", d)) or torch.tensor([7]))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda t, d: calls.append(("set", int(t[0]), d)))
    assert "cuda" not in rng_state(torch.device("cpu"))
    gpu = torch.device("cuda", 3)
    state = rng_state(gpu)
    set_rng_state(state, gpu)
    set_rng_state({**state, "cuda": [torch.tensor([i]) for i in range(4)]}, gpu)  # an older checkpoint's list
    set_rng_state(state, torch.device("cpu"))
    assert calls == [("get", gpu), ("set", 7, gpu), ("set", 3, gpu)]


def test_resume_with_another_global_batch_rescales_the_lr(tmp_path, dhkd_cache):  # noqa: F811
    """A resumed run whose global batch (e.g. world size) or optim.lr differs trains at this config's
    scaled lr, the one the startup line prints, not the checkpoint's."""
    Trainer(cfg("sched.name=constant", "train.stop_after_epoch=1", "train.max_steps_per_epoch=2"),
            tmp_path, **QUIET).fit()
    t = Trainer(cfg("sched.name=constant", "train.max_steps_per_epoch=2", "train.accum_steps=2"), tmp_path,
                resume=True, **QUIET)
    assert t.global_batch == 256 and t.lr == pytest.approx(0.2)
    assert [g["lr"] for g in t.optimizer.param_groups] == pytest.approx([0.2] * len(t.optimizer.param_groups))
    t.fit()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in rows if r["kind"] == "eval"] == pytest.approx([0.1, 0.2])


def test_lars_step_matches_definition():
    p = torch.nn.Parameter(torch.tensor([3.0, 4.0]))
    p.grad = torch.tensor([0.6, 0.8])
    opt = LARS([p], lr=0.5, momentum=0.0, weight_decay=0.1, eta=0.01)
    opt.step()
    trust = 0.01 * 5.0 / (1.0 + 0.1 * 5.0)
    expected = torch.tensor([3.0, 4.0]) - 0.5 * trust * (torch.tensor([0.6, 0.8]) + 0.1 * torch.tensor([3.0, 4.0]))
    torch.testing.assert_close(p.data, expected)


def test_grad_accumulation_equals_large_batch(tmp_path, dhkd_cache):  # noqa: F811
    """Two micro-batches of 64 with accum_steps=2 give the same step as one batch of 128 (no dropout)."""
    base = FAST + ["train.epochs=1", "train.max_steps_per_epoch=1", "train.eval_teacher=false",
                   "loss.kd_weight=0.5"]
    big = Trainer(load_config(CONFIGS / "mnist1d/dhkd.yaml", base + ["data.batch_size=128"]), tmp_path / "a", **QUIET)
    small = Trainer(load_config(CONFIGS / "mnist1d/dhkd.yaml", base + ["data.batch_size=64", "train.accum_steps=2"]),
                    tmp_path / "b", **QUIET)
    assert big.global_batch == small.global_batch == 128
    big.data.train.set_epoch(0)
    x, y = next(iter(big.data.train))
    s_big = big.train_step([(x, y)], 0)
    s_small = small.train_step([(x[:64], y[:64]), (x[64:], y[64:])], 0)
    torch.testing.assert_close(s_big["loss"], s_small["loss"], rtol=1e-5, atol=1e-6)
    for p, q in zip(big.student.parameters(), small.student.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_epoch_sampler_order_and_shards():
    a = EpochSampler(10, shuffle=True, seed=3)
    a.set_epoch(1)
    first = list(a)
    a.set_epoch(2)
    assert list(a) != first and sorted(first) == list(range(10))
    a.set_epoch(1)
    assert list(a) == first
    shards = [list(EpochSampler(10, shuffle=False, rank=r, world_size=3, drop_last=False)) for r in range(3)]
    assert sorted(sum(shards, [])) == list(range(10))
    train = [EpochSampler(10, shuffle=True, seed=3, rank=r, world_size=3) for r in range(3)]
    assert all(len(list(s)) == 3 == len(s) for s in train)


def test_label_smoothing_loss_value():
    """The logged loss with label smoothing is the smoothed CE itself (constant log C included)."""
    import math as _m
    from dhkd.distill import Distiller
    from dhkd.models import build_student
    c = load_config(CONFIGS / "mnist1d/ce.yaml", FAST + ["loss.label_smoothing=0.3"])
    torch.manual_seed(0)
    s = build_student("mnist1d_mlp", num_classes=10).double()
    d = Distiller(s, None, c.loss, "ce")
    x, y = torch.randn(16, 40, dtype=torch.float64), torch.randint(0, 10, (16,))
    _, out = d.forward_train(x, y)
    z = s(x)
    expected = torch.nn.functional.cross_entropy(z, y, label_smoothing=0.3)
    torch.testing.assert_close(out["loss"], expected, rtol=1e-10, atol=1e-10)
    assert _m.isfinite(float(out["smooth"]))
    assert math.isclose(float(out["smooth"]), float(-torch.log_softmax(z.detach(), 1).mean(1).mean()), rel_tol=1e-9)


def test_demo_one_progress_bar_and_one_teacher_cache(tmp_path, capsys, dhkd_cache, monkeypatch):  # noqa: F811
    """The demo prints its header and the table, nothing else, with one bar over every epoch of every run
    (teacher + 3 students x 2 epochs) on stderr; its teacher lands in the configs' cache, and a second demo
    trains no teacher."""
    from dhkd.experiments.mnist1d import demo_teacher_checkpoint
    assert main(["demo", "--out", str(tmp_path / "demo"), "--epochs", "2", "--seeds", "1"]) == 0
    got = capsys.readouterr()
    lines = [line for line in got.out.splitlines() if line.strip()]
    assert lines[0].startswith("dhkd demo: MNIST-1D") and lines[1].startswith("model")
    for line, expected in zip(lines[2:], ("teacher: 1-D CNN", "student MLP, CE only", "student MLP, KD",
                                         "student MLP, DHKD (main head)", "  DHKD auxiliary head", "runs, checkpoints")):
        assert line.startswith(expected)
    assert len(lines) == 8
    bar = got.err.split("\r")[-1]
    assert "8/8" in bar and "epoch" in bar and "dhkd seed 1/1 (run 4/4)" in bar
    teacher = demo_teacher_checkpoint(2)
    assert teacher == dhkd_cache / "mnist1d" / "teacher_mnist1d_cnn_2ep.pt" and teacher.is_file()
    assert (tmp_path / "demo" / "dhkd_seed0" / "last.pt").is_file()

    def no_teacher_training(*a, **k):
        raise AssertionError("the cached teacher was trained again")
    monkeypatch.setattr("dhkd.train.train_teacher", no_teacher_training)
    assert main(["demo", "--out", str(tmp_path / "again"), "--epochs", "2", "--seeds", "1"]) == 0
    assert "6/6" in capsys.readouterr().err.split("\r")[-1]


def test_demo_and_dhkd_train_use_one_teacher(dhkd_cache):  # noqa: F811
    """``make demo`` (30 epochs) caches its teacher where configs/mnist1d/*.yaml look for theirs, trained
    with the same settings as their teacher.train_config: ``dhkd train`` finds it and trains none."""
    from dhkd.config import expand_path, to_dict
    from dhkd.experiments.mnist1d import demo_config, demo_teacher_checkpoint
    from dhkd.rundir import training_settings
    for method in ("ce", "kd", "binary_kl", "ce_binary_kl", "dhkd"):
        c = load_config(CONFIGS / f"mnist1d/{method}.yaml")
        assert demo_teacher_checkpoint(30) == Path(expand_path(c.teacher.checkpoint))
        trains = load_config(c.teacher.train_config, ["train.device=cpu"])  # what build_teacher_for trains
        assert training_settings(to_dict(demo_config("teacher", 30))) == training_settings(to_dict(trains))
    assert demo_teacher_checkpoint(2) != demo_teacher_checkpoint(30)


def test_resume_feedback_finished_and_extended_runs(tmp_path, dhkd_cache):  # noqa: F811
    def c(*o):
        return cfg("train.max_steps_per_epoch=2", "train.log_every=1", *o)
    out = tmp_path / "run"
    Trainer(c(), out, **QUIET).fit()
    logs = []
    final = Trainer(c(), out, resume=True, log=logs.append).fit()
    assert final["epoch"] == 2 and sum("nothing left to train" in m for m in logs) == 1
    assert not any("lr schedule" in m for m in logs)
    saved_lr = load_checkpoint(out / "last.pt")["optimizer"]["param_groups"][0]["lr"]
    logs = []
    t = Trainer(c("train.epochs=4"), out, resume=True, log=logs.append)
    new_lr = t.optimizer.param_groups[0]["lr"]
    assert new_lr == pytest.approx(t.lr * t.scheduler.lr_lambdas[0](t.step)) and new_lr > saved_lr + 0.01
    lines = [m for m in logs if "lr schedule" in m]
    assert len(lines) == 1 and "train.epochs 2 -> 4" in lines[0]
    assert f"from {saved_lr:.4g} to {new_lr:.4g}" in lines[0]
    assert not any("nothing left" in m for m in logs)
    t.fit()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in rows if r["kind"] == "train" and r["epoch"] == 3][0] == pytest.approx(new_lr)


@pytest.mark.parametrize("method, extra, terms", [
    ("ce", [], {"ce"}), ("kd", [], {"ce", "kd"}), ("binary_kl", [], {"logit"}),
    ("dhkd", ["loss.logit_weight_off_epoch=2"], {"ce", "logit"})])
def test_train_rows_carry_only_the_terms_of_the_loss(method, extra, terms, tmp_path, dhkd_cache):  # noqa: F811
    c = load_config(CONFIGS / f"mnist1d/{method}.yaml", FAST + ["train.epochs=2", "train.max_steps_per_epoch=1",
                                                                "train.eval_teacher=false", *extra])
    Trainer(c, tmp_path, **QUIET).fit()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    assert {k for k in train[0] if k in ("ce", "kd", "logit")} == terms
    assert ("logit_weight" in train[0]) == (method != "kd" and method != "ce")
    if extra:  # the logit weight off from (1-based) epoch 2: no logit term there
        assert "logit" not in train[1] and train[1]["logit_weight"] == 0.0


def test_tensorboard_missing_is_said_once_and_installed_writes(tmp_path, monkeypatch):
    import importlib.util

    from dhkd.rundir import MetricsLog
    logs = []
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    log = MetricsLog(tmp_path / "a", True, True, log=logs.append)
    (tmp_path / "a").mkdir()
    log.write({"kind": "train", "epoch": 1, "step": 1, "loss": 1.0})
    assert len(logs) == 1 and "TensorBoard off: the tensorboard package is not installed" in logs[0]
    monkeypatch.undo()
    pytest.importorskip("tensorboard")
    log = MetricsLog(tmp_path / "b", True, True, log=logs.append)
    (tmp_path / "b").mkdir()
    log.write({"kind": "train", "epoch": 1, "step": 1, "loss": 1.0})
    log.close()
    assert list((tmp_path / "b" / "tb").glob("events.out.tfevents.*")) and len(logs) == 1


def test_tensorboard_ships_with_the_train_extra():
    import re
    setup = (Path(__file__).resolve().parents[1] / "setup.py").read_text()
    train = re.search(r'"train": \[([^\]]*)\]', setup).group(1)
    assert '"tensorboard"' in train


def test_demo_rejects_nonpositive_epochs_before_work(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--out", str(tmp_path / "demo"), "--epochs", "0"])
    assert exc.value.code == 2
    assert "training" not in capsys.readouterr().out
    assert not (tmp_path / "demo").exists()


def test_teacher_weights_download_failure_is_a_clear_error(monkeypatch):
    from urllib.error import URLError

    import dhkd.models as models
    from dhkd.config import load_config
    from dhkd.train import build_teacher_for

    def offline(*args, **kwargs):
        raise URLError("Name or service not known")

    monkeypatch.setattr(models, "build_teacher", offline)
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs/imagenet/r34_r18_dhkd.yaml")
    assert cfg.teacher.weights == "IMAGENET1K_V1" and cfg.teacher.checkpoint is None
    with pytest.raises(FileNotFoundError, match="teacher.weights=IMAGENET1K_V1.*teacher.checkpoint"):
        build_teacher_for(cfg, torch.device("cpu"))


def _image_folder(root, classes=2, per_class=4, size=40):
    from PIL import Image
    g = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for c in range(classes):
            d = root / split / f"class{c}"
            d.mkdir(parents=True)
            for i in range(per_class):
                px = torch.randint(0, 256, (size, size, 3), generator=g, dtype=torch.uint8).numpy()
                Image.fromarray(px).save(d / f"{i}.png")


def test_imagefolder_pipeline_end_to_end(tmp_path):
    _image_folder(tmp_path / "imnet")
    c = load_config(CONFIGS / "imagenet/r34_r18_dhkd.yaml", FAST + [
        f"data.root={tmp_path / 'imnet'}", "data.backend=torchvision", "data.num_classes=2", "data.image_size=32", "data.batch_size=4",
        "data.workers=0", "teacher.weights=null", "teacher.random_init=true", "train.compile=false",
        "train.epochs=2", "student.aux_head=mlp", "loss.ga=true", "loss.logit_weight_off_epoch=2"])
    trainer = Trainer(c, tmp_path / "run", **QUIET)
    assert trainer.channels_last and trainer.data.kind == "image"
    trainer.data.train.set_epoch(0)
    x, y = next(iter(trainer.data.train))
    assert x.dtype == torch.uint8 and x.shape == (4, 3, 32, 32)
    final = trainer.fit()
    assert final["val/n"] == 8 and 0 <= final["val/acc1_main"] <= 100
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["logit_weight"] for r in rows if r["kind"] == "train"] == [0.1, 0.0]


def test_augmentation_is_seeded_per_sample_and_epoch(tmp_path):
    """Random crops/flips depend on (seed, epoch, index) only: equal with 0 or 2 workers, and the
    caller's RNG is untouched."""
    _image_folder(tmp_path / "imnet", per_class=3)
    from dhkd.data import build_data
    batches = {}
    for workers in (0, 2):
        c = load_config(CONFIGS / "imagenet/r34_r18_dhkd.yaml", FAST + [
            f"data.root={tmp_path / 'imnet'}", "data.backend=torchvision", "data.num_classes=2", "data.image_size=16", "data.batch_size=3",
            f"data.workers={workers}", "teacher.weights=null", "teacher.random_init=true"])
        data = build_data(c)
        for epoch in (0, 1):
            data.train.set_epoch(epoch)
            state = torch.get_rng_state()
            batches[workers, epoch] = [x for x, _ in data.train]
            assert torch.equal(state, torch.get_rng_state())
    for epoch in (0, 1):
        assert all(torch.equal(a, b) for a, b in zip(batches[0, epoch], batches[2, epoch]))
    assert not all(torch.equal(a, b) for a, b in zip(batches[0, 0], batches[0, 1]))


@pytest.mark.parametrize("ga", ["false", "true"])
def test_bf16_autocast_on_cpu(tmp_path, dhkd_cache, ga):  # noqa: F811
    c = cfg("train.amp=bf16", f"loss.ga={ga}", "train.epochs=1")
    trainer = Trainer(c, tmp_path, **QUIET)
    final = trainer.fit()
    assert math.isfinite(final["train/loss"]) and final["val/acc1_main"] > 20


def test_eval_of_an_imagefolder_run_needs_only_val(tmp_path):
    _image_folder(tmp_path / "imnet")
    over = FAST + [f"data.root={tmp_path / 'imnet'}", "data.backend=torchvision", "data.num_classes=2", "data.image_size=32", "data.batch_size=4",
                   "data.workers=0", "teacher.weights=null", "teacher.random_init=true", "train.compile=false",
                   "train.epochs=1"]
    c = load_config(CONFIGS / "imagenet/r34_r18_dhkd.yaml", over)
    final = Trainer(c, tmp_path / "run", **QUIET).fit()
    shutil.rmtree(tmp_path / "imnet" / "train")
    from dhkd.train import evaluate_checkpoint
    got = evaluate_checkpoint(c, tmp_path / "run" / "best.pt")
    assert got["val/acc1_main"] == final["val/acc1_main"] and got["val/acc1_aux"] == final["val/acc1_aux"]


def test_teacher_training_waits_for_the_process_training_it(tmp_path, monkeypatch):
    """Two runs needing the same missing teacher: the second waits for the first's lock, then uses the
    checkpoint it wrote instead of training another."""
    import threading
    import time

    from dhkd.rundir import FileLock
    from dhkd.train import train_teacher
    ckpt = tmp_path / "teacher.pt"
    holder = FileLock(tmp_path / ".teacher.pt.lock").acquire()

    def finish():
        time.sleep(0.5)
        torch.save({"model": {}, "val_acc1": 12.5}, ckpt)
        holder.release()
    threading.Thread(target=finish).start()
    monkeypatch.setattr("dhkd.train.Trainer", None)  # training would fail
    logs = []
    row = train_teacher(load_config(CONFIGS / "mnist1d/teacher.yaml"), ckpt, log=logs.append)
    assert row == {"val/acc1_main": 12.5} and logs == [f"[dhkd] waiting for process {os.getpid()}, which is "
                                                       f"training the teacher {ckpt}"]


def test_resume_of_a_checkpoint_from_before_the_one_based_off_epoch_says_so(tmp_path):
    """A last.pt written before the science merge (its loss config has no ga_space) meant a 0-based
    logit_weight_off_epoch and a feature-space loss.ga; resuming it with the same values changes the run
    silently unless told: one line each, none once the config keeps the old meaning or for a new last.pt."""
    from dhkd.rundir import save_checkpoint
    over = ["train.epochs=3", "train.max_steps_per_epoch=1", "teacher.checkpoint=null", "teacher.train_config=null",
            "teacher.random_init=true", "loss.logit_weight_off_epoch=2", "loss.ga=true"]
    out = tmp_path / "run"
    Trainer(cfg(*over, "train.stop_after_epoch=1"), out, **QUIET).fit()

    def notes(*extra):
        logs = []
        Trainer(cfg(*over, *extra), out, resume=True, log=logs.append).run.close()  # the start only
        return [m for m in logs if m.startswith("[dhkd] resume:")]
    assert notes() == []  # written by this version
    ckpt = load_checkpoint(out / "last.pt")
    for key in ("ga_space", "numerics"):  # what a checkpoint of the earlier LossConfig holds
        del ckpt["config"]["loss"][key]
    save_checkpoint(ckpt, out / "last.pt")
    old = notes()
    assert len(old) == 2
    assert "was 0-based" in old[0] and "set loss.logit_weight_off_epoch=3" in old[0]
    assert "set loss.ga_space=features" in old[1]
    assert notes("loss.logit_weight_off_epoch=3", "loss.ga_space=features") == []
