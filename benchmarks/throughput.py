"""Training and sampling throughput of the image networks (conv presets, U-Nets), their peak
memory, and the training options that speed them up, side by side, with the utilisation of the
machine: the networks' FLOPs per image times images/s over its measured matmul rate.

    python benchmarks/throughput.py [--device auto|cpu|cuda] [--presets small,reference_mnist,reference_cifar10]
                                    [--precisions fp32[,bf16]] [--variants threads2,processes2,compile,...,combined]
                                    [--batch-size 128] [--repeats 5] [--iters 3] [--warmup 2] [--threads N]
                                    [--name NAME] [--results-dir DIR] [--matmul-side N] [--notes TEXT]

The setting is the paper's image setting: a GaussianDiffusion with T = 1000, the reference
schedule and parameterisation, the network on MNIST-sized (1 x 28 x 28) or CIFAR-sized
(3 x 32 x 32) images, trained on random uint8 images (throughput does not depend on the pixels)
drawn, dequantised and scaled by the training loop's own ``draw_batch``.

What is measured, for every preset: one baseline per ``--precisions`` entry (``--threads``
threads, the training loop's autocast: bf16 works on CPUs too), then each of ``--variants``,
one factor changed from the first baseline (:data:`FACTORS`): two intra-op threads, two
processes of one thread each (torch.distributed with gloo, the global batch split, as under
torchrun), ``train.compile``, ``train.channels_last``, ``train.optimizer_kernel`` foreach or
fused; ``combined`` last: the baseline with, of each group of factors, the fastest that trained
faster than the baseline.

- training: images/s of the training loop's step (``training.train_step``: forward, backward
  and optimiser step of the bound) on a batch from ``training.draw_batch``, whose share of the
  step is timed on its own (``data_share_pct``);
- sampling: ancestral sampling is T reverse steps of one network evaluation each, too slow to
  run through on a CPU, so the time of one reverse step (at t = T) is measured and
  images/s = batch / (T x time per step); the optimiser factors do not change it (not measured);
- memory: every measurement runs in fresh processes, so its peak RSS (``getrusage`` ru_maxrss,
  a high-water mark that includes torch's own runtime) is its own (summed over processes);
  ``rss_setup_mib`` is the mark after building the network and data, before the first step. On
  CUDA also ``torch.cuda.max_memory_allocated`` (weights, optimiser state and activations);
- utilisation: FLOPs per image (``torch.utils.flop_counter.FlopCounterMode``: forward and
  backward for training, one forward per reverse step for sampling) times images/s, over the
  rate of a large ``torch.matmul`` on the device (a CPU: all of the process's CPUs) in the same run,
  fp32 and bf16 (``utilisation_pct``: against the rate of the measurement's precision;
  ``utilisation_bf16_pct``: against the bf16 rate; ``utilisation_peak_pct``: against the faster of
  the two, the machine's limit: bf16 on a GPU or a CPU with AMX or AVX-512 BF16, fp32 on one that
  emulates bf16).

Each measurement is timed ``--repeats`` times (``--iters`` steps each) after ``--warmup`` steps
(``warmup_s``: their times, the first one compiling under ``compile``); the JSON holds every
repeat, the median, the spread and the load averages at its start and end. Writes
RESULTS_DIR/NAME.json (default benchmarks/results/throughput_<device>.json) with the machine and the
command line.
"""

import argparse
import dataclasses
import datetime
import json
import multiprocessing
import os
import queue
import resource
import shlex
import socket
import statistics
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from thermodiff.data.dataset import Dataset
from thermodiff.nets.convnet import build_conv_net
from thermodiff.nets.unet import build_unet
from thermodiff.process.gaussian import GaussianDiffusion
from thermodiff.process.schedules import make_schedule
from thermodiff.run import distributed
from thermodiff.run.checkpoint import atomic_write_text
from thermodiff.run.config import TrainConfig
from thermodiff.run.experiment import image_scaling
from thermodiff.run.machine import machine as this_process_machine
from thermodiff.run.training import Objective, TrainState, autocast, draw_batch, speed_up, train_step

# name: (network builder, its preset, the image shape (C, H, W) it was designed for)
NETWORKS = {"small": (build_conv_net, "small", (1, 28, 28)), "reference_mnist": (build_conv_net, "reference_mnist", (1, 28, 28)),
            "paper_mnist": (build_conv_net, "paper_mnist", (1, 28, 28)),
            "reference_cifar10": (build_conv_net, "reference_cifar10", (3, 32, 32)), "paper": (build_conv_net, "paper", (3, 32, 32)),
            "unet_cpu": (build_unet, "cpu", (3, 32, 32))}
# --variants: name -> (group, what it changes in the baseline); ``combined`` takes the fastest of
# each group (one way of using the cores, one optimiser kernel), and the fastest precision
FACTORS = {"threads2": ("parallelism", {"threads": 2}), "processes2": ("parallelism", {"processes": 2, "threads": 1}),
           "compile": ("compile", {"compile": True}), "channels_last": ("channels_last", {"channels_last": True}),
           "foreach": ("optimizer_kernel", {"optimizer_kernel": "foreach"}),
           "fused": ("optimizer_kernel", {"optimizer_kernel": "fused"})}
OPTIMIZER_ONLY = {"foreach", "fused"}  # they leave sampling as it is
MIB = 2**20
MATMUL_N = 2048  # the side of the square matrices whose product times the machine's rate
RESULT_TIMEOUT_S = 3600  # a measurement process that has not reported by then is taken as hung


@dataclasses.dataclass(frozen=True)
class Variant:
    """How one measurement trains or samples: its threads and processes, and the training options."""

    name: str
    threads: int = 1
    processes: int = 1
    precision: str = "fp32"
    compile: bool = False
    channels_last: bool = False
    optimizer_kernel: str = "default"

    def train_config(self) -> TrainConfig:
        return TrainConfig(lr=1e-3, precision=self.precision, compile=self.compile, channels_last=self.channels_last,
                           optimizer_kernel=self.optimizer_kernel)

    def settings(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "name"}


def rss_peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MIB  # ru_maxrss is in KiB on Linux


def build(preset: str, device: torch.device, T: int) -> tuple[torch.nn.Module, GaussianDiffusion, tuple[int, ...]]:
    """The network of ``preset``, the process it is trained in, and its image shape (C, H, W)."""
    builder, name, image_shape = NETWORKS[preset]
    diffusion = GaussianDiffusion(make_schedule("reference", T), "reference", "forward").to(device)
    return builder(name, *image_shape[:2], diffusion.outputs_per_dim, T).to(device), diffusion, image_shape


def random_images(n: int, image_shape: tuple[int, ...]) -> Dataset:
    """Random 8-bit images as a dataset that dequantises them, globally scaled as image runs are."""
    images = np.random.default_rng(0).integers(0, 256, (n, *image_shape), dtype=np.uint8)
    return Dataset(images, images[:1], image_scaling(images), binary=False, source="random",
                   dequantize=True)


def join_process_group(rank: int, world_size: int, port: int, device: str) -> distributed.Context:
    """This process's place among ``world_size`` (the environment torchrun would set)."""
    if world_size > 1:
        os.environ |= {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    return distributed.setup(device)


def measure(preset: str, mode: str, variant: Variant, device: str, batch_size: int, T: int, warmup: int, iters: int,
            repeats: int, rank: int = 0, port: int = 0) -> dict:
    """One process's part of one (network, mode, variant) measurement, run in fresh processes so
    that its peak memory is its own."""
    torch.set_num_threads(variant.threads)
    torch.manual_seed(0)
    ctx = join_process_group(rank, variant.processes, port, device)
    dev = ctx.device
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    net, diffusion, image_shape = build(preset, dev, T)
    train = variant.train_config()
    data_s = None
    if mode == "train":
        dataset = random_images(max(batch_size, 256), image_shape)
        state = TrainState.start(net, diffusion, train, seed=0, ctx=ctx)

        def step() -> None:
            train_step(state, draw_batch(state, dataset, batch_size, dev), train, ctx)
    else:
        speed_up(net, train)
        memory_format = torch.channels_last if train.channels_last else torch.contiguous_format
        x_T = diffusion.sample_prior((batch_size, *image_shape), device=dev)[ctx.shard(batch_size)]
        x_T = x_T.contiguous(memory_format=memory_format)

        @torch.no_grad()
        def step() -> None:
            with autocast(train.precision, dev):  # the training loop's own
                diffusion.p_sample(net, x_T, T)  # any t >= 2 costs one network evaluation
            ctx.barrier()  # the global batch is done when every process's shard is

    sync()
    setup_mib = rss_peak_mib()
    cuda_setup = torch.cuda.memory_allocated(dev) / MIB if dev.type == "cuda" else None
    warmup_s = [timed(step, 1, sync) for _ in range(warmup)]
    seconds = [timed(step, iters, sync) for _ in range(repeats)]
    if mode == "train":  # the data path alone, for its share of a step
        data_s = timed(lambda: draw_batch(state, dataset, batch_size, dev), iters * repeats, sync)
    distributed.teardown(ctx)
    per_image = 1 if mode == "train" else T  # network evaluations per image: 1 step, or T reverse steps
    rates = [batch_size / (s * per_image) for s in seconds]
    median = statistics.median(rates)
    result = {
        "preset": preset, "mode": mode, "variant": variant.name, "settings": variant.settings(),
        "precision": variant.precision, "image_shape": list(image_shape), "batch_size": batch_size,
        "n_parameters": sum(p.numel() for p in net.parameters()),
        "images_per_s": median, "images_per_s_min": min(rates), "images_per_s_max": max(rates),
        "spread_pct": 100 * (max(rates) - min(rates)) / median, "images_per_s_repeats": rates,
        "seconds_per_step_median": statistics.median(seconds), "seconds_per_step_repeats": seconds,
        "warmup_s": warmup_s, "rss_setup_mib": setup_mib, "rss_peak_mib": rss_peak_mib(),
    }
    if data_s is not None:
        result |= {"data_s_per_batch": data_s, "data_share_pct": 100 * data_s / statistics.median(seconds)}
    if dev.type == "cuda":
        result |= {"cuda_setup_allocated_mib": cuda_setup, "cuda_peak_allocated_mib": torch.cuda.max_memory_allocated(dev) / MIB}
    return result


def timed(fn, n: int, sync) -> float:
    """Seconds per call of ``fn``, over ``n`` calls."""
    sync()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    sync()
    return (time.perf_counter() - start) / n


def _report(results: multiprocessing.Queue, index: int, fn, args: tuple) -> None:
    try:
        results.put((index, True, fn(*args)))
    except BaseException:
        results.put((index, False, traceback.format_exc()))


def in_fresh_processes(fn, args_per_process: list[tuple]) -> list:
    """``fn(*args)`` for each ``args``, each in a fresh process, all started together (so that
    ranks of a process group meet), their results in order. Spawned: a clean peak RSS and CUDA
    context; not a Pool, whose daemonic workers may not start the compiler's own processes."""
    spawn = multiprocessing.get_context("spawn")
    results = spawn.Queue()
    processes = [spawn.Process(target=_report, args=(results, i, fn, args)) for i, args in enumerate(args_per_process)]
    for p in processes:
        p.start()
    got, deadline = {}, time.monotonic() + RESULT_TIMEOUT_S
    while len(got) < len(processes):
        try:
            index, ok, value = results.get(timeout=5)
        except queue.Empty:
            dead = [p.exitcode for p in processes if p.exitcode not in (None, 0)]
            if dead or time.monotonic() > deadline:
                for p in processes:
                    p.kill()
                raise RuntimeError(f"a measurement process died (exit codes {dead}) or hung") from None
            continue
        if not ok:
            for p in processes:
                p.kill()
            raise RuntimeError(f"measurement process {index} failed:\n{value}")
        got[index] = value
    for p in processes:
        p.join()
    return [got[i] for i in range(len(processes))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_measurement(preset: str, mode: str, variant: Variant, args: argparse.Namespace) -> dict:
    """One measurement in ``variant.processes`` fresh processes: rank 0's times (every step
    waits for all), the memory of all, and the load averages around it."""
    load_start, port = os.getloadavg(), free_port()
    parts = in_fresh_processes(measure, [(preset, mode, variant, str(args.device), args.batch_size, args.T, args.warmup,
                                          args.iters, args.repeats, rank, port) for rank in range(variant.processes)])
    m = parts[0] | {"load_average_start": load_start, "load_average_end": os.getloadavg()}
    if variant.processes > 1:
        peaks = [p["rss_peak_mib"] for p in parts]
        m |= {"rss_peak_mib": sum(peaks), "rss_peak_mib_per_process": peaks}
    return m


def matmul_rates(threads: int, device: str, n_side: int) -> dict:
    """GFLOP/s of an ``n_side``-square torch.matmul in fp32 and bf16 on ``device`` (a CPU with
    ``threads`` threads): the median of repeated timings, after a warm-up."""
    torch.set_num_threads(threads)
    dev = torch.device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    rates = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = (torch.randn(n_side, n_side, device=dev).to(dtype) for _ in range(2))
        once = timed(lambda: a @ b, 1, sync)
        n = max(1, int(0.5 / once))  # about half a second per timing
        seconds = [timed(lambda: a @ b, n, sync) for _ in range(5)]
        rates[name] = 2 * n_side**3 / statistics.median(seconds) / 1e9
    return rates


def matmul_side(device: torch.device) -> int:
    """The default side of the square matrices whose product times ``device``: a GPU needs larger
    ones (8192) to keep its units busy."""
    return MATMUL_N if device.type == "cpu" else 4 * MATMUL_N


def flops_per_image(preset: str, T: int) -> dict:
    """FLOPs per image of a training step (forward and backward of the bound) and of one network
    evaluation (a reverse step), as torch's FLOP counter counts them (fp32, a batch of 2)."""
    net, diffusion, image_shape = build(preset, torch.device("cpu"), T)
    objective = Objective(net, diffusion)
    x0 = torch.randn(2, *image_shape)
    with FlopCounterMode(display=False) as counter:
        loss, _ = objective(x0, objective.draws(x0, torch.Generator().manual_seed(0)))
        loss.backward()
    train = counter.get_total_flops() / len(x0)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        diffusion.p_sample(net, x0, T)
    return {"train": train, "sample_step": counter.get_total_flops() / len(x0)}


def utilisation(m: dict, flops: dict, rates: dict, T: int) -> dict:
    """What share of the machine's matmul rate a measurement's FLOPs per second are."""
    per_image = flops["train"] if m["mode"] == "train" else T * flops["sample_step"]
    gflops = per_image * m["images_per_s"] / 1e9
    return {"gflops_per_s": gflops, "utilisation_pct": 100 * gflops / rates[m["precision"]],
            "utilisation_bf16_pct": 100 * gflops / rates["bf16"],
            "utilisation_peak_pct": 100 * gflops / max(rates.values())}


def combined(baselines: list[Variant], measured: dict[str, dict]) -> Variant:
    """The first baseline with, of each group of factors, the one that trained fastest if it beat
    the baseline (so never two threads and two processes together), at the fastest baseline's precision."""
    rate = {name: m["images_per_s"] for name, m in measured.items()}
    base = baselines[0]
    changes = {"precision": max(baselines, key=lambda v: rate[v.name]).precision}
    for group in dict.fromkeys(g for g, _ in FACTORS.values()):
        tried = [name for name, (g, _) in FACTORS.items() if g == group and name in rate]
        best = max(tried, key=rate.get, default=None)
        if best is not None and rate[best] > rate[base.name]:
            changes |= FACTORS[best][1]
    return dataclasses.replace(base, name="combined", **changes)


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
    p.add_argument("--precisions", default="fp32",
                   help="comma-separated baselines, from fp32, bf16 (CPU or CUDA), fp16 (CUDA)")
    p.add_argument("--variants", default="",
                   help=f"comma-separated, each one factor changed from the first baseline, from {', '.join(FACTORS)}; "
                        "and combined: the fastest of each")
    p.add_argument("--name", help="results file RESULTS_DIR/NAME.json (default throughput_<device>)")
    p.add_argument("--results-dir", type=Path, default=Path(__file__).parent / "results",
                   help="folder of the results file (default benchmarks/results)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per measurement")
    p.add_argument("--iters", type=int, default=3, help="steps per timed repeat")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--T", type=int, default=1000, help="diffusion steps")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(),
                   help="torch CPU threads of the baselines (default torch's)")
    p.add_argument("--matmul-side", type=int, help="side of the square matmul that measures the device's rate "
                                                    f"(default {MATMUL_N} on a CPU, {4 * MATMUL_N} on a GPU)")
    p.add_argument("--notes", default="", help="free text stored with the results, e.g. that the machine was busy")
    args = p.parse_args(argv)
    args.presets = [s.strip() for s in args.presets.split(",") if s.strip()]
    unknown = [s for s in args.presets if s not in NETWORKS]
    if unknown or not args.presets:
        p.error(f"--presets: unknown {unknown}; choose from {', '.join(NETWORKS)}")
    args.precisions = [s.strip() for s in args.precisions.split(",") if s.strip()]
    if not args.precisions or not set(args.precisions) <= {"fp32", "bf16", "fp16"}:
        p.error(f"--precisions: choose from fp32, bf16, fp16, got {args.precisions}")
    args.variants = [s.strip() for s in args.variants.split(",") if s.strip()]
    if not set(args.variants) <= {*FACTORS, "combined"}:
        p.error(f"--variants: choose from {', '.join(FACTORS)}, combined; got {args.variants}")
    for flag in ("batch_size", "repeats", "iters", "threads"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be at least 1")
    if args.warmup < 0 or args.T < 2:
        p.error("--warmup must be >= 0 and --T >= 2")
    if "processes2" in args.variants and args.batch_size % 2:
        p.error("--variants processes2 splits the batch in two: --batch-size must be even")
    args.device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                               "cpu" if args.device == "auto" else args.device)
    if args.device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device available")
    if args.matmul_side is None:
        args.matmul_side = matmul_side(args.device)
    if args.matmul_side < 1:
        p.error("--matmul-side must be at least 1")
    if "fp16" in args.precisions and args.device.type != "cuda":
        p.error("--precisions fp16 needs CUDA (its gradient scaler); use bf16 on a CPU")
    return args


def show(m: dict) -> None:
    memory = f", CUDA peak {m['cuda_peak_allocated_mib']:.0f} MiB" if "cuda_peak_allocated_mib" in m else ""
    used = f", {m['utilisation_peak_pct']:.0f}% of the fastest matmul" if "utilisation_peak_pct" in m else ""
    data = f", data {m['data_share_pct']:.1f}%" if "data_share_pct" in m else ""
    print(f"{m['preset']:18} {m['mode']:6} {m['variant']:14} {m['images_per_s']:10.2f} images/s (range "
          f"{m['images_per_s_min']:.2f}..{m['images_per_s_max']:.2f}), RSS peak {m['rss_peak_mib']:.0f} MiB{memory}"
          f"{used}{data}", flush=True)


def measure_preset(preset: str, args: argparse.Namespace, rates: dict, record: dict) -> None:
    """Every variant of ``preset``, training and sampling, into ``record``."""
    flops = flops_per_image(preset, args.T)
    record["flops_per_image"][preset] = flops
    baselines = [Variant(p, threads=args.threads, precision=p) for p in args.precisions]
    first = baselines[0]
    variants = baselines + [dataclasses.replace(first, name=n, **FACTORS[n][1]) for n in args.variants if n != "combined"]
    if "combined" in args.variants:
        variants.append(None)  # decided by the training rates of the others
    trained = {}
    for variant in variants:
        variant = variant or combined(baselines, trained)
        for mode in ("train", "sample"):
            if mode == "sample" and variant.name in OPTIMIZER_ONLY:
                continue
            m = run_measurement(preset, mode, variant, args)
            m |= utilisation(m, flops, rates, args.T)
            record["measurements"].append(m)
            trained |= {variant.name: m} if mode == "train" else {}
            show(m)


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    cpus = len(os.sched_getaffinity(0))
    record = {
        "command": shlex.join(["python", "benchmarks/throughput.py", *argv]),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": machine(args.device, args.threads),
        "device": str(args.device),
        "settings": {"T": args.T, "schedule": "reference", "parameterization": "reference", "decoder": "forward",
                     "optimizer": "Adam, lr 1e-3", "precisions": args.precisions, "variants": args.variants,
                     "batch_size": args.batch_size, "repeats": args.repeats, "iters_per_repeat": args.iters,
                     "warmup": args.warmup},
        "method": {"train": "images/s of training.train_step: forward + backward + Adam step of the bound, on a batch "
                            "from training.draw_batch (dequantisation and scaling included; data_share_pct: its share)",
                   "sample": "images/s = batch / (T x time of one reverse step at t = T), not a full T-step run",
                   "processes": "processes2: two processes of one thread, torch.distributed (gloo), each its half of the "
                                "global batch; images/s of the global batch",
                   "memory": "each measurement in fresh processes: rss_peak_mib = its ru_maxrss (torch runtime included; "
                             "summed over processes), rss_setup_mib = that mark before the first step; CUDA: "
                             "max_memory_allocated",
                   "utilisation": f"FLOPs per image (FlopCounterMode) x images/s over the rate of a "
                                  f"{args.matmul_side}-square torch.matmul on {args.device} "
                                  f"({cpus} threads on a CPU) measured in this run"},
        "notes": args.notes,
        "load_average_start": os.getloadavg(),
        "flops_per_image": {},
        "measurements": [],
    }
    rates = in_fresh_processes(matmul_rates, [(cpus, str(args.device), args.matmul_side)])[0]
    record |= {"matmul_gflops_per_s": rates, "matmul_threads": cpus if args.device.type == "cpu" else None,
               "matmul_side": args.matmul_side}
    print(f"matmul on {args.device}: " + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in rates.items()), flush=True)
    for preset in args.presets:
        measure_preset(preset, args, rates, record)
    record["load_average_end"] = os.getloadavg()
    out = args.results_dir / f"{args.name or 'throughput_' + args.device.type}.json"
    atomic_write_text(out, json.dumps(record, indent=2) + "\n")
    print(f"-> {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
