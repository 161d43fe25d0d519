"""What generate() learns about one head drafting for one target, kept across calls: one store per (target, head).

[`PairState`] holds the node calibration and round costs ([`AcceptanceProfile`], with the prompt-lookup profile),
the tokens per row-round each tree size gave ([`AcceptanceHistory`]), and the measured round costs per batch size
(`planning.BatchCost`). Two targets sharing a head keep
separate states; an entry goes with its target or its head (weak keys)."""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field

import torch

from .lookup import LookupProfile


class AcceptanceProfile:
    """How often each node of a head's best-first trees was accepted against how likely the head found it: one per
    (target, head), kept across `generate()` calls (see [`pair_state`]).

    Node `i` (in best-first order) of a round's tree is accepted with probability about `c_i * exp(score_i)`, where
    `c_i` is the ratio, decayed over the rounds that verified a node `i`, of node `i`'s acceptances to its predicted
    probabilities. One `c` for every node would over-credit the many unlikely siblings of a big tree (a head is
    over-confident far more at deep or low-ranked nodes than at its first guess) and pick trees that are too big.
    Indices never verified share the calibration of all nodes so far.

    Args:
        max_nodes (`int`): largest node index tracked.
        decay (`float`): weight kept by the old sums per observation of a node.
        prior_weight (`float`): pseudo-count (in predicted tokens) pulling each `c_i` toward the overall calibration,
            and the overall calibration toward 1.
    """

    def __init__(self, max_nodes: int = 256, decay: float = 0.995, prior_weight: float = 2.0):
        self.max_nodes, self.decay, self.prior_weight = max_nodes, decay, prior_weight
        self.predicted = [0.0] * max_nodes  # index i: decayed sum of exp(score_i) over rounds that verified node i
        self.accepted = [0.0] * max_nodes  # index i: decayed count of rounds that accepted node i
        self.total_predicted = prior_weight
        self.total_accepted = prior_weight
        self.lookup = LookupProfile()  # how far prompt-lookup proposals matched this target (see `lookup.py`)
        self.round_costs: dict[int, tuple[float, float]] = {}  # batch size -> measured (rest, draft) seconds per round

    @property
    def calibration(self) -> float:
        """Overall `c`: tokens accepted per token the head expected, over the verified nodes (decayed)."""
        return self.total_accepted / self.total_predicted

    def scales(self, num_nodes: int) -> list[float]:
        """`c_i` for node indices `0 .. num_nodes - 1` (index 0, the root, is always accepted)."""
        overall, weight = self.calibration, self.prior_weight
        limit = min(num_nodes, self.max_nodes)
        scales = [1.0] + [(self.accepted[i] + weight * overall) / (self.predicted[i] + weight) for i in range(1, limit)]
        return scales + [overall] * (num_nodes - limit)

    def observe_tree(self, scores: list[float], accepted_nodes: list[int]) -> None:
        """Adds one verified best-first tree (`scores` of its nodes) whose accepted path is `accepted_nodes`."""
        accepted = set(accepted_nodes)
        probabilities = [math.exp(score) for score in scores[1:]]  # node index i at position i - 1
        for index, probability in enumerate(probabilities[: self.max_nodes - 1], start=1):
            self.predicted[index] = self.decay * self.predicted[index] + probability
            self.accepted[index] = self.decay * self.accepted[index] + (index in accepted)
        self.total_predicted = self.decay * self.total_predicted + sum(probabilities)
        self.total_accepted = self.decay * self.total_accepted + len(accepted_nodes)


class AcceptanceHistory:
    """What trees of each size actually gave a head, kept across `generate()` calls (one per target and head, see [`pair_state`]).

    After a round that verified a best-first tree of `n` nodes and accepted the path `p_1 < p_2 < ...` (node indices),
    the tree's prefix of `m <= n` nodes would have accepted exactly the path nodes with index `< m`: one round
    measures every size up to `n`.

    Args:
        max_nodes (`int`): largest tree size tracked.
        decay (`float`): weight kept by the old mean per observed row-round (an exponential moving average that
            follows a change of prompts or head).
    """

    def __init__(self, max_nodes: int = 256, decay: float = 0.995):
        self.max_nodes = max_nodes
        self.decay = decay
        self.tokens = [0.0] * (max_nodes + 1)  # index n: decayed sum of tokens per row-round with n nodes
        self.weight = [0.0] * (max_nodes + 1)
        self.host_seconds_per_row: float | None = None
        self.plain_step_seconds: dict[int, float] = {}  # batch size -> measured step of Transformers' own decoding
        self.spec_token_seconds: dict[int, float] = {}  # batch size -> measured seconds per token of speculative calls
        self.plain_calls: dict[int, int] = {}  # batch size -> plain calls since the last speculative one

    @property
    def observed(self) -> bool:
        return self.weight[2] > 0

    def observe(self, num_nodes: int, accepted_nodes: list[int]) -> None:
        """Adds one row-round: a tree of `num_nodes` nodes whose accepted path is `accepted_nodes` (node indices)."""
        num_nodes = min(num_nodes, self.max_nodes)
        for size in range(1, num_nodes + 1):
            tokens = 1 + sum(1 for node in accepted_nodes if node < size)
            self.tokens[size] = self.decay * self.tokens[size] + tokens
            self.weight[size] = self.decay * self.weight[size] + 1.0

    def observe_host(self, seconds_per_row: float) -> None:
        previous = self.host_seconds_per_row
        self.host_seconds_per_row = seconds_per_row if previous is None else 0.9 * previous + 0.1 * seconds_per_row

    def observe_plain_step(self, batch_size: int, seconds: float) -> None:
        """A measured step of plain decoding at `batch_size` (host work included; see `PlainStepTimer`)."""
        previous = self.plain_step_seconds.get(batch_size)
        self.plain_step_seconds[batch_size] = seconds if previous is None else 0.5 * previous + 0.5 * seconds
        self.plain_calls[batch_size] = self.plain_calls.get(batch_size, 0) + 1

    def observe_spec_call(self, batch_size: int, seconds_per_token: float) -> None:
        """A speculative call at `batch_size` that took `seconds_per_token` per generated token (its prefill and
        first token left out, like the plain step)."""
        previous = self.spec_token_seconds.get(batch_size)
        self.spec_token_seconds[batch_size] = (  # a slow average: one prompt the head cannot draft is not the rule
            seconds_per_token if previous is None else 0.75 * previous + 0.25 * seconds_per_token
        )
        self.plain_calls[batch_size] = 0

    def measured_speedup(self, batch_size: int) -> float | None:
        """Speculative over plain tokens per second at `batch_size`, from the calls measured (`None` until both
        were); plain's step makes `batch_size` tokens, rows that finished early included (a bias towards plain)."""
        spec, plain = self.spec_token_seconds.get(batch_size), self.plain_step_seconds.get(batch_size)
        if spec is None or plain is None:
            return None
        return plain / (batch_size * spec)

    def expected_tokens(self, num_nodes: int) -> float:
        """Mean tokens per row-round with `num_nodes` nodes; beyond the largest size seen, that size's mean (a tree
        never gives less than its prefix, and an untried size is not assumed to give more)."""
        size = min(num_nodes, self.max_nodes)
        while size > 1 and self.weight[size] == 0:
            size -= 1
        return self.tokens[size] / self.weight[size] if self.weight[size] else 1.0


@dataclass
class PairState:
    """What generate() keeps for one head drafting for one target (see the module docstring)."""

    profile: AcceptanceProfile = field(default_factory=AcceptanceProfile)
    history: AcceptanceHistory = field(default_factory=AcceptanceHistory)
    batch_costs: dict = field(default_factory=dict)  # the measured `planning.BatchCost` per batch size and setting


_STATES: "weakref.WeakKeyDictionary[torch.nn.Module, weakref.WeakKeyDictionary[torch.nn.Module, PairState]]" = (
    weakref.WeakKeyDictionary()
)


def pair_state(model: torch.nn.Module, head: torch.nn.Module) -> PairState:
    """The [`PairState`] of `head` drafting for `model` (created empty on first use; dropped with either)."""
    states = _STATES.setdefault(model, weakref.WeakKeyDictionary())
    if head not in states:
        states[head] = PairState()
    return states[head]


def acceptance_profile(model: torch.nn.Module, head: torch.nn.Module) -> AcceptanceProfile:
    """The [`AcceptanceProfile`] of `head` drafting for `model` (one-prompt calls and batch row choices)."""
    return pair_state(model, head).profile


def acceptance_history(model: torch.nn.Module, head: torch.nn.Module) -> AcceptanceHistory:
    """The [`AcceptanceHistory`] of `head` drafting for `model` (batch plans)."""
    return pair_state(model, head).history
