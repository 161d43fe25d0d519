"""`jetspec-bench-batch`: generated tokens per second vs batch size, plain `generate()` against JetSpec.

For every batch size the same prompts are generated in left-padded batches of that size, by plain greedy
`generate()` and by `generate(assistant_model=head)` (the head's own tree settings; with the default
`tree_budget="auto"` the cost model sizes the trees for the batch, or runs plain decoding where speculation would lose).
The two methods alternate batch by batch, so drift on a busy machine hits both alike, and every JetSpec output is
compared row by row with plain's (a mismatch is reported loudly). Each batch size starts with an untimed warm-up of
both methods (it also measures the cost model for that size).

Results in `--out`: `results.json` (settings, environment, one row per batch size, every timed call) and
`throughput.png` (tokens/s and speedup vs batch size).

Usage:
    jetspec-bench-batch --head heads/smollm2-135m-instruct-jetspec --batch-sizes 1 2 4 8 16 32 \\
        --num-prompts 32 --max-new-tokens 128 --out outputs/bench_batch
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .bench import add_target_arguments, bootstrap_ci, throughput_ratio

DEFAULT_EVAL_DIR = Path(__file__).resolve().parent / "data" / "eval"  # shipped with the package (README there)
DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16, 32)
# Used when no eval set is found (e.g. outside the project's checkout): varied lengths, so batches are padded.
FALLBACK_PROMPTS = (
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain photosynthesis in two sentences.",
    "List three prime numbers greater than 10 and say why each one is prime.",
    "Give me a recipe for pancakes.",
    "Translate 'good morning' into Spanish, French and German.",
    "A train leaves at 3 pm and travels 120 km at 80 km/h. When does it arrive?",
    "Write a Python function that returns the n-th Fibonacci number.",
)


def load_prompts(data_dir: str | Path | None, datasets: list[str] | None, count: int) -> tuple[list[str], str]:
    """`count` prompts taken in turn from each eval set (`<data_dir>/<name>.jsonl`, rows with a `prompt`), or from
    [`FALLBACK_PROMPTS`] when there is no such folder; returns `(prompts, source)`."""
    data_dir = Path(data_dir) if data_dir else None
    pools: list[list[str]] = []
    if data_dir is not None and data_dir.is_dir():
        paths = [data_dir / f"{name}.jsonl" for name in datasets] if datasets else sorted(data_dir.glob("*.jsonl"))
        for path in paths:
            if not path.is_file():
                raise FileNotFoundError(f"eval set {path} not found (pass --data-dir, or --datasets from that folder)")
            rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
            pools.append([row["prompt"] for row in rows if isinstance(row.get("prompt"), str)])
    if not any(pools):
        pools, source = [list(FALLBACK_PROMPTS)], "fallback"
    else:
        source = str(data_dir)
    prompts, index = [], 0
    while len(prompts) < count:  # round-robin over the sets, cycling when they run out
        pool = pools[index % len(pools)]
        if pool:
            prompts.append(pool[(index // len(pools)) % len(pool)])
        index += 1
    return prompts, source


def left_pad(sequences: list[list[int]], pad_token_id: int, device) -> tuple[torch.LongTensor, torch.LongTensor]:
    """`(input_ids, attention_mask)` of a left-padded batch."""
    width = max(len(sequence) for sequence in sequences)
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros(len(sequences), width, dtype=torch.long)
    for row, sequence in enumerate(sequences):
        input_ids[row, width - len(sequence) :] = torch.tensor(sequence)
        mask[row, width - len(sequence) :] = 1
    return input_ids.to(device), mask.to(device)


def generated_tokens(output: torch.LongTensor, prompt_width: int, stop_ids: set[int]) -> list[list[int]]:
    """Each row's new tokens up to and including its first stop token (what it really generated, padding cut)."""
    rows = []
    for sequence in output[:, prompt_width:].tolist():
        end = next((i + 1 for i, token in enumerate(sequence) if token in stop_ids), len(sequence))
        rows.append(sequence[:end])
    return rows


def run_batch(
    model, head, input_ids, attention_mask, method: str, max_new_tokens: int, pad_token_id: int
) -> tuple[torch.LongTensor, float]:
    """One timed greedy `generate()` call of `method` ("plain" or "jetspec"); returns `(output, seconds)`."""
    kwargs = {"assistant_model": head} if method == "jetspec" else {}
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)
    start = time.perf_counter()
    output = model.generate(input_ids, attention_mask=attention_mask, do_sample=False, max_new_tokens=max_new_tokens,
                            pad_token_id=pad_token_id, **kwargs)
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)
    return output, time.perf_counter() - start


def summarize(records: list[dict], batch_sizes: list[int]) -> list[dict]:
    """One row per batch size: tokens/s of each method, JetSpec's speedup and what it did."""
    rows = []
    for batch_size in batch_sizes:
        row = {"batch_size": batch_size}
        for method in ("plain", "jetspec"):
            runs = [r for r in records if r["batch_size"] == batch_size and r["method"] == method]
            tokens, seconds = sum(r["new_tokens"] for r in runs), sum(r["seconds"] for r in runs)
            row[f"{method}_tokens_per_s"] = tokens / seconds if seconds else 0.0
            row[f"{method}_seconds"] = seconds
            row[f"{method}_new_tokens"] = tokens
        spec = [r for r in records if r["batch_size"] == batch_size and r["method"] == "jetspec"]
        row["speedup"] = row["jetspec_tokens_per_s"] / row["plain_tokens_per_s"] if row["plain_tokens_per_s"] else 0.0
        plain_runs = {r["batch"]: r for r in records if r["batch_size"] == batch_size and r["method"] == "plain"}
        pairs = [(plain_runs[r["batch"]], r) for r in spec if r["batch"] in plain_runs]
        row["speedup_ci"] = list(bootstrap_ci(pairs, throughput_ratio))  # 95%, batches resampled as pairs
        row["speculated_fraction"] = sum(r["speculated"] for r in spec) / len(spec) if spec else 0.0
        speculated = [r for r in spec if r["speculated"]]
        row_rounds = sum(r["row_rounds"] for r in speculated)
        if row_rounds:
            row["tau"] = sum(r["row_rounds"] * r["tau"] for r in speculated) / row_rounds
            row["tree_size"] = sum(r["row_rounds"] * r["tree_size"] for r in speculated) / row_rounds
        row["mismatches"] = sum(r["mismatches"] for r in spec)
        rows.append(row)
    return rows


def plot(rows: list[dict], path: Path, title: str) -> None:
    from .extras import require

    require("bench", "Benchmark plots")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [row["batch_size"] for row in rows]
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot(sizes, [row["plain_tokens_per_s"] for row in rows], "o-", label="plain generate()")
    left.plot(sizes, [row["jetspec_tokens_per_s"] for row in rows], "s-", label="JetSpec")
    left.set(xscale="log", xlabel="batch size", ylabel="generated tokens / s", title="throughput")
    speedups = [row["speedup"] for row in rows]
    intervals = [row.get("speedup_ci", [row["speedup"]] * 2) for row in rows]
    right.errorbar(sizes, speedups, yerr=[[max(s - low, 0.0) for s, (low, _) in zip(speedups, intervals)],
                                          [max(high - s, 0.0) for s, (_, high) in zip(speedups, intervals)]],
                   fmt="s-", color="C1", capsize=3, label="95% interval over batches")
    right.axhline(1.0, color="grey", linestyle="--", linewidth=1)
    right.set(xscale="log", xlabel="batch size", ylabel="JetSpec / plain", title="speedup")
    for axis in (left, right):
        axis.set_xticks(sizes, [str(size) for size in sizes])
        axis.minorticks_off()
        axis.grid(alpha=0.3)
    left.legend()
    right.legend()
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_target_arguments(parser)
    parser.add_argument("--head", default=None,
                        help="JetSpec head directory or repo id (default: an untrained head, for a smoke test only)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=list(DEFAULT_BATCH_SIZES))
    parser.add_argument("--num-prompts", type=int, default=None,
                        help="prompts generated at every batch size (default: the largest batch size)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--data-dir", default=str(DEFAULT_EVAL_DIR),
                        help="folder of <name>.jsonl eval sets (fallback prompts when it does not exist)")
    parser.add_argument("--datasets", nargs="+", default=None, help="eval sets to draw from (default: all)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--out", default="outputs/bench_batch", help="output folder")
    args = parser.parse_args(argv)
    if min(args.batch_sizes) < 1 or args.max_new_tokens < 1:
        parser.error("batch sizes and --max-new-tokens must be >= 1")

    from hf_jetspec import JetSpecHead, chat_input_ids

    from .bench import environment, load_target, target_arguments

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_target(args.target, **target_arguments(args))
    if args.head:
        head = JetSpecHead.from_pretrained(args.head).bind(model)  # follows the target
    else:
        tqdm.write("no --head: using an untrained head (its drafts are rarely accepted; a smoke test, not a benchmark)")
        head = JetSpecHead.from_target(model)
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = model.generation_config.eos_token_id
    stop_ids = set(eos if isinstance(eos, list) else [eos]) - {None}

    batch_sizes = sorted(set(args.batch_sizes))
    num_prompts = args.num_prompts or max(batch_sizes)
    prompts, source = load_prompts(args.data_dir, args.datasets, num_prompts)
    encoded = [chat_input_ids(tokenizer, prompt)[0].tolist() for prompt in prompts]
    settings = {"target": args.target, "head": args.head, "batch_sizes": batch_sizes, "num_prompts": num_prompts,
                "max_new_tokens": args.max_new_tokens, "prompts": source, "datasets": args.datasets, "greedy": True,
                "head_tree": {"tree_budget": head.generation_config.tree_budget,
                              "tree_topk": head.generation_config.tree_topk}}
    output_dir = Path(args.out)
    output_dir.mkdir(parents=True, exist_ok=True)

    records, mismatches = [], 0
    total = sum(-(-num_prompts // size) for size in batch_sizes)
    with tqdm(total=total, desc="batches") as progress:
        for batch_size in batch_sizes:
            progress.set_postfix(batch_size=batch_size)
            warm_up = left_pad([encoded[i % len(encoded)] for i in range(batch_size)], pad_token_id, model.device)
            for method in ("plain", "jetspec"):  # untimed: also measures the cost model at this batch size
                run_batch(model, head, *warm_up, method, min(8, args.max_new_tokens), pad_token_id)
            for batch_index, first in enumerate(range(0, num_prompts, batch_size)):
                input_ids, mask = left_pad(encoded[first : first + batch_size], pad_token_id, model.device)
                runs = {}
                for method in ("plain", "jetspec") if batch_index % 2 == 0 else ("jetspec", "plain"):
                    output, seconds = run_batch(model, head, input_ids, mask, method, args.max_new_tokens, pad_token_id)
                    tokens = generated_tokens(output, input_ids.shape[1], stop_ids)
                    runs[method] = {"batch_size": batch_size, "batch": batch_index, "method": method,
                                    "rows": input_ids.shape[0], "seconds": seconds,
                                    "new_tokens": sum(len(row) for row in tokens), "output": output}
                    if method == "jetspec":
                        stats = head.last_generate_stats
                        runs[method].update(speculated=bool(getattr(stats, "speculated", True)),
                                            row_rounds=getattr(stats, "row_rounds", stats.rounds),
                                            tau=stats.mean_accepted_length, tree_size=stats.mean_tree_size,
                                            accepted_drafts=stats.accepted_drafts,
                                            accepted_lookup=stats.accepted_lookup,
                                            # the plan of the call (see `planning.plan_batch`)
                                            expected_speedup=getattr(stats, "expected_speedup", None),
                                            max_nodes=getattr(stats, "max_nodes", None),
                                            drafting_stopped_at=getattr(stats, "drafting_stopped_at", None))
                plain, spec = runs["plain"].pop("output"), runs["jetspec"].pop("output")
                wrong = [row for row in range(plain.shape[0])
                         if plain.shape != spec.shape or not torch.equal(plain[row], spec[row])]
                runs["jetspec"]["mismatches"] = len(wrong)
                records.extend(runs.values())
                if wrong:
                    mismatches += len(wrong)
                    tqdm.write(f"MISMATCH: batch size {batch_size}, batch {batch_index}: rows {wrong} differ from plain")
                progress.update(1)

    summary = summarize(records, batch_sizes)
    results = {"settings": settings, "environment": environment(model, torch.get_num_threads()), "summary": summary, "mismatches": mismatches,
               "records": records}
    (output_dir / "results.json").write_text(json.dumps(results, indent=1))
    plot(summary, output_dir / "throughput.png",
         f"{args.target if args.target != 'default' else 'SmolLM2-135M-Instruct'}, {args.max_new_tokens} new tokens")
    for row in summary:
        low, high = row["speedup_ci"]
        tqdm.write(f"batch {row['batch_size']:>3}: plain {row['plain_tokens_per_s']:8.1f} tok/s, JetSpec "
                   f"{row['jetspec_tokens_per_s']:8.1f} tok/s ({row['speedup']:.2f}x, {low:.2f}-{high:.2f}, speculated in "
                   f"{row['speculated_fraction']:.0%} of calls)")
    if mismatches:
        tqdm.write(f"WARNING: {mismatches} rows differ from plain generate() -- JetSpec must match it exactly")
    return results


def cli() -> None:
    """Console entry point (`jetspec-bench-batch`): runs [`main`] and exits 0."""
    main()


if __name__ == "__main__":
    cli()
