"""`JetSpecHead`: the causal parallel draft head, composed from Transformers' own Qwen3 layers for any target.

The head reads hidden states of a few target layers ("taps"), fuses them (`Linear(K*H -> H)` + RMSNorm) into one
context row per committed position, and lets every head layer attend to those rows as extra keys/values (projected
with that layer's own `k_proj`/`v_proj`). The queries are one block per anchor: `[anchor, MASK x (block_size - 1)]`,
causal inside the block. The target's input embeddings and `lm_head` are shared and bound at run time, never saved. The head's own layers are
Qwen3-style whatever the target's family (Llama, Gemma, Phi, ...): only the taps, the embeddings and the `lm_head`
come from the target, so one architecture serves every family and maps onto vLLM's DFlash drafter. Heads saved with
their target's own layer family (before this) still load and run.
"""

from __future__ import annotations

import inspect
import sys
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import DynamicCache, GenerationConfig, PreTrainedModel
from transformers.modeling_outputs import ModelOutput
from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

from .configuration_jetspec import (
    JetSpecConfig,
    default_target_layer_ids,
    qwen3_draft_config,
    target_family_config,
    target_weights,
    tokenizer_fingerprint,
)
from .masks import additive_mask
from .target_logits import softcap


def family_classes(model_type: str) -> tuple[type, type, type, object]:
    """Decoder layer, RMSNorm and rotary-embedding classes (and the modeling module) of a Transformers family.

    Raises:
        `ValueError`: when the family does not follow the `<Name>DecoderLayer/<Name>RMSNorm/<Name>RotaryEmbedding`
            layout that the head composes (Llama, Qwen2/3, Mistral and their kin do).
    """
    base_name = MODEL_MAPPING_NAMES.get(model_type)
    if base_name is None:
        raise ValueError(f"Unknown target architecture {model_type!r}: JetSpec heads support decoder-only LMs.")
    import transformers

    base_cls = getattr(transformers, base_name)
    module = sys.modules[base_cls.__module__]
    prefix = base_name[: -len("Model")]
    names = (f"{prefix}DecoderLayer", f"{prefix}RMSNorm", f"{prefix}RotaryEmbedding")
    found = [getattr(module, name, None) for name in names]
    if any(cls is None for cls in found) or not hasattr(module, "apply_rotary_pos_emb"):
        raise ValueError(
            f"Target architecture {model_type!r} is not supported by JetSpecHead: its modeling module lacks one of "
            f"{names} or `apply_rotary_pos_emb`. Llama- and Qwen-style decoders are supported."
        )
    return (*found, module)


def _load_matching(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copies the tensors of `state` whose names and shapes match `module`'s; leaves the rest as initialised."""
    own = module.state_dict()
    module.load_state_dict({k: v for k, v in state.items() if k in own and own[k].shape == v.shape}, strict=False)


# what `save_pretrained(push_to_hub=True, ...)` hands to `push_to_hub` (Transformers' own save_pretrained passes these)
_PUSH_ARGS = ("private", "revision", "commit_message", "commit_description", "create_pr", "token", "tags")


class JetSpecContextCache(DynamicCache):
    """Per-layer keys/values of the context rows (committed positions only).

    The head's decoder layers call `update` with the keys/values of the query block; those are attended to together
    with the cached context but never stored, so the cache only ever grows by committed positions.
    """

    last_context_row: torch.Tensor | None = None  # fused context row of the last committed position (anchor_context)

    def append_context(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int) -> None:
        super().update(key_states, value_states, layer_idx)

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if layer_idx >= len(self.layers) or not self.layers[layer_idx].is_initialized:
            return key_states, value_states
        layer = self.layers[layer_idx]
        return torch.cat([layer.keys, key_states], dim=-2), torch.cat([layer.values, value_states], dim=-2)


@dataclass
class JetSpecHeadOutput(ModelOutput):
    """
    Args:
        logits (`torch.FloatTensor` of shape `(batch, num_blocks, block_size - 1, vocab_size)`):
            Logits for depths `1 .. block_size - 1` of every block (depth `d` is the token at `anchor_pos + d`).
        last_hidden_state (`torch.FloatTensor` of shape `(batch, num_blocks * block_size, hidden_size)`):
            Final-normed hidden states of all block rows.
        context_cache (`JetSpecContextCache`): the context cache, grown by the context rows of this call (not named
            `past_key_values`: transformers 5.24 renames that field of every `ModelOutput` to `cache`).
    """

    logits: torch.FloatTensor | None = None
    last_hidden_state: torch.FloatTensor | None = None
    context_cache: JetSpecContextCache | None = None


def draft_attention_mask(
    context_position_ids: torch.Tensor,
    anchor_position_ids: torch.Tensor,
    block_size: int,
    dtype: torch.dtype,
    causal: bool = True,
) -> torch.Tensor:
    """Additive 4D mask for blocks of queries over `[context rows, block rows]`.

    Block `j` (anchor at position `a_j`) sees the context rows at positions `< a_j`, and the rows of its own block
    causally (all of them with `causal=False`: a bidirectional block). Context rows are never queries.

    Args:
        context_position_ids (`torch.LongTensor` of shape `(batch, num_context)`): positions of all context rows.
        anchor_position_ids (`torch.LongTensor` of shape `(batch, num_blocks)`): position of each block's anchor.
        block_size (`int`): rows per block.
        dtype (`torch.dtype`): dtype of the returned additive mask.

    Returns:
        `torch.Tensor` of shape `(batch, 1, num_blocks * block_size, num_context + num_blocks * block_size)`:
        0 where attention is allowed, the dtype's minimum elsewhere.
    """
    batch, num_blocks = anchor_position_ids.shape
    rows = num_blocks * block_size
    sees_context = context_position_ids[:, None, :] < anchor_position_ids.repeat_interleave(block_size, dim=1)[..., None]
    block_of_row = torch.arange(rows, device=anchor_position_ids.device) // block_size
    offset_in_block = torch.arange(rows, device=anchor_position_ids.device) % block_size
    sees_block = block_of_row[:, None] == block_of_row[None, :]
    if causal:
        sees_block = sees_block & (offset_in_block[:, None] >= offset_in_block[None, :])
    allowed = torch.cat([sees_context, sees_block.expand(batch, rows, rows)], dim=-1)
    return additive_mask(allowed, dtype)


class JetSpecPreTrainedModel(PreTrainedModel):
    config: JetSpecConfig
    config_class = JetSpecConfig
    base_model_prefix = "jetspec"
    main_input_name = "anchor_ids"
    supports_gradient_checkpointing = True
    _supports_sdpa = True

    def _init_weights(self, module):
        std = self.config.draft_config.get("initializer_range", 0.02)
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, JetSpecHead):
            nn.init.normal_(module.mask_embedding, mean=0.0, std=std)
            if module.depth_embedding is not None:
                # on the scale of context_in(context row) (a std-`std` projection of an RMS-1 row): depths must be
                # told apart from the first step, or every depth drafts the same token
                nn.init.normal_(module.depth_embedding, mean=0.0, std=std * module.depth_embedding.shape[-1] ** 0.5)
        else:
            # norms, and the rotary embedding's non-persistent `inv_freq` (not in the checkpoint: from_pretrained
            # leaves it uninitialised unless recomputed here)
            super()._init_weights(module)


class JetSpecHead(JetSpecPreTrainedModel):
    """A JetSpec draft head. Pass it as `assistant_model` to the target's `generate()` after `import hf_jetspec`.

    Example:

    ```python
    >>> import hf_jetspec
    >>> from hf_jetspec import JetSpecHead
    >>> head = JetSpecHead.from_pretrained("path/to/head")  # or JetSpecHead.from_target(target, num_hidden_layers=1)
    >>> out = target.generate(**inputs, assistant_model=head, max_new_tokens=128)
    ```
    """

    def __init__(self, config: JetSpecConfig):
        super().__init__(config)
        family_config = config.to_family_config()
        decoder_layer_cls, norm_cls, rotary_cls, self._family_module = family_classes(config.draft_model_type)
        hidden = family_config.hidden_size
        self.fc = nn.Linear(len(config.target_layer_ids) * hidden, hidden, bias=False)
        self.context_norm = norm_cls(hidden, eps=family_config.rms_norm_eps)
        self.mask_embedding = nn.Parameter(torch.zeros(hidden))
        # anchor_context: every block row also gets proj(context row at anchor - 1), the anchor embedding and a
        # per-depth embedding, so the target's last state reaches the block without attention having to find it.
        self.context_in = nn.Linear(hidden, hidden, bias=False) if config.anchor_context else None
        self.depth_embedding = nn.Parameter(torch.zeros(config.block_size, hidden)) if config.anchor_context else None
        self.layers = nn.ModuleList(
            [decoder_layer_cls(family_config, layer_idx) for layer_idx in range(family_config.num_hidden_layers)]
        )
        for layer in self.layers:
            # the layers only read the context cache (`JetSpecContextCache.update` stores nothing; context rows are
            # appended before the layers run), so activation checkpointing's recompute sees the same keys: keep it
            layer._can_checkpoint_with_cache = True
        # the layers' KV-cache argument: `cache` from transformers 5.24 (where `past_key_values` warns), before that
        # `past_key_values`
        self._layer_cache_kwarg = "cache" if "cache" in inspect.signature(decoder_layer_cls.forward).parameters \
            else "past_key_values"
        self.norm = norm_cls(hidden, eps=family_config.rms_norm_eps)
        self.rotary_emb = rotary_cls(config=family_config)
        # the draft vocabulary (increasing token ids; see draft_vocab.py), saved with the weights; -1 until loaded/set
        if config.draft_vocab_size is not None:
            self.register_buffer("draft_vocab", torch.full((config.draft_vocab_size,), -1, dtype=torch.long))
        else:
            self.draft_vocab = None
        self._target_modules: tuple[nn.Module, nn.Module] | None = None  # (input embeddings, lm_head); not submodules
        self.last_generate_stats = None
        # (tokenizer that passed check_tokenizer, (its size, the recorded vocabulary hash it matched))
        self._checked_tokenizer: tuple[weakref.ref, tuple[int, str | None]] | None = None
        self.post_init()
        # tree_budget: nodes per tree (root included) or "auto" (sized per round from a measured cost model, capped
        # at tree_max_budget, default: the largest size the calibration timed); tree_topk: candidates per depth;
        # packed_weights_max_mb: cap on the target's packed weight copies (None: HF_JETSPEC_PACKED_MAX_MB, else a
        # quarter of the available memory; 0: no packing; see packed_linear.py).
        self.generation_config = GenerationConfig(tree_budget="auto", tree_topk=7, tree_max_budget=None,
                                                  packed_weights_max_mb=None)

    # ------------------------------------------------------------------ files
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs) -> JetSpecHead:
        """Loads a head from a folder or a Hub repo id (the Hugging Face cache works offline), safetensors only.

        The tree settings come back from `generation_config.json` when the folder has one. Bind the head to its
        target with [`bind`] (or let `generate(assistant_model=head)` do it).

        Raises:
            `ValueError`: pickled weights requested or only pickles present, a config of another `model_type`, or
                a truncated/corrupt safetensors file.
            `OSError`: no weights file.
        """
        if kwargs.get("use_safetensors") is False:
            raise ValueError("JetSpec heads load from safetensors only; pickled checkpoints are refused.")
        kwargs["use_safetensors"] = True
        hub_kwargs = {key: kwargs[key] for key in ("cache_dir", "revision", "token", "local_files_only", "subfolder")
                      if key in kwargs}
        try:
            head = super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        except Exception as error:  # re-raised with the fix when it is a damaged or pickled checkpoint
            text = str(error)
            if "deserializing header" in text or "incomplete metadata" in text or type(error).__name__ == "SafetensorError":
                raise ValueError(
                    f"The weights of the JetSpec head at {pretrained_model_name_or_path} are truncated or corrupt "
                    f"({text}). Download or save the head again."
                ) from error
            local = Path(str(pretrained_model_name_or_path))
            if local.is_dir() and any(any(local.glob(pattern)) for pattern in ("*.bin", "*.pt", "*.pth", "*.pkl")):
                raise ValueError(
                    f"No safetensors weights for the JetSpec head at {pretrained_model_name_or_path}; pickled "
                    f"checkpoints (pytorch_model.bin) are refused. Convert them with safetensors' save_file."
                ) from error
            raise
        try:
            head.generation_config = GenerationConfig.from_pretrained(pretrained_model_name_or_path, **hub_kwargs)
        except OSError as error:
            if "valid JSON" in str(error):
                raise ValueError(
                    f"The JetSpec head at {pretrained_model_name_or_path} has a malformed generation_config.json "
                    f"({error}). Fix or delete that file (the tree settings then take their defaults)."
                ) from error
            # no generation_config.json: keep the defaults
        try:  # absolute, so a head repo's copy of this file (trust_remote_code, no hf_jetspec) loads without it
            from hf_jetspec.settings import validate_tree_settings
        except ImportError:  # no hf_jetspec: nothing here drafts with the tree settings, so nothing to validate
            validate_tree_settings = None
        try:
            if validate_tree_settings is not None:
                validate_tree_settings(head.generation_config)
        except ValueError as error:
            raise ValueError(
                f"The tree settings in the generation_config.json of the JetSpec head at "
                f"{pretrained_model_name_or_path} are invalid: {error}. Fix that file."
            ) from None
        if head.draft_vocab is not None:
            try:
                head._check_draft_vocab(head.draft_vocab)
            except ValueError as error:
                raise ValueError(
                    f"The JetSpec head at {pretrained_model_name_or_path} declares draft_vocab_size="
                    f"{head.config.draft_vocab_size} but its weights hold no valid `draft_vocab` ({error}). Save the "
                    f"head again, or drop `draft_vocab_size` from its config.json to draft over the whole vocabulary."
                ) from None
        return head

    def _check_draft_vocab(self, token_ids: torch.Tensor) -> None:
        vocab_size = self.config.vocab_size
        if token_ids.dim() != 1 or token_ids.numel() == 0:
            raise ValueError(f"a draft vocabulary is a non-empty 1-D tensor of token ids, got shape {tuple(token_ids.shape)}")
        if int(token_ids.min()) < 0 or (vocab_size is not None and int(token_ids.max()) >= vocab_size):
            raise ValueError(f"draft vocabulary ids must lie in [0, {vocab_size})")
        if token_ids.numel() > 1 and not bool((token_ids[1:] > token_ids[:-1]).all()):
            raise ValueError("draft vocabulary ids must be strictly increasing (sorted, no repeats)")

    def set_draft_vocab(self, token_ids: torch.Tensor | list[int] | None) -> JetSpecHead:
        """Sets the token ids the head scores when drafting (`None`: the whole vocabulary), e.g. from
        `draft_vocab.select_draft_vocab(draft_vocab.token_counts(responses, vocab_size), 8192)`. Lossless: only the
        trees change. Updates `config.draft_vocab_size`; the ids are saved with the weights."""
        if token_ids is None:
            if "draft_vocab" in self._buffers:
                del self._buffers["draft_vocab"]
            self.draft_vocab = None
            self.config.draft_vocab_size = None
            return self
        token_ids = torch.as_tensor(token_ids, dtype=torch.long).flatten().sort().values
        self._check_draft_vocab(token_ids)
        if "draft_vocab" not in self._buffers:
            del self.draft_vocab
            self.register_buffer("draft_vocab", token_ids.to(self.device))
        else:
            self.draft_vocab = token_ids.to(self.device)
        self.config.draft_vocab_size = token_ids.numel()
        return self

    def save_pretrained(self, save_directory, *args, push_to_hub: bool = False, **kwargs) -> None:
        """`PreTrainedModel.save_pretrained` plus the tree settings (`generation_config.json`).

        Only the head's own weights are written (the target's embeddings and lm_head are bound, not owned), with the
        modeling code and `auto_map` (so `trust_remote_code=True` loads the head without hf_jetspec). With
        `push_to_hub=True` the folder then goes to `repo_id` (default: the folder's name) through `push_to_hub`, which
        takes `private`, `revision`, `commit_message`, `commit_description`, `create_pr`, `token` and `tags`.
        """
        repo_id = kwargs.pop("repo_id", None)
        hub_kwargs = {name: kwargs.pop(name) for name in _PUSH_ARGS if name in kwargs} if push_to_hub else {}
        super().save_pretrained(save_directory, *args, **kwargs)
        self.generation_config.save_pretrained(save_directory)
        if push_to_hub:
            self.push_to_hub(repo_id or Path(save_directory).name, **hub_kwargs)

    # ------------------------------------------------------------------ binding to a target
    @classmethod
    def from_target(
        cls,
        target_model: PreTrainedModel,
        num_hidden_layers: int = 1,
        block_size: int = 16,
        target_layer_ids: list[int] | None = None,
        init_from_target: bool = True,
        tokenizer=None,
        anchor_context: bool = True,
        layer_family: str = "qwen3",
        causal_block: bool = True,
        **draft_overrides,
    ) -> JetSpecHead:
        """Builds a fresh head for `target_model` (random fc/mask; decoder layers copied from the target's last ones).

        Args:
            target_model (`PreTrainedModel`): the causal LM the head drafts for, of any decoder family.
            num_hidden_layers (`int`, *optional*, defaults to 1): decoder layers in the head.
            block_size (`int`, *optional*, defaults to 16): anchor + drafted depths per block.
            target_layer_ids (`list[int]`, *optional*): tapped target layers; default evenly spaced (see
                [`default_target_layer_ids`]) with `max(num_hidden_layers, 3)` taps.
            init_from_target (`bool`, *optional*, defaults to `True`): copy the weights of the target's last
                `num_hidden_layers` decoder layers and its final norm into the head, where names and shapes match
                (all of them for a Qwen3 target; the projections and norms of Llama-style layers).
            anchor_context (`bool`, *optional*, defaults to `True`): see [`JetSpecConfig`]. `False` gives a head that
                vLLM's DFlash drafter runs exactly (see `export_vllm`).
            layer_family (`str`, *optional*, defaults to `"qwen3"`): the head's own layers. `"qwen3"`: Qwen3-style
                layers of the target's sizes for every target family ([`qwen3_draft_config`]); `"target"`: the
                target's own family's layers, as heads were built before (Llama/Qwen-style families only).
            causal_block (`bool`, *optional*, defaults to `True`): a causal block (JetSpec), or `False` for a
                bidirectional one (DFlash; see [`JetSpecConfig`]).
            tokenizer (*optional*): the target's tokenizer; its [`tokenizer_fingerprint`] is recorded so that a
                different tokenizer is refused later (see [`check_tokenizer`]).
            draft_overrides: other fields of the head's layer config to override (e.g. `intermediate_size`); the
                layers then start from random weights, since the target's no longer fit.
        """
        target_config = target_model.config.get_text_config()
        num_target_layers = target_config.num_hidden_layers
        if target_layer_ids is None:
            target_layer_ids = default_target_layer_ids(num_target_layers, max(num_hidden_layers, 3))
        if layer_family == "qwen3":
            draft_config = qwen3_draft_config(target_config, num_hidden_layers, **draft_overrides)
        elif layer_family == "target":
            draft_config = target_family_config(target_config)
            draft_config.update(num_hidden_layers=num_hidden_layers, **draft_overrides)
        else:
            raise ValueError(f"`layer_family` must be 'qwen3' or 'target', got {layer_family!r}")
        config = JetSpecConfig(
            draft_config=draft_config,
            target_layer_ids=target_layer_ids,
            block_size=block_size,
            target_num_hidden_layers=num_target_layers,
            target_name_or_path=getattr(target_config, "_name_or_path", None) or None,
            target_tokenizer=tokenizer_fingerprint(tokenizer) if tokenizer is not None else None,
            anchor_context=anchor_context,
            causal_block=causal_block,
            target_model_type=target_config.model_type,
            final_logit_softcapping=getattr(target_config, "final_logit_softcapping", None),
            target_weights=target_weights(target_config),
        )
        head = cls(config).to(device=target_model.device, dtype=target_model.dtype)
        if init_from_target and not draft_overrides:
            decoder = getattr(target_model, target_model.base_model_prefix)
            for head_layer, target_layer in zip(head.layers, decoder.layers[-num_hidden_layers:]):
                _load_matching(head_layer, target_layer.state_dict())
            _load_matching(head.norm, decoder.norm.state_dict())
        head.bind(target_model)
        return head

    def check_compatible(self, target_model: PreTrainedModel) -> None:
        """Raises a `ValueError` naming both sides when this head was built for another target."""
        target_config = target_model.config.get_text_config()
        draft = self.config.draft_config
        checks = {
            "vocab_size": (draft.get("vocab_size"), target_config.vocab_size),
            "hidden_size": (draft.get("hidden_size"), target_config.hidden_size),
            "num_hidden_layers": (self.config.target_num_hidden_layers, target_config.num_hidden_layers),
            "model_type": (self.config.target_model_type, target_config.model_type),
        }
        mismatches = [f"{name}: head expects {want}, target has {got}" for name, (want, got) in checks.items() if want != got]
        if mismatches:
            raise ValueError(
                f"This JetSpec head was built for another target ({self.config.target_name_or_path or 'unknown'}) "
                f"than {getattr(target_config, '_name_or_path', '') or type(target_model).__name__}: "
                + "; ".join(mismatches)
                + ". Use a head trained for this target, or build one with `JetSpecHead.from_target(target)`."
            )

    def check_tokenizer(self, tokenizer) -> None:
        """Raises a `ValueError` naming both sides when `tokenizer` is not the one this head was trained with.

        Heads record the [`tokenizer_fingerprint`] of their target's tokenizer (`config.target_tokenizer`); a head
        without one (built before it was recorded) accepts any tokenizer of the right size.
        """
        # generate(tokenizer=...) checks on every call; hashing a 49k vocabulary costs ~0.2 s, so a tokenizer object
        # that already passed (and has not grown since) is not hashed again
        recorded = self.config.target_tokenizer
        if recorded is None:
            vocab_size = self.config.draft_config.get("vocab_size")
            if vocab_size is not None and len(tokenizer) > vocab_size:
                raise ValueError(
                    f"This JetSpec head drafts over {vocab_size} token ids, but the tokenizer "
                    f"{getattr(tokenizer, 'name_or_path', None) or type(tokenizer).__name__} has {len(tokenizer)}: it "
                    "belongs to another model. Use the target's own tokenizer."
                )
            return
        key = (len(tokenizer), recorded.get("vocab_sha256"))
        checked = self._checked_tokenizer
        if checked is not None and checked[0]() is tokenizer and checked[1] == key:
            return
        got = tokenizer_fingerprint(tokenizer)
        fields = ("vocab_size", "vocab_sha256", "bos_token_id", "eos_token_id")
        mismatches = [f"{key}: head expects {recorded.get(key)}, tokenizer has {got[key]}" for key in fields
                      if recorded.get(key) != got[key]]
        if mismatches:
            raise ValueError(
                f"This JetSpec head was trained with the tokenizer of {recorded.get('name_or_path') or 'its target'}, "
                f"not with {got['name_or_path'] or type(tokenizer).__name__}: " + "; ".join(mismatches)
                + ". Its drafts are token ids of that tokenizer: use the target's own tokenizer, or a head trained "
                "for this one."
            )
        self._checked_tokenizer = (weakref.ref(tokenizer), key)

    def bind(self, target_model: PreTrainedModel, tokenizer=None) -> JetSpecHead:
        """Shares the target's input embeddings and `lm_head` with the head (checked for compatibility first, and
        `tokenizer` against the recorded one when given).

        A head in eval mode (as `from_pretrained` returns it) follows the target: it is moved, in place, to the
        device of the target's `lm_head` and cast to the target's dtype. A head in training mode is left where it is
        (its optimizer holds its parameters).
        """
        self.check_compatible(target_model)
        if tokenizer is not None:
            self.check_tokenizer(tokenizer)
        if not self.training:
            device, dtype = target_model.get_output_embeddings().weight.device, target_model.dtype
            if self.device != device or self.dtype != dtype:
                self.to(device=device, dtype=dtype)
        self._target_modules = (target_model.get_input_embeddings(), target_model.get_output_embeddings())
        return self

    def _bound(self) -> tuple[nn.Module, nn.Module]:
        if self._target_modules is None:
            raise RuntimeError(
                "This JetSpec head is not bound to a target yet: call `head.bind(target_model)` or pass it to "
                "`target_model.generate(..., assistant_model=head)`, which binds it."
            )
        return self._target_modules

    # ------------------------------------------------------------------ forward
    def softcap(self, logits: torch.Tensor) -> torch.Tensor:
        """The target's final-logit softcapping (Gemma 2/3) applied to logits through its `lm_head`; identity else."""
        return softcap(logits, self.config.final_logit_softcapping)

    def rows_for_depth(self, depth: int) -> int:
        """Block rows to run for drafting `depth` depths: `depth + 1` in a causal block, all of them otherwise."""
        return depth + 1 if self.config.causal_block else self.config.block_size

    def fuse_context(self, tap_hidden_states: torch.Tensor) -> torch.Tensor:
        """`(batch, n, K*H)` concatenated tap hidden states -> `(batch, n, H)` context rows."""
        return self.context_norm(self.fc(tap_hidden_states))

    def _append_context(self, context: torch.Tensor, position_ids: torch.Tensor, cache: JetSpecContextCache) -> None:
        cos, sin = self.rotary_emb(context, position_ids)
        for layer_idx, layer in enumerate(self.layers):
            attn = layer.self_attn
            shape = (*context.shape[:-1], -1, attn.head_dim)
            keys = attn.k_proj(context).view(shape)
            if hasattr(attn, "k_norm"):
                keys = attn.k_norm(keys)
            keys = keys.transpose(1, 2)
            values = attn.v_proj(context).view(shape).transpose(1, 2)
            _, keys = self._family_module.apply_rotary_pos_emb(keys, keys, cos, sin)
            cache.append_context(keys, values, layer_idx)

    @staticmethod
    def _previous_context_rows(fused, context_position_ids, anchor_position_ids, cache) -> torch.Tensor:
        """The fused context row at `anchor - 1` for every block, `(batch, num_blocks, H)`: taken from this call's new
        context rows (training passes them all; positions contiguous) or, for anchors right after the cached rows
        (generation), the last row of an earlier call."""
        cached = cache.last_context_row
        if fused is not None:
            index = anchor_position_ids - 1 - context_position_ids[:, :1]
            if bool((index >= fused.shape[1]).any()):
                raise ValueError("an anchor lies beyond the context rows it is drafted after")
            rows = fused.gather(1, index.clamp_min(0)[..., None].expand(-1, -1, fused.shape[-1]))
            cache.last_context_row = fused[:, -1].detach()
            if bool((index >= 0).all()):
                return rows
        if cached is None:  # no row before the anchor (padding blocks in training, or an anchor at position 0)
            if fused is None:
                raise ValueError("a head with anchor_context needs the context rows up to each anchor")
            cached = torch.zeros_like(fused[:, 0])
        previous = cached[:, None].expand(-1, anchor_position_ids.shape[1], -1)
        return previous if fused is None else torch.where((index >= 0)[..., None], rows, previous)

    def forward(
        self,
        anchor_ids: torch.LongTensor,
        anchor_position_ids: torch.LongTensor,
        context_features: torch.Tensor | None = None,
        context_position_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values: JetSpecContextCache | None = None,
        logits_to_keep: bool = True,
        block_rows: int | None = None,
    ) -> JetSpecHeadOutput:
        r"""
        Args:
            anchor_ids (`torch.LongTensor` of shape `(batch, num_blocks)`): the anchor token of each block.
            anchor_position_ids (`torch.LongTensor` of shape `(batch, num_blocks)`): the anchor's position.
            context_features (`torch.Tensor` of shape `(batch, n, K*H)`, *optional*): NEW concatenated tap hidden
                states (rows not yet in `past_key_values`).
            context_position_ids (`torch.LongTensor` of shape `(batch, n)`, *optional*): their positions.
            attention_mask (`torch.Tensor` of shape `(batch, 1, num_blocks * block_size, total_context + num_blocks * block_size)`, *optional*):
                additive mask; by default built with [`draft_attention_mask`] assuming the cached and new context
                rows sit at positions `0 .. total_context - 1` (the generation case).
            past_key_values (`JetSpecContextCache`, *optional*): context keys/values of earlier calls.
            logits_to_keep (`bool`, *optional*, defaults to `True`): compute depth logits with the target's lm_head.
            block_rows (`int`, *optional*): rows of each block to run, anchor included (default: `block_size`). A
                causal block's first rows come out the same without the rest: drafting `d` depths needs `d + 1`
                ([`rows_for_depth`]). Outputs then have `block_rows` rows per block (and `attention_mask` must match).
                A bidirectional block (`causal_block=False`) always runs all its rows.
        """
        embed_tokens, lm_head = self._bound()
        if block_rows is None:
            block_rows = self.config.block_size
        elif not 1 <= block_rows <= self.config.block_size:
            raise ValueError(f"`block_rows` must lie in [1, {self.config.block_size}] (the head's block), got {block_rows}")
        elif not self.config.causal_block and block_rows != self.config.block_size:
            raise ValueError(f"this head's block is bidirectional (causal_block=False): every row sees every other, so "
                             f"all {self.config.block_size} rows must run, got block_rows={block_rows}")
        batch, num_blocks = anchor_ids.shape
        cache = past_key_values if past_key_values is not None else JetSpecContextCache()

        fused = None
        if context_features is not None and context_features.shape[1] > 0:
            fused = self.fuse_context(context_features)
            self._append_context(fused, context_position_ids, cache)

        # Block rows: [anchor embedding, MASK x (block_rows - 1)] at positions anchor + 0 .. block_rows - 1.
        anchor_embeds = embed_tokens(anchor_ids)  # (batch, num_blocks, H)
        mask_embeds = self.mask_embedding.to(anchor_embeds.dtype).expand(batch, num_blocks, block_rows - 1, -1)
        hidden_states = torch.cat([anchor_embeds[:, :, None], mask_embeds], dim=2)
        if self.config.anchor_context:
            previous = self._previous_context_rows(fused, context_position_ids, anchor_position_ids, cache)
            state = self.context_in(previous.to(hidden_states.dtype))  # (batch, num_blocks, H)
            # anchor row: + state; MASK rows: + state + anchor embedding; every row: + its depth's embedding
            extra = torch.cat([state[:, :, None], (state + anchor_embeds)[:, :, None].expand(-1, -1, block_rows - 1, -1)], dim=2)
            hidden_states = hidden_states + extra + self.depth_embedding[:block_rows].to(hidden_states.dtype)
        hidden_states = hidden_states.flatten(1, 2)
        offsets = torch.arange(block_rows, device=anchor_ids.device)
        position_ids = (anchor_position_ids[..., None] + offsets).flatten(1)

        if attention_mask is None:
            total_context = cache.get_seq_length()
            all_context_positions = torch.arange(total_context, device=anchor_ids.device).expand(batch, -1)
            attention_mask = draft_attention_mask(all_context_positions, anchor_position_ids, block_rows,
                                                  hidden_states.dtype, causal=self.config.causal_block)

        position_embeddings = self.rotary_emb(hidden_states, position_ids)
        for layer in self.layers:
            hidden_states = layer(
                hidden_states,
                attention_mask=attention_mask,
                position_ids=position_ids,
                position_embeddings=position_embeddings,
                **{self._layer_cache_kwarg: cache},
            )
        hidden_states = self.norm(hidden_states)

        logits = None
        if logits_to_keep:
            drafted = hidden_states.view(batch, num_blocks, block_rows, -1)[:, :, 1:]
            logits = self.softcap(lm_head(drafted))
        return JetSpecHeadOutput(logits=logits, last_hidden_state=hidden_states, context_cache=cache)


# Saved heads carry this file (and the ones it imports relatively) plus `auto_map`: without hf_jetspec installed,
# `AutoModel.from_pretrained(head, trust_remote_code=True)` gives a working head (bind it to its target to draft).
JetSpecHead.register_for_auto_class("AutoModel")
