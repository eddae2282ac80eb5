"""Start-up time of the command line: how long `thermodiff --help` and `thermodiff CMD --help` take,
each in a fresh process (the median of several runs), with the load average when measured (the
machine is shared, so a high load inflates every figure).

    python benchmarks/startup.py [--repeats 7] [--label after]

Adds the measurements under LABEL to benchmarks/results/startup.json, keeping the other labels
(run it with --label before on the old code and --label after on the new, to compare).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from record import RESULTS, machine, write_result

COMMANDS = {
    "python -m thermodiff --help": [sys.executable, "-m", "thermodiff", "--help"],
    "thermodiff train --help": [sys.executable, "-m", "thermodiff", "train", "--help"],
    "thermodiff evaluate --help": [sys.executable, "-m", "thermodiff", "evaluate", "--help"],
    "thermodiff sample --help": [sys.executable, "-m", "thermodiff", "sample", "--help"],
    "thermodiff inpaint --help": [sys.executable, "-m", "thermodiff", "inpaint", "--help"],
    "python -c pass (the interpreter alone)": [sys.executable, "-c", "pass"],
}


def wall_time(argv: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def measure(repeats: int) -> dict:
    """Every command ``repeats`` times, interleaved (so a load spike hits all alike), in seconds."""
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    load_before = os.getloadavg()[0]
    for _ in range(repeats):
        for name, argv in COMMANDS.items():
            times[name].append(round(wall_time(argv), 4))
    return {"load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
            "median_s": {name: round(statistics.median(t), 4) for name, t in times.items()},
            "seconds": times}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--label", default="after", help="the name of this measurement (e.g. before, after)")
    args = parser.parse_args()
    path = RESULTS / "startup.json"
    record = json.loads(path.read_text()) if path.exists() else {"runs": {}}
    record["runs"][args.label] = measure(args.repeats) | {"machine": machine()}
    record["command"] = "python benchmarks/startup.py --repeats N --label LABEL"
    out = write_result("startup", record | {"machine": record["runs"][args.label]["machine"]})
    print(json.dumps(record["runs"][args.label]["median_s"], indent=2))
    print(f"-> {out}")


if __name__ == "__main__":
    main()
