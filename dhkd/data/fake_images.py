"""Write a small ImageFolder of real JPEG files with ImageNet-like sizes, for tests and the loader benchmark.

    make_jpeg_folder(root, classes=4, train_per_class=16, val_per_class=4)   # root/{train,val}/classNNN/*.JPEG

Images are smooth random colour fields plus pixel noise, saved by PIL at quality 90: about 90 KB for a
500 x 375 image, the commonest ImageNet size (ImageNet's train JPEGs average about 110 KB at roughly
400 x 350). Sizes are drawn from ``SIZES`` (mean about 205 k pixels). Deterministic in ``seed``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

# (width, height), weight: landscape 4:3 dominates ImageNet, then portrait, 3:2, square and larger photos
SIZES = (((500, 375), 0.45), ((375, 500), 0.15), ((500, 333), 0.15), ((500, 500), 0.10), ((640, 480), 0.10),
         ((1024, 768), 0.02), ((400, 300), 0.03))


def _image(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    from PIL import Image
    coarse = rng.integers(0, 256, (height // 16 + 1, width // 16 + 1, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), dtype=np.int16)
    noisy = smooth + rng.integers(-24, 25, (height, width, 3), dtype=np.int16)
    return noisy.clip(0, 255).astype(np.uint8)


def make_jpeg_folder(root, *, classes: int = 4, train_per_class: int = 16, val_per_class: int = 4,
                     seed: int = 0, quality: int = 90, sizes=SIZES) -> dict:
    """Write ``root/train/class{c:03d}/{k}.JPEG`` and ``root/val/...``; returns a summary dict (files,
    mean bytes, mean pixels). An existing folder with the same parameters (``root/fake.json``) is reused."""
    from PIL import Image
    root = Path(root)
    params = {"classes": classes, "train_per_class": train_per_class, "val_per_class": val_per_class,
              "seed": seed, "quality": quality, "sizes": [list(s) + [w] for s, w in sizes]}
    stamp = root / "fake.json"
    if stamp.is_file():
        done = json.loads(stamp.read_text())
        if done.get("params") == params:
            return done["summary"]
    rng = np.random.default_rng(seed)
    choices = [s for s, _ in sizes]
    weights = np.array([w for _, w in sizes], dtype=np.float64)
    weights /= weights.sum()
    nbytes, pixels, files = 0, 0, 0
    for split, per_class in (("train", train_per_class), ("val", val_per_class)):
        for c in range(classes):
            d = root / split / f"class{c:03d}"
            d.mkdir(parents=True, exist_ok=True)
            for k in range(per_class):
                w, h = choices[rng.choice(len(choices), p=weights)]
                path = d / f"{k}.JPEG"
                Image.fromarray(_image(rng, w, h)).save(path, quality=quality)
                nbytes += os.path.getsize(path)
                pixels += w * h
                files += 1
    summary = {"files": files, "mean_kb": nbytes / files / 1024, "mean_kpixels": pixels / files / 1000}
    stamp.write_text(json.dumps({"params": params, "summary": summary}))
    return summary
