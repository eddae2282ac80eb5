"""Reproduce a paper experiment and record the result with how it was measured.

    python benchmarks/reproduce.py swissroll [extra `thermodiff reproduce` flags]

Runs `thermodiff reproduce NAME --json ...` in-process, and writes
benchmarks/results/NAME.json: the command, the evaluation (K with its standard error, split,
number of examples, draws, T, parameterisation), training wall time and the hardware.
"""

import contextlib
import datetime
import io
import json
import platform
import shlex
import sys
from pathlib import Path

import torch

from thermodiff.cli import main


def run(argv: list[str]) -> dict:
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(["reproduce", *argv, "--json", "--quiet"])
    if code != 0:
        raise SystemExit(code)
    return json.loads(stdout.getvalue())


if __name__ == "__main__":
    argv = sys.argv[1:]
    if not argv:
        raise SystemExit(__doc__)
    result = run(argv)
    record = {
        "command": "thermodiff reproduce " + shlex.join(argv),
        "date": datetime.date.today().isoformat(),
        "machine": {"platform": platform.platform(), "processor": platform.machine(),
                    "threads": torch.get_num_threads(), "torch": torch.__version__},
        **result,
    }
    out = Path(__file__).parent / "results" / f"{argv[0]}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    e = result["evaluation"]
    print(f"{argv[0]}: K = {e['K_bits']:.3f} +- {e['stderr_bits']:.3f} bits, K - L_null = "
          f"{e['K_minus_L_null_bits']:.3f} (paper {e['paper']['K_bits']} / {e['paper']['K_minus_L_null_bits']}); "
          f"train {result['train']['wall_s']:.0f} s -> {out}")
