"""Configs: every shipped file parses and builds; overrides are typed; bad input fails early."""
from __future__ import annotations

import pytest
import torch

from dhkd.cli import main
from dhkd.config import ConfigError, Config, load_config, parse_override
from dhkd.train import Trainer
from tests.trainer_helpers import CONFIGS, FAST, dhkd_cache  # noqa: F401

PLANS = ("mnist1d100/experiment.yaml", "terminal/experiment.yaml")  # experiment plans (load_plan), not run configs
SHIPPED = sorted(p.relative_to(CONFIGS).as_posix() for p in CONFIGS.rglob("*.yaml")
                 if p.relative_to(CONFIGS).as_posix() not in PLANS)


def tiny(path: str) -> list[str]:
    """Overrides that run a shipped image config on a few synthetic samples with a random teacher."""
    if path.startswith("mnist1d/"):
        return ["train.epochs=1", "train.max_steps_per_epoch=2"]
    if path.startswith("mnist1d100/"):  # 1000 signals (data.root: the test's folder), a random teacher
        return ["data.mnist1d_samples=1000", "data.batch_size=50", "teacher.checkpoint=null",
                "teacher.train_config=null", "teacher.random_init=true", "train.epochs=1",
                "train.max_steps_per_epoch=1", "train.eval_teacher=false"]
    size = 32 if path.startswith("cifar100/") else 64
    classes = 100 if path.startswith("cifar100/") else 1000
    return ["data.dataset=synthetic", f"data.num_classes={classes}", f"data.synthetic_shape=[3,{size},{size}]",
            "data.synthetic_train_samples=8", "data.synthetic_val_samples=4", "data.batch_size=4",
            "data.workers=0", "train.global_batch=null", "train.compile=false", "teacher.weights=null",
            "teacher.checkpoint=null", "teacher.random_init=true", "train.epochs=1",
            "train.max_steps_per_epoch=1", "train.eval_teacher=false", "sched.warmup_epochs=0"]


def test_all_expected_configs_ship():
    for m in ("ce", "kd", "binary_kl", "ce_binary_kl", "dhkd"):
        assert f"mnist1d/{m}.yaml" in SHIPPED
    assert "imagenet/r34_r18_dhkd.yaml" in SHIPPED
    assert "imagenet/r34_r18_dhkd_large_batch.yaml" in SHIPPED
    assert "imagenet/r50_mv1_dhkd.yaml" in SHIPPED
    assert len([p for p in SHIPPED if p.startswith("cifar100/")]) >= 10
    assert "mnist1d100/dhkd.yaml" in SHIPPED and (CONFIGS / PLANS[0]).is_file()


@pytest.mark.parametrize("path", SHIPPED)
def test_shipped_config_parses(path):
    cfg = load_config(CONFIGS / path)
    assert isinstance(cfg, Config)
    if path.startswith("cifar100/"):
        assert (cfg.train.epochs, cfg.data.batch_size, cfg.sched.milestones) == (240, 64, [150, 180, 210])
        assert cfg.loss.ga and cfg.student.aux_head == "mlp" and cfg.optim.weight_decay == 5e-4
        small = cfg.student.name in ("MobileNetV2", "ShuffleV1", "ShuffleV2")
        assert cfg.optim.lr == (0.01 if small else 0.05) and cfg.optim.base_batch == 64


@pytest.mark.parametrize("path", [p for p in SHIPPED if not p.startswith("mnist1d/")])
def test_image_config_builds_and_steps(path, tmp_path):
    root = [f"data.root={tmp_path / 'data'}"] if path.startswith("mnist1d100/") else []
    cfg = load_config(CONFIGS / path, FAST + tiny(path) + root)
    trainer = Trainer(cfg, tmp_path, log=lambda m: None)
    assert trainer.optimizer.param_groups and trainer.scheduler is not None
    data = trainer.data
    data.train.set_epoch(0)
    x, y = next(iter(data.train))
    stats = trainer.train_step([(data.prepare(x, trainer.device, trainer.channels_last), y)], 0)
    assert torch.isfinite(stats["loss"])


@pytest.mark.parametrize("path", [p for p in SHIPPED if p.startswith("mnist1d/")])
def test_mnist1d_config_builds(path, tmp_path, dhkd_cache):  # noqa: F811
    cfg = load_config(CONFIGS / path, FAST + tiny(path))
    row = Trainer(cfg, tmp_path, log=lambda m: None).fit()
    assert 0 <= row["val/acc1_main"] <= 100


def test_large_batch_recipe():
    cfg = load_config(CONFIGS / "imagenet/r34_r18_dhkd_large_batch.yaml")
    assert cfg.train.global_batch == 8192 and cfg.sched.warmup_epochs == 5
    assert cfg.optim.lr * cfg.train.global_batch / cfg.optim.base_batch == pytest.approx(3.2)
    lars = load_config(CONFIGS / "imagenet/r34_r18_dhkd_large_batch_lars.yaml")
    assert lars.optim.name == "lars"


def test_overrides_are_typed():
    cfg = load_config(CONFIGS / "mnist1d/dhkd.yaml",
                      ["train.epochs=2", "loss.ga=true", "optim.lr=1", "sched.milestones=[1, 2]",
                       "teacher.weights=null", "method=dhkd"])
    assert cfg.train.epochs == 2 and cfg.loss.ga is True
    assert isinstance(cfg.optim.lr, float) and cfg.sched.milestones == [1, 2]
    assert parse_override("a.b=null") == ("a.b", None)


def test_amp_off_unquoted(tmp_path):
    """YAML 1.1 reads an unquoted ``off`` as False: ``train.amp=off`` and ``amp: off`` still mean "off"."""
    assert load_config(CONFIGS / "mnist1d/dhkd.yaml", ["train.amp=off"]).train.amp == "off"
    f = tmp_path / "c.yaml"
    f.write_text((CONFIGS / "mnist1d/dhkd.yaml").read_text() + "  amp: off\n")
    assert load_config(f).train.amp == "off"
    with pytest.raises(ConfigError, match="train.amp must be one of"):
        load_config(CONFIGS / "mnist1d/dhkd.yaml", ["train.amp=on"])


@pytest.mark.parametrize("override, match", [
    ("train.epoch=2", "unknown config key 'train.epoch'"),
    ("nosection.x=1", "unknown config key 'nosection'"),
    ("train.epochs=two", "train.epochs must be an int"),
    ("train.epochs=2.5", "train.epochs must be an int"),
    ("loss.ga=yes please", "loss.ga must be true or false"),
    ("sched.milestones=5", "sched.milestones must be a list"),
    ("method=kdd", "method must be one of"),
    ("train.epochs", "must look like section.key=value"),
    ("loss.backend=cuda", "loss.backend must be one of"),
    ("optim.lr=-1", "optim.lr must be > 0"),
    ("train.epochs=0", "train.epochs must be > 0"),
])
def test_bad_overrides(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(CONFIGS / "mnist1d/dhkd.yaml", [override])


def test_cross_field_errors():
    with pytest.raises(ConfigError, match="loss.ga=true needs method dhkd"):
        load_config(CONFIGS / "mnist1d/kd.yaml", ["loss.ga=true"])
    with pytest.raises(ConfigError, match="needs a teacher"):
        load_config(CONFIGS / "mnist1d/kd.yaml", ["teacher.name=null"])
    with pytest.raises(ConfigError, match="data.root"):
        load_config(CONFIGS / "cifar100/resnet32x4_resnet8x4_dhkd.yaml", ["data.root=null"])
    with pytest.raises(ConfigError, match="train.global_batch or train.accum_steps, not both"):
        load_config(CONFIGS / "imagenet/r34_r18_dhkd_large_batch.yaml", ["train.accum_steps=4"])


def test_bad_config_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: dhkd\ntrain:\n  epochz: 3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown config key 'train.epochz'"):
        load_config(bad)
    with pytest.raises(FileNotFoundError):
        load_config(tmp_path / "missing.yaml")


def test_cli_rejects_bad_override_before_running(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["train", "--config", str(CONFIGS / "mnist1d/dhkd.yaml"), "--out", str(out), "train.epochz=1"])
    assert rc == 2
    assert "unknown config key 'train.epochz'" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("text, value", [
    ("1e-3", 1e-3), ("1E-3", 1e-3), ("5e4", 5e4), ("+1e-3", 1e-3), ("2.5e-1", 0.25), ("1.0e3", 1e3),
    ("1.e-3", 1e-3), (".5e-1", 0.05), ("5.0e-4", 5e-4), ("0.001", 1e-3), (".5", 0.5), ("3", 3.0),
    ("1_000.5", 1000.5)])
def test_every_float_spelling_is_a_float(text, value, tmp_path):
    """YAML 1.1 reads 1e-3 (no dot) and 1.0e3 (no exponent sign) as strings; overrides and files
    take them as floats."""
    assert load_config(CONFIGS / "mnist1d/dhkd.yaml", [f"optim.lr={text}"]).optim.lr == pytest.approx(value)
    f = tmp_path / "c.yaml"
    f.write_text((CONFIGS / "mnist1d/dhkd.yaml").read_text().replace("  lr: 0.1\n", f"  lr: {text}\n"))
    assert load_config(f).optim.lr == pytest.approx(value)
    f.write_text((CONFIGS / "mnist1d/dhkd.yaml").read_text().replace("  lr: 0.1\n", f"  lr: '{text}'\n"))
    assert load_config(f).optim.lr == pytest.approx(value)  # quoted


def test_config_loader_stays_safe(tmp_path):
    f = tmp_path / "evil.yaml"
    f.write_text("method: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(f)
    assert load_config(CONFIGS / "mnist1d/dhkd.yaml", ["teacher.name='1e3'"]).teacher.name == "1e3"
    for bad in ("'inf'", "'1e-3x'", "nan"):
        with pytest.raises(ConfigError, match="optim.lr"):
            load_config(CONFIGS / "mnist1d/dhkd.yaml", [f"optim.lr={bad}"])


def test_every_config_problem_is_reported_at_once(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: dhkd\nteacher: {name: mnist1d_cnn, random_init: true}\ntrain:\n  epochz: 3\n  epochs: two\n"
                   "optim:\n  lr: -1\n")
    with pytest.raises(ConfigError) as exc:
        load_config(bad, ["data.batch_sise=4", "loss.ga=maybe", "method=kdd"])
    problems = exc.value.problems
    assert len(problems) == 6
    for expected in ("unknown config key 'train.epochz'", "train.epochs must be an int", "optim.lr must be > 0"):
        assert sum(p.startswith(f"{bad}: ") and expected in p for p in problems) == 1, expected
    for expected in ("unknown config key 'data.batch_sise'", "loss.ga must be true or false", "method must be one of"):
        assert sum(p.startswith("command line: ") and expected in p for p in problems) == 1, expected
    assert str(exc.value).startswith("6 problems, nothing was run:\n  - ")


def test_random_init_needs_no_nulls():
    """teacher.random_init=true ignores a configured checkpoint or weights."""
    for path in ("cifar100/resnet32x4_resnet8x4_dhkd.yaml", "imagenet/r34_r18_dhkd.yaml"):
        load_config(CONFIGS / path, ["teacher.random_init=true", "teacher.checkpoint=/x.pt"])


def test_logit_weight_off_epoch_is_checked_as_a_one_based_epoch():
    """0 or a negative value (0 meant 'off from the start' under the former 0-based rule) is refused with
    the 1-based meaning spelled out; an off epoch that leaves a method no loss term within train.epochs
    (binary_kl, or dhkd / ce_binary_kl with only the logit weight) is a config problem, collected."""
    for bad in (0, -3):
        with pytest.raises(ConfigError, match=f"1-based epoch.*>= 1, got {bad}.*0 -> 1"):
            load_config(CONFIGS / "mnist1d/dhkd.yaml", [f"loss.logit_weight_off_epoch={bad}"])
    cfg = load_config(CONFIGS / "mnist1d/dhkd.yaml", ["loss.logit_weight_off_epoch=1"])
    assert cfg.loss.logit_weight_off_epoch == 1
    with pytest.raises(ConfigError, match="method binary_kl has no loss term left from epoch 3 on"):
        load_config(CONFIGS / "mnist1d/binary_kl.yaml", ["train.epochs=5", "loss.logit_weight_off_epoch=3"])
    load_config(CONFIGS / "mnist1d/binary_kl.yaml", ["train.epochs=5", "loss.logit_weight_off_epoch=6"])
    with pytest.raises(ConfigError) as info:
        load_config(CONFIGS / "mnist1d/dhkd.yaml", ["train.epochs=5", "loss.logit_weight_off_epoch=5",
                                                    "loss.ce_weight=0", "train.epochz=1"])
    assert len(info.value.problems) == 2
    assert "loss.ce_weight or loss.kd_weight a weight" in info.value.problems[1]
    load_config(CONFIGS / "mnist1d/dhkd.yaml", ["train.epochs=5", "loss.logit_weight_off_epoch=5",
                                                "loss.ce_weight=0", "loss.kd_weight=1"])
