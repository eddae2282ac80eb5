"""The GPU checks, prepared for a lent device machine: the tests that need CUDA, the throughput of
the image networks on the GPU against its own matmul rate, and a 3-minute run of the CIFAR-10
config on 10000 training images, evaluated on the first 200 of the 1000 test images here and
sampled, all with ``--device cuda``.

Here, once (writes .device/cifar10_train.npz, the first 10000 training images, and
.device/cifar10_test.npz, the 1000 test images here: about 30 MiB, from the official CIFAR-10
files; .device/ is ignored by git and travels only when carried):

    python benchmarks/gpu_check.py --prepare --data-dir ../shared/data

There, with ``carry: [".device"]`` (its python3 holds torch; thermodiff runs from src/ without
installing, its other needs are in that image), as two calls of the device tool, the second while
the machine is still warm: each group's time limits add up to less than the tool's 10 minutes a
command (a step stopped at its limit is recorded as such, and the next one runs).

    python3 benchmarks/gpu_check.py --out $OUT --only environment,tests,throughput
    python3 benchmarks/gpu_check.py --out $OUT --only train,evaluation,sample

Rehearse here on the CPU before spending device time (every step, each cut to seconds):

    python benchmarks/gpu_check.py --device cpu --quick --out /tmp/gpu_check --runs /tmp/gpu_check_runs

Every step runs as its own process with its own time limit, and a failing step does not stop the
next: ``OUT/gpu_check.json`` holds each step's command, exit code, wall time and output's end, and
the throughput record (``throughput_gpu.json``) and the samples' image grid are written beside it.
``--only train,evaluation,sample`` reruns some of the steps (the run is trained in ``--runs``).
Copy the records into benchmarks/results afterwards.
"""

import argparse
import datetime
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
TRAIN_FILE, TEST_FILE = "cifar10_train.npz", "cifar10_test.npz"
TRAIN_IMAGES = 10000  # the first training batch: the whole training set (150 MB) does not travel (64 MiB)
TAIL_CHARS = 4000
STEPS = ("environment", "tests", "throughput", "train", "evaluation", "sample")  # in the order they run
#: the steps of each device call (--only): the time limits of each group add up to less than a call's
GROUPS = (("environment", "tests", "throughput"), ("train", "evaluation", "sample"))
CALL_LIMIT_S = 600


def prepare(data_dir: str, data: Path) -> None:
    """The CIFAR-10 images a check needs, from the official files in ``data_dir``, into ``data``."""
    sys.path.insert(0, str(ROOT / "src"))
    from thermodiff.data.images import ensure_dataset, load_cifar10

    folder = ensure_dataset("cifar10", data_dir)
    data.mkdir(exist_ok=True)
    for name, split, count in ((TRAIN_FILE, "train", TRAIN_IMAGES), (TEST_FILE, "test", None)):
        images = load_cifar10(folder, split)[0][:count]
        np.savez_compressed(data / name, images=images)
        print(f"{data / name}: {len(images)} {split} images, {(data / name).stat().st_size / 2**20:.1f} MiB")


def steps(device: str, quick: bool, data: Path, out: Path, runs: Path) -> list[tuple[str, list[str], int]]:
    """(name, command, time limit in seconds) of each check, in order."""
    python, run = sys.executable, runs / "gpu_check_cifar10"
    thermodiff = [python, "-m", "thermodiff"]
    minutes, examples, samples, sample_steps = ("0.1", "4", "4", "4") if quick else ("3", "200", "64", "50")
    estimate = ["--t-samples", "4", "--t-sampling", "uniform"] if quick else []  # else the image default
    throughput = (["--presets", "small", "--precisions", "fp32", "--batch-size", "4", "--repeats", "1", "--iters", "1",
                   "--warmup", "0", "--T", "10", "--matmul-side", "256"] if quick else
                  ["--presets", "unet_cpu,reference_cifar10", "--precisions", "fp32,bf16", "--batch-size", "128",
                   "--repeats", "3", "--iters", "5", "--warmup", "3"])
    return [
        ("environment", [python, "-c", "import torch; print(torch.__version__, torch.version.cuda, "
                                       "torch.cuda.is_available() and torch.cuda.get_device_name(0), "
                                       "torch.cuda.is_available() and torch.cuda.is_bf16_supported())"], 60),
        ("tests", [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(ROOT / "tests" / "test_devices.py")],
         180),
        ("throughput", [python, str(ROOT / "benchmarks" / "throughput.py"), "--device", device, *throughput,
                        "--name", "throughput_gpu", "--results-dir", str(out),
                        "--notes", "benchmarks/gpu_check.py on a lent device machine"], 240),
        ("train", [*thermodiff, "train", "cifar10_unet", "--data", str(data / TRAIN_FILE), "--device", device,
                   "--minutes", minutes, "--out", str(run), "--overwrite", "--quiet", "--json"], 270),
        ("evaluation", [*thermodiff, "evaluate", str(run), "--data", str(data / TEST_FILE), "--max-examples", examples,
                        "--device", device, *estimate, "--quiet", "--json"], 150),
        ("sample", [*thermodiff, "sample", str(run), "-n", samples, "--steps", sample_steps, "--device", device,
                    "--out", str(out / "gpu_check_samples.png"), "--overwrite", "--quiet", "--json"], 90),
    ]


def run_step(name: str, command: list[str], limit_s: int) -> dict:
    """One check in its own process: its exit code (None: stopped at ``limit_s``), wall time, the
    end of its output, and its report where it printed one JSON object (``--json``)."""
    env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")])),
                        "PYTHONUNBUFFERED": "1"}
    start = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=limit_s)
        rc, stdout, stderr = done.returncode, done.stdout, done.stderr
    except subprocess.TimeoutExpired as e:
        rc, stdout, stderr = None, _text(e.stdout), _text(e.stderr)
    result = {"command": shlex.join(command), "rc": rc, "wall_s": round(time.perf_counter() - start, 1),
              "stdout_tail": stdout[-TAIL_CHARS:], "stderr_tail": stderr[-TAIL_CHARS:]}
    try:
        result["report"] = json.loads(stdout)
    except json.JSONDecodeError:  # a step that prints text
        result["report"] = None
    print(f"{name}: rc {rc}, {result['wall_s']} s", flush=True)
    return result


def _text(output: bytes | str | None) -> str:
    return output.decode(errors="replace") if isinstance(output, bytes) else output or ""


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prepare", action="store_true", help="write the data a check needs into --data and stop")
    p.add_argument("--data-dir", default="../shared/data", help="with --prepare: the folder holding CIFAR-10")
    p.add_argument("--data", type=Path, default=ROOT / ".device", help=f"the folder of {TRAIN_FILE} and {TEST_FILE}")
    p.add_argument("--out", type=Path, help="where the records go (the device tool's $OUT)")
    p.add_argument("--runs", type=Path, default=ROOT / "runs", help="where the check's run is trained")
    p.add_argument("--device", default="cuda", help="cuda (default), or cpu to rehearse")
    p.add_argument("--quick", action="store_true", help="every step cut to seconds, to rehearse the script")
    p.add_argument("--only", help=f"comma-separated steps to run, e.g. to rerun those that failed "
                                  f"(of {', '.join(STEPS)})")
    args = p.parse_args(argv)
    only = STEPS if args.only is None else [name.strip() for name in args.only.split(",")]
    if not only or not set(only) <= set(STEPS):
        p.error(f"--only: choose from {', '.join(STEPS)}; got {args.only!r}")
    if args.prepare:
        prepare(args.data_dir, args.data)
        return 0
    if args.out is None:
        p.error("--out is required (the device tool's $OUT)")
    if not all((args.data / name).is_file() for name in (TRAIN_FILE, TEST_FILE)):
        p.error(f"--data {args.data}: no {TRAIN_FILE} and {TEST_FILE}; run --prepare first, and carry .device")
    args.out.mkdir(parents=True, exist_ok=True)
    record = {"script": "benchmarks/gpu_check.py", "argv": argv,
              "date": datetime.datetime.now().isoformat(timespec="seconds"), "device": args.device, "quick": args.quick,
              "train_images": TRAIN_IMAGES, "steps": {}}
    for name, command, limit_s in steps(args.device, args.quick, args.data, args.out, args.runs):
        if name not in only:
            continue
        record["steps"][name] = run_step(name, command, limit_s)
        (args.out / "gpu_check.json").write_text(json.dumps(record, indent=2) + "\n")  # kept as it goes
    return 0 if all(step["rc"] == 0 for step in record["steps"].values()) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
