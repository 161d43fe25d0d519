"""hf_jetspec_kernels: Triton kernels for JetSpec verification (installed under this name: a top-level `kernels`
package would shadow Hugging Face's `kernels` library).

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
