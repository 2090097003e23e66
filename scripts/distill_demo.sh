#!/usr/bin/env bash
# Distils the bundled demo-x4 into a student that samples from pure noise in a few network
# evaluations (sr3_engine/assets/demo-x4/RECIPE.md, "Fast sampling: distillation"): progressive
# distillation of DDIM from 8 steps to 4, 2 and 1, 500 optimiser steps a round, on the demo's
# training photos. Run it again after a kill to go on from where it stopped.
# Usage: bash scripts/distill_demo.sh [STEPS]   (default 1: all three rounds; 4 or 2 stops earlier)
# At the lowest priority: the machine is shared.
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS="${1:-1}"
OUT=runs/demo-x4-fast
PY=.venv/bin/python
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
[ -d data/demo/train ] || $PY scripts/prepare_demo_data.py --out data/demo
if [ -f "$OUT/distill.json" ]; then
    exec nice -n 19 $PY -m sr3_engine distill --out "$OUT" --resume --steps "$STEPS"
fi
exec nice -n 19 $PY -m sr3_engine distill --teacher demo-x4 --out "$OUT" --steps "$STEPS" --teacher-steps 8 \
    --data data/demo/train --hr-size 64 --batch-size 16 --round-steps 500 --lr 1e-5 --warmup-steps 50 \
    --ema-decay 0.995 --loss l2 --seed 0 --op-backend cpp --device cpu --save-every 100 --log-every 10
