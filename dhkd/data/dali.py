"""The ``dali`` ImageFolder backend (``data.backend: dali``): NVIDIA DALI pipelines, an optional extra
(``pip install -e '.[dali]'``: ``nvidia-dali-cuda130``, matching torch's CUDA 13 build).

Per epoch, the loader builds a DALI pipeline whose file reader (``fn.readers.file``, no shuffling of its
own) reads this rank's shard of ``EpochSampler``'s order for that epoch, so the order is a function of
(seed, epoch) and the rank shards are those of the other backends. Training:
``fn.decoders.image_random_crop`` (the ``decoders.image`` family with RandomResizedCrop fused into the
decode, so the decoder can skip what lies outside the crop window; scale 0.08-1, ratio 3/4-4/3, 10
tries), ``fn.resize`` to size x size (antialiased linear), a coin flip and ``fn.crop_mirror_normalize``
to uint8 HWC. Validation: ``fn.decoders.image``, shorter side
``round(size * 256 / 224)``, center crop; the reader pads the last batch and the padding is dropped, so every
validation image is seen exactly once across ranks. On CUDA the decoder runs on ``device="mixed"`` and the
other operators on the GPU; on a CPU device (``device_id=None``) everything runs on the CPU, which is how
the tests run this backend.

Batches are uint8 (N, 3, H, W) views of DALI's NHWC output (channels_last memory), normalised on the
device by ``Data.prepare`` like every backend's. Labels are int64.

Determinism: DALI draws the crops and flips itself, from its own generator seeded per epoch with
``(seed, epoch, rank)``. A run therefore repeats itself and a resumed run (which starts at an epoch
boundary) sees exactly the batches of an uninterrupted one, but the augmentation of sample i is not a
function of (seed, epoch, i) alone: it changes with the batch size and the number of ranks, and it
differs from the torchvision/gpu-decode backends' (whose crops follow torchvision's draws).

A file DALI cannot decode stops the run with ``BadImageError`` naming the file (found by re-checking the
files of the failing batches); ``data.bad_images: skip`` is not available with DALI.
"""
from __future__ import annotations

import torch

from ..config import ConfigError
from .images import RATIO, SCALE, BadImageError, ImageList, read_image, val_resize

NOTE = ("dali backend: epoch order and rank shards follow (seed, epoch) and resume is exact at epoch "
        "boundaries, but DALI draws the crops/flips from its own per-(seed, epoch, rank) generator, so "
        "augmentation depends on batch size and world size and differs from the torchvision backend's")


def available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def require() -> None:
    if not available():
        raise ConfigError("data.backend=dali needs NVIDIA DALI: pip install -e '.[dali]' (the wheel "
                          "nvidia-dali-cuda130 for torch's CUDA 13 build; nvidia-dali-cuda120 for CUDA 12), "
                          "or set data.backend=torchvision or gpu-decode")


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    return ((seed * 1_000_003 + epoch) * 10_007 + rank) % (2 ** 31 - 1)


def _pipeline(files, labels, *, train: bool, size: int, batch_size: int, threads: int, prefetch: int,
              device_id, seed: int):
    from nvidia.dali import fn, pipeline_def, types

    gpu = device_id is not None

    @pipeline_def(batch_size=batch_size, num_threads=threads, device_id=device_id, seed=seed,
                  prefetch_queue_depth=prefetch)
    def pipe():
        jpegs, label = fn.readers.file(files=files, labels=labels, random_shuffle=False, name="reader",
                                       pad_last_batch=True)
        decoder = "mixed" if gpu else "cpu"
        if train:
            img = fn.decoders.image_random_crop(jpegs, device=decoder, output_type=types.RGB,
                                                random_area=list(SCALE), random_aspect_ratio=list(RATIO),
                                                num_attempts=10)
            img = fn.resize(img, resize_x=size, resize_y=size, antialias=True)
            img = fn.crop_mirror_normalize(img, dtype=types.UINT8, output_layout="HWC",
                                           mirror=fn.random.coin_flip(probability=0.5))
        else:
            img = fn.decoders.image(jpegs, device=decoder, output_type=types.RGB)
            img = fn.resize(img, resize_shorter=val_resize(size), antialias=True)
            img = fn.crop_mirror_normalize(img, dtype=types.UINT8, output_layout="HWC", crop=(size, size))
        return img, label

    return pipe()


class DaliLoader:
    """``set_epoch``, ``len`` and ``(uint8 images, int64 labels)`` batches from a per-epoch DALI pipeline."""

    def __init__(self, files: ImageList, sampler, *, train: bool, size: int, batch_size: int, threads: int,
                 prefetch: int, device: torch.device, seed: int, rank: int):
        require()
        self.files, self.sampler, self.train, self.size = files, sampler, train, size
        self.batch_size, self.threads, self.prefetch = batch_size, max(1, threads), max(1, prefetch)
        self.device, self.seed, self.rank = torch.device(device), seed, rank

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.train else -(-n // self.batch_size)

    def _find_bad(self, paths: list) -> list:
        bad = []
        for p in paths:
            try:
                read_image(p)
            except BadImageError as exc:
                bad.append(str(exc))
        return bad

    def __iter__(self):
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy
        order = self.sampler.indices().tolist()
        if not order:
            return
        paths = [self.files.samples[i][0] for i in order]
        labels = [self.files.samples[i][1] for i in order]
        device_id = None
        if self.device.type == "cuda":
            device_id = self.device.index if self.device.index is not None else torch.cuda.current_device()
        pipe = _pipeline(paths, labels, train=self.train, size=self.size, batch_size=self.batch_size,
                         threads=self.threads, prefetch=self.prefetch, device_id=device_id,
                         seed=epoch_seed(self.seed, self.sampler.epoch, self.rank))
        b = 0
        try:
            it = DALIGenericIterator([pipe], ["x", "y"], reader_name="reader", auto_reset=False,
                                     last_batch_policy=LastBatchPolicy.DROP if self.train else
                                     LastBatchPolicy.PARTIAL)
            for out in it:
                x, y = out[0]["x"], out[0]["y"]
                yield x.permute(0, 3, 1, 2), y.reshape(-1).long()
                b += 1
        except RuntimeError as exc:
            lo, hi = b * self.batch_size, (b + self.prefetch + 2) * self.batch_size
            bad = self._find_bad(paths[lo:hi])
            if bad:
                raise BadImageError(f"{bad[0]} (DALI: {str(exc).splitlines()[0][:200]})"
                                    + (f"; {len(bad) - 1} more bad file(s) nearby" if len(bad) > 1 else "")
                                    ) from None
            raise
        finally:
            del pipe
