#!/usr/bin/env bash
# 1 vs 2 head layers on the long-trained head (5932 steps), equal minutes, side by side at one thread each
cd "$(dirname "$0")/../../.."  # the repository root (it ran as outputs/ablation-long/run.sh, with ../..)
. .venv/bin/activate
common=(--config training/recipes/smollm2-135m-cpu-qwen3.yaml --head_init heads/smollm2-135m-instruct-jetspec-vllm
        --continue_training true --restart_schedule true --learning_rate 5e-4 --anchor_context false
        --max_train_minutes ${MINUTES:-50} --save_steps 100 --eval_strategy steps)
mkdir -p outputs/logs
OMP_NUM_THREADS=1 jetspec-train "${common[@]}" --more_steps ${S1:-1250} --eval_steps ${E1:-250} \
    --output_dir outputs/ablation-long/l1 > outputs/logs/l1.log 2>&1 &
OMP_NUM_THREADS=1 jetspec-train "${common[@]}" --grow_to_layers 2 --more_steps ${S2:-950} --eval_steps ${E2:-190} \
    --output_dir outputs/ablation-long/l2 > outputs/logs/l2.log 2>&1 &
wait
