"""The plan of a call: whether to speculate at all, how big the trees may be, each round's width, and when to give up.

One round of batched decoding costs a batched draft (one head forward for every row, then the target's `lm_head` over
the drafted depths), one target verify forward over `batch_size * n` rows (`n` tree nodes per row, trees padded to a
common size) and host work per row. Plain decoding costs one target forward over `batch_size` rows per token. On a
CPU or a saturated GPU the verify cost grows with the TOTAL rows `batch_size * n`, so as the batch grows the same tree
size costs more and the best `n` shrinks, down to `n = 1`: no speculation.

- [`measure_batch_cost`] times, once per (model, head, batch size, device, dtype, attention backend), the verify
  forward against total rows, the `lm_head` per row and the head's batched forward ([`BatchCost`]).
- [`AcceptanceHistory`] (one per head, kept across calls) holds the tokens per row per round each tree size actually
  gave: a verified best-first tree of `n` nodes also tells what every prefix of it would have given.
- [`plan_batch`] decides before a call whether to speculate at all (else `generate()` runs Transformers' own
  decoding for the call: never slower than plain) and how big the drafted trees may be.
- [`BatchRoundBudget`] picks each round's common tree size from the drafted trees' scores (one prompt is a batch of
  one row).
- [`SpeedGuard`] gives up speculating for the rest of a call whose recent rounds made tokens slower than plain
  decoding's measured step.
"""

from __future__ import annotations

import bisect
import collections
import math
from dataclasses import dataclass

import torch

from .compat import cache_kwarg
from . import measurements
from .acceptance import AcceptanceHistory, AcceptanceProfile, acceptance_profile, pair_state
from .cost import CPU_SIZES, VerifyCost, median_seconds, monotone
from .packed_linear import packed_linears_for, packed_memory_cap
from .tree import DraftTree, chain_path, merge_chain
from .verify import verify_forward

# Plain calls at a batch size, chosen because speculation measured slower there, before speculation is tried again.
EXPLORE_EVERY = 4
# A batch size not measured yet is explored only when the nearest smaller measured one found speculation at least
# this much faster (gains shrink as batches grow: a tie there predicts a loss here).
EXPLORE_LARGER_MARGIN = 1.05
# Largest total rows (batch_size * nodes per row) a verify forward is timed and planned for.
MAX_TOTAL_ROWS = {"cpu": 256, "cuda": 4096}
# With plain decoding's step measured at this batch size, a call whose last GUARD_ROUNDS rounds made tokens more than
# GUARD_MARGIN times slower than it gives up speculating (head and proposals) for the rest of the call.
GUARD_ROUNDS = 8
GUARD_MARGIN = 1.05
# A round drafts twice the head nodes recent rounds kept (the last RECENT_ROUNDS drafted ones), at least MIN_DRAFT_NODES.
RECENT_ROUNDS = 16
MIN_DRAFT_NODES = 8

@dataclass(frozen=True)
class BatchCost:
    """Measured seconds of the pieces of one round at one batch size.

    Args:
        batch_size (`int`): rows the costs were measured with.
        verify (`VerifyCost`): seconds of one target forward vs TOTAL rows `batch_size * n` (a plain decoding step
            is `verify(batch_size)`).
        lm_head_base (`float`), lm_head_per_row (`float`): `lm_head` seconds as `base + per_row * rows`.
        draft_base (`float`): seconds of one head forward over all rows, logits excluded.
    """

    batch_size: int
    verify: VerifyCost
    lm_head_base: float
    lm_head_per_row: float
    draft_base: float

    @property
    def max_nodes(self) -> int:
        """Largest tree size per row the verify cost was measured for."""
        return max(self.verify.max_size // self.batch_size, 1)

    def verify_seconds(self, rows: int, nodes: int) -> float:
        """A verify forward of `rows` rows with `nodes` tree nodes each."""
        return self.verify(rows * nodes)

    def lm_head(self, rows: int) -> float:
        return self.lm_head_base + self.lm_head_per_row * rows

    def draft(self, depth: int, rows: int | None = None) -> float:
        """A batched draft whose logits cover `depth` depths (0: no draft at all)."""
        rows = self.batch_size if rows is None else rows
        return 0.0 if depth < 1 else self.draft_base + self.lm_head(rows * depth)

    def plain_step(self) -> float:
        """One step of plain decoding for the whole batch (its host overhead left out: a conservative estimate)."""
        return self.verify(self.batch_size) + self.lm_head(self.batch_size)


NODE_SIZES = CPU_SIZES  # tree sizes per row timed by the batch calibration: the one-prompt calibration's CPU sizes


def total_row_sizes(batch_size: int, max_total_rows: int) -> tuple[int, ...]:
    """Nodes per row to time at this batch size: those of [`NODE_SIZES`] whose total rows `batch_size * n` fit in
    `max_total_rows`, and always 1 and 2 (so that "speculation is too slow here" comes from a measurement)."""
    return tuple(n for n in NODE_SIZES if n <= 2 or batch_size * n <= max_total_rows)


def measure_batch_cost(
    model: torch.nn.Module,
    head: torch.nn.Module,
    batch_size: int,
    context_length: int = 128,
    repeats: int = 2,
    max_total_rows: int | None = None,
) -> BatchCost:
    """Times the pieces of a batched round on this machine, once per (model, head, batch size, device, dtype,
    attention backend); later calls return the cached [`BatchCost`].

    Args:
        model: the target (its decoder and `lm_head` run the forwards).
        head ([`JetSpecHead`]): the bound draft head.
        batch_size (`int`): rows.
        context_length (`int`): tokens already cached per row.
        repeats (`int`): timings per measurement (the median is kept).
        max_total_rows (`int`, *optional*): largest `batch_size * n` timed (default: [`MAX_TOTAL_ROWS`] of the device).
    """
    from transformers import DynamicCache

    from .modeling_jetspec import JetSpecContextCache
    from .masks import additive_mask

    device = model.device
    max_total_rows = max_total_rows or MAX_TOTAL_ROWS.get(device.type, MAX_TOTAL_ROWS["cpu"])
    sizes = total_row_sizes(batch_size, max_total_rows)
    key = (str(device), str(model.dtype), model.config._attn_implementation, batch_size, sizes, context_length)
    cached = pair_state(model, head).batch_costs
    if key in cached:
        return cached[key]
    head_config = measurements.config_fingerprint(head.config)
    decoder = getattr(model, model.base_model_prefix)
    packed = packed_linears_for(decoder, packed_memory_cap(head.generation_config))
    stored_key = measurements.key("batch_cost", model, head=head_config, head_dtype=str(head.dtype), batch=batch_size,
                                  sizes=sizes, context_length=context_length, repeats=repeats,
                                  kernels=None if packed is None else packed.kernels)  # the verify forward's linears
    stored = measurements.load("batch_cost", stored_key)  # measured by an earlier process on this machine
    if stored is not None:
        try:
            cached[key] = BatchCost(batch_size=batch_size, verify=VerifyCost(sizes=tuple(stored["sizes"]),
                                                                             seconds=tuple(stored["seconds"])),
                                    lm_head_base=stored["lm_head_base"], lm_head_per_row=stored["lm_head_per_row"],
                                    draft_base=stored["draft_base"])
            return cached[key]
        except (KeyError, TypeError, ValueError):
            pass  # an unreadable entry is measured again

    config = model.config.get_text_config()
    generator = torch.Generator().manual_seed(0)
    lm_head = model.get_output_embeddings()
    prefix = torch.randint(config.vocab_size, (batch_size, context_length), generator=generator).to(device)
    cache = DynamicCache()  # plain layers, as the loops use (a sliding window lives in the verify mask)
    with torch.no_grad():
        decoder(input_ids=prefix, use_cache=True, **{cache_kwarg(decoder.forward): cache})
        seconds = []
        for nodes in sizes:
            tokens = torch.randint(config.vocab_size, (batch_size, nodes), generator=generator).to(device)
            positions = (context_length + torch.arange(nodes, device=device)).expand(batch_size, -1)
            allowed = torch.ones(nodes, context_length + nodes, dtype=torch.bool, device=device).tril(context_length)
            mask = additive_mask(allowed.expand(batch_size, -1, -1), model.dtype)

            def verify():
                verify_forward(decoder, packed, input_ids=tokens, position_ids=positions, attention_mask=mask,
                               **{cache_kwarg(decoder.forward): cache})
                cache.crop(-nodes)

            seconds.append(median_seconds(verify, repeats, device))

        hidden = torch.randn(batch_size * 8, config.hidden_size, generator=generator).to(device, model.dtype)
        lm_small = median_seconds(lambda: lm_head(hidden[:batch_size]), repeats, device)
        lm_big = median_seconds(lambda: lm_head(hidden), repeats, device)
        per_row = max(lm_big - lm_small, 0.0) / (7 * batch_size)

        taps = len(head.config.target_layer_ids) * config.hidden_size
        features = torch.randn(batch_size, context_length, taps, generator=generator).to(device, head.dtype)
        context = JetSpecContextCache()
        anchors = torch.full((batch_size, 1), context_length, device=device)
        context_positions = torch.arange(context_length, device=device).expand(batch_size, -1)
        head(anchor_ids=prefix[:, -1:], anchor_position_ids=anchors, context_features=features,
             context_position_ids=context_positions, past_key_values=context, logits_to_keep=False)
        draft_base = median_seconds(
            lambda: head(anchor_ids=prefix[:, -1:], anchor_position_ids=anchors, past_key_values=context,
                         logits_to_keep=False),
            repeats,
            device,
        )
    totals = tuple(batch_size * nodes for nodes in sizes)
    cost = BatchCost(
        batch_size=batch_size,
        verify=VerifyCost(sizes=totals, seconds=tuple(monotone(seconds))),
        lm_head_base=max(lm_small - per_row * batch_size, 0.0),
        lm_head_per_row=per_row,
        draft_base=draft_base,
    )
    cached[key] = cost
    measurements.save("batch_cost", stored_key, {
        "sizes": list(totals), "seconds": list(cost.verify.seconds), "lm_head_base": cost.lm_head_base,
        "lm_head_per_row": cost.lm_head_per_row, "draft_base": cost.draft_base})
    return cost


@dataclass(frozen=True)
class BatchPlan:
    """What a batched call does.

    Args:
        speculate (`bool`): draft and verify trees; `False` runs Transformers' own decoding for the call.
        max_nodes (`int`): largest tree per row (root included) a round may verify.
        depth (`int`): drafted depths whose logits are computed (a tree of `max_nodes` nodes is at most this deep).
        best_nodes (`int`, *optional*): the tree size the history and costs favour (`None` without history).
        expected_speedup (`float` or `None`): the model's throughput ratio vs plain decoding at the best tree size
            (`None` without history).
    """

    speculate: bool
    max_nodes: int
    depth: int
    best_nodes: int | None = None
    expected_speedup: float | None = None


def round_seconds(cost: BatchCost, rows: int, nodes: int, depth: int, host_per_row: float) -> float:
    """Predicted seconds of one round: draft + verify + `lm_head` over each row's main chain + host work."""
    if nodes <= 1:
        return cost.verify_seconds(rows, 1) + cost.lm_head(rows) + host_per_row * rows
    chain = min(nodes, depth + 1)
    return cost.draft(depth, rows) + cost.verify_seconds(rows, nodes) + cost.lm_head(rows * chain) + host_per_row * rows


def plan_batch(cost: BatchCost, history: AcceptanceHistory, block_size: int, max_budget: int | None = None) -> BatchPlan:
    """Whether and how big to speculate at `cost.batch_size`.

    With no history the call explores (largest affordable trees; each round then sizes its own tree with
    [`BatchRoundBudget`] and stops drafting when it does not pay). With history, tree size `n` is worth
    `batch_size * E(n) / round_seconds(n)` tokens per second against `batch_size / plain_step` for plain decoding
    (measured in earlier plain calls at this batch size when there were any);
    when no `n > 1` beats plain, the call does not speculate. Once a speculative call was measured at this batch size,
    the next call runs plain decoding to measure it too; from then on measured tokens per second decide (speculation,
    when slower, is tried again after `EXPLORE_EVERY` plain calls), and the model only sizes the trees. A batch size
    not measured yet is explored only if the nearest smaller measured one found speculation at least
    `EXPLORE_LARGER_MARGIN` times faster (else after `EXPLORE_EVERY` plain calls there). Drafted trees
    may grow to twice the best size, so that rounds keep measuring the next sizes up.

    Args:
        cost ([`BatchCost`]): measured costs at this batch size.
        history ([`AcceptanceHistory`]): the head's tokens per row-round vs tree size.
        block_size (`int`): the head's block size (drafted depths are at most `block_size - 1`).
        max_budget (`int`, *optional*): a cap on nodes per row (`head.generation_config.tree_max_budget`).
    """
    cap = cost.max_nodes if max_budget is None else max(1, min(max_budget, cost.max_nodes))
    if block_size < 2 or cap < 2:
        return BatchPlan(speculate=False, max_nodes=1, depth=0)
    if not history.observed:
        return BatchPlan(speculate=True, max_nodes=cap, depth=min(block_size - 1, cap - 1))
    batch = cost.batch_size
    # What earlier calls at this batch size measured overrides the model: after a speculative call, one plain call
    # measures plain's step; then the faster one runs (speculation, when slower, again after `EXPLORE_EVERY` plain
    # calls: prompts, lengths and the machine's load change).
    # A batch size not measured yet is not explored until the nearest smaller one measured speculation clearly faster
    # (`EXPLORE_LARGER_MARGIN`): gains shrink as batches grow.
    if batch in history.spec_token_seconds:
        measured, needed = history.measured_speedup(batch), 1.0
    else:
        smaller = [size for size in history.spec_token_seconds if size < batch and history.measured_speedup(size)]
        measured = history.measured_speedup(max(smaller)) if smaller else 1.0
        needed = EXPLORE_LARGER_MARGIN if smaller else 1.0
    if measured is None or (measured < needed and history.plain_calls.get(batch, 0) < EXPLORE_EVERY):
        return BatchPlan(speculate=False, max_nodes=1, depth=0, expected_speedup=measured)
    host = history.host_seconds_per_row or 0.0
    # a plain step as measured in earlier calls at this batch size (Transformers' loop adds host work to the forward),
    # else the forward and lm_head alone: a conservative estimate
    plain_rate = batch / max(cost.plain_step(), history.plain_step_seconds.get(batch, 0.0))
    best, best_rate = 1, plain_rate
    for nodes in range(2, cap + 1):
        depth = min(block_size - 1, nodes - 1)
        rate = batch * history.expected_tokens(nodes) / round_seconds(cost, batch, nodes, depth, host)
        if rate > best_rate:
            best, best_rate = nodes, rate
    if best == 1:
        return BatchPlan(speculate=False, max_nodes=1, depth=0, best_nodes=1, expected_speedup=1.0)
    max_nodes = min(cap, 2 * best)
    return BatchPlan(speculate=True, max_nodes=max_nodes, depth=min(block_size - 1, max_nodes - 1), best_nodes=best,
                     expected_speedup=best_rate / plain_rate)


def row_choices(
    node_probability: list[float], path: list[int], chain_probabilities: list[float], max_width: int
) -> list[tuple[float, int, int]]:
    """A row's best tree for every width: entry `w` (0 unused) is `(expected tokens, head nodes h, chain tokens L)` of
    the best tree of at most `w` nodes made of the head's first `h` best-first nodes and a prompt-lookup chain's
    first `L` tokens merged in (see `lookup.py`).

    Args:
        node_probability (`list[float]`): the head's nodes' acceptance probabilities (index 0, the root: 1).
        path (`list[int]`): the chain's nodes in the head's tree, as far as it follows them ([`chain_path`]).
        chain_probabilities (`list[float]`): `P(the chain's first d tokens are right)`, `d = 1, 2, ...`.
        max_width (`int`): largest tree considered.

    A chain node at depth `d` adds `p_d` expected tokens as a new node (one more row) and `max(0, p_d - q)` where the
    head's first `h` nodes hold it with probability `q` (no row).
    """
    lookup = [0.0]  # lookup[L]: expected tokens of chain nodes 1..L, were they all new nodes
    for probability in chain_probabilities:
        lookup.append(lookup[-1] + probability)
    on_shared = [0.0]  # over the chain's first nodes that the head's tree holds: sum of max(0, p_d - q)
    for depth, node in enumerate(path, start=1):
        held = node_probability[node] if node < len(node_probability) else 0.0
        on_shared.append(on_shared[-1] + max(0.0, chain_probabilities[depth - 1] - held))
    best = [(1.0, 1, 0)] * (max_width + 1)
    head_expected = 0.0
    for size in range(1, min(len(node_probability), max_width) + 1):
        head_expected += node_probability[size - 1]
        shared = bisect.bisect_left(path, size)  # the chain's leading nodes among the first `size` head nodes
        for length in range(len(chain_probabilities) + 1):
            common = min(length, shared)
            nodes = size + length - common
            if nodes > max_width:
                break
            expected = head_expected + on_shared[common] + lookup[length] - lookup[common]
            if expected > best[nodes][0]:
                best[nodes] = (expected, size, length)
    for width in range(2, max_width + 1):  # a tree of fewer nodes fits a wider round too
        if best[width - 1][0] >= best[width][0]:
            best[width] = best[width - 1]
    return best


class BatchRoundBudget:
    """Chooses each round's trees (one common width, padded) from the drafted trees' scores, the rows' prompt-lookup
    proposals and the measured costs, and tells whether drafting still pays.

    Node `i` of a row's best-first tree is accepted with probability about `c_i * exp(score_i)`, `c_i` calibrating
    the head's confidence at that node index against what the target accepted there (the head's
    [`AcceptanceProfile`]); a proposal's first `d` tokens are right with the probability
    its [`LookupProfile`] measured. For every width `w` each row takes its best tree of at most `w` nodes
    ([`row_choices`]); the round keeps the `w` maximising `sum_rows E_row(w) / (fixed + verify(rows * w))`, `fixed`
    being the rest of a round: `draft` (a running mean over drafted rounds) plus `rest` (accept, cache, host: a
    running mean over every round). Both are kept per batch size in the head's profile, so that a call starts from
    what the last one measured: estimated from the cost model instead (a draft's `lm_head` rows priced as the
    target's), a new call's first rounds took trees too big to pay, and while the head paused nothing corrected them.
    Drafting pays while the best rate beats rounds without a draft (proposals only): the same choice with no head
    nodes and `rest` alone. Each round drafts only about twice the head nodes recent rounds kept
    ([`BatchRoundBudget.draft_nodes`]).

    Args:
        cost ([`BatchCost`]): measured costs.
        max_nodes (`int`): most head nodes per row.
        initial_fixed (`float`): `fixed` before the first round is measured (unless the profile has it).
        initial_draft (`float`): seconds of a draft before the first round is measured (unless the profile has it).
        profile ([`AcceptanceProfile`], *optional*): the head's calibration (default: a fresh one).
    """

    def __init__(self, cost: BatchCost, max_nodes: int, initial_fixed: float, initial_draft: float = 0.0,
                 profile: AcceptanceProfile | None = None):
        self.cost = cost
        self.max_nodes = max_nodes
        self.profile = profile if profile is not None else AcceptanceProfile()
        self.rest_seconds, self.draft_seconds = self.profile.round_costs.get(
            cost.batch_size, (max(initial_fixed - initial_draft, 0.0), initial_draft))
        self.sizes: list[int] = []
        self.head_sizes: list[int] = []  # the most head nodes a row kept, per drafted round
        self.drafting_pays = True

    @property
    def calibration(self) -> float:
        return self.profile.calibration

    @property
    def fixed_seconds(self) -> float:
        """A drafted round's seconds besides the verify forward."""
        return self.rest_seconds + self.draft_seconds

    def draft_nodes(self, limit: int) -> int:
        """Head nodes per row to draft this round: twice the most any row kept in the last `RECENT_ROUNDS` drafted
        rounds, at least `MIN_DRAFT_NODES` (and at most `limit`), so that the choice can grow without every round
        offering the biggest trees. A head's deep, low-ranked nodes are rarely verified, so their calibration is the
        least sure: offered every round, they made rounds of the one-prompt path choose trees that did not pay
        (MT-Bench at 0.94x of the loop that drafted this way)."""
        if not self.head_sizes:
            return limit
        return min(limit, max(MIN_DRAFT_NODES, 2 * max(self.head_sizes[-RECENT_ROUNDS:])))

    def choose(self, trees: list[DraftTree]) -> int:
        """Nodes per row (root included) for this round without proposals; also sets [`drafting_pays`]."""
        return max(tree.num_nodes for tree in self.choose_trees(trees))

    def choose_trees(self, trees: list[DraftTree], chains: list[list[int]] | None = None,
                     chain_probabilities: list[list[float]] | None = None, drafted: bool = True) -> list[DraftTree]:
        """Each row's tree for this round: its head tree cut and its proposal (`chains[r]`, right with
        `chain_probabilities[r]`) cut and merged in, at the common width with the best expected tokens per second.
        `drafted=False`: the head did not run (`trees` are roots), so only the proposals' lengths are chosen and
        [`drafting_pays`] is left alone."""
        rows = len(trees)
        chains = chains or [[] for _ in trees]
        chain_probabilities = chain_probabilities or [[] for _ in trees]
        head_limit = min(self.max_nodes, max(tree.num_nodes for tree in trees)) if drafted else 1
        width_limit = max(head_limit + max(len(chain) for chain in chains), 1)
        width_limit = min(width_limit, max(self.cost.max_nodes, head_limit))
        scales = self.profile.scales(head_limit)
        with_head, without_head = [], []
        for tree, chain, probabilities in zip(trees, chains, chain_probabilities):
            scores = tree.scores or [0.0]
            size = min(len(scores), head_limit)
            node_probability = [1.0] + [min(1.0, scales[i] * math.exp(scores[i])) for i in range(1, size)]
            path = chain_path(tree, chain) if chain else []
            with_head.append(row_choices(node_probability, path, list(probabilities[: len(chain)]), width_limit))
            if drafted:  # the same row without the head's nodes: its root, plus its proposal if it has one
                without_head.append(row_choices([1.0], [], list(probabilities[: len(chain)]), width_limit))

        def best_width(choices: list[list[tuple[float, int, int]]], fixed: float) -> tuple[int, float]:
            best, best_rate = 1, -1.0
            for width in range(1, width_limit + 1):
                rate = sum(row[width][0] for row in choices) / (fixed + self.cost.verify_seconds(rows, width))
                if rate > best_rate:
                    best, best_rate = width, rate
            return best, best_rate

        fixed = self.fixed_seconds if drafted else self.rest_seconds
        width, rate = best_width(with_head, fixed)
        if drafted:
            _, rate_without = best_width(without_head, self.rest_seconds)
            self.drafting_pays = any(row[width][1] > 1 for row in with_head) and rate > rate_without
        self.sizes.append(width)
        if drafted:
            self.head_sizes.append(max(row[width][1] for row in with_head))
        merged = []
        for tree, chain, probabilities, row in zip(trees, chains, chain_probabilities, with_head):
            _, size, length = row[width]
            cut = tree.prefix(size) if size < tree.num_nodes else tree
            merged.append(merge_chain(cut, list(chain[:length]), list(probabilities)) if length else cut)
        return merged

    def observe(self, trees: list[DraftTree], accepted: list[list[int]], round_seconds: float, verify_seconds: float,
                draft_seconds: float, drafted: bool = True) -> None:
        """Updates the calibration and the running costs after a round (`accepted[r]`: the drafted nodes row `r`
        accepted, as node indices; `drafted=False`: the head did not run); only the head's own nodes calibrate the
        head."""
        for tree, path in zip(trees, accepted):
            head_size = tree.num_head_nodes
            if tree.scores is not None and head_size > 1:
                self.profile.observe_tree(tree.scores[:head_size], [node for node in path if node < head_size])
        self.rest_seconds = 0.8 * self.rest_seconds + 0.2 * max(round_seconds - verify_seconds - draft_seconds, 0.0)
        if drafted:
            self.draft_seconds = 0.8 * self.draft_seconds + 0.2 * draft_seconds
        self.profile.round_costs[self.cost.batch_size] = (self.rest_seconds, self.draft_seconds)


def plan_call(model, head, settings, batch_size: int,
              history: AcceptanceHistory) -> tuple[BatchPlan, BatchRoundBudget | None]:
    """The plan of one call: a fixed budget's trees (whole prompt-lookup proposals merged in), or under
    `tree_budget="auto"` trees sized for this batch size by the measured costs ([`plan_batch`]) with a
    [`BatchRoundBudget`] for each round's width -- or no speculation at all.

    Args:
        model: the target. head ([`JetSpecHead`]): the bound head.
        settings ([`TreeSettings`]): the call's tree settings.
        batch_size (`int`): rows.
        history ([`AcceptanceHistory`]): what earlier calls of this head on this target measured.
    """
    block = head.config.block_size
    budget = settings.tree_budget
    if budget != "auto":  # one node (or a block of one) drafts nothing: plain decoding, or proposals alone
        drafts = budget > 1 and block > 1
        return BatchPlan(speculate=drafts or bool(settings.prompt_lookup_num_tokens), max_nodes=budget,
                         depth=min(block - 1, budget - 1) if drafts else 0), None
    cost = measure_batch_cost(model, head, batch_size)
    plan = plan_batch(cost, history, block, settings.tree_max_budget)
    cap = cost.max_nodes if settings.tree_max_budget is None else max(1, min(settings.tree_max_budget, cost.max_nodes))
    if batch_size == 1 and not plan.speculate and block > 1 and cap > 1:
        # One row speculates every call: its rounds pause the head where the drafts do not pay while its proposals go
        # on, and what paid for earlier prompts says little about this one. (A batch's call-level choice stands.)
        plan = BatchPlan(speculate=True, max_nodes=cap, depth=min(block - 1, cap - 1))
    if not plan.speculate:
        return plan, None
    host = history.host_seconds_per_row or 0.0
    fixed = round_seconds(cost, batch_size, plan.max_nodes, plan.depth, host) - cost.verify_seconds(batch_size,
                                                                                                      plan.max_nodes)
    return plan, BatchRoundBudget(cost, plan.max_nodes, fixed, initial_draft=cost.draft(plan.depth),
                                  profile=acceptance_profile(model, head))


class SpeedGuard:
    """Tells a call to give up speculating (head and proposals) once its last `GUARD_ROUNDS` rounds made tokens more
    than `GUARD_MARGIN` times slower than plain decoding's step measured at this batch size (`plain_step`, from earlier
    plain calls; `None`: never)."""

    def __init__(self, plain_step: float | None, batch_size: int):
        self.plain_step, self.batch_size = plain_step, batch_size
        self.recent: collections.deque = collections.deque(maxlen=GUARD_ROUNDS)  # (tokens, seconds) per round

    def too_slow(self, tokens: int, seconds: float) -> bool:
        if self.plain_step is None:
            return False
        self.recent.append((tokens, seconds))
        total_tokens, total_seconds = map(sum, zip(*self.recent))
        return (len(self.recent) == GUARD_ROUNDS
                and total_seconds / total_tokens > GUARD_MARGIN * self.plain_step / self.batch_size)
