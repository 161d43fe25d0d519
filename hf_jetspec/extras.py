"""Optional dependencies: what each extra of `pip install hf_jetspec[...]` brings, and the error that names it.

The core (`torch`, `transformers`, `huggingface-hub`, `safetensors`) runs `generate(assistant_model=head)`;
`[train]` adds TRL, PEFT, datasets, accelerate and matplotlib (training curves), `[kernels]` Triton (the
`jetspec_tree` attention kernel), `[bench]` matplotlib (benchmark plots), `[demo]` gguf and accelerate (the default
target, a GGUF file), `[all]` everything.
"""

from __future__ import annotations

import importlib

EXTRAS = {
    "train": ("trl", "peft", "datasets", "accelerate", "matplotlib"),
    "kernels": ("triton",),
    "bench": ("matplotlib",),
    "demo": ("gguf", "accelerate"),  # the default target: transformers loads GGUF files only with accelerate
}


def require(extra: str, feature: str) -> None:
    """Raises `ImportError` naming the pip command when a module of `extra` cannot be imported."""
    missing = []
    for module in EXTRAS[extra]:
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise ImportError(f"{feature} needs {', '.join(missing)}, from the `{extra}` extra: "
                          f"pip install 'hf_jetspec[{extra}]' (or `pip install -e '.[{extra}]'` in a checkout)")
