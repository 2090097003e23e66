"""Choose a trained model's default inference schedule by search on held-out photos.

SR3 conditions the network on the noise level, not the step, so the schedule used for
sampling is free: this script scores candidate (sampler, schedule, strength) on centre crops
of the held-out set with `sr3_engine evaluate`'s library, prints and writes the table, and with
--ship writes the model with the best candidate (highest mean PSNR among those whose
consistency stays within 2x of bicubic's) as its default, weights in float16.

    python scripts/search_schedule.py --model runs/demo-x4/model --data data/demo/val \
        --out runs/demo-x4/search.json --ship sr3_engine/assets/demo-x4
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

import sr3_engine as sr3
from sr3_engine.cli.evaluate import evaluate, mean_scores
from sr3_engine.runtime import model_dir
from sr3_engine.runtime.model_dir import ModelSpec
from sr3_engine.training.data import load_centre_crops, usable_images

# (sampler, schedule kind, steps, last beta of a linear schedule, strength)
CANDIDATES = [
    ("ancestral", "linear", 100, 0.1, 1.0),
    ("ancestral", "linear", 50, 0.2, 1.0),
    ("ancestral", "train-respaced", 50, None, 1.0),
    ("ddim", "linear", 50, 0.2, 1.0),
    *[(sampler, "linear", 100, 0.1, strength) for sampler in ("ancestral", "ddim") for strength in (0.5, 0.3, 0.2)],
    *[(sampler, "train-respaced", 100, None, 0.3) for sampler in ("ancestral", "ddim")],
]


def schedule_for(kind: str, steps: int, end: float | None, train: sr3.ScheduleConfig) -> sr3.NoiseSchedule:
    if kind == "train-respaced":
        return sr3.NoiseSchedule.from_config(dataclasses.replace(train, respace=steps))
    return sr3.NoiseSchedule.linear(steps, 1e-4, end)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--crop", type=int, default=128)
    parser.add_argument("--train-schedule", default='{"kind": "linear", "steps": 2000, "start": 1e-6, "end": 0.01}')
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--ship", type=Path, default=None, help="write the model with the best schedule here")
    args = parser.parse_args()

    engine = sr3.SR3Engine.from_pretrained(args.model, progress=False)
    train = sr3.ScheduleConfig.from_json(args.train_schedule)
    paths = usable_images(args.data, args.crop)
    hr = load_centre_crops(paths, args.crop)
    names = [p.stem for p in paths]
    rows = []
    for sampler, kind, steps, end, strength in CANDIDATES:
        schedule = schedule_for(kind, steps, end, train)
        config = sr3.SamplerConfig(sampler, strength=strength)
        started = time.perf_counter()
        results, _, _, _ = evaluate(engine, hr, names, sampler=config, schedule=schedule)
        model, bicubic = mean_scores([r.model for r in results]), mean_scores([r.bicubic for r in results])
        rows.append({"sampler": config.to_dict(), "schedule": schedule.config.to_dict(),
                     "label": f"{kind} {steps}" + (f" end {end}" if end else "") + f" strength {strength}",
                     "model": dataclasses.asdict(model),
                     "bicubic": dataclasses.asdict(bicubic), "seconds": time.perf_counter() - started})
        print(f"{sampler:9} {rows[-1]['label']:36} PSNR {model.psnr:6.2f} (bicubic {bicubic.psnr:6.2f})  "
              f"SSIM {model.ssim:.4f} ({bicubic.ssim:.4f})  consistency {model.consistency:.2e} "
              f"({bicubic.consistency:.2e})  {rows[-1]['seconds']:.0f} s", flush=True)
    admissible = [r for r in rows if r["model"]["consistency"] <= 2 * r["bicubic"]["consistency"]] or rows
    best = max(admissible, key=lambda r: (r["model"]["psnr"], r["model"]["ssim"]))
    args.out.write_text(json.dumps({"data": str(args.data), "crop": args.crop, "images": names,
                                    "rows": rows, "best": best}, indent=2) + "\n")
    print(f"best: {best['sampler']['name']} {best['label']}; wrote {args.out}")
    if args.ship is not None:
        spec = ModelSpec(engine.model.config, sr3.ScheduleConfig.from_dict(best["schedule"]),
                         sr3.SamplerConfig.from_dict(best["sampler"]), engine.scale, engine.resampler)
        model_dir.write(args.ship, engine.model.state_dict(), spec, weights_dtype=torch.float16)
        print(f"shipped {args.ship}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
