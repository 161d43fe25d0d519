"""Batches of sequences -> padded head inputs with random anchors and their top-k labels."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .objective import sample_anchors, teacher_rows


@dataclass
class AnchorCollator:
    """Pads a list of teacher-feature rows and samples up to `max_anchors` anchors per sequence.

    Returns a dict with `context_features` `(b, T, K*H)` (float32), `anchor_ids`/`anchor_position_ids` `(b, A)`,
    `teacher_ids`/`teacher_probs` `(b, A, block_size - 1, k)` and `valid` `(b, A, block_size - 1)`. Padded anchors
    have no valid depth; padded context rows sit at positions no anchor can see.
    """

    block_size: int
    max_anchors: int = 512
    generator: torch.Generator | None = None

    def __call__(self, rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        anchors = [
            sample_anchors(int(row["prompt_length"][0]), row["input_ids"].numel(), self.max_anchors, self.generator)
            for row in rows
        ]
        batch, width = len(rows), max(row["input_ids"].numel() for row in rows)
        num_anchors = max(1, max(a.numel() for a in anchors))
        depth, topk = self.block_size - 1, rows[0]["teacher_ids"].shape[-1]
        features = torch.zeros(batch, width, rows[0]["taps"].shape[-1])
        anchor_ids = torch.zeros(batch, num_anchors, dtype=torch.long)
        anchor_positions = torch.zeros(batch, num_anchors, dtype=torch.long)
        teacher_ids = torch.zeros(batch, num_anchors, depth, topk, dtype=torch.long)
        teacher_probs = torch.zeros(batch, num_anchors, depth, topk)
        valid = torch.zeros(batch, num_anchors, depth, dtype=torch.bool)
        for index, (row, positions) in enumerate(zip(rows, anchors)):
            length, count = row["input_ids"].numel(), positions.numel()
            features[index, :length] = row["taps"].float()
            if count == 0:
                continue
            anchor_ids[index, :count] = row["input_ids"][positions]
            anchor_positions[index, :count] = positions
            label_rows, label_valid = teacher_rows(positions[None], self.block_size, length)
            teacher_ids[index, :count] = row["teacher_ids"][label_rows[0]].long()
            teacher_probs[index, :count] = row["teacher_probs"][label_rows[0]].float()
            valid[index, :count] = label_valid[0]
        return {
            "context_features": features,
            "anchor_ids": anchor_ids,
            "anchor_position_ids": anchor_positions,
            "teacher_ids": teacher_ids,
            "teacher_probs": teacher_probs,
            "valid": valid,
        }
