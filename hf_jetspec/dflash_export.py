"""Export a JetSpec head to Transformers' built-in DFlash drafter (`muse_glimmer_assistant`).

Transformers (5.23) drafts with a DFlash model when `generate()` gets `speculation_type="dflash"` and an
`assistant_model` of type `muse_glimmer_assistant` (`GenerationMixin._get_candidate_generator` ->
`DFlashTokenCandidateGenerator`): one forward per round drafts a chain of `block_size - 1` tokens, verified by the
standard assisted-decoding loop. That drafter has the same block design as a JetSpec head, and for some heads the
drafting math is identical:

JetSpecHead vs MuseGlimmerAssistantModel (DFlash):

- context rows: `context_norm(fc(concat taps))` vs `encoder.output_norm_enc(encoder.fc(...))`; taps are
  `hidden_states[i + 1]` for `target_layer_ids` in both. Same.
- context K/V: every layer's own `k_proj` -> `k_norm` -> RoPE at the rows' positions and `v_proj`, applied to the
  fused rows without the input norm, cached once per committed position. Same.
- block rows: `[embed(anchor), mask_embedding x (B - 1)]` vs `[embed(anchor), embed(mask_token_id) x (B - 1)]`, at
  positions `anchor + 0 .. B - 1` in both. Same when `mask_embedding` is a row of the target's embeddings.
- layers: the target family's decoder layers vs Qwen3-style layers (q/k RMSNorm over head_dim, no biases, SwiGLU).
  Same for Qwen3 targets.
- block attention: context rows before the anchor + causal inside the block vs context rows + bidirectional inside
  the block. Differs: reproduced by the attention below.
- output: final `norm`, then the target's `lm_head` on rows `1 .. B - 1`. Same.
- `anchor_context` (`context_in(row at anchor - 1)` + a per-depth embedding added to every row): no counterpart.

So a head exports exactly when (see [`dflash_incompatibility`]):

- its decoder layers are Qwen3 layers (target `model_type == "qwen3"`): MuseGlimmerAssistant attention always
  applies `q_norm`/`k_norm` and has no projection biases, which Llama/Mistral (no q/k norm) and Qwen2 (biases) lack;
- `anchor_context=False`;
- its learned `mask_embedding` equals, bit for bit, a row of the target's input embeddings (that token becomes
  `mask_token_id`), since DFlash embeds the MASK rows with the target's embedding table.

The intra-block causality is reproduced by the attention implementation `"jetspec_block_causal"` (registered on
`import hf_jetspec`, SDPA with the block rows masked causally), which the exported `config.json` names: loading the
folder without `import hf_jetspec` fails loudly instead of drafting with bidirectional block attention. Runtimes
that ignore it (or `attn_implementation="sdpa"` passed at load) draft differently; the output stays lossless but the
drafts are not this head's. Layers are exported as `full_attention` (the head attends to all context rows).

Use:

```python
>>> import hf_jetspec
>>> from transformers import AutoModel
>>> path = hf_jetspec.export_dflash(head, "head-dflash")      # head bound to (or built from) its Qwen3 target
>>> draft = AutoModel.from_pretrained(path).to(target.device)  # MuseGlimmerAssistantModel
>>> out = target.generate(input_ids, assistant_model=draft, speculation_type="dflash", do_sample=False)
```
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AttentionInterface, MuseGlimmerAssistantConfig, MuseGlimmerAssistantModel
from transformers.cache_utils import DFlashCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .modeling_jetspec import JetSpecHead

DFLASH_ATTENTION = "jetspec_block_causal"
EXPORTABLE_FAMILIES = ("qwen3",)
_FAMILY_DIFFERENCES = {
    "llama": "Llama layers have no q/k RMSNorm (a unit-weight RMSNorm is not the identity)",
    "mistral": "Mistral layers have no q/k RMSNorm (a unit-weight RMSNorm is not the identity)",
    "qwen2": "Qwen2 layers have q/k/v projection biases and no q/k RMSNorm",
}


# ---------------------------------------------------------------------------------------------- attention
def block_causal_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """SDPA where the query rows (the last `q_length` keys: one DFlash block) see all earlier keys (context rows) and
    the block causally, as a JetSpec head is trained; `attention_mask` (bool or additive, e.g. padding) still applies.
    """
    q_length, kv_length = query.shape[2], key.shape[2]
    allowed = torch.ones(q_length, kv_length, dtype=torch.bool, device=query.device).tril(kv_length - q_length)
    if attention_mask is None:
        mask = allowed[None, None]
    elif attention_mask.dtype == torch.bool:
        mask = attention_mask & allowed
    else:
        mask = attention_mask.masked_fill(~allowed, torch.finfo(attention_mask.dtype).min)
    return sdpa_attention_forward(module, query, key, value, mask, dropout=dropout, scaling=scaling, **kwargs)


def register_block_causal_attention() -> None:
    """Registers `"jetspec_block_causal"` in Transformers' attention and mask interfaces (idempotent)."""
    AttentionInterface.register(DFLASH_ATTENTION, block_causal_attention_forward)
    AttentionMaskInterface.register(DFLASH_ATTENTION, sdpa_mask)


register_block_causal_attention()


# ---------------------------------------------------------------------------------------------- mapping
def dflash_config(head: JetSpecHead, mask_token_id: int) -> MuseGlimmerAssistantConfig:
    """The `MuseGlimmerAssistantConfig` of `head`'s export (layers as `full_attention`)."""
    family = head.config.to_family_config()
    target = head.config.draft_config
    ids = {name: target.get(name) if isinstance(target.get(name), int) else None
           for name in ("bos_token_id", "eos_token_id", "pad_token_id")}
    config = MuseGlimmerAssistantConfig(
        hidden_size=family.hidden_size,
        intermediate_size=family.intermediate_size,
        num_hidden_layers=family.num_hidden_layers,
        num_attention_heads=family.num_attention_heads,
        num_key_value_heads=family.num_key_value_heads,
        head_dim=getattr(family, "head_dim", None) or family.hidden_size // family.num_attention_heads,
        rms_norm_eps=family.rms_norm_eps,
        rope_parameters=dict(family.rope_parameters),
        max_position_embeddings=family.max_position_embeddings,
        layer_types=["full_attention"] * family.num_hidden_layers,
        attention_dropout=family.attention_dropout,
        hidden_act=family.hidden_act,
        block_size=head.config.block_size,
        mask_token_id=int(mask_token_id),
        target_layer_ids=list(head.config.target_layer_ids),
        **ids,
    )
    config.architectures = ["MuseGlimmerAssistantModel"]
    config.dtype = head.dtype
    return config


def _exported_state_dict(head: JetSpecHead) -> dict[str, torch.Tensor]:
    renames = {"fc.weight": "encoder.fc.weight", "context_norm.weight": "encoder.output_norm_enc.weight"}
    return {renames.get(name, name): tensor for name, tensor in head.state_dict().items() if name != "mask_embedding"}


def _layout_mismatch(head: JetSpecHead) -> str | None:
    """Compares the head's weights (renamed) with a MuseGlimmerAssistantModel's, names and shapes."""
    with torch.device("meta"):
        reference = MuseGlimmerAssistantModel(dflash_config(head, 0)).state_dict()
    ours = _exported_state_dict(head)
    problems = [f"{name} only in the head" for name in sorted(set(ours) - set(reference))]
    problems += [f"{name} missing from the head" for name in sorted(set(reference) - set(ours))]
    problems += [f"{name}: head {tuple(ours[name].shape)} vs {tuple(reference[name].shape)}"
                 for name in sorted(set(ours) & set(reference)) if ours[name].shape != reference[name].shape]
    return ", ".join(problems[:6]) + (" ..." if len(problems) > 6 else "") if problems else None


@torch.no_grad()
def _mask_token(head: JetSpecHead, embeddings: torch.nn.Module) -> tuple[int | None, int, float]:
    """`(token id whose embedding equals mask_embedding | None, closest token id, its max |difference|)`."""
    weight = embeddings.weight
    vocab = weight.shape[0]
    mask = head.mask_embedding.detach().to(device=weight.device, dtype=weight.dtype)
    closest, closest_diff = 0, float("inf")
    for start in range(0, vocab, 4096):
        rows = embeddings(torch.arange(start, min(start + 4096, vocab), device=weight.device))
        equal = (rows == mask).all(-1).nonzero()
        if equal.numel():
            return start + int(equal[0, 0]), start + int(equal[0, 0]), 0.0
        diff = (rows.float() - mask.float()).abs().amax(-1)
        best = int(diff.argmin())
        if float(diff[best]) < closest_diff:
            closest, closest_diff = start + best, float(diff[best])
    return None, closest, closest_diff


def _embeddings(head: JetSpecHead, target_model) -> torch.nn.Module | None:
    if target_model is not None:
        head.check_compatible(target_model)
        return target_model.get_input_embeddings()
    return head._target_modules[0] if head._target_modules is not None else None


def _incompatibility(head, target_model=None) -> tuple[str | None, int | None]:
    if not isinstance(head, JetSpecHead):
        base = head.get_base_model() if hasattr(head, "get_base_model") else None
        if isinstance(base, JetSpecHead):
            return ("it is an adapter-wrapped (PEFT) JetSpec head: merge the adapters into the head first "
                    "(`head = head.merge_and_unload()`), then export."), None
        return f"{type(head).__name__} is not a JetSpecHead.", None
    reasons = []
    if head.config.anchor_context:
        reasons.append(
            "anchor_context=True: every block row adds context_in(fused context row at anchor - 1) and a learned "
            "per-depth embedding to its input, and DFlash's drafter has no counterpart (its only inputs are the "
            "target's embeddings of [anchor, mask_token_id x (block_size - 1)] and the context rows as K/V). Export "
            "a head trained with anchor_context=False (`JetSpecHead.from_target(target, anchor_context=False)`, or "
            "`anchor_context: false` in the training recipe)"
        )
    if head.draft_vocab is not None:
        reasons.append(
            f"it drafts over a {head.draft_vocab.numel()}-token draft vocabulary, and DFlash's drafter scores the "
            f"whole vocabulary. Export a copy without it (`head.set_draft_vocab(None)`): its drafts then differ only "
            f"where the head's best token lies outside that vocabulary"
        )
    model_type = head.config.draft_model_type
    if model_type not in EXPORTABLE_FAMILIES:
        reasons.append(
            f"its decoder layers are {model_type!r} layers, but MuseGlimmerAssistant layers are Qwen3-style (q/k "
            f"RMSNorm over head_dim always applied, no projection biases, SwiGLU MLP)"
            + (f": {_FAMILY_DIFFERENCES[model_type]}" if model_type in _FAMILY_DIFFERENCES else "")
            + ". Only heads of Qwen3 targets (model_type 'qwen3') export exactly"
        )
    else:
        mismatch = _layout_mismatch(head)
        if mismatch:
            reasons.append(f"its weights do not match MuseGlimmerAssistant's layout ({mismatch})")
    mask_token_id = None
    embeddings = _embeddings(head, target_model)
    if embeddings is None:
        reasons.append(
            "the head is not bound to its target, so its mask_embedding cannot be matched to a token of the target's "
            "embeddings: pass `target_model=` or call `head.bind(target)` first"
        )
    else:
        mask_token_id, closest, diff = _mask_token(head, embeddings)
        if mask_token_id is None:
            reasons.append(
                "its MASK rows use a learned mask_embedding vector, but DFlash embeds them with the target's "
                "embedding of config.mask_token_id, and no row of the target's input embeddings equals the vector "
                f"(closest: token {closest}, max |difference| {diff:.3g}). Train the head with mask_embedding copied "
                "from an existing token's embedding (e.g. an unused special token) and frozen; copying a row in after "
                "training would change what the head drafts"
            )
    if not reasons:
        return None, mask_token_id
    return ("This JetSpec head cannot be exported to Transformers' DFlash drafter (muse_glimmer_assistant) with "
            "identical drafts: " + "; ".join(reasons) + "."), None


def dflash_incompatibility(head, target_model=None) -> str | None:
    """Why `head` cannot be exported to Transformers' DFlash drafter with identical drafting math, or `None`.

    Args:
        head ([`JetSpecHead`]): the head; bound to its target (as after `from_target` or `generate()`), or give
            `target_model`.
        target_model (`PreTrainedModel`, *optional*): the target, to match `mask_embedding` to one of its tokens.
    """
    return _incompatibility(head, target_model)[0]


@torch.no_grad()
def _check_export(head: JetSpecHead, model: MuseGlimmerAssistantModel, embeddings: torch.nn.Module) -> None:
    """Compares the block rows of both drafters on random context features (two rounds, through the caches)."""
    generator = torch.Generator().manual_seed(0)
    block = head.config.block_size
    features = torch.randn(1, 5, head.fc.in_features, generator=generator).to(device=head.device, dtype=head.dtype)
    anchors = torch.randint(embeddings.weight.shape[0], (2,), generator=generator).tolist()
    ours_cache, their_cache = None, DFlashCache(config=model.config)
    worst, scale = 0.0, 0.0
    for round_, (low, high) in enumerate([(0, 3), (3, 5)]):
        positions = torch.arange(low, high, device=head.device)[None]
        anchor = torch.tensor([[anchors[round_]]], device=head.device)
        ours = head(anchor, torch.tensor([[high]], device=head.device), features[:, low:high], positions,
                    past_key_values=ours_cache, logits_to_keep=False)
        ours_cache = ours.context_cache
        their_cache.set_previous_accepted_tokens(high - low)
        if round_:
            their_cache.crop(-block)
        noise = torch.cat([anchor, torch.full((1, block - 1), model.config.mask_token_id, device=head.device)], -1)
        theirs = model(
            noise_embeds=embeddings(noise),
            context_hidden_states=features[:, low:high],
            position_ids=torch.cat([positions, torch.arange(block, device=head.device)[None] + high], -1),
            past_key_values=their_cache,
        ).last_hidden_state
        worst = max(worst, float((ours.last_hidden_state.float() - theirs.float()).abs().max()))
        scale = max(scale, float(ours.last_hidden_state.float().abs().max()))
    tolerance = (1e-4 if head.dtype == torch.float32 else 3e-2) * max(scale, 1.0)
    if not worst <= tolerance:
        raise ValueError(
            f"The exported DFlash drafter does not reproduce the head (max |difference| {worst:.3g} of the block "
            f"rows' hidden states, tolerance {tolerance:.3g}); the export was left in place for inspection but must "
            "not be used. Please report this."
        )


def export_dflash(head: JetSpecHead, output_dir, target_model=None, verify: bool = True) -> Path:
    """Writes `head` as a `muse_glimmer_assistant` model (`config.json` + `model.safetensors`) for Transformers' DFlash
    drafting path, with identical drafts.

    Args:
        head ([`JetSpecHead`]): the head, bound to its target (or give `target_model`).
        output_dir (`str` or `os.PathLike`): folder to write (created if needed).
        target_model (`PreTrainedModel`, *optional*): the target, when `head` is not bound.
        verify (`bool`, *optional*, defaults to `True`): reload the folder and check that it drafts as the head does.

    Returns:
        `Path`: `output_dir`; load it with `AutoModel.from_pretrained` after `import hf_jetspec`, and pass it to
        `target.generate(..., assistant_model=draft, speculation_type="dflash")`.

    Raises:
        `ValueError`: the head is not exportable, with the reason ([`dflash_incompatibility`]).
    """
    reason, mask_token_id = _incompatibility(head, target_model)
    if reason is not None:
        raise ValueError(reason)
    if target_model is not None and head._target_modules is None:
        head.bind(target_model)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    config = dflash_config(head, mask_token_id)
    config.save_pretrained(output_dir)
    config_path = output_dir / "config.json"
    config_dict = json.loads(config_path.read_text())
    config_dict["attn_implementation"] = DFLASH_ATTENTION  # read back at load; unknown without `import hf_jetspec`
    config_path.write_text(json.dumps(config_dict, indent=2, sort_keys=True) + "\n")
    tensors = {name: tensor.detach().to("cpu").contiguous() for name, tensor in _exported_state_dict(head).items()}
    save_file(tensors, output_dir / "model.safetensors", metadata={"format": "pt"})
    (output_dir / "README.md").write_text(
        "# DFlash export of a JetSpec head\n\n"
        f"A `muse_glimmer_assistant` drafter for Transformers' DFlash path (`speculation_type=\"dflash\"`), exported "
        f"from a JetSpec head (target: {head.config.target_name_or_path or 'unknown'}; mask token id {mask_token_id}). "
        f"It drafts with causal attention inside the block (attention `{DFLASH_ATTENTION}`, named in config.json): "
        "`import hf_jetspec` before loading it; other runtimes, or another `attn_implementation`, draft differently.\n"
    )
    if verify:
        model = MuseGlimmerAssistantModel.from_pretrained(output_dir, dtype=head.dtype).to(head.device).eval()
        _check_export(head, model, _embeddings(head, target_model))
    return output_dir
