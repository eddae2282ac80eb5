"""The 2015 model, VDM and a VAE on the Swiss roll at equal training time, on the same split.

    OMP_NUM_THREADS=1 python benchmarks/compare.py [--minutes 1]

Runs `thermodiff compare configs/compare_swissroll/*.toml --minutes M` in-process (runs in
runs/compare_swissroll), evaluates VDM's chain once more at T = 1000 steps (its network takes
continuous time, so any T is a valid chain), and writes benchmarks/results/compare_swissroll.json
with the budget, the machine and the table, and the plot of the bound against training time
as benchmarks/results/compare_swissroll.png.
"""

import argparse
import contextlib
import datetime
import io
import json
import os
import platform
import shlex
from pathlib import Path

import torch

from thermodiff.cli import main
from thermodiff.compare import format_table, plot_bound_vs_time
from thermodiff.evaluation import evaluate
from thermodiff.experiment import load_run

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = [f"configs/compare_swissroll/{name}.toml" for name in ("paper2015", "vdm", "vae")]

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=1.0, help="training time per model")
    parser.add_argument("--out", default="runs/compare_swissroll")
    args = parser.parse_args()
    os.chdir(ROOT)  # the configs' and runs' paths are the repository's
    argv = ["compare", *CONFIGS, "--minutes", str(args.minutes), "--out", args.out, "--overwrite", "--quiet", "--json"]
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(argv)
    if code != 0:
        raise SystemExit(code)
    record = json.loads(stdout.getvalue())
    results = ROOT / "benchmarks" / "results"
    record["plot"] = str((results / "compare_swissroll.png").relative_to(ROOT))
    plot_bound_vs_time(record["rows"], results / "compare_swissroll.png")
    vdm = load_run(Path(args.out) / "swissroll_vdm")
    vdm.diffusion.T = 1000
    long_chain = evaluate(vdm, n_draws=1, progress=False)
    record |= {
        "command": "OMP_NUM_THREADS=1 thermodiff " + shlex.join(argv),
        "date": datetime.date.today().isoformat(),
        "budget": {"training_minutes_per_model": args.minutes, "torch_threads": torch.get_num_threads(),
                   "note": "one thread per job on a 2-core machine whose other core ran other training jobs"},
        "machine": {"platform": platform.platform(), "processor": platform.machine(), "torch": torch.__version__},
        "vdm_chain_T1000": {key: long_chain[key] for key in ("T", "n_draws", "K_bits", "stderr_bits", "K_bits_per_dim")},
        "table": format_table(record),
    }
    out = results / "compare_swissroll.json"
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(record["table"])
    c = record["vdm_chain_T1000"]
    print(f"VDM's chain at T = 1000: K = {c['K_bits']:.3f} +- {c['stderr_bits']:.3f} bits -> {out}")
