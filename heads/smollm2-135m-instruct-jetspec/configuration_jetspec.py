"""`JetSpecConfig`: what a JetSpec draft head is made of and which target it is bound to."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from transformers import AutoConfig, PretrainedConfig


def hub_name(name_or_path: str | None) -> str | None:
    """`name_or_path` when it can name a Hub repo, `None` for a path on this machine (absolute, relative with `./` or
    `../`, `~`, or an existing directory): a saved head must not carry the machine it was made on."""
    if not name_or_path:
        return None
    name = str(name_or_path)
    if name.startswith(("/", "./", "../", "~", "\\")) or (len(name) > 1 and name[1] == ":") or os.path.isdir(name):
        return None
    return name


def target_weights(target_config: PretrainedConfig) -> dict[str, Any] | None:
    """Which weights a target runs when they are not its `_name_or_path` checkpoint: a GGUF file (dequantised by
    Transformers), with the Hub repo and revision it came from when the loader recorded them in
    `config.gguf_source` (as [`load_default_target`] does). `None` for an ordinary checkpoint."""
    quantization = getattr(target_config, "quantization_config", None)
    if quantization is not None and not isinstance(quantization, dict):
        quantization = quantization.to_dict()
    source = getattr(target_config, "gguf_source", None)
    if not source and not (quantization or {}).get("gguf_file"):
        return None
    weights = {"gguf_file": (quantization or {}).get("gguf_file"), **(source or {}), "dequantized": True}
    return {k: v for k, v in weights.items() if v is not None}


def tokenizer_fingerprint(tokenizer) -> dict[str, Any]:
    """What identifies a tokenizer for a head: its size, a sha256 of its (token, id) vocabulary and its special ids.

    A head drafts token ids; with a tokenizer that maps text to other ids its drafts are rejected (or, worse, a user
    reads another model's text), so the fingerprint of the target's tokenizer is recorded in [`JetSpecConfig`].
    """
    vocabulary = sorted(tokenizer.get_vocab().items(), key=lambda item: (item[1], item[0]))
    digest = hashlib.sha256(json.dumps(vocabulary, ensure_ascii=False).encode("utf-8")).hexdigest()
    return {
        "name_or_path": hub_name(getattr(tokenizer, "name_or_path", None)),
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
            Config of the head's own decoder layers as a Transformers config dict, with `num_hidden_layers` set to the
            head's depth. Its `model_type` selects the decoder layer, norm and rotary classes the head is built from:
            `"qwen3"` for heads built by [`JetSpecHead.from_target`] whatever the target's family (see
            [`qwen3_draft_config`]; the layout of vLLM's and Transformers' DFlash drafters); heads saved before that
            carry their target's own family (e.g. `"llama"`) and still load.
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
        target_model_type (`str`, *optional*):
            `model_type` of the target (e.g. `"gemma3_text"`); defaults to `draft_config["model_type"]` (heads whose
            layers are their target's own family).
        final_logit_softcapping (`float`, *optional*):
            The target's final-logit softcapping (Gemma 2/3): the head's depth logits through the target's `lm_head`
            are capped the same way, `c * tanh(logits / c)`.
        causal_block (`bool`, *optional*, defaults to `True`):
            Rows of a block attend to earlier rows of the block only (JetSpec). `False`: every row of the block sees
            every other (DFlash's bidirectional block, per-depth marginals); drafting then runs all `block_size` rows
            whatever the depth needed, and a vLLM export writes `dflash_config.causal: false`.
        target_weights (`dict`, *optional*):
            The exact weights the head was trained on when they are not `target_name_or_path`'s own checkpoint, e.g.
            `{"repo_id": ..., "revision": ..., "gguf_file": ..., "dequantized": true}` for a GGUF target (recorded
            by [`JetSpecHead.from_target`]; the card names them as `base_model`).
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
        target_model_type: str | None = None,
        final_logit_softcapping: float | None = None,
        causal_block: bool = True,
        target_weights: dict[str, Any] | None = None,
        **kwargs,
    ):
        # where the target came from and how it was stored (e.g. a GGUF's `quantization_config`) never belongs in a
        # head's config: heads saved before this was stripped at creation lose it on load
        draft_config = {k: v for k, v in (draft_config or {}).items() if k not in _TARGET_ONLY}
        if target_tokenizer is not None:
            target_tokenizer = {**target_tokenizer, "name_or_path": hub_name(target_tokenizer.get("name_or_path"))}
        target_name_or_path = hub_name(target_name_or_path)
        self.draft_config = draft_config
        self.target_model_type = target_model_type or draft_config.get("model_type")
        self.final_logit_softcapping = None if final_logit_softcapping is None else float(final_logit_softcapping)
        self.target_layer_ids = list(target_layer_ids) if target_layer_ids is not None else []
        self.block_size = int(block_size)
        self.target_num_hidden_layers = target_num_hidden_layers
        self.target_name_or_path = target_name_or_path
        self.target_revision = target_revision
        self.target_weights = dict(target_weights) if target_weights else None
        self.training_recipe = training_recipe
        self.target_tokenizer = target_tokenizer
        self.anchor_context = bool(anchor_context)
        self.causal_block = bool(causal_block)
        self.draft_vocab_size = None if draft_vocab_size is None else int(draft_vocab_size)
        # Mirrors of the draft config that generic Transformers code reads (e.g. the vocab-size check of generate()).
        self.vocab_size = draft_config.get("vocab_size")
        self.hidden_size = draft_config.get("hidden_size")
        self.num_hidden_layers = draft_config.get("num_hidden_layers")
        # The target's special tokens at the top level, where Transformers' pipelines and generate() read a model's.
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            setattr(self, name, kwargs.pop(name, draft_config.get(name)))
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

    def to_dict(self) -> dict[str, Any]:
        """`PretrainedConfig.to_dict`, without local paths or the target's storage (also when set after creation)."""
        output = super().to_dict()
        output["draft_config"] = {k: v for k, v in output["draft_config"].items() if k not in _TARGET_ONLY}
        output["target_name_or_path"] = hub_name(output.get("target_name_or_path"))
        if output.get("target_tokenizer"):
            output["target_tokenizer"] = {**output["target_tokenizer"],
                                          "name_or_path": hub_name(output["target_tokenizer"].get("name_or_path"))}
        return output

    @property
    def draft_model_type(self) -> str | None:
        """`model_type` of the head's own decoder layers (`"qwen3"` for heads built by `from_target`)."""
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
        if self.draft_model_type is None:
            raise ValueError("`draft_config` needs a `model_type` (the head's layer family, e.g. 'qwen3')")
        if self.final_logit_softcapping is not None and self.final_logit_softcapping <= 0:
            raise ValueError(f"`final_logit_softcapping` must be > 0 or None, got {self.final_logit_softcapping}")
        if not self.target_layer_ids:
            raise ValueError("`target_layer_ids` must name at least one target layer to tap")
        if self.target_num_hidden_layers is not None:
            bad = [i for i in self.target_layer_ids if not 0 <= i < self.target_num_hidden_layers]
            if bad:
                raise ValueError(
                    f"`target_layer_ids` {bad} out of range for a target with {self.target_num_hidden_layers} layers"
                )

    def to_family_config(self) -> PretrainedConfig:
        """The config (`Qwen3Config`, or `LlamaConfig`, ... for older heads) the head's decoder layers are built with."""
        family = dict(self.draft_config)
        model_type = family.pop("model_type")
        family.pop("layer_types", None)  # re-derived for the head's own depth
        family.pop("transformers_version", None)
        config = AutoConfig.for_model(model_type, **family)
        config._attn_implementation = "sdpa"
        return config


# Target-config fields about where the target came from and how it was stored: never in a head's `draft_config`.
_TARGET_ONLY = ("_name_or_path", "_model_name_or_path", "quantization_config", "transformers_version")
# ... and, for Qwen3 layers built to the target's sizes, its labels, layer types and dtype too.
_NOT_COPIED = _TARGET_ONLY + ("architectures", "id2label", "label2id", "layer_types", "dtype", "torch_dtype")


def target_family_config(target_config: PretrainedConfig) -> dict[str, Any]:
    """The target's own config as a head `draft_config` (`layer_family="target"`), without where it came from or how
    it was quantised."""
    draft_config = target_config.to_dict()
    for key in _TARGET_ONLY:
        draft_config.pop(key, None)
    return draft_config


def _rope_theta(target_config: PretrainedConfig) -> float:
    """The target's (global-attention) RoPE base, or 1e6 when it has none the head can use."""
    rope = getattr(target_config, "rope_parameters", None) or {}
    if isinstance(rope.get("full_attention"), dict):  # per-layer-type RoPE (Gemma 3): the global layers' base
        rope = rope["full_attention"]
    theta = rope.get("rope_theta", getattr(target_config, "rope_theta", None))
    return float(theta) if isinstance(theta, (int, float)) else 1e6


def qwen3_draft_config(target_config: PretrainedConfig, num_hidden_layers: int, **overrides) -> dict[str, Any]:
    """The `draft_config` of a head for `target_config`, whatever its family: Qwen3-style decoder layers (q/k RMSNorm,
    SwiGLU MLP, no biases, plain RoPE) of the target's hidden size (the head shares its embeddings and `lm_head`),
    attention heads, key/value heads and head size. This is the layer layout of vLLM's and Transformers' DFlash drafters.

    Args:
        target_config (`PretrainedConfig`): the target's text config.
        num_hidden_layers (`int`): the head's depth.
        overrides: other `Qwen3Config` fields (e.g. `intermediate_size`).
    """
    from transformers import Qwen3Config

    heads = target_config.num_attention_heads
    fields = dict(
        vocab_size=target_config.vocab_size,
        hidden_size=target_config.hidden_size,
        intermediate_size=getattr(target_config, "intermediate_size", None) or 4 * target_config.hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=heads,
        num_key_value_heads=getattr(target_config, "num_key_value_heads", None) or heads,
        head_dim=getattr(target_config, "head_dim", None) or target_config.hidden_size // heads,
        hidden_act="silu",
        max_position_embeddings=getattr(target_config, "max_position_embeddings", 32768),
        rms_norm_eps=float(getattr(target_config, "rms_norm_eps", None) or 1e-6),
        rope_parameters={"rope_type": "default", "rope_theta": _rope_theta(target_config)},
        attention_bias=False,
        use_sliding_window=False,
        tie_word_embeddings=False,
        bos_token_id=_int_or_none(getattr(target_config, "bos_token_id", None)),
        eos_token_id=_int_or_none(getattr(target_config, "eos_token_id", None)),
        pad_token_id=_int_or_none(getattr(target_config, "pad_token_id", None)),
    )
    fields.update(overrides)
    config = Qwen3Config(**fields).to_dict()
    for key in _NOT_COPIED:
        config.pop(key, None)
    config["model_type"] = "qwen3"
    return config


def _int_or_none(value) -> int | None:
    return value if isinstance(value, int) else None


# Saved heads carry this file and `auto_map`, so `AutoConfig.from_pretrained(head, trust_remote_code=True)` works
# without hf_jetspec installed.
JetSpecConfig.register_for_auto_class()
