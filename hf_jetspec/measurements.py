"""Cost measurements that outlive the process, so a new process starts warm.

The first `generate(assistant_model=head)` of a process times the target's verify forward against tree size, its
lm_head against rows, and which row counts pay for packed linear weights (`planning.measure_batch_cost`,
`projection.measure_projection`, `packed_linear.PackedLinears.measure`): about 15 s for SmolLM2-135M on a 2-core CPU, against under 2 s for the call itself. Those results depend only on the machine,
the libraries and the target, so they are kept as small JSON files under `HF_JETSPEC_MEASUREMENTS` (default
`~/.cache/hf_jetspec/measurements`), keyed by a hash of: the CPU model and class, the process's instruction-set caps,
core and torch-thread counts, torch, transformers and hf_jetspec versions, the target's config, dtype, device and
attention backend, and what was measured. Anything else measures afresh. `HF_JETSPEC_MEASUREMENTS=off` turns the
store off.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

ENV = "HF_JETSPEC_MEASUREMENTS"


def store_dir() -> Path | None:
    """Where measurements are kept, or `None` when the store is off."""
    value = os.environ.get(ENV, "")
    if value.lower() in ("off", "0", "none"):
        return None
    return Path(value) if value else Path.home() / ".cache" / "hf_jetspec" / "measurements"


def _cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def config_fingerprint(config) -> str:
    """A hash of a model config's values, without where it was loaded from (`_name_or_path`): the same model loaded
    by another path, or with another working directory, is the same measurement."""
    values = json.loads(config.to_json_string(use_diff=False))
    values.pop("_name_or_path", None)
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()


def key(kind: str, model: torch.nn.Module, **what) -> str:
    """A hash of everything a `kind` measurement of `model` depends on, plus `what` (sizes, caps, ...)."""
    import transformers

    from . import __version__
    from .cpu import cpu_class

    config = config_fingerprint(model.config)
    facts = {
        "kind": kind, "cpu": _cpu_model(), "cpu_class": cpu_class(), "cores": os.cpu_count(),
        "threads": torch.get_num_threads(), "caps": [os.environ.get(name) for name in (
            "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")],
        "torch": torch.__version__, "transformers": transformers.__version__, "hf_jetspec": __version__,
        "config": config, "dtype": str(model.dtype), "device": str(model.device),
        "attn": getattr(model.config, "_attn_implementation", None), "what": what,
    }
    return hashlib.sha256(json.dumps(facts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def load(kind: str, digest: str) -> dict | None:
    """The stored measurement, or `None` (none stored, store off, or an unreadable file)."""
    directory = store_dir()
    if directory is None:
        return None
    path = directory / f"{kind}-{digest}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def save(kind: str, digest: str, value: dict) -> None:
    """Stores a measurement (atomically; a store that cannot be written is skipped with a debug log)."""
    directory = store_dir()
    if directory is None:
        return
    try:
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"{kind}-{digest}.json"
        partial = path.with_suffix(f".{os.getpid()}.tmp")
        partial.write_text(json.dumps(value))
        partial.replace(path)
    except OSError as error:
        logger.debug("hf_jetspec: measurement not stored (%s)", error)
