"""Verify forwards on CPU with MKL-packed float32 linear weights, or the transposed product, where measured faster.

oneMKL's float32 GEMM changes kernels with the number of rows: on the 2-core x86 box the default target's linears cost
about the same for 1 to 3 rows and about 45% more at 4 rows, so a verify forward of 2 rows x 2 tree nodes costs
about 1.4 plain decoding steps of those 2 rows. With a weight packed once for a given row count (`cblas_sgemm_pack`:
PyTorch's `torch.ops.mkl._mkl_reorder_linear_weight` and `_mkl_linear`, what Inductor's CPU weight prepacking uses),
the same products at 4 to 16 rows cost 20-25% less. A packed copy serves one row count only, so a verify forward of
`m` rows runs its linears at the next packed count `P >= m`, the input padded with zero rows that are dropped after
the product (rows are independent in a GEMM).

Exactness: the products stay float32. Their rounding differs from the unpacked kernel's as the unpacked kernel's
rounding already differs between row counts (a verify forward never reproduced plain decoding's bits; outputs are
compared token for token).

- [`PackedLinears.measure`] packs the decoder's `nn.Linear` weights for each row count of [`PACK_ROWS`] and keeps
  the counts where the packed product of all of them is faster than the unpacked one (timed here), together with the
  smallest row count it is faster for, while the copies (one weight's size each) fit in the memory cap: the head's
  `generation_config.packed_weights_max_mb`, else the environment variable `HF_JETSPEC_PACKED_MAX_MB`, else
  [`MEMORY_SHARE`] of the memory available (see [`packed_memory_cap`]). A decoder whose linear weights do not fit the
  cap once runs unpacked. What was allocated is logged once per decoder.
- [`packed_linears_for`] returns them for a decoder (measured on first use, again when its weights changed; once per
  call), and [`packed_linears`] runs a block (the verify forward) with those linears switched to their packed copies.

The transposed product, `(weight @ input.T).T`, is the same product computed as a tall-skinny GEMM (the BLAS reads
each weight once for all the input rows). It needs no copy. On the 2-core AMD EPYC (AVX-512, and capped at AVX2 alike)
the default target's 210 decoder linears, weights out of cache, took about 28-35 ms for 2 to 4 rows that way against
60-80 ms through `F.linear`, 43-50 ms against 54-87 ms for 5 to 8 rows, and one row -- a GEMV, slower there than two
rows -- 28 ms run as two rows against 44 ms. [`PackedLinears.measure`] times it at [`TRANSPOSED_PROBES`] rows
against the best of the unpacked and packed products and keeps the row counts where it wins (a forward of `m` rows
takes the choice of the smallest probe `>= m`). Rounding differs from `F.linear`'s as above; outputs are compared
token for token.

Packing is only for float32 weights on CPU with PyTorch's MKL build; `HF_JETSPEC_PACKED_LINEARS=0` (or a cap of 0)
turns it off. The transposed product is for float32 weights on CPU; `HF_JETSPEC_TRANSPOSED_LINEARS=0` turns it off.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import weakref

import torch

from .cost import median_seconds

logger = logging.getLogger(__name__)

# Row counts weights are packed for (a copy each, about the decoder's linear weights in size).
PACK_ROWS = (4, 8, 16, 32)
# Share of the available memory the packed copies may take when no cap is set.
MEMORY_SHARE = 0.25
ENV_SWITCH = "HF_JETSPEC_PACKED_LINEARS"
# Row counts the transposed product is timed at; a forward of m rows takes the choice of the smallest probe >= m.
TRANSPOSED_PROBES = (1, 2, 3, 4, 6, 8, 12, 16)
ENV_TRANSPOSED = "HF_JETSPEC_TRANSPOSED_LINEARS"
ENV_MAX_MB = "HF_JETSPEC_PACKED_MAX_MB"
CONFIG_MAX_MB = "packed_weights_max_mb"  # on the head's generation config
MB = 2**20

# decoder -> (the cap it was measured under, in bytes or None for the default share; its PackedLinears or None)
_PACKED: "weakref.WeakKeyDictionary[torch.nn.Module, tuple[int | None, PackedLinears | None]]" = weakref.WeakKeyDictionary()


def packed_memory_cap(generation_config=None) -> int | None:
    """The cap in bytes on the packed weight copies: `generation_config.packed_weights_max_mb` (the head's), else the
    environment variable `HF_JETSPEC_PACKED_MAX_MB`, else `None` ([`MEMORY_SHARE`] of the memory available).

    Raises:
        `ValueError`: for a cap that is not a number of megabytes >= 0.
    """
    value = getattr(generation_config, CONFIG_MAX_MB, None) if generation_config is not None else None
    source = f"generation_config.{CONFIG_MAX_MB}"
    if value is None:
        value, source = os.environ.get(ENV_MAX_MB) or None, ENV_MAX_MB
    if value is None:
        return None
    try:
        megabytes = float(value)
    except (TypeError, ValueError):
        megabytes = -1.0
    if not megabytes >= 0:
        raise ValueError(f"{source} must be a number of megabytes >= 0 (0 turns weight packing off), got {value!r}.")
    return int(megabytes * MB)


def mkl_packing_available() -> bool:
    """Whether this PyTorch can pack float32 weights with MKL (and the switch does not turn it off)."""
    if os.environ.get(ENV_SWITCH, "1").lower() in ("0", "false", "off", "no"):
        return False
    ops = torch.ops.mkl
    return torch.backends.mkl.is_available() and hasattr(ops, "_mkl_linear") and hasattr(ops, "_mkl_reorder_linear_weight")


def _cap_hint(memory_bytes: int) -> str:
    """What the logs say of the memory cap on packed copies, and how to set it."""
    return (f"cap {memory_bytes / MB:.0f} MB: generation_config.{CONFIG_MAX_MB} or {ENV_MAX_MB} sets it, 0 turns "
            "packing off")


def transposed_available() -> bool:
    """Whether the transposed product may be timed and used (`HF_JETSPEC_TRANSPOSED_LINEARS` does not turn it off)."""
    return os.environ.get(ENV_TRANSPOSED, "1").lower() not in ("0", "false", "off", "no")


def available_memory_bytes() -> int | None:
    """`MemAvailable` from `/proc/meminfo` (free pages elsewhere), or `None` when unknown."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _packed_forward(weight: torch.Tensor, bias: torch.Tensor | None, packed: torch.Tensor, rows: int):
    def forward(input: torch.Tensor) -> torch.Tensor:
        flat = input.reshape(-1, input.shape[-1]).contiguous()
        count = flat.shape[0]
        if count < rows:
            flat = torch.cat([flat, flat.new_zeros(rows - count, flat.shape[1])])
        out = torch.ops.mkl._mkl_linear(flat, packed, weight, bias, rows)
        return out[:count].reshape(*input.shape[:-1], out.shape[-1])

    return forward


def transposed_linear(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(input, weight, bias)` computed as `(weight @ input.T).T`: the BLAS's tall-skinny path, which reads
    the weight once for all rows (one row runs as two: a GEMV was slower than two rows where this was measured)."""
    flat = input.reshape(-1, input.shape[-1])
    count = flat.shape[0]
    if count == 1:
        flat = torch.cat([flat, flat])
    out = torch.mm(weight, flat.t()).t()[:count]
    if bias is not None:
        out = out + bias
    return out.contiguous().reshape(*input.shape[:-1], weight.shape[0])


def _transposed_forward(weight: torch.Tensor, bias: torch.Tensor | None):
    return lambda input: transposed_linear(input, weight, bias)


_ACTIVE = threading.local()  # per thread: {id(layer): packed forward} inside `PackedLinears.use`, else absent


class _LinearDispatch:
    """An `nn.Linear`'s forward that runs the packed product only inside [`PackedLinears.use`] on the calling thread,
    and `nn.Linear`'s own product everywhere else (other threads, training, ordinary forwards)."""

    def __init__(self, layer: torch.nn.Linear):
        self.layer = layer

    def __call__(self, input: torch.Tensor) -> torch.Tensor:
        table = getattr(_ACTIVE, "table", None)
        forward = table.get(id(self.layer)) if table else None
        if forward is not None:
            return forward(input)
        return torch.nn.functional.linear(input, self.layer.weight, self.layer.bias)


def _is_plain_linear(module: torch.nn.Module) -> bool:
    forward = module.__dict__.get("forward")
    return type(module) is torch.nn.Linear and (forward is None or isinstance(forward, _LinearDispatch))


class PackedLinears:
    """A decoder's float32 `nn.Linear` layers with weights packed for some row counts, and the row counts that run the
    transposed product.

    Args:
        linears (`list[nn.Linear]`): the layers (each gets a [`_LinearDispatch`] forward, which runs the packed or
            transposed product only inside [`use`] on the calling thread).
        packed (`dict[int, list[Tensor]]`, *optional*): row count -> packed weight per layer; `None`: pack every
            row count of `min_rows` in a background thread (forwards run unpacked until their row count is ready).
        min_rows (`dict[int, int]`): row count -> smallest row count a forward is padded up to it from.
        transposed_rows (`Iterable[int]`, *optional*): the row counts that run the transposed product (before any
            packed count).
    """

    def __init__(self, linears: list[torch.nn.Linear], packed: dict[int, list[torch.Tensor]] | None,
                 min_rows: dict[int, int], transposed_rows=()):
        self.linears = linears
        self.min_rows = dict(sorted(min_rows.items()))
        self.transposed_rows = frozenset(transposed_rows)
        self._transposed = {id(layer): _transposed_forward(layer.weight, layer.bias) for layer in linears
                            } if self.transposed_rows else {}
        self._stamp = self.stamp(linears)
        self._tables: dict[int, dict] = {}
        self._thread = None
        if packed is not None:
            for size in self.min_rows:
                self._tables[size] = self._table(size, packed[size])
        elif self.min_rows:
            self._thread = threading.Thread(target=self._pack_all, name="hf_jetspec-packing", daemon=True)
            self._thread.start()
        for layer in linears:
            if not isinstance(layer.__dict__.get("forward"), _LinearDispatch):
                layer.__dict__["forward"] = _LinearDispatch(layer)

    def _table(self, size: int, weights: list[torch.Tensor]) -> dict:
        return {id(layer): _packed_forward(layer.weight, layer.bias, weight, size)
                for layer, weight in zip(self.linears, weights)}

    def _pack_all(self) -> None:
        with torch.no_grad():
            for size in self.min_rows:
                weights = [torch.ops.mkl._mkl_reorder_linear_weight(layer.weight, size) for layer in self.linears]
                self._tables[size] = self._table(size, weights)  # one dict store: forwards see it whole or not

    def wait(self) -> PackedLinears:
        """Blocks until every row count is packed (a no-op when packed up front)."""
        if self._thread is not None:
            self._thread.join()
        return self

    @staticmethod
    def stamp(linears) -> tuple:
        return tuple((id(layer.weight), layer.weight.data_ptr(), layer.weight._version) for layer in linears)

    def current(self) -> bool:
        """Whether the layers still hold the weights that were packed."""
        return self.stamp(self.linears) == self._stamp

    def rows_for(self, rows: int) -> int | None:
        """The packed row count a forward of `rows` rows runs at (`None`: unpacked)."""
        for size, smallest in self.min_rows.items():
            if smallest <= rows <= size:
                return size
        return None

    @contextlib.contextmanager
    def use(self, rows: int):
        """Runs the block with the layers' transposed or packed products for `rows` rows, on this thread only."""
        table = self._transposed if rows in self.transposed_rows else self._tables.get(self.rows_for(rows))
        if table is None or getattr(_ACTIVE, "table", None) is not None:  # unpacked row count, or not packed yet
            yield
            return
        _ACTIVE.table = table
        try:
            yield
        finally:
            _ACTIVE.table = None

    @classmethod
    def measure(cls, decoder: torch.nn.Module, sizes: tuple[int, ...] = PACK_ROWS, repeats: int = 3,
                memory_bytes: int | None = None) -> PackedLinears | None:
        """Times `decoder`'s float32 CPU linears unpacked, packed for each row count of `sizes` and transposed at
        [`TRANSPOSED_PROBES`] rows; `None` when neither packed nor transposed products are available or faster here.
        `memory_bytes` caps the packed copies (default: [`MEMORY_SHARE`] of available)."""
        packing, transposing = mkl_packing_available(), transposed_available()
        if not (packing or transposing):
            return None
        linears = [
            module for module in decoder.modules()
            if _is_plain_linear(module) and module.weight.dtype == torch.float32 and module.weight.device.type == "cpu"
        ]
        if not linears:
            return None
        copy_bytes = sum(layer.weight.numel() * 4 for layer in linears)
        if memory_bytes is None:
            available = available_memory_bytes()
            memory_bytes = int(MEMORY_SHARE * available) if available is not None else 0
        if not packing:
            memory_bytes = 0
        from . import measurements

        # what pays was measured by an earlier process on this machine: pack those row counts, time nothing
        probes = TRANSPOSED_PROBES if transposing else ()
        stored_key = measurements.key("linear_kernels", decoder, sizes=sizes, repeats=repeats, probes=probes)
        stored = measurements.load("linear_kernels", stored_key)
        if stored is not None:
            min_rows = {int(size): int(rows) for size, rows in stored["min_rows"].items()}
            min_rows = dict(list(min_rows.items())[: max(0, memory_bytes // max(copy_bytes, 1))])  # under this cap
            transposed = stored["transposed_rows"]
            if not (min_rows or transposed):
                return None
            # packing itself (MKL's reorder, seconds for a 135M target) runs in the background: this call starts
            # unpacked and picks up each row count's packed weights as they are ready
            return cls(linears, None, min_rows, transposed)._logged(memory_bytes, "measured by an earlier process"
                                                                    + ("; packing in the background" if min_rows else ""))
        device = torch.device("cpu")
        generator = torch.Generator().manual_seed(0)
        inputs: dict[tuple[int, int], torch.Tensor] = {}

        def run(rows: int, calls) -> None:
            for layer, call in zip(linears, calls):
                key = (rows, layer.in_features)
                if key not in inputs:
                    inputs[key] = torch.randn(rows, layer.in_features, generator=generator)
                call(inputs[key])

        unpacked = [lambda x, layer=layer: torch.nn.functional.linear(x, layer.weight, layer.bias) for layer in linears]
        unpacked_seconds: dict[int, float] = {}

        def unpacked_at(rows: int) -> float:
            if rows not in unpacked_seconds:
                unpacked_seconds[rows] = median_seconds(lambda: run(rows, unpacked), repeats, device)
            return unpacked_seconds[rows]

        packed, min_rows, packed_seconds = {}, {}, {}
        with torch.no_grad():
            for size in sizes:
                if (len(packed) + 1) * copy_bytes > memory_bytes:
                    break
                weights = [torch.ops.mkl._mkl_reorder_linear_weight(layer.weight, size) for layer in linears]
                calls = [_packed_forward(layer.weight, layer.bias, weight, size) for layer, weight in zip(linears, weights)]
                fast = median_seconds(lambda: run(size, calls), repeats, device)
                smallest = size // 2 + 1
                if fast < unpacked_at(smallest):
                    min_rows[size] = smallest
                elif fast < unpacked_at(size):
                    min_rows[size] = size
                else:
                    continue
                packed[size], packed_seconds[size] = weights, fast
            transposed: list[int] = []
            calls = [_transposed_forward(layer.weight, layer.bias) for layer in linears]
            below = 0
            for probe in probes:
                other = min([unpacked_at(probe)] + [packed_seconds[size] for size, smallest in min_rows.items()
                                                    if smallest <= probe <= size])
                if median_seconds(lambda: run(probe, calls), repeats, device) < other:
                    transposed.extend(range(below + 1, probe + 1))  # a forward of m rows takes the next probe's choice
                below = probe
        if len(packed) == len(sizes) or copy_bytes * (len(packed) + 1) <= memory_bytes:  # not cut short by the cap
            measurements.save("linear_kernels", stored_key, {"min_rows": {str(k): v for k, v in min_rows.items()},
                                                             "transposed_rows": transposed})
        if not packed and packing and copy_bytes > memory_bytes:
            logger.warning("hf_jetspec: the target's float32 linear weights (%.0f MB a copy) do not fit the memory "
                           "cap for packed copies (%s): verify forwards run unpacked.", copy_bytes / MB,
                           _cap_hint(memory_bytes))
        if not (packed or transposed):
            return None
        return cls(linears, packed, min_rows, transposed)._logged(memory_bytes, "measured now")

    def _logged(self, memory_bytes: int, source: str) -> PackedLinears:
        how = _cap_hint(memory_bytes)
        if self.min_rows:
            logger.warning("hf_jetspec: packed the target's float32 linear weights for verify forwards of %s rows (%s): "
                           "%d copies, %.0f MB (%s).", "/".join(str(size) for size in self.min_rows), source,
                           len(self.min_rows), self.nbytes / MB, how)
        if self.transposed_rows:
            logger.info("hf_jetspec: verify forwards of %s rows run the target's linears transposed (%s).",
                        ",".join(str(rows) for rows in sorted(self.transposed_rows)), source)
        return self

    @property
    def kernels(self) -> dict:
        """Which products verify forwards run at which row counts (what a measured verify cost depends on)."""
        return {"packed": {str(size): rows for size, rows in self.min_rows.items()},
                "transposed": sorted(self.transposed_rows)}

    @property
    def nbytes(self) -> int:
        """Bytes of the packed copies (one per kept row count, each about the linear weights' size)."""
        return len(self.min_rows) * sum(layer.weight.numel() * layer.weight.element_size() for layer in self.linears)


def packed_linears_for(decoder: torch.nn.Module, memory_bytes: int | None = None) -> PackedLinears | None:
    """The [`PackedLinears`] of `decoder` under the cap `memory_bytes` (see [`packed_memory_cap`]; `None`: the
    default share), measured on first use, again when its weights changed or under another cap."""
    cap, found = _PACKED.get(decoder, (None, False))
    if found is False or cap != memory_bytes or (found is not None and not found.current()):
        if found:
            _PACKED.pop(decoder)  # the old copies go before new ones are made
            found = None
        found = PackedLinears.measure(decoder, memory_bytes=memory_bytes)
        _PACKED[decoder] = (memory_bytes, found)
    return found


@contextlib.contextmanager
def packed_linears(packed: PackedLinears | None, rows: int):
    """Runs the block (one forward of `rows` token rows) with the linears of `packed` (from [`packed_linears_for`],
    looked up once per call: checking the weights costs about a millisecond) packed for `rows`, where that was
    measured faster; as is with `packed=None` or while gradients are on."""
    if packed is None or torch.is_grad_enabled():
        yield
        return
    with packed.use(rows):
        yield
