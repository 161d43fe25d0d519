"""Renders a head's model card with `huggingface_hub.ModelCard` from the template next to this file."""

from __future__ import annotations

import json
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.repocard_data import eval_results_to_model_index, model_index_to_eval_results

from hf_jetspec.lookup import prompt_lookup_tokens
from hf_jetspec.vllm_export import vllm_config_incompatibilities

TEMPLATE = Path(__file__).with_name("jetspec_head_card.md")
RESULT_FIELDS = ("dataset", "prompts", "max_new_tokens", "tau", "speedup", "hardware", "settings")


def _eval_results(results: list[dict], model_name: str) -> list[EvalResult]:
    evals = []
    for row in results:
        for metric, value in (("mean_accepted_length", row["tau"]), ("speedup", row.get("speedup"))):
            if value is None:
                continue
            evals.append(EvalResult(
                task_type="text-generation", task_name="speculative decoding", dataset_type=row["dataset"],
                dataset_name=row["dataset"], metric_type=metric, metric_value=float(value),
                metric_name=f"{metric} ({row['tree'] + ', ' if row.get('tree') else ''}{row['hardware']})",
            ))
    return evals


def _tree_setting(method: str, head_tree: dict) -> str:
    if method == "chain":
        return "chain (one path, top-1)"
    lookup = head_tree.get("prompt_lookup_num_tokens")
    if method == "jetspec:head":
        budget, lookup = "auto", 0
    else:
        budget = method.split(":", 1)[1] if method.startswith("jetspec:") else head_tree.get("tree_budget") or "auto"
    tokens = prompt_lookup_tokens(lookup, budget if budget == "auto" else int(budget))
    proposals = f"prompt-lookup proposals of up to {tokens} tokens in the tree" if tokens else "no prompt lookup"
    return f"tree budget {budget}, top-{head_tree.get('tree_topk')}, {proposals}"


def rows_from_benchmark(results: dict, method: str | list[str] = "jetspec") -> list[dict]:
    """Card rows from a `jetspec-bench` `results.json`: one per dataset (not the pooled `all`) and method (`jetspec`
    = the head's own settings, or e.g. `jetspec:16`), with tau and the speedup over plain `generate()` (both with
    their 95% bootstrap intervals), the hardware and the settings recorded by the benchmark."""
    methods = [method] if isinstance(method, str) else list(method)
    if not isinstance(results, dict) or "summary" not in results or "environment" not in results:
        raise ValueError("expected a jetspec-bench results.json (with 'summary' and 'environment')")
    env, settings = results["environment"], results["settings"]
    if env.get("gpu"):
        hardware = f"{env['gpu']}, {env['dtype'].replace('torch.', '')}"
    else:
        cpu = f"{env['cpu_count']}-core {env['machine']} CPU"
        if env.get("cpu_class"):  # the class the benchmark ran as (caps applied), and whether the bf16 paths ran
            details = [f"{env['cpu_class']} class"]
            paths = env.get("bf16_draft_projection_and_exact_argmax")
            if paths is not None:
                details.append(f"bf16 draft paths {'on' if paths else 'off'}")
            cpu += f" ({', '.join(details)})"
        hardware = f"{cpu}, {env['torch_threads']} torch threads, {env['dtype'].replace('torch.', '')}"
    decoding = "greedy" if settings.get("greedy", True) else f"sampling at temperature {settings.get('temperature')}"
    rows = []
    summary = sorted(results["summary"], key=lambda r: methods.index(r["method"]) if r["method"] in methods else 0)
    for row in summary:
        if row["method"] not in methods or row["dataset"] == "all":
            continue
        if row["mismatches"]:
            raise ValueError(f"{row['dataset']}: {row['mismatches']} outputs differ from plain generate(); "
                             "a card reports lossless results only")
        tree = settings.get("head_tree") or {}
        rows.append({
            "dataset": row["dataset"], "prompts": row["prompts"], "max_new_tokens": settings["max_new_tokens"],
            "tau": round(row["tau"], 2), "tau_ci95": "-".join(f"{v:.2f}" for v in row["tau_ci95"]),
            "speedup": round(row["speedup"], 2), "speedup_ci95": "-".join(f"{v:.2f}" for v in row["speedup_ci95"]),
            "hardware": hardware, "tree": _tree_setting(row["method"], tree),
            "settings": (f"{decoding}; {_tree_setting(row['method'], tree)}; "
                         f"{env['attn_implementation']}; torch {env['torch']}, transformers {env['transformers']}; "
                         "speedup = JetSpec tokens/s over plain generate() tokens/s, same prompts, same process"),
        })
    if not rows:
        raise ValueError(f"no per-dataset rows for method(s) {methods} in these benchmark results")
    return rows


def _head_layers(config) -> str:
    layers = config.num_hidden_layers
    family = {"qwen3": "Qwen3-style (the same whatever the target's family)"}.get(
        config.draft_model_type, f"{config.draft_model_type} (the target family's)")
    context = ", `anchor_context` on" if config.anchor_context else ""
    return f"{layers} {family} decoder layer{'s' if layers != 1 else ''}{context}"


def _vllm_serving(config) -> str:
    reasons = vllm_config_incompatibilities(config)
    if reasons:
        return "not servable by vLLM's DFlash drafter: " + "; ".join(reasons)
    return ("servable by vLLM's DFlash drafter (chains of up to block size - 1 drafts): `jetspec-export-vllm HEAD "
            "OUT --target TARGET` writes that layout and checks its drafts against this head's")


def _training_summary(recipe: dict | None) -> str | None:
    if not recipe or recipe.get("global_steps") is None:
        return None
    parts = [f"{recipe['global_steps']:,} steps"]
    if recipe.get("runs"):
        parts.append(f"{len(recipe['runs'])} run{'s' if len(recipe['runs']) != 1 else ''}")
    if recipe.get("total_cpu_hours") is not None:
        parts.append(f"{recipe['total_cpu_hours']:.2f} CPU-hours in all")
    if recipe.get("epochs") is not None:
        parts.append(f"{recipe['epochs']} epochs")
    return ", ".join(parts) + (" (every run's command in the recipe below)" if recipe.get("runs") else " (recipe below)")


def render_card(head, repo_id: str, results: list[dict] | None = None, license: str = "apache-2.0",
                datasets: list[str] | None = None) -> ModelCard:
    """The model card of `head` for `repo_id`.

    Args:
        head ([`JetSpecHead`]): the head (its config names the target, taps, block size and training recipe).
        repo_id (`str`): where it will live (`org/name`).
        results (`list[dict]`, *optional*): measured rows with keys `dataset`, `prompts`, `max_new_tokens`, `tau`,
            `speedup`, `hardware` and `settings` (every row must name its hardware).
        license (`str`), datasets (`list[str]`): card metadata.
    """
    results = list(results or [])
    for row in results:
        missing = [name for name in RESULT_FIELDS if row.get(name) in (None, "")]
        if missing:
            raise ValueError(f"result row {row} lacks {missing}: every number needs its dataset, hardware and settings")
    config = head.config
    weights = config.target_weights or {}
    # the exact weights the head was trained and measured on: a GGUF's own repo when the target was one
    base_model = weights.get("repo_id") or config.target_name_or_path or "unknown"
    model_name = repo_id.split("/")[-1]
    card_data = ModelCardData(
        base_model=base_model, library_name="transformers", pipeline_tag="text-generation", license=license,
        datasets=datasets or None, model_name=model_name, eval_results=_eval_results(results, model_name) or None,
        # custom_code: the repo carries its modeling code (`trust_remote_code=True` loads it without hf_jetspec);
        # no hosted inference: a draft head generates only beside its target
        tags=["hf_jetspec", "jetspec", "speculative-decoding", "draft-model", "custom_code"], inference=False,
    )
    target_note = None
    if weights:
        target_note = (f"the {'dequantised ' if weights.get('dequantized') else ''}GGUF file `{weights.get('gguf_file')}`"
                       + (f" of `{weights['repo_id']}`" if weights.get("repo_id") else "")
                       + (f" (revision `{weights['revision']}`)" if weights.get("revision") else "")
                       + (f", a quantisation of `{config.target_name_or_path}`" if config.target_name_or_path else ""))
    recipe = config.training_recipe
    return ModelCard.from_template(
        card_data, template_path=str(TEMPLATE), model_name=model_name, repo_id=repo_id, base_model=base_model,
        target_name=config.target_name_or_path or base_model, target_note=target_note,
        target_model_type=config.target_model_type, target_num_hidden_layers=config.target_num_hidden_layers,
        vocab_size=config.vocab_size, head_layers=_head_layers(config), block_size=config.block_size,
        block="causal block" if config.causal_block else "bidirectional block (DFlash-style)",
        vllm=_vllm_serving(config), training_summary=_training_summary(recipe),
        target_layer_ids=config.target_layer_ids, num_parameters=f"{head.num_parameters():,}",
        tree_settings=_tree_setting("jetspec", {
            "tree_budget": head.generation_config.tree_budget or "auto", "tree_topk": head.generation_config.tree_topk,
            "prompt_lookup_num_tokens": getattr(head.generation_config, "prompt_lookup_num_tokens", None)}),
        results=results,
        draft_vocab=(f"{config.draft_vocab_size:,} tokens (drafts score only these; output unaffected)"
                     if config.draft_vocab_size else "the whole vocabulary"),
        training_recipe=json.dumps(recipe, indent=2) if recipe else None,
    )


def validate_card_metadata(card: ModelCard) -> None:
    """Offline version of the Hub's metadata check: the YAML parses into `ModelCardData`, the model-index round
    trips through `huggingface_hub`'s own converters, and the required fields are there.

    Raises:
        `ValueError`: naming what is wrong.
    """
    data = card.data.to_dict()
    for required in ("base_model", "library_name", "license", "tags"):
        if not data.get(required):
            raise ValueError(f"model card metadata lacks `{required}`")
    if "model-index" in data:
        name, evals = model_index_to_eval_results(data["model-index"])
        if eval_results_to_model_index(name, evals) != data["model-index"]:
            raise ValueError("model-index does not round-trip through huggingface_hub's eval-result converters")
    ModelCardData(**data)
