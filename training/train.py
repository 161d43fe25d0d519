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
import json
import logging
import random
import shlex
import shutil
import sys
from pathlib import Path

import torch
from transformers import set_seed
from transformers.trainer_utils import get_last_checkpoint
from trl import TrlParser

import hf_jetspec
from hf_jetspec import JetSpecHead, chat_input_ids
from hf_jetspec.draft_vocab import coverage, select_draft_vocab, token_counts

from .config import JetSpecTrainingConfig
from .curve import save_training_curve
from .data import generate_responses, load_prompts
from .features import OnDemandTeacher, TeacherFeatureDataset, compute_teacher_features, feature_path
from .grow import grow_head, migrate_optimizer_state
from .resources import resolve_corpus, resolve_recipe
from .trainer import ContinuedSchedule, JetSpecTrainer, TauCallback

logger = logging.getLogger(__name__)


def load_target(name_or_path: str, dtype: torch.dtype, attn_implementation: str = "sdpa"):
    if name_or_path == "default":
        return hf_jetspec.load_default_target(dtype=dtype, attn_implementation=attn_implementation)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype, attn_implementation=attn_implementation)
    return model.eval(), AutoTokenizer.from_pretrained(name_or_path)


def build_head(config: JetSpecTrainingConfig, target) -> torch.nn.Module:
    if config.head_init:
        head = JetSpecHead.from_pretrained(config.head_init).bind(target)  # follows the target's device
        if config.grow_to_layers is not None:
            grow_head(head, config.grow_to_layers)  # new layers on top, drafts unchanged
    else:
        taps = hf_jetspec.default_target_layer_ids(
            target.config.get_text_config().num_hidden_layers, config.num_taps or max(config.num_head_layers, 3)
        )
        head = JetSpecHead.from_target(
            target, num_hidden_layers=config.num_head_layers, block_size=config.block_size, target_layer_ids=taps,
            anchor_context=config.anchor_context, init_from_target=config.init_from_target,
            layer_family=config.layer_family, causal_block=config.causal_block,
        )
    head = head.float()
    if config.use_peft:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                          target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
        head = get_peft_model(head, lora)
    return head


def prepare_data(config: JetSpecTrainingConfig, target, tokenizer, target_layer_ids, holdout: int):
    """Responses and teacher features (main process first; the others then read the cache).

    Returns the feature dataset, the held-out prompt rows (`prompt` or `input_ids` of the prompt), the skipped-row
    counts, the response rows, and the corpus' `validation` split as a feature dataset (`None` without one).
    """
    data_dir = Path(config.data_dir)
    validation = None
    if config.corpus:
        from .corpus import load_corpus

        folder = resolve_corpus(config.corpus)  # or the packaged copy
        rows = [dict(row) for row in load_corpus(folder)]
        validation = load_corpus(folder, split="validation")
        validation = [dict(row) for row in validation] if validation is not None else None
        random.Random(config.seed).shuffle(rows)
        first_turns = [row for row in rows if row["turn"] == 1][:holdout]
        held_ids = {row["id"] for row in first_turns}
        held_out = [{"id": row["id"], "input_ids": row["input_ids"][: row["prompt_length"]]} for row in first_turns]
        responses = [row for row in rows if row["id"] not in held_ids]
        skipped = {}
    else:
        if not config.train_files:
            raise ValueError("no `train_files` given: pass prompt JSON/JSONL files (e.g. --train_files a.jsonl b.jsonl)")
        prompts = load_prompts(config.train_files, config.limit_per_file, seed=config.seed)
        if not prompts.rows:
            raise ValueError(f"no usable prompt rows in {config.train_files} (skipped: {dict(prompts.skipped)})")
        rows = prompts.rows
        random.Random(config.seed).shuffle(rows)
        held_out, rows = rows[:holdout], rows[holdout:]
        skipped = dict(prompts.skipped)
    with config.main_process_first(desc="on-policy responses and teacher features"):
        if not config.corpus:
            writer = target
            if config.generation_dtype and getattr(torch, config.generation_dtype) != target.dtype:
                writer = copy.deepcopy(target).to(getattr(torch, config.generation_dtype))
            responses = generate_responses(
                writer, tokenizer, rows, data_dir / "responses.jsonl", max_new_tokens=config.max_new_tokens,
                temperature=config.generation_temperature, batch_size=config.generation_batch_size,
            )
            del writer
        features = data_dir / f"features-{'-'.join(map(str, target_layer_ids))}"
        teacher = None
        if config.teacher_features == "on_demand" and not config.prepare_only:
            paths = [feature_path(features, row["id"]) for row in responses]
            teacher = OnDemandTeacher(target, responses, features, target_layer_ids, topk=config.teacher_topk)
            logger.info("teacher features on demand: %d of %d rows already cached in %s",
                        sum(path.is_file() for path in paths), len(paths), features)
        else:
            paths = compute_teacher_features(target, responses, features, target_layer_ids, topk=config.teacher_topk)
        if validation:  # small, and read whole at every evaluation: computed up front
            validation = TeacherFeatureDataset(
                compute_teacher_features(target, validation, features, target_layer_ids, topk=config.teacher_topk))
    return TeacherFeatureDataset(paths, teacher=teacher), held_out, skipped, responses, validation


def continue_from_head(config: JetSpecTrainingConfig, head=None) -> tuple[str | None, dict | None, bool]:
    """With `continue_training`: the checkpoint the trainer resumes from, the head's earlier recipe, and whether that
    checkpoint was made from the head folder just now (`False` when resuming a checkpoint of this run).

    The head folder's `training_state/` (optimizer, scheduler, trainer state) and its weights become
    `output_dir/checkpoint-<step>` unless the output folder already holds a checkpoint (a continuation run that was
    itself stopped resumes from its own latest one). `max_steps` becomes the head's step count + `more_steps`. A head
    grown deeper (`grow_to_layers`, passed as `head`) goes into the checkpoint as grown.
    """
    if not config.continue_training:
        return None, None, False
    from transformers.trainer import TRAINER_STATE_NAME
    from transformers.trainer_callback import TrainerState

    head_dir = Path(config.head_init)
    previous = json.loads((head_dir / "config.json").read_text()).get("training_recipe")
    state_dir = head_dir / "training_state"
    if not (state_dir / TRAINER_STATE_NAME).is_file():
        logger.warning("%s has no training_state/: warm start from its weights only", head_dir)
        if config.more_steps:
            config.max_steps = config.more_steps
        return None, previous, False
    step = TrainerState.load_from_json(str(state_dir / TRAINER_STATE_NAME)).global_step
    if config.more_steps:
        config.max_steps = step + config.more_steps
    if config.max_steps <= step:
        raise ValueError(f"{head_dir} was trained for {step} steps; `max_steps` {config.max_steps} adds none: set "
                         "`more_steps`")
    config.ignore_data_skip = True  # the data may have grown: start the new run's epoch from its beginning
    output_dir = Path(config.output_dir)
    if output_dir.is_dir() and get_last_checkpoint(str(output_dir)):
        return get_last_checkpoint(str(output_dir)), previous, False
    checkpoint = output_dir / f"checkpoint-{step}"
    checkpoint.mkdir(parents=True, exist_ok=True)
    grown = config.grow_to_layers is not None and head is not None
    weights = [] if grown else [head_dir / "config.json", head_dir / "model.safetensors"]
    for path in [*state_dir.iterdir(), *weights]:
        shutil.copy2(path, checkpoint / path.name)
    if grown:
        head.save_pretrained(checkpoint)  # the trainer loads the checkpoint's weights: the grown ones
    if config.restart_schedule:  # the restored scheduler peaks at this run's rate, not the head's
        from transformers.trainer import SCHEDULER_NAME

        scheduler = torch.load(checkpoint / SCHEDULER_NAME, weights_only=False)
        scheduler["base_lrs"] = [config.learning_rate] * len(scheduler["base_lrs"])
        torch.save(scheduler, checkpoint / SCHEDULER_NAME)
    return str(checkpoint), previous, True


def save_training_state(trainer: JetSpecTrainer, head_dir: Path) -> None:
    """Writes the optimizer, scheduler and trainer state next to the saved head (`training_state/`), so that a later
    run continues this one (`continue_training`)."""
    from transformers.trainer import OPTIMIZER_NAME, SCHEDULER_NAME, TRAINER_STATE_NAME

    state_dir = head_dir / "training_state"
    state_dir.mkdir(parents=True, exist_ok=True)
    torch.save(trainer.optimizer.state_dict(), state_dir / OPTIMIZER_NAME)
    torch.save(trainer.lr_scheduler.state_dict(), state_dir / SCHEDULER_NAME)
    trainer.state.save_to_json(str(state_dir / TRAINER_STATE_NAME))


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
    `None` and the data directory; with `eval_only`: the trainer and `None`).

    `target`/`tokenizer` may be passed already loaded; otherwise `config.target_model` is loaded.
    """
    if target is None:
        # On CPU `bf16` is autocast for the head only: the teacher labels and the tau checks come from the fp32 target.
        on_gpu = torch.cuda.is_available() and not config.use_cpu
        dtype = torch.bfloat16 if config.bf16 and on_gpu else torch.float32
        if config.target_dtype is not None:
            dtype = getattr(torch, config.target_dtype)
        target, tokenizer = load_target(config.target_model, dtype, config.attn_implementation)
        # the trainer puts the head on this process's device (a GPU unless use_cpu); the frozen target, whose
        # embeddings and lm_head the head shares and whose features label the data, goes there too
        target.to(config.device)
    target.requires_grad_(False)
    set_seed(config.seed)  # a new head's weights follow the seed, not whatever ran before in this process
    head = build_head(config, target)
    core = head.get_base_model() if config.use_peft else head
    holdout = config.tau_eval_prompts if config.tau_eval_steps else 0
    dataset, held_out, skipped, responses, validation = prepare_data(
        config, target, tokenizer, core.config.target_layer_ids, holdout)
    if config.prepare_only:
        logger.info("prepare_only: %d sequences cached in %s", len(dataset), config.data_dir)
        return None, Path(config.data_dir)

    if config.eval_only:
        return evaluate_head(config, head, dataset, validation), None

    resume, previous, fresh = continue_from_head(config, core)  # before the trainer: it may set max_steps
    # the corpus' validation split (rows no head trains on): `--eval_strategy steps` puts its agreement on the curve
    trainer = JetSpecTrainer(model=head, args=config, train_dataset=dataset, eval_dataset=validation)
    if fresh and config.grow_to_layers is not None:  # the saved AdamW state, re-indexed for the grown head
        from transformers.trainer import OPTIMIZER_NAME

        old_layers = json.loads((Path(config.head_init) / "config.json").read_text())["num_hidden_layers"]
        migrate_optimizer_state(Path(resume) / OPTIMIZER_NAME, trainer, head, old_layers)
    if resume and config.continue_training:
        if config.restart_schedule:
            trainer.schedule_start = config.max_steps - config.more_steps  # the head's step count
        trainer.add_callback(ContinuedSchedule())
        trainer.run_start_minutes = float((previous or {}).get("train_minutes") or 0.0)  # max_train_minutes: this run's
    if config.tau_eval_steps:
        prompt_ids = [torch.tensor([row["input_ids"]]) if "input_ids" in row else chat_input_ids(tokenizer, row["prompt"])
                      for row in held_out]
        trainer.add_callback(TauCallback(trainer, target, prompt_ids, config.tau_eval_steps,
                                         config.tau_eval_max_new_tokens, config.tau_eval_tree_budget))
    last = resume or (get_last_checkpoint(config.output_dir) if Path(config.output_dir).is_dir() else None)
    if last:
        logger.info("resuming from %s", last)
    trainer.train(resume_from_checkpoint=last)

    validation_metrics = None
    if validation is not None:  # the head as trained, on unseen on-policy rows, before the draft vocabulary is cut
        torch.manual_seed(config.seed)  # the same random anchors for every head
        measured = trainer.evaluate()
        validation_metrics = {"sequences": len(validation), "top1_depth1": measured.get("eval_top1_depth1"),
                              "expected_chain_tau": measured.get("eval_expected_chain_tau"),
                              "loss": round(measured["eval_loss"], 4) if "eval_loss" in measured else None}
    draft_vocab_coverage = None
    if config.draft_vocab_size:
        draft_vocab_coverage = set_draft_vocab_from_responses(
            core, responses, config.draft_vocab_size, target.generation_config.eos_token_id
        )
    core.config.target_tokenizer = hf_jetspec.tokenizer_fingerprint(tokenizer)
    minutes = next((float(log["train_minutes"]) for log in reversed(trainer.state.log_history)
                    if "train_minutes" in log), None)
    # this run's share: a continued head's cumulative minutes and steps are where its recipe left off
    continued = bool(config.continue_training and resume and previous)
    start_step = previous.get("global_steps", 0) if continued else 0
    run_minutes = None if minutes is None else round(minutes - trainer.run_start_minutes, 3)
    runs = list(previous.get("runs", [])) if config.continue_training and previous else []
    if config.continue_training and previous and not runs:  # a head trained before runs were recorded
        runs.append({"command": None, "steps": [0, previous.get("global_steps")],
                     "train_minutes": previous.get("train_minutes"), "cpu_hours": _cpu_hours(previous.get("train_minutes"), None)})
    runs.append({
        "command": " ".join([Path(sys.argv[0]).name, *(shlex.quote(arg) for arg in sys.argv[1:])]),  # no local paths
        "steps": [start_step, trainer.state.global_step],
        "sequences": len(dataset),
        # on demand, this run's minutes include the target forwards that wrote these rows' features (this process)
        "teacher_rows_computed": dataset.teacher.computed if dataset.teacher is not None else None,
        "train_minutes": run_minutes,
        "torch_threads": torch.get_num_threads(),
        "world_size": config.world_size,
        "cpu_hours": _cpu_hours(run_minutes, torch.get_num_threads() * config.world_size),
    })
    core.config.training_recipe = {
        "objective": "on-policy distillation, KL(target||head) per depth over random anchors",
        "train_files": [Path(f).name for f in config.train_files],
        "corpus": Path(config.corpus).name if config.corpus else None,
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
        "train_minutes": minutes,
        "runs": runs,
        "total_cpu_hours": round(sum(run["cpu_hours"] or 0.0 for run in runs), 3),
        "world_size": config.world_size,
        "total_train_batch_size": config.per_device_train_batch_size * config.world_size
        * config.gradient_accumulation_steps,
        "use_peft": config.use_peft,
        "draft_vocab_size": core.config.draft_vocab_size,
        "draft_vocab_coverage_of_responses": draft_vocab_coverage,
        "validation": validation_metrics,
    }
    final_dir = Path(config.output_dir) / "final"
    trainer.save_model(str(final_dir))
    if trainer.is_world_process_zero():
        save_training_state(trainer, final_dir)
    if trainer.is_world_process_zero():
        save_training_curve(trainer.state.log_history, config.output_dir)
    return trainer, final_dir


def evaluate_head(config: JetSpecTrainingConfig, head, dataset, validation) -> JetSpecTrainer:
    """`eval_only`: the head's loss and agreement on the validation split (text no head trained on) and on the first
    as many training rows (text it may have trained on), with the same random anchors; written to
    `output_dir/eval_results.json` and logged."""
    if validation is None:
        raise ValueError(f"`eval_only`: the corpus {config.corpus} has no validation split (build one with "
                         "`python -m hf_jetspec_training.corpus --extend --validation N`)")
    trainer = JetSpecTrainer(model=head, args=config, train_dataset=dataset)
    seen = torch.utils.data.Subset(dataset, range(min(len(validation), len(dataset))))
    results = {"head": config.head_init, "corpus": Path(config.corpus).name, "max_anchors": config.max_anchors}
    for name, rows in (("validation", validation), ("train", seen)):
        torch.manual_seed(config.seed)
        measured = trainer.evaluate(eval_dataset=rows, metric_key_prefix="eval")
        results[name] = {"sequences": len(rows), "loss": round(measured["eval_loss"], 4),
                         "top1_depth1": measured["eval_top1_depth1"],
                         "expected_chain_tau": measured["eval_expected_chain_tau"]}
    Path(config.output_dir).mkdir(parents=True, exist_ok=True)
    (Path(config.output_dir) / "eval_results.json").write_text(json.dumps(results, indent=1))
    logger.info("eval_only: %s", json.dumps(results))
    return trainer


def _cpu_hours(minutes: float | None, threads: int | None) -> float | None:
    """CPU-hours of a run: wall minutes x threads (x processes); a run of unknown threads counts 2 (the CPU recipe's
    box)."""
    return None if minutes is None else round(minutes / 60 * (threads or 2), 3)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--config" in argv[:-1]:  # a checkout path or a packaged recipe's name, e.g. --config smollm2-135m-cpu-qwen3
        index = argv.index("--config") + 1
        argv[index] = str(resolve_recipe(argv[index]))
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
