"""Shared fixtures: tiny random Llama/Qwen3 targets, an oracle head, the default target, eval prompts."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

# Every test measures costs itself (some fake the timings): no measurements from earlier processes on this machine.
# tests/test_measurements.py turns the store on where it tests it. Subprocesses inherit this.
os.environ["HF_JETSPEC_MEASUREMENTS"] = "off"


def _worker_threads() -> int | None:
    """Under pytest-xdist (`-n auto`, the README's test command) each worker's share of this process's cores, else None.

    torch's default (every core in every worker) would oversubscribe them: on 2 cores, 2 workers at 2 threads each run
    slower than 1 process at 2 threads."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers <= 1:
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // workers)


WORKER_THREADS = _worker_threads()
if WORKER_THREADS is not None:
    torch.set_num_threads(WORKER_THREADS)
    os.environ.setdefault("OMP_NUM_THREADS", str(WORKER_THREADS))  # subprocesses (vLLM server, venv probes)


def pytest_collection_modifyitems(config, items):
    """Files with vLLM tests first, then the other `slow` files, then the rest, each file's tests kept together in
    their order: under `--dist loadfile` a long file handed out last would leave the other workers idle while it runs."""
    def rank(item):
        return 0 if item.get_closest_marker("vllm") else 1 if item.get_closest_marker("slow") else 2

    file_rank = {}
    for item in items:
        file_rank[item.path] = min(file_rank.get(item.path, 2), rank(item))
    first_seen = {path: i for i, path in reversed(list(enumerate(item.path for item in items)))}
    items.sort(key=lambda item: (file_rank[item.path], first_seen[item.path]))

import hf_jetspec  # hooks generate()  # noqa: E402
import hf_jetspec.accept
from hf_jetspec import JetSpecHead
from hf_jetspec.modeling_jetspec import JetSpecHeadOutput

SHARED_EVAL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "eval"
FALLBACK_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain photosynthesis in two sentences.",
    "List three prime numbers greater than 10.",
    "Give me a recipe for pancakes.",
    "Translate 'good morning' into Spanish.",
]

TINY_FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),
}


def make_tiny_target(family: str, seed: int = 0, vocab_size: int = 96, num_hidden_layers: int = 4):
    config_cls, model_cls = TINY_FAMILIES[family]
    config = config_cls(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=512,
        eos_token_id=None,
        bos_token_id=None,
        pad_token_id=None,
    )
    torch.manual_seed(seed)
    return model_cls(config).eval()


class OracleHead(JetSpecHead):
    """Test-only drafter that knows the right continuation `reference` (a 1D tensor of the full sequence).

    At depth d it puts the true token at rank `rank_of_truth` (0 = top) among random distractors, so the tree must
    branch to find it; beyond the reference it drafts junk.
    """

    reference: torch.Tensor
    rank_of_truth: int = 0

    def forward(self, anchor_ids, anchor_position_ids, context_features=None, context_position_ids=None,
                attention_mask=None, past_key_values=None, logits_to_keep=True, block_rows=None):
        block = self.config.block_size  # all depths, whatever `block_rows` asks: callers slice what they use
        vocab = self.config.vocab_size
        anchor = int(anchor_position_ids[0, 0])
        generator = torch.Generator().manual_seed(anchor)
        logits = 0.1 * torch.randn(block - 1, vocab, generator=generator)
        for depth in range(1, block):
            position = anchor + depth
            if position < self.reference.numel():
                truth = int(self.reference[position])
                decoys = torch.randint(vocab, (self.rank_of_truth,), generator=generator)
                logits[depth - 1, decoys] = 10.0
                logits[depth - 1, truth] = 9.9 if self.rank_of_truth else 10.0
        return JetSpecHeadOutput(logits=logits[None, None].to(self.dtype))


def oracle_for(target, reference: torch.Tensor, rank_of_truth: int = 0, block_size: int = 8) -> OracleHead:
    head = JetSpecHead.from_target(target, num_hidden_layers=1, block_size=block_size)
    head.__class__ = OracleHead
    head.reference = reference.flatten()
    head.rank_of_truth = rank_of_truth
    return head


def eval_prompts(per_file: int) -> list[tuple[str, str]]:
    """`(category, prompt)` pairs, `per_file` from each eval set in ../shared (fallback prompts without it)."""
    if not SHARED_EVAL.is_dir():
        return [("fallback", p) for p in FALLBACK_PROMPTS]
    prompts = []
    for path in sorted(SHARED_EVAL.glob("*.jsonl")):
        with path.open() as handle:
            for _, line in zip(range(per_file), handle):
                prompts.append((path.stem, json.loads(line)["prompt"]))
    return prompts


@pytest.fixture(scope="session")
def default_target():
    pytest.importorskip("gguf")
    try:
        return hf_jetspec.load_default_target()
    except FileNotFoundError as error:
        if os.environ.get("CI"):
            raise
        pytest.skip(str(error))


# A word-level tokenizer with a chat template, for tiny targets that need text (training, benchmarks).
WORDS = "the a cat dog sat ran on under mat log big small red blue one two three four five six and or".split()


def tiny_tokenizer():
    vocab = {"<unk>": 0, "<eos>": 1, "<user>": 2, "<assistant>": 3}
    vocab.update({word: i + 4 for i, word in enumerate(WORDS)})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>", pad_token="<eos>")
    tokenizer.chat_template = "{% for m in messages %}<user> {{ m['content'] }} {% endfor %}<assistant>"
    return tokenizer


def save_tiny_target(directory, family: str = "llama"):
    tokenizer = tiny_tokenizer()
    target = make_tiny_target(family, seed=11, vocab_size=len(tokenizer))
    target.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return target, tokenizer


def patch_typical_acceptance(monkeypatch) -> None:
    """Replaces the exact acceptance rule with 'typical acceptance' (take the head's first child whenever the target
    gives it >= 10%), a common lossy shortcut that the distribution tests must reject."""
    exact = hf_jetspec.accept.choose_token

    def broken(scores, do_sample, draft_tokens):
        if draft_tokens and torch.softmax(scores, -1)[0, draft_tokens[0]] >= 0.1:
            return torch.tensor([draft_tokens[0]], device=scores.device)
        return exact(scores, do_sample, draft_tokens)

    monkeypatch.setattr(hf_jetspec.accept, "choose_token", broken)


def distribution_check(counts, probs) -> tuple[float, float, float]:
    """`(chi-square p-value, total variation, the 99.9% quantile of total variation under exact sampling)` of observed
    `counts` of each outcome against its exact probabilities `probs` (cells with expected counts under 5 pooled)."""
    import numpy as np
    from scipy.stats import chisquare

    total = counts.sum()
    expected = probs * total
    assert counts[expected == 0].sum() == 0, "an outcome the target cannot produce was sampled"
    big = expected >= 5  # chi-square needs expected counts >= 5: pool the rare cells into one
    observed = np.append(counts[big], counts[~big & (expected > 0)].sum())
    wanted = np.append(expected[big], expected[~big & (expected > 0)].sum())
    keep = wanted > 0
    assert keep.sum() >= 2, (f"{int(total)} samples leave fewer than two cells with an expected count of 5 or more: too "
                             "few for a chi-square test (raise JETSPEC_SAMPLING_RUNS)")
    p_value = chisquare(observed[keep], wanted[keep] * observed[keep].sum() / wanted[keep].sum()).pvalue
    tv = 0.5 * np.abs(counts / total - probs).sum()
    rng = np.random.default_rng(0)
    null_tv = 0.5 * np.abs(rng.multinomial(int(total), probs / probs.sum(), size=2000) / total - probs).sum(1)
    return p_value, tv, float(np.quantile(null_tv, 0.999))
