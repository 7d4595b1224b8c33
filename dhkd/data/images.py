"""ImageFolder files, decoding and the seeded ImageNet transforms shared by the image backends.

- ``image_list(dir)``: the (path, label) list and class-to-index map of an ImageFolder, built by
  torchvision's own ``find_classes``/``make_dataset``, so every backend sees the same files and labels.
- ``read_bytes`` / ``decode``: file bytes as a uint8 tensor, decoded to uint8 (3, H, W) RGB by
  ``torchvision.io.decode_image`` (JPEG, PNG, GIF, WebP; CMYK and grayscale JPEGs become RGB, bit-identical
  to PIL's ``convert("RGB")`` with libjpeg-turbo), PIL for anything else. A file neither can decode is a
  ``BadImageError`` naming it.
- ``train_params`` / ``apply_train``: RandomResizedCrop (scale 0.08-1, ratio 3/4-4/3) + horizontal flip,
  drawn from a generator seeded with ``sample_seed(seed, epoch, i)``: the same draws, in the same order,
  as the PIL pipeline ``Compose([RandomResizedCrop, RandomHorizontalFlip, PILToTensor])`` used before
  under ``torch.manual_seed`` (so the same crops and flips), applied to uint8 tensors by
  ``torchvision.transforms.v2.functional`` (antialiased bilinear), on any device.
- ``val_transform``: resize the shorter side to ``round(size * 256 / 224)``, center crop ``size``.
"""
from __future__ import annotations

import io
import math
import os
import warnings
from dataclasses import dataclass

import torch

# torchvision 0.29 deprecates torchvision.io's image codecs in favour of TorchCodec; they still work and
# are what this module calls, so that one message is not repeated for every image.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                        category=DeprecationWarning)

SCALE = (0.08, 1.0)
RATIO = (3.0 / 4.0, 4.0 / 3.0)


class BadImageError(RuntimeError):
    """An image file that cannot be read or decoded; the message starts with its path."""


def sample_seed(seed: int, epoch: int, i: int) -> int:
    """The torch seed of sample ``i``'s augmentation in ``epoch`` (the formula of ``SeededDataset``)."""
    return (seed * 1_000_003 + epoch) * 10_000_019 + i


def val_resize(size: int) -> int:
    """Shorter side before the validation center crop: 256 for a 224 crop."""
    return round(size * 256 / 224)


@dataclass
class ImageList:
    """The files of one ImageFolder split: ``samples[i] = (path, label)``, ``classes[label]`` its folder."""
    root: str
    classes: list
    class_to_idx: dict
    samples: list

    def __len__(self) -> int:
        return len(self.samples)


def image_list(root: str) -> ImageList:
    """``root/<class>/<image>`` with torchvision's ImageFolder rules (sorted class folders, its image
    extensions); FileNotFoundError naming the folder when a class folder holds no image."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset
    classes, class_to_idx = find_classes(root)
    samples = make_dataset(root, class_to_idx, extensions=IMG_EXTENSIONS)
    return ImageList(root, classes, class_to_idx, samples)


def read_bytes(path: str) -> torch.Tensor:
    """The file's bytes as a 1-D uint8 tensor; BadImageError for an unreadable or empty file."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise BadImageError(f"{path}: cannot read the file ({exc})") from None
    if not data:
        raise BadImageError(f"{path}: empty file")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def is_jpeg(data: torch.Tensor) -> bool:
    return data.numel() >= 3 and data[0].item() == 0xFF and data[1].item() == 0xD8 and data[2].item() == 0xFF


def decode(data: torch.Tensor, path: str) -> torch.Tensor:
    """uint8 (3, H, W) RGB on the CPU from the bytes of ``path``; BadImageError naming it on failure."""
    from torchvision.io import ImageReadMode, decode_image
    try:
        return decode_image(data, mode=ImageReadMode.RGB)
    except RuntimeError as exc:
        tv_error = exc
    try:  # formats torchvision.io does not read (BMP, TIFF, ...)
        from PIL import Image
        with Image.open(io.BytesIO(data.numpy().tobytes())) as im:
            rgb = im.convert("RGB")
        from torchvision.transforms.v2.functional import pil_to_tensor
        return pil_to_tensor(rgb)
    except Exception as exc:  # noqa: BLE001 - any PIL failure means the file is unusable
        reason = str(tv_error).splitlines()[0].split(", ")[-1] if str(tv_error) else type(tv_error).__name__
        raise BadImageError(f"{path}: cannot decode image ({reason}; PIL: {exc})") from None


def read_image(path: str) -> torch.Tensor:
    return decode(read_bytes(path), path)


def train_params(height: int, width: int, generator: torch.Generator) -> tuple[int, int, int, int, bool]:
    """(top, left, crop height, crop width, flip) of RandomResizedCrop + horizontal flip for an image of
    ``height`` x ``width``, drawn from ``generator``. The draws and their order are those of
    ``torchvision.transforms.RandomResizedCrop.get_params`` followed by ``RandomHorizontalFlip`` on the
    global RNG (tested equal), so a generator seeded like ``torch.manual_seed`` gives the crops of the
    PIL pipeline; an explicit generator keeps the global RNG untouched and is safe in a thread."""
    area = height * width
    log_lo, log_hi = torch.log(torch.tensor(RATIO)).tolist()  # float32 logs, as torchvision computes them
    crop = None
    for _ in range(10):  # up to ten tries at a random area and aspect ratio, then a central crop
        target = area * torch.empty(1).uniform_(SCALE[0], SCALE[1], generator=generator).item()
        aspect = torch.exp(torch.empty(1).uniform_(log_lo, log_hi, generator=generator)).item()
        cw, ch = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < cw <= width and 0 < ch <= height:
            top = int(torch.randint(0, height - ch + 1, (1,), generator=generator).item())
            left = int(torch.randint(0, width - cw + 1, (1,), generator=generator).item())
            crop = (top, left, ch, cw)
            break
    if crop is None:
        aspect = width / height
        if aspect < RATIO[0]:
            cw, ch = width, int(round(width / RATIO[0]))
        elif aspect > RATIO[1]:
            cw, ch = int(round(height * RATIO[1])), height
        else:
            cw, ch = width, height
        crop = ((height - ch) // 2, (width - cw) // 2, ch, cw)
    flip = bool(torch.rand(1, generator=generator).item() < 0.5)
    return (*crop, flip)


def seeded_params(img: torch.Tensor, seed: int) -> tuple[int, int, int, int, bool]:
    """``train_params`` of ``img`` (only its size is read: any device) from a generator seeded with ``seed``."""
    return train_params(img.shape[-2], img.shape[-1], torch.Generator().manual_seed(seed))


def apply_train(img: torch.Tensor, params, size: int) -> torch.Tensor:
    from torchvision.transforms.v2 import functional as F
    top, left, h, w, flip = params
    out = F.resized_crop(img, top, left, h, w, [size, size], antialias=True)
    return out.flip(-1) if flip else out


def val_transform(img: torch.Tensor, size: int) -> torch.Tensor:
    from torchvision.transforms.v2 import functional as F
    return F.center_crop(F.resize(img, [val_resize(size)], antialias=True), [size, size])


def check_same_classes(train: ImageList, val: ImageList) -> None:
    """The val split must have the train split's class folders, or its labels would mean other classes."""
    if train.classes != val.classes:
        only_train = sorted(set(train.classes) - set(val.classes))[:5]
        only_val = sorted(set(val.classes) - set(train.classes))[:5]
        raise ValueError(f"{val.root} and {train.root} have different class folders (only in train: "
                         f"{only_train}, only in val: {only_val}): the labels would not match")


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1
