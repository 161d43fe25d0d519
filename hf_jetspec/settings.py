"""A call's tree settings, typed and validated once.

The settings live on the head's `generation_config` (saved with the head, as Transformers keeps assistant settings)
and one `generate()` call may override them (`generate(..., tree_budget=8)`, see [`CALL_SETTINGS`]). Before any
forward they become one [`TreeSettings`], every value checked and resolved (`"auto"` budget, the prompt-lookup length
it implies, the packed-weights memory cap), which the decode loops read as plain attributes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .lookup import prompt_lookup_tokens
from .packed_linear import packed_memory_cap

# generate() arguments that set the head's tree settings for one call (Transformers' own assistant settings, e.g.
# `prompt_lookup_num_tokens`, are taken per call the same way).
CALL_SETTINGS = ("tree_budget", "tree_topk", "tree_max_budget", "prompt_lookup_num_tokens", "max_matching_ngram_size")


def default_tree_budget(device: torch.device) -> int:
    """Fixed node budget that suits the device, for callers that want one number instead of `"auto"`.

    On a CPU a verify forward of 8-16 rows costs about as much as one of 2, while 64+ rows cost several plain steps
    (see `examples/benchmark_rounds.py`); on a GPU rows are nearly free up to a few hundred.
    """
    return 128 if device.type == "cuda" else 16


def resolve_tree_budget(value) -> int | str:
    """`tree_budget` as used: unset means `"auto"` (see `hf_jetspec/planning.py`)."""
    if value is None or value == "auto":
        return "auto"
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`tree_budget` must be 'auto' or an int >= 1 (nodes per tree, root included), got {value!r}")
    return value


def _positive_int_or_none(name: str, value) -> int | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"`{name}` must be None or an int >= 1, got {value!r}")
    return value


@dataclass(frozen=True)
class TreeSettings:
    """One call's tree settings, resolved.

    Args:
        tree_budget (`int` or `"auto"`): nodes per tree (root included), or sized per round by measured costs.
        tree_topk (`int`): candidates per depth.
        tree_max_budget (`int`, *optional*): the largest tree `"auto"` may choose.
        prompt_lookup_num_tokens (`int`): longest prompt-lookup proposal merged into a tree (0: none; unset on the
            head means on with `"auto"`, off with a fixed budget, see `lookup.prompt_lookup_tokens`).
        max_matching_ngram_size (`int`): longest n-gram prompt lookup matches.
        packed_memory_cap (`int`, *optional*): bytes the packed weight copies may take (`None`: a share of the
            memory available, see `packed_linear.packed_memory_cap`).
    """

    tree_budget: int | str = "auto"
    tree_topk: int = 7
    tree_max_budget: int | None = None
    prompt_lookup_num_tokens: int = 0
    max_matching_ngram_size: int = 2
    packed_memory_cap: int | None = None

    @classmethod
    def from_config(cls, generation_config, overrides: dict | None = None) -> "TreeSettings":
        """The settings of `generation_config` (a head's) with `overrides` (any of [`CALL_SETTINGS`]) applied,
        validated; raises the `ValueError` of the first bad value."""
        unknown = sorted(set(overrides or ()) - set(CALL_SETTINGS))
        if unknown:
            raise ValueError(f"unknown JetSpec tree settings {unknown}; per call you can set {list(CALL_SETTINGS)}")

        def value(name, default=None):
            if overrides and name in overrides:
                return overrides[name]
            return getattr(generation_config, name, default)

        budget = resolve_tree_budget(value("tree_budget"))
        topk = value("tree_topk", 7)
        if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
            raise ValueError(f"`tree_topk` must be an int >= 1 (candidates per depth), got {topk!r}")
        return cls(
            tree_budget=budget,
            tree_topk=topk,
            tree_max_budget=_positive_int_or_none("tree_max_budget", value("tree_max_budget")),
            prompt_lookup_num_tokens=prompt_lookup_tokens(value("prompt_lookup_num_tokens"), budget),
            max_matching_ngram_size=_positive_int_or_none("max_matching_ngram_size",
                                                          value("max_matching_ngram_size")) or 2,
            packed_memory_cap=packed_memory_cap(generation_config),
        )


def validate_tree_settings(generation_config) -> None:
    """Checks a head's tree settings (`tree_budget`, `tree_topk`, `tree_max_budget`, `prompt_lookup_num_tokens`,
    `max_matching_ngram_size`, `packed_weights_max_mb`) at once; raises the `ValueError` of the first bad one."""
    TreeSettings.from_config(generation_config)


def call_tree_settings(head, overrides: dict | None = None) -> TreeSettings:
    """The tree settings of one `generate()` call: `head.generation_config` with `overrides` applied, validated; the
    head's own settings are left as they are."""
    return TreeSettings.from_config(head.generation_config, overrides)
