"""MNIST-1D with 100 classes, generated offline by the ``mnist1d`` package from 100 smooth templates.

Templates (length 12, like the package's ten digit templates): for class k, with s = 0, 1/11, ..., 1,

    x_k(s) = sum_{j=1..5} c_kj sin(pi j s),   c_kj ~ N(0, 1/j^2)  (numpy default_rng(template_seed))

(smooth, 0 at both ends), whitened as the package whitens its digits (mean 0, std 1, shifted to start
at 0, divided by 6). Draws are taken in order and one whose Pearson correlation with an accepted
template exceeds 0.8 is rejected, so no two classes share a shape up to scale (a template and its
negative are different shapes). ``mnist1d.data.make_dataset``
then makes ``samples / 100`` signals per class with the package's default transformations (padding,
shear, scale, translation, correlated and iid noise; final length 40) under its ``seed``, and
normalizes the whole set to mean 0, std 1.

Splits, per class in the generated order: the first 60% train, the next 15% val, the last 25% test
(e.g. 200 per class: 120 / 30 / 50). Cached as one ``.npz`` under ``cache_dir()/mnist1d100`` (atomic
write), keyed by (samples, seed, template_seed).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .atomic import atomic_path
from .paths import cache_dir

NUM_CLASSES = 100
TEMPLATE_LEN = 12
SPLITS = (("train", 0.60), ("val", 0.15), ("test", 0.25))
MAX_CORRELATION = 0.8


def templates(num_classes: int = NUM_CLASSES, seed: int = 0, harmonics: int = 5,
              max_correlation: float = MAX_CORRELATION) -> dict:
    """``{"x": (C, 12) templates, "t": (12,) time grid, "y": (C,) labels}`` in ``make_dataset``'s format."""
    rng = np.random.default_rng(seed)
    s = np.linspace(0.0, 1.0, TEMPLATE_LEN)
    basis = np.stack([np.sin(np.pi * j * s) for j in range(1, harmonics + 1)])  # (harmonics, 12)
    scale = 1.0 / np.arange(1, harmonics + 1)
    accepted: list[np.ndarray] = []
    for _ in range(1000 * num_classes):
        if len(accepted) == num_classes:
            break
        x = (rng.normal(size=harmonics) * scale) @ basis
        x = (x - x.mean()) / x.std()
        if accepted:
            centred = np.stack(accepted) - np.stack(accepted).mean(1, keepdims=True)
            corr = centred @ (x - x.mean()) / (np.linalg.norm(centred, axis=1) * np.linalg.norm(x - x.mean()))
            if corr.max() > max_correlation:
                continue
        accepted.append(x - x[0])
    else:
        raise RuntimeError(f"could not draw {num_classes} templates with correlation <= {max_correlation}")
    return {"x": np.stack(accepted) / 6.0, "t": np.linspace(-5, 5, TEMPLATE_LEN) / 6.0,
            "y": np.arange(num_classes)}


def split_sizes(samples: int, num_classes: int = NUM_CLASSES) -> dict:
    """Signals per class in each split: ``{"train": n, "val": n, "test": n}``."""
    per_class = samples // num_classes
    train = int(round(SPLITS[0][1] * per_class))
    val = int(round(SPLITS[1][1] * per_class))
    if per_class < 3 or min(train, val, per_class - train - val) < 1:
        raise ValueError(f"{samples} signals for {num_classes} classes leave an empty split")
    return {"train": train, "val": val, "test": per_class - train - val}


def generate(samples: int, seed: int = 42, template_seed: int = 0, num_classes: int = NUM_CLASSES) -> dict:
    """Float32 ``x``, ``x_val``, ``x_test`` (n, 40) and int64 ``y``, ``y_val``, ``y_test`` (not cached)."""
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as exc:
        raise ImportError("the MNIST-1D dataset needs the mnist1d package: pip install mnist1d") from exc
    sizes = split_sizes(samples, num_classes)
    per_class = sum(sizes.values())
    args = get_dataset_args()
    args.num_samples = per_class * num_classes
    args.train_split = 1.0
    args.seed = seed
    raw = make_dataset(args, templates(num_classes, template_seed))
    x, y = raw["x"].astype(np.float32), raw["y"].astype(np.int64)
    out = {}
    for c in range(num_classes):
        idx = np.flatnonzero(y == c)
        start = 0
        for name, _ in SPLITS:
            part = idx[start:start + sizes[name]]
            out.setdefault(name, []).append(part)
            start += sizes[name]
    arrays = {}
    for name, key in (("train", ""), ("val", "_val"), ("test", "_test")):
        idx = np.sort(np.concatenate(out[name]))
        arrays["x" + key], arrays["y" + key] = x[idx], y[idx]
    return arrays


def arrays(samples: int, seed: int = 42, template_seed: int = 0, cache: Path | None = None) -> dict:
    """``generate``'s arrays, from the cache when present (written atomically on first use)."""
    cache = Path(cache) if cache is not None else cache_dir() / "mnist1d100"
    path = cache / f"mnist1d100_n{samples}_seed{seed}_t{template_seed}.npz"
    keys = ("x", "y", "x_val", "y_val", "x_test", "y_test")
    if path.is_file():
        with np.load(path) as f:
            return {k: f[k] for k in keys}
    data = generate(samples, seed, template_seed)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **data)
    return data
