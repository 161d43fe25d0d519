"""Growing a trained head deeper without starting over (`grow_to_layers`).

New decoder layers go on top of the trained ones with their output projections (attention `o_proj`, MLP
`down_proj`) at zero: each adds nothing to the residual stream, so the grown head drafts exactly what it drafted
before, and training starts from the trained head's quality rather than from a random deeper one. A continued run
(`continue_training`) keeps the optimizer state of every weight the head already had: `migrate_optimizer_state`
re-indexes the saved AdamW state for the grown parameter list; the new weights start with fresh moments.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch


def grow_head(head, num_layers: int):
    """Appends decoder layers to `head` (a `JetSpecHead`) until it has `num_layers`; returns it.

    The new layers are initialised like a new head's, except their `o_proj` and `down_proj`, which are zero: the grown
    head's drafts are the same as before (`tests/test_grow.py`). Its config records the new depth.
    """
    have = len(head.layers)
    if num_layers < have:
        raise ValueError(f"the head has {have} decoder layers; `grow_to_layers` {num_layers} would remove some: "
                         "a head only grows")
    if num_layers == have:
        return head
    draft_config = {**head.config.draft_config, "num_hidden_layers": num_layers}
    if draft_config.get("layer_types"):  # one per layer: the new ones repeat the top layer's kind
        draft_config["layer_types"] = [*draft_config["layer_types"][:have],
                                       *[draft_config["layer_types"][have - 1]] * (num_layers - have)]
    head.config.draft_config = draft_config
    head.config.num_hidden_layers = num_layers
    family_config = head.config.to_family_config()
    layer_cls = type(head.layers[0])
    reference = next(head.parameters())
    for layer_idx in range(have, num_layers):
        layer = layer_cls(family_config, layer_idx)
        layer.apply(head._init_weights)
        layer.self_attn.o_proj.weight.data.zero_()
        layer.mlp.down_proj.weight.data.zero_()
        layer._can_checkpoint_with_cache = True  # as in JetSpecHead.__init__
        head.layers.append(layer.to(device=reference.device, dtype=reference.dtype))
    return head


def _layer_index(name: str) -> int | None:
    match = re.match(r"(?:.*\.)?layers\.(\d+)\.", name)
    return int(match.group(1)) if match else None


def migrate_optimizer_state(path: str | Path, trainer, model, old_num_layers: int) -> None:
    """Rewrites the optimizer state saved at `path` (by a head with `old_num_layers` layers, through the trainer's
    two parameter groups: with and without weight decay) for `model`, the same head grown deeper.

    Every old weight keeps its AdamW moments and step count; the new layers' weights get none (AdamW starts them
    fresh). Raises if the saved groups do not match the old head's parameters (another optimizer or grouping).
    """
    saved = torch.load(path, weights_only=False)
    decay = set(trainer.get_decay_parameter_names(model))
    named = [(name, param) for name, param in model.named_parameters() if param.requires_grad]
    shapes = {name: param.shape for name, param in named}
    new_groups = [[n for n, _ in named if n in decay], [n for n, _ in named if n not in decay]]

    def is_old(name: str) -> bool:
        index = _layer_index(name)
        return index is None or index < old_num_layers

    old_groups = [[n for n in group if is_old(n)] for group in new_groups]
    if len(saved["param_groups"]) != len(new_groups) or any(
        len(group["params"]) != len(names) for group, names in zip(saved["param_groups"], old_groups)
    ):
        raise ValueError(f"{path} does not hold the trainer's AdamW state for a {old_num_layers}-layer head "
                         f"({[len(group['params']) for group in saved['param_groups']]} parameters per group, expected "
                         f"{[len(names) for names in old_groups]}): continue without `continue_training` (a warm start)")
    new_ids = {name: i for i, name in enumerate(n for group in new_groups for n in group)}
    state, param_groups = {}, []
    for group, old_names, new_names in zip(saved["param_groups"], old_groups, new_groups):
        for old_id, name in zip(group["params"], old_names):
            if old_id in saved["state"]:
                moments = saved["state"][old_id]
                for key in ("exp_avg", "exp_avg_sq"):
                    if key in moments and moments[key].shape != shapes[name]:
                        raise ValueError(f"{path}: the saved {key} of {name} has shape {tuple(moments[key].shape)}, "
                                         f"the weight {tuple(shapes[name])}")
                state[new_ids[name]] = moments
        param_groups.append({**group, "params": [new_ids[name] for name in new_names]})
    torch.save({"state": state, "param_groups": param_groups}, path)
