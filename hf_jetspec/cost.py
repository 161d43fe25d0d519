"""Measured costs: timing helpers shared by every calibration (verify forwards, lm_head rows, packed linears) and
the verify cost curve they produce."""

from __future__ import annotations

import bisect
import statistics
import time
from dataclasses import dataclass

import torch


# Tree sizes timed by the calibration (root included); sizes in between are interpolated.
CPU_SIZES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)


CUDA_SIZES = (1, 8, 16, 32, 64, 96, 128, 192, 256)


@dataclass(frozen=True)
class VerifyCost:
    """Seconds of one verify forward vs tree size, measured on this machine, linearly interpolated in between.

    Args:
        sizes (`tuple[int, ...]`): tree sizes timed (increasing).
        seconds (`tuple[float, ...]`): median seconds of a verify forward of each size.
    """

    sizes: tuple[int, ...]
    seconds: tuple[float, ...]

    def __call__(self, num_nodes: int) -> float:
        if num_nodes <= self.sizes[0]:
            return self.seconds[0]
        if num_nodes >= self.sizes[-1]:  # extrapolate with the last slope
            slope = (self.seconds[-1] - self.seconds[-2]) / max(self.sizes[-1] - self.sizes[-2], 1) if len(self.sizes) > 1 else 0.0
            return self.seconds[-1] + slope * (num_nodes - self.sizes[-1])
        right = bisect.bisect_left(self.sizes, num_nodes)
        left = right - 1
        weight = (num_nodes - self.sizes[left]) / (self.sizes[right] - self.sizes[left])
        return self.seconds[left] + weight * (self.seconds[right] - self.seconds[left])

    @property
    def max_size(self) -> int:
        return self.sizes[-1]


def median_seconds(function, repeats: int, device: torch.device, before=None, after=None) -> float:
    """Median seconds of `function()` over `repeats` runs after one warm-up run (which warms up its shapes); `before`
    and `after` run around each timed call, untimed; the device is synchronised around it on CUDA."""
    timings = []
    for _ in range(repeats + 1):
        if before is not None:
            before()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        function()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        timings.append(time.perf_counter() - start)
        if after is not None:
            after()
    return statistics.median(timings[1:])


def default_sizes(device: torch.device) -> tuple[int, ...]:
    return CUDA_SIZES if device.type == "cuda" else CPU_SIZES


def monotone(values: list[float]) -> list[float]:
    """Running maximum: a bigger tree never costs less (timing noise aside)."""
    out, top = [], 0.0
    for value in values:
        top = max(top, value)
        out.append(top)
    return out
