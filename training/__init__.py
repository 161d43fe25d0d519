"""hf_jetspec_training: train JetSpec heads with TRL (on-policy distillation from a frozen target)."""

from hf_jetspec.extras import require

require("train", "Training JetSpec heads (hf_jetspec_training, jetspec-train, jetspec-corpus)")

from .collator import AnchorCollator
from .config import JetSpecTrainingConfig
from .data import generate_responses, load_prompts
from .features import TeacherFeatureDataset, compute_teacher_features
from .objective import (
    candidate_distillation_loss,
    candidate_vocabulary,
    depth_weights,
    distillation_loss,
    sample_anchors,
    teacher_rows,
)
from .trainer import JetSpecTrainer, TauCallback, measure_tau, unwrap_head

__all__ = [
    "AnchorCollator",
    "JetSpecTrainer",
    "JetSpecTrainingConfig",
    "TauCallback",
    "TeacherFeatureDataset",
    "compute_teacher_features",
    "depth_weights",
    "candidate_distillation_loss",
    "candidate_vocabulary",
    "distillation_loss",
    "generate_responses",
    "load_prompts",
    "measure_tau",
    "sample_anchors",
    "teacher_rows",
    "unwrap_head",
]
