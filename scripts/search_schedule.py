"""Choose a trained model's default sampler and schedule on tuning photos, and measure
candidates on held-out ones.

SR3 conditions the network on the noise level, not the step, so the schedule used for
sampling is free: this script scores candidate (sampler, schedule, strength) on centre crops
with `sr3_engine evaluate`'s library (PSNR, SSIM, consistency, detail; `--samples` draws,
seeds 0..K-1), prints a Markdown table row per candidate and writes them all to --out.

Run it on tuning photos to choose (the training photos' centre crops: never the held-out
set), then once on the held-out set with the chosen few (`--only`) to report. With --ship
it writes the model with the best candidate (highest mean PSNR among those that run at most
--max-steps network evaluations, beat bicubic's SSIM and keep the consistency within 2x of
bicubic's) as its default, weights in float16. --max-steps keeps the default fast: 12 steps
sample a 256x256 output in about 10 s on 2 CPU cores with the demo model.

    python scripts/search_schedule.py --model runs/demo-x4/model --data data/demo/train --limit 8 \
        --out runs/demo-x4/tune.json --ship sr3_engine/assets/demo-x4
    python scripts/search_schedule.py --model sr3_engine/assets/demo-x4 --data data/demo/val --crop 256 \
        --samples 2 --only 0 5 --out runs/demo-x4/heldout.json
    python scripts/search_schedule.py --model runs/demo-x4-fast/round-1/model --data data/demo/train --limit 8 \
        --candidate ddim 32 1.0 --out runs/demo-x4-fast/round-1/tune.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from pathlib import Path

import torch

import sr3_engine as sr3
from sr3_engine.cli.evaluate import evaluate, mean_scores
from sr3_engine.runtime import model_dir
from sr3_engine.runtime.model_dir import ModelSpec
from sr3_engine.training.data import load_centre_crops, usable_images

# (sampler, steps the model's inference schedule is respaced to, strength): what
# `python -m sr3_engine evaluate --sampler S --steps N --strength X` runs.
CANDIDATES = [
    ("ancestral", 100, 1.0),
    ("ancestral", 50, 1.0),
    ("ancestral", 20, 1.0),
    ("ddim", 50, 1.0),
    ("dpmpp_2m", 50, 1.0),
    ("dpmpp_2m", 20, 1.0),
    ("dpmpp_2m", 10, 1.0),
    ("mean", 100, 1.0),
    ("ancestral", 100, 0.3),
    ("ddim", 100, 0.3),
    ("dpmpp_2m", 100, 0.3),
    ("ancestral", 50, 0.2),
    ("ddim", 50, 0.2),
    ("dpmpp_2m", 50, 0.2),
    ("ddim", 20, 0.5),
    ("dpmpp_2m", 20, 0.5),
]
HEADER = ("| target | sampler | schedule steps | steps run | strength | PSNR | SSIM | detail | consistency "
          "| s/image |\n|---|---|---|---|---|---|---|---|---|---|")


def markdown_row(row: dict) -> str:
    model = row["model"]
    scale = row.get("residual_scale")
    target = row["prediction"] if scale is None else f"{row['prediction']}, residual x{scale:g}"
    return (f"| {target} | {row['sampler']['name']} | {row['schedule_steps']} | {row['steps_run']} | "
            f"{row['sampler']['strength']} | {model['psnr']:.2f} | {model['ssim']:.4f} | {model['detail']:.2f} | "
            f"{model['consistency']:.2e} | {row['seconds_per_image']:.1f} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--crop", type=int, default=128)
    parser.add_argument("--limit", type=int, default=None,
                        help="use N images spread evenly over the sorted list (every len/N-th)")
    parser.add_argument("--samples", type=int, default=1, help="draws per image (seeds 0..K-1)")
    parser.add_argument("--only", type=int, nargs="*", default=None, help="indices into CANDIDATES")
    parser.add_argument("--candidate", nargs=3, action="append", default=None, metavar=("SAMPLER", "STEPS", "STRENGTH"),
                        help="score this candidate instead of CANDIDATES (repeatable; a distilled student's own "
                        "plan is ddim STEPS 1.0)")
    parser.add_argument("--max-steps", type=int, default=12, help="most network evaluations of the default")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--ship", type=Path, default=None, help="write the model with the best candidate here")
    args = parser.parse_args()

    # float32 whatever the machine: the schedule shipped is chosen on the figures RECIPE.md records.
    engine = sr3.SR3Engine.from_pretrained(args.model, dtype=torch.float32, progress=False)
    spec = model_dir.read_spec(model_dir.resolve(args.model))
    paths = usable_images(args.data, args.crop)
    if args.limit is not None:
        paths = paths[::math.ceil(len(paths) / args.limit)][:args.limit]
    hr = load_centre_crops(paths, args.crop)
    names = [p.stem for p in paths]
    if args.candidate is not None:
        candidates = [(name, int(steps), float(strength)) for name, steps, strength in args.candidate]
    else:
        candidates = [CANDIDATES[i] for i in args.only] if args.only is not None else CANDIDATES
    rows, bicubic = [], None
    print(HEADER)
    for sampler, steps, strength in candidates:
        schedule = engine.schedule_for(steps)
        config = sr3.SamplerConfig(sampler, strength=strength)
        started = time.perf_counter()
        results, _, _, _ = evaluate(engine, hr, names, sampler=config, schedule=schedule, samples=args.samples)
        seconds = time.perf_counter() - started
        model, bicubic = mean_scores([r.model for r in results]), mean_scores([r.bicubic for r in results])
        rows.append({"prediction": engine.prediction, "residual_scale": engine.residual_scale,
                     "sampler": config.to_dict(),
                     "schedule": schedule.config.to_dict(),
                     "schedule_steps": steps, "steps_run": sr3.make_plan(schedule, config).num_steps,
                     "model": dataclasses.asdict(model), "per_image": [dataclasses.asdict(r.model) for r in results],
                     "seconds_per_image": seconds / (len(names) * args.samples)})
        print(markdown_row(rows[-1]), flush=True)
    print(f"| bicubic | | | | | {bicubic.psnr:.2f} | {bicubic.ssim:.4f} | {bicubic.detail:.2f} | "
          f"{bicubic.consistency:.2e} | |")
    fast = [r for r in rows if r["steps_run"] <= args.max_steps] or rows
    admissible = [r for r in fast if r["model"]["ssim"] > bicubic.ssim
                  and r["model"]["consistency"] <= 2 * bicubic.consistency] or fast
    best = max(admissible, key=lambda r: (r["model"]["psnr"], r["model"]["ssim"]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"data": str(args.data), "crop": args.crop, "samples": args.samples,
                                    "images": names, "rows": rows, "bicubic": dataclasses.asdict(bicubic),
                                    "best": best}, indent=2) + "\n")
    print(f"best: {best['sampler']['name']} {best['schedule_steps']} steps strength {best['sampler']['strength']}; "
          f"wrote {args.out}")
    if args.ship is not None:
        shipped = ModelSpec(engine.model.config, sr3.ScheduleConfig.from_dict(best["schedule"]),
                            sr3.SamplerConfig.from_dict(best["sampler"]), engine.scale, engine.resampler,
                            spec.train_schedule)
        model_dir.write(args.ship, engine.model.state_dict(), shipped, weights_dtype=torch.float16)
        print(f"shipped {args.ship}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
