"""What the CPU verify-forward changes buy: JetSpec calls on the default target with each of them on and off.

Three settings, run in turn on the same batches (so drift hits them alike), every output checked token for token
against plain `generate()`:

- `repeat_kv`: verify forwards through Transformers' SDPA as it is (keys and values copied per query head), linears
  unpacked;
- `folded`: grouped query heads folded into the query rows (`"jetspec_sdpa_gqa"`, `hf_jetspec/attention.py`);
- `folded+packed`: and the linears on MKL-packed weights (`hf_jetspec/packed_linear.py`, where measured faster).

Fixed tree budgets (no prompt lookup), so every setting verifies the same trees; reported per (batch size, budget):
the fastest call's seconds and verify milliseconds per round. Prints, and saves `results.json` and `verify.png` in
`--out`.

Usage:
    python examples/benchmark_verify_forward.py --head heads/smollm2-135m-instruct-jetspec --out outputs/verify-forward
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

import hf_jetspec
import hf_jetspec.packed_linear as packed_linear
from hf_jetspec import JetSpecHead
from hf_jetspec.attention import GQA_ATTENTION, gqa_sdpa_attention_forward
from hf_jetspec.bench_batch import DEFAULT_EVAL_DIR, left_pad, load_prompts

SETTINGS = ("repeat_kv", "folded", "folded+packed")


def apply(setting: str, decoder, packed) -> None:
    AttentionInterface.register(GQA_ATTENTION, sdpa_attention_forward if setting == "repeat_kv" else gqa_sdpa_attention_forward)
    packed_linear._PACKED[decoder] = (None, packed if setting == "folded+packed" else None)  # (cap, packed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--head", required=True, help="a head directory (for the default target)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--budgets", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--datasets", nargs="+", default=["gsm8k_test"])
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default="outputs/verify-forward")
    args = parser.parse_args()

    model, tokenizer = hf_jetspec.load_default_target()
    head = JetSpecHead.from_pretrained(args.head).bind(model)
    head.generation_config.prompt_lookup_num_tokens = 0
    decoder = getattr(model, model.base_model_prefix)
    packed = packed_linear.packed_linears_for(decoder)
    prompts, source = load_prompts(DEFAULT_EVAL_DIR if DEFAULT_EVAL_DIR.is_dir() else None, args.datasets,
                                   max(args.batch_sizes))
    ids = [hf_jetspec.chat_input_ids(tokenizer, prompt)[0].tolist() for prompt in prompts]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    rows, mismatches = [], 0
    jobs = [(batch, budget) for batch in args.batch_sizes for budget in args.budgets]
    for batch, budget in tqdm(jobs, desc="batch size x budget"):
        input_ids, mask = left_pad(ids[:batch], pad, model.device)
        kwargs = dict(attention_mask=mask, max_new_tokens=args.max_new_tokens, do_sample=False, pad_token_id=pad)
        expected = model.generate(input_ids, **kwargs)
        head.generation_config.tree_budget = budget
        timings = {setting: [] for setting in SETTINGS}
        for setting in SETTINGS:  # warm-up (and first-use measurements)
            apply(setting, decoder, packed)
            model.generate(input_ids, assistant_model=head, **{**kwargs, "max_new_tokens": 8})
        for _ in range(args.repeats):
            for setting in SETTINGS:
                apply(setting, decoder, packed)
                start = time.perf_counter()
                out = model.generate(input_ids, assistant_model=head, **kwargs)
                seconds = time.perf_counter() - start
                mismatches += int(not torch.equal(out, expected))
                stats = head.last_generate_stats
                timings[setting].append((seconds, 1e3 * stats.time_verify / max(stats.rounds, 1), stats.rounds))
        apply("folded+packed", decoder, packed)
        for setting in SETTINGS:
            seconds, verify_ms, rounds = min(timings[setting])
            rows.append({"batch_size": batch, "budget": budget, "setting": setting, "call_seconds": seconds,
                         "verify_ms_per_round": verify_ms, "rounds": rounds,
                         "verify_rows": batch * budget,
                         "packed_rows": packed.rows_for(batch * budget) if packed and setting == "folded+packed" else None})
            print(f"batch {batch} budget {budget:2d} {setting:14s} call {seconds:6.3f} s  verify {verify_ms:5.1f} ms/round"
                  f"  ({rounds} rounds)")

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = {"head": args.head, "datasets": args.datasets, "prompts": source, "max_new_tokens": args.max_new_tokens,
                "repeats": args.repeats, "packed_rows": packed.min_rows if packed else None}
    environment = {"torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
                   "processor": platform.processor()}
    (out_dir / "results.json").write_text(json.dumps(
        {"settings": settings, "environment": environment, "mismatches": mismatches, "rows": rows}, indent=2))
    print(f"mismatches against plain generate(): {mismatches}")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"b{batch}x{budget}" for batch, budget in jobs]
    fig, ax = plt.subplots(figsize=(max(6, len(labels) * 0.9), 4))
    width = 0.27
    for index, setting in enumerate(SETTINGS):
        values = [row["verify_ms_per_round"] for row in rows if row["setting"] == setting]
        ax.bar([x + (index - 1) * width for x in range(len(labels))], values, width, label=setting)
    ax.set_xticks(range(len(labels)), labels)
    ax.set_xlabel("batch size x tree budget (nodes per row)")
    ax.set_ylabel("verify forward, ms per round")
    ax.set_title("Verify forward on the default target, this CPU")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "verify.png", dpi=120)
    print(f"saved {out_dir / 'results.json'} and {out_dir / 'verify.png'}")


if __name__ == "__main__":
    main()
