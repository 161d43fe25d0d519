"""tau of several heads against tree budget, on the same eval prompts: the head's acceptance alone.

Greedy `generate(assistant_model=head)` at fixed tree budgets, prompt lookup off, so tau measures the head and nothing
else (no timing: tau does not depend on the machine's load, so this may run beside other work). Per prompt, tau is
(accepted drafts + rounds) / rounds; each (head, dataset, budget) gets the mean over prompts with a 95% bootstrap
interval, and every head after the first a paired difference to the first (same prompts). Where acceptance stops:
each record keeps how many rounds accepted 0, 1, 2, ... drafts, and each row of `results.json` the share of rounds
accepting at least d drafts (`reach`, pooled over its prompts), plotted at budget 8 in `reach.png`.

Usage:
    python examples/compare_heads.py --heads heads/a heads/b --datasets gsm8k_test mt_bench --limit 50 \\
        --budgets 2 4 8 16 32 64 --max-new-tokens 256 --output-dir outputs/compare
Writes `records.jsonl` (resumable), `results.json`, `tau_budget.png` and `reach.png` in the output folder.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from tqdm.auto import tqdm

import hf_jetspec
from hf_jetspec import JetSpecHead, chat_input_ids
from hf_jetspec.bench import DEFAULT_EVAL_DIR, bootstrap_ci, load_eval_prompts


def _mean(values):
    return sum(values) / len(values)


def reach(histograms: list[list[int]]) -> list[float]:
    """Share of rounds that accepted at least 1, 2, ... drafts, pooled over the histograms (rounds per length)."""
    counts = [0] * max(map(len, histograms), default=0)
    for histogram in histograms:
        for length, rounds in enumerate(histogram):
            counts[length] += rounds
    total = sum(counts)
    return [round(sum(counts[depth:]) / total, 4) for depth in range(1, len(counts))] if total else []


def summarize(records: list[dict], heads: list[str]) -> list[dict]:
    rows = []
    keys = sorted({(r["dataset"].split("/")[0], r["budget"]) for r in records})
    for dataset, budget in keys:
        chosen = {h: [r for r in records
                      if r["head"] == h and r["budget"] == budget and r["dataset"].split("/")[0] == dataset]
                  for h in heads}
        by_head = {h: {r["id"]: r["tau"] for r in chosen[h]} for h in heads}
        base = by_head[heads[0]]
        for head in heads:
            taus = list(by_head[head].values())
            if not taus:
                continue
            low, high = bootstrap_ci(taus, _mean)
            row = {"head": head, "dataset": dataset, "budget": budget, "prompts": len(taus),
                   "tau": round(_mean(taus), 3), "tau_ci": [round(low, 3), round(high, 3)]}
            if all("lengths" in r for r in chosen[head]):
                row["reach"] = reach([r["lengths"] for r in chosen[head]])
            shared = sorted(set(base) & set(by_head[head]))
            if head != heads[0] and len(shared) > 1:
                diffs = [by_head[head][i] - base[i] for i in shared]
                low, high = bootstrap_ci(diffs, _mean)
                row["diff_vs_first"] = round(_mean(diffs), 3)
                row["diff_ci"] = [round(low, 3), round(high, 3)]
            rows.append(row)
    return rows


def _plot_per_dataset(datasets: list[str], draw, path: Path) -> None:
    """One panel per dataset, side by side, `draw(ax, dataset)` filling each; saved to `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(datasets), figsize=(5 * len(datasets), 4), squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        draw(ax, dataset)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot(rows: list[dict], path: Path) -> None:
    def draw(ax, dataset):
        for head in dict.fromkeys(r["head"] for r in rows):
            points = sorted((r["budget"], r["tau"], r["tau_ci"]) for r in rows if r["head"] == head and r["dataset"] == dataset)
            if not points:
                continue
            budgets = [p[0] for p in points]
            taus = [p[1] for p in points]
            errors = [[p[1] - p[2][0] for p in points], [p[2][1] - p[1] for p in points]]
            ax.errorbar(budgets, taus, yerr=errors, marker="o", capsize=3, label=Path(head).name)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tree budget (nodes, root included)")
        ax.set_ylabel("tau (tokens per round)")
        ax.set_title(f"{dataset}: greedy, prompt lookup off (95% CI)")

    _plot_per_dataset(sorted({r["dataset"] for r in rows}), draw, path)


def plot_reach(rows: list[dict], path: Path, budget: int = 8) -> None:
    """Share of rounds accepting at least d drafts against d, one line per head, at one budget."""
    chosen = [r for r in rows if r["budget"] == budget and r.get("reach")]

    def draw(ax, dataset):
        for row in (r for r in chosen if r["dataset"] == dataset):
            ax.plot(range(1, len(row["reach"]) + 1), row["reach"], marker="o", label=Path(row["head"]).name)
        ax.set_xlabel("accepted drafts per round, at least")
        ax.set_ylabel("share of rounds")
        ax.set_ylim(0, 1)
        ax.set_title(f"{dataset}: budget {budget}, greedy, prompt lookup off")

    datasets = sorted({r["dataset"] for r in chosen})
    if datasets:
        _plot_per_dataset(datasets, draw, path)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--heads", nargs="+", required=True)
    parser.add_argument("--datasets", nargs="+", default=["gsm8k_test", "mt_bench"])
    parser.add_argument("--data-dir", default=str(DEFAULT_EVAL_DIR))
    parser.add_argument("--limit", type=int, default=50)
    parser.add_argument("--budgets", type=int, nargs="+", default=[8])
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--summarize-only", action="store_true",
                        help="only summarize and plot the output folder's records of --heads (nothing generated)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    records_path = out / "records.jsonl"
    records = [json.loads(line) for line in records_path.read_text().splitlines()] if records_path.is_file() else []
    done = {(r["head"], r["dataset"], r["id"], r["budget"]) for r in records}
    todo = []
    if not args.summarize_only:
        prompts = load_eval_prompts(args.data_dir, args.datasets, args.limit)
        todo = [(h, p, b) for h in args.heads for b in args.budgets for p in prompts
                if (h, p["dataset"], p["id"], b) not in done]
    if todo:
        target, tokenizer = hf_jetspec.load_default_target()
    heads = {}
    with records_path.open("a") as handle:
        for head_path, prompt, budget in tqdm(todo, desc="tau"):
            if head_path not in heads:
                heads[head_path] = JetSpecHead.from_pretrained(head_path).bind(target)
            head = heads[head_path]
            head.generation_config.tree_budget = budget
            head.generation_config.prompt_lookup_num_tokens = 0
            input_ids = chat_input_ids(tokenizer, prompt["prompt"])
            with torch.no_grad():
                target.generate(input_ids, do_sample=False, max_new_tokens=args.max_new_tokens, assistant_model=head)
            stats = head.last_generate_stats
            lengths = [0] * (max(stats.accepted_lengths, default=0) + 1)
            for length in stats.accepted_lengths:
                lengths[length] += 1
            record = {"head": head_path, "dataset": prompt["dataset"], "id": prompt["id"], "budget": budget,
                      "rounds": stats.rounds, "accepted": stats.accepted_drafts, "lengths": lengths,
                      "tau": (stats.accepted_drafts + stats.rounds) / max(stats.rounds, 1)}
            handle.write(json.dumps(record) + "\n")
            handle.flush()
            records.append(record)
    rows = summarize([r for r in records if r["head"] in args.heads], args.heads)
    (out / "results.json").write_text(json.dumps({"settings": vars(args), "rows": rows}, indent=2) + "\n")
    plot(rows, out / "tau_budget.png")
    plot_reach(rows, out / "reach.png")
    for row in rows:
        extra = f"  diff {row['diff_vs_first']:+.3f} {row['diff_ci']}" if "diff_vs_first" in row else ""
        print(f"{Path(row['head']).name:40s} {row['dataset']:12s} B={row['budget']:3d} tau {row['tau']:.3f} "
              f"{row['tau_ci']} n={row['prompts']}{extra}")
    return rows


if __name__ == "__main__":
    main()
