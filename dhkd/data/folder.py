"""The ``torchvision`` and ``gpu-decode`` ImageFolder backends (``data.backend``).

Both iterate an ``EpochSampler`` through a ``DataLoader`` whose workers get ``(epoch, i)`` keys:

- ``torchvision``: a worker reads, decodes (``torchvision.io``, PIL for other formats) and augments
  sample i on the CPU, under a torch RNG seeded from ``(seed, epoch, i)``; the loader pins the uint8 batch.
- ``gpu-decode``: a worker only reads the file's bytes. The batch is decoded on the training device
  (``torchvision.io.decode_jpeg(..., device="cuda")``, nvJPEG, batched; other formats on the CPU) and
  cropped, resized and flipped there with the same per-sample parameters, drawn from the same seeded
  stream. On a CPU device this is the torchvision backend's computation moved out of the workers, so the
  two give identical batches (tested). On CUDA the next batch is decoded on a side stream by a
  background thread while the current one trains.

Unreadable files: ``bad_images="error"`` raises ``BadImageError`` naming the file; ``"skip"`` puts a copy
of the next good sample of the same batch in its place (batch shapes stay fixed, the result is still a
function of (seed, epoch)), logs the file once and counts it in ``loader.skipped``.
"""
from __future__ import annotations

import contextlib
import queue
import sys
import threading

import torch

from .images import (BadImageError, ImageList, apply_train, decode, is_jpeg, read_bytes, sample_seed,
                     seeded_params, val_transform)

MAX_LOGGED = 100  # skipped files named one by one; past that only the per-epoch count


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class FileDataset(torch.utils.data.Dataset):
    """Sample ``(epoch, i)`` of an ``ImageList``: ``(uint8 (3, size, size), label, i)`` when ``decode``,
    ``(uint8 file bytes, label, i)`` otherwise; a bad file gives ``(None, label, i, reason)`` with
    ``skip`` and raises ``BadImageError`` without."""

    def __init__(self, files: ImageList, *, train: bool, size: int, seed: int, decode: bool, skip: bool):
        self.files, self.train, self.size, self.seed = files, train, size, seed
        self.decode, self.skip = decode, skip

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, key):
        epoch, i = key
        path, label = self.files.samples[i]
        try:
            data = read_bytes(path)
            if not self.decode:
                return data, label, i
            img = decode(data, path)
            if self.train:
                img = apply_train(img, seeded_params(img, sample_seed(self.seed, epoch, i)), self.size)
            else:
                img = val_transform(img, self.size)
            return img, label, i
        except BadImageError as exc:
            if not self.skip:
                raise
            return None, label, i, str(exc)


def replace_bad(items: list) -> tuple[list, list]:
    """Put a copy of the next good item (cyclically) in place of each bad one; (items, [(i, reason)])."""
    bad = [(it[2], it[3]) for it in items if it[0] is None]
    if not bad:
        return items, []
    good = [k for k, it in enumerate(items) if it[0] is not None]
    if not good:
        raise BadImageError(f"every file of a batch is unreadable: {bad[0][1]} (and {len(bad) - 1} more)")
    out = []
    for k, it in enumerate(items):
        if it[0] is None:
            j = next((g for g in good if g > k), good[0])
            it = items[j][:3]
        out.append(it[:3])
    return out, bad


def collate_images(items: list):
    items, bad = replace_bad(items)
    x = torch.stack([it[0] for it in items])
    y = torch.tensor([it[1] for it in items], dtype=torch.int64)
    return x, y, bad


def collate_bytes(items: list):
    """Bytes stay a list (one tensor per file); a file that could not even be read is replaced here."""
    items, bad = replace_bad(items)
    return ([it[0] for it in items], torch.tensor([it[1] for it in items], dtype=torch.int64),
            [it[2] for it in items], bad)


class GpuDecoder:
    """Decode a batch of file bytes on ``device`` and augment it there (see the module docstring)."""

    def __init__(self, files: ImageList, *, train: bool, size: int, seed: int, device: torch.device,
                 skip: bool):
        self.files, self.train, self.size, self.seed = files, train, size, seed
        self.device, self.skip = torch.device(device), skip

    def _decode_one(self, data: torch.Tensor, path: str) -> torch.Tensor:
        if self.device.type == "cuda" and is_jpeg(data):
            from torchvision.io import ImageReadMode, decode_jpeg
            try:
                return decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device)
            except RuntimeError:
                pass  # e.g. a JPEG nvJPEG does not take: the CPU decoder below decides
        return decode(data, path).to(self.device, non_blocking=True)

    def decode_batch(self, datas: list, indices: list) -> tuple[list, dict]:
        """uint8 (3, H, W) per file on the device, and {position: reason} of the bad files (``None`` in
        the list; only with ``skip``, else BadImageError naming the file)."""
        out = [None] * len(datas)
        jpeg = [k for k, d in enumerate(datas) if is_jpeg(d)] if self.device.type == "cuda" else []
        if jpeg:
            from torchvision.io import ImageReadMode, decode_jpeg
            try:
                for k, img in zip(jpeg, decode_jpeg([datas[k] for k in jpeg], mode=ImageReadMode.RGB,
                                                    device=self.device)):
                    out[k] = img
            except RuntimeError:
                out = [None] * len(datas)  # one bad file fails the batched call: decode one by one
        bad = {}
        for k in range(len(datas)):
            if out[k] is None:
                try:
                    out[k] = self._decode_one(datas[k], self.files.samples[indices[k]][0])
                except BadImageError as exc:
                    if not self.skip:
                        raise
                    bad[k] = str(exc)
        return out, bad

    def __call__(self, datas: list, labels: torch.Tensor, indices: list, epoch: int):
        imgs, bad = self.decode_batch(datas, indices)
        if bad:
            items, _ = replace_bad([(im, int(labels[k]), indices[k], bad.get(k)) for k, im in enumerate(imgs)])
            imgs, labels = [it[0] for it in items], torch.tensor([it[1] for it in items], dtype=torch.int64)
            bad_list = [(indices[k], reason) for k, reason in bad.items()]
            indices = [it[2] for it in items]
        else:
            bad_list = []
        out = torch.empty(len(imgs), 3, self.size, self.size, dtype=torch.uint8, device=self.device)
        for k, (img, i) in enumerate(zip(imgs, indices)):
            if self.train:
                out[k] = apply_train(img, seeded_params(img, sample_seed(self.seed, epoch, i)), self.size)
            else:
                out[k] = val_transform(img, self.size)
        return out, labels, bad_list


class FolderLoader:
    """``set_epoch``, ``len`` and ``(uint8 images, int64 labels)`` batches of one ImageFolder split.

    ``loader`` is a DataLoader over ``sampler``; ``finish`` (gpu-decode) turns its byte batches into
    images. ``skipped`` maps the path of each file skipped so far to its reason.
    """

    def __init__(self, loader, sampler, files: ImageList, *, finish=None, threaded: bool = False,
                 prefetch: int = 2, device=None):
        self.loader, self.sampler, self.files, self.finish = loader, sampler, files, finish
        self.threaded, self.prefetch = threaded, max(1, prefetch)
        self.device = torch.device(device or "cpu")
        self.skipped: dict = {}
        self.skipped_this_epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.loader)

    def _note(self, bad: list) -> None:
        for i, reason in bad:
            self.skipped_this_epoch += 1
            path = self.files.samples[i][0]
            if path not in self.skipped:
                self.skipped[path] = reason
                if len(self.skipped) <= MAX_LOGGED:
                    _log(f"[dhkd] data: skipped an unreadable image (data.bad_images=skip), "
                         f"{len(self.skipped)} distinct so far: {reason}")

    def _batches(self):
        epoch = self.sampler.epoch
        for batch in self.loader:
            if self.finish is None:
                x, y, bad = batch
            else:
                datas, labels, indices, bad = batch
                x, y, bad2 = self.finish(datas, labels, indices, epoch)
                bad = bad + bad2
            yield x, y, bad

    def _threaded(self):
        """``_batches`` run ``prefetch`` batches ahead in a thread, on a side CUDA stream when on CUDA."""
        q: queue.Queue = queue.Queue(self.prefetch)
        stop = threading.Event()
        cuda = self.device.type == "cuda"
        stream = torch.cuda.Stream(self.device) if cuda else None

        def put(item) -> bool:
            while not stop.is_set():  # the consumer may have stopped early (max_steps_per_epoch)
                try:
                    q.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def produce():
            try:
                with torch.cuda.stream(stream) if cuda else contextlib.nullcontext():
                    for x, y, bad in self._batches():
                        event = None
                        if cuda:
                            event = torch.cuda.Event()
                            event.record(stream)
                        if not put((x, y, bad, event)):
                            return
                put(None)
            except BaseException as exc:  # noqa: BLE001 - handed to the consumer
                put(exc)

        thread = threading.Thread(target=produce, daemon=True, name="dhkd-gpu-decode")
        thread.start()
        try:
            while True:
                item = q.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                x, y, bad, event = item
                if event is not None:
                    current = torch.cuda.current_stream(self.device)
                    current.wait_event(event)
                    x.record_stream(current)
                yield x, y, bad
        finally:
            stop.set()
            thread.join()

    def __iter__(self):
        self.skipped_this_epoch = 0
        before = len(self.skipped)
        for x, y, bad in (self._threaded() if self.threaded else self._batches()):
            if bad:
                self._note(bad)
            yield x, y
        if self.skipped_this_epoch and len(self.skipped) > MAX_LOGGED and before >= MAX_LOGGED:
            _log(f"[dhkd] data: skipped {self.skipped_this_epoch} unreadable images this epoch "
                 f"({len(self.skipped)} distinct files so far; data.bad_images=skip)")


def folder_loader(files: ImageList, *, backend: str, train: bool, batch_size: int, seed: int, size: int,
                  rank: int, world_size: int, workers: int, prefetch: int, pin_memory: bool,
                  device: torch.device, skip: bool) -> FolderLoader:
    """A ``FolderLoader`` of ``files`` for ``backend`` "torchvision" or "gpu-decode"."""
    from . import EpochSampler
    sampler = EpochSampler(len(files), shuffle=train, seed=seed, rank=rank, world_size=world_size,
                           drop_last=train, with_epoch=True)
    gpu = backend == "gpu-decode"
    dataset = FileDataset(files, train=train, size=size, seed=seed, decode=not gpu, skip=skip)
    extra = {"prefetch_factor": prefetch, "persistent_workers": True} if workers > 0 else {}
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
        collate_fn=collate_bytes if gpu else collate_images,
        pin_memory=pin_memory and device.type == "cuda" and not gpu, drop_last=train,
        generator=torch.Generator().manual_seed(seed), **extra)  # keeps the global RNG untouched
    finish = GpuDecoder(files, train=train, size=size, seed=seed, device=device, skip=skip) if gpu else None
    return FolderLoader(loader, sampler, files, finish=finish, threaded=gpu and device.type == "cuda",
                        prefetch=prefetch, device=device)
