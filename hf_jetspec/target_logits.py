"""The target's next-token logits from its final hidden states, as its own CausalLM forward computes them.

Accepting a tree node needs the target's logits at that node; the loops compute them from the verify forward's hidden
states with the target's `lm_head`. Some families change the `lm_head`'s output inside their CausalLM forward:
Granite divides by `logits_scaling`, Cohere multiplies by `logit_scale`, Gemma 2/3 cap it with
`final_logit_softcapping` (`c * tanh(x / c)`). Greedy tokens survive these (they are increasing), but sampling,
logits processors and returned scores/logits do not, so [`TargetLogits`] applies them. [`check_target_logits`] compares
the result with the model's own forward once per model and refuses a model whose forward does something else.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

_CHECKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> None (agrees) or the error text


def softcap(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    """Final-logit softcapping as Gemma 2/3 apply it, `cap * tanh(logits / cap)`; identity when `cap` is `None`."""
    return logits if cap is None else torch.tanh(logits / cap) * cap


class TargetLogits(nn.Module):
    """`lm_head` followed by the target family's own logit transform.

    Args:
        model (`PreTrainedModel`): the target causal LM.

    Attributes:
        lm_head (`nn.Module`): the target's output embeddings.
        plain (`bool`): no transform (the logits are the `lm_head`'s output): fast paths that read `lm_head` directly
            (e.g. `ExactArgmax`) may be used.
    """

    def __init__(self, model):
        super().__init__()
        self.lm_head = model.get_output_embeddings()
        config = model.config.get_text_config()
        self.softcap = getattr(config, "final_logit_softcapping", None)
        self.divide = getattr(config, "logits_scaling", None) if "granite" in (config.model_type or "") else None
        self.multiply = getattr(config, "logit_scale", None) if "cohere" in (config.model_type or "") else None
        self.plain = self.softcap is None and self.divide in (None, 1.0) and self.multiply in (None, 1.0)

    @property
    def weight(self) -> torch.Tensor:
        return self.lm_head.weight

    def forward(self, hidden_states: torch.Tensor, product=None) -> torch.Tensor:
        """The logits of `hidden_states`; `product`: the `lm_head`'s `F.linear(hidden_states, weight, bias)` computed
        another way (an `nn.Linear` `lm_head`; e.g. `packed_linear.transposed_linear`, where `projection.py` measured it
        faster)."""
        if product is not None:
            logits = product(hidden_states, self.lm_head.weight, self.lm_head.bias)
        else:
            logits = self.lm_head(hidden_states)
        if self.divide not in (None, 1.0):
            logits = logits / self.divide
        if self.multiply not in (None, 1.0):
            logits = logits * self.multiply
        return softcap(logits, self.softcap)


@torch.no_grad()
def check_target_logits(model, target_logits: TargetLogits) -> None:
    """Raises a `ValueError` when `target_logits` does not reproduce the model's own logits (a family whose CausalLM
    forward transforms the `lm_head`'s output in a way not handled here). Measured once per model, on 4 tokens."""
    if model in _CHECKED:
        error = _CHECKED[model]
    else:
        decoder = getattr(model, model.base_model_prefix)
        device = target_logits.weight.device
        input_ids = torch.arange(1, 5, device=device)[None] % model.config.get_text_config().vocab_size
        expected = model(input_ids=input_ids, use_cache=False).logits[0].float()
        ours = target_logits(decoder(input_ids=input_ids, use_cache=False).last_hidden_state[0]).float()
        scale = float(expected.abs().max()) or 1.0
        error = None
        if not torch.allclose(ours, expected, rtol=0, atol=1e-4 * max(scale, 1.0)):
            error = (
                f"The target ({type(model).__name__}) turns its lm_head's output into logits in a way JetSpec does not "
                f"reproduce (max |difference| {float((ours - expected).abs().max()):.3g}): its accepted tokens and "
                "scores could differ from plain generate(). This family is not supported; please report it."
            )
        _CHECKED[model] = error
    if error is not None:
        raise ValueError(error)


def target_logits_for(model) -> TargetLogits:
    """The checked [`TargetLogits`] of `model`."""
    head = TargetLogits(model)
    check_target_logits(model, head)
    return head
