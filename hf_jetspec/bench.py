"""`jetspec-bench`: tau and speedup of JetSpec against plain `generate()` and Transformers' own speculative methods,
measured side by side in one process, on the same prompts, in interleaved order, with bootstrap confidence intervals.

Every (prompt, method) run is appended to `records.jsonl` as it finishes, so an interrupted benchmark resumes (also
with a larger `--limit`: prompts run round-robin over the datasets, so a part run covers each alike). Every
lossless method's output is compared token by token with plain greedy `generate()` on the same prompt; a mismatch is
reported loudly (and recorded). Results: `results.json` (settings, hardware, versions, per-prompt records, summary),
`results.md` (the table), `speedup.png` (speedup per dataset with CI bars), `budget.png` (tau and tokens/s vs tree
budget) and `rounds.png` (where a round's time goes, per JetSpec method).

Methods:
    plain            `generate()` (the baseline every ratio is taken against); greedy, or `--temperature T` sampling
                     seeded per prompt (the same seed for every method)
    jetspec          the head's own tree settings (`head.generation_config`)
    jetspec:B        tree budget B (nodes per tree, root included), or `jetspec:auto` (sized per round, see planning.py)
    jetspec:head     `"auto"` without prompt-lookup proposals in the tree (the head alone: the ablation of lookup.py)
    chain            the same head drafting its single most likely path (tree_topk=1, depth = block_size - 1, no
                     prompt lookup): the tree ablation, and what vLLM's DFlash drafter drafts (`chain_settings`)
    prompt_lookup    Transformers' prompt-lookup decoding (`prompt_lookup_num_tokens=10`)
    assisted         Transformers' assisted generation with a smaller draft model sharing the target's tokenizer
                     (`--draft-model`; the default target, SmolLM2-135M, has no smaller sibling installed here)
    jetspec@NAME     another head at its own tree settings, given with `--compare-heads` (NAME: its folder's name,
                     or the part of a repo id after the last `/`); added after `jetspec` when not listed. Its row
                     also carries the speedup over `jetspec` (the `--head`) paired prompt by prompt: two heads side by
                     side in one run

Usage:
    jetspec-bench --head heads/smollm2-135m-instruct-jetspec --datasets gsm8k_test mt_bench --limit 50 \\
        --max-new-tokens 256 --methods plain jetspec prompt_lookup --output-dir outputs/bench
    jetspec-bench --head heads/smollm2-135m-instruct-jetspec --compare-heads heads/previous/smollm2-135m-instruct-jetspec-llama \\
        --methods plain jetspec prompt_lookup --output-dir outputs/bench-heads
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import time
import zlib
from pathlib import Path

import torch
from tqdm.auto import tqdm

DEFAULT_EVAL_DIR = Path(__file__).resolve().parent / "data" / "eval"  # shipped with the package (README there)


# ----------------------------------------------------------------------------------------------------------- data
def load_eval_prompts(data_dir: str | Path, datasets: list[str], limit: int | None) -> list[dict]:
    """The first `limit` prompts of each dataset (`<data_dir>/<name>.jsonl`, rows with `id` and `prompt`).

    `spec_bench` is split into its categories (`spec_bench/<task>`), each limited separately.
    """
    data_dir = Path(data_dir)
    prompts = []
    for name in datasets:
        path = data_dir / f"{name}.jsonl"
        if not path.is_file():
            raise FileNotFoundError(f"eval set {path} not found: pass --data-dir (a folder of <name>.jsonl files)")
        counts: dict[str, int] = {}
        for line_number, line in enumerate(path.read_text(encoding="utf-8").split("\n")):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{line_number + 1} is not valid JSON ({error})") from None
            if not isinstance(row.get("prompt"), str):
                raise ValueError(f"{path}:{line_number + 1} has no string 'prompt'")
            dataset = f"{name}/{row['task']}" if name == "spec_bench" and "task" in row else name
            if limit is not None and counts.get(dataset, 0) >= limit:
                continue
            counts[dataset] = counts.get(dataset, 0) + 1
            prompts.append({"dataset": dataset, "id": str(row.get("id", f"{name}-{line_number}")),
                            "prompt": row["prompt"]})
    return prompts


def interleaved(prompts: list[dict]) -> list[dict]:
    """`prompts` in round-robin order over their datasets (the first of each, then the second, ...), so that a run
    stopped part way, or resumed with a larger `--limit`, has covered every dataset alike."""
    by_dataset: dict[str, list[dict]] = {}
    for row in prompts:
        by_dataset.setdefault(row["dataset"], []).append(row)
    columns = list(by_dataset.values())
    return [column[i] for i in range(max(map(len, columns), default=0)) for column in columns if i < len(column)]


def same_settings(recorded: dict | None, settings: dict) -> bool:
    """Whether a record was made with `settings`, whatever its run's `--limit` (a prompt's run does not depend on it)."""
    if not isinstance(recorded, dict):
        return False
    return {k: v for k, v in recorded.items() if k != "limit"} == {k: v for k, v in settings.items() if k != "limit"}


# -------------------------------------------------------------------------------------------------------- methods
def head_name(name_or_path: str) -> str:
    """The `jetspec@NAME` name of a `--compare-heads` entry: its folder's name, or a repo id's last part."""
    return Path(str(name_or_path).rstrip("/")).name


def method_kwargs(method: str, head, draft_model=None, other_heads: dict | None = None) -> dict:
    """`generate()` keyword arguments of a method name (see the module docstring); `other_heads` maps the names of
    `jetspec@NAME` methods to their bound heads."""
    if method.startswith("jetspec@"):
        name = method.split("@", 1)[1]
        if name not in (other_heads or {}):
            known = ", ".join(sorted(other_heads or {})) or "none"
            raise ValueError(f"method {method!r} names no head given with --compare-heads (given: {known}); pass "
                             f"--compare-heads <path>/{name}")
        return {"assistant_model": other_heads[name]}
    if method == "plain":
        return {}
    if method == "prompt_lookup":
        return {"prompt_lookup_num_tokens": 10}
    if method == "assisted":
        if draft_model is None:
            raise ValueError("method 'assisted' needs a draft model sharing the target's tokenizer: pass --draft-model")
        return {"assistant_model": draft_model}
    if head is None:
        raise ValueError(f"method {method!r} needs a head: pass --head")
    if method == "jetspec":
        return {"assistant_model": head}
    if method == "chain":
        from .vllm_export import chain_settings

        return {"assistant_model": head, **chain_settings(head)}
    if method == "jetspec:head":
        return {"assistant_model": head, "tree_budget": "auto", "prompt_lookup_num_tokens": 0}
    if method.startswith("jetspec:"):
        budget = method.split(":", 1)[1]
        if budget == "auto":
            return {"assistant_model": head, "tree_budget": "auto"}
        if not budget.isdigit() or int(budget) < 1:
            raise ValueError(f"bad method {method!r}: expected jetspec:<budget> or jetspec:auto, e.g. jetspec:16")
        return {"assistant_model": head, "tree_budget": int(budget)}
    raise ValueError(
        f"unknown method {method!r}; known: plain, jetspec, jetspec:<budget>, jetspec:auto, jetspec:head, chain, "
        "prompt_lookup, assisted, jetspec@<name of a --compare-heads head>"
    )


ROUND_PHASES = ("draft", "verify", "accept", "cache", "overhead")


def is_jetspec(method: str) -> bool:
    return method == "jetspec" or method == "chain" or method.startswith(("jetspec:", "jetspec@"))


def prompt_seed(dataset: str, prompt_id) -> int:
    """The sampling seed of a prompt: the same for every method, so seeded runs can be compared token by token."""
    return zlib.crc32(f"{dataset}/{prompt_id}".encode())


def run_one(model, head, input_ids: torch.Tensor, method: str, max_new_tokens: int, draft_model=None,
            temperature: float = 0.0, seed: int = 0, other_heads: dict | None = None) -> dict:
    """One `generate()` call: greedy, or sampling at `temperature` seeded with `seed` (`torch.manual_seed`)."""
    kwargs = method_kwargs(method, head, draft_model, other_heads)
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    tree_settings = {key: kwargs.pop(key) for key in ("tree_budget", "tree_topk", "prompt_lookup_num_tokens")
                     if key in kwargs and kwargs.get("assistant_model") is head}
    saved = {}
    if tree_settings:
        saved = {key: getattr(head.generation_config, key, None) for key in tree_settings}
        for key, value in tree_settings.items():
            setattr(head.generation_config, key, value)
    try:
        if temperature > 0:
            torch.manual_seed(seed)
        start = time.perf_counter()
        output = model.generate(input_ids, max_new_tokens=max_new_tokens, **sampling, **kwargs)
        seconds = time.perf_counter() - start
    finally:
        for key, value in saved.items():
            setattr(head.generation_config, key, value)
    tokens = output[0, input_ids.shape[1] :].tolist()
    record = {"method": method, "new_tokens": len(tokens), "seconds": seconds, "tokens": tokens}
    assistant = kwargs.get("assistant_model")
    if assistant is not None and (assistant is head or assistant in (other_heads or {}).values()):
        stats = assistant.last_generate_stats
        record.update(rounds=stats.rounds, accepted_drafts=stats.accepted_drafts, tree_budget=stats.tree_budget,
                      tree_topk=stats.tree_topk, tau=stats.mean_accepted_length, drafted_nodes=stats.drafted_nodes,
                      draft_rounds=stats.draft_rounds, lookup_nodes=stats.lookup_nodes,
                      accepted_lookup=stats.accepted_lookup,
                      time_prefill=stats.time_prefill,
                      **{f"time_{phase}": getattr(stats, f"time_{phase}") for phase in ROUND_PHASES})
    return record


# -------------------------------------------------------------------------------------------------------- summary
def bootstrap_ci(values: list[float], statistic, resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile-bootstrap interval of `statistic(sample)` over resampled prompts."""
    if len(values) < 2:
        value = statistic(values) if values else float("nan")
        return value, value
    rng = random.Random(seed)
    stats = sorted(statistic([values[rng.randrange(len(values))] for _ in values]) for _ in range(resamples))
    return stats[int(0.025 * resamples)], stats[min(resamples - 1, int(0.975 * resamples))]


def throughput_ratio(pairs) -> float:
    """Pooled tokens/s of the method over pooled tokens/s of plain generate() on the same prompts (for identical
    outputs, as greedy lossless methods give, this is plain time / method time)."""
    plain = sum(p["new_tokens"] for p, _ in pairs) / max(sum(p["seconds"] for p, _ in pairs), 1e-12)
    method = sum(m["new_tokens"] for _, m in pairs) / max(sum(m["seconds"] for _, m in pairs), 1e-12)
    return method / plain


def summarize(records: list[dict], methods: list[str], greedy: bool = True) -> list[dict]:
    """Per dataset (and `all`) and method: tokens/s, tau, speedup over plain with 95% bootstrap CIs, mismatches
    (outputs differing from plain `generate()`: every method when greedy; under sampling the JetSpec methods, which
    with the same seed must give the same tokens; `None` where outputs are not comparable)."""
    by_prompt: dict[tuple[str, str], dict[str, dict]] = {}
    for record in records:
        by_prompt.setdefault((record["dataset"], record["id"]), {})[record["method"]] = record
    complete = {key: runs for key, runs in by_prompt.items() if all(m in runs for m in methods)}
    datasets = sorted({dataset for dataset, _ in complete})
    rows = []
    for dataset in datasets + ["all"]:
        prompts = [runs for (d, _), runs in complete.items() if dataset in ("all", d)]
        if not prompts:
            continue
        for method in methods:
            pairs = [(runs["plain"], runs[method]) for runs in prompts]
            plain_s = sum(p["seconds"] for p, _ in pairs)
            method_s = sum(m["seconds"] for _, m in pairs)
            tokens = sum(m["new_tokens"] for _, m in pairs)
            row = {
                "dataset": dataset, "method": method, "prompts": len(pairs),
                "tokens_per_s": tokens / method_s if method_s else float("nan"),
                # tokens/s over plain's tokens/s, pooled over prompts (= plain time / method time for equal outputs)
                "speedup": throughput_ratio(pairs) if method_s and plain_s else float("nan"),
                "speedup_ci95": bootstrap_ci(pairs, throughput_ratio),
                "mismatches": (sum(m["tokens"] != p["tokens"] for p, m in pairs)
                               if greedy or is_jetspec(method) or method == "plain" else None),
            }
            if "prompt_lookup" in methods and is_jetspec(method):  # paired: the strongest baseline without a model
                versus = [(runs["prompt_lookup"], runs[method]) for runs in prompts]
                row["vs_prompt_lookup"] = throughput_ratio(versus)
                row["vs_prompt_lookup_ci95"] = bootstrap_ci(versus, throughput_ratio)
            if method.startswith("jetspec@") and "jetspec" in methods:  # two heads, paired prompt by prompt
                versus = [(runs["jetspec"], runs[method]) for runs in prompts]
                row["vs_jetspec"] = throughput_ratio(versus)
                row["vs_jetspec_ci95"] = bootstrap_ci(versus, throughput_ratio)
            if all("rounds" in m for _, m in pairs):
                taus = [m["tau"] for _, m in pairs]
                row["tau"] = sum(taus) / len(taus)  # mean over prompts of tokens per round
                row["tau_ci95"] = bootstrap_ci(taus, lambda s: sum(s) / len(s))
                rounds = sum(m["rounds"] for _, m in pairs)
                row["tau_pooled"] = (sum(m["accepted_drafts"] for _, m in pairs) + rounds) / max(rounds, 1)
                if all("draft_rounds" in m for _, m in pairs):  # tau of the rounds the head drafted
                    drafted = sum(m["draft_rounds"] for _, m in pairs)
                    row["drafted_tau"] = (sum(m["accepted_drafts"] for _, m in pairs) + drafted) / max(drafted, 1)
                    row["draft_round_share"] = drafted / max(rounds, 1)
                if all("drafted_nodes" in m for _, m in pairs):
                    row["tree_size"] = (sum(m["drafted_nodes"] for _, m in pairs) + rounds) / max(rounds, 1)
                    row["ms_per_round"] = {phase: 1000 * sum(m[f"time_{phase}"] for _, m in pairs) / max(rounds, 1)
                                           for phase in ROUND_PHASES}
            rows.append(row)
    return rows


def markdown_table(rows: list[dict]) -> str:
    """tau: tokens per round over all rounds; drafted tau: over the rounds the head drafted (`"auto"` runs plain
    steps where drafting does not pay); nodes: verified tree nodes per round, root included."""
    versus = any("vs_prompt_lookup" in row for row in rows)
    heads = any("vs_jetspec" in row for row in rows)
    lines = ["| dataset | method | prompts | tau (95% CI) | drafted tau | nodes/round | tokens/s | speedup vs plain (95% CI) |"
             + (" vs prompt lookup (95% CI) |" if versus else "") + (" vs jetspec (95% CI) |" if heads else "")
             + " mismatches |",
             "|---|---|---|---|---|---|---|---|" + ("---|" if versus else "") + ("---|" if heads else "") + "---|"]

    def ratio(row, key):
        if key not in row:
            return " - |"
        return f" {row[key]:.2f}x ({row[key + '_ci95'][0]:.2f}-{row[key + '_ci95'][1]:.2f}) |"

    for row in rows:
        tau = f"{row['tau']:.2f} ({row['tau_ci95'][0]:.2f}-{row['tau_ci95'][1]:.2f})" if "tau" in row else "-"
        drafted = f"{row['drafted_tau']:.2f}" if "drafted_tau" in row else "-"
        nodes = f"{row['tree_size']:.1f}" if "tree_size" in row else "-"
        low, high = row["speedup_ci95"]
        cell = (ratio(row, "vs_prompt_lookup") if versus else "") + (ratio(row, "vs_jetspec") if heads else "")
        lines.append(f"| {row['dataset']} | {row['method']} | {row['prompts']} | {tau} | {drafted} | {nodes} | "
                     f"{row['tokens_per_s']:.1f} | {row['speedup']:.2f}x ({low:.2f}-{high:.2f}) |{cell} "
                     f"{'-' if row['mismatches'] is None else row['mismatches']} |")
    return "\n".join(lines) + "\n"


def plot_speedup(rows: list[dict], path: Path) -> None:
    from .extras import require

    require("bench", "Benchmark plots")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [m for m in dict.fromkeys(row["method"] for row in rows) if m != "plain"]
    datasets = list(dict.fromkeys(row["dataset"] for row in rows))
    figure, axis = plt.subplots(figsize=(max(6, 1.4 * len(datasets) * max(1, len(methods)) / 2), 4))
    width = 0.8 / max(1, len(methods))
    for index, method in enumerate(methods):
        points = [next((r for r in rows if r["dataset"] == d and r["method"] == method), None) for d in datasets]
        xs = [i + (index - (len(methods) - 1) / 2) * width for i in range(len(datasets))]
        values = [p["speedup"] if p else 0 for p in points]
        errors = [[p["speedup"] - p["speedup_ci95"][0] if p else 0 for p in points],
                  [p["speedup_ci95"][1] - p["speedup"] if p else 0 for p in points]]
        axis.bar(xs, values, width, yerr=errors, capsize=3, label=method)
    axis.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    axis.set_xticks(range(len(datasets)), datasets, rotation=20, ha="right")
    axis.set_ylabel("speedup over plain generate() (95% CI)")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _budget_of(method: str) -> int | None:
    budget = method.split(":", 1)[1] if method.startswith("jetspec:") else ""
    return int(budget) if budget.isdigit() else None


# methods sized per round, drawn as markers at their mean tree size next to the fixed budgets' lines
AUTO_MARKERS = {"jetspec": "*", "jetspec:auto": "P", "jetspec:head": "D"}


def plot_budget(rows: list[dict], path: Path) -> bool:
    """tau and tokens/s vs tree budget (`jetspec:B` methods), one line per dataset; `jetspec`, `jetspec:auto` and
    `jetspec:head` as markers at their mean tree size. Returns False (no file) when fewer than two budgets were run."""
    from .extras import require

    require("bench", "Benchmark plots")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fixed = [r for r in rows if _budget_of(r["method"]) is not None and "tau" in r]
    if len({r["method"] for r in fixed}) < 2:
        return False
    figure, (tau_axis, speed_axis) = plt.subplots(1, 2, figsize=(10, 4))
    for index, dataset in enumerate(dict.fromkeys(r["dataset"] for r in fixed)):
        points = sorted((_budget_of(r["method"]), r) for r in fixed if r["dataset"] == dataset)
        color = f"C{index}"
        budgets = [b for b, _ in points]
        tau_axis.errorbar(budgets, [r["tau"] for _, r in points], color=color, marker="o", label=dataset,
                          yerr=[[r["tau"] - r["tau_ci95"][0] for _, r in points], [r["tau_ci95"][1] - r["tau"] for _, r in points]])
        speed_axis.plot(budgets, [r["tokens_per_s"] for _, r in points], color=color, marker="o", label=dataset)
        plain = next((r for r in rows if r["dataset"] == dataset and r["method"] == "plain"), None)
        if plain:
            speed_axis.axhline(plain["tokens_per_s"], color=color, linestyle=":", linewidth=1)
        for method, marker in AUTO_MARKERS.items():
            auto = next((r for r in rows if r["dataset"] == dataset and r["method"] == method and "tree_size" in r), None)
            if auto:
                for axis, value in ((tau_axis, auto["tau"]), (speed_axis, auto["tokens_per_s"])):
                    axis.plot([auto["tree_size"]], [value], color=color, marker=marker, markersize=10, linestyle="",
                              label=f"{dataset}: {method}")
    for axis, label in ((tau_axis, "tau (tokens per round, 95% CI)"), (speed_axis, "tokens/s (dotted: plain)")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("tree budget (nodes, root included); markers: mean size")
        axis.set_ylabel(label)
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True


def plot_rounds(rows: list[dict], path: Path) -> bool:
    """Stacked milliseconds per round by phase for every JetSpec method (all datasets pooled)."""
    from .extras import require

    require("bench", "Benchmark plots")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pooled = [r for r in rows if r["dataset"] == "all" and "ms_per_round" in r]
    if not pooled:
        return False
    figure, axis = plt.subplots(figsize=(max(5, 1.2 * len(pooled)), 4))
    bottom = [0.0] * len(pooled)
    for phase in ROUND_PHASES:
        values = [r["ms_per_round"][phase] for r in pooled]
        axis.bar([r["method"] for r in pooled], values, bottom=bottom, label=phase)
        bottom = [b + v for b, v in zip(bottom, values)]
    axis.set_ylabel("ms per round")
    axis.set_title("JetSpec round time by phase")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True


def environment(model, threads: int) -> dict:
    import transformers

    from .cpu import cpu_description

    return {
        "machine": platform.machine(), "processor": platform.processor() or platform.machine(),
        "cpu_count": __import__("os").cpu_count(), "torch_threads": threads,
        "device": str(model.device), "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
        "dtype": str(model.dtype), "attn_implementation": model.config._attn_implementation,
        **cpu_description(),
    }


def add_target_arguments(parser: argparse.ArgumentParser) -> None:
    """`--target`, `--device`, `--dtype` and `--attn-implementation`, as every CLI that loads a target takes them."""
    parser.add_argument("--target", default="default", help="'default' (SmolLM2-135M-Instruct GGUF) or a model path")
    parser.add_argument("--device", default=None, help="e.g. cpu, cuda, cuda:1 (default: cpu, or what --device-map gives)")
    parser.add_argument("--device-map", default=None, help="Transformers' device_map for the target, e.g. auto")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="the target's dtype (default: float32 for the default target, the checkpoint's otherwise)")
    parser.add_argument("--attn-implementation", default="sdpa", choices=["sdpa", "eager", "jetspec_tree"])


def load_target(target: str, device: str | None = None, dtype: str | torch.dtype | None = None,
                attn_implementation: str = "sdpa", device_map: str | None = None):
    """`(model, tokenizer)`: the embedded default target for `"default"`, else a causal LM path or repo id, in eval
    mode, on `device` (or spread by `device_map`), in `dtype`, with `attn_implementation`."""
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    if target == "default":
        import hf_jetspec

        model, tokenizer = hf_jetspec.load_default_target(dtype=dtype, attn_implementation=attn_implementation)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(target, attn_implementation=attn_implementation,
                                                     dtype=dtype or "auto", device_map=device_map).eval()
        tokenizer = AutoTokenizer.from_pretrained(target)
    if device is not None and device_map is None:
        model.to(device)
    return model, tokenizer


def target_arguments(args: argparse.Namespace) -> dict:
    return {"device": args.device, "dtype": args.dtype, "attn_implementation": args.attn_implementation,
            "device_map": args.device_map}


# ------------------------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_target_arguments(parser)
    parser.add_argument("--head", default=None, help="JetSpec head directory or repo id")
    parser.add_argument("--compare-heads", nargs="+", default=[],
                        help="more head directories or repo ids, run as methods jetspec@<folder name> beside --head")
    parser.add_argument("--draft-model", default=None,
                        help="a smaller causal LM with the target's tokenizer, for the 'assisted' method")
    parser.add_argument("--data-dir", default=str(DEFAULT_EVAL_DIR))
    parser.add_argument("--datasets", nargs="+", default=["gsm8k_test", "mt_bench"])
    parser.add_argument("--limit", type=int, default=50, help="prompts per dataset (per Spec-Bench category)")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--methods", nargs="+", default=["plain", "jetspec", "prompt_lookup"])
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="0: greedy (default); > 0: sampling at this temperature, seeded per prompt (same seed "
                        "for every method)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--output-dir", default="outputs/bench")
    args = parser.parse_args(argv)

    from hf_jetspec import JetSpecHead, chat_input_ids

    methods = list(dict.fromkeys(["plain"] + args.methods))
    if args.compare_heads and not args.head:
        raise ValueError("--compare-heads runs beside --head (method jetspec): pass --head too")
    names = [head_name(path) for path in args.compare_heads]
    if len(set(names)) != len(names) or head_name(args.head or "") in names:
        raise ValueError(f"--compare-heads need distinct folder names, unlike --head's: {names}")
    if names:  # each compared head right after `jetspec`, unless listed
        extra = [f"jetspec@{name}" for name in names if f"jetspec@{name}" not in methods]
        at = methods.index("jetspec") + 1 if "jetspec" in methods else len(methods)
        methods = methods[:at] + extra + methods[at:]
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_target(args.target, **target_arguments(args))
    head = JetSpecHead.from_pretrained(args.head).bind(model) if args.head else None  # follows the target
    other_heads = {name: JetSpecHead.from_pretrained(path).bind(model) for name, path in zip(names, args.compare_heads)}
    draft_model = None
    if args.draft_model:
        from transformers import AutoModelForCausalLM

        draft_model = AutoModelForCausalLM.from_pretrained(args.draft_model, dtype=model.dtype).to(model.device).eval()
    for method in methods:
        method_kwargs(method, head, draft_model, other_heads)  # fail on a bad method name before any work

    prompts = interleaved(load_eval_prompts(args.data_dir, args.datasets, args.limit))
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    settings = {"target": args.target, "head": args.head, "draft_model": args.draft_model,
                **({"compare_heads": dict(zip(names, args.compare_heads))} if names else {}),
                "datasets": args.datasets, "limit": args.limit,
                "max_new_tokens": args.max_new_tokens, "methods": methods, "greedy": args.temperature <= 0,
                "head_tree": {"tree_budget": getattr(head.generation_config, "tree_budget", None),
                              "tree_topk": getattr(head.generation_config, "tree_topk", None),
                              "prompt_lookup_num_tokens": getattr(head.generation_config, "prompt_lookup_num_tokens",
                                                                  None)} if head else None}
    if args.temperature > 0:
        settings["temperature"] = args.temperature
    records_path = output_dir / "records.jsonl"
    records = []
    if records_path.is_file():  # resume: keep runs made with the same settings (any limit) on the prompts run now
        selected = {(row["dataset"], row["id"]) for row in prompts}
        for line in records_path.read_text().split("\n"):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if (same_settings(record.get("settings"), settings)
                    and (record.get("dataset"), record.get("id")) in selected):
                records.append(record)
    done = {(r["dataset"], r["id"], r["method"]) for r in records}

    warm_up = chat_input_ids(tokenizer, "Hello").to(model.device)
    for method in methods:  # warm-up (also measures the verify cost that tree_budget="auto" uses, once)
        run_one(model, head, warm_up, method, 4, draft_model, other_heads=other_heads)
    mismatches = 0
    with records_path.open("a") as handle:
        for index, row in enumerate(tqdm(prompts, desc="prompts")):
            input_ids = chat_input_ids(tokenizer, row["prompt"]).to(model.device)
            order = methods[index % len(methods):] + methods[: index % len(methods)]  # rotate: no method always first
            runs = {r["method"]: r for r in records if (r["dataset"], r["id"]) == (row["dataset"], row["id"])}
            for method in order:
                if (row["dataset"], row["id"], method) in done:
                    continue
                record = {**run_one(model, head, input_ids, method, args.max_new_tokens, draft_model,
                                    args.temperature, prompt_seed(row["dataset"], row["id"]), other_heads),
                          "dataset": row["dataset"],
                          "id": row["id"], "settings": settings}
                runs[method] = record
                records.append(record)
                handle.write(json.dumps(record) + "\n")
                handle.flush()
            plain = runs["plain"]["tokens"]
            for method, run in runs.items():
                comparable = settings["greedy"] or is_jetspec(method)  # seeded JetSpec sampling = plain sampling
                if method != "plain" and comparable and run["tokens"] != plain:
                    mismatches += 1
                    tqdm.write(f"MISMATCH: {method} differs from plain generate() on {row['dataset']} {row['id']}")

    summary = summarize(records, methods, greedy=settings["greedy"])
    results = {"settings": settings, "environment": environment(model, torch.get_num_threads()),
               "summary": summary, "mismatches": mismatches,
               "records": [{k: v for k, v in r.items() if k != "settings"} for r in records]}
    (output_dir / "results.json").write_text(json.dumps(results, indent=1))
    table = markdown_table(summary)
    (output_dir / "results.md").write_text(table)
    plot_speedup([r for r in summary if r["dataset"] != "all" or len(args.datasets) == 1], output_dir / "speedup.png")
    plot_budget([r for r in summary if r["dataset"] != "all"], output_dir / "budget.png")
    plot_rounds(summary, output_dir / "rounds.png")
    print(table)
    if mismatches:
        print(f"WARNING: {mismatches} outputs differ from plain generate() -- lossless methods must match exactly")
    return results


def cli() -> None:
    """Console entry point (`jetspec-bench`): runs [`main`] and exits 0 (a returned dict would become the exit
    status of a console script)."""
    main()


if __name__ == "__main__":
    cli()
