"""Shared set-up of the trainer tests: a small MNIST-1D teacher trained once per session."""
from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"

FAST = ["train.progress=false", "train.tensorboard=false", "train.device=cpu", "train.log_every=5"]


@pytest.fixture(scope="session")
def dhkd_cache(tmp_path_factory):
    """A DHKD_CACHE holding MNIST-1D and a 3-epoch CNN teacher at the path the mnist1d configs use."""
    import os

    from dhkd.config import load_config
    from dhkd.train import train_teacher
    cache = tmp_path_factory.mktemp("dhkd_cache")
    old = os.environ.get("DHKD_CACHE")
    os.environ["DHKD_CACHE"] = str(cache)
    cfg = load_config(CONFIGS / "mnist1d" / "teacher.yaml", FAST + ["train.epochs=3"])
    train_teacher(cfg, cache / "mnist1d" / "teacher_mnist1d_cnn.pt", log=lambda m: None)
    yield cache
    if old is None:
        os.environ.pop("DHKD_CACHE", None)
    else:
        os.environ["DHKD_CACHE"] = old
