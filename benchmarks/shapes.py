"""The one registry of benchmark shapes: (N rows, D feature width, C classes).

GPU shapes are the workloads the library is built for; CPU shapes are small enough for the 2-core
CI machine and run only where there is no CUDA device.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Shape:
    """A named (N, D, C) loss problem and the device kind it is meant for ("cuda" or "cpu")."""

    name: str
    n: int
    d: int
    c: int
    device: str

    @property
    def dims(self) -> str:
        return f"{self.n}x{self.d}x{self.c}"


GPU_SHAPES = (
    Shape("imagenet-r18", 1024, 512, 1000, "cuda"),
    Shape("imagenet-r50", 256, 2048, 1000, "cuda"),
    Shape("imagenet-r50-bigbatch", 4096, 2048, 1000, "cuda"),
    Shape("imagenet21k", 2048, 2048, 21841, "cuda"),
    Shape("llm-32k", 8192, 4096, 32000, "cuda"),
    Shape("llm-128k", 8192, 4096, 128256, "cuda"),
)

CPU_SHAPES = (
    Shape("cpu-small", 256, 128, 100, "cpu"),
    Shape("cpu-r18", 512, 256, 1000, "cpu"),
)

SHAPES = GPU_SHAPES + CPU_SHAPES
BY_NAME = {s.name: s for s in SHAPES}


def get(name: str) -> Shape:
    """The registered shape called ``name`` (ValueError naming the known ones otherwise)."""
    try:
        return BY_NAME[name]
    except KeyError:
        raise ValueError(f"unknown shape name {name!r}; known: {', '.join(BY_NAME)}") from None


def flops(shape: Shape, mode: str) -> int:
    """Nominal matmul FLOPs of the loss: 2 heads x (forward 2NDC; backward dX and dW, 4NDC).

    forward 4NDC, backward 8NDC, forward+backward 12NDC.
    """
    per = {"forward": 4, "backward": 8, "forward+backward": 12}
    if mode not in per:
        raise ValueError(f"mode must be one of {sorted(per)}, got {mode!r}")
    return per[mode] * shape.n * shape.d * shape.c
