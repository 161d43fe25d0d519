"""`JetSpecTrainingConfig`: every setting of a head-training run, parsed by `TrlParser` from CLI flags or YAML."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from trl.trainer.base_config import _BaseConfig

logger = logging.getLogger(__name__)
# `bf16` left unset on a CPU: bf16 autocast only where it measures at least this much faster than fp32
BF16_MIN_SPEEDUP = 1.1


def auto_generation_dtype(on_gpu: bool = False) -> str | None:
    """The dtype a copy of the target writes on-policy responses in under `generation_dtype: auto`: `"bfloat16"` on a
    CPU where bf16 autocast measures at least `BF16_MIN_SPEEDUP` faster than fp32 (AMX, AVX-512 BF16), else `None`
    (the target as loaded; on a GPU the target already runs in bf16 with `bf16`). On an AVX2 CPU bf16 is emulated: on a
    2-core EPYC without AVX-512, bf16 autocast measured 0.04x fp32's speed, a 64-row lm_head matmul 0.15x, and a bf16
    writer at batch 64 made 1.3 tokens/s against 8.0 in fp32 (8 new tokens, one thread)."""
    from hf_jetspec.cpu import bf16_autocast_speedup

    return None if on_gpu or bf16_autocast_speedup() < BF16_MIN_SPEEDUP else "bfloat16"


@dataclass
class JetSpecTrainingConfig(_BaseConfig):
    r"""
    Configuration of [`JetSpecTrainer`] and the `jetspec-train` script (TRL style: `TrainingArguments` plus the
    fields below; see `training/recipes/*.yaml`).

    Parameters:
        target_model (`str`, defaults to `"default"`): target name or path; `"default"` is the embedded
            SmolLM2-135M-Instruct (`hf_jetspec.load_default_target`). It runs on the trainer's device (a GPU unless
            `use_cpu`; each process's own under `accelerate launch`).
        target_dtype (`str`, *optional*): the target's dtype; default bfloat16 with `bf16` on a GPU, else float32 (on
            a CPU `bf16` autocasts the head only).
        attn_implementation (`str`, defaults to `"sdpa"`): the target's attention (`"sdpa"` or `"eager"`).
        head_init (`str`, *optional*): an existing head to start from (fine-tuning, `--use_peft` domain adaptation).
        continue_training (`bool`, defaults to `False`): with `head_init`, continue that head's training: its optimizer
            and scheduler state and step count (`training_state/` in the head folder, written by every run) are
            restored, `more_steps` are added to its step count, and the run is appended to its recipe's `runs`
            (commands, steps, minutes, CPU-hours; `total_cpu_hours` adds them up). A head without `training_state/`
            is a warm start (weights only).
        more_steps (`int`, *optional*): with `continue_training`, train this many steps past the head's step count
            (`max_steps` then counts from the first run).
        restart_schedule (`bool`, defaults to `False`): with `continue_training`, give the run its own warmup and decay
            over `more_steps`, peaking at `learning_rate` (a warm restart: the optimizer's moments and the step count
            carry on), instead of stretching the head's schedule over the new total, where every continuation starts
            from a smaller rate than the last (from step 5932 of a cosine, 1400 more steps start at 9e-5 of 1e-3).
        grow_to_layers (`int`, *optional*): with `head_init`, give the head this many decoder layers: new ones go on
            top with zero output projections, so the grown head drafts as before (`hf_jetspec_training.grow`); with
            `continue_training` the old weights keep their optimizer state.
        layer_family (`str`, defaults to `"qwen3"`): a new head's layers: `"qwen3"` (any target family; the layout
            vLLM's DFlash drafter runs) or `"target"` (the target's own family, as heads were built before).
        corpus (`str`, *optional*): an on-policy corpus folder (`hf_jetspec_training.corpus`, parquet shards + card)
            to train on instead of prompts and freshly generated responses.
        num_head_layers (`int`, defaults to 1): decoder layers in a new head.
        block_size (`int`, defaults to 16): anchor + drafted depths per block.
        num_taps (`int`, *optional*): tapped target layers of a new head (default: `max(num_head_layers, 3)`).
        anchor_context (`bool`, defaults to `True`): a new head also feeds the target's last committed state into
            every block row (see `JetSpecConfig.anchor_context`).
        causal_block (`bool`, defaults to `True`): a new head's block is causal (JetSpec); `False`: bidirectional
            (DFlash's per-depth marginals), the ablation of the paper (see `JetSpecConfig.causal_block`).
        init_from_target (`bool`, defaults to `False`): start a new head's decoder layers from the target's last ones.
            Off by default: those layers expect the target's residual stream (norm ~700 for SmolLM2) and swamp the
            head's inputs (norm ~12) with a near-constant output, so every anchor and depth drafted the same token.
        train_files (`list[str]`): prompt files (JSON/JSONL with a `prompt` field).
        limit_per_file (`list[int]`, *optional*): prompts kept per file: one value for every file, or one per file.
        max_new_tokens (`int`, defaults to 256): length of the target's on-policy responses.
        generation_temperature (`float`, defaults to 0.0): 0 = greedy responses.
        generation_batch_size (`int`, defaults to 8): prompts per batched `generate()`.
        generation_dtype (`str`, *optional*): write the responses with a copy of the target in this dtype (e.g.
            `"bfloat16"`: 2.3x the tokens/s of float32 on CPUs with AMX); the teacher labels still come from the target
            as loaded. Unset: the target itself writes them. `"auto"`: `"bfloat16"` on a CPU where bf16 measures
            at least `BF16_MIN_SPEEDUP` faster ([`hf_jetspec.cpu.bf16_autocast_speedup`]), else unset.
        teacher_topk (`int`, defaults to 32): target probabilities kept per position for the KL.
        max_anchors (`int`, defaults to 512): random anchors per sequence and step.
        depth_decay (`float`, *optional*): per-depth loss weight `decay ** (d - 1)`; unset = uniform.
        loss_vocabulary (`str`, defaults to `"full"`): `"full"` = softmax over the whole vocabulary (the objective of
            the paper); `"batch"` = over the batch's teacher top-k tokens plus `num_negative_tokens` random others
            (several times cheaper on CPUs, where the lm_head over anchor rows dominates a step).
        num_negative_tokens (`int`, defaults to 2048): random extra tokens of `loss_vocabulary="batch"`.
        data_dir (`str`, defaults to `"outputs/jetspec-data"`): cache of responses and teacher features.
        teacher_features (`str`, defaults to `"precompute"`): `"precompute"` = the whole teacher pass before the first
            step; `"on_demand"` = a batch's missing feature files are written when training first reads it (one target
            forward per batch): training starts at once on a machine without the cache, and a run shorter than an
            epoch pays only for the rows it reaches. The files are the same either way and are reused.
        prepare_only (`bool`, defaults to `False`): stop after the responses and teacher features are cached (prepare
            the data on one machine, train on another, or tune the training settings on cached data).
        eval_only (`bool`, defaults to `False`): train nothing; measure `head_init` (loss, depth-1 agreement, expected
            chain tau) on the corpus' `validation` split and on as many of its training rows, and write
            `eval_results.json` to `output_dir`: the gap between the two says whether a head needs more data or more
            steps.
        tau_eval_steps (`int`, defaults to 0): measure tau with the real `generate()` path every N steps (0 = off).
        tau_eval_prompts (`int`, defaults to 4): held-out prompts for that measurement.
        tau_eval_max_new_tokens (`int`, defaults to 64).
        tau_eval_tree_budget (`int`, defaults to 8): fixed tree budget of that measurement (the head's acceptance,
            not this machine's `"auto"` cost decisions).
        draft_vocab_size (`int`, *optional*): give the saved head a draft vocabulary of this many tokens, the most
            frequent in the target's on-policy responses (see `hf_jetspec/draft_vocab.py`); unset: the whole
            vocabulary.
        max_train_minutes (`float`, *optional*): stop training (and save the head) once this many minutes of
            training have passed in this run, whatever `max_steps` says: a wall-clock budget (a run continuing a saved
            head does not count the head's earlier runs).
        use_peft (`bool`, defaults to `False`): train a LoRA adapter (`lora_r`, `lora_alpha`, `lora_dropout`) on the
            head's linear layers instead of all weights.
    """

    target_model: str = field(default="default", metadata={"help": "Target name/path, or 'default' (SmolLM2-135M)."})
    target_dtype: str | None = field(
        default=None, metadata={"help": "The target's dtype (default: bfloat16 with bf16 on a GPU, else float32)."}
    )
    attn_implementation: str = field(default="sdpa", metadata={"help": "The target's attention: sdpa or eager."})
    head_init: str | None = field(default=None, metadata={"help": "Start from this head (path)."})
    continue_training: bool = field(default=False, metadata={"help": "Continue head_init's run (optimizer, steps)."})
    more_steps: int | None = field(default=None, metadata={"help": "With continue_training: steps past the head's."})
    restart_schedule: bool = field(
        default=False, metadata={"help": "With continue_training: a new warmup and decay over more_steps (warm restart)."}
    )
    grow_to_layers: int | None = field(
        default=None, metadata={"help": "With head_init: grow the head to this many decoder layers (drafts unchanged)."}
    )
    layer_family: str = field(default="qwen3", metadata={"help": "A new head's layers: 'qwen3' or 'target'."})
    corpus: str | None = field(default=None, metadata={"help": "On-policy corpus folder to train on."})
    num_head_layers: int = field(default=1, metadata={"help": "Decoder layers of a new head."})
    block_size: int = field(default=16, metadata={"help": "Anchor + drafted depths per block."})
    num_taps: int | None = field(default=None, metadata={"help": "Tapped target layers of a new head."})
    anchor_context: bool = field(default=True, metadata={"help": "Feed the last committed target state to the block."})
    causal_block: bool = field(default=True, metadata={"help": "Causal block (JetSpec); false: bidirectional (DFlash)."})
    init_from_target: bool = field(
        default=False, metadata={"help": "Start a new head's layers from the target's last ones (default: random)."}
    )
    train_files: list[str] = field(default_factory=list, metadata={"help": "Prompt JSON/JSONL files."})
    limit_per_file: list[int] | None = field(
        default=None, metadata={"help": "Prompts kept per file: one value, or one per train file."}
    )
    max_new_tokens: int = field(default=256, metadata={"help": "Length of on-policy responses."})
    generation_temperature: float = field(default=0.0, metadata={"help": "0 = greedy responses."})
    generation_batch_size: int = field(default=8, metadata={"help": "Prompts per batched generate()."})
    generation_dtype: str | None = field(
        default=None, metadata={"help": "Write responses with a copy of the target in this dtype (e.g. bfloat16), "
                                        "or 'auto': bfloat16 on a CPU where bf16 measures faster."}
    )
    teacher_topk: int = field(default=32, metadata={"help": "Target probabilities kept per position."})
    max_anchors: int = field(default=512, metadata={"help": "Random anchors per sequence and step."})
    depth_decay: float | None = field(default=None, metadata={"help": "Loss weight decay per depth (unset: uniform)."})
    loss_vocabulary: str = field(default="full", metadata={"help": "'full' or 'batch' (teacher top-k + negatives)."})
    num_negative_tokens: int = field(default=2048, metadata={"help": "Random extra tokens for loss_vocabulary=batch."})
    data_dir: str = field(default="outputs/jetspec-data", metadata={"help": "Cache of responses and features."})
    teacher_features: str = field(
        default="precompute", metadata={"help": "'precompute' (whole teacher pass first) or 'on_demand' (per batch)."}
    )
    prepare_only: bool = field(default=False, metadata={"help": "Only cache responses and teacher features."})
    eval_only: bool = field(default=False, metadata={"help": "Measure head_init on the validation split and as many "
                                                             "training rows; train nothing."})
    tau_eval_steps: int = field(default=0, metadata={"help": "Measure tau with generate() every N steps (0: off)."})
    tau_eval_prompts: int = field(default=4, metadata={"help": "Held-out prompts for tau."})
    tau_eval_max_new_tokens: int = field(default=64, metadata={"help": "New tokens per tau prompt."})
    tau_eval_tree_budget: int = field(default=8, metadata={"help": "Fixed tree budget of the tau measurement."})
    draft_vocab_size: int | None = field(
        default=None, metadata={"help": "Draft vocabulary of the saved head: the N most frequent response tokens."}
    )
    max_train_minutes: float | None = field(default=None, metadata={"help": "Stop training after this many minutes."})
    use_peft: bool = field(default=False, metadata={"help": "Train a LoRA adapter instead of all head weights."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout."})

    # TrainingArguments defaults that fit a small head trained from cached features.
    learning_rate: float = field(default=3e-4, metadata={"help": "AdamW learning rate."})
    num_train_epochs: float = field(default=6.0, metadata={"help": "Epochs over the cached sequences."})
    # TRL turns gradient checkpointing on by default; a one-layer head does not need it. `None` (transformers'
    # deprecated alias left unset) resolves to `activation_checkpointing=False` without a deprecation warning.
    gradient_checkpointing: bool | None = field(default=None, metadata={"help": "Deprecated alias of activation_checkpointing."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Keep all collated fields."})
    prediction_loss_only: bool = field(
        default=True, metadata={"help": "Evaluation keeps the loss and agreement only (the head's logits are large)."}
    )
    save_strategy: str = field(default="steps", metadata={"help": "Checkpoint strategy."})
    save_steps: float = field(default=50, metadata={"help": "Checkpoint every N steps."})
    save_total_limit: int | None = field(default=2, metadata={"help": "Checkpoints kept."})

    def __post_init__(self):
        if self.bf16 is None:  # auto: bf16 on GPUs; on a CPU only where bf16 autocast measures faster than fp32
            on_gpu = torch.cuda.is_available() and not self.use_cpu
            if on_gpu or self.fp16:
                self.bf16 = on_gpu and not self.fp16
            else:
                from hf_jetspec.cpu import bf16_autocast_speedup, cpu_class

                speedup = bf16_autocast_speedup()
                self.bf16 = speedup >= BF16_MIN_SPEEDUP
                logger.info("bf16 auto: bf16 autocast runs a head layer %.2fx as fast as fp32 on this %s CPU: "
                            "training in %s", speedup, cpu_class(), "bf16" if self.bf16 else "fp32")
        if self.generation_dtype == "auto":  # a bf16 copy writes the responses only where bf16 measures faster
            self.generation_dtype = auto_generation_dtype(torch.cuda.is_available() and not self.use_cpu)
        if self.block_size < 2:
            raise ValueError(f"`block_size` must be >= 2, got {self.block_size}")
        if self.max_anchors < 1 or self.teacher_topk < 1 or self.num_head_layers < 1:
            raise ValueError("`max_anchors`, `teacher_topk` and `num_head_layers` must be >= 1")
        if self.teacher_features not in ("precompute", "on_demand"):
            raise ValueError(f"`teacher_features` is 'precompute' or 'on_demand', got {self.teacher_features!r}")
        if self.teacher_features == "on_demand" and self.dataloader_num_workers:
            raise ValueError("`teacher_features='on_demand'` runs the target in the process that reads the batches: "
                             "set `dataloader_num_workers=0` (or precompute the features)")
        if self.eval_only and not (self.head_init and self.corpus):
            raise ValueError("`eval_only` measures `head_init` on a `corpus` with a validation split: give both")
        if self.grow_to_layers is not None and not self.head_init:
            raise ValueError("`grow_to_layers` grows a trained head: give it with `head_init` (a new head takes "
                             "`num_head_layers`)")
        if self.grow_to_layers is not None and self.use_peft:
            raise ValueError("`grow_to_layers` trains the new layers in full: it does not go with `use_peft`")
        if self.continue_training and not self.head_init:
            raise ValueError("`continue_training` needs `head_init`: the head folder whose training to continue")
        if self.restart_schedule and not (self.continue_training and self.more_steps):
            raise ValueError("`restart_schedule` restarts the rate over a continued run's own steps: give it with "
                             "`continue_training` and `more_steps`")
        if self.more_steps is not None and (self.more_steps < 1 or not self.continue_training):
            raise ValueError("`more_steps` must be >= 1 and goes with `continue_training`")
        if self.layer_family not in ("qwen3", "target"):
            raise ValueError(f"`layer_family` must be 'qwen3' or 'target', got {self.layer_family!r}")
        if self.loss_vocabulary not in ("full", "batch"):
            raise ValueError(f"`loss_vocabulary` must be 'full' or 'batch', got {self.loss_vocabulary!r}")
        if self.generation_temperature < 0:
            raise ValueError(f"`generation_temperature` must be >= 0, got {self.generation_temperature}")
        for name in ("target_dtype", "generation_dtype"):
            value = getattr(self, name)
            if value is not None and not isinstance(getattr(torch, value, None), torch.dtype):
                raise ValueError(f"`{name}` must name a torch dtype (e.g. 'bfloat16'), got {value!r}")
        if self.attn_implementation not in ("sdpa", "eager"):
            raise ValueError(f"`attn_implementation` must be 'sdpa' or 'eager' (tree masks), got {self.attn_implementation!r}")
        if self.tau_eval_tree_budget < 1:
            raise ValueError(f"`tau_eval_tree_budget` must be >= 1, got {self.tau_eval_tree_budget}")
        if self.draft_vocab_size is not None and self.draft_vocab_size < 1:
            raise ValueError(f"`draft_vocab_size` must be >= 1 or unset, got {self.draft_vocab_size}")
        if self.max_train_minutes is not None and self.max_train_minutes <= 0:
            raise ValueError(f"`max_train_minutes` must be > 0 or unset, got {self.max_train_minutes}")
        if self.depth_decay is not None and not 0 < self.depth_decay <= 1:
            raise ValueError(f"`depth_decay` must be in (0, 1], got {self.depth_decay}")
        super().__post_init__()
