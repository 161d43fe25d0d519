#!/usr/bin/env bash
# tau against tree budget: two processes, one thread each; first 10 prompts of GSM8K and MT-Bench, 128 tokens.
cd /work/main
H=outputs/ablation2/heads
A=heads/ablation/qwen3-dflash-step180; B=$H/qwen3-dflash-bidir-step180; C=$H/qwen3-dflash-2layers-step180
V=heads/smollm2-135m-instruct-jetspec-vllm
run() {  # output dir, heads..., -- budgets...
    local dir=$1; shift
    OMP_NUM_THREADS=1 .venv/bin/python examples/compare_heads.py --datasets gsm8k_test mt_bench --limit 10 \
        --max-new-tokens 128 --threads 1 --output-dir outputs/ablation2/$dir "$@"
}
( run eval-a --heads $A --budgets 2 4 8 16 32 64; run eval-a --heads $C --budgets 8 64 ) > outputs/ablation2/eval-a.log 2>&1 &
( run eval-b --heads $B --budgets 2 4 8 16 32 64; run eval-b --heads $V --budgets 2 8 64 ) > outputs/ablation2/eval-b.log 2>&1 &
wait
echo "eval done $(date -u +%T)" >> outputs/ablation2/done.txt
