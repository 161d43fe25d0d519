"""`JetSpecConfig`: what a JetSpec draft head is made of and which target it is bound to."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from transformers import AutoConfig, PretrainedConfig


def tokenizer_fingerprint(tokenizer) -> dict[str, Any]:
    """What identifies a tokenizer for a head: its size, a sha256 of its (token, id) vocabulary and its special ids.

    A head drafts token ids; with a tokenizer that maps text to other ids its drafts are rejected (or, worse, a user
    reads another model's text), so the fingerprint of the target's tokenizer is recorded in [`JetSpecConfig`].
    """
    vocabulary = sorted(tokenizer.get_vocab().items(), key=lambda item: (item[1], item[0]))
    digest = hashlib.sha256(json.dumps(vocabulary, ensure_ascii=False).encode("utf-8")).hexdigest()
    return {
        "name_or_path": getattr(tokenizer, "name_or_path", None) or None,
        "vocab_size": len(tokenizer),
        "vocab_sha256": digest,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }


def default_target_layer_ids(num_target_layers: int, num_taps: int) -> list[int]:
    """Evenly spaced tap layers over `1 .. num_target_layers - 3` (the DFlash/JetSpec default).

    Args:
        num_target_layers (`int`): number of decoder layers of the target.
        num_taps (`int`): how many layers to tap.

    Returns:
        `list[int]`: sorted, unique layer indices (0-based decoder layer indices).
    """
    if num_target_layers < 1 or num_taps < 1:
        raise ValueError(f"need num_target_layers >= 1 and num_taps >= 1, got {num_target_layers}, {num_taps}")
    low, high = (0, num_target_layers - 1) if num_target_layers <= 4 else (1, num_target_layers - 3)
    if num_taps == 1:
        return [(low + high) // 2]
    ids = [round(low + i * (high - low) / (num_taps - 1)) for i in range(num_taps)]
    return sorted(set(ids))


class JetSpecConfig(PretrainedConfig):
    r"""
    Configuration of a [`JetSpecHead`]: a small causal parallel draft head that reads the hidden states of a frozen
    target model and drafts `block_size - 1` future tokens in one forward.

    Args:
        draft_config (`dict`):
            Config of the head's decoder layers, in the target family's own format (for example a `LlamaConfig` or
            `Qwen3Config` as a dict, with `num_hidden_layers` set to the head's depth). Its `model_type` selects the
            decoder layer, norm and rotary classes the head is built from.
        target_layer_ids (`list[int]`):
            0-based indices of the target decoder layers whose outputs are fused into the head's context features.
        block_size (`int`, *optional*, defaults to 16):
            Tokens per drafted block: the anchor (last committed token) plus `block_size - 1` drafted depths.
        target_num_hidden_layers (`int`):
            Number of decoder layers of the target the head was built for.
        target_name_or_path (`str`, *optional*):
            Name or path of the target model, when known.
        target_revision (`str`, *optional*):
            Revision of the target model, when known.
        training_recipe (`dict`, *optional*):
            A short summary of how the head was trained (data, steps, objective).
        anchor_context (`bool`, *optional*, defaults to `False`):
            Also feed the fused context row of position `anchor - 1` (the target's last committed state) into every
            block row's input, with a learned per-depth embedding, next to the anchor's embedding. Without it that
            state reaches the block only through attention over all context rows, which a small head trained briefly
            does not learn to focus (measured: depth-1 agreement stuck near 6% on the default target).
        target_tokenizer (`dict`, *optional*):
            [`tokenizer_fingerprint`] of the target's tokenizer, when known; checked when `generate()` is given a
            `tokenizer` and by `head.check_tokenizer`.
        draft_vocab_size (`int`, *optional*):
            Size of the head's draft vocabulary (the token ids, stored with the weights as `draft_vocab`, that the
            head scores when drafting; see `hf_jetspec/draft_vocab.py`). `None`: the whole vocabulary.
    """

    model_type = "jetspec"
    sub_configs = {}

    def __init__(
        self,
        draft_config: dict[str, Any] | None = None,
        target_layer_ids: list[int] | None = None,
        block_size: int = 16,
        target_num_hidden_layers: int | None = None,
        target_name_or_path: str | None = None,
        target_revision: str | None = None,
        training_recipe: dict[str, Any] | None = None,
        target_tokenizer: dict[str, Any] | None = None,
        anchor_context: bool = False,
        draft_vocab_size: int | None = None,
        **kwargs,
    ):
        draft_config = dict(draft_config or {})
        self.draft_config = draft_config
        self.target_layer_ids = list(target_layer_ids) if target_layer_ids is not None else []
        self.block_size = int(block_size)
        self.target_num_hidden_layers = target_num_hidden_layers
        self.target_name_or_path = target_name_or_path
        self.target_revision = target_revision
        self.training_recipe = training_recipe
        self.target_tokenizer = target_tokenizer
        self.anchor_context = bool(anchor_context)
        self.draft_vocab_size = None if draft_vocab_size is None else int(draft_vocab_size)
        # Mirrors of the draft config that generic Transformers code reads (e.g. the vocab-size check of generate()).
        self.vocab_size = draft_config.get("vocab_size")
        self.hidden_size = draft_config.get("hidden_size")
        self.num_hidden_layers = draft_config.get("num_hidden_layers")
        super().__init__(**kwargs)
        self.validate()

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs):
        model_type = config_dict.get("model_type", cls.model_type)
        if model_type != cls.model_type:
            raise ValueError(
                f"This config has model_type={model_type!r}, not {cls.model_type!r}: it is not a JetSpec head. "
                "Load it with its own class (e.g. AutoModelForCausalLM for a target model)."
            )
        return super().from_dict(config_dict, **kwargs)

    @property
    def target_model_type(self) -> str | None:
        return self.draft_config.get("model_type")

    def validate(self) -> None:
        """Checks ranges; an empty config (as made by `from_dict` internals) is allowed."""
        if self.block_size < 2:
            raise ValueError(f"`block_size` must be >= 2 (anchor + at least one drafted token), got {self.block_size}")
        if self.draft_vocab_size is not None and not 1 <= self.draft_vocab_size <= (self.vocab_size or float("inf")):
            raise ValueError(
                f"`draft_vocab_size` must lie in [1, vocab_size={self.vocab_size}] or be None, got {self.draft_vocab_size}"
            )
        if not self.draft_config:
            return
        if self.target_model_type is None:
            raise ValueError("`draft_config` needs a `model_type` (the target family, e.g. 'llama' or 'qwen3')")
        if not self.target_layer_ids:
            raise ValueError("`target_layer_ids` must name at least one target layer to tap")
        if self.target_num_hidden_layers is not None:
            bad = [i for i in self.target_layer_ids if not 0 <= i < self.target_num_hidden_layers]
            if bad:
                raise ValueError(
                    f"`target_layer_ids` {bad} out of range for a target with {self.target_num_hidden_layers} layers"
                )

    def to_family_config(self) -> PretrainedConfig:
        """The target-family config (`LlamaConfig`, `Qwen3Config`, ...) the head's decoder layers are built with."""
        family = dict(self.draft_config)
        model_type = family.pop("model_type")
        family.pop("layer_types", None)  # re-derived for the head's own depth
        family.pop("transformers_version", None)
        config = AutoConfig.for_model(model_type, **family)
        config._attn_implementation = "sdpa"
        return config
