"""What users of the most used open SR3 implementation gain by converting: time per image on the same weights.

Builds a checkpoint in that implementation's layout for its 16x16 -> 128x128 faces architecture
(config/sr_sr3_16_128.json there: 64 channels, mults 1,2,4,8,8, 2 res blocks, attention at 16;
random weights, since none can be downloaded here), converts it with `python -m sr3_engine
convert`, then times denoising steps on one 16x16 input with each engine backend, side by side
in one run. Their sampler is 2000 ancestral float32 steps, one network call each, in eager
PyTorch; our `eager` backend runs the same network and the same step (the U-Net is
parameter-exact and the sampler agrees to float32 rounding), so its per-step time stands for
theirs. The converted model's default is 100 steps respaced from their schedule.

    python scripts/converted_speed.py [--backends eager onnxruntime fused] [--steps 3] [--repeats 3]
    python scripts/converted_speed.py --device cuda --dtype bf16 --backends eager fused     # on a GPU
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

import sr3_engine as sr3
from sr3_engine.cli import main as sr3_main
from sr3_engine.runtime.convert import their_buffers

THEIR_STEPS = 2000
CONFIG = """{
    "model": {
        "which_model_G": "sr3", // as in their sr_sr3_16_128.json
        "unet": {"in_channel": 6, "out_channel": 3, "inner_channel": 64, "channel_multiplier": [1, 2, 4, 8, 8],
                 "attn_res": [16], "res_blocks": 2, "dropout": 0.2},
        "beta_schedule": {
            "train": {"schedule": "linear", "n_timestep": 2000, "linear_start": 1e-6, "linear_end": 1e-2},
            "val": {"schedule": "linear", "n_timestep": 2000, "linear_start": 1e-6, "linear_end": 1e-2}
        },
        "diffusion": {"image_size": 128, "channels": 3, "conditional": true}
    },
    "datasets": {"train": {"l_resolution": 16, "r_resolution": 128}}
}
"""


def their_checkpoint(folder: Path) -> tuple[Path, Path]:
    torch.manual_seed(0)
    model = sr3.SR3UNet(sr3.UNetConfig.named("sr3-16-128"))
    state = {f"denoise_fn.{k}": v for k, v in model.state_dict().items()}
    betas = sr3.NoiseSchedule.linear(THEIR_STEPS, 1e-6, 1e-2).betas
    state.update({k: torch.tensor(v, dtype=torch.float32) for k, v in their_buffers(betas).items()})
    checkpoint, config = folder / "I640000_E37_gen.pth", folder / "sr_sr3_16_128.json"
    torch.save(state, checkpoint)
    config.write_text(CONFIG)
    return checkpoint, config


def seconds_per_step(engine: sr3.SR3Engine, lr: torch.Tensor, steps: int, repeats: int) -> float:
    schedule = sr3.NoiseSchedule.linear(THEIR_STEPS, 1e-6, 1e-2).respaced(steps)
    engine.sample(lr, schedule=schedule, generator=torch.Generator().manual_seed(0))  # export, compile, warm up
    times = []
    for repeat in range(repeats):
        started = time.perf_counter()
        engine.sample(lr, schedule=schedule, generator=torch.Generator().manual_seed(repeat))
        times.append((time.perf_counter() - started) / steps)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", nargs="+", default=["eager", "onnxruntime", "fused"])
    parser.add_argument("--steps", type=int, default=3, help="steps per timed sample")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32",
                        help="of the converted backends (theirs is float32)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint, config = their_checkpoint(Path(tmp))
        out = Path(tmp) / "sr3-16-128"
        assert sr3_main(["convert", str(checkpoint), "--config", str(config), "--out", str(out)]) == 0
        default_steps = sr3.SR3Engine.from_pretrained(out, progress=False).schedule.num_steps
        lr = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
        dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
        rows = []
        for backend in dict.fromkeys(["eager", *args.backends]):
            engine = sr3.SR3Engine.from_pretrained(out, backend=backend, device=args.device, progress=False,
                                                   dtype=torch.float32 if backend == "eager" else dtype)
            rows.append((backend, seconds_per_step(engine, lr, args.steps, args.repeats)))
    eager = dict(rows)["eager"]
    print(f"sr3-16-128, one 16x16 -> 128x128 image, {args.device}, converted backends in {args.dtype}, "
          f"{torch.get_num_threads()} CPU threads, torch {torch.__version__}")
    print(f"{'':34} {'ms/step':>9} {'steps':>6} {'s/image':>9} {'vs theirs':>10}")
    print(f"{'theirs (2000 steps, eager fp32)':34} {eager * 1e3:9.0f} {THEIR_STEPS:6d} {eager * THEIR_STEPS:9.1f} "
          f"{1.0:9.1f}x")
    for backend, step in rows:
        print(f"{'converted, ' + backend:34} {step * 1e3:9.0f} {default_steps:6d} {step * default_steps:9.1f} "
              f"{eager * THEIR_STEPS / (step * default_steps):9.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
