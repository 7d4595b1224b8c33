"""Datasets and loaders: MNIST-1D (generated offline, cached), CIFAR-100 and ImageNet from local files,
synthetic batches.

Every loader has ``set_epoch(e)``, ``len()`` (batches per epoch on this rank) and yields
``(inputs, labels)``; ``Data.prepare`` turns a batch into normalized float inputs on the device
(images travel as uint8 and are normalized there). The data order of epoch ``e`` is a function of
``(seed, e)`` only, and random augmentation of sample ``i`` in epoch ``e`` is seeded from
``(seed, e, i)``, so a resumed run sees exactly the batches an uninterrupted run would, whatever the
number of workers. ``rank``/``world_size`` shard the order like ``DistributedSampler`` (train: the
tail that does not divide evenly is dropped; eval: every sample exactly once, shards may be uneven).

ImageNet (an ImageFolder) has three input backends, ``data.backend``: ``torchvision`` (decode and
augment in DataLoader workers, ``folder.py``), ``gpu-decode`` (workers read bytes, the batch is decoded
and augmented on the training device, ``folder.py``) and ``dali`` (NVIDIA DALI pipelines, ``dali.py``,
whose augmentation is DALI's own: see its docstring). ``images.py`` holds the shared file list, decoding
and transforms; ``fake_images.py`` writes JPEG ImageFolders for tests and ``bench.py`` times the backends.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from ..atomic import atomic_path
from ..config import Config, cache_dir, expand_path

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)


class EpochSampler(torch.utils.data.Sampler):
    """Sample indices of one epoch for one rank.

    shuffle: a permutation drawn from a generator seeded with ``seed * 100003 + epoch``; else 0..n-1.
    Train (``drop_last``): the first ``n // world_size * world_size`` entries, taken ``rank::world_size``.
    Eval: all n entries ``rank::world_size``. With ``with_epoch`` it yields ``(epoch, index)`` pairs for
    ``SeededDataset``.
    """

    def __init__(self, n: int, *, shuffle: bool, seed: int = 0, rank: int = 0, world_size: int = 1,
                 drop_last: bool = True, with_epoch: bool = False):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.n, self.shuffle, self.seed = n, shuffle, seed
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        self.with_epoch = with_epoch
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def indices(self) -> torch.Tensor:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
            order = torch.randperm(self.n, generator=g)
        else:
            order = torch.arange(self.n)
        if self.drop_last:
            order = order[: self.n // self.world_size * self.world_size]
        return order[self.rank::self.world_size]

    def __iter__(self):
        idx = self.indices().tolist()
        if self.with_epoch:
            return iter([(self.epoch, i) for i in idx])
        return iter(idx)

    def __len__(self) -> int:
        if self.drop_last:
            return self.n // self.world_size
        return len(range(self.rank, self.n, self.world_size))


class SeededDataset(torch.utils.data.Dataset):
    """``dataset[i]`` with ``transform`` run under a torch RNG seeded from ``(seed, epoch, i)``.

    Indexed by ``(epoch, i)`` pairs (``EpochSampler(with_epoch=True)``); the caller's RNG is untouched.
    """

    def __init__(self, dataset, transform: Callable, seed: int):
        self.dataset, self.transform, self.seed = dataset, transform, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, i = key
        image, label = self.dataset[i]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(((self.seed * 1_000_003 + epoch) * 10_000_019 + i) % 2**64)
            image = self.transform(image)
        return image, label


class TensorLoader:
    """Mini-batches of in-memory tensors ``x`` (N, ...) and ``y`` (N,) in ``EpochSampler`` order."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, sampler: EpochSampler):
        self.x, self.y, self.batch_size, self.sampler = x, y, batch_size, sampler

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.sampler.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        idx = self.sampler.indices().to(self.x.device)
        for b in range(len(self)):
            sel = idx[b * self.batch_size:(b + 1) * self.batch_size]
            yield self.x[sel], self.y[sel]


class LoaderWithEpoch:
    """A ``DataLoader`` over ``EpochSampler`` with ``set_epoch``."""

    def __init__(self, loader: torch.utils.data.DataLoader, sampler: EpochSampler):
        self.loader, self.sampler = loader, sampler

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        return iter(self.loader)


@dataclass
class Data:
    """Train/val loaders and how to turn their batches into model inputs.

    kind: "image" (uint8 (N, 3, H, W) batches, normalized on the device with ``mean``/``std``) or
    "signal" (float (N, L) batches, used as they are).
    """
    train: object
    val: object
    num_classes: int
    kind: str
    mean: tuple | None = None
    std: tuple | None = None
    num_train: int = 0
    num_val: int = 0
    note: str = ""              # one line for the run log: the input backend and what it guarantees
    classes: list | None = None  # ImageFolder class names, index = label
    _stats: dict = field(default_factory=dict, repr=False)

    def prepare(self, x: torch.Tensor, device: torch.device, channels_last: bool = False) -> torch.Tensor:
        """Move a batch to ``device`` (non-blocking) and normalize: (x/255 - mean)/std for images."""
        x = x.to(device, non_blocking=True)
        if self.kind != "image":
            return x.float()
        key = str(device)
        if key not in self._stats:
            self._stats[key] = (torch.tensor(self.mean, device=device).view(1, -1, 1, 1) * 255.0,
                                torch.tensor(self.std, device=device).view(1, -1, 1, 1) * 255.0)
        mean, std = self._stats[key]
        if channels_last:  # on the uint8 batch, a quarter of the bytes; a no-op for NHWC (DALI) batches
            x = x.contiguous(memory_format=torch.channels_last)
        return (x.float() - mean) / std  # keeps the memory format


# ---------------------------------------------------------------- MNIST-1D

def mnist1d_arrays(num_samples: int = 5000, seed: int = 42, cache: Path | None = None) -> dict:
    """MNIST-1D from ``mnist1d.data.make_dataset`` (no network), cached as an .npz file.

    Returns float32 ``x`` (0.8 n, 40), int64 ``y``, and ``x_test``, ``y_test`` (0.2 n).
    """
    cache = Path(cache) if cache is not None else cache_dir() / "mnist1d"
    path = cache / f"mnist1d_n{num_samples}_seed{seed}.npz"
    if path.is_file():
        with np.load(path) as f:
            return {k: f[k] for k in ("x", "y", "x_test", "y_test")}
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as exc:
        raise ImportError("the MNIST-1D dataset needs the mnist1d package: pip install mnist1d") from exc
    args = get_dataset_args()
    args.num_samples = num_samples
    args.seed = seed
    raw = make_dataset(args)
    arrays = {"x": raw["x"].astype(np.float32), "y": raw["y"].astype(np.int64),
              "x_test": raw["x_test"].astype(np.float32), "y_test": raw["y_test"].astype(np.int64)}
    with atomic_path(path) as tmp, open(tmp, "wb") as f:  # a file object: savez adds no suffix
        np.savez(f, **arrays)
    return arrays


# ---------------------------------------------------------------- builders

def _image_loader(dataset, transform, cfg: Config, *, train: bool, rank: int, world_size: int,
                  device: torch.device) -> LoaderWithEpoch:
    d = cfg.data
    sampler = EpochSampler(len(dataset), shuffle=train, seed=cfg.train.seed, rank=rank,
                           world_size=world_size, drop_last=train, with_epoch=True)
    loader = torch.utils.data.DataLoader(
        SeededDataset(dataset, transform, cfg.train.seed), batch_size=d.batch_size if train else
        (d.eval_batch_size or d.batch_size), sampler=sampler, num_workers=d.workers,
        pin_memory=d.pin_memory and device.type == "cuda", drop_last=train,
        **({"persistent_workers": True, "prefetch_factor": d.prefetch} if d.workers > 0 else {}),
        generator=torch.Generator().manual_seed(cfg.train.seed))  # keeps the global RNG untouched
    return LoaderWithEpoch(loader, sampler)


def _tensor_loader(x, y, cfg: Config, *, train: bool, rank: int, world_size: int) -> TensorLoader:
    d = cfg.data
    sampler = EpochSampler(len(y), shuffle=train, seed=cfg.train.seed, rank=rank,
                           world_size=world_size, drop_last=train)
    return TensorLoader(x, y, d.batch_size if train else (d.eval_batch_size or d.batch_size), sampler)


def _cifar100(cfg: Config, rank: int, world_size: int, device: torch.device, with_train: bool) -> Data:
    from torchvision import datasets, transforms
    root = expand_path(cfg.data.root)
    expected = os.path.join(root, "cifar-100-python")
    if not os.path.isdir(expected):
        raise FileNotFoundError(
            f"CIFAR-100 not found: expected the directory {expected} (the python version of CIFAR-100, "
            f"cifar-100-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html, extracted there). "
            f"dhkd does not download datasets.")
    train_set = datasets.CIFAR100(root, train=True, download=False) if with_train else None
    val_set = datasets.CIFAR100(root, train=False, download=False)
    train_tf = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
                                   transforms.PILToTensor()])
    val_tf = transforms.PILToTensor()
    return Data(_image_loader(train_set, train_tf, cfg, train=True, rank=rank, world_size=world_size,
                              device=device) if with_train else None,
                _image_loader(val_set, val_tf, cfg, train=False, rank=rank, world_size=world_size,
                              device=device),
                100, "image", CIFAR100_MEAN, CIFAR100_STD, len(train_set) if with_train else 0, len(val_set))


def _imagenet(cfg: Config, rank: int, world_size: int, device: torch.device, with_train: bool) -> Data:
    from .images import check_same_classes, image_list
    d = cfg.data
    root = expand_path(d.root)
    for split in ("train", "val") if with_train else ("val",):
        if not os.path.isdir(os.path.join(root, split)):
            raise FileNotFoundError(
                f"ImageNet not found: expected the directory {os.path.join(root, split)} "
                f"(an ImageFolder: one sub-directory of images per class under {root}/train and {root}/val)")
    splits = {"val": image_list(os.path.join(root, "val"))}
    if with_train:
        splits["train"] = image_list(os.path.join(root, "train"))
    for name, files in splits.items():
        if len(files.classes) != cfg.num_classes:
            raise ValueError(f"{root}/{name} has {len(files.classes)} class folders, expected {cfg.num_classes}")
    if with_train:
        check_same_classes(splits["train"], splits["val"])
    loaders = {name: image_loader(files, cfg, train=name == "train", rank=rank, world_size=world_size,
                                  device=device) for name, files in splits.items()}
    return Data(loaders.get("train"), loaders["val"], cfg.num_classes, "image", IMAGENET_MEAN, IMAGENET_STD,
                len(splits["train"]) if with_train else 0, len(splits["val"]),
                note=backend_note(cfg, device), classes=splits["val"].classes)


def image_loader(files, cfg: Config, *, train: bool, rank: int, world_size: int, device: torch.device):
    """The loader of one ImageFolder split (``images.ImageList``) for ``cfg.data.backend``."""
    d = cfg.data
    batch = d.batch_size if train else (d.eval_batch_size or d.batch_size)
    if d.backend == "dali":
        from .dali import DaliLoader
        sampler = EpochSampler(len(files), shuffle=train, seed=cfg.train.seed, rank=rank,
                               world_size=world_size, drop_last=train)
        return DaliLoader(files, sampler, train=train, size=d.image_size, batch_size=batch, threads=d.workers,
                          prefetch=d.prefetch, device=device, seed=cfg.train.seed, rank=rank)
    from .folder import folder_loader
    return folder_loader(files, backend=d.backend, train=train, batch_size=batch, seed=cfg.train.seed,
                         size=d.image_size, rank=rank, world_size=world_size, workers=d.workers,
                         prefetch=d.prefetch, pin_memory=d.pin_memory, device=device,
                         skip=d.bad_images == "skip")


def backend_note(cfg: Config, device: torch.device) -> str:
    d = cfg.data
    where = {"torchvision": f"decode + augment in {d.workers} DataLoader workers",
             "gpu-decode": f"{d.workers} workers read bytes, decode + augment on {device}",
             "dali": f"DALI on {device}, {max(1, d.workers)} threads"}[d.backend]
    if d.backend == "dali":
        from .dali import NOTE
        return f"[dhkd] data: {d.backend} ({where}); {NOTE}"
    return (f"[dhkd] data: {d.backend} ({where}); order f(seed, epoch), augmentation f(seed, epoch, index): "
            f"resume sees the batches of an uninterrupted run; bad images: {d.bad_images}")


def _synthetic(cfg: Config, rank: int, world_size: int, device: torch.device, with_train: bool) -> Data:
    d = cfg.data
    g = torch.Generator().manual_seed(cfg.train.seed + 7)
    shape = list(d.synthetic_shape)
    c = cfg.num_classes

    def make(n):
        if len(shape) == 1:
            x = torch.randn(n, *shape, generator=g)
        else:
            x = torch.randint(0, 256, (n, *shape), generator=g, dtype=torch.uint8)
        return x.to(device), torch.randint(0, c, (n,), generator=g).to(device)

    (xt, yt), (xv, yv) = make(d.synthetic_train_samples), make(d.synthetic_val_samples)
    kind = "signal" if len(shape) == 1 else "image"
    return Data(_tensor_loader(xt, yt, cfg, train=True, rank=rank, world_size=world_size),
                _tensor_loader(xv, yv, cfg, train=False, rank=rank, world_size=world_size),
                c, kind, IMAGENET_MEAN, IMAGENET_STD, len(yt), len(yv))


def _mnist1d(cfg: Config, rank: int, world_size: int, device: torch.device, with_train: bool) -> Data:
    d = cfg.data
    cache = Path(expand_path(d.root)) if d.root else None
    arr = mnist1d_arrays(d.mnist1d_samples, d.mnist1d_seed, cache)
    xt, yt = torch.from_numpy(arr["x"]).to(device), torch.from_numpy(arr["y"]).to(device)
    xv, yv = torch.from_numpy(arr["x_test"]).to(device), torch.from_numpy(arr["y_test"]).to(device)
    return Data(_tensor_loader(xt, yt, cfg, train=True, rank=rank, world_size=world_size),
                _tensor_loader(xv, yv, cfg, train=False, rank=rank, world_size=world_size),
                10, "signal", None, None, len(yt), len(yv))


def _mnist1d100(cfg: Config, rank: int, world_size: int, device: torch.device, with_train: bool) -> Data:
    from ..mnist1d100 import arrays
    d = cfg.data
    arr = arrays(d.mnist1d_samples, d.mnist1d_seed, cache=Path(expand_path(d.root)) if d.root else None)
    xt, yt = torch.from_numpy(arr["x"]).to(device), torch.from_numpy(arr["y"]).to(device)
    xv, yv = torch.from_numpy(arr["x_val"]).to(device), torch.from_numpy(arr["y_val"]).to(device)
    return Data(_tensor_loader(xt, yt, cfg, train=True, rank=rank, world_size=world_size),
                _tensor_loader(xv, yv, cfg, train=False, rank=rank, world_size=world_size),
                100, "signal", None, None, len(yt), len(yv))


def build_data(cfg: Config, *, rank: int = 0, world_size: int = 1, device=None, with_train: bool = True) -> Data:
    """The ``Data`` of ``cfg.data``; FileNotFoundError naming the expected path when files are missing.
    ``with_train=False`` skips the training split of image datasets (evaluation only)."""
    device = torch.device(device or "cpu")
    builders = {"mnist1d": _mnist1d, "mnist1d100": _mnist1d100, "cifar100": _cifar100, "imagenet": _imagenet,
                "synthetic": _synthetic}
    data = builders[cfg.data.dataset](cfg, rank, world_size, device, with_train)
    if data.train is not None and len(data.train) == 0:
        raise ValueError(f"data.batch_size={cfg.data.batch_size} is larger than the {data.num_train} training "
                         f"samples per rank: no full batch")
    return data
