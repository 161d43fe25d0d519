"""`JetSpecTrainer`: distils a frozen target into a JetSpec head from cached teacher features (TRL trainer base)."""

from __future__ import annotations

import logging
import time
from collections import defaultdict

import torch
from transformers import TrainerCallback
from trl.trainer.base_trainer import _BaseTrainer

from hf_jetspec import JetSpecHead, draft_attention_mask

from .collator import AnchorCollator
from .objective import candidate_distillation_loss, candidate_vocabulary, depth_weights, distillation_loss

logger = logging.getLogger(__name__)


def unwrap_head(model) -> JetSpecHead:
    """The `JetSpecHead` inside a PEFT / DDP wrapper."""
    while not isinstance(model, JetSpecHead):
        if hasattr(model, "get_base_model"):
            model = model.get_base_model()
        elif hasattr(model, "module"):
            model = model.module
        else:
            raise TypeError(f"expected a JetSpecHead (optionally PEFT/DDP-wrapped), got {type(model).__name__}")
    return model


class JetSpecTrainer(_BaseTrainer):
    """Trains a [`JetSpecHead`] with the JetSpec objective: random anchors per sequence, all anchor blocks in one
    forward under a block-sparse causal mask, KL(target || head) per depth (target frozen, head trainable).

    Args:
        model ([`JetSpecHead`] or a `PeftModel` around one): bound to the target (shared embeddings and lm_head).
        args ([`JetSpecTrainingConfig`]).
        train_dataset, eval_dataset ([`TeacherFeatureDataset`]).
        callbacks, optimizers: as in `transformers.Trainer`.
    """

    _tag_names = ["trl", "jetspec", "speculative-decoding"]
    _name = "JetSpec"

    def __init__(self, model, args, train_dataset, eval_dataset=None, callbacks=None, optimizers=(None, None)):
        head = unwrap_head(model)
        self.block_size = head.config.block_size
        self.depth_weights = depth_weights(self.block_size, args.depth_decay)
        self._depth_metrics = defaultdict(list)
        self._clock: tuple[float, float] | None = None  # (monotonic start of this process's run, minutes before it)
        self.run_start_minutes = 0.0  # a continued head's recorded minutes: where this run's budget starts
        # a continued run with `restart_schedule`: the head's step count, where this run's own warmup and decay start
        self.schedule_start: int | None = None
        super().__init__(
            model=model,
            args=args,
            data_collator=AnchorCollator(self.block_size, args.max_anchors),
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            callbacks=callbacks,
            optimizers=optimizers,
        )
        self.add_callback(_TrainClock(self))
        self.add_callback(_ThisRunsIntervals())

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        features = inputs["context_features"]
        batch, length = features.shape[:2]
        context_positions = torch.arange(length, device=features.device).expand(batch, -1)
        mask = draft_attention_mask(context_positions, inputs["anchor_position_ids"], self.block_size, features.dtype,
                                    causal=unwrap_head(model).config.causal_block)
        full = self.args.loss_vocabulary == "full"
        outputs = model(
            anchor_ids=inputs["anchor_ids"],
            anchor_position_ids=inputs["anchor_position_ids"],
            context_features=features,
            context_position_ids=context_positions,
            attention_mask=mask,
            logits_to_keep=full,
        )
        teacher_ids, valid, probs = inputs["teacher_ids"], inputs["valid"], inputs["teacher_probs"]
        head = unwrap_head(model)
        if full:
            loss, metrics = distillation_loss(outputs.logits, teacher_ids, probs, valid, self.depth_weights)
        else:  # softmax over the batch's candidate tokens only: the lm_head rows of the rest are never multiplied
            lm_head = head._bound()[1]
            vocabulary, teacher_ids = candidate_vocabulary(
                teacher_ids, valid, lm_head.weight.shape[0], self.args.num_negative_tokens
            )
            drafted = outputs.last_hidden_state.view(*inputs["anchor_ids"].shape, self.block_size, -1)[:, :, 1:]
            if head.config.final_logit_softcapping is None:  # in chunks: the logits are never held whole
                loss, metrics = candidate_distillation_loss(
                    drafted, lm_head.weight[vocabulary], teacher_ids, probs, valid, self.depth_weights)
            else:
                logits = head.softcap(drafted @ lm_head.weight[vocabulary].to(drafted.dtype).T)
                loss, metrics = distillation_loss(logits, teacher_ids, probs, valid, self.depth_weights)
        mode = "train" if model.training else "eval"
        self._depth_metrics[f"{mode}_accuracy"].append(metrics["accuracy"].detach().cpu())
        return (loss, outputs) if return_outputs else loss

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        """`Trainer`'s scheduler; with `schedule_start` (a warm restart) it runs over this run's own steps only, from
        `learning_rate`: the step count (and the optimizer's moments) carry on, the rate starts a new warmup and
        decay."""
        if self.lr_scheduler is not None or self.schedule_start is None:
            return super().create_scheduler(num_training_steps, optimizer)
        start = self.schedule_start
        scheduler = super().create_scheduler(num_training_steps - start, optimizer)
        scheduler.lr_lambdas = [lambda step, rate=rate: rate(max(step - start, 0)) for rate in scheduler.lr_lambdas]
        return scheduler

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Evaluation (the corpus' validation split): the distillation loss and per-depth agreement, as in training;
        the batch has no `labels`, so `Trainer`'s default would call the head on the teacher's fields."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "eval" if any(key.startswith("eval_") for key in logs) else "train"
        values = self._depth_metrics.pop(f"{mode}_accuracy", [])
        if values:
            accuracy = torch.stack(values).mean(0)
            prefix = "eval_" if mode == "eval" else ""
            logs[f"{prefix}top1_depth1"] = round(float(accuracy[0]), 4)
            # expected chain acceptance if depths were independent: sum over d of prod_{i<=d} acc_i, plus the bonus
            logs[f"{prefix}expected_chain_tau"] = round(float(1 + accuracy.cumprod(0).sum()), 3)
        if self._clock is not None:  # wall-clock minutes of training, continued across resumes (training curves)
            started, before = self._clock
            logs["train_minutes"] = round(before + (time.monotonic() - started) / 60, 3)
        super().log(logs, start_time)


class _TrainClock(TrainerCallback):
    """Starts the trainer's wall clock when training (re)starts, continuing the minutes of a resumed checkpoint, and
    stops training once `max_train_minutes` of this run have passed (every process stops at the same step). A run that
    continues a saved head (`continue_training`) counts from the head's recorded minutes (`trainer.run_start_minutes`),
    so its budget is its own, not what the head's earlier runs already spent."""

    def __init__(self, trainer: JetSpecTrainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        before = max((entry["train_minutes"] for entry in state.log_history if "train_minutes" in entry), default=0.0)
        self.trainer._clock = (time.monotonic(), before)

    def on_step_end(self, args, state, control, **kwargs):
        limit = getattr(args, "max_train_minutes", None)
        if not limit:
            return
        started, before = self.trainer._clock
        spent = before + (time.monotonic() - started) / 60 - self.trainer.run_start_minutes
        over = torch.tensor(float(spent >= limit), device=args.device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(over, op=torch.distributed.ReduceOp.MAX)
        if over.item():
            logger.warning("max_train_minutes=%s reached at step %d: stopping", limit, state.global_step)
            control.should_training_stop = True
            control.should_save = True


class _ThisRunsIntervals(TrainerCallback):
    """Logs, evaluates and saves every `logging_steps` / `eval_steps` / `save_steps` of THIS run's arguments.
    Transformers restores the intervals of the checkpoint it resumes from (`trainer_state.json`), so a run continuing
    a saved head with `--eval_steps 100` evaluated only at the earlier run's multiples (every 500 steps)."""

    def on_train_begin(self, args, state, control, **kwargs):
        state.compute_steps(args, state.max_steps)


class ContinuedSchedule(TrainerCallback):
    """On a continued run (`continue_training`), sets the learning rate of the first step from the restored scheduler
    under the new, longer schedule: the optimizer's saved rate is the old schedule's last one (0 at the end of a
    linear or cosine decay), which the scheduler would otherwise only replace after one step."""

    def on_train_begin(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
        lambdas = getattr(lr_scheduler, "lr_lambdas", None)
        if optimizer is None or lambdas is None or not state.global_step:
            return
        rates = [base * fn(lr_scheduler.last_epoch) for base, fn in zip(lr_scheduler.base_lrs, lambdas)]
        for group, rate in zip(optimizer.param_groups, rates):
            group["lr"] = rate
        lr_scheduler._last_lr = rates


class TauCallback(TrainerCallback):
    """Every `steps` optimiser steps, measures tau with the real `generate(assistant_model=head)` path, at a fixed
    tree budget (`tree_budget`): `"auto"` would mix the head's acceptance with this machine's cost decisions."""

    def __init__(self, trainer: JetSpecTrainer, target, prompt_ids: list[torch.Tensor], steps: int, max_new_tokens: int,
                 tree_budget: int = 8):
        self.trainer, self.target, self.prompt_ids = trainer, target, prompt_ids
        self.steps, self.max_new_tokens, self.tree_budget = steps, max_new_tokens, tree_budget

    def on_step_end(self, args, state, control, **kwargs):
        if self.steps and state.global_step % self.steps == 0 and state.is_world_process_zero:
            tau = measure_tau(self.target, self.trainer.model, self.prompt_ids, self.max_new_tokens, self.tree_budget)
            self.trainer.log({"tau": round(tau, 3)})


@torch.no_grad()
def measure_tau(target, model, prompt_ids: list[torch.Tensor], max_new_tokens: int,
                tree_budget: int | str | None = None) -> float:
    """tau (tokens per round, pooled over prompts) of greedy `generate(assistant_model=head)`, at `tree_budget`
    (default: the head's own setting)."""
    head = unwrap_head(model)
    was_training = head.training
    saved_budget = head.generation_config.tree_budget
    if tree_budget is not None:
        head.generation_config.tree_budget = tree_budget
    head.eval()
    accepted = rounds = 0
    try:
        for input_ids in prompt_ids:
            target.generate(input_ids.to(target.device), do_sample=False, max_new_tokens=max_new_tokens,
                            assistant_model=head)
            accepted += head.last_generate_stats.accepted_drafts
            rounds += head.last_generate_stats.rounds
    finally:
        head.generation_config.tree_budget = saved_budget
        head.train(was_training)
    return (accepted + rounds) / max(rounds, 1)
