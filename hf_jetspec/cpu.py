"""The CPU class this process runs on, as the fast paths see it: `"AMX"`, `"AVX-512"`, `"AVX2"` or `"other"`.

The bf16 draft projection and `ExactArgmax` run where a bf16 matmul measures faster than fp32 (AMX tiles, AVX-512
BF16; see [`bf16_paths_on`]); elsewhere every path is fp32. The class is the
hardware's, capped the way a process can cap it to emulate a smaller CPU on a bigger one (what `avx2_emulation_env`
sets): PyTorch's kernel dispatch (`ATEN_CPU_CAPABILITY`) and oneDNN's instruction set (`ONEDNN_MAX_CPU_ISA`, which
also keeps oneDNN off AMX). Benchmarks record it next to their numbers.
"""

from __future__ import annotations

import functools
import os
import platform

import torch

# oneDNN ISA caps below AMX (https://oneapi-src.github.io/oneDNN/dev_guide_cpu_dispatcher_control.html)
_ONEDNN_BELOW_AMX = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI",
                     "AVX512_CORE_BF16", "AVX512_CORE_FP16")
_ONEDNN_BELOW_AVX512 = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2")


def avx2_emulation_env() -> dict[str, str]:
    """Environment that makes a process on an AVX-512/AMX CPU run the paths of an AVX2-class CPU (set it before
    Python starts): PyTorch's AVX2 kernels, oneDNN and MKL capped at AVX2."""
    return {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}


@functools.cache
def cpu_class() -> str:
    """`"AMX"`, `"AVX-512"`, `"AVX2"` (x86 classes, the process's caps applied) or `"other"` (ARM, older x86)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return "other"
    capability = torch.backends.cpu.get_cpu_capability().upper()  # "AVX512", "AVX2", "DEFAULT", ...
    onednn = os.environ.get("ONEDNN_MAX_CPU_ISA", os.environ.get("DNNL_MAX_CPU_ISA", "ALL")).upper()
    if capability == "AVX512" and onednn not in _ONEDNN_BELOW_AVX512:
        amx = torch.cpu._is_amx_tile_supported() and torch.cpu._is_avx512_bf16_supported()
        return "AMX" if amx and onednn not in _ONEDNN_BELOW_AMX else "AVX-512"
    if capability in ("AVX512", "AVX2"):
        return "AVX2"
    return "other"


def bf16_paths_on() -> bool:
    """Whether the bf16 draft projection and `ExactArgmax` run: `HF_JETSPEC_BF16_PATHS` where set, else whether a bf16
    `lm_head`-sized matmul measures at least `BF16_MIN_MATMUL_SPEEDUP` times fp32 on this CPU."""
    forced = forced_bf16_paths()
    return forced if forced is not None else bf16_matmul_speedup() >= BF16_MIN_MATMUL_SPEEDUP


def cpu_description() -> dict:
    """What benchmarks record: the class, PyTorch's kernel level, the oneDNN cap, and which fast paths are on."""
    return {"cpu_class": cpu_class(), "aten_capability": torch.backends.cpu.get_cpu_capability(),
            "onednn_max_isa": os.environ.get("ONEDNN_MAX_CPU_ISA"), "processor": platform.processor() or platform.machine(),
            "bf16_matmul_speedup": round(bf16_matmul_speedup(), 2),
            "bf16_draft_projection_and_exact_argmax": bf16_paths_on()}


def _best_seconds(run, repeats: int) -> float:
    """Best wall time of `run()` over `repeats` calls after one warm-up call."""
    import time

    best = float("inf")
    for _ in range(repeats + 1):  # the first is a warm-up
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


@functools.cache
def bf16_autocast_speedup(hidden: int = 576, intermediate: int = 1536, rows: int = 768, repeats: int = 3) -> float:
    """fp32 time over bf16-autocast time of one head-layer-sized MLP forward and backward (`rows` tokens) on this
    CPU, the best of `repeats` each after a warm-up: above 1, bf16 autocast pays here (native bf16, AMX tiles or
    AVX-512 BF16, does; AVX2 emulates bf16 and loses). Measured once per process and size, in about a second."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(rows, hidden, generator=generator, requires_grad=True)
    mlp = torch.nn.Sequential(torch.nn.Linear(hidden, intermediate), torch.nn.SiLU(), torch.nn.Linear(intermediate, hidden))

    def step(bf16: bool) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = mlp(x)
        out.float().square().mean().backward()

    return _best_seconds(lambda: step(False), repeats) / _best_seconds(lambda: step(True), repeats)


# a bf16 lm_head-sized matmul must measure at least this much faster than fp32 for the bf16 fast paths to run
BF16_MIN_MATMUL_SPEEDUP = 1.3


def forced_bf16_paths() -> bool | None:
    """`HF_JETSPEC_BF16_PATHS=1` / `0` forces the bf16 draft projection and `ExactArgmax` on / off (benchmarks, tests);
    unset (or anything else): they follow the measurement."""
    return {"1": True, "0": False}.get(os.environ.get("HF_JETSPEC_BF16_PATHS", ""))


@functools.cache
def bf16_matmul_speedup(rows: int = 16, vocab: int = 16384, hidden: int = 576, repeats: int = 5) -> float:
    """fp32 time over bf16 time of an `lm_head`-sized matmul (`rows` x `hidden` @ `hidden` x `vocab`, the draft
    projection's and `ExactArgmax`'s screening pass) on this CPU, best of `repeats` after a warm-up, measured once per
    process (a few milliseconds). Native bf16 (AMX tiles, AVX-512 BF16) measures 3-4x; AVX2 emulates bf16 and loses."""
    generator = torch.Generator().manual_seed(0)
    weight, x = torch.randn(vocab, hidden, generator=generator), torch.randn(rows, hidden, generator=generator)
    low, x_low = weight.bfloat16(), x.bfloat16()
    fp32 = _best_seconds(lambda: torch.nn.functional.linear(x, weight), repeats)
    return fp32 / _best_seconds(lambda: torch.nn.functional.linear(x_low, low), repeats)
