"""The JetSpec decode loop: draft a tree, verify it in one target forward, accept, compact the cache, emit.

`generate(assistant_model=head)` lands here (see `integration.py`). Batch size 1 runs this loop (a batch or a padded
prompt goes to `batched.py`). The loop keeps one invariant: the target cache holds every committed token except the
last one, which is the next tree's root.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer
from transformers.generation.utils import GenerateDecoderOnlyOutput

from .attention import TREE_ATTENTION, packed_tree_mask, verification_attention
from .compat import GENERATE_CACHE_KEY, OUTPUT_CACHE_FIELD, cache_kwarg
from .target_logits import target_logits_for
from .masks import sliding_window, verify_attention_mask
from .budget import AutoBudget, acceptance_profile, measure_verify_cost
from .candidate_generator import JetSpecCandidateGenerator, resolve_tree_budget, tap_features
from .exact_argmax import exact_argmax_for
from .lookup import PromptLookupDraft, prompt_lookup_tokens
from .modeling_jetspec import JetSpecHead
from .packed_linear import PackedLinears, packed_linears, packed_linears_for, packed_memory_cap

TREE_MASK_ATTENTION = ("sdpa", "eager", "jetspec_tree")


@dataclass
class JetSpecGenerateStats:
    """What the last `generate(assistant_model=head)` call did.

    Args:
        rounds (`int`): draft-verify rounds (the prefill is not a round).
        new_tokens (`int`): tokens emitted, the prefill's token included.
        drafted_nodes (`int`): tree nodes drafted, roots excluded.
        draft_rounds (`int`): rounds in which the head drafted (with `tree_budget="auto"`, rounds where drafting did
            not pay run as plain steps; see `budget.py`).
        accepted_drafts (`int`): drafted tokens accepted.
        lookup_nodes (`int`), accepted_lookup (`int`): tree nodes on merged prompt-lookup proposals (shared with the
            head's or not), and how many of them were accepted (see `lookup.py`).
        tree_budget (`int` or `"auto"`), tree_topk (`int`): the tree settings used.
        time_prefill, time_draft, time_verify, time_accept, time_cache, time_total (`float`): seconds.
    """

    rounds: int = 0
    new_tokens: int = 0
    drafted_nodes: int = 0
    accepted_drafts: int = 0
    draft_rounds: int = 0
    lookup_nodes: int = 0
    accepted_lookup: int = 0
    tree_budget: int | str = 0
    tree_topk: int = 0
    time_prefill: float = 0.0
    time_draft: float = 0.0
    time_verify: float = 0.0
    time_accept: float = 0.0
    time_cache: float = 0.0
    time_total: float = 0.0

    def count_lookup(self, tree, accepted_nodes: list[int]) -> None:
        """Adds a verified tree's merged prompt-lookup nodes and how many of them `accepted_nodes` holds."""
        if tree.lookup_nodes:
            self.lookup_nodes += len(tree.lookup_nodes)
            self.accepted_lookup += len(set(accepted_nodes).intersection(tree.lookup_nodes))

    @property
    def mean_accepted_length(self) -> float:
        """tau: tokens emitted per round (accepted drafts + the target's own token)."""
        return (self.accepted_drafts + self.rounds) / self.rounds if self.rounds else 0.0

    @property
    def drafted_tau(self) -> float:
        """tau over the rounds in which the head drafted (the head's acceptance; equals tau unless `"auto"` backed
        off drafting for some rounds)."""
        return (self.accepted_drafts + self.draft_rounds) / self.draft_rounds if self.draft_rounds else 0.0

    @property
    def mean_tree_size(self) -> float:
        """Nodes per verified tree, root included (the budget, or what `tree_budget="auto"` chose on average)."""
        return (self.drafted_nodes + self.rounds) / self.rounds if self.rounds else 0.0

    @property
    def time_overhead(self) -> float:
        """Host time outside the measured phases (Python bookkeeping, streamer, stopping criteria)."""
        measured = self.time_prefill + self.time_draft + self.time_verify + self.time_accept + self.time_cache
        return max(self.time_total - measured, 0.0)


def choose_token(scores: torch.Tensor, do_sample: bool, draft_tokens: list[int]) -> torch.LongTensor:
    """The target's token at a tree node: argmax (greedy) or one sample of `softmax(scores)` (sampling), `scores`
    being the target's logits for this node's own path after every logits processor and warper.

    `draft_tokens` (the node's children) play no part: the token is drawn from the target's distribution alone, and
    the tree only decides how far one verify forward gets. That is why output is exactly the target's (token for
    token under greedy, in distribution under sampling; with the same seed, the same tokens as plain sampling up to
    floating-point ties) -- the rule a lossy "typical acceptance" would change.
    """
    if do_sample:
        return torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)
    return scores.argmax(dim=-1)


def lm_head_chunk(device: torch.device) -> int | None:
    """Rows of the target's lm_head computed at once while accepting (`None`: a whole main chain).

    On a CPU more than three rows of a big-vocabulary lm_head cost far more than one (fp32 `linear` switches kernels
    at four rows; SmolLM2's 49k x 576 lm_head read from memory on the 2-core x86 box: 4.5 ms for 1 row, 5.1 ms for 3,
    8.4 ms for 4), so rows go three at a time. On a GPU the rows are nearly free: the whole chain goes at once.
    """
    return None if device.type == "cuda" else 3


ARGMAX_ROWS = 32  # tree rows per `ExactArgmax` call: its bf16 pass costs about the same for 1 to 32 rows


def rows_to_project(tree, node: int, done, rows: int | None) -> list[int]:
    """The tree rows whose target logits one lm_head call computes when `node`'s are needed: `node`, then the nodes
    below it most likely to be reached (highest `tree.scores`, else the first in the tree's order) whose logits are
    not in `done`, `rows` in all; with `rows=None`, `node`'s main chain."""
    if rows is None:
        return tree.main_chain(node)
    below = tree.ancestor_mask[node + 1 :, node].nonzero().flatten().add(node + 1).tolist() if rows > 1 else []
    below = [other for other in below if other not in done]
    if tree.scores is not None:
        below.sort(key=lambda other: -tree.scores[other])  # stable: ties keep the tree's order
    return [node, *below[: rows - 1]]


def compact_cache(cache: DynamicCache, past_length: int, keep: torch.LongTensor) -> None:
    """Keeps `past_length` prefix rows plus the tree rows `keep` (sorted, relative to the tree) in every layer.

    The kept rows are moved down in place; the rest is dropped with the public `crop(-n)`.
    """
    for layer in cache.layers:
        tree_rows = layer.keys.shape[-2] - past_length
        if keep.numel() < tree_rows:
            source = past_length + keep
            target = slice(past_length, past_length + keep.numel())
            layer.keys[:, :, target] = layer.keys[:, :, source]
            layer.values[:, :, target] = layer.values[:, :, source]
    cache.crop(-(cache.layers[0].keys.shape[-2] - past_length - keep.numel()))


def verify_tree(decoder, tree, past_length: int, cache: DynamicCache, hidden_state_ids: list[int], dtype: torch.dtype,
                packed: PackedLinears | None = None):
    """Step 2 of a round: one target forward over every tree node (ancestor mask, tree positions), appending the
    nodes' keys and values to `cache` and returning the decoder outputs with the tapped hidden states. Under
    `attn_implementation="jetspec_tree"` the mask is the packed ancestor bits (no dense mask, see `attention.py`).
    `packed`: the decoder's [`PackedLinears`] (see `packed_linear.py`), if any."""
    if decoder.config._attn_implementation == TREE_ATTENTION:
        attention_mask = packed_tree_mask(tree.packed_ancestor_bits())
    elif sliding_window(decoder.config) is None:
        attention_mask = tree.attention_mask(past_length, dtype)
    else:  # the window on top of the ancestor mask, for the sliding-window layers (see masks.py)
        device = tree.tokens.device
        allowed = torch.cat([torch.ones(tree.num_nodes, past_length, dtype=torch.bool, device=device),
                             tree.ancestor_mask], dim=1)[None]
        query_positions = tree.position_ids(past_length)
        key_positions = torch.cat([torch.arange(past_length, device=device)[None], query_positions], dim=1)
        attention_mask = verify_attention_mask(decoder.config, allowed, query_positions, key_positions, dtype)
    return verify_forward(decoder, packed, input_ids=tree.tokens[None], position_ids=tree.position_ids(past_length),
                          attention_mask=attention_mask, output_hidden_states=hidden_state_ids,
                          **{cache_kwarg(decoder.forward): cache})


def verify_forward(decoder, packed: PackedLinears | None, input_ids: torch.LongTensor, **kwargs):
    """One verify forward of the target's decoder (cache on), as every verify forward and its cost calibration runs:
    grouped-query heads folded (`attention.verification_attention`) and linears on `packed` weights where measured
    faster (`packed_linear.py`)."""
    with verification_attention(decoder), packed_linears(packed, input_ids.numel()):
        return decoder(input_ids=input_ids, use_cache=True, **kwargs)


def validated_cache(model_kwargs: dict, generation_config=None, allow_prefilled: bool = False) -> DynamicCache:
    """The plain `DynamicCache` generate() prepared for this call (the batch-1 and batched loops both need one): empty,
    or with `allow_prefilled` (one prompt) the first turn's cache passed back as `past_key_values`.

    For a target with sliding-window layers generate() prepares a `DynamicCache` whose sliding layers keep only the
    window; tree compaction needs every position, so that (still empty) cache is replaced by a plain one, in
    `model_kwargs` too, and the window goes into the verify masks (`masks.py`).
    """
    if not model_kwargs.get("use_cache", True):
        raise ValueError("JetSpec tree decoding needs the KV cache: do not pass `use_cache=False`.")
    cache = model_kwargs.get(GENERATE_CACHE_KEY)
    if cache is None:  # transformers >= 5.25 leaves the cache to the model's first forward
        requested = getattr(generation_config, "cache_implementation", None)
        if requested not in (None, "dynamic"):
            raise ValueError(f"JetSpec tree decoding needs a plain DynamicCache, got cache_implementation={requested!r}: "
                             "drop `cache_implementation`.")
        cache = model_kwargs[GENERATE_CACHE_KEY] = DynamicCache()
    if (type(cache) is DynamicCache and cache.get_seq_length() == 0
            and all(isinstance(layer, DynamicLayer) for layer in cache.layers)):
        cache = model_kwargs[GENERATE_CACHE_KEY] = DynamicCache()
    if not isinstance(cache, DynamicCache) or any(type(layer) is not DynamicLayer for layer in cache.layers):
        raise ValueError(
            f"JetSpec tree decoding needs a plain DynamicCache (no static, sliding-window or quantized cache), got "
            f"{type(cache).__name__}: drop `cache_implementation` / `past_key_values`."
        )
    if cache.get_seq_length() > 0 and not allow_prefilled:
        raise ValueError(
            "Batched JetSpec decoding starts from an empty cache: for a second turn of a batch, pass the whole "
            "conversations as `input_ids` without `past_key_values` (a single prompt can continue its cache)."
        )
    return cache


def check_inputs(model, input_ids, head, model_kwargs, settings=None) -> None:
    """Refuses, before any forward, what a JetSpec call cannot run exactly: `inputs_embeds`, an empty prompt, a pre-
    filled cache for a batch, a head whose dtype differs from the target's, and bad tree settings."""
    if model_kwargs.get("inputs_embeds") is not None:
        raise ValueError(
            "A JetSpec head drafts token ids and the target verifies them through its own embeddings, so "
            "`inputs_embeds` cannot be used with `assistant_model=head`: pass `input_ids` (e.g. "
            "tokenizer(text, return_tensors='pt').input_ids), or drop `assistant_model`."
        )
    if input_ids.shape[-1] == 0:
        raise ValueError(
            "The prompt is empty: JetSpec decoding (like the target itself) needs at least one prompt token. Start "
            "from the tokenizer's BOS token or a chat template's generation prompt."
        )
    head_dtype, target_dtype = head.dtype, model.dtype
    if head_dtype != target_dtype and head.training:  # in eval mode, bind() casts the head to the target's dtype
        raise ValueError(
            f"The JetSpec head is {head_dtype} and the target {target_dtype}, and the head is in training mode, so "
            f"generate() does not cast it: call `head.eval()` (generate() then casts it in place) or "
            f"`head.to({target_dtype})`."
        )
    from .candidate_generator import validate_tree_settings

    validate_tree_settings(settings if settings is not None else head.generation_config)


def _validate(model, input_ids, generation_config, head, model_kwargs) -> DynamicCache:
    for name in ("output_attentions", "output_hidden_states"):
        if getattr(generation_config, name, False) and generation_config.return_dict_in_generate:
            raise ValueError(f"`{name}=True` is not supported with a JetSpec head; `output_scores`/`output_logits` are.")
    attn = model.config._attn_implementation
    if attn not in TREE_MASK_ATTENTION:
        raise ValueError(
            f"The target uses attn_implementation={attn!r}, which cannot take a tree attention mask. "
            f"Load it with attn_implementation='sdpa' (or one of {TREE_MASK_ATTENTION})."
        )
    if attn == TREE_ATTENTION and sliding_window(model.config) is not None:
        raise ValueError(
            f"attn_implementation={TREE_ATTENTION!r} cannot express the sliding window of this target's "
            f"sliding-window layers (window {sliding_window(model.config)}): load it with attn_implementation='sdpa'."
        )
    cache = validated_cache(model_kwargs, generation_config, allow_prefilled=True)
    if cache.get_seq_length() >= input_ids.shape[1]:
        raise ValueError(
            f"`past_key_values` already holds {cache.get_seq_length()} positions, but `input_ids` has only "
            f"{input_ids.shape[1]}: pass the whole conversation so far (its cached part plus at least one new token)."
        )
    head.bind(model)
    return cache


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
    tree_settings=None,
    **model_kwargs,
) -> GenerateDecoderOnlyOutput | torch.LongTensor:
    """Tree speculative decoding with a [`JetSpecHead`] (called by `generate()`; same arguments as `_assisted_decoding`).

    A batch (or a padded prompt) goes to [`batched_jetspec_decoding`]; one unpadded prompt runs the loop below.
    """
    settings = tree_settings if tree_settings is not None else assistant_model.generation_config  # this call's
    check_inputs(model, input_ids, assistant_model, model_kwargs, settings)
    attention_mask = model_kwargs.get("attention_mask")
    if input_ids.shape[0] != 1 or (attention_mask is not None and not bool(attention_mask.all())):
        from .batched import batched_jetspec_decoding

        return batched_jetspec_decoding(
            model, input_ids, logits_processor, stopping_criteria, generation_config, synced_gpus, streamer,
            assistant_model, tree_settings=settings, **model_kwargs,
        )
    head = assistant_model
    cache = _validate(model, input_ids, generation_config, head, model_kwargs)
    start = time.perf_counter()
    budget = resolve_tree_budget(settings.tree_budget)
    decoder = getattr(model, model.base_model_prefix)
    # verify forwards on packed weights where measured faster, within the head's memory cap for them
    packed = packed_linears_for(decoder, packed_memory_cap(settings))
    lm_head = target_logits_for(model)  # the lm_head + the family's own logit transform, if any
    hidden_state_ids = [i + 1 for i in head.config.target_layer_ids]
    auto_budget = None
    if budget == "auto":  # the verify cost vs tree size on this machine, measured once per process and model
        cost = measure_verify_cost(
            model, lambda tree, past, kv: verify_tree(decoder, tree, past, kv, hidden_state_ids, model.dtype, packed)
        )
        auto_budget = AutoBudget(cost, max_budget=getattr(settings, "tree_max_budget", None),
                                 profile=acceptance_profile(model, head))
    lookup_tokens = prompt_lookup_tokens(getattr(settings, "prompt_lookup_num_tokens", None), budget)
    prompt_lookup = None
    if lookup_tokens:
        prompt_lookup = PromptLookupDraft(
            lookup_tokens, getattr(settings, "max_matching_ngram_size", None) or 2,
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
            token = choose_token(next_scores, do_sample, list(draft_tokens))
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
