"""Training and sampling throughput of the image networks (conv presets, U-Nets), their peak
memory, and mixed precision against fp32 side by side.

    python benchmarks/throughput.py [--device auto|cpu|cuda] [--presets small,reference_mnist,reference_cifar10]
                                    [--precisions fp32[,bf16]] [--batch-size 128] [--repeats 5] [--iters 3]
                                    [--warmup 2] [--threads N] [--name NAME] [--notes TEXT]

The setting is the paper's image setting: a GaussianDiffusion with T = 1000, the reference
schedule and parameterisation, the network on MNIST-sized (1 x 28 x 28) or CIFAR-sized
(3 x 32 x 32) images. ``--precisions fp32,bf16`` measures each (network, mode) in both, one
after the other, with the training loop's own autocast (training.autocast: bf16 works on CPUs
too). Random uint8 images (throughput does not depend on the
pixels) are dequantised and globally scaled as ``Dataset.to_model`` does.

- training: images/s of the training loop's step (``training.train_step``: forward, backward
  and Adam step of the bound), data preparation included;
- sampling: ancestral sampling is T reverse steps of one network evaluation each, too slow to
  run through on a CPU, so the time of one reverse step (at t = T) is measured and
  images/s = batch / (T x time per step);
- memory: every (preset, mode) runs in a fresh process, so its peak RSS (``getrusage``
  ru_maxrss, a high-water mark that includes torch's own runtime) is its own; ``rss_setup_mib``
  is the mark after building the network and data, before the first step. On CUDA also
  ``torch.cuda.max_memory_allocated`` (weights, optimiser state and activations).

Each measurement is timed ``--repeats`` times (``--iters`` steps each) after ``--warmup``
steps; the JSON holds every repeat, the median and the spread. Writes
benchmarks/results/NAME.json (default throughput_<device>) with the machine and the command line.
"""

import argparse
import datetime
import json
import multiprocessing
import os
import resource
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from thermodiff.data.images import to_unit_float
from thermodiff.nets.convnet import build_conv_net
from thermodiff.nets.unet import build_unet
from thermodiff.process.gaussian import GaussianDiffusion
from thermodiff.process.schedules import make_schedule
from thermodiff.run.checkpoint import atomic_write_text
from thermodiff.run.config import TrainConfig
from thermodiff.run.distributed import Context
from thermodiff.run.machine import machine as this_process_machine
from thermodiff.run.training import TrainState, autocast, train_step

# name: (network builder, its preset, the image shape (C, H, W) it was designed for)
NETWORKS = {"small": (build_conv_net, "small", (1, 28, 28)), "reference_mnist": (build_conv_net, "reference_mnist", (1, 28, 28)),
            "paper_mnist": (build_conv_net, "paper_mnist", (1, 28, 28)),
            "reference_cifar10": (build_conv_net, "reference_cifar10", (3, 32, 32)), "paper": (build_conv_net, "paper", (3, 32, 32)),
            "unet_cpu": (build_unet, "cpu", (3, 32, 32))}
MIB = 2**20


def rss_peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MIB  # ru_maxrss is in KiB on Linux


def measure(preset: str, mode: str, device: str, batch_size: int, T: int, warmup: int, iters: int, repeats: int,
            precision: str, threads: int) -> dict:
    """One (network, mode, precision) measurement; run in a fresh process so its peak memory is its own."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    dev = torch.device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    build, name, image_shape = NETWORKS[preset]
    shape = (batch_size, *image_shape)
    diffusion = GaussianDiffusion(make_schedule("reference", T), "reference", "forward").to(dev)
    net = build(name, shape[1], shape[2], diffusion.outputs_per_dim, T).to(dev)
    images = torch.randint(0, 256, shape, dtype=torch.uint8, device=dev)
    unit = images.double() / 255
    mean, std = float(unit.mean()), float(unit.std())  # one global pair, as image_scaling fits
    train = TrainConfig(lr=1e-3, precision=precision)

    if mode == "train":
        ctx = Context(device=dev)
        state = TrainState.start(net, diffusion, train, seed=0, ctx=ctx)

        def step() -> None:
            train_step(state, (to_unit_float(images) - mean) / std, train, ctx)
    else:
        x_T = diffusion.sample_prior(shape, device=dev)

        @torch.no_grad()
        def step() -> None:
            with autocast(train, dev):  # the training loop's own
                diffusion.p_sample(net, x_T, T)  # any t >= 2 costs one network evaluation

    sync()
    setup_mib = rss_peak_mib()
    cuda_setup = torch.cuda.memory_allocated(dev) / MIB if dev.type == "cuda" else None
    for _ in range(warmup):
        step()
    seconds = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        for _ in range(iters):
            step()
        sync()
        seconds.append((time.perf_counter() - start) / iters)
    per_image = 1 if mode == "train" else T  # network evaluations per image: 1 step, or T reverse steps
    rates = [batch_size / (s * per_image) for s in seconds]
    median = statistics.median(rates)
    result = {
        "preset": preset, "mode": mode, "precision": precision, "image_shape": list(image_shape), "batch_size": batch_size,
        "n_parameters": sum(p.numel() for p in net.parameters()),
        "images_per_s": median, "images_per_s_min": min(rates), "images_per_s_max": max(rates),
        "spread_pct": 100 * (max(rates) - min(rates)) / median, "images_per_s_repeats": rates,
        "seconds_per_step_median": statistics.median(seconds), "seconds_per_step_repeats": seconds,
        "rss_setup_mib": setup_mib, "rss_peak_mib": rss_peak_mib(),
    }
    if dev.type == "cuda":
        result |= {"cuda_setup_allocated_mib": cuda_setup, "cuda_peak_allocated_mib": torch.cuda.max_memory_allocated(dev) / MIB}
    return result


def machine(device: torch.device, threads: int) -> dict:
    info = this_process_machine() | {"cpu_affinity": len(os.sched_getaffinity(0)), "threads": threads}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info |= {"gpu": props.name, "gpu_memory_gib": props.total_memory / 2**30, "cuda": torch.version.cuda,
                 "cudnn": torch.backends.cudnn.version(), "tf32_matmul": torch.backends.cuda.matmul.allow_tf32}
    return info


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda or cuda:N")
    p.add_argument("--presets", default="small,reference_mnist,reference_cifar10",
                   help=f"comma-separated networks, from {', '.join(NETWORKS)}")
    p.add_argument("--precisions", default="fp32", help="comma-separated, from fp32, bf16 (CPU or CUDA), fp16 (CUDA)")
    p.add_argument("--name", help="results file benchmarks/results/NAME.json (default throughput_<device>)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per measurement")
    p.add_argument("--iters", type=int, default=3, help="steps per timed repeat")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--T", type=int, default=1000, help="diffusion steps")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads (default torch's)")
    p.add_argument("--notes", default="", help="free text stored with the results, e.g. that the machine was busy")
    args = p.parse_args(argv)
    args.presets = [s.strip() for s in args.presets.split(",") if s.strip()]
    unknown = [s for s in args.presets if s not in NETWORKS]
    if unknown or not args.presets:
        p.error(f"--presets: unknown {unknown}; choose from {', '.join(NETWORKS)}")
    args.precisions = [s.strip() for s in args.precisions.split(",") if s.strip()]
    if not args.precisions or not set(args.precisions) <= {"fp32", "bf16", "fp16"}:
        p.error(f"--precisions: choose from fp32, bf16, fp16, got {args.precisions}")
    for flag in ("batch_size", "repeats", "iters", "threads"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be at least 1")
    if args.warmup < 0 or args.T < 2:
        p.error("--warmup must be >= 0 and --T >= 2")
    args.device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                               "cpu" if args.device == "auto" else args.device)
    if args.device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device available")
    if "fp16" in args.precisions and args.device.type != "cuda":
        p.error("--precisions fp16 needs CUDA (its gradient scaler); use bf16 on a CPU")
    return args


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    spawn = multiprocessing.get_context("spawn")  # a fresh process per measurement: a clean peak RSS and CUDA context
    record = {
        "command": shlex.join(["python", "benchmarks/throughput.py", *argv]),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": machine(args.device, args.threads),
        "device": str(args.device),
        "settings": {"T": args.T, "schedule": "reference", "parameterization": "reference", "decoder": "forward",
                     "optimizer": "Adam, lr 1e-3", "precisions": args.precisions,
                     "batch_size": args.batch_size, "repeats": args.repeats, "iters_per_repeat": args.iters,
                     "warmup": args.warmup},
        "method": {"train": "images/s of training.train_step: forward + backward + Adam step of the bound "
                            "(dequantisation and scaling included)",
                   "sample": "images/s = batch / (T x time of one reverse step at t = T), not a full T-step run",
                   "memory": "each measurement in a fresh process: rss_peak_mib = its ru_maxrss (torch runtime included), "
                             "rss_setup_mib = that mark before the first step; CUDA: max_memory_allocated"},
        "notes": args.notes,
        "load_average_start": os.getloadavg(),
        "measurements": [],
    }
    for preset in args.presets:
        for mode in ("train", "sample"):
            for precision in args.precisions:  # side by side: the load is alike for both
                with spawn.Pool(1) as pool:
                    m = pool.apply(measure, (preset, mode, str(args.device), args.batch_size, args.T, args.warmup,
                                             args.iters, args.repeats, precision, args.threads))
                record["measurements"].append(m)
                memory = f", CUDA peak {m['cuda_peak_allocated_mib']:.0f} MiB" if "cuda_peak_allocated_mib" in m else ""
                print(f"{preset:18} {mode:6} {precision:5} {m['images_per_s']:10.2f} images/s (range {m['images_per_s_min']:.2f}.."
                      f"{m['images_per_s_max']:.2f}), RSS peak {m['rss_peak_mib']:.0f} MiB{memory}", flush=True)
    record["load_average_end"] = os.getloadavg()
    out = Path(__file__).parent / "results" / f"{args.name or 'throughput_' + args.device.type}.json"
    atomic_write_text(out, json.dumps(record, indent=2) + "\n")
    print(f"-> {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
