"""Demo: generate with the embedded default target (SmolLM2-135M-Instruct) and a JetSpec head.

Prints the generated text, tokens/s of plain `generate()` and of JetSpec measured side by side in this run, the
speedup, and tau (mean tokens accepted per round). Output of the two runs is checked to be identical.

Usage:
    python examples/demo.py [--head DIR] [--prompt TEXT] [--max-new-tokens N] [--tree-budget N]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import hf_jetspec
from hf_jetspec import JetSpecHead, chat_input_ids

SHIPPED_HEAD = Path(__file__).resolve().parents[1] / "heads" / "smollm2-135m-instruct-jetspec"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--head", default=None, help=f"head directory (default: {SHIPPED_HEAD.name} if present)")
    # not from the training prompts of the shipped head, nor from the eval sets
    parser.add_argument("--prompt", default="A bakery sells muffins for $3 each and cookies for $2 each. On Monday it "
                        "sold 45 muffins and twice as many cookies. How much money did the bakery make on Monday?")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--tree-budget", type=int, default=None, help="tree nodes per round (default: the head's, 'auto')")
    args = parser.parse_args()

    print("Loading the default target (SmolLM2-135M-Instruct, Q4_1 GGUF -> fp32)...")
    model, tokenizer = hf_jetspec.load_default_target()
    head_dir = Path(args.head) if args.head else SHIPPED_HEAD
    if head_dir.is_dir():
        head = JetSpecHead.from_pretrained(head_dir).bind(model)
        print(f"Head: {head_dir}")
    else:
        head = JetSpecHead.from_target(model, num_hidden_layers=1)
        print(f"Head: none found at {head_dir}; using an UNTRAINED head built from the target (expect tau ~ 1, "
              "no speedup). Train one with the training/ pipeline.")
    if args.tree_budget:
        head.generation_config.tree_budget = args.tree_budget

    input_ids = chat_input_ids(tokenizer, args.prompt)
    model.generate(input_ids, max_new_tokens=8, do_sample=False)  # warm-up
    # warm-up JetSpec too: with tree_budget="auto" the first call measures this machine's verify cost (once)
    model.generate(input_ids, max_new_tokens=8, do_sample=False, assistant_model=head)

    timings = {}
    outputs = {}
    for name, extra in (("plain", {}), ("jetspec", {"assistant_model": head})):
        start = time.perf_counter()
        outputs[name] = model.generate(input_ids, max_new_tokens=args.max_new_tokens, do_sample=False, **extra)
        timings[name] = time.perf_counter() - start

    new_tokens = outputs["plain"].shape[1] - input_ids.shape[1]
    stats = head.last_generate_stats
    print("\n" + tokenizer.decode(outputs["jetspec"][0, input_ids.shape[1]:], skip_special_tokens=True) + "\n")
    print(f"identical to plain generate(): {torch.equal(outputs['plain'], outputs['jetspec'])}")
    print(f"plain generate(): {new_tokens / timings['plain']:6.2f} tokens/s")
    print(f"JetSpec:          {(outputs['jetspec'].shape[1] - input_ids.shape[1]) / timings['jetspec']:6.2f} tokens/s "
          f"(speedup {timings['plain'] / timings['jetspec']:.2f}x, tree budget {stats.tree_budget})")
    print(f"tau (mean accepted length per round): {stats.mean_accepted_length:.2f} over {stats.rounds} rounds; "
          f"{stats.drafted_tau:.2f} over the {stats.draft_rounds} rounds the head drafted in "
          f"(tree budget 'auto' decodes plain steps where drafting does not pay)")
    from hf_jetspec.cpu import cpu_class

    print(f"[{cpu_class()} CPU class, {torch.get_num_threads()} CPU threads, torch {torch.__version__}, fp32, "
          f"{new_tokens} new tokens]")


if __name__ == "__main__":
    main()
