"""Tree sizes for batched JetSpec decoding: a measured cost model per batch size, and when not to speculate at all.

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
- [`BatchRoundBudget`] picks each round's common tree size from the drafted trees' scores, like [`AutoBudget`] does
  for one row.
"""

from __future__ import annotations

import math
import statistics
import time
import weakref
from dataclasses import dataclass

import torch

from .budget import AcceptanceProfile, VerifyCost, monotone
from .tree import DraftTree

# Largest total rows (batch_size * nodes per row) a verify forward is timed and planned for.
MAX_TOTAL_ROWS = {"cpu": 256, "cuda": 4096}

# model -> head -> settings -> cost (weak keys: dropping a model or head drops its measurements)
_MEASURED: "weakref.WeakKeyDictionary[torch.nn.Module, weakref.WeakKeyDictionary]" = weakref.WeakKeyDictionary()
_HISTORIES: "weakref.WeakKeyDictionary[torch.nn.Module, AcceptanceHistory]" = weakref.WeakKeyDictionary()


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


def _timed(function, repeats: int, device: torch.device) -> float:
    """Median seconds of `function()` over `repeats` runs after one warm-up run."""
    timings = []
    for _ in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        function()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        timings.append(time.perf_counter() - start)
    return statistics.median(timings[1:])


NODE_SIZES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)


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
    from .tree import additive_mask

    device = model.device
    max_total_rows = max_total_rows or MAX_TOTAL_ROWS.get(device.type, MAX_TOTAL_ROWS["cpu"])
    sizes = total_row_sizes(batch_size, max_total_rows)
    key = (str(device), str(model.dtype), model.config._attn_implementation, batch_size, sizes, context_length)
    cached = _MEASURED.setdefault(model, weakref.WeakKeyDictionary()).setdefault(head, {})
    if key in cached:
        return cached[key]

    config = model.config.get_text_config()
    generator = torch.Generator().manual_seed(0)
    decoder = getattr(model, model.base_model_prefix)
    lm_head = model.get_output_embeddings()
    prefix = torch.randint(config.vocab_size, (batch_size, context_length), generator=generator).to(device)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        decoder(input_ids=prefix, past_key_values=cache, use_cache=True)
        seconds = []
        for nodes in sizes:
            tokens = torch.randint(config.vocab_size, (batch_size, nodes), generator=generator).to(device)
            positions = (context_length + torch.arange(nodes, device=device)).expand(batch_size, -1)
            allowed = torch.ones(nodes, context_length + nodes, dtype=torch.bool, device=device).tril(context_length)
            mask = additive_mask(allowed.expand(batch_size, -1, -1), model.dtype)

            def verify():
                decoder(input_ids=tokens, position_ids=positions, attention_mask=mask, past_key_values=cache,
                        use_cache=True)
                cache.crop(-nodes)

            seconds.append(_timed(verify, repeats, device))

        hidden = torch.randn(batch_size * 8, config.hidden_size, generator=generator).to(device, model.dtype)
        lm_small = _timed(lambda: lm_head(hidden[:batch_size]), repeats, device)
        lm_big = _timed(lambda: lm_head(hidden), repeats, device)
        per_row = max(lm_big - lm_small, 0.0) / (7 * batch_size)

        taps = len(head.config.target_layer_ids) * config.hidden_size
        features = torch.randn(batch_size, context_length, taps, generator=generator).to(device, head.dtype)
        context = JetSpecContextCache()
        anchors = torch.full((batch_size, 1), context_length, device=device)
        context_positions = torch.arange(context_length, device=device).expand(batch_size, -1)
        head(anchor_ids=prefix[:, -1:], anchor_position_ids=anchors, context_features=features,
             context_position_ids=context_positions, past_key_values=context, logits_to_keep=False)
        draft_base = _timed(
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
    return cost


class AcceptanceHistory:
    """What trees of each size actually gave a head, kept across `generate()` calls (one per head).

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

    def expected_tokens(self, num_nodes: int) -> float:
        """Mean tokens per row-round with `num_nodes` nodes; beyond the largest size seen, that size's mean (a tree
        never gives less than its prefix, and an untried size is not assumed to give more)."""
        size = min(num_nodes, self.max_nodes)
        while size > 1 and self.weight[size] == 0:
            size -= 1
        return self.tokens[size] / self.weight[size] if self.weight[size] else 1.0


def acceptance_history(head: torch.nn.Module) -> AcceptanceHistory:
    """The [`AcceptanceHistory`] of `head` (created empty on first use)."""
    if head not in _HISTORIES:
        _HISTORIES[head] = AcceptanceHistory()
    return _HISTORIES[head]


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
    when no `n > 1` beats plain, the call does not speculate. Drafted trees may grow to twice the best size, so that
    rounds keep measuring the next sizes up.

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


class BatchRoundBudget:
    """Chooses each round's tree size (common to all rows) from the drafted trees' scores and the measured costs, and
    tells whether drafting still pays.

    Node `i` of a row's best-first tree is accepted with probability about `c_i * exp(score_i)`, `c_i` calibrating
    the head's confidence at that node index against what the target accepted there (the head's
    [`AcceptanceProfile`], shared with [`AutoBudget`]). The round keeps the prefix size `n` maximising
    `sum_rows E_row(n) / (fixed + verify(rows * n))`, `fixed` being a running mean of the rest of a round (draft,
    accept, cache, host). Drafting pays while that best rate beats plain rounds without a draft:
    `rows / (fixed - draft + verify(rows))`.

    Args:
        cost ([`BatchCost`]): measured costs.
        max_nodes (`int`): largest size considered.
        initial_fixed (`float`): `fixed` before the first round is measured.
        initial_draft (`float`): seconds of a draft before the first round is measured.
        profile ([`AcceptanceProfile`], *optional*): the head's calibration (default: a fresh one).
    """

    def __init__(self, cost: BatchCost, max_nodes: int, initial_fixed: float, initial_draft: float = 0.0,
                 profile: AcceptanceProfile | None = None):
        self.cost = cost
        self.max_nodes = max_nodes
        self.fixed_seconds = initial_fixed
        self.draft_seconds = initial_draft
        self.profile = profile if profile is not None else AcceptanceProfile()
        self.sizes: list[int] = []
        self.drafting_pays = True

    @property
    def calibration(self) -> float:
        return self.profile.calibration

    def choose(self, trees: list[DraftTree]) -> int:
        """Nodes per row (root included) for this round; also sets [`drafting_pays`]."""
        rows = len(trees)
        limit = min(self.max_nodes, max(tree.num_nodes for tree in trees))
        scales = self.profile.scales(limit)
        expected = [0.0] * (limit + 1)  # expected[n]: summed over rows, tokens from node n - 1
        for tree in trees:
            scores = tree.scores or [0.0]
            for node in range(1, min(len(scores), limit)):
                expected[node + 1] += min(1.0, scales[node] * math.exp(scores[node]))
        best, best_rate, total = 1, rows / (self.fixed_seconds + self.cost.verify_seconds(rows, 1)), float(rows)
        for nodes in range(2, limit + 1):
            total += expected[nodes]
            rate = total / (self.fixed_seconds + self.cost.verify_seconds(rows, nodes))
            if rate > best_rate:
                best, best_rate = nodes, rate
        without_draft = max(self.fixed_seconds - self.draft_seconds, 0.0) + self.cost.verify_seconds(rows, 1)
        self.drafting_pays = best > 1 and best_rate > rows / without_draft
        self.sizes.append(best)
        return best

    def observe(self, trees: list[DraftTree], accepted: list[list[int]], round_seconds: float, verify_seconds: float,
                draft_seconds: float) -> None:
        """Updates the calibration and the running costs after a round (`accepted[r]`: the drafted nodes row `r`
        accepted, as node indices)."""
        for tree, path in zip(trees, accepted):
            if tree.scores is not None and tree.num_nodes > 1:
                self.profile.observe_tree(tree.scores, path)
        fixed = max(round_seconds - verify_seconds, 0.0)
        self.fixed_seconds = 0.8 * self.fixed_seconds + 0.2 * fixed
        self.draft_seconds = 0.8 * self.draft_seconds + 0.2 * draft_seconds
