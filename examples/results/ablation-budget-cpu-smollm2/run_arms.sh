#!/usr/bin/env bash
# Two ablation arms side by side, one thread each, the recipe and schedule of the step-180 arms in heads/ablation
# (max_steps 360, warmup 20, stopped at checkpoint-180, the ablation's equal-step point).
cd /work/main
common=(--config training/recipes/smollm2-135m-cpu-qwen3.yaml --max_steps 360 --warmup_steps 20 --max_train_minutes 90
        --save_steps 60 --save_total_limit 5 --anchor_context false)
arm() {  # name, extra args
    local name=$1; shift
    OMP_NUM_THREADS=1 .venv/bin/jetspec-train "${common[@]}" "$@" --output_dir outputs/ablation2/$name \
        > outputs/ablation2/$name.log 2>&1 &
    local pid=$!
    until [ -f outputs/ablation2/$name/checkpoint-180/model.safetensors ] || ! kill -0 $pid 2>/dev/null; do sleep 20; done
    sleep 30; kill $pid 2>/dev/null; wait $pid 2>/dev/null
    echo "$name stopped at $(date -u +%T)" >> outputs/ablation2/done.txt
}
arm qwen3-dflash-bidir --causal_block false &
arm qwen3-dflash-2layers --num_head_layers 2 &
wait
