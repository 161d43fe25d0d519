"""Every bad input in the README's table gets a clear error that says what to do, before anything is written or
generated. Checked on purpose: with `check_inputs` (inputs.py) returning at once, the empty prompt, `inputs_embeds`
(with and without `input_ids`) and dtype cases fail here; without the JSON check in `from_pretrained`, the malformed
generation_config.json case loads silently with default settings and fails here."""

import json

import pytest
import torch
from conftest import make_tiny_target

from hf_jetspec import JetSpecHead

PROMPT = torch.tensor([[5, 6, 7, 8]])


@pytest.fixture(scope="module")
def pair():
    target = make_tiny_target("llama", seed=1)
    return target, JetSpecHead.from_target(target, num_hidden_layers=1)


def prefilled_cache(target):
    return target.generate(PROMPT, max_new_tokens=2, do_sample=False, return_dict_in_generate=True).past_key_values


GENERATE_CASES = {
    # case: (generate() arguments over the defaults, head settings, text the error must contain)
    "empty prompt": (dict(input_ids=torch.zeros(1, 0, dtype=torch.long)), {}, "at least one prompt token"),
    "inputs_embeds": (dict(input_ids=None, inputs_embeds="embeds"), {}, "pass `input_ids`"),
    "inputs_embeds and input_ids": (dict(inputs_embeds="embeds"), {}, "pass `input_ids`"),
    "right padding": (dict(input_ids=torch.tensor([[5, 6, 7], [5, 6, 0]]), attention_mask=torch.tensor([[1, 1, 1], [1, 1, 0]]),
                           pad_token_id=0), {}, "padding_side = 'left'"),
    "all-padding row": (dict(input_ids=torch.tensor([[5, 6, 7], [0, 0, 0]]), attention_mask=torch.tensor([[1, 1, 1], [0, 0, 0]]),
                             pad_token_id=0), {}, "at least one prompt token"),
    "past_key_values longer than the input": (dict(past_key_values="prefilled"), {}, "pass the whole conversation so far"),
    "static cache": (dict(cache_implementation="static"), {}, "plain DynamicCache"),
    "use_cache=False": (dict(use_cache=False), {}, "needs the KV cache"),
    "beam search": (dict(num_beams=2), {}, "num_beams=1"),
    "output_attentions": (dict(output_attentions=True, return_dict_in_generate=True), {}, "not supported"),
    "batch with output_hidden_states": (dict(input_ids=PROMPT.repeat(2, 1), output_hidden_states=True,
                                             return_dict_in_generate=True), {}, "not supported"),
    "tree_budget 0": (dict(), dict(tree_budget=0), "int >= 1"),
    "tree_budget 'big'": (dict(), dict(tree_budget="big"), "'auto' or an int"),
    "tree_topk 0": (dict(), dict(tree_topk=0), "`tree_topk` must be"),
    "prompt_lookup_num_tokens -1": (dict(), dict(prompt_lookup_num_tokens=-1), "0: off"),
    "packed_weights_max_mb -5": (dict(), dict(packed_weights_max_mb=-5), "megabytes >= 0"),
    "bf16 head, fp32 target": (dict(), dict(dtype=torch.bfloat16), "head.to(torch.float32)"),
}


@pytest.mark.parametrize("case", GENERATE_CASES)
def test_bad_generate_inputs_get_a_clear_error(pair, case):
    target, head = pair
    arguments, settings, message = GENERATE_CASES[case]
    kwargs = {"input_ids": PROMPT, "max_new_tokens": 4, "do_sample": False, "assistant_model": head, **arguments}
    if kwargs.get("inputs_embeds") == "embeds":
        kwargs["inputs_embeds"] = target.get_input_embeddings()(PROMPT).detach()
    if kwargs.get("past_key_values") == "prefilled":
        kwargs["past_key_values"] = prefilled_cache(target)
    if kwargs["input_ids"] is None:
        del kwargs["input_ids"]
    saved = dict(head.generation_config.to_dict())
    for name, value in settings.items():
        if name == "dtype":
            head.to(value)
        else:
            setattr(head.generation_config, name, value)
    try:
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
            target.generate(**kwargs)
    finally:
        head.to(torch.float32)
        for name in settings:
            if name != "dtype":
                setattr(head.generation_config, name, saved.get(name))


def test_an_over_long_prompt_runs_as_the_target_does(pair):
    """Past `max_position_embeddings` Transformers only warns, and so the output stays the target's own."""
    target, head = pair
    prompt = torch.randint(1, 90, (1, target.config.max_position_embeddings + 5), generator=torch.Generator().manual_seed(0))
    head.generation_config.tree_budget = 6
    try:
        expected = target.generate(prompt, max_new_tokens=6, do_sample=False)
        assert target.generate(prompt, max_new_tokens=6, do_sample=False, assistant_model=head).tolist() == expected.tolist()
    finally:
        head.generation_config.tree_budget = "auto"


def _saved(head, tmp_path):
    head.save_pretrained(tmp_path)
    return tmp_path


FILE_CASES = {
    "truncated weights": "truncated or corrupt",
    "pickled weights only": "pickled checkpoints",
    "malformed generation_config.json": "malformed generation_config.json",
    "bad tree settings in generation_config.json": "tree settings in the generation_config.json",
    "bad block_size in config.json": "`block_size` must be >= 2",
    "config.json without taps": "`target_layer_ids` must name",
    "config.json of another model_type": "model_type",
}


@pytest.mark.parametrize("case", FILE_CASES)
def test_bad_head_files_get_a_clear_error(pair, tmp_path, case):
    _, head = pair
    folder = _saved(head, tmp_path)
    weights, config = folder / "model.safetensors", folder / "config.json"
    if case == "truncated weights":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif case == "pickled weights only":
        weights.unlink()
        torch.save(head.state_dict(), folder / "pytorch_model.bin")
    elif case == "malformed generation_config.json":
        (folder / "generation_config.json").write_text("{not json")
    elif case == "bad tree settings in generation_config.json":
        (folder / "generation_config.json").write_text(json.dumps({"tree_budget": "huge"}))
    else:
        data = json.loads(config.read_text())
        if case == "bad block_size in config.json":
            data["block_size"] = -2
        elif case == "config.json without taps":
            del data["target_layer_ids"]
        else:
            data["model_type"] = "llama"
        config.write_text(json.dumps(data))
    with pytest.raises((ValueError, OSError), match=FILE_CASES[case]):
        JetSpecHead.from_pretrained(folder)


def test_a_head_for_another_target_is_refused():
    head = JetSpecHead.from_target(make_tiny_target("llama", seed=1), num_hidden_layers=1)
    other = make_tiny_target("qwen3", seed=2, vocab_size=100)
    with pytest.raises(ValueError, match="Use a head trained for this target"):
        other.generate(PROMPT, max_new_tokens=4, assistant_model=head)


def test_a_batch_with_a_prefilled_cache_is_refused_with_what_to_do(pair):
    target, head = pair
    batch = torch.cat([PROMPT, PROMPT.flip(-1)])
    cache = target.generate(batch, max_new_tokens=2, do_sample=False, return_dict_in_generate=True).past_key_values
    longer = torch.cat([batch, torch.tensor([[4, 9], [6, 2]])], dim=-1)
    with pytest.raises(ValueError, match="second turn of a batch"):
        target.generate(longer, past_key_values=cache, max_new_tokens=4, do_sample=False, assistant_model=head)
