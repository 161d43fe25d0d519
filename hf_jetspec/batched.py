"""Batched JetSpec decoding: `generate(input_ids, attention_mask, assistant_model=head)` with a left-padded batch.

Every round drafts one tree per row (one head forward for the whole batch, see `batched_draft.py`), pads the trees to
a common size `n` and verifies all of them in ONE target forward: inputs `(batch, n)`, per-row positions (real tokens
before the root + node depth) and a dense 4D mask = each row's key-validity mask over the cache + its tree's ancestor
mask. Rows accept different numbers of tokens; the target cache keeps `max_accepted + 1` new slots for every row, row
`i`'s accepted nodes in its first slots and the rest marked invalid in a per-row key mask (RoPE is applied from
`position_ids`, so gaps are harmless), squeezed out now and then. Rows leave the batch when they finish.

Output equals plain `generate()` on the same batch, row by row: rows finished by an EOS-type criterion are padded with
`pad_token_id` as Transformers does; without one, a row that met its stopping criteria keeps the target's own tokens
until the last row finishes, again as Transformers does. A streamer gets each step's column (one token per row, as
plain decoding puts them) once every row has that step's token.

With `tree_budget="auto"` a measured cost model (`batch_budget.py`) sizes the trees for the batch size and hardware,
and when speculation would not beat plain decoding the call runs Transformers' own decoding instead.
"""

from __future__ import annotations

import collections
import copy
import statistics
import time

import torch
from transformers import DynamicCache, LogitsProcessorList
from transformers.generation.logits_process import (
    EncoderNoRepeatNGramLogitsProcessor,
    EncoderRepetitionPenaltyLogitsProcessor,
    PrefixConstrainedLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
)
from transformers.generation.stopping_criteria import StoppingCriteria, StoppingCriteriaList
from transformers.generation.utils import GenerateDecoderOnlyOutput

from . import accept
from .acceptance import acceptance_history, acceptance_profile
from .batch_budget import BatchPlan, BatchRoundBudget, measure_batch_cost, plan_batch, round_seconds
from .batched_draft import BatchedDrafter
from .compat import cache_kwarg
from .inputs import validated_cache
from .kv_cache import compact_cache_rows, keep_tree_slots
from .settings import TreeSettings
from .stats import JetSpecBatchStats
from .verify import tap_features, verify_forward
from .lookup import PromptLookupDraft
from .modeling_jetspec import JetSpecHead
from .exact_argmax import exact_argmax_for
from .packed_linear import packed_linears_for
from .projection import ProjectionCost, measure_projection
from .target_logits import target_logits_for
from .tree import DraftTree, build_tree, merge_chain
from .masks import additive_mask, sliding_window, verify_attention_mask

# Attention that takes a batch's dense per-row tree mask. `"jetspec_tree"` runs a dense mask as SDPA does: its kernel
# reads one tree's ancestor bits over an all-valid prefix, and a batch's rows have left padding and cache gaps.
BATCH_MASK_ATTENTION = ("sdpa", "eager", "jetspec_tree")
# Logits processors that keep per-call state across steps or run the model on a batch of their own: a row's tokens
# are processed alone, at its own pace, so these cannot see the batch they expect. (Those that only index the batch
# get a per-row copy, see `row_logits_processors`.)
BATCH_INDEXED_PROCESSORS = (
    "ClassifierFreeGuidanceLogitsProcessor",
    "UnbatchedClassifierFreeGuidanceLogitsProcessor",
    "SynthIDTextWatermarkLogitsProcessor",
)
# Invalid cache slots (per-row gaps) are squeezed out once there are this many per row and this share of the cache.
COMPACT_MIN_GAP = 16
COMPACT_MIN_FRACTION = 0.25
# Rounds in a row in which drafting did not pay (see `BatchRoundBudget.drafting_pays`) before the head pauses for
# DRAFT_BACKOFF rounds (proposals only), doubling while the rounds after each pause still do not pay; after a pause one
# such round (a probe) is enough.
DRAFT_PATIENCE = 3
DRAFT_BACKOFF = 4
MAX_DRAFT_BACKOFF = 64
# With plain decoding's step measured at this batch size, a call whose last GUARD_ROUNDS rounds made tokens more than
# GUARD_MARGIN times slower than it gives up speculating (head and proposals) for the rest of the call.
GUARD_ROUNDS = 8
GUARD_MARGIN = 1.05
# Accept uses `ExactArgmax` above this many rows per call (below, the fp32 lm_head costs about the same), and asks it
# for at most ARGMAX_MAX_ROWS rows a call (its bf16 pass is about flat up to there on the CPUs measured).
ARGMAX_MIN_ROWS = 3
ARGMAX_MAX_ROWS = 64


def left_padding_mask(attention_mask: torch.Tensor | None, input_ids: torch.LongTensor) -> torch.LongTensor:
    """The `(batch, length)` 0/1 mask of a left-padded batch (all ones when `attention_mask` is `None`).

    Raises:
        `ValueError`: for right (or inner) padding, or a row without a single token.
    """
    if attention_mask is None:
        return torch.ones_like(input_ids)
    mask = attention_mask.long()
    if bool(((mask != 0) & (mask != 1)).any()) or bool((mask[:, 1:] < mask[:, :-1]).any()):
        raise ValueError(
            "Batched JetSpec decoding needs left padding (every row: padding first, then its tokens, as decoder-only "
            "generation expects): pad with `tokenizer.padding_side = 'left'`."
        )
    if bool((mask[:, -1] == 0).any()):
        raise ValueError("Every row of a batch needs at least one prompt token (an all-padding row was given).")
    return mask


def _validate_batch(
    model, input_ids, logits_processor, generation_config, head, model_kwargs
) -> tuple[DynamicCache, torch.LongTensor]:
    cache = validated_cache(model_kwargs, generation_config)
    if generation_config.return_dict_in_generate:
        for name in ("output_attentions", "output_hidden_states"):
            if getattr(generation_config, name, False):
                raise ValueError(
                    f"`{name}=True` is not supported with a JetSpec head (batch size {input_ids.shape[0]}): the "
                    "target's forwards run over trees, not one position per step. `output_scores`/`output_logits` "
                    "are supported; drop `assistant_model` for attentions or hidden states."
                )
    attn = model.config._attn_implementation
    if attn not in BATCH_MASK_ATTENTION:
        raise ValueError(
            f"Batched JetSpec decoding verifies per-row trees with a dense 4D mask, which attn_implementation={attn!r} "
            f"cannot take. Load the target with attn_implementation='sdpa' (or one of {BATCH_MASK_ATTENTION})."
        )
    batch_indexed = [type(p).__name__ for p in logits_processor if type(p).__name__ in BATCH_INDEXED_PROCESSORS]
    if batch_indexed:
        raise ValueError(
            f"{batch_indexed[0]} is not supported by batched JetSpec decoding (it keeps state across steps or runs "
            "the model on a batch of its own, while each row is processed at its own pace): call generate() per "
            "prompt."
        )
    mask = left_padding_mask(model_kwargs.get("attention_mask"), input_ids)
    head.bind(model)
    return cache, mask


def row_processor(processor, row: int):
    """`processor` as it acts on batch row `row` when called with that row's `(1, length)` sequence alone: a copy
    holding the row's entry where it keeps one per batch row (the repetition penalty's `prompt_ignore_length`, the
    encoder-side penalty's and n-gram block's prompt ids), or calling `prefix_allowed_tokens_fn` with the row's own
    batch id; else the processor itself."""
    if isinstance(processor, RepetitionPenaltyLogitsProcessor) and isinstance(processor.prompt_ignore_length,
                                                                                torch.Tensor):
        row_copy = copy.copy(processor)
        row_copy.prompt_ignore_length = processor.prompt_ignore_length[row : row + 1]
    elif isinstance(processor, EncoderRepetitionPenaltyLogitsProcessor):
        row_copy = copy.copy(processor)
        row_copy.encoder_input_ids = processor.encoder_input_ids[row : row + 1]
    elif isinstance(processor, EncoderNoRepeatNGramLogitsProcessor):
        row_copy = copy.copy(processor)
        row_copy.batch_size, row_copy.generated_ngrams = 1, [processor.generated_ngrams[row]]
    elif isinstance(processor, PrefixConstrainedLogitsProcessor):
        if processor._num_beams != 1:
            raise ValueError("Batched JetSpec decoding runs one sequence per prompt (num_beams=1).")
        allowed = processor._prefix_allowed_tokens_fn
        row_copy = copy.copy(processor)
        row_copy._prefix_allowed_tokens_fn = lambda batch_id, sentence: allowed(row, sentence)
    else:
        return processor
    return row_copy


def row_logits_processors(logits_processor: LogitsProcessorList, batch_size: int) -> list[LogitsProcessorList]:
    """One processor list per row, each called with that row's `(1, length)` sequence (see [`row_processor`])."""
    return [LogitsProcessorList(row_processor(processor, row) for processor in logits_processor)
            for row in range(batch_size)]


class PlainStepTimer(StoppingCriteria):
    """Never stops anything; notes when each step of Transformers' decoding loop ends, so that the median step (host
    work included, the prefill left out) can be compared with speculation next time."""

    def __init__(self):
        self.times: list[float] = []

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    def step_seconds(self) -> float | None:
        steps = [later - earlier for earlier, later in zip(self.times, self.times[1:])]
        return statistics.median(steps) if len(steps) >= 4 else None


def _plain_decoding(model, input_ids, logits_processor, stopping_criteria, generation_config, synced_gpus, streamer,
                    head, stats, **model_kwargs):
    """Transformers' own decoding for the whole call (speculation would be slower at this batch size); its step time
    is recorded in the head's `AcceptanceHistory` for the next plan at this batch size."""
    stats.speculated = False
    head.last_generate_stats = stats
    timer = PlainStepTimer()
    output = model._sample(input_ids, logits_processor=logits_processor,
                           stopping_criteria=StoppingCriteriaList([*stopping_criteria, timer]),
                           generation_config=generation_config, synced_gpus=synced_gpus, streamer=streamer, **model_kwargs)
    step = timer.step_seconds()
    if step is not None:
        acceptance_history(model, head).observe_plain_step(input_ids.shape[0], step)
    return output


def batch_tree_inputs(
    trees: list[DraftTree],
    root_position_ids: torch.LongTensor,
    key_valid: torch.BoolTensor,
    pad_token_id: int,
    dtype: torch.dtype,
    config=None,
) -> tuple[torch.LongTensor, torch.LongTensor, torch.Tensor | dict[str, torch.Tensor]]:
    """Inputs of one batched verify forward, trees padded to the largest.

    Args:
        trees (`list[DraftTree]`): one per row.
        root_position_ids (`torch.LongTensor` of shape `(batch,)`): each root's position.
        key_valid (`torch.BoolTensor` of shape `(batch, cache_length)`): cache slots each row may attend to.
        pad_token_id (`int`): token of padding nodes.
        dtype (`torch.dtype`): dtype of the additive mask.
        config (`PretrainedConfig`, *optional*): the target's config; with sliding-window layers the mask is a dict
            per layer type, the window applied (see `masks.py`; a row's valid slots hold its positions in order).

    Returns:
        `(input_ids (batch, n), position_ids (batch, n), attention_mask (batch, 1, n, cache_length + n))`: a node sees
        its row's valid cache slots, itself and its ancestors; a padding node sees only itself.
    """
    device = key_valid.device
    rows, width = len(trees), max(tree.num_nodes for tree in trees)
    tokens = torch.full((rows, width), pad_token_id, dtype=torch.long, device=device)
    depths = torch.zeros(rows, width, dtype=torch.long, device=device)
    ancestors = torch.eye(width, dtype=torch.bool, device=device).repeat(rows, 1, 1)
    for row, tree in enumerate(trees):
        size = tree.num_nodes
        tokens[row, :size] = tree.tokens
        depths[row, :size] = tree.depths
        ancestors[row, :size, :size] = tree.ancestor_mask
    allowed = torch.cat([key_valid[:, None, :].expand(-1, width, -1), ancestors], dim=-1)
    positions = root_position_ids[:, None] + depths
    if config is None or sliding_window(config) is None:
        return tokens, positions, additive_mask(allowed, dtype)
    key_positions = torch.cat([key_valid.long().cumsum(-1) - 1, positions], dim=-1)
    return tokens, positions, verify_attention_mask(config, allowed, positions, key_positions, dtype)


def projection_rows(
    trees: list[DraftTree],
    waiting: list[int],
    nodes: list[int],
    done: list[dict[int, torch.Tensor]],
    projection: ProjectionCost | None,
) -> list[tuple[int, int]]:
    """The `(row, node)` pairs whose target logits the next lm_head call computes: each waiting row's main chain from
    its current node (logits not in `done[row]`), then, up to [`ProjectionCost.padded_rows`] of that (`projection=None`:
    up to `ARGMAX_MAX_ROWS`), the other nodes below the waiting rows' current nodes, likeliest first (highest
    `tree.scores`, else the tree's order)."""
    wanted = [(i, node) for i in waiting for node in trees[i].main_chain(nodes[i]) if node not in done[i]]
    room = (ARGMAX_MAX_ROWS if projection is None else projection.padded_rows(len(wanted))) - len(wanted)
    if room > 0:
        chosen = set(wanted)
        extra = [
            (i, node)
            for i in waiting
            for node in trees[i].ancestor_mask[:, nodes[i]].nonzero().flatten().tolist()  # the current node's subtree
            if node not in done[i] and (i, node) not in chosen
        ]
        extra.sort(key=lambda pair: -trees[pair[0]].scores[pair[1]] if trees[pair[0]].scores is not None else pair[1])
        wanted += extra[:room]
    return wanted


@torch.no_grad()
def batched_jetspec_decoding(
    model,
    input_ids: torch.LongTensor,
    logits_processor,
    stopping_criteria,
    generation_config,
    synced_gpus: bool = False,
    streamer=None,
    assistant_model: JetSpecHead | None = None,
    tree_settings: TreeSettings | None = None,
    **model_kwargs,
) -> GenerateDecoderOnlyOutput | torch.LongTensor:
    """Tree speculative decoding for a left-padded batch (called by [`jetspec_decoding`] for batch size > 1 or a
    padded prompt; same arguments as `_assisted_decoding`).

    With `return_dict_in_generate=True` the output holds `sequences` and, where asked, per-step `scores`/`logits`
    (see [`step_tensors`]); not the target cache, which has per-row gaps (`past_key_values=None`).
    """
    head = assistant_model
    settings = tree_settings or TreeSettings.from_config(head.generation_config)  # this call's tree settings
    cache, prompt_mask = _validate_batch(model, input_ids, logits_processor, generation_config, head, model_kwargs)
    start = time.perf_counter()
    device = input_ids.device
    batch, prompt_length = input_ids.shape
    budget = settings.tree_budget
    topk = settings.tree_topk
    block = head.config.block_size
    stats = JetSpecBatchStats(tree_budget=budget, tree_topk=topk, batch_size=batch)
    history = acceptance_history(model, head)

    # Plan: fixed trees, or sized for this batch by the measured cost model -- or no speculation at all.
    round_budget = None
    if budget == "auto":
        cost = measure_batch_cost(model, head, batch)
        plan = plan_batch(cost, history, block, settings.tree_max_budget)
        if plan.speculate:
            host = history.host_seconds_per_row or 0.0
            verify = cost.verify_seconds(batch, plan.max_nodes)
            fixed = round_seconds(cost, batch, plan.max_nodes, plan.depth, host) - verify
            round_budget = BatchRoundBudget(cost, plan.max_nodes, fixed, initial_draft=cost.draft(plan.depth),
                                            profile=acceptance_profile(model, head))
    else:
        plan = BatchPlan(speculate=budget > 1 and block > 1, max_nodes=budget, depth=min(block - 1, budget - 1))
    stats.max_nodes, stats.expected_speedup = plan.max_nodes, plan.expected_speedup
    if not plan.speculate:
        return _plain_decoding(model, input_ids, logits_processor, stopping_criteria, generation_config, synced_gpus,
                               streamer, head, stats, **model_kwargs)

    decoder = getattr(model, model.base_model_prefix)
    # verify forwards on packed weights where measured faster, within the head's memory cap for them
    packed = packed_linears_for(decoder, settings.packed_memory_cap)
    lm_head = target_logits_for(model)  # the lm_head + the family's own logit transform, if any
    projection = measure_projection(model)
    target_layer_ids = head.config.target_layer_ids
    hidden_state_ids = [i + 1 for i in target_layer_ids]
    do_sample = bool(generation_config.do_sample)
    pad_token_id = generation_config._pad_token_tensor
    pad_token_id = int(pad_token_id) if pad_token_id is not None else None
    eos_padding = any(hasattr(criteria, "eos_token_id") for criteria in stopping_criteria)
    max_length = stopping_criteria.max_length or generation_config.max_length

    # Per original row: the sequence buffer (prompt with its padding + new tokens), its length, the step it finished.
    sequences = torch.full((batch, max_length), pad_token_id or 0, dtype=torch.long, device=device)
    sequences[:, :prompt_length] = input_ids
    lengths = [prompt_length] * batch
    finished_at: list[int | None] = [None] * batch
    processors = row_logits_processors(logits_processor, batch)
    # greedy rows without logits processors need only the argmax: a bf16 pass + an fp32 recheck where it is faster
    return_dict = generation_config.return_dict_in_generate
    emitted_scores = [[] for _ in range(batch)] if return_dict and generation_config.output_scores else None
    emitted_logits = [[] for _ in range(batch)] if return_dict and generation_config.output_logits else None
    argmax = None  # (returned scores or logits need every emitted token's whole row)
    if not (do_sample or len(logits_processor) or emitted_scores or emitted_logits) and lm_head.plain:
        argmax = exact_argmax_for(model)
    # Per row: prompt-lookup proposals over its own tokens (padding left out), scored in the head's shared profile.
    lookup_tokens = settings.prompt_lookup_num_tokens
    left_padding = (prompt_length - prompt_mask.sum(-1)).tolist()
    lookups = [
        PromptLookupDraft(
            lookup_tokens, settings.max_matching_ngram_size,
            eos_token_id=getattr(generation_config, "_eos_token_tensor", None), max_length=max_length - left_padding[row],
            profile=None if round_budget is None else round_budget.profile.lookup,
        )
        for row in range(batch)
    ] if lookup_tokens else None

    def emit(row: int, logits: torch.Tensor | int, draft_tokens: list[int]) -> tuple[int, bool]:
        """Appends the target's token for `row` from its logits at the current node (or the token itself, from
        [`ExactArgmax`]); returns (token, stop)."""
        length = lengths[row]
        if isinstance(logits, int):
            token = logits
        else:
            scores = logits.to(dtype=torch.float32, device=device, copy=True)[None]
            if emitted_logits is not None:
                emitted_logits[row].append(scores[0].clone())
            if len(processors[row]):
                scores = processors[row](sequences[row : row + 1, :length], scores)
            if emitted_scores is not None:
                emitted_scores[row].append(scores[0])
            token = int(accept.choose_token(scores, do_sample, draft_tokens))
        sequences[row, length] = token
        lengths[row] = length + 1
        if finished_at[row] is None and bool(stopping_criteria(sequences[row : row + 1, : length + 1], None).any()):
            finished_at[row] = length + 1 - prompt_length
        return token, lengths[row] >= max_length or (finished_at[row] is not None and eos_padding)

    streamed = 0  # output columns already given to the streamer

    def stream_ready() -> None:
        """Puts each output column whose every row is final: a token the row emitted, or padding after its EOS-type
        stop; and only while some row is still running past it (else the column lies beyond the output)."""
        nonlocal streamed
        while True:
            step = streamed
            if not all(lengths[row] - prompt_length > step or (eos_padding and finished_at[row] is not None
                                                               and finished_at[row] <= step) for row in range(batch)):
                return
            if not any(finished_at[row] is None or finished_at[row] > step for row in range(batch)):
                return
            column = sequences[:, prompt_length + step].clone()
            if eos_padding:
                for row in range(batch):
                    if finished_at[row] is not None and finished_at[row] <= step:
                        column[row] = pad_token_id or 0
            streamer.put(column.cpu())
            streamed += 1

    def still_running(row: int) -> bool:
        if lengths[row] >= max_length:
            return False
        if finished_at[row] is None:
            return True
        if eos_padding:
            return False
        # A finished row keeps the target's own tokens until the last row finishes (Transformers pads only for EOS).
        finished = [step for step in finished_at if step is not None]
        return len(finished) < batch or lengths[row] - prompt_length < max(finished)

    # 0. Prefill: every prompt as Transformers would (2D padding mask, positions counting real tokens only).
    positions = (prompt_mask.cumsum(-1) - 1).masked_fill(prompt_mask == 0, 0)
    outputs = decoder(
        input_ids=input_ids,
        attention_mask=None if bool(prompt_mask.all()) else prompt_mask,
        position_ids=positions,
        use_cache=True,
        output_hidden_states=hidden_state_ids,
        **{cache_kwarg(decoder.forward): cache},
    )
    first_logits = lm_head(outputs.last_hidden_state[:, -1])
    for row in range(batch):
        emit(row, first_logits[row], [])
    if streamer is not None:
        stream_ready()
    drafter = BatchedDrafter(head, batch, topk)
    drafter.add_context(tap_features(outputs.hidden_states, target_layer_ids), positions, prompt_mask.bool())
    key_valid = prompt_mask.bool()
    root_positions = prompt_mask.sum(-1)  # the root (last committed token) sits after the real prompt tokens
    active = list(range(batch))
    rounds_not_paying, skip, backoff, probing = 0, 0, DRAFT_BACKOFF, False
    # plain decoding's measured step here: speculation that falls behind it gives up for the rest of the call
    plain_step = history.plain_step_seconds.get(batch) if round_budget is not None else None
    recent: collections.deque = collections.deque(maxlen=GUARD_ROUNDS)  # (tokens, seconds) of the last rounds
    stats.time_prefill = time.perf_counter() - start  # (the plan and its first-time cost measurements included)
    decode_start = time.perf_counter()

    while True:
        # Rows that are done leave the batch (their cache rows, key masks, head context and root positions).
        keep = [i for i, row in enumerate(active) if still_running(row)]
        if not keep:
            break
        if len(keep) < len(active):
            index = torch.tensor(keep, device=device)
            cache.batch_select_indices(index)
            drafter.select_rows(index)
            key_valid, root_positions = key_valid[index], root_positions[index]
            active = [active[i] for i in keep]
        gap = key_valid.shape[1] - int(key_valid.sum(1).max())
        if gap and gap >= max(COMPACT_MIN_GAP, COMPACT_MIN_FRACTION * key_valid.shape[1]):  # squeeze out the gaps
            key_valid = compact_cache_rows(cache, key_valid)
        drafter.compact(COMPACT_MIN_GAP, COMPACT_MIN_FRACTION)
        rows = len(active)
        roots = torch.tensor([int(sequences[row, lengths[row] - 1]) for row in active], device=device)

        # 1. Draft a tree per row, take each row's prompt-lookup proposal, then pick this round's common width from
        #    the trees' scores, the proposals' measured odds and the costs (a fixed budget merges whole proposals).
        t0 = time.perf_counter()
        chains = probabilities = None
        if lookups is not None:
            proposals = [lookups[row].propose(sequences[row : row + 1, left_padding[row] : lengths[row]]) for row in active]
            chains, probabilities = [chain for chain, _ in proposals], [odds for _, odds in proposals]
        t_draft = time.perf_counter()
        drafting = skip == 0
        if drafting:
            trees = drafter.draft(roots, root_positions, plan.max_nodes, plan.depth)
        else:
            empty = torch.zeros(0, 1, device=device)
            trees = [build_tree(int(root), empty, 1, 1) for root in roots.tolist()]
        draft_seconds = time.perf_counter() - t_draft
        if round_budget is not None:
            trees = round_budget.choose_trees(trees, chains, probabilities, drafted=drafting)
            if not drafting:
                skip -= 1
            elif round_budget.drafting_pays:
                rounds_not_paying, backoff, probing = 0, DRAFT_BACKOFF, False
            else:
                rounds_not_paying += 1
                if rounds_not_paying >= (1 if probing else DRAFT_PATIENCE):  # the drafts do not pay now: pause the head
                    skip, rounds_not_paying, backoff = backoff, 0, min(2 * backoff, MAX_DRAFT_BACKOFF)
                    probing = True
                    if stats.drafting_stopped_at is None:
                        stats.drafting_stopped_at = stats.rounds
        elif chains is not None:
            trees = [merge_chain(tree, chain, odds) for tree, chain, odds in zip(trees, chains, probabilities)]

        # 2. Verify every row's tree in one target forward.
        t1 = time.perf_counter()
        past_length = cache.get_seq_length()
        tree_ids, tree_positions, tree_mask = batch_tree_inputs(
            trees, root_positions, key_valid, pad_token_id or 0, model.dtype, model.config
        )
        outputs = verify_forward(decoder, packed, input_ids=tree_ids, position_ids=tree_positions,
                                          attention_mask=tree_mask, output_hidden_states=hidden_state_ids,
                                          **{cache_kwarg(decoder.forward): cache})
        node_hidden = outputs.last_hidden_state

        # 3. Accept, row by row: follow the target's own token while a child carries it. Greedy without processors:
        #    `ExactArgmax` over every node the waiting rows may reach, in one call. Else the lm_head runs over every
        #    waiting row's main chain at once, padded to the cheapest measured row count with the likeliest other
        #    nodes (see `projection.py`). Again only where a row's path leaves the rows computed.
        t2 = time.perf_counter()
        lm_head_seconds = 0.0
        nodes = [0] * rows
        accepted: list[list[int]] = [[] for _ in range(rows)]
        node_logits: list[dict[int, torch.Tensor]] = [{} for _ in range(rows)]
        waiting = list(range(rows))
        while waiting:
            t_lm = time.perf_counter()
            wanted = projection_rows(trees, waiting, nodes, node_logits, None) if argmax is not None else []
            if len(wanted) > ARGMAX_MIN_ROWS:  # flat in the rows: every node the waiting rows may reach, in one call
                logits = argmax(node_hidden[torch.tensor([i for i, _ in wanted], device=device),
                                            torch.tensor([node for _, node in wanted], device=device)]).tolist()
            else:
                wanted = projection_rows(trees, waiting, nodes, node_logits, projection)
                repeats = [wanted[-1]] * (projection.padded_rows(len(wanted)) - len(wanted))  # to the cheaper count
                logits = lm_head(node_hidden[torch.tensor([i for i, _ in wanted + repeats], device=device),
                                             torch.tensor([node for _, node in wanted + repeats], device=device)])
            lm_head_seconds += time.perf_counter() - t_lm
            for (i, node), row_logits in zip(wanted, logits):
                node_logits[i][node] = row_logits
            still = []
            for i in waiting:
                while True:
                    node = nodes[i]
                    if node not in node_logits[i]:
                        still.append(i)
                        break
                    token, stop = emit(active[i], node_logits[i][node], trees[i].child_tokens(node))
                    child = trees[i].child_with_token(node, token)
                    if stop or child is None:
                        break
                    accepted[i].append(child)
                    nodes[i] = child
            waiting = still

        # 4. Keep each row's root + accepted nodes in the cache (the rest of its slots invalid); their tap features
        #    become the rows' next context.
        t3 = time.perf_counter()
        kept = [1 + len(path) for path in accepted]
        index = torch.zeros(rows, max(kept), dtype=torch.long, device=device)
        for i, path in enumerate(accepted):
            index[i, 1 : kept[i]] = torch.tensor(path, dtype=torch.long)
        keep_tree_slots(cache, past_length, index)
        new_valid = torch.arange(index.shape[1], device=device)[None] < torch.tensor(kept, device=device)[:, None]
        key_valid = torch.cat([key_valid, new_valid], dim=1)
        if stats.gave_up_at is None:  # the head's context is kept while it pauses, too
            taps = tap_features(outputs.hidden_states, target_layer_ids)
            features = taps.gather(1, index[..., None].expand(-1, -1, taps.shape[-1]))
            drafter.add_context(features, root_positions[:, None] + torch.arange(index.shape[1], device=device),
                                new_valid)
        root_positions = root_positions + torch.tensor(kept, device=device)

        t4 = time.perf_counter()
        if round_budget is not None and drafting:
            round_budget.observe(trees, accepted, round_seconds=t4 - t0,
                                 verify_seconds=t2 - t1, draft_seconds=draft_seconds)
        if plain_step is not None and stats.gave_up_at is None:
            recent.append((rows + sum(len(path) for path in accepted), t4 - t0))
            tokens, seconds = map(sum, zip(*recent))
            if len(recent) == GUARD_ROUNDS and seconds / tokens > GUARD_MARGIN * plain_step / batch:
                # the last rounds made tokens slower than plain decoding does: verify the roots alone from now on
                skip, lookups, stats.gave_up_at = max_length, None, stats.rounds + 1
        for tree, path in zip(trees, accepted):
            history.observe(tree.num_nodes, path)
            stats.count_lookup(tree, path)
        history.observe_host(max(t4 - t0 - (t2 - t1) - draft_seconds - lm_head_seconds, 0.0) / rows)
        stats.rounds += 1
        stats.undrafted_rounds += not drafting
        stats.row_rounds += rows
        stats.tree_sizes.append(max(tree.num_nodes for tree in trees))
        stats.drafted_nodes += sum(tree.num_nodes - 1 for tree in trees)
        stats.accepted_drafts += sum(len(path) for path in accepted)
        stats.time_draft += t1 - t0
        stats.time_verify += t2 - t1
        stats.time_accept += t3 - t2
        stats.time_cache += t4 - t3
        if streamer is not None:
            stream_ready()

    decode_end = time.perf_counter()
    # Output: each row's tokens up to the step it finished, then pad_token_id (EOS-type criteria) or its own tokens
    # (others), up to the step the last row finished -- what plain generate() returns.
    for row in range(batch):  # a row stopped at max_length by a criteria list without MaxLengthCriteria
        if finished_at[row] is None:
            finished_at[row] = lengths[row] - prompt_length
    steps = max(finished_at)
    output = torch.full((batch, prompt_length + steps), pad_token_id or 0, dtype=torch.long, device=device)
    output[:, :prompt_length] = input_ids
    for row in range(batch):
        count = min(finished_at[row], steps) if eos_padding else steps
        output[row, prompt_length : prompt_length + count] = sequences[row, prompt_length : prompt_length + count]
        stats.new_tokens += count
    if streamer is not None:  # the columns no round could stream yet (rows stopped at max_length, the last rounds)
        for step in range(streamed, steps):
            streamer.put(output[:, prompt_length + step].cpu())
        streamer.end()
    stats.time_total = time.perf_counter() - start
    head.last_generate_stats = stats
    later_tokens = stats.new_tokens - batch  # the first token of every row came with the prefill
    if round_budget is not None and later_tokens >= 4 * batch:  # for the next plan at this batch size
        history.observe_spec_call(batch, (decode_end - decode_start) / later_tokens)
    if return_dict:
        return GenerateDecoderOnlyOutput(sequences=output, scores=step_tensors(emitted_scores, output, prompt_length),
                                         logits=step_tensors(emitted_logits, output, prompt_length))
    return output


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
