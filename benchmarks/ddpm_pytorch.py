"""denoising-diffusion-pytorch (lucidrains, the most used DDPM code on the package index) trained
on CIFAR-10 for the same CPU time as thermodiff's recipes, and scored by thermodiff's bound
(`thermodiff.eps_model_bound`) on the same test images: the side-by-side run of issue 14.

It runs in an environment of its own, never vendored: the package needs torchvision, which has
no CPU build beside this project's torch (the wheel that installs here is torch 2.14.1's CUDA
build with torchvision 0.29.1; it runs on the CPU):

    python -m venv ../ddp-venv
    ../ddp-venv/bin/pip install torch==2.14.1 torchvision==0.29.1 denoising-diffusion-pytorch
    ../ddp-venv/bin/pip install -e .
    OMP_NUM_THREADS=1 ../ddp-venv/bin/python benchmarks/ddpm_pytorch.py --data-dir ../shared/data/cifar10 \\
        --cpu-minutes 60 [--resume]

The package's own recipe, as its README and Trainer give it: `GaussianDiffusion(Unet(...))` with
its defaults (T = 1000, its default objective and beta schedule), Adam at lr 1e-4 with betas
(0.9, 0.99), batches of 16, gradient norm clipped to 1, an EMA of decay 0.995 updated every 10
steps (ema-pytorch, as its Trainer), random horizontal flips. The Unet is sized near thermodiff's
yardstick (--dim, --dim-mults). Training counts the process's CPU time (one thread), checkpoints
every --checkpoint-minutes (atomic; --resume continues), and the EMA model is scored on the first
--examples CIFAR-10 test images: the 8-bit NLL bound in bits/dim with the discretized decoder,
the posterior variance its sampler uses (fixed_small), importance-sampled strata. Writes
benchmarks/results/ddpm_pytorch_cifar10.json.
"""

import argparse
import io
import sys
import time
from importlib.metadata import version
from pathlib import Path

import torch
from denoising_diffusion_pytorch import GaussianDiffusion, Unet
from ema_pytorch import EMA

from record import write_result  # a sibling module: benchmarks/ is on sys.path when run
from thermodiff import eps_model_bound
from thermodiff.data.images.official import load_cifar10
from thermodiff.run.checkpoint import atomic_write_bytes

#: the package's objective names -> the prediction types of eps_model_bound
PREDICTION = {"pred_noise": "epsilon", "pred_x0": "sample", "pred_v": "v_prediction"}


def build(args) -> tuple[GaussianDiffusion, torch.optim.Optimizer, EMA]:
    torch.manual_seed(args.seed)
    net = Unet(dim=args.dim, dim_mults=tuple(args.dim_mults))
    diffusion = GaussianDiffusion(net, image_size=32, timesteps=1000)
    optimiser = torch.optim.Adam(diffusion.parameters(), lr=1e-4, betas=(0.9, 0.99))
    ema = EMA(diffusion, beta=0.995, update_every=10)
    return diffusion, optimiser, ema


def save(path: Path, diffusion: GaussianDiffusion, optimiser: torch.optim.Optimizer, ema: EMA, state: dict) -> None:
    """The training state, written atomically (a kill mid-write leaves the previous checkpoint)."""
    buffer = io.BytesIO()
    torch.save({"model": diffusion.state_dict(), "optimiser": optimiser.state_dict(), "ema": ema.state_dict(),
                "state": state}, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def train(args, images: torch.Tensor, out: Path) -> dict:
    """Steps until the process has spent --cpu-minutes of CPU time on them (across resumes)."""
    diffusion, optimiser, ema = build(args)
    checkpoint = out / "checkpoint.pt"
    state = {"step": 0, "cpu_s": 0.0, "curve": []}
    if args.resume and checkpoint.exists():
        saved = torch.load(checkpoint, weights_only=True)  # tensors and plain values only: no code runs
        diffusion.load_state_dict(saved["model"])
        optimiser.load_state_dict(saved["optimiser"])
        ema.load_state_dict(saved["ema"])
        state = saved["state"]
    g = torch.Generator().manual_seed(args.seed + state["step"])
    start, last_save = time.process_time() - state["cpu_s"], time.monotonic()
    while state["cpu_s"] < args.cpu_minutes * 60:
        batch = images[torch.randint(len(images), (16,), generator=g)].float() / 255
        flip = torch.rand(16, generator=g) < 0.5
        batch[flip] = batch[flip].flip(-1)
        loss = diffusion(batch)  # images in [0, 1]: the package normalises to [-1, 1] itself
        optimiser.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(diffusion.parameters(), 1.0)
        optimiser.step()
        ema.update()
        state["step"] += 1
        state["cpu_s"] = time.process_time() - start
        if state["step"] % 50 == 0:
            state["curve"].append({"step": state["step"], "cpu_s": round(state["cpu_s"], 1), "loss": loss.item()})
        if time.monotonic() - last_save > args.checkpoint_minutes * 60:
            save(checkpoint, diffusion, optimiser, ema, state)
            last_save = time.monotonic()
    save(checkpoint, diffusion, optimiser, ema, state)
    return {"diffusion": ema.ema_model, "parameters": sum(p.numel() for p in diffusion.model.parameters()), **state}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True, help="a folder holding CIFAR-10")
    parser.add_argument("--cpu-minutes", type=float, default=60.0)
    parser.add_argument("--examples", type=int, default=200, help="the first N CIFAR-10 test images")
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--dim-mults", type=int, nargs="+", default=[1, 2, 2])
    parser.add_argument("--checkpoint-minutes", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--out", default="runs/ddpm_pytorch")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train_images = torch.from_numpy(load_cifar10(args.data_dir, "train")[0])
    test_images = load_cifar10(args.data_dir, "test")[0][: args.examples]
    trained = train(args, train_images, out)
    diffusion = trained.pop("diffusion").eval()
    start = time.perf_counter()
    with torch.no_grad():
        report = eps_model_bound(lambda x, t: diffusion.model(x, t), diffusion.betas, test_images / 127.5 - 1,
                                 prediction_type=PREDICTION[diffusion.objective], variance_type="fixed_small")
    record = {
        "command": "OMP_NUM_THREADS=1 python benchmarks/ddpm_pytorch.py " + " ".join(sys.argv[1:]),
        "package": f"denoising-diffusion-pytorch {version('denoising-diffusion-pytorch')}",
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "recipe": {"unet": {"dim": args.dim, "dim_mults": args.dim_mults}, "parameters": trained["parameters"],
                   "objective": diffusion.objective, "timesteps": diffusion.num_timesteps,
                   "beta_schedule": "the package's default", "optimizer": "adam lr 1e-4 betas (0.9, 0.99)",
                   "batch_size": 16, "grad_clip": 1.0, "ema": "decay 0.995 every 10 steps, scored"},
        "train": {"steps": trained["step"], "cpu_s": trained["cpu_s"], "images_seen": 16 * trained["step"],
                  "curve": trained["curve"]},
        "evaluation_wall_s": time.perf_counter() - start,
        "evaluation": {k: v for k, v in report.items() if k != "per_timestep_bits"},
    }
    path = write_result("ddpm_pytorch_cifar10", record)
    print(f"{report['nll_bits_per_dim']:.3f} +- {report['nll_stderr_bits_per_dim']:.3f} bits/dim after "
          f"{trained['step']} steps -> {path}")


if __name__ == "__main__":
    main()
