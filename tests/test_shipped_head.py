"""The head shipped in `heads/` for the default target: a valid Hub repo folder, bound to SmolLM2-135M-Instruct, that
drafts tokens the target accepts, with output identical to plain `generate()`."""

from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard

from hf_jetspec import JetSpecHead, chat_input_ids

SHIPPED = Path(__file__).resolve().parents[1] / "heads" / "smollm2-135m-instruct-jetspec"

pytestmark = pytest.mark.slow


def test_repo_folder_holds_exactly_a_hub_model_repo():
    from hf_jetspec_hub import validate_card_metadata

    assert sorted(p.name for p in SHIPPED.iterdir()) == [
        "README.md", "config.json", "generation_config.json", "model.safetensors"]
    assert (SHIPPED / "model.safetensors").stat().st_size <= 25 * 2**20
    card = ModelCard.load(SHIPPED / "README.md")
    validate_card_metadata(card)
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert "speculative-decoding" in card.data.tags
    results = card.data.to_dict()["model-index"][0]["results"]
    assert {r["dataset"]["name"] for r in results} >= {"gsm8k_test", "mt_bench"}


def test_shipped_head_drafts_what_the_target_accepts(default_target):
    model, tokenizer = default_target
    head = JetSpecHead.from_pretrained(SHIPPED).bind(model, tokenizer=tokenizer)
    assert head.config.training_recipe["sequences"] > 0
    prompt = ("A bakery sells muffins for $3 each and cookies for $2 each. On Monday it sold 45 muffins and twice as "
              "many cookies. How much money did the bakery make on Monday?")
    input_ids = chat_input_ids(tokenizer, prompt)
    expected = model.generate(input_ids, do_sample=False, max_new_tokens=48)
    out = model.generate(input_ids, do_sample=False, max_new_tokens=48, assistant_model=head)
    assert out.tolist() == expected.tolist()
    tau = head.last_generate_stats.mean_accepted_length
    print(f"shipped head tau {tau:.2f}")
    assert tau > 1.5  # an untrained head gets ~1.0
