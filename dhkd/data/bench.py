"""Throughput of the ImageNet input pipeline alone (no model), per backend: ``dhkd bench-data`` and
``pytest benchmarks/ --benchmark-only -k loader``.

- ``per_image_costs``: CPU milliseconds per image, one thread, of the steps a pipeline pays for on the
  CPU: reading the file (all a gpu-decode worker does) and drawing its crop, PIL decode, the former PIL
  decode + RandomResizedCrop + flip + PILToTensor, torchvision.io decode, and the torchvision backend's
  decode + uint8 tensor crop.
- ``loader_throughput``: images/s of one backend's training loader over whole epochs after a warm-up
  epoch (which starts the persistent workers; DALI's per-epoch pipeline build stays in every timed
  epoch), and the CPU seconds the process and its DataLoader workers spent per image (``/proc``; Linux),
  so img/s per core and the cores a given rate needs follow without assuming the cores were free.
"""
from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

import torch

TARGET = 11_000  # img/s of the ResNet-34 -> ResNet-18 DHKD step on an H100 (issue 14)


def _clk() -> int:
    return os.sysconf("SC_CLK_TCK")


def cpu_seconds() -> float:
    """User + system CPU seconds of this process (all threads) and of its live child processes."""
    t = os.times()
    total = t.user + t.system
    me = str(os.getpid())
    try:
        names = os.listdir("/proc")
    except OSError:  # pragma: no cover - not Linux
        return total
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        if fields[1].decode() == me:  # fields: state ppid ... utime(12) stime(13) from after the name
            total += (int(fields[11]) + int(fields[12])) / _clk()
    return total


def bench_config(root, backend: str, *, workers: int, batch_size: int, image_size: int, device: str,
                 num_classes: int, prefetch: int = 2):
    from ..config import config_from_dict
    return config_from_dict({
        "method": "ce", "student": {"name": "resnet18"},
        "data": {"dataset": "imagenet", "root": str(root), "num_classes": num_classes, "backend": backend,
                 "workers": workers, "batch_size": batch_size, "image_size": image_size, "prefetch": prefetch},
        "train": {"device": device, "seed": 0}})


def loader_throughput(root, backend: str, *, workers: int = 2, batch_size: int = 64, image_size: int = 224,
                      device: str = "cpu", epochs: int = 3, threads: int | None = None) -> dict:
    """Time ``epochs`` training epochs of ``backend`` on the ImageFolder ``root`` (see the module doc).

    threads: torch intra-op threads of this process while timing (``None``: unchanged). With workers=0
    and threads=1 the whole pipeline runs on one core.
    """
    from ..data import build_data
    from .images import image_list
    n_classes = len(image_list(os.path.join(root, "train")).classes)
    cfg = bench_config(root, backend, workers=workers, batch_size=batch_size, image_size=image_size,
                       device=device, num_classes=n_classes)
    dev = torch.device(device)
    old = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        data = build_data(cfg, device=dev, with_train=True)
        loader = data.train
        per_epoch = []
        images, wall, cpu = 0, 0.0, 0.0
        for epoch in range(epochs + 1):  # epoch 0 warms up (worker start-up, first pipeline build)
            loader.set_epoch(epoch)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            t0, c0, n = time.perf_counter(), cpu_seconds(), 0
            for x, _ in loader:
                n += x.shape[0]
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            dt, dc = time.perf_counter() - t0, cpu_seconds() - c0
            if epoch:
                per_epoch.append(n / dt)
                images, wall, cpu = images + n, wall + dt, cpu + dc
        del loader, data
    finally:
        torch.set_num_threads(old)
    per_core = images / cpu if cpu > 0 else float("nan")
    return {"backend": backend, "workers": workers, "device": device, "batch_size": batch_size,
            "image_size": image_size, "images": images, "images_per_s": images / wall,
            "images_per_s_median_epoch": statistics.median(per_epoch), "cpu_ms_per_image": 1e3 * cpu / images,
            "images_per_s_per_core": per_core, "cores_for_target": TARGET / per_core, "target": TARGET}


def per_image_costs(root, *, images: int = 64, image_size: int = 224, rounds: int = 3, steps=None) -> dict:
    """Median (over ``rounds``) CPU ms per image, one thread, of each step (all, or those named in
    ``steps``) on ``images`` train files."""
    import io

    from PIL import Image
    from torchvision import transforms as T
    from torchvision.transforms.v2.functional import pil_to_tensor

    from .images import apply_train, decode, image_list, read_bytes, seeded_params
    paths = [p for p, _ in image_list(os.path.join(root, "train")).samples][:images]
    raws = [Path(p).read_bytes() for p in paths]
    datas = [torch.frombuffer(bytearray(r), dtype=torch.uint8) for r in raws]
    pil_tf = T.Compose([T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(), T.PILToTensor()])

    def pil_decode(k):
        with Image.open(io.BytesIO(raws[k])) as im:
            return im.convert("RGB")

    sizes = [decode(d, p).shape[-2:] for d, p in zip(datas, paths)]
    table = {
        "read_bytes": lambda k: read_bytes(paths[k]),  # what a gpu-decode worker does (page-cached file)
        "crop_params": lambda k: seeded_params(torch.empty(0, *sizes[k]), k),
        "pil_decode": pil_decode,
        "pil_decode_rrc": lambda k: pil_tf(pil_decode(k)),
        "pil_decode_to_tensor": lambda k: pil_to_tensor(pil_decode(k)),
        "tv_decode": lambda k: decode(datas[k], paths[k]),
        "tv_decode_rrc": lambda k: apply_train(img := decode(datas[k], paths[k]), seeded_params(img, k),
                                               image_size),
    }
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    out = {}
    try:
        for name, fn in table.items():
            if steps is not None and name not in steps:
                continue
            fn(0)  # warm-up
            times = []
            for _ in range(rounds):
                t0 = time.process_time()
                for k in range(len(paths)):
                    fn(k)
                times.append((time.process_time() - t0) / len(paths))
            out[name] = 1e3 * statistics.median(times)
    finally:
        torch.set_num_threads(old)
    return out


def machine_line() -> str:
    import platform

    import torchvision
    from .images import cpu_count
    try:
        import PIL
        pil = PIL.__version__
    except ImportError:  # pragma: no cover
        pil = "-"
    try:
        import nvidia.dali as dali
        dali_v = dali.__version__
    except ImportError:
        dali_v = "not installed"
    try:
        load = "%.2f %.2f %.2f" % os.getloadavg()
    except OSError:  # pragma: no cover
        load = "?"
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{platform.processor() or platform.machine()}, {cpu_count()} CPU cores usable, load average {load}, "
            f"{gpu}; torch {torch.__version__}, torchvision {torchvision.__version__}, Pillow {pil}, "
            f"DALI {dali_v}; {time.strftime('%Y-%m-%d')}")


def run_bench_data(*, root=None, backends=("torchvision", "gpu-decode", "dali"), workers=(0, 2),
                   batch_size: int = 32, image_size: int = 224, device: str = "cpu", epochs: int = 3,
                   images: int = 384, json_path=None, log=print) -> list[dict]:
    """``dhkd bench-data``: per-image costs, then each (backend, workers) loader; prints Markdown tables.

    Without ``root`` a generated JPEG ImageFolder of ``images`` train files (4 classes) is written once
    under ``{cache}/bench-jpeg``. DALI is skipped when it is not installed. On a CPU device gpu-decode
    measures the same computation as torchvision with workers=0 (it is a GPU backend).
    """
    import json

    from ..config import cache_dir
    from .dali import available as dali_available
    from .fake_images import make_jpeg_folder
    if root is None:
        per_class = max(1, images // 4)
        root = cache_dir() / f"bench-jpeg-{per_class}"
        summary = make_jpeg_folder(root, classes=4, train_per_class=per_class, val_per_class=1)
        log(f"generated JPEG ImageFolder {root}: {summary['files']} files, {summary['mean_kb']:.0f} KB and "
            f"{summary['mean_kpixels']:.0f} k pixels on average")
    log(f"machine: {machine_line()}")
    costs = per_image_costs(root, image_size=image_size)
    log("\n| step (one thread) | CPU ms / image | img/s per core |\n|---|---|---|")
    for name, ms in costs.items():
        log(f"| {name} | {ms:.2f} | {1e3 / ms:.0f} |")
    rows = []
    log(f"\n| backend | workers | device | img/s | CPU ms / image | img/s per core | cores for {TARGET:,} img/s |"
        "\n|---|---|---|---|---|---|---|")
    for backend in backends:
        if backend == "dali" and not dali_available():
            log("| dali | - | - | skipped: NVIDIA DALI is not installed | | | |")
            continue
        for w in workers:
            if backend == "dali" and w == 0:
                w = 1  # DALI needs at least one thread
            one_thread = w == 0 or (backend == "gpu-decode" and device == "cpu")  # decode in this process
            r = loader_throughput(root, backend, workers=w, batch_size=batch_size, image_size=image_size,
                                  device=device, epochs=epochs, threads=1 if one_thread else None)
            rows.append(r)
            log(f"| {backend} | {w} | {device} | {r['images_per_s']:.0f} | {r['cpu_ms_per_image']:.2f} | "
                f"{r['images_per_s_per_core']:.0f} | {r['cores_for_target']:.1f} |")
    if json_path is not None:
        Path(json_path).write_text(json.dumps({"machine": machine_line(), "per_image_ms": costs, "loaders": rows},
                                              indent=1))
    return rows
