"""Starting a run: every config and path problem at once, before any work (no teacher trained, no
--out left behind), as lines on stderr with exit status 2."""
from __future__ import annotations

import re

import pytest

from dhkd.cli import main
from dhkd.config import ConfigError, load_config
from dhkd.preflight import batch_problem, start_problems, train_set_size
from dhkd.train import Trainer
from tests.trainer_helpers import CONFIGS, FAST


@pytest.fixture(autouse=True)
def data_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("DHKD_CACHE", str(tmp_path_factory.getbasetemp() / "start_cache"))


def run(capsys, *argv):
    rc = main(["train", *map(str, argv)])
    return rc, capsys.readouterr().err.strip().splitlines()


def test_batch_larger_than_the_training_set_stops_before_the_teacher(tmp_path, capsys):
    out, teacher = tmp_path / "run", tmp_path / "t.pt"  # missing: the run would train it first
    rc, err = run(capsys, "--config", CONFIGS / "mnist1d/dhkd.yaml", "--out", out, *FAST,
                  "data.batch_size=5000", f"teacher.checkpoint={teacher}")
    assert rc == 2 and len(err) == 1
    assert "data.batch_size=5000 is larger than the 4000 training samples of mnist1d" in err[0]
    assert not out.exists() and not teacher.exists() and not (tmp_path / "t_run").exists()


def test_batch_problem_counts_processes_and_accumulation():
    cfg = load_config(CONFIGS / "mnist1d/dhkd.yaml", ["data.batch_size=1500"])
    assert train_set_size(cfg) == 4000 and batch_problem(cfg, 4000) is None
    assert "per process (4000 over 3 processes)" in batch_problem(cfg, 4000, world_size=3)
    cfg = load_config(CONFIGS / "mnist1d/dhkd.yaml", ["data.batch_size=1500", "train.accum_steps=3"])
    assert "1500 x 3 accumulation steps" in batch_problem(cfg, 4000)
    cfg = load_config(CONFIGS / "mnist1d/dhkd.yaml", ["data.dataset=synthetic", "data.num_classes=10",
                                                      "data.synthetic_train_samples=10", "data.batch_size=16"])
    assert "larger than the 10 training samples of synthetic" in batch_problem(cfg, train_set_size(cfg))


def test_all_config_and_path_problems_together(tmp_path, capsys):
    out = tmp_path / "a" / "b"
    rc, err = run(capsys, "--config", CONFIGS / "cifar100/resnet32x4_resnet8x4_dhkd.yaml", "--out", out,
                  f"data.root={tmp_path / 'nowhere'}", "train.epochz=3", "optim.lr=1e-3")
    assert rc == 2 and err[0].endswith("3 problems, nothing was run:")
    assert len(err) == 4 and all(line.startswith("  - ") for line in err[1:])
    text = "\n".join(err)
    for expected in ("unknown config key 'train.epochz'", "data.root=", "cifar-100-python",
                     "teacher.checkpoint: teacher checkpoint not found"):
        assert expected in text
    assert not (tmp_path / "a").exists()


def test_missing_teacher_train_config_and_its_own_problems(tmp_path):
    cfg = load_config(CONFIGS / "mnist1d/dhkd.yaml", [f"teacher.checkpoint={tmp_path}/t.pt",
                                                      f"teacher.train_config={tmp_path}/none.yaml"])
    assert any("teacher.train_config: config file not found" in p for p in start_problems(cfg))
    bad = tmp_path / "teacher.yaml"
    bad.write_text((CONFIGS / "mnist1d/teacher.yaml").read_text().replace("epochs: 30", "epochs: 0"))
    cfg.teacher.train_config = str(bad)
    assert any(p.startswith("teacher.train_config:") and "train.epochs must be > 0" in p for p in start_problems(cfg))


def test_a_start_that_fails_later_leaves_no_out(tmp_path):
    """A failure after OUT was created (here an unreadable teacher checkpoint) removes what it made."""
    garbage = tmp_path / "teacher.pt"
    garbage.write_bytes(b"not a checkpoint")
    cfg = load_config(CONFIGS / "mnist1d/dhkd.yaml", FAST + [f"teacher.checkpoint={garbage}"])
    with pytest.raises(ConfigError, match=f"teacher.checkpoint={garbage}: cannot read checkpoint"):
        Trainer(cfg, tmp_path / "x" / "y" / "run", log=lambda m: None)
    assert not (tmp_path / "x").exists()
    existing = tmp_path / "kept"
    existing.mkdir()
    with pytest.raises(ConfigError):
        Trainer(cfg, existing, log=lambda m: None)
    assert existing.is_dir()  # a directory it did not create stays


def test_mnist1d100_sizes_and_classes_are_config_problems(tmp_path, capsys):
    """MNIST-1D-100 (science) under the trainer's collected start-up checks: a wrong data.num_classes,
    too few signals for its three splits, a batch larger than its training split, a data.root that is
    a file; all reported together before anything runs (nothing trained, no --out)."""
    cfg = load_config(CONFIGS / "mnist1d100/dhkd.yaml", ["data.mnist1d_samples=1000"])
    assert train_set_size(cfg) == 600  # 10 per class: 6 train / 2 val / 2 test
    out, teacher, root = tmp_path / "run", tmp_path / "t.pt", tmp_path / "file"
    root.write_text("not a folder")
    rc, err = run(capsys, "--config", CONFIGS / "mnist1d100/dhkd.yaml", "--out", out, *FAST,
                  "data.num_classes=10", "data.batch_size=1000", "data.mnist1d_samples=1000",
                  f"data.root={root}", f"teacher.checkpoint={teacher}")
    text = "\n".join(err)
    assert rc == 2 and err[0].endswith("3 problems, nothing was run:"), text
    for expected in ("data.num_classes=10 but mnist1d100 has 100",
                     "data.batch_size=1000 is larger than the 600 training samples of mnist1d100",
                     "is a file (for mnist1d100 it is the cache directory)"):
        assert expected in text
    assert not out.exists() and not teacher.exists()
    small = load_config(CONFIGS / "mnist1d100/dhkd.yaml", ["data.mnist1d_samples=300"])  # a data-set fact:
    problems = start_problems(small)  # checked with the data set's other sizes, before anything runs
    assert any(re.search("data.mnist1d_samples=300: .*empty split.*at least 400", p) for p in problems)
    assert train_set_size(load_config(CONFIGS / "mnist1d100/dhkd.yaml", ["data.mnist1d_samples=400"])) == 200


def test_a_diverging_run_stops_with_one_line_and_keeps_last_pt(tmp_path, capsys):
    out = tmp_path / "run"
    rc, err = run(capsys, "--config", CONFIGS / "mnist1d/ce.yaml", "--out", out, *FAST, "train.epochs=3",
                  "train.max_steps_per_epoch=3", "train.log_every=1", "optim.lr=1e30")
    assert rc == 2 and len(err) == 1, err
    assert "the training diverged; lower optim.lr" in err[0] and "loss is" in err[0] and str(out) in err[0]


def test_a_bad_image_from_a_dataloader_worker_is_one_line(tmp_path):
    import torch

    from dhkd.cli import _training_error
    from dhkd.data.images import BadImageError

    class Broken(torch.utils.data.Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            raise BadImageError(f"{tmp_path}/n01/x{i}.JPEG: cannot decode image (truncated)")

    with pytest.raises(BadImageError) as info:
        next(iter(torch.utils.data.DataLoader(Broken(), num_workers=1)))
    assert "Traceback" in str(info.value)  # the worker's whole traceback, as torch re-raises it
    for exc in (info.value, BadImageError(f"{tmp_path}/n01/x0.JPEG: cannot decode image (truncated)")):
        line = _training_error(exc, tmp_path / "run")
        assert "\n" not in line and line.startswith(f"bad image {tmp_path}/n01/x0.JPEG: cannot decode image")
        assert "data.bad_images=skip" in line and f"{tmp_path / 'run'}/last.pt" in line
