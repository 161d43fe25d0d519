"""GPU benchmark of tree attention: the Triton kernel vs SDPA with a dense additive 4D mask vs `flex_attention`.

One verification step's attention for one layer: `num_nodes` tree rows over a `prefix` of cached keys plus the tree's
own keys under its ancestor mask, bf16, Qwen3-8B-like heads (32 query heads, 8 KV heads, head_dim 128). Each
configuration is timed with `triton.testing.do_bench` (median of CUDA-event timings, L2 flushed between runs) for:

- `jetspec_triton`: `hf_jetspec_kernels.tree_attention` with the packed ancestor bits;
- `sdpa_dense_mask`: what Transformers' sdpa path runs for a tree mask on CUDA: K/V repeated to the query heads
  (`repeat_kv`; SDPA's fused kernels take no GQA with a mask), then SDPA with an additive `(1, 1, tree, keys)` mask;
- `flex_block_mask`: compiled `torch.nn.attention.flex_attention` with `enable_gqa=True` and a `BlockMask` built
  from the same tree (its construction, once per tree and shared by all layers, is timed separately:
  `block_mask_ms`).

Achieved bandwidth = the bytes a method must move at least (read Q, K, V and its mask, write O; the K/V copies of
`repeat_kv` are not counted, they are the SDPA path's own overhead) / median time. Every configuration also records
the largest difference of each method's output from SDPA's.

Usage:

    python -m hf_jetspec_kernels.benchmark --out results/tree_attention           # prefix 1k/4k/16k x tree 16/64/256
    python -m hf_jetspec_kernels.benchmark --out /tmp/tree_attention --quick      # smoke run: 1k x 16/64

Writes `<out>/tree_attention.json` and `<out>/tree_attention.png`. Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .reference import ancestor_mask_from_parents, pack_ancestor_mask

logger = logging.getLogger(__name__)

METHODS = ("jetspec_triton", "sdpa_dense_mask", "flex_block_mask")


@dataclass
class Measurement:
    prefix: int
    num_nodes: int
    method: str
    ms: float
    bytes: int
    gb_per_s: float
    max_abs_diff_vs_sdpa: float
    block_mask_ms: float | None = None


def draft_like_parents(num_nodes: int, width: int = 7, seed: int = 0) -> list[int]:
    """Parents of a bushy, best-first-looking tree: each node hangs off one of the `width` most recent nodes."""
    rng = random.Random(seed)
    return [-1] + [rng.randrange(max(0, node - width), node) for node in range(1, num_nodes)]


def tensor_bytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def block_mask_bytes(block_mask) -> int:
    """Bytes of the index tensors a `BlockMask` hands to the kernel."""
    names = ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices")
    return tensor_bytes(*(t for t in (getattr(block_mask, name, None) for name in names) if t is not None))


def bench_config(args, prefix: int, num_nodes: int, methods: list[str], progress) -> list[Measurement]:
    from triton.testing import do_bench

    from .tree_attention import tree_attention

    device, dtype = torch.device("cuda"), torch.bfloat16
    generator = torch.Generator(device=device).manual_seed(prefix * 1000 + num_nodes)
    heads, kv_heads, head_dim, batch = args.heads, args.kv_heads, args.head_dim, args.batch
    group = heads // kv_heads
    scale = head_dim**-0.5
    # q as attention layers hand it over: a (batch, tree, heads, dim) projection viewed as (batch, heads, tree, dim)
    q = torch.randn(batch, num_nodes, heads, head_dim, device=device, dtype=dtype, generator=generator).transpose(1, 2)
    k = torch.randn(batch, kv_heads, prefix + num_nodes, head_dim, device=device, dtype=dtype, generator=generator)
    v = torch.randn(batch, kv_heads, prefix + num_nodes, head_dim, device=device, dtype=dtype, generator=generator)
    ancestors = ancestor_mask_from_parents(draft_like_parents(num_nodes, seed=num_nodes), device=device)
    bits = pack_ancestor_mask(ancestors)
    allowed = torch.cat([torch.ones(num_nodes, prefix, dtype=torch.bool, device=device), ancestors], dim=1)
    dense_mask = torch.zeros(1, 1, num_nodes, prefix + num_nodes, device=device, dtype=dtype)
    dense_mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    qkvo_bytes = tensor_bytes(q, k, v) + tensor_bytes(q)  # O has q's size

    def sdpa():
        keys = k.repeat_interleave(group, dim=1)
        values = v.repeat_interleave(group, dim=1)
        return torch.nn.functional.scaled_dot_product_attention(q, keys, values, attn_mask=dense_mask, scale=scale)

    runs, extra_bytes, block_ms = {}, {}, {}
    if "jetspec_triton" in methods:
        runs["jetspec_triton"] = lambda: tree_attention(q, k, v, prefix, bits, scale=scale)
        extra_bytes["jetspec_triton"] = tensor_bytes(bits)
    if "sdpa_dense_mask" in methods:
        runs["sdpa_dense_mask"] = sdpa
        extra_bytes["sdpa_dense_mask"] = tensor_bytes(dense_mask)
    if "flex_block_mask" in methods:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        def mask_mod(b, h, q_idx, kv_idx):
            # indices of padded blocks may run past the tree: clamp before indexing, the kernel masks them anyway
            tree_col = kv_idx - prefix
            seen = ancestors[q_idx.clamp(max=num_nodes - 1), tree_col.clamp(min=0, max=num_nodes - 1)]
            return (tree_col < 0) | seen

        def build_block_mask():
            return create_block_mask(mask_mod, None, None, num_nodes, prefix + num_nodes, device=device)

        torch._dynamo.reset()  # one compiled graph per shape, without hitting the recompile limit
        block_mask = build_block_mask()
        block_ms["flex_block_mask"] = do_bench(build_block_mask, warmup=5, rep=args.rep, return_mode="median")
        flex = torch.compile(flex_attention, dynamic=False)
        runs["flex_block_mask"] = lambda: flex(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=True)
        extra_bytes["flex_block_mask"] = block_mask_bytes(block_mask)

    expected = sdpa().float()
    results = []
    for method, run in runs.items():
        progress.set_postfix_str(f"prefix={prefix} tree={num_nodes} {method}")
        diff = (run().float() - expected).abs().max().item()
        ms = do_bench(run, warmup=args.warmup, rep=args.rep, return_mode="median")
        moved = qkvo_bytes + extra_bytes[method]
        results.append(Measurement(prefix, num_nodes, method, ms, moved, moved / ms / 1e6, diff, block_ms.get(method)))
        if diff > 2e-2:
            logger.warning("%s differs from SDPA by %.3g at prefix=%d tree=%d", method, diff, prefix, num_nodes)
        progress.update()
    return results


def plot(results: list[Measurement], trees: list[int], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(trees), figsize=(4.5 * len(trees), 7), squeeze=False, sharex=True)
    for col, num_nodes in enumerate(trees):
        for method in METHODS:
            rows = [r for r in results if r.num_nodes == num_nodes and r.method == method]
            rows.sort(key=lambda r: r.prefix)
            if not rows:
                continue
            prefixes = [r.prefix for r in rows]
            axes[0, col].plot(prefixes, [r.ms * 1e3 for r in rows], marker="o", label=method)
            axes[1, col].plot(prefixes, [r.gb_per_s for r in rows], marker="o", label=method)
        axes[0, col].set_title(f"tree = {num_nodes} nodes")
        axes[0, col].set_yscale("log")
        axes[1, col].set_xlabel("prefix (cached keys)")
        for row in range(2):
            axes[row, col].set_xscale("log", base=2)
            axes[row, col].grid(True, which="both", alpha=0.3)
    axes[0, 0].set_ylabel("latency (us, median)")
    axes[1, 0].set_ylabel("achieved bandwidth (GB/s)")
    axes[0, 0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for tree_attention.json and .png")
    parser.add_argument("--quick", action="store_true", help="smoke run: prefix 1024 x tree 16/64, fewer repeats")
    parser.add_argument("--prefixes", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--trees", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=25, help="do_bench warmup (ms)")
    parser.add_argument("--rep", type=int, default=100, help="do_bench measuring time (ms)")
    args = parser.parse_args(argv)
    if args.quick:
        args.prefixes, args.trees, args.warmup, args.rep = [1024], [16, 64], 10, 30
    if args.heads % args.kv_heads:
        parser.error(f"--heads ({args.heads}) must be a multiple of --kv-heads ({args.kv_heads})")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit(
            "This benchmark needs a CUDA GPU (torch.cuda.is_available() is False): it times GPU kernels (Triton, "
            "SDPA, flex_attention). For CPU correctness checks run tests/test_tree_attention.py instead."
        )
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise SystemExit("Unset TRITON_INTERPRET: the benchmark times compiled kernels, not Triton's interpreter.")
    from tqdm.auto import tqdm

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    results: list[Measurement] = []
    total = len(args.prefixes) * len(args.trees) * len(args.methods)
    with tqdm(total=total, desc="tree attention", unit="run") as progress:
        for prefix in args.prefixes:
            for num_nodes in args.trees:
                results += bench_config(args, prefix, num_nodes, args.methods, progress)

    device_name = torch.cuda.get_device_name()
    import triton

    report = {
        "device": device_name,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "dtype": "bfloat16",
        "batch": args.batch,
        "heads": args.heads,
        "kv_heads": args.kv_heads,
        "head_dim": args.head_dim,
        "timing": f"triton.testing.do_bench median, warmup {args.warmup} ms, rep {args.rep} ms",
        "bytes": "minimum traffic: Q, K, V, O plus the method's mask (packed bits / dense mask / block-mask indices)",
        "results": [asdict(r) for r in results],
    }
    json_path = args.out / "tree_attention.json"
    json_path.write_text(json.dumps(report, indent=2))
    title = (
        f"tree attention, bf16, {args.heads}/{args.kv_heads} heads x {args.head_dim}, batch {args.batch} "
        f"({device_name})"
    )
    plot(results, args.trees, title, args.out / "tree_attention.png")
    for r in results:
        logger.info(
            "prefix %6d  tree %4d  %-16s %9.1f us  %7.0f GB/s  max|diff| %.2g",
            r.prefix, r.num_nodes, r.method, r.ms * 1e3, r.gb_per_s, r.max_abs_diff_vs_sdpa,
        )
    sdpa_ms = {(r.prefix, r.num_nodes): r.ms for r in results if r.method == "sdpa_dense_mask"}
    speedups = [
        sdpa_ms[r.prefix, r.num_nodes] / r.ms
        for r in results
        if r.method == "jetspec_triton" and (r.prefix, r.num_nodes) in sdpa_ms
    ]
    if speedups:
        geomean = math.exp(sum(map(math.log, speedups)) / len(speedups))
        logger.info("jetspec_triton vs sdpa_dense_mask: geometric-mean speedup %.2fx", geomean)
    logger.info("wrote %s and %s", json_path, args.out / "tree_attention.png")


if __name__ == "__main__":
    main()
