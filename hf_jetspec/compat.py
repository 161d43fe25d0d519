"""Differences between the transformers releases hf_jetspec supports, each read from a signature, not a version number.

From transformers 5.24 the KV cache is `cache` everywhere (model and layer forwards, generate()'s `model_kwargs`,
`GenerateDecoderOnlyOutput`); `past_key_values` remains a deprecated alias that warns. Before 5.24 it is
`past_key_values` only.
"""

from __future__ import annotations

import inspect

from transformers.generation.utils import GenerateDecoderOnlyOutput, GenerationMixin


def cache_kwarg(function) -> str:
    """The name under which `function` (a model's or layer's `forward`, or generate()'s helpers) takes the KV cache."""
    return "cache" if "cache" in inspect.signature(function).parameters else "past_key_values"


# where generate() keeps the cache in `model_kwargs`, and the field of its outputs that returns it
GENERATE_CACHE_KEY = cache_kwarg(GenerationMixin.prepare_inputs_for_generation)
OUTPUT_CACHE_FIELD = "cache" if "cache" in GenerateDecoderOnlyOutput.__dataclass_fields__ else "past_key_values"
