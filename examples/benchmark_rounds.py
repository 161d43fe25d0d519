"""Per-round time split of JetSpec decoding on the default target (SmolLM2-135M-Instruct), this machine.

Prints and saves (JSON + plot) where a round's time goes: draft (head forward + tree build), verify (one target
forward over the tree), accept (lm_head rows + logits processors + stopping criteria + streamer), cache (compaction +
context rows) and other (Python outside those phases, including `generate()`'s own set-up), for several tree
budgets, next to plain `generate()` on the same prompts.

Usage:
    python examples/benchmark_rounds.py --head random --budgets 1 8 16 32 --prompts 3 --max-new-tokens 64
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from tqdm import tqdm

import hf_jetspec
from hf_jetspec import JetSpecHead, chat_input_ids

PROMPTS = [
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May?",
    "Write a short poem about autumn leaves.",
    "Explain what a hash table is to a beginner programmer.",
    "What are three tips for staying productive when working from home?",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--head", default="random", help="'random' (fresh head from the target) or a head directory")
    parser.add_argument("--budgets", type=int, nargs="+", default=[1, 8, 16, 32])
    parser.add_argument("--prompts", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--output-dir", default="outputs/benchmark_rounds")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model, tokenizer = hf_jetspec.load_default_target()
    head = JetSpecHead.from_target(model) if args.head == "random" else JetSpecHead.from_pretrained(args.head).bind(model)
    prompts = [chat_input_ids(tokenizer, prompt) for prompt in PROMPTS[: args.prompts]]
    model.generate(prompts[0], max_new_tokens=4, do_sample=False)  # warm-up

    rows = []
    settings = [("plain", None)] + [("jetspec", b) for b in args.budgets]
    for method, budget in tqdm(settings, desc="settings"):
        totals = dict(tokens=0, seconds=0.0, rounds=0, accepted=0, prefill=0.0, draft=0.0, verify=0.0, accept=0.0,
                      cache=0.0, overhead=0.0)
        for input_ids in prompts:
            kwargs = dict(max_new_tokens=args.max_new_tokens, do_sample=False)
            if method == "jetspec":
                head.generation_config.tree_budget = budget
                kwargs["assistant_model"] = head
            start = time.perf_counter()
            out = model.generate(input_ids, **kwargs)
            elapsed = time.perf_counter() - start
            totals["seconds"] += elapsed
            totals["tokens"] += out.shape[1] - input_ids.shape[1]
            if method == "jetspec":
                stats = head.last_generate_stats
                totals["rounds"] += stats.rounds
                totals["accepted"] += stats.accepted_drafts
                for phase in ("prefill", "draft", "verify", "accept", "cache", "overhead"):
                    totals[phase] += getattr(stats, f"time_{phase}")
                totals["overhead"] += elapsed - stats.time_total  # generate()'s own set-up around the loop
        row = dict(method=method, tree_budget=budget, tokens_per_s=totals["tokens"] / totals["seconds"], **totals)
        if totals["rounds"]:
            row["tau"] = (totals["accepted"] + totals["rounds"]) / totals["rounds"]
            row["ms_per_round"] = {p: 1000 * totals[p] / totals["rounds"] for p in ("draft", "verify", "accept", "cache", "overhead")}
        rows.append(row)

    plain = rows[0]["tokens_per_s"]
    print(f"\n{'method':>8} {'budget':>6} {'tok/s':>7} {'speedup':>7} {'tau':>5}   ms/round: draft verify accept cache other")
    for row in rows:
        split = row.get("ms_per_round")
        split_text = " ".join(f"{split[p]:6.1f}" for p in ("draft", "verify", "accept", "cache", "overhead")) if split else ""
        print(f"{row['method']:>8} {str(row['tree_budget'] or '-'):>6} {row['tokens_per_s']:7.2f} "
              f"{row['tokens_per_s'] / plain:7.2f} {row.get('tau', 1.0):5.2f}   {split_text}")

    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    record = dict(
        hardware=dict(machine=platform.machine(), processor=platform.processor(), threads=torch.get_num_threads()),
        versions=dict(torch=torch.__version__, transformers=__import__("transformers").__version__),
        model="SmolLM2-135M-Instruct (Q4_1 GGUF dequantised, fp32, sdpa)", head=args.head,
        max_new_tokens=args.max_new_tokens, prompts=len(prompts), rows=rows,
    )
    (out_dir / "rounds.json").write_text(json.dumps(record, indent=2))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"saved {out_dir / 'rounds.json'} (install matplotlib for the plot)")
        return
    spec = [r for r in rows if r.get("ms_per_round")]
    fig, ax = plt.subplots(figsize=(7, 4))
    bottom = [0.0] * len(spec)
    for phase in ("draft", "verify", "accept", "cache", "overhead"):
        values = [r["ms_per_round"][phase] for r in spec]
        ax.bar([str(r["tree_budget"]) for r in spec], values, bottom=bottom, label=phase)
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.axhline(1000 / plain, color="k", linestyle="--", label="plain generate: ms/token")
    ax.set_xlabel("tree budget (nodes)")
    ax.set_ylabel("ms per round")
    ax.set_title(f"JetSpec round time split, SmolLM2-135M fp32, {platform.machine()} CPU")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "rounds.png", dpi=120)
    print(f"saved {out_dir / 'rounds.json'} and {out_dir / 'rounds.png'}")


if __name__ == "__main__":
    main()
