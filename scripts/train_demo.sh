#!/usr/bin/env bash
# Reproduces the bundled demo-x4 model: data preparation, then five training stages on the CPU
# (sr3_engine/assets/demo-x4/RECIPE.md gives the figures):
#   1. eps prediction from scratch, 5000 steps (the first demo-x4, stopped at step 5000 of 6000);
#   2. fine-tuned from stage 1 to v prediction at a constant learning rate;
#   3. fine-tuned from stage 2 with the learning rate decaying to 0;
#   4. fine-tuned from stage 3, the rate restarted at half and decaying again;
#   5. fine-tuned from stage 4 to diffuse the residual over the bicubic condition, times 4 (the
#      shipped model).
# Usage: bash scripts/train_demo.sh [STAGE1_STEPS] [STAGE2_STEPS] [STAGE3_STEPS] [STAGE4_STEPS] [STAGE5_STEPS]
# One thread: on a shared 2-core machine, two OpenMP threads stall each other whenever
# anything else runs, and a step took 5-10x longer.
set -euo pipefail
cd "$(dirname "$0")/.."
STAGE1_STEPS="${1:-5000}"
STAGE2_STEPS="${2:-2000}"
STAGE3_STEPS="${3:-1500}"
STAGE4_STEPS="${4:-1500}"
STAGE5_STEPS="${5:-1800}"
PY=.venv/bin/python
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
[ -d data/demo/train ] || $PY scripts/prepare_demo_data.py --out data/demo
COMMON=(--data data/demo/train --config scripts/demo-x4.json --scale 4 --hr-size 64 --batch-size 16
        --ema-decay 0.999 --loss l1 --seed 0
        --schedule linear --schedule-steps 2000 --beta-start 1e-6 --beta-end 1e-2
        --sample-steps 100 --sample-beta-start 1e-4 --sample-beta-end 0.1 --log-every 50 --device cpu)
$PY -m sr3_engine train "${COMMON[@]}" --out runs/demo-x4 --steps "$STAGE1_STEPS" --lr 2e-4 --warmup-steps 200 \
    --val-data data/demo/val --save-every 500 --val-every 1000 --val-count 2
$PY -m sr3_engine train "${COMMON[@]}" --out runs/demo-x4-v --steps "$STAGE2_STEPS" --lr 1e-4 --warmup-steps 100 \
    --prediction v --init-from runs/demo-x4/model --op-backend native --save-every 250 --val-every 0
$PY -m sr3_engine train "${COMMON[@]}" --seed 1 --out runs/demo-x4-v-decay --steps "$STAGE3_STEPS" --lr 1e-4 \
    --warmup-steps 50 --lr-decay-steps $((STAGE3_STEPS - 50)) --prediction v --init-from runs/demo-x4-v/model \
    --op-backend native --save-every 250 --val-every 0
$PY -m sr3_engine train "${COMMON[@]}" --seed 2 --out runs/demo-x4-v-decay2 --steps "$STAGE4_STEPS" --lr 5e-5 \
    --warmup-steps 50 --lr-decay-steps $((STAGE4_STEPS - 50)) --prediction v --init-from runs/demo-x4-v-decay/model \
    --op-backend cpp --save-every 250 --val-every 0
$PY -m sr3_engine train "${COMMON[@]}" --seed 5 --out runs/demo-x4-residual --steps "$STAGE5_STEPS" --lr 2e-4 \
    --warmup-steps 100 --lr-decay-steps $((STAGE5_STEPS - 100)) --prediction v --residual-scale 4 \
    --init-from runs/demo-x4-v-decay2/model --op-backend cpp --save-every 250 --val-every 0
