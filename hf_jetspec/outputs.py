"""Step 5 of a round, emit: each row's tokens, its stopping criteria, streaming, and what the call returns.

Output equals plain `generate()` on the same batch, row by row: rows finished by an EOS-type criterion are padded with
`pad_token_id` as Transformers does; without one, a row that met its stopping criteria keeps the target's own tokens
until the last row finishes, again as Transformers does. A streamer gets each step's column (one token per row, as
plain decoding puts them) once every row has that step's token.
"""

from __future__ import annotations

import torch

from transformers.generation.utils import GenerateDecoderOnlyOutput

from . import accept
from .compat import OUTPUT_CACHE_FIELD
from .accept import row_logits_processors


class RowOutputs:
    """The rows' sequences as they grow: prompt (with its left padding) + the target's tokens.

    Args:
        input_ids (`torch.LongTensor` of shape `(batch, prompt_length)`): the prompts.
        logits_processor (`LogitsProcessorList`): generate()'s processors (a per-row copy where they index the batch).
        stopping_criteria (`StoppingCriteriaList`): generate()'s criteria, checked after every token of every row.
        generation_config (`GenerationConfig`): sampling, padding, the scores and logits to return.
        streamer (*optional*): gets each output column once every row has its token.
    """

    def __init__(self, input_ids, logits_processor, stopping_criteria, generation_config, streamer=None):
        self.batch, self.prompt_length = input_ids.shape
        self.device = input_ids.device
        self.stopping_criteria = stopping_criteria
        self.streamer = streamer
        self.do_sample = bool(generation_config.do_sample)
        pad = generation_config._pad_token_tensor
        self.pad_token_id = int(pad) if pad is not None else 0
        self.eos_padding = any(hasattr(criteria, "eos_token_id") for criteria in stopping_criteria)
        self.max_length = stopping_criteria.max_length or generation_config.max_length
        self.sequences = torch.full((self.batch, self.max_length), self.pad_token_id, dtype=torch.long,
                                    device=self.device)
        self.sequences[:, : self.prompt_length] = input_ids
        self.lengths = [self.prompt_length] * self.batch
        self.finished_at: list[int | None] = [None] * self.batch  # the step each row met its criteria
        self.processors = row_logits_processors(logits_processor, self.batch)
        return_dict = generation_config.return_dict_in_generate
        self.scores = [[] for _ in range(self.batch)] if return_dict and generation_config.output_scores else None
        self.logits = [[] for _ in range(self.batch)] if return_dict and generation_config.output_logits else None
        self.streamed = 0  # output columns already given to the streamer

    @property
    def needs_whole_rows(self) -> bool:
        """Whether each token needs its node's whole logits row (sampling, processors, returned scores or logits);
        else the argmax alone will do."""
        return self.do_sample or any(len(p) for p in self.processors) or self.scores is not None or self.logits is not None

    def last_token(self, row: int) -> int:
        return int(self.sequences[row, self.lengths[row] - 1])

    def emit(self, row: int, logits: torch.Tensor | int, draft_tokens: list[int]) -> tuple[int, bool]:
        """Appends the target's token for `row` from its logits at the current node (or the token itself, from
        [`ExactArgmax`]); returns (token, whether the row's walk stops here)."""
        length = self.lengths[row]
        if isinstance(logits, int):
            token = logits
        else:
            scores = logits.to(dtype=torch.float32, device=self.device, copy=True)[None]
            if self.logits is not None:
                self.logits[row].append(scores[0].clone())
            if len(self.processors[row]):
                scores = self.processors[row](self.sequences[row : row + 1, :length], scores)
            if self.scores is not None:
                self.scores[row].append(scores[0])
            token = int(accept.choose_token(scores, self.do_sample, draft_tokens))
        self.sequences[row, length] = token
        self.lengths[row] = length + 1
        if self.finished_at[row] is None and bool(
            self.stopping_criteria(self.sequences[row : row + 1, : length + 1], None).any()
        ):
            self.finished_at[row] = length + 1 - self.prompt_length
        return token, not self.still_running(row)

    def emit_first(self, logits: torch.Tensor) -> None:
        """Each row's first token, from the prefill's last logits `(batch, vocab)`; streamed at once."""
        for row in range(self.batch):
            self.emit(row, logits[row], [])
        self.stream_ready()

    def still_running(self, row: int) -> bool:
        if self.lengths[row] >= self.max_length:
            return False
        if self.finished_at[row] is None:
            return True
        if self.eos_padding:
            return False
        # A finished row keeps the target's own tokens until the last row finishes (Transformers pads only for EOS).
        finished = [step for step in self.finished_at if step is not None]
        return len(finished) < self.batch or self.lengths[row] - self.prompt_length < max(finished)

    def stream_ready(self) -> None:
        """Puts each output column whose every row is final: a token the row emitted, or padding after its EOS-type
        stop; and only while some row is still running past it (else the column lies beyond the output)."""
        if self.streamer is None:
            return
        rows, start, finished_at = range(self.batch), self.prompt_length, self.finished_at
        while True:
            step = self.streamed
            if not all(self.lengths[row] - start > step
                       or (self.eos_padding and finished_at[row] is not None and finished_at[row] <= step) for row in rows):
                return
            if not any(finished_at[row] is None or finished_at[row] > step for row in rows):
                return
            column = self.sequences[:, start + step].clone()
            if self.eos_padding:
                for row in rows:
                    if finished_at[row] is not None and finished_at[row] <= step:
                        column[row] = self.pad_token_id
            self.streamer.put(column.cpu())
            self.streamed += 1

    def output(self) -> tuple[torch.LongTensor, int]:
        """The sequences plain generate() returns (each row's tokens up to the step it finished, then
        `pad_token_id` for EOS-type criteria or its own tokens for others, up to the step the last row finished), and
        how many new tokens they hold. Ends the streamer."""
        start = self.prompt_length
        for row in range(self.batch):  # a row stopped at max_length by a criteria list without MaxLengthCriteria
            if self.finished_at[row] is None:
                self.finished_at[row] = self.lengths[row] - start
        steps = max(self.finished_at)
        output = torch.full((self.batch, start + steps), self.pad_token_id, dtype=torch.long, device=self.device)
        output[:, :start] = self.sequences[:, :start]
        new_tokens = 0
        for row in range(self.batch):
            count = min(self.finished_at[row], steps) if self.eos_padding else steps
            output[row, start : start + count] = self.sequences[row, start : start + count]
            new_tokens += count
        if self.streamer is not None:  # the columns no round could stream yet (rows stopped at max_length, last rounds)
            for step in range(self.streamed, steps):
                self.streamer.put(output[:, start + step].cpu())
            self.streamer.end()
        return output, new_tokens

    def call_output(self, output: torch.LongTensor, cache) -> GenerateDecoderOnlyOutput:
        """What `return_dict_in_generate=True` returns: `output` (from [`RowOutputs.output`]), the per-step scores and
        logits where asked, and the target cache."""
        return GenerateDecoderOnlyOutput(
            sequences=output, scores=step_tensors(self.scores, output, self.prompt_length),
            logits=step_tensors(self.logits, output, self.prompt_length), **{OUTPUT_CACHE_FIELD: cache},
        )


def step_tensors(per_row: list[list[torch.Tensor]] | None, output: torch.LongTensor,
                 prompt_length: int) -> tuple[torch.Tensor, ...] | None:
    """Per-row, per-emitted-token score (or logit) rows as plain generate() returns them: one `(batch, vocab)` tensor
    per step. A row that stopped at an EOS-type criterion before the last step is padding there; its row at those
    steps puts all the mass on the padding token it holds (0 there, `-inf` elsewhere), where plain decoding would have
    scored the padding token's own continuation."""
    if per_row is None:
        return None
    steps = output.shape[1] - prompt_length
    reference = next(rows[0] for rows in per_row if rows)
    tensors = []
    for step in range(steps):
        columns = []
        for row, rows in enumerate(per_row):
            if step < len(rows):
                columns.append(rows[step])
            else:
                filler = torch.full_like(reference, float("-inf"))
                filler[output[row, prompt_length + step]] = 0.0
                columns.append(filler)
        tensors.append(torch.stack(columns))
    return tuple(tensors)
