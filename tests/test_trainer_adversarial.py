"""Adversarial use of the trainer and CLI (issue 19, items 9-16 and the import cycle): a resume with
another batch, empty paths, an --out holding the input config, YAML bombs and duplicate keys, errors
that say where a value came from, values that used to pass and then crash, unreadable checkpoints
under ``dhkd eval``, and Ctrl-C."""
from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from dhkd.cli import main
from dhkd.config import MAX_YAML_NODES, ConfigError, load_config
from dhkd.train import Trainer
from tests.trainer_helpers import CONFIGS, FAST

QUIET = dict(log=lambda m: None)
CE = CONFIGS / "mnist1d" / "ce.yaml"
SHORT = FAST + ["train.eval_teacher=false", "train.log_every=100"]


@pytest.fixture(autouse=True)
def data_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("DHKD_CACHE", str(tmp_path_factory.getbasetemp() / "adversarial_cache"))


def train(capsys, *argv):
    rc = main(["train", *map(str, argv)])
    return rc, capsys.readouterr().err.strip().splitlines()


# ---------------------------------------------------------------- 9. schedule position on resume

@pytest.mark.parametrize("change", ["data.batch_size=256", "train.accum_steps=2", "train.max_steps_per_epoch=10"])
def test_resume_with_other_steps_per_epoch_keeps_the_schedule_position_in_epochs(tmp_path, change):
    """1 epoch of 31 steps at batch 128, then a resume whose epochs have fewer steps (another batch,
    accumulation or world size), with a step milestone at (0-based) epoch 2: the second epoch still
    trains before the milestone (the restored step count used to be read in the new steps per epoch:
    31 steps / 15 per epoch = epoch 2, past the milestone)."""
    base = SHORT + ["sched.name=step", "sched.milestones=[2]", "sched.gamma=0.1", "train.epochs=3"]
    Trainer(load_config(CE, base + ["train.stop_after_epoch=1"]), tmp_path, **QUIET).fit()
    t = Trainer(load_config(CE, base + [change]), tmp_path, resume=True, **QUIET)
    assert t.steps_per_epoch < 31
    assert t.scheduler.last_epoch == t.steps_per_epoch  # one epoch done, in this run's steps
    assert [g["lr"] for g in t.optimizer.param_groups] == pytest.approx([t.lr] * len(t.optimizer.param_groups))
    t.fit()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in rows if r["kind"] == "eval"]
    assert lrs[1] == pytest.approx(t.lr) and lrs[2] == pytest.approx(0.1 * t.lr)


# ---------------------------------------------------------------- 10. empty paths

@pytest.mark.parametrize("value", ["", "   "])
def test_empty_out_is_a_usage_error(tmp_path, monkeypatch, capsys, value):
    """``--out ""`` (an unset $OUT) used to train into the current directory."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1}\n')
    with pytest.raises(SystemExit) as exc:
        main(["train", "--config", str(CE), "--out", value, *SHORT])
    assert exc.value.code == 2
    assert "--out: expected a path" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]
    assert (tmp_path / "metrics.jsonl").read_text() == '{"epoch": 1}\n'
    with pytest.raises(SystemExit):
        main(["eval", "--checkpoint", "", "--config", str(CE)])


# ---------------------------------------------------------------- 11. the input is never overwritten

def test_a_fresh_run_never_overwrites_its_input_config(tmp_path, capsys):
    out = tmp_path / "x"
    out.mkdir()
    mine = out / "config.yaml"
    text = "# my notes\n" + CE.read_text()
    mine.write_text(text)
    rc, err = train(capsys, "--config", mine, "--out", out, *SHORT)
    assert rc == 2 and len(err) == 1 and "which a fresh run replaces" in err[0], err
    assert mine.read_text() == text
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml"]


def test_resuming_with_the_runs_own_config_is_fine(tmp_path):
    from dhkd.preflight import start_problems
    out = tmp_path / "x"
    out.mkdir()
    (out / "config.yaml").write_text(CE.read_text())
    cfg = load_config(out / "config.yaml", SHORT)
    refused = [p for p in start_problems(cfg, out) if "fresh run replaces" in p]
    assert len(refused) == 1
    assert [p for p in start_problems(cfg, out, resume="auto") if "fresh run replaces" in p] == refused
    (out / "last.pt").write_bytes(b"")  # resume (or auto with a checkpoint) writes no config.yaml
    for resume in (True, "auto"):
        assert not [p for p in start_problems(cfg, out, resume=resume) if "fresh run replaces" in p]


# ---------------------------------------------------------------- 12. YAML hazards

BOMB = "".join(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9) if i else ', '.join(['lol'] * 9)}]\n"
               for i in range(9))


def test_an_alias_bomb_is_refused_in_one_line(tmp_path, capsys):
    path = tmp_path / "bomb.yaml"
    path.write_text(BOMB + CE.read_text().replace("  epochs: 30", "  epochs: *l8"))
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert str(exc.value).startswith(f"{path}: not valid YAML: aliases expand the document past {MAX_YAML_NODES}")
    assert "\n" not in str(exc.value) and len(str(exc.value)) < 300
    rc, err = train(capsys, "--config", path, "--out", tmp_path / "run", *SHORT)
    assert rc == 2 and len(err) == 1


def test_errors_never_print_unbounded_values(tmp_path):
    """An alias below the bound, expanded into a typed key: the message shows a bounded repr."""
    path = tmp_path / "big.yaml"
    path.write_text("x: &a [" + ", ".join(["lol"] * 60) + "]\ny: &b [" + ", ".join(["*a"] * 60) + "]\n" +
                    CE.read_text().replace("  lr: 0.1", "  lr: *b"))
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert any("optim.lr must be a number, got [['lol'," in p for p in exc.value.problems), exc.value.problems
    assert all(len(p) < 400 for p in exc.value.problems), [len(p) for p in exc.value.problems]


def test_a_duplicate_key_is_refused(tmp_path, capsys):
    path = tmp_path / "dup.yaml"
    path.write_text(CE.read_text() + "train:\n  epochs: 1\n")
    with pytest.raises(ConfigError, match=r"dup.yaml: not valid YAML: duplicate key 'train' at line \d+ "
                                          r"\(first at line \d+\)"):
        load_config(path)
    rc, err = train(capsys, "--config", path, "--out", tmp_path / "run", *SHORT)
    assert rc == 2 and len(err) == 1 and "duplicate key 'train'" in err[0]
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- 13. where a value came from

def test_a_bad_override_is_blamed_on_the_command_line(tmp_path, capsys):
    rc, err = train(capsys, "--config", CE, "--out", tmp_path / "run", *SHORT, "train.epochs=two")
    assert rc == 2 and len(err) == 1
    assert err[0] == "dhkd train: error: command line: train.epochs must be an int, got 'two'"
    problems = []
    load_config(CE, ["data.batch_size=0"], partial=problems)
    assert problems == ["command line: data.batch_size must be > 0, got 0"]
    bad = tmp_path / "bad.yaml"
    bad.write_text(CE.read_text().replace("batch_size: 128", "batch_size: 0"))
    problems = []
    load_config(bad, partial=problems)
    assert problems == [f"{bad}: data.batch_size must be > 0, got 0"], problems


# ---------------------------------------------------------------- 14. values refused up front

@pytest.mark.parametrize("override, words", [
    ("data.batch_size=0", "command line: data.batch_size must be > 0, got 0"),
    ("train.global_batch=256 data.batch_size=0", "data.batch_size must be > 0"),
    (f"train.seed={2**70}", "train.seed must be an int in [0, 2**32 - 1]"),
    ("train.seed=-3", "train.seed must be an int in [0, 2**32 - 1]"),
    ("data.mnist1d_seed=-1", "data.mnist1d_seed must be an int in [0, 2**32 - 1]"),
    ("train.device=cuda:-1", "train.device must be auto, cpu, cuda or cuda:N"),
    ("train.device=cuda:abc", "train.device must be auto, cpu, cuda or cuda:N"),
])
def test_values_that_used_to_crash_are_refused_in_one_line(tmp_path, capsys, override, words):
    out = tmp_path / "run"
    rc, err = train(capsys, "--config", CE, "--out", out, *SHORT, *override.split())
    assert rc == 2 and len(err) == 1 and words in err[0], err
    assert not out.exists()


def test_the_largest_seed_trains(tmp_path):
    t = Trainer(load_config(CE, SHORT + [f"train.seed={2**32 - 1}", "train.epochs=1",
                                         "train.max_steps_per_epoch=1"]), tmp_path, **QUIET)
    t.fit()
    assert (tmp_path / "last.pt").is_file()


def test_triton_without_cuda_or_interpreter_is_refused_up_front(tmp_path, capsys, monkeypatch):
    import torch
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        pytest.skip("a CUDA machine runs the triton backend")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    out = tmp_path / "run"
    rc, err = train(capsys, "--config", CE, "--out", out, *SHORT, "loss.backend=triton")
    assert rc == 2 and len(err) == 1 and err[0].startswith("dhkd train: error: loss.backend=triton runs on CUDA")
    assert not out.exists()


# ---------------------------------------------------------------- 15. eval of an unreadable checkpoint

@pytest.mark.parametrize("content", [b"", b"not a zip", None])
def test_eval_of_an_unreadable_checkpoint_is_one_line(tmp_path, capsys, content):
    ckpt = tmp_path / "last.pt"
    if content is not None:
        ckpt.write_bytes(content)
    rc = main(["eval", "--checkpoint", str(ckpt), "--config", str(CE), "train.device=cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    if content is None:
        assert "not found" in err[0]
    else:
        assert err[0].startswith(f"dhkd eval: error: cannot read checkpoint {ckpt} (truncated or corrupt file?)")


# ---------------------------------------------------------------- 16. Ctrl-C

def test_ctrl_c_mid_epoch_is_one_line_and_exit_130(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    real = Trainer.train_step
    calls = []

    def interrupted(self, batches, epoch):
        calls.append(epoch)
        if epoch == 1 and len([e for e in calls if e == 1]) == 2:
            raise KeyboardInterrupt
        return real(self, batches, epoch)

    monkeypatch.setattr(Trainer, "train_step", interrupted)
    args = ["--config", CE, "--out", out, *SHORT, "train.epochs=2", "train.max_steps_per_epoch=3"]
    rc, err = train(capsys, *args)
    assert rc == 130 and len(err) == 1, err
    assert err[0].startswith(f"dhkd train: interrupted; {out / 'last.pt'} keeps the last finished epoch: "
                             f"resume with dhkd train --config {CE} --out {out} --resume")
    monkeypatch.setattr(Trainer, "train_step", real)
    rc, err = train(capsys, *args, "--resume")  # the lock was released; resume goes on from epoch 1
    assert rc == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows if r["kind"] == "eval"] == [1, 2]


def test_ctrl_c_before_the_first_checkpoint(tmp_path, capsys, monkeypatch):
    def interrupted(self, batches, epoch):
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "train_step", interrupted)
    rc, err = train(capsys, "--config", CE, "--out", tmp_path / "run", *SHORT)
    assert rc == 130 and len(err) == 1 and "no checkpoint" in err[0], err


# ---------------------------------------------------------------- House: no import cycle

def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            names.add("." * node.level + (node.module or ""))
            names.update("." * node.level + a.name for a in node.names if node.module is None)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


def test_config_and_the_data_sets_do_not_import_each_other():
    root = CONFIGS.parent / "dhkd"
    config, mnist1d100 = _imports(root / "config.py"), _imports(root / "mnist1d100.py")
    assert not any("mnist1d100" in n for n in config), config
    assert not any(n.endswith("config") for n in mnist1d100), mnist1d100
    assert not any(n.startswith(".") and n not in (".paths", ".atomic") for n in _imports(root / "paths.py") | mnist1d100)
