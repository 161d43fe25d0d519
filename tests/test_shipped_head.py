"""The head shipped in `heads/` for the default target: Hub layout, a valid card, binds the target, trained, lossless."""

from pathlib import Path

import pytest
from huggingface_hub import ModelCard

import hf_jetspec
from hf_jetspec import JetSpecHead, chat_input_ids
from hf_jetspec.default_target import DEFAULT_TARGET_SOURCE
from hf_jetspec.vllm_export import vllm_incompatibility
from hf_jetspec_hub.card import validate_card_metadata
from hf_jetspec_hub.publish import CODE_FILES, REPO_FILES

SHIPPED = Path(__file__).resolve().parents[1] / "heads" / "smollm2-135m-instruct-jetspec"
TRAINING_FILES = ("training_state", "training_curve.json", "training_curve.png")
# not from the eval sets (nor the training prompts)
PROMPTS = [
    "A farmer has 12 cows and buys 3 times as many goats. He sells 10 goats. How many animals does he have now?",
    "Give three tips for writing clear emails.",
]

pytestmark = pytest.mark.slow


def test_shipped_head_is_a_hub_repo_with_a_valid_card():
    # plus what `jetspec-train --continue_training` reads to pick up where the last run stopped (not uploaded:
    # `jetspec-publish` writes only the repo files)
    assert sorted(p.name for p in SHIPPED.iterdir()) == sorted(("README.md",) + REPO_FILES + TRAINING_FILES)
    assert sorted(p.name for p in (SHIPPED / "training_state").iterdir()) == [
        "optimizer.pt", "scheduler.pt", "trainer_state.json"]
    assert (SHIPPED / "model.safetensors").stat().st_size <= 25 * 2**20
    card = ModelCard.load(SHIPPED / "README.md")
    validate_card_metadata(card)
    # the exact weights it was trained and measured on: the GGUF, named with the model it quantises
    assert card.data.base_model == DEFAULT_TARGET_SOURCE["repo_id"]
    assert "HuggingFaceTB/SmolLM2-135M-Instruct" in card.text and DEFAULT_TARGET_SOURCE["gguf_file"] in card.text
    assert "speculative-decoding" in card.data.tags and "custom_code" in card.data.tags


@pytest.mark.parametrize("head_dir", sorted(p.parent for p in SHIPPED.parent.rglob("config.json")), ids=str)
def test_committed_heads_carry_the_current_modeling_code_and_no_local_paths(head_dir):
    """The copies `trust_remote_code` runs must be this library's code; refresh with
    `python -m hf_jetspec_hub.refresh heads/...` after changing it."""
    library = Path(hf_jetspec.__file__).parent
    stale = [name for name in CODE_FILES if (head_dir / name).read_bytes() != (library / name).read_bytes()]
    assert not stale, f"{head_dir}: {stale} differ from hf_jetspec's; run python -m hf_jetspec_hub.refresh {head_dir}"
    config = (head_dir / "config.json").read_text()
    assert '"auto_map"' in config and "quantization_config" not in config and '"/' not in config


def test_shipped_head_is_trained_and_lossless_on_the_default_target(default_target):
    model, tokenizer = default_target
    head = JetSpecHead.from_pretrained(SHIPPED).bind(model, tokenizer)  # same target, same tokenizer
    head.generation_config.tree_budget = 8
    accepted = rounds = 0
    for prompt in PROMPTS:
        input_ids = chat_input_ids(tokenizer, prompt)
        expected = model.generate(input_ids, do_sample=False, max_new_tokens=48)
        out = model.generate(input_ids, do_sample=False, max_new_tokens=48, assistant_model=head)
        assert out.tolist() == expected.tolist()
        accepted += head.last_generate_stats.accepted_drafts
        rounds += head.last_generate_stats.rounds
    assert (accepted + rounds) / rounds > 1.25  # an untrained head stays at ~1.0


def test_shipped_head_is_family_independent_and_runs_on_vllm(default_target):
    """The architecture the long training went into: Qwen3-style layers whatever the target's family, no
    `anchor_context`, so vLLM's DFlash drafter runs it with the same drafts (served in `test_vllm_serve.py`)."""
    model, tokenizer = default_target
    head = JetSpecHead.from_pretrained(SHIPPED).bind(model, tokenizer)
    assert head.config.target_model_type == "llama" and head.config.draft_model_type == "qwen3"
    assert vllm_incompatibility(head) is None
