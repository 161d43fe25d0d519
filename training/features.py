"""Teacher pass: one frozen-target forward per cached response gives the head's inputs and labels.

For each sequence we keep the tapped hidden states (the head's context rows) and the target's top-k next-token
distribution at every position (the labels), as one safetensors file per sequence. Written atomically, skipped when
present, so a killed run resumes. Either all up front ([`compute_teacher_features`], the `prepare_only` pass) or on
demand as training reads each batch ([`OnDemandTeacher`], `teacher_features="on_demand"`).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from hf_jetspec.verify import tap_features


def feature_path(directory: Path, row_id: str) -> Path:
    return directory / f"{hashlib.sha1(row_id.encode()).hexdigest()[:16]}.safetensors"


def teacher_topk(lm_head, hidden: torch.Tensor, prompt_length: int, topk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The target's top-k next-token ids and probabilities `(T, topk)` at the response positions of one sequence.

    Training anchors lie at `prompt_length` or later and read labels from their own position onwards, so rows before
    `prompt_length` are never read: they stay zero (id 0, probability 0) and the output head skips them, about 40%
    of the corpus' positions. Probabilities are normalised over the whole vocabulary (top-k of the logits, then
    `exp(logit - logsumexp)`), without materialising the softmax.
    """
    length = hidden.shape[0]
    start = min(max(int(prompt_length), 0), length)
    top_ids = torch.zeros(length, topk, dtype=torch.long, device=hidden.device)
    top_probs = torch.zeros(length, topk, dtype=torch.float32, device=hidden.device)
    if start < length:
        logits = lm_head(hidden[start:]).float()
        top_logits, top_ids[start:] = logits.topk(topk, dim=-1)
        top_probs[start:] = (top_logits - logits.logsumexp(-1, keepdim=True)).exp()
    return top_ids, top_probs


@torch.no_grad()
def write_teacher_features(
    target,
    rows: list[dict],
    directory: str | Path,
    target_layer_ids: list[int],
    topk: int = 32,
    dtype: torch.dtype = torch.float16,
) -> list[Path]:
    """One right-padded target forward over `rows`; writes each row's feature file (atomically) and returns the paths.

    The files hold `input_ids`, `prompt_length`, `taps` `(T, K*H)`, `teacher_ids`/`teacher_probs` `(T, topk)` (the
    labels at response positions only: [`teacher_topk`]).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    decoder = getattr(target, target.base_model_prefix)
    lm_head = target.get_output_embeddings()
    hidden_state_ids = [i + 1 for i in target_layer_ids]
    width = max(len(row["input_ids"]) for row in rows)
    input_ids = torch.zeros(len(rows), width, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for index, row in enumerate(rows):
        input_ids[index, : len(row["input_ids"])] = torch.tensor(row["input_ids"])
        attention_mask[index, : len(row["input_ids"])] = 1
    out = decoder(
        input_ids=input_ids.to(target.device),
        attention_mask=attention_mask.to(target.device),
        output_hidden_states=hidden_state_ids,
    )
    taps = tap_features(out.hidden_states, target_layer_ids)
    paths = []
    for index, row in enumerate(rows):
        length = len(row["input_ids"])
        top_ids, top_probs = teacher_topk(lm_head, out.last_hidden_state[index, :length], row["prompt_length"], topk)
        tensors = {
            "input_ids": torch.tensor(row["input_ids"], dtype=torch.long),
            "prompt_length": torch.tensor([row["prompt_length"]], dtype=torch.long),
            "taps": taps[index, :length].to(dtype).cpu().contiguous(),
            "teacher_ids": top_ids.to(torch.int32).cpu().contiguous(),
            "teacher_probs": top_probs.to(dtype).cpu().contiguous(),
        }
        path = feature_path(directory, row["id"])
        tmp = path.with_suffix(f".{os.getpid()}.tmp")  # one writer per process: on-demand ranks may race on a row
        save_file(tensors, str(tmp), metadata={"id": row["id"]})
        tmp.replace(path)
        paths.append(path)
    return paths


def compute_teacher_features(
    target,
    rows: list[dict],
    directory: str | Path,
    target_layer_ids: list[int],
    topk: int = 32,
    batch_size: int = 4,
    dtype: torch.dtype = torch.float16,
) -> list[Path]:
    """The whole teacher pass up front: [`write_teacher_features`] for every row without a feature file, shortest
    first in batches of `batch_size` (little padding); returns every row's path.

    Args:
        target: the frozen causal LM.
        rows (`list[dict]`): cached responses (`id`, `input_ids`, `prompt_length`).
        directory (`str | Path`): output folder.
        target_layer_ids (`list[int]`): tapped layers.
        topk (`int`): target probabilities kept per position.
        batch_size (`int`): sequences per forward (right-padded).
        dtype (`torch.dtype`): storage dtype of taps and probabilities.
    """
    directory = Path(directory)
    paths = [feature_path(directory, row["id"]) for row in rows]
    todo = sorted((row for row, path in zip(rows, paths) if not path.is_file()), key=lambda r: len(r["input_ids"]))
    for start in tqdm(range(0, len(todo), batch_size), desc="teacher features", total=-(-len(todo) // batch_size)):
        write_teacher_features(target, todo[start : start + batch_size], directory, target_layer_ids, topk, dtype)
    return paths


@dataclass
class OnDemandTeacher:
    """Writes the feature files of rows the first time a batch asks for them ([`TeacherFeatureDataset`] with
    `teacher=`): training starts at once instead of after the whole teacher pass, and pays the target forward only
    for the rows it reaches; later epochs (and later runs over the same `directory`) read the files.
    """

    target: torch.nn.Module
    rows: list[dict]
    directory: Path
    target_layer_ids: list[int]
    topk: int = 32
    dtype: torch.dtype = torch.float16
    computed: int = 0

    def ensure(self, indices: list[int], paths: list[Path]) -> None:
        missing = [self.rows[i] for i, path in zip(indices, paths) if not path.is_file()]
        if missing:
            # padding costs less than one forward per row for the few rows of a training batch
            write_teacher_features(self.target, missing, self.directory, self.target_layer_ids, self.topk, self.dtype)
            self.computed += len(missing)


class TeacherFeatureDataset(Dataset):
    """Sequences written by [`compute_teacher_features`], loaded lazily; with `teacher` ([`OnDemandTeacher`]), the
    missing ones are written when a batch first reads them (one target forward per batch, `__getitems__`)."""

    def __init__(self, paths: list[str | Path], teacher: OnDemandTeacher | None = None):
        self.paths = [Path(p) for p in paths]
        self.teacher = teacher
        if teacher is not None:
            if len(teacher.rows) != len(self.paths):
                raise ValueError(f"{len(teacher.rows)} teacher rows for {len(self.paths)} feature paths")
            return
        missing = [p for p in self.paths if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"{len(missing)} feature files are missing, e.g. {missing[0]}: rerun the teacher pass")

    def __len__(self) -> int:
        return len(self.paths)

    def __getitems__(self, indices: list[int]) -> list[dict[str, torch.Tensor]]:
        paths = [self.paths[i] for i in indices]
        if self.teacher is not None:
            self.teacher.ensure(list(indices), paths)
        return [load_file(str(path)) for path in paths]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.__getitems__([index])[0]
