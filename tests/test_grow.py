"""Growing a trained head deeper (`grow_to_layers`): same drafts at the start, the old weights' optimizer state kept."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny_target
from test_training import short_run_config, tiny_run_inputs

from hf_jetspec import JetSpecHead
from hf_jetspec_training.grow import grow_head
from hf_jetspec_training.train import train


def _head_logits(head, target, seed=0):
    """The head's depth logits for a few anchors after a random context (tap features as the head reads them)."""
    generator = torch.Generator().manual_seed(seed)
    taps = len(head.config.target_layer_ids) * head.config.hidden_size
    features = torch.randn(2, 10, taps, generator=generator)
    anchors = torch.randint(0, target.config.vocab_size, (2, 3), generator=generator)
    anchor_positions = torch.tensor([[3, 6, 10], [2, 5, 10]])
    with torch.no_grad():
        return head(anchors, anchor_positions, context_features=features,
                    context_position_ids=torch.arange(10).expand(2, -1)).logits


def test_a_grown_head_drafts_as_before_and_saves_its_depth(tmp_path):
    target = make_tiny_target("llama", seed=3)
    head = JetSpecHead.from_target(target, num_hidden_layers=1, block_size=4, layer_family="qwen3").bind(target)
    torch.nn.init.normal_(head.mask_embedding, std=0.5)
    before = _head_logits(head, target)
    grow_head(head, 3)
    assert len(head.layers) == 3 and head.config.num_hidden_layers == 3
    assert [layer.self_attn.layer_idx for layer in head.layers] == [0, 1, 2]
    torch.testing.assert_close(_head_logits(head, target), before, rtol=0, atol=0)
    # the new layers are live: any output weight moves the drafts
    with torch.no_grad():
        head.layers[2].mlp.down_proj.weight.normal_(std=0.5)
    assert not torch.allclose(_head_logits(head, target), before)
    head.save_pretrained(tmp_path / "grown")
    loaded = JetSpecHead.from_pretrained(tmp_path / "grown").bind(target)
    assert len(loaded.layers) == 3 and loaded.config.draft_config["num_hidden_layers"] == 3
    torch.testing.assert_close(_head_logits(loaded, target), _head_logits(head, target))
    with pytest.raises(ValueError, match="only grows"):
        grow_head(head, 2)


def test_continuing_a_grown_head_keeps_the_old_weights_optimizer_state(tmp_path):
    target, tokenizer, prompts = tiny_run_inputs(tmp_path, seed=13, count=8)
    first = short_run_config(tmp_path, prompts, output_dir=str(tmp_path / "run1"), max_steps=5, logging_steps=1,
                             lr_scheduler_type="linear", warmup_steps=0, layer_family="qwen3", anchor_context=False)
    _, head_dir = train(first, target=target, tokenizer=tokenizer)
    saved = torch.load(head_dir / "training_state" / "optimizer.pt", weights_only=False)

    more = short_run_config(tmp_path, prompts, output_dir=str(tmp_path / "run2"), head_init=str(head_dir),
                            continue_training=True, more_steps=3, grow_to_layers=2, logging_steps=1,
                            lr_scheduler_type="linear", warmup_steps=0)
    trainer, final_dir = train(more, target=target, tokenizer=tokenizer)
    assert trainer.state.global_step == 8
    names = [name for name, param in trainer.model.named_parameters() if param.requires_grad]
    decay = set(trainer.get_decay_parameter_names(trainer.model))
    order = [n for n in names if n in decay] + [n for n in names if n not in decay]
    state = trainer.optimizer.state_dict()["state"]
    steps = {name: float(state[i]["step"]) for i, name in enumerate(order)}
    # the first layer's weights continued their AdamW state (5 saved steps + 3), the new layer's started fresh
    assert steps["layers.0.self_attn.q_proj.weight"] == 8 and steps["fc.weight"] == 8
    assert steps["layers.1.self_attn.q_proj.weight"] == 3 and steps["layers.1.mlp.down_proj.weight"] == 3
    assert sum(1 for group in saved["param_groups"] for _ in group["params"]) < len(order)
    grown = JetSpecHead.from_pretrained(final_dir)
    assert len(grown.layers) == 2
    assert grown.layers[1].self_attn.o_proj.weight.abs().sum() > 0  # trained away from its zero start
    recipe = json.loads((final_dir / "config.json").read_text())["training_recipe"]
    assert [run["steps"] for run in recipe["runs"]] == [[0, 5], [5, 8]]

    with pytest.raises(ValueError, match="head_init"):
        short_run_config(tmp_path, prompts, grow_to_layers=2)
