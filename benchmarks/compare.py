"""The 2015 model, VDM and a VAE on the Swiss roll at equal training time, on the same split.

    OMP_NUM_THREADS=1 python benchmarks/compare.py [--minutes 1] [--notes "..."]

Runs `thermodiff compare configs/compare_swissroll/*.toml --minutes M` in-process (runs in
runs/compare_swissroll), evaluates VDM's chain once more at T = 1000 steps (its network takes
continuous time, so any T is a valid chain), and writes benchmarks/results/compare_swissroll.json
with the budget, the machine and the table, and the plot of the bound against training time
as benchmarks/results/compare_swissroll.png.
"""

import argparse
import datetime
import os
import shlex
import shutil
from pathlib import Path

from record import RESULTS, thermodiff_json, write_result  # a sibling module: benchmarks/ is on sys.path when run
from thermodiff.run.experiment import load_run
from thermodiff.tasks.compare import format_table
from thermodiff.tasks.evaluation import evaluate

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = [f"configs/compare_swissroll/{name}.toml" for name in ("paper2015", "vdm", "vae")]

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=1.0, help="training time per model")
    parser.add_argument("--out", default="runs/compare_swissroll")
    parser.add_argument("--notes", default="", help="what the record should say about the conditions (e.g. other load)")
    args = parser.parse_args()
    os.chdir(ROOT)  # the configs' and runs' paths are the repository's
    argv = ["compare", *CONFIGS, "--minutes", str(args.minutes), "--out", args.out, "--overwrite"]
    record = thermodiff_json(argv)
    plot = RESULTS / "compare_swissroll.png"
    shutil.copyfile(record["plot"], plot)
    record["plot"] = str(plot.relative_to(ROOT))
    vdm = load_run(Path(args.out) / "swissroll_vdm")
    vdm.diffusion.T = 1000
    long_chain = evaluate(vdm, n_draws=1, progress=False)
    record |= {
        "command": "OMP_NUM_THREADS=1 thermodiff " + shlex.join([*argv, "--quiet", "--json"]),
        "date": datetime.date.today().isoformat(),
        "budget": {"training_minutes_per_model": args.minutes},
        "notes": args.notes,
        "vdm_chain_T1000": {key: long_chain[key] for key in ("T", "n_draws", "K_bits", "stderr_bits", "K_bits_per_dim")},
        "table": format_table(record),
    }
    out = write_result("compare_swissroll", record)
    print(record["table"])
    c = record["vdm_chain_T1000"]
    print(f"VDM's chain at T = 1000: K = {c['K_bits']:.3f} +- {c['stderr_bits']:.3f} bits -> {out}")
