"""`tree_budget="auto"`: per round, the tree size that maximises expected tokens per second on this hardware.

Two measured ingredients:

- the verify cost `t_verify(n)` of one target forward over an `n`-node tree, timed once per (model, device, dtype,
  attention backend) on the machine itself ([`measure_verify_cost`]);
- the head's [`AcceptanceProfile`], kept per (target, head) across `generate()` calls: a best-first tree lists its
  nodes by path probability, so the tree of size `n` is its first `n` nodes, and node `i` is accepted with
  probability about `c_i * exp(score_i)`, `c_i` calibrating the head's confidence at that node index against what
  the target actually accepted there.

Each round drafts a tree somewhat bigger than recent choices ([`AutoBudget.draft_budget`]) and keeps the prefix `n`
maximising

    E(n) / (t_fixed + t_verify(n) + t_accept * E(n)),   E(n) = 1 + sum_{i=1}^{n-1} min(1, c_i * exp(score_i))

where `t_fixed` (draft, cache, bookkeeping per round) and `t_accept` (the target's lm_head row and the logits
processors per emitted token) are running means of the measured rounds.

A prompt-lookup proposal (see `lookup.py`) can join the tree as one more branch: [`AutoBudget.choose_tree`] picks the
head's tree size and the proposal's length together, a proposal token adding `p_d` expected tokens (its measured
chance of matching the target, `LookupProfile`) and one verify row where it is not already a node of the head's tree.

Drafting itself costs time (the head's forward). When even the best tree does not beat a round without a draft,
`1 / (t_fixed - t_draft + t_verify(1) + t_accept)` (a plain decoding step), for `patience` drafted rounds in a row, the loop stops
drafting for a while and decodes plain steps, then probes again, backing off exponentially while probes keep losing.
So a weak head costs a few probe rounds, not a slowdown of every round.
"""

from __future__ import annotations

import bisect
import math
import weakref
from typing import Callable

import torch

from .compat import cache_kwarg
from .acceptance import AcceptanceProfile
from .cost import VerifyCost, default_sizes, median_seconds, monotone
from .tree import DraftTree, chain_path, merge_chain

_MEASURED: "weakref.WeakKeyDictionary[torch.nn.Module, dict[tuple, VerifyCost]]" = weakref.WeakKeyDictionary()


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
    from . import measurements

    stored_key = measurements.key("verify_cost", model, sizes=sizes, context_length=context_length, repeats=repeats)
    stored = measurements.load("verify_cost", stored_key)  # measured by an earlier process on this machine
    if stored is not None and tuple(stored.get("sizes", ())) == sizes:
        cached[key] = VerifyCost(sizes=sizes, seconds=tuple(stored["seconds"]))
        return cached[key]

    vocab = model.config.get_text_config().vocab_size
    generator = torch.Generator().manual_seed(0)
    prefix = torch.randint(vocab, (1, context_length), generator=generator).to(device)
    cache = DynamicCache()  # plain layers, as the loops use (a sliding window lives in the verify mask)
    decoder = getattr(model, model.base_model_prefix)
    with torch.no_grad():
        decoder(input_ids=prefix, use_cache=True, **{cache_kwarg(decoder.forward): cache})
        seconds = []
        for size in sizes:
            tokens = torch.randint(vocab, (size,), generator=generator).tolist()
            tree = tree_from_parents(tokens, [-1] + list(range(size - 1)), device=device)
            seconds.append(median_seconds(lambda: verify(tree, context_length, cache), repeats, device,
                                          after=lambda: cache.crop(-size)))
    cost = VerifyCost(sizes=sizes, seconds=tuple(monotone(seconds)))
    cached[key] = cost
    measurements.save("verify_cost", stored_key, {"sizes": list(sizes), "seconds": list(cost.seconds)})
    return cost


class AutoBudget:
    """Chooses each round's tree size from the head's node scores, a measured [`VerifyCost`] and an
    [`AcceptanceProfile`].

    Args:
        verify_cost ([`VerifyCost`]): measured verify seconds vs tree size.
        max_budget (`int`, *optional*): largest tree considered (default: the largest measured size).
        profile ([`AcceptanceProfile`], *optional*): the head's acceptance and costs so far (default: a fresh one;
            `generate()` passes the one kept for the head and target, see [`acceptance_profile`]).
        patience, initial_backoff, max_backoff (`int`): losing drafted rounds before plain steps, and how many plain
            steps then (doubling while probes keep losing, up to `max_backoff`).
    """

    def __init__(self, verify_cost: VerifyCost, max_budget: int | None = None,
                 profile: AcceptanceProfile | None = None, patience: int = 2, initial_backoff: int = 4,
                 max_backoff: int = 64):
        self.verify_cost = verify_cost
        self.max_budget = max_budget or verify_cost.max_size
        self.profile = profile if profile is not None else AcceptanceProfile()
        self.sizes: list[int] = []
        self.drafting_pays = True
        self.patience, self.initial_backoff, self.max_backoff = patience, initial_backoff, max_backoff
        self._losing_rounds = 0
        self._backoff = initial_backoff
        self._skip = 0
        self.skipped_rounds = 0

    @property
    def calibration(self) -> float:
        """Overall `c` of the profile: tokens accepted per token the head expected, so far."""
        return self.profile.calibration

    @property
    def fixed_seconds(self) -> float | None:
        return self.profile.fixed_seconds

    def draft_budget(self) -> int:
        """Nodes to draft this round: twice the largest tree chosen in the last 16 drafted rounds (at least 8), so
        that the choice can grow, without building 64-node trees every round for 2-node choices."""
        if not self.sizes:
            return self.max_budget
        return min(self.max_budget, max(8, 2 * max(self.sizes[-16:])))

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

    def _costs(self) -> tuple[float, float]:
        profile = self.profile
        fixed = profile.fixed_seconds if profile.fixed_seconds is not None else 0.5 * self.verify_cost(1)
        return fixed, profile.accept_seconds_per_token or 0.0

    def choose(self, scores: list[float]) -> int:
        """Tree size (root included) maximising expected tokens per second, given a best-first tree's `scores`:
        `E(n) / (fixed + verify(n) + accept_per_token * E(n))`, `E(n) = 1 + sum_{i<n} min(1, c_i * exp(score_i))`."""
        return self._choose(scores)[0]

    def choose_tree(self, tree: DraftTree, chain: list[int] = (), chain_probabilities: list[float] = (),
                    drafted: bool = True) -> DraftTree:
        """The head's best-first `tree` cut to the size, and a prompt-lookup `chain` (see `lookup.py`) cut to the
        length, that together maximise expected tokens per second; the chain is merged in ([`merge_chain`]).

        A chain node accepted with probability `p_d` (`chain_probabilities`, depth `d`) adds `p_d` expected tokens
        where it is a new node and `max(0, p_d - q)` where the head's tree already holds its token with probability
        `q`; only new nodes add rows to the verify forward. `drafted=False`: the head did not run this round (`tree`
        is the root), so only the chain's length is chosen and the drafting back-off is left alone.
        """
        if not drafted:
            _, length = self._choose([0.0], chain=chain, chain_probabilities=chain_probabilities, update=False)
            return merge_chain(tree, list(chain[:length]), chain_probabilities)
        path = chain_path(tree, chain)  # the chain's nodes in the head's full tree, as far as it follows them
        size, length = self._choose(tree.scores or [0.0], path, chain, chain_probabilities)
        return merge_chain(tree.prefix(size), list(chain[:length]), chain_probabilities)

    def _choose(self, scores: list[float], path: list[int] = (), chain: list[int] = (),
                chain_probabilities: list[float] = (), update: bool = True) -> tuple[int, int]:
        """(head nodes, chain tokens) with the best expected tokens per second (see [`choose_tree`]); `update`
        records the choice and whether drafting pays (against the best round without the head's draft)."""
        profile = self.profile
        fixed = profile.fixed_seconds if profile.fixed_seconds is not None else 0.5 * self.verify_cost(1)
        per_token = profile.accept_seconds_per_token or 0.0
        limit = min(len(scores), self.max_budget)
        scales = profile.scales(limit)
        node_probability = [1.0] + [min(1.0, scales[i] * math.exp(scores[i])) for i in range(1, limit)]
        lookup = [0.0]  # lookup[m]: expected tokens of chain nodes 1..m, were they all new nodes
        for probability in chain_probabilities:
            lookup.append(lookup[-1] + probability)
        on_shared = [0.0]  # over the chain's first nodes that the head's tree holds: sum of max(0, p_d - q)
        for depth, node in enumerate(path, start=1):
            head = node_probability[node] if node < limit else 0.0
            on_shared.append(on_shared[-1] + max(0.0, chain_probabilities[depth - 1] - head))

        def best_with_chain(size: int, head_expected: float, seconds: float) -> tuple[float, int]:
            shared = bisect.bisect_left(path, size)  # the chain's leading nodes among the first `size` head nodes
            best_rate, best_length = 0.0, 0
            for length in range(len(chain) + 1):
                common = min(length, shared)
                expected = head_expected + on_shared[common] + lookup[length] - lookup[common]
                rate = expected / (seconds + self.verify_cost(size + length - common) + per_token * expected)
                if rate > best_rate:
                    best_rate, best_length = rate, length
            return best_rate, best_length

        without_draft = max(fixed - (profile.draft_seconds or 0.0), 0.0)
        plain_rate, plain_length = best_with_chain(1, 1.0, without_draft)
        if not update:
            return 1, plain_length
        best, expected = 1, 1.0
        best_rate, best_length = best_with_chain(1, 1.0, fixed)
        for size in range(2, limit + 1):
            expected += node_probability[size - 1]
            rate, length = best_with_chain(size, expected, fixed)
            if rate > best_rate:
                best, best_rate, best_length = size, rate, length
        if profile.draft_seconds is not None:  # known once a round was measured
            self.drafting_pays = best > 1 and best_rate > plain_rate
            self._update_backoff()
        self.sizes.append(best)
        return best, best_length

    def observe(self, tree: DraftTree, accepted_nodes: list[int], round_seconds: float, verify_seconds: float,
                draft_seconds: float | None = None, accept_seconds: float = 0.0) -> None:
        """Updates the profile after a drafted round that verified `tree` and accepted the drafted nodes
        `accepted_nodes` (node indices, root excluded); `draft_seconds` and `accept_seconds` are the head's and the
        accept step's shares of `round_seconds`."""
        head_size = tree.num_head_nodes
        if tree.scores is not None and head_size > 1:
            self.profile.observe_tree(tree.scores[:head_size], [node for node in accepted_nodes if node < head_size])
        fixed = max(round_seconds - verify_seconds - accept_seconds, 0.0)
        self.profile.observe_costs(fixed, accept_seconds / (1 + len(accepted_nodes)), draft_seconds)
