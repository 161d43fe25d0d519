"""The JetSpec decode loop, for one prompt or a left-padded batch: one prompt is a batch of one row.

`generate(assistant_model=head)` lands here (see `integration.py`). After the prefill, every round runs five steps,
each in its own module, data flowing one way:

1. draft (`drafting.py`): one head forward drafts a best-first tree per row, each row's prompt-lookup proposal joins
   its tree, and the call's plan (`planning.py`) cuts the trees to the width that pays;
2. verify (`verify.py`): one target forward over every row's tree (trees padded to a common size);
3. accept (`accept.py`): each row follows the target's own token from its root while a child carries it;
4. cache (`kv_cache.py`): each row keeps its root and accepted nodes; their tap features become the head's context;
5. emit (`outputs.py`): tokens, stopping criteria, streaming, and what the call returns.

Invariant: the target cache holds every committed token of a row except the last one, which is its next tree's root.
Rows accept different numbers of tokens: each keeps `max_accepted + 1` new slots, its own first and the rest marked
invalid in a per-row key mask (RoPE comes from `position_ids`, so gaps are harmless), squeezed out now and then. Rows
leave the batch when they finish. With `tree_budget="auto"` a measured cost model sizes the trees, and when
speculation would not beat plain decoding the call runs Transformers' own decoding instead.
"""

from __future__ import annotations

import statistics
import time

import torch
from transformers import DynamicCache
from transformers.generation.stopping_criteria import StoppingCriteria, StoppingCriteriaList
from transformers.generation.utils import GenerateDecoderOnlyOutput

from .accept import accept_round
from .acceptance import acceptance_history
from .compat import cache_kwarg
from .drafting import RoundDrafts
from .exact_argmax import exact_argmax_for
from .inputs import validate_call
from .kv_cache import LeavingRows, keep_accepted, squeeze_gaps
from .modeling_jetspec import JetSpecHead
from .outputs import RowOutputs
from .packed_linear import packed_linears_for
from .planning import SpeedGuard, plan_call
from .projection import measure_projection
from .settings import TreeSettings
from .stats import JetSpecGenerateStats
from .target_logits import target_logits_for
from .verify import tap_features, verify_round

# Invalid cache slots (per-row gaps) are squeezed out once there are this many per row and this share of the cache.
COMPACT_MIN_GAP = 16
COMPACT_MIN_FRACTION = 0.25


@torch.no_grad()
def jetspec_decoding(
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
    """Tree speculative decoding with a [`JetSpecHead`] (called by `generate()`; same arguments as
    `_assisted_decoding`, plus this call's [`TreeSettings`], by default the head's).

    With `return_dict_in_generate=True` the output holds `sequences`, per-step `scores`/`logits` where asked, and the
    target cache as plain generate() returns it (a batch's rebuilt from each row's committed slots, see
    [`LeavingRows`]).
    """
    head = assistant_model
    settings = tree_settings or TreeSettings.from_config(head.generation_config)
    cache, prompt_mask = validate_call(model, input_ids, logits_processor, generation_config, head, model_kwargs)
    start = time.perf_counter()
    batch = input_ids.shape[0]
    stats = JetSpecGenerateStats(tree_budget=settings.tree_budget, tree_topk=settings.tree_topk, batch_size=batch)
    history = acceptance_history(model, head)
    plan, round_budget = plan_call(model, head, settings, batch, history)
    stats.max_nodes, stats.expected_speedup = plan.max_nodes, plan.expected_speedup
    if not plan.speculate:
        return plain_decoding(model, input_ids, logits_processor, stopping_criteria, generation_config, synced_gpus,
                              streamer, head, stats, **model_kwargs)
    decoder = getattr(model, model.base_model_prefix)
    packed = packed_linears_for(decoder, settings.packed_memory_cap)  # verify on packed weights where measured faster
    lm_head = target_logits_for(model)  # the lm_head + the family's own logit transform, if any
    projection = measure_projection(model)
    target_layer_ids = head.config.target_layer_ids
    hidden_state_ids = [i + 1 for i in target_layer_ids]
    rows = RowOutputs(input_ids, logits_processor, stopping_criteria, generation_config, streamer)
    # greedy without processors or returned scores needs only the argmax: a bf16 pass + an fp32 recheck where faster
    argmax = exact_argmax_for(model) if not rows.needs_whole_rows and lm_head.plain else None
    drafts = RoundDrafts(head, batch, settings, plan, round_budget,
                         eos_token_id=getattr(generation_config, "_eos_token_tensor", None),
                         max_length=rows.max_length, left_padding=(input_ids.shape[1] - prompt_mask.sum(-1)).tolist())
    context, last_hidden = prefill(decoder, input_ids, prompt_mask, cache, hidden_state_ids, target_layer_ids)
    rows.emit_first(lm_head(last_hidden))
    for taps, taps_positions, valid in context:
        drafts.drafter.add_context(taps, taps_positions, valid)
    key_valid = prompt_mask.bool()
    root_positions = prompt_mask.sum(-1)  # the root (last committed token) sits after the real prompt tokens
    active = list(range(batch))
    # a batch's cache loses finished rows and has per-row gaps: each row's part is kept as it leaves, for the output
    padded = batch > 1 or not bool(prompt_mask.all())
    leaving = LeavingRows(batch) if padded and generation_config.return_dict_in_generate else None
    # a batch's speculation that falls behind plain decoding's measured step gives up for the rest of the call; one
    # row leaves it to the head's pauses, its proposals going on (they often pay where its drafts do not)
    guard = SpeedGuard(history.plain_step_seconds.get(batch) if round_budget is not None and batch > 1 else None, batch)
    stats.time_prefill = time.perf_counter() - start  # (the plan and its first-time cost measurements included)
    decode_start = time.perf_counter()

    while True:
        # Rows that are done leave the batch (their cache rows, key masks, head context and root positions).
        keep = [i for i, row in enumerate(active) if rows.still_running(row)]
        if leaving is not None and len(keep) < len(active):
            leaving.keep(cache, key_valid, active, keep)
        if not keep:
            break
        if len(keep) < len(active):
            index = torch.tensor(keep, device=input_ids.device)
            cache.batch_select_indices(index)
            drafts.drafter.select_rows(index)
            key_valid, root_positions = key_valid[index], root_positions[index]
            active = [active[i] for i in keep]
        key_valid = squeeze_gaps(cache, key_valid, COMPACT_MIN_GAP, COMPACT_MIN_FRACTION)
        drafts.drafter.compact(COMPACT_MIN_GAP, COMPACT_MIN_FRACTION)

        t0 = time.perf_counter()  # 1. draft
        trees, drafting = drafts.trees(active, rows.sequences, rows.lengths, root_positions)
        t1 = time.perf_counter()  # 2. verify
        past_length = cache.get_seq_length()
        outputs = verify_round(decoder, trees, root_positions, key_valid, cache, hidden_state_ids, model.dtype, packed,
                               rows.pad_token_id)
        t2 = time.perf_counter()  # 3. accept
        accepted, lm_head_seconds = accept_round(
            trees, outputs.last_hidden_state, lambda i, logits, children: rows.emit(active[i], logits, children),
            lm_head, projection, argmax,
        )
        t3 = time.perf_counter()  # 4. cache: roots + accepted nodes kept; their taps are the head's next context
        index, new_valid = keep_accepted(cache, past_length, accepted)
        key_valid = torch.cat([key_valid, new_valid], dim=1)
        if stats.gave_up_at is None:  # the head's context is kept while it pauses, too
            taps = tap_features(outputs.hidden_states, target_layer_ids)
            features = taps.gather(1, index[..., None].expand(-1, -1, taps.shape[-1]))
            drafts.drafter.add_context(features, root_positions[:, None] + torch.arange(index.shape[1],
                                                                                        device=index.device), new_valid)
        root_positions = root_positions + new_valid.sum(-1)
        t4 = time.perf_counter()

        if round_budget is not None:
            round_budget.observe(trees, accepted, round_seconds=t4 - t0, verify_seconds=t2 - t1,
                                 draft_seconds=drafts.draft_seconds, drafted=drafting)
        if stats.gave_up_at is None and guard.too_slow(len(active) + sum(map(len, accepted)), t4 - t0):
            drafts.give_up()  # the last rounds made tokens slower than plain decoding: verify the roots alone
            stats.gave_up_at = stats.rounds + 1
        for tree, path in zip(trees, accepted):
            history.observe(tree.num_nodes, path)
        history.observe_host(max(t4 - t0 - (t2 - t1) - drafts.draft_seconds - lm_head_seconds, 0.0) / len(active))
        stats.count_round(trees, accepted, drafting, t1 - t0, t2 - t1, t3 - t2, t4 - t3)
        rows.stream_ready()

    decode_end = time.perf_counter()
    output, stats.new_tokens = rows.output()
    stats.drafting_stopped_at = drafts.stopped_at
    stats.time_total = time.perf_counter() - start
    head.last_generate_stats = stats
    later_tokens = stats.new_tokens - batch  # the first token of every row came with the prefill
    if round_budget is not None and later_tokens >= 4 * batch:  # for the next plan at this batch size
        history.observe_spec_call(batch, (decode_end - decode_start) / later_tokens)
    if leaving is not None:
        cache = leaving.returned_cache(cache, decoder, output, prompt_mask, rows.lengths)
    return rows.call_output(output, cache) if generation_config.return_dict_in_generate else output


def prefill(decoder, input_ids, prompt_mask, cache, hidden_state_ids, target_layer_ids):
    """The prompts' forward, as Transformers runs it (2D padding mask, positions counting real tokens only). A second
    turn of one prompt passes the first turn's cache: the target then reads only the new tokens, as plain generate()
    does, and the head's context for the cached part comes from a forward over it into a throwaway cache (drafts
    only: every emitted token still comes from the target's forward on the user's cache).

    Returns `(context, last_hidden)`: `(taps, positions, valid)` chunks for the head's context (the cached part's
    first, where there is one), and each row's last hidden state (the first token's logits come from it).
    """
    positions = (prompt_mask.cumsum(-1) - 1).masked_fill(prompt_mask == 0, 0)
    valid = prompt_mask.bool()
    cached = cache.get_seq_length()
    context = []
    cache_key = cache_kwarg(decoder.forward)
    if cached:
        earlier = decoder(input_ids=input_ids[:, :cached], position_ids=positions[:, :cached], use_cache=True,
                          **{cache_key: DynamicCache()}, output_hidden_states=hidden_state_ids)
        context.append((tap_features(earlier.hidden_states, target_layer_ids), positions[:, :cached], valid[:, :cached]))
    outputs = decoder(
        input_ids=input_ids[:, cached:],
        attention_mask=None if bool(valid.all()) else prompt_mask,
        position_ids=positions[:, cached:],
        use_cache=True,
        output_hidden_states=hidden_state_ids,
        **{cache_key: cache},
    )
    context.append((tap_features(outputs.hidden_states, target_layer_ids), positions[:, cached:], valid[:, cached:]))
    return context, outputs.last_hidden_state[:, -1]


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


def plain_decoding(model, input_ids, logits_processor, stopping_criteria, generation_config, synced_gpus, streamer,
                   head, stats, **model_kwargs):
    """Transformers' own decoding for the whole call (speculation would be slower at this batch size); its step time
    is recorded in the head's `AcceptanceHistory` for the next plan at this batch size."""
    stats.speculated = False
    head.last_generate_stats = stats
    timer = PlainStepTimer()
    output = model._sample(input_ids, logits_processor=logits_processor,
                           stopping_criteria=StoppingCriteriaList([*stopping_criteria, timer]),
                           generation_config=generation_config, synced_gpus=synced_gpus, streamer=streamer, **model_kwargs)
    sequences = output if isinstance(output, torch.Tensor) else output.sequences
    stats.new_tokens = sequences[:, input_ids.shape[1]:].numel()  # (a batch's padding after EOS included)
    step = timer.step_seconds()
    if step is not None:
        acceptance_history(model, head).observe_plain_step(input_ids.shape[0], step)
    return output
