"""Several threads calling generate() on one target at once give exactly the outputs of sequential calls: JetSpec
calls with the same head and with different heads, one prompt and batches, at fixed and "auto" budgets, beside plain
generate() calls. Nothing process-wide is switched (the folded attention and the packed linears are per thread).

Checked by breaking it on purpose: with the shared config switched to the folded attention for each verify forward
(the code before this test), a thread's call failed ("attn_implementation='jetspec_sdpa_gqa', which cannot take a tree
attention mask"), as a user saw on the real target. The packed linears installed on the shared modules (also the code
before) did not fail here on the tiny target; `test_packed_linear.py` checks that other threads get nn.Linear's own
product bit for bit.
"""

from __future__ import annotations

import threading

import torch
from conftest import OracleHead
from test_batched import BatchOracleHead, real_tokens, sharp_target

from hf_jetspec import JetSpecHead

THREADS, CALLS, NEW_TOKENS = 4, 20, 24


def make_jobs(target):
    """(name, call) pairs; every call returns the output tokens as a list."""
    jobs = []
    prompts = [torch.randint(1, 96, (1, length), generator=torch.Generator().manual_seed(length)) for length in (6, 9, 13)]
    for index, ids in enumerate(prompts):
        expected = target.generate(ids, do_sample=False, max_new_tokens=NEW_TOKENS)
        head = JetSpecHead.from_target(target, num_hidden_layers=1, block_size=6)  # a head per prompt
        head.__class__ = OracleHead
        head.reference, head.rank_of_truth = expected.flatten(), 1
        head.generation_config.tree_budget = "auto" if index == 0 else 8
        jobs.append((f"one prompt, head {index}",
                     lambda ids=ids, head=head: target.generate(ids, do_sample=False, max_new_tokens=NEW_TOKENS,
                                                                assistant_model=head).tolist()))
    ids = torch.tensor([[0, 0, 11, 3, 27, 64, 5], [5, 17, 42, 9, 33, 8, 2]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]])
    kwargs = dict(attention_mask=mask, do_sample=False, max_new_tokens=NEW_TOKENS, pad_token_id=0)
    batch_head = JetSpecHead.from_target(target, num_hidden_layers=1, block_size=6)
    batch_head.__class__ = BatchOracleHead
    batch_head.references, batch_head.rank_of_truth = real_tokens(target.generate(ids, **kwargs), mask), 1
    batch_head.generation_config.tree_budget = 8
    jobs.append(("batch of two", lambda: target.generate(ids, assistant_model=batch_head, **kwargs).tolist()))
    jobs.append(("plain", lambda: target.generate(prompts[1], do_sample=False, max_new_tokens=NEW_TOKENS).tolist()))
    return jobs


def test_threads_give_the_outputs_of_sequential_calls(monkeypatch):
    import hf_jetspec.packed_linear as packed_linear
    from test_packed_linear import forced

    target = sharp_target("llama", seed=21)
    if packed_linear.mkl_packing_available():  # packed verify forwards whatever this machine measures
        packed = forced(target.model, {4: 2, 8: 5, 16: 9, 32: 17})
        monkeypatch.setattr(packed_linear, "_PACKED", type(packed_linear._PACKED)({target.model: (None, packed)}))
    jobs = make_jobs(target)
    expected = {name: call() for name, call in jobs}  # sequential, one at a time
    results, errors = [], []

    def worker(offset):
        try:
            for step in range(CALLS):
                name, call = jobs[(offset + step) % len(jobs)]
                results.append((name, call()))
        except Exception as error:  # noqa: BLE001 - reported below with the test's failure
            errors.append(repr(error))

    threads = [threading.Thread(target=worker, args=(offset,)) for offset in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert len(results) == THREADS * CALLS
    different = [name for name, output in results if output != expected[name]]
    assert different == []
    assert target.config._attn_implementation == "sdpa"
