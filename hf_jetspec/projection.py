"""The target's `lm_head` over `m` rows, run at the measured cheapest row count `>= m`.

A big-vocabulary `lm_head` is one GEMM with few rows (`m`) and a wide output. Its cost is not monotone in `m` on every
machine: on the 2-core x86 CPU this project is developed on, fp32 `linear` over SmolLM2's 49k x 576 `lm_head` with
the weights out of cache takes about 4.3 ms for 1 row, 8.6 ms for 4, 17.7 ms for 12 -- and 9.5 ms for 16, where the
BLAS picks another kernel. Accepting a tree needs the logits of a few nodes per row, so a round can ask for 10 rows
and pay twice what 16 would cost.

[`measure_projection`] times the `lm_head` once per (model, device, dtype) at [`PROBE_SIZES`] rows (caches flushed
between runs on a CPU, as they are after a verify forward), and [`ProjectionCost.padded_rows`] gives the cheapest
measured row count that holds `m` rows. The caller fills the extra rows with more tree nodes (logits it may need next)
rather than zeros. Each row's logits do not depend on the other rows, so this changes the cost, never the output
(beyond floating point, as any batch shape does).
"""

from __future__ import annotations

import bisect
import weakref
from dataclasses import dataclass

import torch

from .cost import median_seconds

PROBE_SIZES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
FLUSH_BYTES = 64 * 1024 * 1024  # larger than the last-level cache of the CPUs this runs on

_MEASURED: "weakref.WeakKeyDictionary[torch.nn.Module, dict]" = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class ProjectionCost:
    """Measured seconds of one `lm_head` call vs rows.

    Args:
        sizes (`tuple[int, ...]`): row counts timed (increasing).
        seconds (`tuple[float, ...]`): median seconds of a call with each.
    """

    sizes: tuple[int, ...]
    seconds: tuple[float, ...]
    transposed: tuple[bool, ...] = ()

    def __post_init__(self):
        if not self.sizes or len(self.sizes) != len(self.seconds) or list(self.sizes) != sorted(set(self.sizes)):
            raise ValueError(f"`sizes` must be increasing and match `seconds`, got {self.sizes} and {self.seconds}")
        if self.transposed and len(self.transposed) != len(self.sizes):
            raise ValueError(f"`transposed` must be empty or match `sizes`, got {self.transposed} and {self.sizes}")

    def runs_transposed(self, rows: int) -> bool:
        """Whether a call of `rows` rows (a measured count, see [`padded_rows`]) runs the transposed product
        (`packed_linear.transposed_linear`), measured faster there than `linear`."""
        index = bisect.bisect_left(self.sizes, rows)
        return bool(self.transposed) and index < len(self.sizes) and self.sizes[index] == rows and self.transposed[index]

    def padded_rows(self, rows: int) -> int:
        """The measured row count `>= rows` with the lowest cost (the smallest among equals); `rows` itself past the
        largest measured size."""
        start = bisect.bisect_left(self.sizes, rows)
        if start == len(self.sizes):
            return rows
        best = min(range(start, len(self.sizes)), key=lambda i: (self.seconds[i], self.sizes[i]))
        return self.sizes[best]

    def __call__(self, rows: int) -> float:
        """Seconds of the logits of `rows` rows, run at [`padded_rows`] (past the largest size: extrapolated with
        the last slope)."""
        if rows < 1:
            return 0.0
        padded = self.padded_rows(rows)
        if padded in self.sizes:
            return self.seconds[self.sizes.index(padded)]
        slope = ((self.seconds[-1] - self.seconds[-2]) / (self.sizes[-1] - self.sizes[-2])) if len(self.sizes) > 1 else 0.0
        return self.seconds[-1] + max(slope, 0.0) * (rows - self.sizes[-1])


def flat_projection_cost() -> ProjectionCost:
    """A cost that never pads (every row count costs the same): for tests and where nothing was measured."""
    return ProjectionCost(sizes=(1,), seconds=(0.0,))


def measure_projection(model: torch.nn.Module, sizes: tuple[int, ...] = PROBE_SIZES, repeats: int = 5) -> ProjectionCost:
    """Times `model.get_output_embeddings()` at `sizes` rows (median of `repeats` after a warm-up), and for a float32
    `nn.Linear` on CPU the transposed product too (`packed_linear.transposed_linear`), keeping the faster; once per
    (model, device, dtype); later calls return the cached [`ProjectionCost`]."""
    from . import measurements
    from .packed_linear import transposed_available, transposed_linear

    lm_head = model.get_output_embeddings()
    device, dtype = lm_head.weight.device, lm_head.weight.dtype
    transposing = (type(lm_head) is torch.nn.Linear and dtype == torch.float32 and device.type == "cpu"
                   and transposed_available())
    key = (str(device), str(dtype), tuple(sizes), repeats, transposing)
    cached = _MEASURED.setdefault(model, {})
    if key in cached:
        return cached[key]
    stored_key = measurements.key("projection", model, sizes=tuple(sizes), repeats=repeats, transposed=transposing)
    stored = measurements.load("projection", stored_key)  # measured by an earlier process on this machine
    if stored is not None and tuple(stored.get("sizes", ())) == tuple(sizes) and len(stored.get("seconds", ())) == len(sizes):
        cached[key] = ProjectionCost(sizes=tuple(sizes), seconds=tuple(stored["seconds"]),
                                     transposed=tuple(stored.get("transposed", ())))
        return cached[key]
    flush = torch.empty(FLUSH_BYTES // 4, dtype=torch.float32) if device.type == "cpu" else None
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(max(sizes), lm_head.weight.shape[1], generator=generator).to(device, dtype)
    evict = None if flush is None else lambda: flush.fill_(1.0)  # as a verify forward does before accept needs them
    with torch.no_grad():
        seconds = [median_seconds(lambda: lm_head(hidden[:rows]), repeats, device, before=evict) for rows in sizes]
        transposed = [False] * len(sizes)
        if transposing:
            for index, rows in enumerate(sizes):
                other = median_seconds(lambda: transposed_linear(hidden[:rows], lm_head.weight, lm_head.bias), repeats,
                                       device, before=evict)
                if other < seconds[index]:
                    seconds[index], transposed[index] = other, True
    cost = ProjectionCost(sizes=tuple(sizes), seconds=tuple(seconds), transposed=tuple(transposed) if transposing else ())
    cached[key] = cost
    measurements.save("projection", stored_key, {"sizes": list(sizes), "seconds": list(seconds),
                                                 "transposed": list(cost.transposed)})
    return cost
