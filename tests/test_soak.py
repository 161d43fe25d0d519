"""Soak: many `generate()` calls in one process with varied prompts, settings, heads and targets (targets and heads
made and dropped as it goes). Checks: every output equals plain `generate()` (greedy token for token; seeded
sampling of one prompt token for token); the process-wide stores (cost measurements, acceptance state, packed weights,
exact-argmax tables, logit checks) hold entries only for live targets and heads; resident memory stops growing after
warm-up (resident memory after `malloc_trim`: 64 MB after the first target, 16 MB over the second half); a reference
call gives the same output at the end as at the start. `JETSPEC_SOAK=1` runs the long form
(10x the calls).

Checked on purpose: with `pair_state` keeping its states in a plain dict (no weak keys), the store-size
check fails (entries pile up for every dropped target); with the reference call's head switched to a lossy
acceptance rule for the second half, the start/end comparison fails; with 128 kB kept per call, the long form fails
the memory bounds (+174.6 MB after warm-up, +72.5 MB over the second half).
"""

import ctypes
import ctypes.util
import gc
import os
import resource

import torch
from conftest import make_tiny_target

import hf_jetspec.acceptance as acceptance
import hf_jetspec.exact_argmax as exact_argmax
import hf_jetspec.packed_linear as packed_linear
import hf_jetspec.projection as projection
import hf_jetspec.target_logits as target_logits
from hf_jetspec import JetSpecHead

LONG = os.environ.get("JETSPEC_SOAK") == "1"
GENERATIONS = 30 if LONG else 3  # targets made and dropped
CALLS_PER_TARGET = 40 if LONG else 12
PAD = 0


def store_sizes() -> dict[str, int]:
    """Entries of every process-wide store (nested per-head stores counted inside their target's entry)."""
    return {
        "acceptance states": sum(len(inner) for inner in acceptance._STATES.values()),
        "pairs with batch costs": sum(bool(state.batch_costs) for inner in acceptance._STATES.values()
                                      for state in inner.values()),
        "projection costs": len(projection._MEASURED),
        "exact argmax": len(exact_argmax._BUILT),
        "packed linears": len(packed_linear._PACKED),
        "logit checks": len(target_logits._CHECKED),
    }


def rss_bytes() -> int:
    """Resident memory after handing freed heap pages back to the system (glibc's `malloc_trim`, where the C library
    is glibc): what the process holds, not what the allocator keeps cached for reuse."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    if hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def call(target, head, index: int, generator: torch.Generator):
    """One varied call (prompt, batch, budget, prompt lookup, processors, sampling), checked against plain decoding."""
    vocab = target.config.vocab_size
    batch = (1, 1, 2, 3)[index % 4]
    lengths = [int(torch.randint(3, 24, (1,), generator=generator)) for _ in range(batch)]
    width = max(lengths)
    input_ids = torch.full((batch, width), PAD, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for row, length in enumerate(lengths):
        tokens = torch.randint(1, vocab, (length,), generator=generator)
        if index % 3 == 0:  # a repeated pattern: prompt-lookup proposals find matches
            tokens = tokens[: max(length // 3, 1)].repeat(3)[:length]
        input_ids[row, width - len(tokens) :] = tokens
        mask[row, width - len(tokens) :] = 1
    head.generation_config.tree_budget = ("auto", 4, 12, "auto")[index % 4 if batch == 1 else index % 3]
    head.generation_config.prompt_lookup_num_tokens = (None, 0, 3)[index % 3]
    kwargs = dict(attention_mask=mask, max_new_tokens=int(torch.randint(1, 40, (1,), generator=generator)),
                  pad_token_id=PAD)
    if index % 5 == 1:
        kwargs["repetition_penalty"] = 1.2
    if batch == 1 and index % 7 == 3:  # seeded sampling: the same tokens as plain sampling
        kwargs.update(do_sample=True, temperature=0.8, top_k=20)
        seed = int(torch.randint(1 << 30, (1,), generator=generator))
        torch.manual_seed(seed)
        expected = target.generate(input_ids, **kwargs)
        torch.manual_seed(seed)
    else:
        kwargs["do_sample"] = False
        expected = target.generate(input_ids, **kwargs)
    out = target.generate(input_ids, assistant_model=head, **kwargs)
    assert out.tolist() == expected.tolist(), f"call {index}: {kwargs}"


def test_many_calls_keep_outputs_exact_stores_bounded_and_memory_flat():
    generator = torch.Generator().manual_seed(0)
    reference_target = make_tiny_target("llama", seed=100)
    reference_head = JetSpecHead.from_target(reference_target, num_hidden_layers=1)
    reference_prompt = torch.tensor([[4, 8, 15, 16, 23, 42, 4, 8, 15]])

    def reference():
        reference_head.generation_config.tree_budget = "auto"
        torch.manual_seed(7)
        sampled = reference_target.generate(reference_prompt, do_sample=True, max_new_tokens=30,
                                            assistant_model=reference_head)
        greedy = reference_target.generate(reference_prompt, do_sample=False, max_new_tokens=30,
                                           assistant_model=reference_head)
        return sampled.tolist(), greedy.tolist()

    first = reference()
    gc.collect()  # models of earlier tests that are already dropped leave the stores now, not during the loop
    baseline = store_sizes()
    calls, rss_after_warmup, peak_stores = 0, None, {}
    for generation in range(GENERATIONS):
        family = ("llama", "qwen3")[generation % 2]
        target = make_tiny_target(family, seed=generation, vocab_size=(96, 128)[generation % 2])
        heads = [JetSpecHead.from_target(target, num_hidden_layers=1, block_size=(6, 8)[i]) for i in range(2)]
        for index in range(CALLS_PER_TARGET):
            call(target, heads[index % 2], calls, generator)
            calls += 1
        sizes = store_sizes()
        peak_stores = {name: max(peak_stores.get(name, 0), size) for name, size in sizes.items()}
        # live now: the reference pair + this target and its two heads
        assert all(size <= baseline[name] + 2 for name, size in sizes.items()), sizes
        del target, heads
        gc.collect()
        if generation == 0:
            rss_after_warmup = rss_bytes()
        if generation == GENERATIONS // 2:
            rss_halfway = rss_bytes()
        after = store_sizes()
        assert all(after[name] <= baseline[name] for name in after), \
            f"stores kept entries of dropped targets/heads: {after} vs {baseline}"
    rss_end = rss_bytes()
    growth, late_growth = rss_end - rss_after_warmup, rss_end - rss_halfway
    assert reference() == first  # no state left behind changes a later call's output
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"soak: {calls + 4} calls, {GENERATIONS} targets x 2 heads; peak RSS {peak:.0f} MB, RSS growth after "
          f"warm-up {growth / 2**20:.1f} MB ({late_growth / 2**20:.1f} MB over the second half); stores at most "
          f"{peak_stores}, after dropping {store_sizes()}")
    assert growth < 64 * 2**20
    assert late_growth < 16 * 2**20  # a leak grows with the calls; a warmed allocator and caches level off
