"""Train a JetSpec head for a target, TRL style.

Steps: load the frozen target; read prompts (malformed / near-eval rows skipped and counted); regenerate responses
with the target (on-policy, cached); one teacher pass for tap features and top-k labels (cached); train the head
(checkpoints, resume); save it with its training recipe.

Usage:
    jetspec-train --config training/recipes/smollm2-135m-cpu.yaml
    jetspec-train --config training/recipes/smollm2-135m-cpu.yaml --max_steps 20 --output_dir outputs/try
    accelerate launch --multi_gpu --num_processes 2 -m hf_jetspec_training.train --config ... --use_cpu true
        (several processes through torchrun; on CPUs they talk over gloo; drop --use_cpu on GPUs)
"""

from __future__ import annotations

import copy
import logging
import random
from pathlib import Path

import torch
from transformers.trainer_utils import get_last_checkpoint
from trl import TrlParser

import hf_jetspec
from hf_jetspec import JetSpecHead, chat_input_ids
from hf_jetspec.draft_vocab import coverage, select_draft_vocab, token_counts

from .config import JetSpecTrainingConfig
from .curve import save_training_curve
from .data import generate_responses, load_prompts
from .features import TeacherFeatureDataset, compute_teacher_features
from .trainer import JetSpecTrainer, TauCallback

logger = logging.getLogger(__name__)


def load_target(name_or_path: str, dtype: torch.dtype):
    if name_or_path == "default":
        return hf_jetspec.load_default_target(dtype=dtype)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype, attn_implementation="sdpa")
    return model.eval(), AutoTokenizer.from_pretrained(name_or_path)


def build_head(config: JetSpecTrainingConfig, target) -> torch.nn.Module:
    if config.head_init:
        head = JetSpecHead.from_pretrained(config.head_init).to(target.device).bind(target)
    else:
        taps = hf_jetspec.default_target_layer_ids(
            target.config.get_text_config().num_hidden_layers, config.num_taps or max(config.num_head_layers, 3)
        )
        head = JetSpecHead.from_target(
            target, num_hidden_layers=config.num_head_layers, block_size=config.block_size, target_layer_ids=taps,
            anchor_context=config.anchor_context, init_from_target=config.init_from_target,
        )
    head = head.float()
    if config.use_peft:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                          target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
        head = get_peft_model(head, lora)
    return head


def prepare_data(config: JetSpecTrainingConfig, target, tokenizer, target_layer_ids, holdout: int):
    """Responses and teacher features (main process first; the others then read the cache)."""
    if not config.train_files:
        raise ValueError("no `train_files` given: pass prompt JSON/JSONL files (e.g. --train_files a.jsonl b.jsonl)")
    prompts = load_prompts(config.train_files, config.limit_per_file, seed=config.seed)
    if not prompts.rows:
        raise ValueError(f"no usable prompt rows in {config.train_files} (skipped: {dict(prompts.skipped)})")
    rows = prompts.rows
    random.Random(config.seed).shuffle(rows)
    held_out, rows = rows[:holdout], rows[holdout:]
    data_dir = Path(config.data_dir)
    with config.main_process_first(desc="on-policy responses and teacher features"):
        writer = target
        if config.generation_dtype and getattr(torch, config.generation_dtype) != target.dtype:
            writer = copy.deepcopy(target).to(getattr(torch, config.generation_dtype))
        responses = generate_responses(
            writer, tokenizer, rows, data_dir / "responses.jsonl", max_new_tokens=config.max_new_tokens,
            temperature=config.generation_temperature, batch_size=config.generation_batch_size,
        )
        del writer
        paths = compute_teacher_features(
            target, responses, data_dir / f"features-{'-'.join(map(str, target_layer_ids))}", target_layer_ids,
            topk=config.teacher_topk,
        )
    return TeacherFeatureDataset(paths), held_out, dict(prompts.skipped), responses


def set_draft_vocab_from_responses(head, responses: list[dict], size: int, eos_token_id=None) -> float:
    """Gives `head` the draft vocabulary of the `size` tokens the target writes most in `responses` (cached rows with
    `input_ids` and `prompt_length`), its end-of-sequence tokens included; returns their coverage of the responses."""
    counts = token_counts((row["input_ids"][row["prompt_length"] :] for row in responses), head.config.vocab_size)
    always = [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    token_ids = select_draft_vocab(counts, min(size, head.config.vocab_size), always=always)
    head.set_draft_vocab(token_ids)
    return round(coverage(counts, token_ids), 4)


def train(config: JetSpecTrainingConfig, target=None, tokenizer=None) -> tuple[JetSpecTrainer | None, Path]:
    """Runs the whole pipeline; returns the trainer and the directory of the saved head (with `prepare_only`:
    `None` and the data directory).

    `target`/`tokenizer` may be passed already loaded; otherwise `config.target_model` is loaded.
    """
    if target is None:
        # On CPU `bf16` is autocast for the head only: the teacher labels and the tau checks come from the fp32 target.
        on_gpu = torch.cuda.is_available() and not config.use_cpu
        dtype = torch.bfloat16 if config.bf16 and on_gpu else torch.float32
        target, tokenizer = load_target(config.target_model, dtype)
    target.requires_grad_(False)
    head = build_head(config, target)
    core = head.get_base_model() if config.use_peft else head
    holdout = config.tau_eval_prompts if config.tau_eval_steps else 0
    dataset, held_out, skipped, responses = prepare_data(config, target, tokenizer, core.config.target_layer_ids, holdout)
    if config.prepare_only:
        logger.info("prepare_only: %d sequences cached in %s", len(dataset), config.data_dir)
        return None, Path(config.data_dir)

    trainer = JetSpecTrainer(model=head, args=config, train_dataset=dataset)
    if config.tau_eval_steps:
        prompt_ids = [chat_input_ids(tokenizer, row["prompt"]) for row in held_out]
        trainer.add_callback(TauCallback(trainer, target, prompt_ids, config.tau_eval_steps,
                                         config.tau_eval_max_new_tokens, config.tau_eval_tree_budget))
    last = get_last_checkpoint(config.output_dir) if Path(config.output_dir).is_dir() else None
    if last:
        logger.info("resuming from %s", last)
    trainer.train(resume_from_checkpoint=last)

    draft_vocab_coverage = None
    if config.draft_vocab_size:
        draft_vocab_coverage = set_draft_vocab_from_responses(
            core, responses, config.draft_vocab_size, target.generation_config.eos_token_id
        )
    core.config.target_tokenizer = hf_jetspec.tokenizer_fingerprint(tokenizer)
    core.config.training_recipe = {
        "objective": "on-policy distillation, KL(target||head) per depth over random anchors",
        "train_files": [Path(f).name for f in config.train_files],
        "limit_per_file": config.limit_per_file,
        "skipped_prompt_rows": skipped,
        "sequences": len(dataset),
        "max_new_tokens": config.max_new_tokens,
        "generation_temperature": config.generation_temperature,
        "generation_dtype": config.generation_dtype or str(target.dtype).removeprefix("torch."),
        "max_anchors": config.max_anchors,
        "depth_decay": config.depth_decay,
        "loss_vocabulary": config.loss_vocabulary,
        "num_negative_tokens": config.num_negative_tokens if config.loss_vocabulary == "batch" else None,
        "teacher_topk": config.teacher_topk,
        "epochs": round(trainer.state.epoch or 0.0, 2),  # as run (max_steps overrides num_train_epochs)
        "max_steps": config.max_steps,
        "learning_rate": config.learning_rate,
        "global_steps": trainer.state.global_step,
        "train_minutes": next((float(log["train_minutes"]) for log in reversed(trainer.state.log_history)
                               if "train_minutes" in log), None),
        "world_size": config.world_size,
        "total_train_batch_size": config.per_device_train_batch_size * config.world_size
        * config.gradient_accumulation_steps,
        "use_peft": config.use_peft,
        "draft_vocab_size": core.config.draft_vocab_size,
        "draft_vocab_coverage_of_responses": draft_vocab_coverage,
    }
    final_dir = Path(config.output_dir) / "final"
    trainer.save_model(str(final_dir))
    if trainer.is_world_process_zero():
        save_training_curve(trainer.state.log_history, config.output_dir)
    return trainer, final_dir


def main(argv: list[str] | None = None) -> None:
    parser = TrlParser((JetSpecTrainingConfig,))
    (config,) = parser.parse_args_and_config(argv)
    logging.basicConfig(level=logging.INFO)
    train(config)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # Tear the process group down before exit: left to interpreter shutdown, gloo's threads can abort
        # ("terminate called without an active exception") and fail the launch.
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
