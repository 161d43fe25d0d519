"""`tree_budget="auto"`: per round, the tree size that maximises expected tokens per second on this hardware.

Two measured ingredients:

- the verify cost `t_verify(n)` of one target forward over an `n`-node tree, timed once per (model, device, dtype,
  attention backend) on the machine itself ([`measure_verify_cost`]);
- the head's acceptance profile: a best-first tree lists its nodes by path probability, so the tree of size `n` is
  the first `n` nodes, and node `i` is accepted with probability about `c * exp(score_i)`, where `c` calibrates the
  head's confidence against what the target actually accepted in earlier rounds of the same `generate()` call.

Each round then drafts the largest useful tree and keeps the prefix `n` maximising

    (1 + c * sum_{i=1}^{n-1} exp(score_i)) / (t_fixed + t_verify(n))

where `t_fixed` (draft, accept, cache, bookkeeping) is a running mean of the measured rounds.

Drafting itself costs time (the head's forward). When even the best tree does not beat a round without a draft,
`1 / (t_fixed - t_draft + t_verify(1))` (a plain decoding step), for `patience` drafted rounds in a row, the loop stops
drafting for a while and decodes plain steps, then probes again, backing off exponentially while probes keep losing.
So a weak head costs a few probe rounds, not a slowdown of every round.
"""

from __future__ import annotations

import bisect
import math
import statistics
import time
import weakref
from dataclasses import dataclass
from typing import Callable

import torch

from .tree import DraftTree

# Tree sizes timed by the calibration (root included); sizes in between are interpolated.
CPU_SIZES = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64)
CUDA_SIZES = (1, 8, 16, 32, 64, 96, 128, 192, 256)

_MEASURED: "weakref.WeakKeyDictionary[torch.nn.Module, dict[tuple, VerifyCost]]" = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class VerifyCost:
    """Seconds of one verify forward vs tree size, measured on this machine, linearly interpolated in between.

    Args:
        sizes (`tuple[int, ...]`): tree sizes timed (increasing).
        seconds (`tuple[float, ...]`): median seconds of a verify forward of each size.
    """

    sizes: tuple[int, ...]
    seconds: tuple[float, ...]

    def __call__(self, num_nodes: int) -> float:
        if num_nodes <= self.sizes[0]:
            return self.seconds[0]
        if num_nodes >= self.sizes[-1]:  # extrapolate with the last slope
            slope = (self.seconds[-1] - self.seconds[-2]) / max(self.sizes[-1] - self.sizes[-2], 1) if len(self.sizes) > 1 else 0.0
            return self.seconds[-1] + slope * (num_nodes - self.sizes[-1])
        right = bisect.bisect_left(self.sizes, num_nodes)
        left = right - 1
        weight = (num_nodes - self.sizes[left]) / (self.sizes[right] - self.sizes[left])
        return self.seconds[left] + weight * (self.seconds[right] - self.seconds[left])

    @property
    def max_size(self) -> int:
        return self.sizes[-1]


def default_sizes(device: torch.device) -> tuple[int, ...]:
    return CUDA_SIZES if device.type == "cuda" else CPU_SIZES


def measure_verify_cost(
    model: torch.nn.Module,
    verify: Callable[[DraftTree, int, object], None],
    sizes: tuple[int, ...] | None = None,
    context_length: int = 256,
    repeats: int = 3,
) -> VerifyCost:
    """Times `verify(tree, past_length, cache)` for chain trees of each size over a `context_length`-token cache.

    The result is cached per model object (and device, dtype, attention backend, sizes), so a process measures once.

    Args:
        model: the target (its decoder runs the forwards).
        verify (`Callable`): runs one verify forward of `tree` after `past_length` cached tokens into `cache` (the
            same call the decode loop makes); the tree's rows are dropped from the cache afterwards.
        sizes (`tuple[int, ...]`, *optional*): tree sizes to time (default: [`default_sizes`] of the device).
        context_length (`int`): tokens already in the cache.
        repeats (`int`): timings per size (the median is kept).
    """
    from transformers import DynamicCache

    from .tree import tree_from_parents

    device = model.device
    sizes = tuple(sorted(set(sizes or default_sizes(device))))
    key = (str(device), str(model.dtype), model.config._attn_implementation, sizes, context_length)
    cached = _MEASURED.setdefault(model, {})
    if key in cached:
        return cached[key]

    vocab = model.config.get_text_config().vocab_size
    generator = torch.Generator().manual_seed(0)
    prefix = torch.randint(vocab, (1, context_length), generator=generator).to(device)
    cache = DynamicCache(config=model.config)
    decoder = getattr(model, model.base_model_prefix)
    with torch.no_grad():
        decoder(input_ids=prefix, past_key_values=cache, use_cache=True)
        seconds = []
        for size in sizes:
            tokens = torch.randint(vocab, (size,), generator=generator).tolist()
            tree = tree_from_parents(tokens, [-1] + list(range(size - 1)), device=device)
            timings = []
            for _ in range(repeats + 1):  # the first run warms up this shape
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                start = time.perf_counter()
                verify(tree, context_length, cache)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                timings.append(time.perf_counter() - start)
                cache.crop(-size)
            seconds.append(statistics.median(timings[1:]))
    cost = VerifyCost(sizes=sizes, seconds=tuple(monotone(seconds)))
    cached[key] = cost
    return cost


def monotone(values: list[float]) -> list[float]:
    """Running maximum: a bigger tree never costs less (timing noise aside)."""
    out, top = [], 0.0
    for value in values:
        top = max(top, value)
        out.append(top)
    return out


class AutoBudget:
    """Chooses each round's tree size from the head's node scores, a measured [`VerifyCost`] and this call's history.

    Args:
        verify_cost ([`VerifyCost`]): measured verify seconds vs tree size.
        max_budget (`int`, *optional*): largest tree considered (default: the largest measured size).
        prior_weight (`float`): pseudo-count of the initial calibration `c = 1` (in expected accepted tokens).
    """

    def __init__(self, verify_cost: VerifyCost, max_budget: int | None = None, prior_weight: float = 2.0,
                 patience: int = 2, initial_backoff: int = 4, max_backoff: int = 64):
        self.verify_cost = verify_cost
        self.max_budget = max_budget or verify_cost.max_size
        self.predicted = prior_weight
        self.accepted = prior_weight
        self.fixed_seconds: float | None = None
        self.draft_seconds: float | None = None
        self.sizes: list[int] = []
        self.drafting_pays = True
        self.patience, self.initial_backoff, self.max_backoff = patience, initial_backoff, max_backoff
        self._losing_rounds = 0
        self._backoff = initial_backoff
        self._skip = 0
        self.skipped_rounds = 0

    def should_draft(self) -> bool:
        """Whether this round drafts (`False`: a plain step, while drafting is backed off after losing rounds)."""
        if self._skip > 0:
            self._skip -= 1
            self.skipped_rounds += 1
            return False
        return True

    def _update_backoff(self) -> None:
        if self.drafting_pays:
            self._losing_rounds, self._backoff = 0, self.initial_backoff
            return
        self._losing_rounds += 1
        if self._losing_rounds >= self.patience:
            self._skip, self._losing_rounds = self._backoff, 0
            self._backoff = min(2 * self._backoff, self.max_backoff)

    @property
    def calibration(self) -> float:
        """`c`: tokens accepted per token the head expected, so far."""
        return self.accepted / self.predicted

    def choose(self, scores: list[float]) -> int:
        """Tree size (root included) maximising expected tokens per second, given a best-first tree's `scores`."""
        scale = self.calibration
        fixed = self.fixed_seconds if self.fixed_seconds is not None else 0.5 * self.verify_cost(1)
        best, best_rate, expected = 1, 1.0 / (fixed + self.verify_cost(1)), 1.0
        for size in range(2, min(len(scores), self.max_budget) + 1):
            expected += min(1.0, scale * math.exp(scores[size - 1]))
            rate = expected / (fixed + self.verify_cost(size))
            if rate > best_rate:
                best, best_rate = size, rate
        if self.draft_seconds is not None:  # known once a round was measured
            without_draft = max(fixed - self.draft_seconds, 0.0) + self.verify_cost(1)
            self.drafting_pays = best > 1 and best_rate > 1.0 / without_draft
            self._update_backoff()
        self.sizes.append(best)
        return best

    def observe(self, tree: DraftTree, accepted: int, round_seconds: float, verify_seconds: float,
                draft_seconds: float | None = None) -> None:
        """Updates the calibration and the running costs after a drafted round that verified `tree` and accepted
        `accepted` drafted tokens (`draft_seconds`: the head's share of the round)."""
        if tree.scores is not None and tree.num_nodes > 1:
            self.predicted += sum(math.exp(score) for score in tree.scores[1:])
            self.accepted += accepted
        fixed = max(round_seconds - verify_seconds, 0.0)
        self.fixed_seconds = fixed if self.fixed_seconds is None else 0.8 * self.fixed_seconds + 0.2 * fixed
        if draft_seconds is not None:
            self.draft_seconds = (draft_seconds if self.draft_seconds is None
                                  else 0.8 * self.draft_seconds + 0.2 * draft_seconds)
