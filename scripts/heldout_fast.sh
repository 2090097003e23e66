#!/usr/bin/env bash
# The held-out table of demo-x4-fast (sr3_engine/assets/demo-x4/RECIPE.md, "Held-out figures of
# demo-x4-fast"): the shipped student, every round's student and demo-x4's samplers on the 6
# held-out photos, 2 draws each, results.json and a contact sheet per row under
# runs/demo-x4-fast/heldout/. Run once, on an otherwise idle machine, after the student is shipped.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
OUT=runs/demo-x4-fast/heldout
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
[ -d data/demo/val ] || $PY scripts/prepare_demo_data.py --out data/demo
evaluate() { name=$1; shift; $PY -m sr3_engine evaluate --data data/demo/val --scale 4 --samples 2 --out "$OUT/$name" "$@"; }
evaluate shipped --model demo-x4-fast
for round in 1 2 3; do evaluate "round-$round" --model "runs/demo-x4-fast/round-$round/model"; done
evaluate ddim4 --model demo-x4 --sampler ddim --steps 4 --strength 1.0
evaluate ddim2 --model demo-x4 --sampler ddim --steps 2 --strength 1.0
evaluate mean --model demo-x4
evaluate dpmpp20 --model demo-x4 --sampler dpmpp_2m --steps 20 --strength 1.0
evaluate ancestral50 --model demo-x4 --sampler ancestral --steps 50 --strength 1.0
