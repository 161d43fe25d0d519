"""Side by side on one box: vLLM plain, vLLM + n-gram, vLLM + the exported JetSpec head (chains), and hf_jetspec's
tree decoding in `generate()`, on the same prompts, greedy, at batch 1 and at several concurrent requests.

    python examples/bench_vllm.py --head heads/ablation/qwen3-dflash-step180 --limit 10 --concurrency 1 4

The prompts go through the chat template (vLLM's chat endpoint; `apply_chat_template` for `generate()`) and are split
into groups of `concurrency`: a group is one batched `generate()` call, or `concurrency` requests sent at once to the
server. Every method runs the same groups; a method's speedup over vLLM plain is the ratio of pooled tokens/s, with a
95% bootstrap interval over groups (paired). Each vLLM configuration is its own server (built venv:
`hf_jetspec.vllm_server.build_venv`), run after the in-process methods, with the same number of threads.

Writes `results.json` (settings, environment, every group's time and tokens, vLLM's acceptance counters) and
`vllm_bench.png` to `--out`, and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import textwrap
import platform
import tempfile
import time
from pathlib import Path

import torch

from hf_jetspec import JetSpecHead, load_default_target
from hf_jetspec.bench import DEFAULT_EVAL_DIR, bootstrap_ci, load_eval_prompts
from hf_jetspec.bench_batch import generated_tokens, left_pad
from hf_jetspec.vllm_export import export_vllm, export_vllm_target
from hf_jetspec.vllm_server import VLLM_REQUIREMENT, VLLMServer, build_venv

METHODS = ["vllm plain", "vllm ngram", "vllm jetspec-head", "hf plain", "hf jetspec"]


def run_hf(model, tokenizer, head, groups: list[list[str]], max_new_tokens: int, use_head: bool) -> list[dict]:
    stop = {tokenizer.eos_token_id}
    records = []
    for index, group in enumerate(groups):
        ids = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                             return_dict=True)["input_ids"] for p in group]
        input_ids, mask = left_pad(ids, tokenizer.pad_token_id, model.device)
        kwargs = {"assistant_model": head} if use_head else {}
        start = time.perf_counter()
        output = model.generate(input_ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens,
                                pad_token_id=tokenizer.pad_token_id, **kwargs)
        seconds = time.perf_counter() - start
        tokens = generated_tokens(output, input_ids.shape[1], stop)
        record = {"group": index, "seconds": seconds, "new_tokens": sum(map(len, tokens)), "tokens": tokens}
        if use_head:
            stats = head.last_generate_stats
            record["tau"] = getattr(stats, "mean_accepted_length", None)
        records.append(record)
    return records


def run_vllm(server: VLLMServer, groups: list[list[str]], max_new_tokens: int) -> tuple[list[dict], dict]:
    server.chat(groups[0][:1], max_tokens=8)  # warm-up request
    before = server.spec_counters()
    records = []
    for index, group in enumerate(groups):
        reply = server.chat(group, max_tokens=max_new_tokens, concurrency=len(group))
        tokens = [r["token_ids"] for r in reply["replies"]]
        records.append({"group": index, "seconds": reply["seconds"], "new_tokens": sum(map(len, tokens)),
                        "tokens": tokens})
    after = server.spec_counters()
    return records, {key: after[key] - before[key] for key in after}


def summarize(records: dict, concurrency: list[int]) -> list[dict]:
    rows = []
    for c in concurrency:
        base = records[("vllm plain", c)]
        for method in METHODS:
            runs = records.get((method, c))
            if not runs:
                continue
            pairs = list(zip(base, runs))

            def ratio(sample):
                plain = sum(b["new_tokens"] for b, _ in sample) / sum(b["seconds"] for b, _ in sample)
                ours = sum(m["new_tokens"] for _, m in sample) / sum(m["seconds"] for _, m in sample)
                return ours / plain

            low, high = bootstrap_ci(pairs, ratio)
            mismatches = sum(b["tokens"] != m["tokens"] for b, m in pairs)
            rows.append({"method": method, "concurrency": c,
                         "tokens_per_s": sum(m["new_tokens"] for m in runs) / sum(m["seconds"] for m in runs),
                         "speedup_vs_vllm_plain": ratio(pairs), "ci95": [low, high], "groups": len(runs),
                         "groups_differing_from_vllm_plain": mismatches})
    return rows


def markdown(rows: list[dict], acceptance: dict) -> str:
    lines = ["| concurrency | method | tokens/s | vs vLLM plain (95% CI) | mean acceptance length | outputs = vLLM plain |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        accept = acceptance.get(f"{row['method']}@{row['concurrency']}", "")
        lines.append(f"| {row['concurrency']} | {row['method']} | {row['tokens_per_s']:.1f} | "
                     f"{row['speedup_vs_vllm_plain']:.2f}x ({row['ci95'][0]:.2f}-{row['ci95'][1]:.2f}) | {accept} | "
                     f"{row['groups'] - row['groups_differing_from_vllm_plain']}/{row['groups']} groups |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    concurrency = sorted({row["concurrency"] for row in rows})
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(METHODS)
    for i, method in enumerate(METHODS):
        values = [next((r for r in rows if r["method"] == method and r["concurrency"] == c), None) for c in concurrency]
        xs = [k + i * width for k, v in enumerate(values) if v]
        ys = [v["tokens_per_s"] for v in values if v]
        ax.bar(xs, ys, width, label=method)
    ax.set_xticks([k + 0.4 - width / 2 for k in range(len(concurrency))], [f"{c} concurrent" for c in concurrency])
    ax.set_ylabel("tokens/s (higher is better)")
    ax.set_title(textwrap.fill(title, 110), fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--head", default="heads/ablation/qwen3-dflash-step180", help="an exportable head folder")
    parser.add_argument("--datasets", nargs="+", default=["gsm8k_test", "mt_bench"])
    parser.add_argument("--data-dir", default=str(DEFAULT_EVAL_DIR))
    parser.add_argument("--limit", type=int, default=8, help="first prompts of each dataset")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--ngram", default='{"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_max": 4, '
                        '"prompt_lookup_min": 2}', help="vLLM's n-gram speculative config")
    parser.add_argument("--out", default="examples/results/vllm-cpu-smollm2")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    venv = build_venv()
    model, tokenizer = load_default_target()
    head = JetSpecHead.from_pretrained(args.head).bind(model).eval()
    prompts = [row["prompt"] for row in load_eval_prompts(args.data_dir, args.datasets, args.limit)]
    threads = torch.get_num_threads()
    records: dict = {}
    for c in args.concurrency:
        groups = [prompts[i: i + c] for i in range(0, len(prompts), c)]
        run_hf(model, tokenizer, head, groups[:1], 8, use_head=True)  # warm-up: cost calibration, packing
        records[("hf plain", c)] = run_hf(model, tokenizer, head, groups, args.max_new_tokens, use_head=False)
        records[("hf jetspec", c)] = run_hf(model, tokenizer, head, groups, args.max_new_tokens, use_head=True)
        print(f"hf, concurrency {c}: done", flush=True)
    acceptance = {}
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        export_vllm_target(model, tokenizer, work / "target")
        export_vllm(head, work / "head")
        depth = head.config.block_size - 1
        configs = {"vllm plain": None, "vllm ngram": json.loads(args.ngram),
                   "vllm jetspec-head": {"method": "dflash", "model": str(work / "head"), "num_speculative_tokens": depth}}
        for method, spec in configs.items():
            with VLLMServer(work / "target", venv, speculative_config=spec, threads=threads,
                            log_file=out / f"server-{method.split()[-1]}.log") as server:
                for c in args.concurrency:
                    groups = [prompts[i: i + c] for i in range(0, len(prompts), c)]
                    records[(method, c)], counters = run_vllm(server, groups, args.max_new_tokens)
                    if counters["drafts"]:
                        acceptance[f"{method}@{c}"] = round(1 + counters["accepted"] / counters["drafts"], 3)
                    print(f"{method}, concurrency {c}: done", flush=True)
    rows = summarize(records, args.concurrency)
    for row in rows:
        if row["method"] == "hf jetspec":
            taus = [r["tau"] for r in records[("hf jetspec", row["concurrency"])] if r.get("tau")]
            if taus:
                acceptance[f"hf jetspec@{row['concurrency']}"] = f"{sum(taus) / len(taus):.3f} (tree)"
    from hf_jetspec.cpu import cpu_description

    environment = {"machine": platform.machine(), **cpu_description(), "threads": threads,
                   "torch": torch.__version__, "vllm": VLLM_REQUIREMENT, "python": platform.python_version()}
    settings = {"head": args.head, "datasets": args.datasets, "limit": args.limit, "prompts": len(prompts),
                "max_new_tokens": args.max_new_tokens, "concurrency": args.concurrency, "ngram": args.ngram,
                "greedy": True, "target": "SmolLM2-135M-Instruct (Q4_1 GGUF dequantised to fp32), fp32 in both"}
    results = {"settings": settings, "environment": environment, "summary": rows, "acceptance_length": acceptance,
               "records": {f"{m}@{c}": r for (m, c), r in records.items()}}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    title = (f"SmolLM2-135M fp32, {len(prompts)} prompts ({', '.join(args.datasets)}), {args.max_new_tokens} tokens, "
             f"greedy, {threads} threads, {environment['cpu_class']} CPU class ({platform.machine()})")
    plot(rows, out / "vllm_bench.png", title)
    table = markdown(rows, acceptance)
    (out / "table.md").write_text(table + "\n")
    print(table)
    return results


if __name__ == "__main__":
    main()
