"""Data and models of ``dhkd experiment terminal``; nothing is downloaded.

``digits``: scikit-learn's bundled ``load_digits`` (1,797 8x8 images, 10 classes, shipped inside the
package). Per class, in a fixed permutation (numpy ``default_rng(seed)``): 60% train, 15% val, the rest
test; pixels / 16, then standardized with the training split's per-pixel mean and std (std 0 -> 1).
``mnist1d100``: ``dhkd.mnist1d100.arrays`` (100-class MNIST-1D, generated, cached).
``student_subset`` picks the students' per-class share of a split (the plan's ``student_per_class`` and
``eval_per_class``).

Models (``spec`` of the plan): ``mlp`` = Linear(in, w)-ReLU-Linear(w, w)-ReLU features (N, w);
``bn_cnn`` = ``dhkd.models.mnist1d.MNIST1DBNCNN`` features (channels x 5). Students are
``DualHeadStudent``s on those features (a linear main head, a linear or MLP aux head); a teacher is
the same with a CE-trained main head.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ...config import ConfigError


def digits(seed: int = 0) -> dict:
    """Float32 ``x``/``x_val``/``x_test`` (n, 64) and int64 ``y``/``y_val``/``y_test``."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise ImportError("the digits data needs scikit-learn: pip install scikit-learn") from exc
    raw = load_digits()
    x, y = raw.data.astype(np.float32) / 16.0, raw.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    parts = {"train": [], "val": [], "test": []}
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(y == c))
        n_tr, n_va = int(round(0.6 * len(idx))), int(round(0.15 * len(idx)))
        parts["train"].append(idx[:n_tr])
        parts["val"].append(idx[n_tr:n_tr + n_va])
        parts["test"].append(idx[n_tr + n_va:])
    out = {}
    for name, key in (("train", ""), ("val", "_val"), ("test", "_test")):
        idx = np.sort(np.concatenate(parts[name]))
        out["x" + key], out["y" + key] = x[idx], y[idx]
    mean, std = out["x"].mean(0), out["x"].std(0)
    std[std == 0] = 1.0
    for key in ("x", "x_val", "x_test"):
        out[key] = ((out[key] - mean) / std).astype(np.float32)
    return out


def load(data: dict) -> tuple[dict, int]:
    """(arrays, number of classes) of a dataset entry's ``data:`` mapping."""
    if data["name"] == "digits":
        return digits(int(data.get("seed", 0))), 10
    from ...mnist1d100 import NUM_CLASSES, arrays
    return arrays(int(data.get("samples", 20000)), int(data.get("seed", 42))), NUM_CLASSES


def backbone(spec: dict, in_dim: int) -> tuple[nn.Module, int]:
    """(backbone returning features (N, d), d) of a model spec."""
    kind = spec.get("model")
    if kind == "mlp":
        w = int(spec.get("width", 64))
        return nn.Sequential(nn.Linear(in_dim, w), nn.ReLU(), nn.Linear(w, w), nn.ReLU()), w
    if kind == "bn_cnn":
        from ...models.mnist1d import MNIST1DBNCNN
        m = MNIST1DBNCNN(num_classes=2, channels=int(spec.get("channels", 32)), stem=int(spec.get("stem", 0)),
                         length=in_dim)
        m.fc = nn.Identity()
        return m, m.num_features
    raise ConfigError(f"model must be mlp or bn_cnn, got {kind!r}")


def build_student(spec: dict, in_dim: int, num_classes: int, aux_head: str = "linear"):
    """A ``DualHeadStudent`` on ``backbone(spec)`` (both heads always built, so that seeds pair)."""
    from ...models.student import DualHeadStudent
    net, d = backbone(spec, in_dim)
    return DualHeadStudent(net, d, num_classes, aux_head=aux_head)


def student_subset(y: np.ndarray, per_class: int) -> np.ndarray:
    """Sorted indices of the first ``per_class`` training samples of every class (in the split's order):
    the students' training set when the teacher trains on the whole split (``student_per_class``)."""
    keep = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        if len(idx) < per_class:
            raise ConfigError(f"student_per_class {per_class} > the {len(idx)} training samples of class {c}")
        keep.append(idx[:per_class])
    return np.sort(np.concatenate(keep))


def tensors(arrays: dict) -> dict:
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}
