"""MNIST-1D-100 (dhkd.mnist1d100): the templates, the splits, the cache, the trainer's loader, the models."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from dhkd import mnist1d100
from dhkd.config import config_from_dict
from dhkd.data import build_data
from dhkd.models import build_student, build_teacher


def test_templates_are_smooth_distinct_and_reproducible():
    tp = mnist1d100.templates()
    x = tp["x"]
    assert x.shape == (100, 12) and tp["y"].tolist() == list(range(100)) and tp["t"].shape == (12,)
    np.testing.assert_array_equal(x, mnist1d100.templates()["x"])
    assert not np.array_equal(x, mnist1d100.templates(seed=1)["x"])
    np.testing.assert_allclose(x[:, 0], 0.0, atol=1e-12)
    np.testing.assert_allclose(x[:, -1], 0.0, atol=1e-12)
    # 6 x = (x_raw - x_raw(0)) / std with x_raw(0) = 0: inside the span of sin(pi j s), j = 1..5, exactly
    s = np.linspace(0, 1, 12)
    basis = np.stack([np.sin(np.pi * j * s) for j in range(1, 6)], 1)
    coef, *_ = np.linalg.lstsq(basis, 6 * x.T, rcond=None)
    np.testing.assert_allclose(basis @ coef, 6 * x.T, atol=1e-10)
    c = x - x.mean(1, keepdims=True)
    corr = (c @ c.T) / np.outer(np.linalg.norm(c, axis=1), np.linalg.norm(c, axis=1))
    np.fill_diagonal(corr, -1)
    assert corr.max() <= mnist1d100.MAX_CORRELATION
    np.testing.assert_allclose((6 * x).std(1), 1.0, rtol=1e-12)


def test_split_sizes():
    assert mnist1d100.split_sizes(20000) == {"train": 120, "val": 30, "test": 50}
    assert mnist1d100.split_sizes(3000) == {"train": 18, "val": 4, "test": 8}
    with pytest.raises(ValueError, match="empty split"):
        mnist1d100.split_sizes(200)


def test_generated_splits_are_balanced_disjoint_and_cached(tmp_path):
    data = mnist1d100.arrays(1000, seed=3, cache=tmp_path)
    sizes = mnist1d100.split_sizes(1000)
    for key, split in (("", "train"), ("_val", "val"), ("_test", "test")):
        x, y = data["x" + key], data["y" + key]
        assert x.dtype == np.float32 and x.shape == (100 * sizes[split], 40) and y.dtype == np.int64
        assert np.bincount(y, minlength=100).tolist() == [sizes[split]] * 100
    rows = {r.tobytes() for k in ("x", "x_val", "x_test") for r in data[k]}
    assert len(rows) == 1000
    files = list(tmp_path.glob("*.npz"))
    assert len(files) == 1
    again = mnist1d100.arrays(1000, seed=3, cache=tmp_path)
    for k in data:
        np.testing.assert_array_equal(data[k], again[k])
    other = mnist1d100.generate(1000, seed=4)
    assert not np.array_equal(other["x"], data["x"])


def test_the_trainer_loads_train_and_val(tmp_path):
    cfg = config_from_dict({"method": "ce", "student": {"name": "mnist1d_bn_cnn"},
                            "data": {"dataset": "mnist1d100", "mnist1d_samples": 1000, "root": str(tmp_path),
                                     "batch_size": 50}, "train": {"device": "cpu"}})
    assert cfg.num_classes == 100
    data = build_data(cfg)
    arr = mnist1d100.arrays(1000, cache=tmp_path)
    assert data.num_classes == 100 and data.kind == "signal"
    assert (data.num_train, data.num_val) == (len(arr["y"]), len(arr["y_val"]))
    val = torch.cat([x for x, _ in data.val])
    np.testing.assert_array_equal(val.numpy(), arr["x_val"])


@pytest.mark.parametrize("name, features", [("mnist1d_bn_cnn", 160), ("mnist1d_bn_cnn_wide", 320)])
def test_batchnorm_cnns(name, features):
    s = build_student(name, num_classes=100)
    assert s.num_features == features
    assert any(isinstance(m, torch.nn.BatchNorm1d) for m in s.backbone.modules())
    x = torch.randn(8, 40)
    f, _ = s.forward_features(x)
    assert f.shape == (8, features) and s(x).shape == (8, 100)
    t = build_teacher(name, num_classes=100)
    assert t(x).shape == (8, 100) and not t.training
