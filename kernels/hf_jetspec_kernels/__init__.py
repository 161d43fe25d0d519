"""hf_jetspec_kernels: Triton kernels for JetSpec verification.

The package lives in `kernels/hf_jetspec_kernels/`, and `kernels/` itself has no `__init__.py`: a regular `kernels`
package at the repository root would shadow Hugging Face's `kernels` library whenever the root is on `sys.path`
(`python -m pytest`, `python -c`), and transformers >= 5.25 imports that library at `import transformers` when it is
installed. A folder without `__init__.py` is only a namespace portion, which an installed regular package outranks.

`tree_attention` (and the `tree_attention` module) load lazily, so importing this package pulls in neither Triton nor a
kernel decoration: set `TRITON_INTERPRET=1` before the first access to run the kernels on CPU.
"""

from .reference import (
    ancestor_mask_from_parents,
    pack_ancestor_mask,
    tree_attention_reference,
    tree_visibility,
    unpack_ancestor_bits,
)

__all__ = [
    "ancestor_mask_from_parents",
    "pack_ancestor_mask",
    "tree_attention",
    "tree_attention_reference",
    "tree_visibility",
    "unpack_ancestor_bits",
]


def __getattr__(name: str):
    if name == "tree_attention":
        from .tree_attention import tree_attention

        return tree_attention
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
