"""Training pipeline on a tiny target: data handling, objective, a short run where loss falls and tau rises, resume."""

import json

import pytest
import torch
from conftest import WORDS, make_tiny_target, save_tiny_target, tiny_tokenizer

from hf_jetspec import chat_input_ids
from hf_jetspec_training import (
    AnchorCollator,
    JetSpecTrainingConfig,
    candidate_distillation_loss,
    candidate_vocabulary,
    compute_teacher_features,
    depth_weights,
    distillation_loss,
    load_prompts,
    measure_tau,
    sample_anchors,
    teacher_rows,
)
from hf_jetspec_training.train import train

def write_prompts(path, count=24, extra_lines=()):
    generator = torch.Generator().manual_seed(0)
    with path.open("w") as handle:
        for index in range(count):
            words = [WORDS[i] for i in torch.randint(len(WORDS), (6,), generator=generator)]
            handle.write(json.dumps({"id": f"p{index}", "prompt": " ".join(words), "near_eval_variant": None}) + "\n")
        for line in extra_lines:
            handle.write(line + "\n")


def test_prompts_skip_malformed_and_near_eval_rows(tmp_path):
    path = tmp_path / "prompts.jsonl"
    separator_row = json.dumps({"id": "sep", "prompt": "a raw U+2028 \u2028 is text inside JSON"}, ensure_ascii=False)
    write_prompts(path, 5, [separator_row,
                            '{"id": "bad", "prompt": ', '{"id": "x", "prompt": ""}', '{"id": "p0", "prompt": "dup"}',
                            '{"id": "near", "prompt": "close to eval", "near_eval_variant": "gsm8k-1"}', "[1, 2]"])
    prompts = load_prompts([path])
    assert [row["id"] for row in prompts.rows] == [f"p{i}" for i in range(5)] + ["sep"]
    assert prompts.skipped == {"malformed json": 1, "no prompt": 2, "duplicate id": 1, "near_eval_variant": 1}
    with pytest.raises(FileNotFoundError):
        load_prompts([tmp_path / "missing.jsonl"])


def test_prompt_limits_per_file(tmp_path):
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    write_prompts(first, 6)
    second.write_text("".join(json.dumps({"id": f"b{i}", "prompt": f"q {i}"}) + "\n" for i in range(6)))
    rows = load_prompts([first, second], [2, 5]).rows
    assert sum(row["source"] == "a" for row in rows) == 2 and sum(row["source"] == "b" for row in rows) == 5
    assert len(load_prompts([first, second], [3]).rows) == 6  # one value: every file
    with pytest.raises(ValueError, match="one per file"):
        load_prompts([first, second], [1, 2, 3])


def test_candidate_vocabulary_keeps_every_teacher_token():
    teacher_ids = torch.tensor([[[[7, 3], [9, 3]], [[40, 41], [5, 6]]]])  # (1, 2 anchors, 2 depths, k=2)
    valid = torch.tensor([[[True, True], [False, True]]])  # 40 and 41 belong to an invalid pair
    vocabulary, local = candidate_vocabulary(teacher_ids, valid, vocab_size=50)
    assert vocabulary.tolist() == [3, 5, 6, 7, 9]
    assert torch.equal(vocabulary[local][valid], teacher_ids[valid])
    with_negatives, _ = candidate_vocabulary(teacher_ids, valid, vocab_size=50, num_negatives=200,
                                             generator=torch.Generator().manual_seed(0))
    assert set(vocabulary.tolist()) < set(with_negatives.tolist()) and with_negatives.max() < 50
    # with every token a candidate, the restricted loss is the full-vocabulary loss
    full_vocabulary, full_local = candidate_vocabulary(teacher_ids, valid, vocab_size=50, num_negatives=5000,
                                                       generator=torch.Generator().manual_seed(0))
    assert full_vocabulary.tolist() == list(range(50))
    logits, probs, weights = torch.randn(1, 2, 2, 50), torch.rand(1, 2, 2, 2), torch.ones(2) / 2
    expected, _ = distillation_loss(logits, teacher_ids, probs, valid, weights)
    restricted, _ = distillation_loss(logits[..., full_vocabulary], full_local, probs, valid, weights)
    torch.testing.assert_close(restricted, expected)


@pytest.mark.parametrize("autocast", [False, True])
def test_chunked_candidate_loss_equals_the_materialised_one(autocast):
    """The chunked loss (logits never held whole, recomputed in the backward) gives the loss, gradient and agreement
    of `distillation_loss` on `hidden @ weight.T`, in fp32 and under CPU bf16 autocast (as training runs there)."""
    generator = torch.Generator().manual_seed(0)
    batch, anchors, depth, hidden_size, vocab, k = 2, 5, 3, 16, 40, 4
    hidden = torch.randn(batch, anchors, depth, hidden_size, generator=generator, requires_grad=True)
    weight = torch.randn(vocab, hidden_size, generator=generator)
    teacher_ids = torch.randint(vocab, (batch, anchors, depth, k), generator=generator)
    teacher_probs = torch.rand(batch, anchors, depth, k, generator=generator)
    teacher_probs[1, 3:] = 0  # padded anchors: no teacher probabilities
    valid = torch.rand(batch, anchors, depth, generator=generator) > 0.2
    valid[1, 3:] = False
    weights = depth_weights(depth + 1, 0.8)
    results = []
    for chunked in (False, True):
        hidden.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            if chunked:  # chunk_rows=7: chunks that do not divide the rows
                loss, metrics = candidate_distillation_loss(hidden, weight, teacher_ids, teacher_probs, valid, weights,
                                                            chunk_rows=7)
            else:
                loss, metrics = distillation_loss(hidden @ weight.T, teacher_ids, teacher_probs, valid, weights)
        loss.backward()
        results.append((loss.detach(), metrics["accuracy"], hidden.grad.clone()))
    (loss, accuracy, grad), (chunked_loss, chunked_accuracy, chunked_grad) = results
    tolerance = {"atol": 2e-2, "rtol": 2e-2} if autocast else {"atol": 1e-5, "rtol": 1e-5}
    torch.testing.assert_close(chunked_loss, loss, **tolerance)
    torch.testing.assert_close(chunked_grad, grad, **tolerance)
    torch.testing.assert_close(chunked_accuracy, accuracy)
    assert grad[1, 3:].abs().max() == 0 and chunked_grad[1, 3:].abs().max() == 0  # padded anchors get no gradient


def test_anchors_and_label_rows():
    anchors = sample_anchors(prompt_length=5, sequence_length=12, max_anchors=3, generator=torch.Generator().manual_seed(1))
    assert anchors.numel() == 3 and anchors.min() >= 5 and anchors.max() <= 10 and torch.equal(anchors, anchors.sort().values)
    assert sample_anchors(5, 6, 3).numel() == 0
    rows, valid = teacher_rows(torch.tensor([[9]]), block_size=4, sequence_length=11)
    assert rows.tolist() == [[[9, 10, 0]]] and valid.tolist() == [[[True, True, False]]]
    torch.testing.assert_close(depth_weights(4), torch.full((3,), 1 / 3))
    torch.testing.assert_close(depth_weights(3, 0.5), torch.tensor([2 / 3, 1 / 3]))


def test_loss_is_minimised_by_the_teacher_distribution():
    teacher_ids = torch.tensor([[[[2, 0, 1]]]])
    teacher_probs = torch.tensor([[[[0.7, 0.2, 0.1]]]])
    valid = torch.ones(1, 1, 1, dtype=torch.bool)
    weights = torch.ones(1)
    exact = torch.zeros(1, 1, 1, 3)
    exact[..., [2, 0, 1]] = torch.tensor([0.7, 0.2, 0.1]).log()
    best, metrics = distillation_loss(exact, teacher_ids, teacher_probs, valid, weights)
    worse, _ = distillation_loss(torch.zeros(1, 1, 1, 3), teacher_ids, teacher_probs, valid, weights)
    entropy = -(torch.tensor([0.7, 0.2, 0.1]) * torch.tensor([0.7, 0.2, 0.1]).log()).sum()
    torch.testing.assert_close(best, entropy)  # cross-entropy = entropy exactly when head == target
    assert worse > best and metrics["accuracy"].item() == 1.0
    none_valid, _ = distillation_loss(exact, teacher_ids, teacher_probs, torch.zeros_like(valid), weights)
    assert none_valid.item() == 0.0


def test_collator_pads_and_masks(tmp_path):
    rows = [
        {"input_ids": torch.arange(10), "prompt_length": torch.tensor([4]), "taps": torch.randn(10, 6),
         "teacher_ids": torch.arange(10)[:, None].repeat(1, 2).int(), "teacher_probs": torch.ones(10, 2)},
        {"input_ids": torch.arange(6), "prompt_length": torch.tensor([5]), "taps": torch.randn(6, 6),
         "teacher_ids": torch.zeros(6, 2, dtype=torch.int32), "teacher_probs": torch.ones(6, 2)},
    ]
    batch = AnchorCollator(block_size=3, max_anchors=8)(rows)
    assert batch["context_features"].shape == (2, 10, 6)
    assert batch["anchor_position_ids"][0].tolist() == [4, 5, 6, 7, 8]  # every response position but the last
    assert batch["teacher_ids"][0, 0, :, 0].tolist() == [4, 5]  # depth d of anchor a: target row a + d - 1
    assert not batch["valid"][1].any()  # 1-token response: no anchor, only padding
    assert batch["valid"][0].all()  # anchor 8 drafts tokens 9 and 10, labelled by target rows 8 and 9


def test_teacher_pass_labels_response_positions_only(tmp_path):
    from safetensors.torch import load_file

    from hf_jetspec_training.features import feature_path

    target = make_tiny_target("llama").float().eval()
    generator = torch.Generator().manual_seed(0)
    rows = [{"id": "a", "input_ids": torch.randint(96, (14,), generator=generator).tolist(), "prompt_length": 5},
            {"id": "b", "input_ids": torch.randint(96, (9,), generator=generator).tolist(), "prompt_length": 9},  # no response token
            {"id": "c", "input_ids": torch.randint(96, (11,), generator=generator).tolist(), "prompt_length": 0}]
    compute_teacher_features(target, rows, tmp_path, target_layer_ids=[0, 2], topk=4, batch_size=2)
    for row in rows:
        saved = load_file(str(feature_path(tmp_path, row["id"])))
        with torch.no_grad():
            probs = target(torch.tensor([row["input_ids"]])).logits[0].float().softmax(-1)
        expected_probs, expected_ids = probs.topk(4, dim=-1)
        start = row["prompt_length"]
        assert saved["taps"].shape == (len(row["input_ids"]), 2 * target.config.hidden_size)  # context rows: all
        assert torch.equal(saved["teacher_ids"][start:].long(), expected_ids[start:])
        torch.testing.assert_close(saved["teacher_probs"][start:].float(), expected_probs[start:], atol=2e-3, rtol=2e-3)
        assert not saved["teacher_probs"][:start].any()  # prompt rows: no anchor reads them
    batch = AnchorCollator(block_size=4, max_anchors=8)([load_file(str(feature_path(tmp_path, "a")))])
    assert (batch["teacher_probs"][batch["valid"]].sum(-1) > 0).all()  # every label a training anchor reads is set


def test_tiny_training_run_lowers_loss_raises_tau_and_resumes(tmp_path):
    target, tokenizer, prompts = tiny_run_inputs(tmp_path, seed=11, count=16, extra_lines=["not json"])
    prompt_ids = [chat_input_ids(tokenizer, json.loads(line)["prompt"]) for line in prompts.read_text().splitlines()[:4]]

    def config(**overrides):
        values = dict(output_dir=str(tmp_path / "run"), data_dir=str(tmp_path / "data"), train_files=[str(prompts)],
                      block_size=5, max_new_tokens=24, generation_batch_size=4, max_anchors=16, teacher_topk=8,
                      per_device_train_batch_size=4, learning_rate=3e-3, max_steps=40, logging_steps=5,
                      save_steps=20, use_cpu=True, seed=0, disable_tqdm=True)
        values.update(overrides)
        return JetSpecTrainingConfig(**values)

    from hf_jetspec import JetSpecHead

    untrained = JetSpecHead.from_target(target, num_hidden_layers=1, block_size=5)
    tau_before = measure_tau(target, untrained, prompt_ids, max_new_tokens=24, tree_budget=8)
    assert untrained.generation_config.tree_budget == "auto"  # the fixed budget of the measurement is not kept

    trainer, final_dir = train(config(max_steps=20), target=target, tokenizer=tokenizer)
    assert (tmp_path / "run" / "checkpoint-20").is_dir()
    trainer, final_dir = train(config(), target=target, tokenizer=tokenizer)  # resumes from checkpoint-20
    history = [entry for entry in trainer.state.log_history if "loss" in entry]
    steps = [entry["step"] for entry in history]
    # one history, continued from the checkpoint: no step logged twice, as a restart from 0 would
    assert steps == sorted(set(steps)) and steps[-1] == trainer.state.global_step == 40
    losses = [entry["loss"] for entry in history]
    assert losses[-1] < losses[0]
    minutes = [entry["train_minutes"] for entry in history]
    assert minutes == sorted(minutes) and minutes[0] > 0  # wall clock continued across the resume
    curve = json.loads((tmp_path / "run" / "training_curve.json").read_text())
    assert [point["step"] for point in curve["loss"]] == steps
    assert (tmp_path / "run" / "training_curve.png").stat().st_size > 0

    head = JetSpecHead.from_pretrained(final_dir).bind(target)
    assert head.config.training_recipe["skipped_prompt_rows"] == {"malformed json": 1}
    tau_after = measure_tau(target, head, prompt_ids, max_new_tokens=24, tree_budget=8)
    print(f"tau before {tau_before:.2f} after {tau_after:.2f}; loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    assert tau_after > tau_before + 0.3


def tiny_run_inputs(tmp_path, seed: int, count: int = 8, extra_lines=()):
    """A tiny Llama target on the tiny tokenizer, and `count` prompts written to `tmp_path/prompts.jsonl`: returns
    (target, tokenizer, prompts path)."""
    tokenizer = tiny_tokenizer()
    target = make_tiny_target("llama", seed=seed, vocab_size=len(tokenizer))
    prompts = tmp_path / "prompts.jsonl"
    write_prompts(prompts, count, extra_lines)
    return target, tokenizer, prompts


def short_run_config(tmp_path, prompts, **overrides) -> JetSpecTrainingConfig:
    """A few steps of a block-4 head on `prompts`, outputs under `tmp_path`; `overrides` set the rest."""
    values = dict(output_dir=str(tmp_path / "run"), data_dir=str(tmp_path / "data"), train_files=[str(prompts)],
                  block_size=4, max_new_tokens=16, generation_batch_size=4, max_anchors=8, teacher_topk=4,
                  per_device_train_batch_size=4, learning_rate=3e-3, save_steps=100, use_cpu=True, seed=0,
                  disable_tqdm=True)
    values.update(overrides)
    return JetSpecTrainingConfig(**values)


@pytest.mark.parametrize("causal_block", [True, False])
def test_training_over_the_batch_candidate_vocabulary(tmp_path, causal_block):
    """Also trains a bidirectional block (`causal_block: false`, the paper's DFlash-style ablation arm)."""
    target, tokenizer, prompts = tiny_run_inputs(tmp_path, seed=11, count=8)
    config = short_run_config(tmp_path, prompts, max_steps=12, logging_steps=4, loss_vocabulary="batch",
                              num_negative_tokens=0, causal_block=causal_block)
    trainer, final_dir = train(config, target=target, tokenizer=tokenizer)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses[-1] < losses[0]
    from hf_jetspec import JetSpecHead

    head = JetSpecHead.from_pretrained(final_dir)
    assert head.config.training_recipe["loss_vocabulary"] == "batch"
    assert head.config.causal_block is causal_block
    with pytest.raises(ValueError, match="loss_vocabulary"):
        JetSpecTrainingConfig(output_dir=str(tmp_path / "x"), loss_vocabulary="sampled")
    # the trainer's chunked loss (no softcapping) equals its materialised one (taken where the target caps its
    # logits): a cap far above every logit is the identity, so the two paths see the same logits
    batch = next(iter(trainer.get_train_dataloader()))
    head = trainer.model
    losses = []
    for cap in (None, 1e9):
        head.config.final_logit_softcapping = cap
        torch.manual_seed(0)  # the same negative tokens
        losses.append(trainer.compute_loss(head, batch))
    torch.testing.assert_close(losses[0], losses[1])


def test_on_demand_teacher_features_train_as_the_precomputed_ones(tmp_path):
    """`teacher_features="on_demand"` writes a row's feature file when a batch first reads it: a short run writes only
    the rows it reached, those files match the up-front teacher pass, and the run matches a precomputed one."""
    from safetensors.torch import load_file

    from hf_jetspec import JetSpecHead

    target, tokenizer, prompts = tiny_run_inputs(tmp_path, seed=11, count=16)
    runs = {}
    for mode in ("on_demand", "precompute"):
        config = short_run_config(tmp_path / mode, prompts, max_steps=2, logging_steps=1, teacher_features=mode,
                                  data_dir=str(tmp_path / mode / "data"), output_dir=str(tmp_path / mode / "run"))
        trainer, final_dir = train(config, target=target, tokenizer=tokenizer)
        runs[mode] = (trainer, final_dir, next((tmp_path / mode / "data").glob("features-*")))
    (on_demand, on_dir, on_features), (precomputed, pre_dir, pre_features) = runs["on_demand"], runs["precompute"]
    written = sorted(path.name for path in on_features.glob("*.safetensors"))
    # 2 steps of 4 rows (and the batch the dataloader reads ahead), of 16
    assert 2 * 4 <= len(written) <= 3 * 4 < len(list(pre_features.glob("*.safetensors")))
    for name in written:
        mine, theirs = load_file(str(on_features / name)), load_file(str(pre_features / name))
        assert torch.equal(mine["input_ids"], theirs["input_ids"]) and torch.equal(mine["teacher_ids"], theirs["teacher_ids"])
        torch.testing.assert_close(mine["taps"], theirs["taps"], atol=2e-3, rtol=2e-3)
    losses = [[entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
              for trainer in (on_demand, precomputed)]
    assert len(losses[0]) == 2
    torch.testing.assert_close(losses[0], losses[1], atol=1e-3, rtol=1e-3)  # same batches, same labels
    run = JetSpecHead.from_pretrained(on_dir).config.training_recipe["runs"][-1]
    assert run["teacher_rows_computed"] == len(written)
    assert JetSpecHead.from_pretrained(pre_dir).config.training_recipe["runs"][-1]["teacher_rows_computed"] is None
    with pytest.raises(ValueError, match="dataloader_num_workers"):
        short_run_config(tmp_path, prompts, teacher_features="on_demand", dataloader_num_workers=2)
    with pytest.raises(ValueError, match="teacher_features"):
        short_run_config(tmp_path, prompts, teacher_features="lazy")


def test_accelerate_launch_with_two_cpu_processes(tmp_path):
    import subprocess
    import sys

    save_tiny_target(tmp_path / "target")
    prompts = tmp_path / "prompts.jsonl"
    write_prompts(prompts, 12)
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "hf_jetspec_training.train",
        "--target_model", str(tmp_path / "target"), "--train_files", str(prompts),
        "--data_dir", str(tmp_path / "data"), "--output_dir", str(tmp_path / "run"), "--block_size", "4",
        "--max_new_tokens", "12", "--max_anchors", "8", "--teacher_topk", "4", "--per_device_train_batch_size", "2",
        "--max_steps", "4", "--save_steps", "2", "--logging_steps", "1", "--use_cpu", "true", "--disable_tqdm", "true",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    recipe = json.loads((tmp_path / "run" / "final" / "config.json").read_text())["training_recipe"]
    assert recipe["world_size"] == 2 and recipe["total_train_batch_size"] == 4  # 2 processes x 2 sequences
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()
    assert (tmp_path / "run" / "checkpoint-4").is_dir()


def test_the_gpu_recipe_runs_end_to_end_on_cpu_with_a_tiny_qwen3_target(tmp_path):
    """training/recipes/qwen3-8b-gpu.yaml's own code path (bf16, gradient checkpointing, tau checks, target and head
    on the trainer's device), with only the sizes overridden and `--use_cpu`."""
    import subprocess
    import sys
    from pathlib import Path

    save_tiny_target(tmp_path / "target", family="qwen3")
    prompts = tmp_path / "prompts.jsonl"
    write_prompts(prompts, 8)
    recipe = Path(__file__).resolve().parents[1] / "training" / "recipes" / "qwen3-8b-gpu.yaml"
    command = [
        sys.executable, "-m", "hf_jetspec_training.train", "--config", str(recipe), "--use_cpu", "true",
        "--target_model", str(tmp_path / "target"), "--train_files", str(prompts), "--data_dir", str(tmp_path / "data"),
        "--output_dir", str(tmp_path / "run"), "--num_head_layers", "1", "--num_taps", "2", "--block_size", "4",
        "--max_new_tokens", "12", "--generation_batch_size", "4", "--max_anchors", "8", "--teacher_topk", "4",
        "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1", "--max_steps", "2",
        "--save_steps", "2", "--tau_eval_steps", "2", "--tau_eval_prompts", "2", "--tau_eval_max_new_tokens", "8",
        "--tau_eval_tree_budget", "8", "--disable_tqdm", "true",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    config = json.loads((tmp_path / "run" / "final" / "config.json").read_text())
    assert config["draft_config"]["model_type"] == "qwen3" and config["block_size"] == 4
    assert config["training_recipe"]["max_steps"] == 2


def test_lora_adapter_on_a_head_and_a_peft_wrapped_target(tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    from hf_jetspec import JetSpecHead

    tokenizer = tiny_tokenizer()
    target = make_tiny_target("llama", seed=12, vocab_size=len(tokenizer))
    JetSpecHead.from_target(target, num_hidden_layers=1, block_size=4).save_pretrained(tmp_path / "base_head")
    prompts = tmp_path / "prompts.jsonl"
    write_prompts(prompts, 8)
    config = JetSpecTrainingConfig(
        output_dir=str(tmp_path / "run"), data_dir=str(tmp_path / "data"), train_files=[str(prompts)],
        head_init=str(tmp_path / "base_head"), use_peft=True, lora_r=4, lora_alpha=8, block_size=4,
        max_new_tokens=12, max_anchors=8, teacher_topk=4, per_device_train_batch_size=2, max_steps=3, use_cpu=True,
        learning_rate=1e-2, disable_tqdm=True,
    )
    _, final_dir = train(config, target=target, tokenizer=tokenizer)
    assert (final_dir / "adapter_model.safetensors").is_file()

    base = JetSpecHead.from_pretrained(tmp_path / "base_head").bind(target)
    adapted = PeftModel.from_pretrained(base, final_dir)
    adapted.generation_config.tree_budget = 8
    prompt = chat_input_ids(tokenizer, "the cat sat on the mat")
    expected = target.generate(prompt, do_sample=False, max_new_tokens=16)
    out = target.generate(prompt, do_sample=False, max_new_tokens=16, assistant_model=adapted)
    assert out.tolist() == expected.tolist()
    assert base.last_generate_stats.rounds > 0  # the adapted head really drafted

    peft_target = get_peft_model(target, LoraConfig(r=2, target_modules=["q_proj"]))
    plain = peft_target.generate(input_ids=prompt, do_sample=False, max_new_tokens=16)
    with_head = peft_target.generate(input_ids=prompt, do_sample=False, max_new_tokens=16, assistant_model=base)
    assert with_head.tolist() == plain.tolist()


def test_draft_vocabulary_from_responses_and_a_wall_clock_budget(tmp_path):
    target, tokenizer, prompts = tiny_run_inputs(tmp_path, seed=12, count=8)
    config = short_run_config(tmp_path, prompts, max_steps=50, logging_steps=1, draft_vocab_size=10,
                              max_train_minutes=1e-6,  # stops after the first step
                              generation_dtype="bfloat16")  # a bf16 copy writes the responses
    trainer, final_dir = train(config, target=target, tokenizer=tokenizer)
    assert trainer.state.global_step == 1
    assert target.dtype == torch.float32  # the teacher labels still come from the fp32 target
    from hf_jetspec import JetSpecHead

    head = JetSpecHead.from_pretrained(final_dir)
    recipe = head.config.training_recipe
    assert head.draft_vocab.numel() == 10 == recipe["draft_vocab_size"]
    rows = [json.loads(line) for line in (tmp_path / "data" / "responses.jsonl").read_text().splitlines()]
    written = [token for row in rows for token in row["input_ids"][row["prompt_length"]:]]
    most = max(set(written), key=written.count)
    assert most in head.draft_vocab.tolist()
    assert 0 < recipe["draft_vocab_coverage_of_responses"] <= 1
    assert recipe["generation_dtype"] == "bfloat16"
    with pytest.raises(ValueError, match="generation_dtype"):
        JetSpecTrainingConfig(output_dir=str(tmp_path / "x"), generation_dtype="float12")
    with pytest.raises(ValueError, match="max_train_minutes"):
        JetSpecTrainingConfig(output_dir=str(tmp_path / "x"), max_train_minutes=0)
