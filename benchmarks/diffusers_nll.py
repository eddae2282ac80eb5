"""Bits/dim of a diffusers model: train a small UNet2DModel on CIFAR-10 with diffusers' own DDPM
recipe for a few CPU minutes, save it with DDPMPipeline.save_pretrained, and record what
`thermodiff evaluate --diffusers` says of it on the first test images.

    OMP_NUM_THREADS=1 python benchmarks/diffusers_nll.py train --data-dir ../shared/data/cifar10 --out runs/diffusers_cifar10 --minutes 8
    OMP_NUM_THREADS=1 python benchmarks/diffusers_nll.py record --data-dir ../shared/data/cifar10 --model runs/diffusers_cifar10

There is no pretrained diffusers model offline, so the model is trained here. The recipe is
diffusers' examples/unconditional_image_generation/train_unconditional.py scaled to a CPU:
images mapped to [-1, 1] (Normalize([0.5], [0.5])), random horizontal flips, t uniform on
0..T-1, DDPMScheduler.add_noise, the MSE between the UNet's output and the noise
(prediction_type epsilon, T = 1000, linear betas 1e-4..0.02), AdamW with a linear warm-up; but a
small UNet, a larger learning rate, no EMA and minutes instead of hours. Writes
benchmarks/results/diffusers_cifar10.json.
"""

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

from record import thermodiff_json, write_result  # a sibling module: benchmarks/ is on sys.path when run
from thermodiff.data.images import ensure_dataset, load_cifar10

#: the UNet: three resolutions (32, 16, 8), attention at the lowest
UNET = dict(sample_size=32, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(32, 64, 64),
            down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"), norm_num_groups=8)
TRAIN = dict(batch_size=64, lr=5e-4, warmup_steps=100, weight_decay=1e-6, seed=0)


def train(data_dir: str, out: Path, minutes: float) -> dict:
    """Train for ``minutes`` of wall time and save the pipeline to ``out`` (with train_info.json)."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(TRAIN["seed"])
    images = load_cifar10(ensure_dataset("cifar10", data_dir), "train")[0]
    unet, scheduler = UNet2DModel(**UNET), DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    optimizer = torch.optim.AdamW(unet.parameters(), lr=TRAIN["lr"], weight_decay=TRAIN["weight_decay"])
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / TRAIN["warmup_steps"]))
    rng, losses, step, start = np.random.default_rng(TRAIN["seed"]), [], 0, time.monotonic()
    while time.monotonic() - start < minutes * 60:
        batch = images[rng.integers(0, len(images), TRAIN["batch_size"])]
        x = torch.as_tensor(batch, dtype=torch.float32) / 127.5 - 1
        x = torch.where(torch.rand(len(x), 1, 1, 1) < 0.5, x.flip(-1), x)  # random horizontal flip
        noise = torch.randn_like(x)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(x),))
        loss = torch.nn.functional.mse_loss(unet(scheduler.add_noise(x, noise, t), t).sample, noise)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        warmup.step()
        losses.append(float(loss.detach()))
        step += 1
    info = {"train_steps": step, "train_minutes": (time.monotonic() - start) / 60, "final_loss_mean_last_100":
            float(np.mean(losses[-100:])), "unet": UNET, "train": TRAIN,
            "parameters": sum(p.numel() for p in unet.parameters()), "n_train_images": len(images)}
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(out)
    (out / "train_info.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def record(data_dir: str, model: Path, max_examples: int, t_samples: int, train_command: str) -> Path:
    argv = ["evaluate", "--diffusers", str(model), "--data", "cifar10", "--data-dir", data_dir,
            "--max-examples", str(max_examples), "--t-samples", str(t_samples)]
    start = time.monotonic()
    evaluation = thermodiff_json(argv)
    return write_result("diffusers_cifar10", {
        "commands": [train_command, shlex.join(["thermodiff", *argv])],
        "training": json.loads((model / "train_info.json").read_text()),
        "evaluation": evaluation, "evaluation_wall_s": time.monotonic() - start,
        "notes": "CIFAR-10 test split: the first images of the 1000 in the shared copy (test_batch_first1000.bin); "
                 "a small UNet2DModel trained for minutes on a CPU, so the figure is far from published "
                 "CIFAR-10 models' (about 3.7 bits/dim); it demonstrates the evaluator, not a good model"})


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=["train", "record"])
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--out", "--model", dest="model", default="runs/diffusers_cifar10")
    parser.add_argument("--minutes", type=float, default=8.0)
    parser.add_argument("--max-examples", type=int, default=100)
    parser.add_argument("--t-samples", type=int, default=50)
    parser.add_argument("--train-command", default="OMP_NUM_THREADS=1 python benchmarks/diffusers_nll.py train "
                        "--data-dir ../shared/data/cifar10 --out runs/diffusers_cifar10 --minutes 8")
    args = parser.parse_args()
    if args.stage == "train":
        print(json.dumps(train(args.data_dir, Path(args.model), args.minutes), indent=2))
    else:
        print(record(args.data_dir, Path(args.model), args.max_examples, args.t_samples, args.train_command))
    sys.exit(0)
