"""What the chunked candidate loss buys a training step: the head's forward and backward on real corpus batches with
the loss over the batch's candidate vocabulary computed two ways, in turn on the same batches.

- `materialised`: the `(anchors x depths, candidates)` logits built whole, then `distillation_loss` (the trainer's
  path before, and still its path for softcapped targets);
- `chunked`: `candidate_distillation_loss`, logits in chunks of rows, float32 softmax never held whole.

Each batch is 8 rows of cached teacher features with 96 random anchors (the CPU recipe's settings), the head in
bf16 autocast where the trainer's `bf16` auto would choose it (`hf_jetspec.cpu.bf16_autocast_speedup`), else fp32.
The two paths alternate which goes first; their losses must agree. Reports the median seconds of each and the ratio
of their means with a 95% bootstrap interval over batches; saves `results.json` and `train_step.png` in `--out`.

Usage (the features come from `jetspec-train --config training/recipes/smollm2-135m-cpu-qwen3.yaml --prepare_only true`):
    python examples/benchmark_train_step.py --head heads/smollm2-135m-instruct-jetspec \\
        --features outputs/jetspec-data/smollm2-135m-corpus/features-1-14-27 --batches 12 --threads 2 --out outputs/train-step
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

import hf_jetspec
from hf_jetspec import JetSpecHead, draft_attention_mask
from hf_jetspec.bench import bootstrap_ci
from hf_jetspec.cpu import bf16_autocast_speedup, cpu_description


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--head", required=True)
    parser.add_argument("--features", required=True, help="folder of teacher-feature files (*.safetensors)")
    parser.add_argument("--batches", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-anchors", type=int, default=96)
    parser.add_argument("--num-negative-tokens", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    from hf_jetspec_training import AnchorCollator, TeacherFeatureDataset
    from hf_jetspec_training.config import BF16_MIN_SPEEDUP
    from hf_jetspec_training.objective import (
        candidate_distillation_loss,
        candidate_vocabulary,
        depth_weights,
        distillation_loss,
    )

    if args.threads:
        torch.set_num_threads(args.threads)
    paths = sorted(Path(args.features).glob("*.safetensors"))
    if len(paths) < args.batch_size:
        raise SystemExit(f"{args.features} holds {len(paths)} feature files: run jetspec-train --prepare_only true first")
    random.Random(args.seed).shuffle(paths)
    dataset = TeacherFeatureDataset(paths[: args.batches * args.batch_size])
    target, _ = hf_jetspec.load_default_target(dtype=torch.float32)
    target.requires_grad_(False)
    head = JetSpecHead.from_pretrained(args.head).bind(target).float().train()
    block = head.config.block_size
    lm_head = head._bound()[1]
    speedup = bf16_autocast_speedup()
    bf16 = speedup >= BF16_MIN_SPEEDUP
    collate = AnchorCollator(block, args.max_anchors, generator=torch.Generator().manual_seed(args.seed))
    weights = depth_weights(block, 0.8)

    def step(inputs, chunked: bool) -> tuple[float, float]:
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            features = inputs["context_features"]
            batch, length = features.shape[:2]
            positions = torch.arange(length).expand(batch, -1)
            mask = draft_attention_mask(positions, inputs["anchor_position_ids"], block, features.dtype)
            out = head(anchor_ids=inputs["anchor_ids"], anchor_position_ids=inputs["anchor_position_ids"],
                       context_features=features, context_position_ids=positions, attention_mask=mask,
                       logits_to_keep=False)
            vocabulary, local = candidate_vocabulary(inputs["teacher_ids"], inputs["valid"], lm_head.weight.shape[0],
                                                     args.num_negative_tokens,
                                                     generator=torch.Generator().manual_seed(1))
            drafted = out.last_hidden_state.view(*inputs["anchor_ids"].shape, block, -1)[:, :, 1:]
            if chunked:
                loss, _ = candidate_distillation_loss(drafted, lm_head.weight[vocabulary], local,
                                                      inputs["teacher_probs"], inputs["valid"], weights)
            else:
                loss, _ = distillation_loss(drafted @ lm_head.weight[vocabulary].to(drafted.dtype).T, local,
                                            inputs["teacher_probs"], inputs["valid"], weights)
        loss.backward()
        head.zero_grad(set_to_none=True)
        return time.perf_counter() - start, float(loss)

    records = []
    warm = collate([dataset[i] for i in range(args.batch_size)])
    step(warm, False), step(warm, True)
    for index in tqdm(range(args.batches), desc="batches"):
        inputs = collate([dataset[index * args.batch_size + i] for i in range(args.batch_size)])
        order = (False, True) if index % 2 == 0 else (True, False)
        timed = {chunked: step(inputs, chunked) for chunked in order}
        (full_seconds, full_loss), (chunked_seconds, chunked_loss) = timed[False], timed[True]
        if abs(full_loss - chunked_loss) > 1e-2 * max(1.0, abs(full_loss)):
            raise SystemExit(f"batch {index}: losses differ ({full_loss} vs {chunked_loss})")
        records.append({"batch": index, "tokens": int(inputs["context_features"].shape[1]),
                        "materialised_seconds": round(full_seconds, 4), "chunked_seconds": round(chunked_seconds, 4),
                        "loss": round(full_loss, 5), "chunked_loss": round(chunked_loss, 5)})

    def ratio(rows):
        return sum(r["materialised_seconds"] for r in rows) / sum(r["chunked_seconds"] for r in rows)

    result = {
        "settings": {**vars(args), "bf16_autocast": bf16, "bf16_autocast_speedup": round(speedup, 2),
                     "torch_threads": torch.get_num_threads(), "torch": torch.__version__},
        "cpu": cpu_description(),
        "materialised_median_seconds": round(statistics.median(r["materialised_seconds"] for r in records), 3),
        "chunked_median_seconds": round(statistics.median(r["chunked_seconds"] for r in records), 3),
        "speedup": round(ratio(records), 3),
        "speedup_ci": [round(x, 3) for x in bootstrap_ci(records, ratio)],
        "records": records,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "records"}, indent=1))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    figure, axis = plt.subplots(figsize=(6, 3.5))
    axis.plot([r["materialised_seconds"] for r in records], "o-", label="materialised logits")
    axis.plot([r["chunked_seconds"] for r in records], "o-", label="chunked loss")
    axis.set_xlabel("batch (8 corpus rows, 96 anchors each)")
    axis.set_ylabel("forward + backward, s")
    axis.set_ylim(bottom=0)
    axis.set_title(f"{result['cpu']['cpu_class']} CPU, {result['settings']['torch_threads']} threads, "
                   f"{'bf16 autocast' if bf16 else 'fp32'}: {result['speedup']}x")
    axis.legend()
    figure.tight_layout()
    figure.savefig(out / "train_step.png", dpi=120)


if __name__ == "__main__":
    main()
