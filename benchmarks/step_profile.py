"""Where a training step's time goes: the image default's U-Net (preset `cpu`, bf16 autocast, a
batch of 64 CIFAR-sized images, one thread, as benchmarks/throughput.py trains it) under torch's
profiler, its operators' own CPU time grouped into convolutions (forward, backward), matrix
products and the rest, each group's FLOPs from torch's FLOP counter, and its rate against this
CPU's bf16 matmul rate measured in the same run. The share of the matmul rate that the
convolutions reach bounds the utilisation that removing every other operator could buy.

    OMP_NUM_THREADS=1 python benchmarks/step_profile.py [--batch-size 64] [--steps 5]

Writes benchmarks/results/step_profile_unet_cpu.json (the load average before and after in it:
one thread, but the figures move with what else runs).
"""

import argparse
import os
import time

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

from record import write_result  # sibling modules: benchmarks/ is on sys.path when run
from thermodiff.run.training import TrainState, draw_batch, train_step
from throughput import MATMUL_N, Variant, build, join_process_group, matmul_rates, random_images

#: profiler operator -> group; an operator's own (self) time, so nested calls are not counted twice
GROUPS = {"aten::mkldnn_convolution": "convolution_forward", "aten::convolution_backward": "convolution_backward",
          "aten::mm": "matmul", "aten::addmm": "matmul", "aten::bmm": "matmul", "aten::baddbmm": "matmul"}
#: FLOP counter operator -> group
FLOP_GROUPS = {"convolution": "convolution_forward", "convolution_backward": "convolution_backward",
               "mm": "matmul", "addmm": "matmul", "bmm": "matmul", "baddbmm": "matmul"}


def group_flops(step) -> dict[str, float]:
    """FLOPs of one call of ``step`` by group, as torch's FLOP counter counts them."""
    with FlopCounterMode(display=False) as counter:
        step()
    flops: dict[str, float] = {}
    for op, count in counter.get_flop_counts()["Global"].items():
        group = FLOP_GROUPS.get(str(op).split(".")[-1], "other")
        flops[group] = flops.get(group, 0.0) + count
    return flops


def group_seconds(step, steps: int) -> tuple[dict[str, float], dict[str, float], float]:
    """Own CPU seconds per step by group and of the ten slowest operators, and the wall seconds per step."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        wall = (time.perf_counter() - start) / steps
    seconds: dict[str, float] = {}
    events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    for e in events:
        group = GROUPS.get(e.key, "other")
        seconds[group] = seconds.get(group, 0.0) + e.self_cpu_time_total / 1e6 / steps
    top = {e.key: e.self_cpu_time_total / 1e6 / steps for e in events[:10]}
    return seconds, top, wall


def group_row(seconds: float, gflop: float, total_seconds: float, peak: float) -> dict:
    rate = gflop / seconds if seconds else None
    return {"seconds_per_step": seconds, "share_pct": 100 * seconds / total_seconds, "gflop_per_step": gflop,
            "gflops_per_s": rate, "pct_of_bf16_matmul_rate": 100 * rate / peak if rate is not None else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    load_before = os.getloadavg()
    torch.manual_seed(0)
    ctx = join_process_group(0, 1, 0, "cpu")
    net, diffusion, image_shape = build("unet_cpu", ctx.device, 1000)
    train = Variant(name="bf16", precision="bf16").train_config()
    data = random_images(max(256, args.batch_size), image_shape)
    state = TrainState.start(net, diffusion, train, seed=0, ctx=ctx)

    def step() -> None:
        train_step(state, draw_batch(state, data, args.batch_size, ctx.device), train, ctx)

    for _ in range(3):  # warm-up
        step()
    flops = group_flops(step)
    seconds, top, wall = group_seconds(step, args.steps)
    peak = matmul_rates(1, "cpu", MATMUL_N)["bf16"]  # sets one thread, as the step ran
    total = sum(seconds.values())
    groups = {g: group_row(s, flops.get(g, 0.0) / 1e9, total, peak)
              for g, s in sorted(seconds.items(), key=lambda kv: -kv[1])}
    all_flops = sum(flops.values()) / 1e9
    record = {"command": f"OMP_NUM_THREADS=1 python benchmarks/step_profile.py --batch-size {args.batch_size} "
                         f"--steps {args.steps}",
              "network": "unet_cpu", "precision": "bf16", "threads": 1, "batch_size": args.batch_size,
              "steps_profiled": args.steps, "wall_s_per_step": wall, "images_per_s": args.batch_size / wall,
              "profiled_cpu_s_per_step": total, "gflop_per_step": all_flops,
              "utilisation_bf16_pct": 100 * all_flops / wall / peak, "bf16_matmul_gflops_per_s": peak,
              "groups": groups, "slowest_operators_s_per_step": top,
              "load_average_before": load_before, "load_average_after": os.getloadavg()}
    print(write_result("step_profile_unet_cpu", record))


if __name__ == "__main__":
    main()
