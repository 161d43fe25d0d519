"""The JetSpec decode loop: draft a tree, verify it in one target forward, accept, compact the cache, emit.

`generate(assistant_model=head)` lands here (see `integration.py`). Batch size 1 runs this loop (a batch or a padded
prompt goes to `batched.py`). The loop keeps one invariant: the target cache holds every committed token except the
last one, which is the next tree's root.
"""

from __future__ import annotations

import time

import torch
from transformers import DynamicCache
from transformers.generation.utils import GenerateDecoderOnlyOutput

from . import accept
from .accept import ARGMAX_ROWS, lm_head_chunk, rows_to_project
from .acceptance import acceptance_profile
from .batched import batched_jetspec_decoding
from .budget import AutoBudget, measure_verify_cost
from .candidate_generator import JetSpecCandidateGenerator
from .compat import OUTPUT_CACHE_FIELD, cache_kwarg
from .exact_argmax import exact_argmax_for
from .inputs import check_inputs, validate_single
from .kv_cache import compact_cache
from .lookup import PromptLookupDraft
from .modeling_jetspec import JetSpecHead
from .packed_linear import packed_linears_for
from .settings import TreeSettings
from .stats import JetSpecGenerateStats
from .target_logits import target_logits_for
from .verify import tap_features, verify_tree

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
    """Tree speculative decoding with a [`JetSpecHead`] (called by `generate()`; same arguments as `_assisted_decoding`,
    plus this call's [`TreeSettings`], by default the head's).

    A batch (or a padded prompt) goes to [`batched_jetspec_decoding`]; one unpadded prompt runs the loop below.
    """
    settings = tree_settings or TreeSettings.from_config(assistant_model.generation_config)
    check_inputs(model, input_ids, assistant_model, model_kwargs)
    attention_mask = model_kwargs.get("attention_mask")
    if input_ids.shape[0] != 1 or (attention_mask is not None and not bool(attention_mask.all())):
        return batched_jetspec_decoding(
            model, input_ids, logits_processor, stopping_criteria, generation_config, synced_gpus, streamer,
            assistant_model, tree_settings=settings, **model_kwargs,
        )
    head = assistant_model
    cache = validate_single(model, input_ids, generation_config, head, model_kwargs)
    start = time.perf_counter()
    budget = settings.tree_budget
    decoder = getattr(model, model.base_model_prefix)
    # verify forwards on packed weights where measured faster, within the head's memory cap for them
    packed = packed_linears_for(decoder, settings.packed_memory_cap)
    lm_head = target_logits_for(model)  # the lm_head + the family's own logit transform, if any
    hidden_state_ids = [i + 1 for i in head.config.target_layer_ids]
    auto_budget = None
    if budget == "auto":  # the verify cost vs tree size on this machine, measured once per process and model
        cost = measure_verify_cost(
            model, lambda tree, past, kv: verify_tree(decoder, tree, past, kv, hidden_state_ids, model.dtype, packed)
        )
        auto_budget = AutoBudget(cost, max_budget=settings.tree_max_budget, profile=acceptance_profile(model, head))
    prompt_lookup = None
    if settings.prompt_lookup_num_tokens:
        prompt_lookup = PromptLookupDraft(
            settings.prompt_lookup_num_tokens, settings.max_matching_ngram_size,
            eos_token_id=getattr(generation_config, "_eos_token_tensor", None), max_length=generation_config.max_length,
            profile=None if auto_budget is None else auto_budget.profile.lookup,
        )
    generator = JetSpecCandidateGenerator(
        head, tree_budget=budget, tree_topk=settings.tree_topk, auto_budget=auto_budget,
        prompt_lookup=prompt_lookup,
    )
    stats = JetSpecGenerateStats(tree_budget=budget, tree_topk=generator.tree_topk)
    return_dict = generation_config.return_dict_in_generate
    scores = () if return_dict and generation_config.output_scores else None
    raw_logits = () if return_dict and generation_config.output_logits else None

    do_sample = bool(generation_config.do_sample)
    chain_rows = lm_head_chunk(lm_head.weight.device)
    # greedy without logits processors or returned scores needs only each node's argmax: a bf16 pass + an fp32
    # recheck where that is faster (see `exact_argmax.py`), over every node likely to be reached, in one call
    argmax = None
    if not do_sample and not len(logits_processor) and scores is None and raw_logits is None and lm_head.plain:
        argmax = exact_argmax_for(model)

    def emit(token_logits: torch.Tensor | int, draft_tokens: list[int] = ()) -> tuple[int, bool]:
        """Processes one row of logits with the current path (or takes the token itself, from [`ExactArgmax`]),
        appends the target's token; returns (token, done)."""
        nonlocal input_ids, scores, raw_logits
        if isinstance(token_logits, int):
            token = torch.tensor([token_logits], device=input_ids.device)
        else:
            next_logits = token_logits.to(dtype=torch.float32, device=input_ids.device)[None]
            next_scores = logits_processor(input_ids, next_logits.clone())
            token = accept.choose_token(next_scores, do_sample, list(draft_tokens))
            if scores is not None:
                scores += (next_scores,)
            if raw_logits is not None:
                raw_logits += (next_logits,)
        input_ids = torch.cat([input_ids, token[:, None]], dim=-1)
        if streamer is not None:
            streamer.put(token.cpu())
        stats.new_tokens += 1
        return int(token), bool(stopping_criteria(input_ids, scores).all())

    # 0. Prefill: the whole prompt, its tap features become the head's first context. A second turn passes the
    # cache of the first (`past_key_values`): the target then reads only the new tokens, as plain generate() does,
    # and the head's context for the cached part comes from a forward over it into a throwaway cache (drafts only:
    # every emitted token still comes from the target's forward on the user's cache).
    prompt_length = input_ids.shape[1]
    cached = cache.get_seq_length()
    positions = torch.arange(prompt_length, device=input_ids.device)[None]
    if cached:
        earlier = decoder(input_ids=input_ids[:, :cached], position_ids=positions[:, :cached], use_cache=True,
                          **{cache_kwarg(decoder.forward): DynamicCache()}, output_hidden_states=hidden_state_ids)
        generator.add_context(tap_features(earlier.hidden_states, generator.target_layer_ids), positions[:, :cached])
    outputs = decoder(
        input_ids=input_ids[:, cached:],
        position_ids=positions[:, cached:],
        use_cache=True,
        **{cache_kwarg(decoder.forward): cache},
        output_hidden_states=hidden_state_ids,
    )
    generator.add_context(tap_features(outputs.hidden_states, generator.target_layer_ids), positions[:, cached:])
    _, done = emit(lm_head(outputs.last_hidden_state[0, -1]))
    stats.time_prefill = time.perf_counter() - start

    while not done:
        # 1. Draft a tree rooted at the last committed token.
        t0 = time.perf_counter()
        tree, _ = generator.get_candidates(input_ids)
        past_length = input_ids.shape[1] - 1

        # 2. Verify every node in one target forward (ancestor mask, tree positions).
        t1 = time.perf_counter()
        outputs = verify_tree(decoder, tree, past_length, cache, hidden_state_ids, model.dtype, packed)
        node_hidden = outputs.last_hidden_state[0]

        # 3. Accept: follow the target's own token from the root while a child carries it; the last one is the bonus.
        #    The lm_head runs over the node and the likeliest nodes below it, `chain_rows` rows at a time (one read
        #    of its weights for several rows; `ARGMAX_ROWS` with `ExactArgmax`), and again only where the target's
        #    path leaves those rows.
        t2 = time.perf_counter()
        node_logits: dict[int, torch.Tensor | int] = {}

        def logits_of(node: int) -> torch.Tensor | int:
            if node not in node_logits:
                if argmax is not None:
                    rows = rows_to_project(tree, node, node_logits, ARGMAX_ROWS)
                    node_logits.update(zip(rows, argmax(node_hidden[rows]).tolist()))
                else:
                    rows = rows_to_project(tree, node, node_logits, chain_rows)
                    node_logits.update(zip(rows, lm_head(node_hidden[rows])))
            return node_logits[node]

        node, accepted = 0, []
        while True:
            token, done = emit(logits_of(node), tree.child_tokens(node))
            child = tree.child_with_token(node, token)
            if done or child is None:
                break
            accepted.append(child)
            node = child

        # 4. Compact the cache to prefix + root + accepted nodes; their tap features are the next context rows.
        t3 = time.perf_counter()
        keep = torch.tensor([0, *accepted], device=node_hidden.device)
        compact_cache(cache, past_length, keep)
        features = tap_features(outputs.hidden_states, generator.target_layer_ids)[:, keep]
        generator.add_context(features, torch.arange(past_length, past_length + keep.numel(), device=input_ids.device)[None])
        generator.update_candidate_strategy(input_ids, None, len(accepted))

        t4 = time.perf_counter()
        if generator.drafted:  # the head ran this round (not a plain step of a backed-off `"auto"` budget)
            stats.draft_rounds += 1
            if auto_budget is not None:
                auto_budget.observe(tree, accepted, round_seconds=t4 - t0, verify_seconds=t2 - t1,
                                    draft_seconds=t1 - t0, accept_seconds=t3 - t2)
        stats.rounds += 1
        stats.drafted_nodes += tree.num_nodes - 1
        stats.accepted_drafts += len(accepted)
        stats.count_lookup(tree, accepted)
        stats.time_draft += t1 - t0
        stats.time_verify += t2 - t1
        stats.time_accept += t3 - t2
        stats.time_cache += t4 - t3

    if streamer is not None:
        streamer.end()
    stats.time_total = time.perf_counter() - start
    head.last_generate_stats = stats
    if return_dict:
        return GenerateDecoderOnlyOutput(sequences=input_ids, scores=scores, logits=raw_logits,
                                         **{OUTPUT_CACHE_FIELD: cache})
    return input_ids
