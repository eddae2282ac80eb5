"""Categorical diffusion on real categorical data: MNIST quantised to 4 grey levels (v // 64), as
vectors of 784 symbols, trained and evaluated as a user would (`thermodiff train vectors --data
train.npy`, which selects categorical diffusion for an integer array of few symbols; `thermodiff
evaluate RUN --data test.npy`), reported in bits per symbol on held-out official test images next
to an independent categorical per pixel fitted on the same training images. Beside it, the
binomial model on the same images binarised (v >= 128), next to an independent Bernoulli per pixel.

    OMP_NUM_THREADS=1 python benchmarks/categorical.py --data-dir ../shared/data/mnist

writes benchmarks/results/categorical_mnist.json and the sample grids categorical_mnist_*.png.
"""

import argparse
import math
import tempfile
import time
from pathlib import Path

import numpy as np
from record import RESULTS, thermodiff_json, write_result

from thermodiff.data.images import load_mnist
from thermodiff.tasks.plotting import image_grid_png

LEVELS = 4
#: a few minutes of a shared CPU make a few hundred updates: no validation split (its scoring would
#: take a good part of them; the last weights are evaluated) and a weight average over ~100 updates
#: (the default 0.999 would still hold mostly the initial weights)
BUDGET_FLAGS = ["--set", "data.val_fraction=0", "--set", "train.ema_decay=0.99"]


def independent_bits(train: np.ndarray, test: np.ndarray, levels: int, alpha: float = 1.0) -> dict:
    """-log2 of each test image under independent categoricals per pixel fitted on ``train`` with
    add-``alpha`` smoothing (a level a pixel never took in training keeps some probability)."""
    counts = np.stack([(train == k).sum(0) for k in range(levels)], -1) + alpha  # (D, levels)
    log_p = np.log2(counts / counts.sum(-1, keepdims=True))
    per_image = -log_p[np.arange(train.shape[1]), test].sum(1)
    return summary(per_image, train.shape[1]) | {"smoothing_alpha": alpha}


def summary(nll_bits: np.ndarray, dim: int) -> dict:
    """Mean negative log-likelihood per symbol and its standard error over images."""
    return {"bits_per_symbol": float(nll_bits.mean() / dim),
            "stderr_bits_per_symbol": float(nll_bits.std(ddof=1) / math.sqrt(len(nll_bits)) / dim)}


def diffusion_bits(folder: Path, train: np.ndarray, test: np.ndarray, minutes: float, t_samples: int) -> dict:
    """Train on ``train`` with the vectors config's automatic choices, evaluate the bound on ``test``."""
    np.save(folder / "train.npy", train)
    np.save(folder / "test.npy", test)
    run = folder / "run"
    start = time.perf_counter()
    trained = thermodiff_json(["train", "vectors", "--data", str(folder / "train.npy"), "--out", str(run), "--overwrite",
                               "--minutes", str(minutes), *BUDGET_FLAGS])
    train_wall = time.perf_counter() - start
    start = time.perf_counter()
    evaluation = thermodiff_json(["evaluate", str(run), "--data", str(folder / "test.npy"), "--t-samples", str(t_samples)])
    samples = folder / "samples.npy"
    thermodiff_json(["sample", str(run), "-n", "64", "--out", str(samples), "--overwrite"])
    dim = evaluation["dim"]
    return {
        "bits_per_symbol": -evaluation["K_bits"] / dim, "stderr_bits_per_symbol": evaluation["stderr_bits"] / dim,
        "K_bits": evaluation["K_bits"], "stderr_bits": evaluation["stderr_bits"],
        "null_bits_per_symbol": -evaluation["L_null_bits"] / dim,
        "diffusion": evaluation["diffusion"], "parameterization": evaluation["parameterization"],
        "decoder": evaluation["decoder"], "schedule": evaluation["schedule"], "T": evaluation["T"],
        "estimator": evaluation["estimator"], "n_draws": evaluation["n_draws"],
        "train_steps": trained["steps"], "train_minutes": round(train_wall / 60, 2),
        "eval_minutes": round((time.perf_counter() - start) / 60, 2), "checkpoint_evaluated": evaluation["checkpoint"],
        "auto_choices": trained["auto_choices"],
        "command": f"thermodiff train vectors --data train.npy --minutes {minutes} {' '.join(BUDGET_FLAGS)}; "
                   f"thermodiff evaluate RUN --data test.npy --t-samples {t_samples}",
    }, np.load(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default="../shared/data/mnist")
    parser.add_argument("--n-train", type=int, default=20000, help="the first N official training images")
    parser.add_argument("--n-test", type=int, default=1000, help="the first N official test images")
    parser.add_argument("--minutes", type=float, default=5.0, help="training time per model")
    parser.add_argument("--t-samples", type=int, default=50, help="stratified steps per image of the bound")
    args = parser.parse_args()
    train = load_mnist(args.data_dir, "train")[0][: args.n_train].reshape(args.n_train, -1)
    test = load_mnist(args.data_dir, "test")[0][: args.n_test].reshape(args.n_test, -1)
    record = {"data": "MNIST", "split": f"train: the first {args.n_train} official training images; test: the first {args.n_test} official test images",
              "n_train": args.n_train, "n_test": args.n_test, "dim": train.shape[1]}
    with tempfile.TemporaryDirectory() as tmp:
        for name, quantise, levels in (("levels4", lambda v: v // (256 // LEVELS), LEVELS),
                                       ("binarised", lambda v: (v >= 128).astype(np.uint8), 2)):
            folder = Path(tmp) / name
            folder.mkdir()
            q_train, q_test = quantise(train), quantise(test)
            result, samples = diffusion_bits(folder, q_train, q_test, args.minutes, args.t_samples)
            record[name] = {"levels": levels, "diffusion_model": result,
                            "independent_per_pixel": independent_bits(q_train, q_test, levels)}
            grid = (samples.reshape(-1, 1, 28, 28) * (255 // (levels - 1))).astype(np.uint8)
            (RESULTS / f"categorical_mnist_{name}.png").write_bytes(image_grid_png(grid, 8))
    print(write_result("categorical_mnist", record))


if __name__ == "__main__":
    main()
