"""Hooks JetSpec into `generate()`: when `assistant_model` is a `JetSpecHead`, assisted generation runs the tree loop.

Transformers has no public registry of candidate-generator strategies, so this wraps two private `GenerationMixin`
methods. Instead of a version number, the import checks the shape of what it wraps (the methods exist and take the
arguments the wrappers pass on), and the generate, batch and sampling tests run against the oldest and the newest
supported release (`.ci/run`); a release outside that range is used with a warning.
"""

from __future__ import annotations

import functools
import inspect
import warnings

import transformers
from packaging.version import Version
from transformers.generation.utils import GenerationMixin, GenerationMode

from .settings import CALL_SETTINGS, call_tree_settings
from .decoding import jetspec_decoding
from .modeling_jetspec import JetSpecHead

# Oldest and newest releases the generate/batch/sampling tests ran on (pyproject's range ends after the newest).
TESTED_TRANSFORMERS = (Version("5.23.0"), Version("5.25.0"))
# What the wrappers rely on: method -> parameters they read or pass on by name.
_HOOKED = {
    "_assisted_decoding": ("input_ids", "logits_processor", "stopping_criteria", "generation_config"),
    "_validate_generation_mode": ("generation_mode", "generation_config", "generation_mode_kwargs"),
    "_sample": ("input_ids", "logits_processor", "stopping_criteria", "generation_config"),
    "_extract_generation_mode_kwargs": ("kwargs", "assistant_model"),
}


def _check_transformers() -> None:
    version = Version(transformers.__version__)
    for name, parameters in _HOOKED.items():
        method = getattr(GenerationMixin, name, None)
        if method is None:
            raise ImportError(f"transformers {version} has no GenerationMixin.{name}; hf_jetspec cannot hook generate(). "
                              f"Install a tested release: pip install 'transformers>={TESTED_TRANSFORMERS[0]},"
                              f"<={TESTED_TRANSFORMERS[1]}'")
        signature = inspect.signature(getattr(method, "__wrapped__", method))
        missing = [p for p in parameters if p not in signature.parameters]
        if missing:
            raise ImportError(f"transformers {version}: GenerationMixin.{name} no longer takes {missing}; hf_jetspec "
                              f"cannot hook generate(). Install a tested release: pip install 'transformers>="
                              f"{TESTED_TRANSFORMERS[0]},<={TESTED_TRANSFORMERS[1]}'")
    low, high = TESTED_TRANSFORMERS
    if not low <= Version(version.base_version) <= high:
        warnings.warn(f"hf_jetspec's generate tests ran on transformers {low} to {high}, not {version}: the hooks fit, "
                      "but run `pytest tests/test_generate.py` here before relying on exactness.", stacklevel=3)


def as_jetspec_head(assistant_model):
    """The `JetSpecHead` itself, or inside a PEFT wrapper (a LoRA-adapted head); anything else unchanged."""
    if not isinstance(assistant_model, JetSpecHead) and hasattr(assistant_model, "get_base_model"):
        base = assistant_model.get_base_model()
        if isinstance(base, JetSpecHead):
            return base
    config = getattr(assistant_model, "config", None)
    if not isinstance(assistant_model, JetSpecHead) and getattr(config, "model_type", None) == "jetspec":
        raise ValueError(
            f"This JetSpec head is a {type(assistant_model).__module__}.{type(assistant_model).__name__}: the copy of "
            "the modeling code in its repo, loaded with trust_remote_code=True. generate() drafts trees with "
            "hf_jetspec's own class: load the head with `JetSpecHead.from_pretrained(...)` (or AutoModel without "
            "trust_remote_code) instead."
        )
    return assistant_model


def install() -> None:
    """Wraps `GenerationMixin._assisted_decoding`, `_validate_generation_mode` and `_extract_generation_mode_kwargs`
    (which takes this call's tree settings, e.g. `generate(..., tree_budget=8)`, out of generate()'s kwargs)
    (idempotent)."""
    _check_transformers()
    if getattr(GenerationMixin._assisted_decoding, "_jetspec", False):
        return

    original_decoding = GenerationMixin._assisted_decoding
    original_validate = GenerationMixin._validate_generation_mode
    original_extract = GenerationMixin._extract_generation_mode_kwargs

    @functools.wraps(original_extract)
    def _extract_generation_mode_kwargs(self, custom_generate, kwargs, synced_gpus, assistant_model, streamer):
        mode_kwargs = original_extract(self, custom_generate, kwargs, synced_gpus, assistant_model, streamer)
        if isinstance(as_jetspec_head(assistant_model), JetSpecHead):
            overrides = {name: kwargs.pop(name) for name in CALL_SETTINGS if name in kwargs}
            if overrides:
                mode_kwargs["jetspec_settings"] = overrides
        return mode_kwargs

    @functools.wraps(original_decoding)
    def _assisted_decoding(self, *args, assistant_model=None, **kwargs):
        assistant_model = as_jetspec_head(assistant_model)
        if isinstance(assistant_model, JetSpecHead):
            kwargs.pop("inputs_tensor", None)
            kwargs.pop("assistant_tokenizer", None)
            kwargs.pop("tokenizer", None)
            settings = call_tree_settings(assistant_model, kwargs.pop("jetspec_settings", None))
            return jetspec_decoding(self, *args, assistant_model=assistant_model, tree_settings=settings, **kwargs)
        return original_decoding(self, *args, assistant_model=assistant_model, **kwargs)

    @functools.wraps(original_validate)
    def _validate_generation_mode(self, generation_mode, generation_config, generation_mode_kwargs):
        head = as_jetspec_head(generation_mode_kwargs.get("assistant_model"))
        if isinstance(head, JetSpecHead):
            head.check_compatible(self)  # before transformers' own vocab check, which would ask for tokenizers
            call_tree_settings(head, generation_mode_kwargs.get("jetspec_settings"))  # bad values: refused now
            if generation_mode_kwargs.get("tokenizer") is not None:
                head.check_tokenizer(generation_mode_kwargs["tokenizer"])
            if generation_mode != GenerationMode.ASSISTED_GENERATION:
                raise ValueError(
                    f"A JetSpec head drafts for greedy or sampling decoding with one beam; these settings select {generation_mode.value!r} "
                    f"(num_beams={generation_config.num_beams}). Use num_beams=1, or drop `assistant_model`."
                )
            if "assistant_tokenizer" in generation_mode_kwargs:
                raise ValueError("A JetSpec head shares the target's tokenizer: do not pass `assistant_tokenizer`.")
        return original_validate(self, generation_mode, generation_config, generation_mode_kwargs)

    _assisted_decoding._jetspec = True
    GenerationMixin._extract_generation_mode_kwargs = _extract_generation_mode_kwargs
    GenerationMixin._assisted_decoding = _assisted_decoding
    GenerationMixin._validate_generation_mode = _validate_generation_mode
