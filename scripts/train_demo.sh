#!/usr/bin/env bash
# Reproduces the bundled demo-x4 model: data preparation, then training on the CPU.
# Usage: bash scripts/train_demo.sh [STEPS]   (the shipped model: see sr3_engine/assets/demo-x4/RECIPE.md)
# One thread: on a shared 2-core machine, two OpenMP threads stall each other whenever
# anything else runs, and a step took 5-10x longer.
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS="${1:-6000}"
PY=.venv/bin/python
[ -d data/demo/train ] || $PY scripts/prepare_demo_data.py --out data/demo
OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" $PY -m sr3_engine train \
    --data data/demo/train --val-data data/demo/val --out runs/demo-x4 \
    --config scripts/demo-x4.json --scale 4 --hr-size 64 --batch-size 16 \
    --steps "$STEPS" --lr 2e-4 --warmup-steps 200 --ema-decay 0.999 --loss l1 --seed 0 \
    --schedule linear --schedule-steps 2000 --beta-start 1e-6 --beta-end 1e-2 \
    --sample-steps 100 --sample-beta-start 1e-4 --sample-beta-end 0.1 \
    --save-every 500 --val-every 1000 --val-count 2 --log-every 50 --device cpu
