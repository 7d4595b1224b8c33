"""ImageNet input pipeline alone, per backend (``pytest benchmarks/ --benchmark-only -k loader``).

On a generated ImageFolder of real JPEG files with ImageNet-like sizes (``dhkd.data.fake_images``), made
here. extra_info: ``images_per_s`` (the median epoch), ``cpu_ms_per_image`` (CPU of the process and its
workers), ``images_per_s_per_core`` and ``cores_for_target`` (cores the 11,000 img/s H100 step would
need at that cost). ``dhkd bench-data`` prints the same numbers as tables. Nothing here asserts on time.
"""
from __future__ import annotations

import contextlib
import os

import pytest
import torch

from dhkd.data.bench import TARGET, bench_config, cpu_seconds

CLASSES, PER_CLASS, BATCH, SIZE = 4, 32, 32, 224
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

try:
    import nvidia.dali  # noqa: F401
    HAVE_DALI = True
except ImportError:
    HAVE_DALI = False
NEEDS_DALI = pytest.mark.skipif(not HAVE_DALI, reason="NVIDIA DALI is not installed (pip install -e '.[dali]')")


@pytest.fixture(scope="module")
def jpeg_root(tmp_path_factory):
    from dhkd.data.fake_images import make_jpeg_folder
    root = tmp_path_factory.mktemp("bench_jpeg")
    make_jpeg_folder(root, classes=CLASSES, train_per_class=PER_CLASS, val_per_class=1)
    return root


@contextlib.contextmanager
def torch_threads(n):
    old = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("step", ["pil_decode_rrc", "tv_decode_rrc", "read_bytes"])
def test_loader_per_image_cost(benchmark, jpeg_root, step):
    """One thread, CPU ms per image: the former PIL decode + RandomResizedCrop, the torchvision backend's
    torchvision.io decode + uint8 tensor crop, and the file read that is all a gpu-decode worker does."""
    from dhkd.data import bench
    costs = {}

    def run():
        costs.update(bench.per_image_costs(jpeg_root, images=48, image_size=SIZE, rounds=3, steps=[step]))

    benchmark.pedantic(run, rounds=1, iterations=1)
    ms = costs[step]
    benchmark.extra_info.update(step=step, cpu_ms_per_image=ms, images_per_s_per_core=1e3 / ms,
                                cores_for_target=TARGET * ms / 1e3, target=TARGET)


# On a CPU device gpu-decode is the torchvision computation moved into the main process: one row of it
# (workers=0) shows that; with workers it only adds threads competing for the same cores.
LOADERS = [("torchvision", 0), ("torchvision", 2), ("gpu-decode", 0)] + \
    ([("gpu-decode", 2), ("gpu-decode", 8)] if DEVICE == "cuda" else []) + \
    [pytest.param("dali", 1, marks=NEEDS_DALI), pytest.param("dali", 2, marks=NEEDS_DALI)]


@pytest.mark.parametrize("backend,workers", LOADERS)
def test_loader_throughput(benchmark, jpeg_root, backend, workers):
    """Training batches of one backend (workers: DataLoader processes; dali: CPU threads); workers=0 runs
    with one torch thread, i.e. on one core."""
    from dhkd.data import build_data
    cfg = bench_config(jpeg_root, backend, workers=workers, batch_size=BATCH, image_size=SIZE, device=DEVICE,
                       num_classes=CLASSES)
    with torch_threads(1 if workers == 0 else None):
        loader = build_data(cfg, device=torch.device(DEVICE)).train
        state = {"epoch": 0, "cpu": 0.0, "images": 0}

        def epoch():
            state["epoch"] += 1
            loader.set_epoch(state["epoch"])
            c0, n = cpu_seconds(), 0
            for x, _ in loader:
                n += x.shape[0]
            if DEVICE == "cuda":
                torch.cuda.synchronize()
            state["cpu"] += cpu_seconds() - c0
            state["images"] += n

        epoch()  # warm-up: worker start-up
        state.update(cpu=0.0, images=0)
        benchmark.pedantic(epoch, rounds=3, iterations=1)
    per_epoch = len(loader) * BATCH
    cpu_ms = 1e3 * state["cpu"] / state["images"]
    info = dict(backend=backend, workers=workers, device=DEVICE, batch_size=BATCH, image_size=SIZE,
                cpu_ms_per_image=cpu_ms, images_per_s_per_core=1e3 / cpu_ms, cores_for_target=TARGET * cpu_ms / 1e3,
                target=TARGET, cpu_cores=len(os.sched_getaffinity(0)))
    if benchmark.stats is not None:
        info["images_per_s"] = per_epoch / benchmark.stats.stats.median
    benchmark.extra_info.update(info)
