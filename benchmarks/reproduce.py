"""Reproduce a paper experiment and record the result with how it was measured.

    python benchmarks/reproduce.py swissroll [--record NAME] [extra `thermodiff reproduce` flags]

Runs `thermodiff reproduce NAME --json ...` in-process, and writes
benchmarks/results/NAME.json (or RECORD.json): the command, the evaluation (K with its standard
error, split, number of examples, draws, T, parameterisation), training wall time and the hardware.
"""

import datetime
import shlex
import sys

from record import thermodiff_json, write_result  # a sibling module: benchmarks/ is on sys.path when run

if __name__ == "__main__":
    argv = sys.argv[1:]
    if not argv:
        raise SystemExit(__doc__)
    record = argv[0]
    if "--record" in argv:
        at = argv.index("--record")
        record = argv[at + 1]
        del argv[at:at + 2]
    result = thermodiff_json(["reproduce", *argv])
    out = write_result(record, {"command": "thermodiff reproduce " + shlex.join(argv),
                                 "date": datetime.date.today().isoformat(), **result})
    e = result["evaluation"]
    print(f"{argv[0]}: K = {e['K_bits']:.3f} +- {e['stderr_bits']:.3f} bits, K - L_null = "
          f"{e['K_minus_L_null_bits']:.3f} (paper {e['paper']['K_bits']} / {e['paper']['K_minus_L_null_bits']}); "
          f"train {result['train']['wall_s']:.0f} s -> {out}")
