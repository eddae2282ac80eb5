"""Categorical diffusion on real categorical data, trained and evaluated as a user would (`thermodiff
train vectors --data train.npy`, which selects categorical diffusion for an integer array of few
symbols; `thermodiff evaluate RUN --data test.npy`), reported in bits per symbol on held-out official
test images next to an independent categorical per pixel fitted on the same training images:

- MNIST quantised to 4 grey levels (v // 64), vectors of 784 symbols; beside it, the binomial model
  on the same images binarised (v >= 128), next to an independent Bernoulli per pixel;
- CIFAR-10 with its colours quantised to a palette of 16 (k-means in RGB on training pixels, each
  pixel its nearest palette colour), vectors of 1024 symbols.

    OMP_NUM_THREADS=1 python benchmarks/categorical.py --dataset mnist --data-dir ../shared/data/mnist
    OMP_NUM_THREADS=1 python benchmarks/categorical.py --dataset cifar10 --data-dir ../shared/data/cifar10

With --hybrid, the cases of more than two symbols are trained twice, for the same CPU minutes, on
the bound and on D3PM's hybrid loss (`--set train.loss=hybrid`: the bound plus lambda times the
cross-entropy of the x_0 prediction, Austin et al. 2021, Eq. 5), scored on the same test images,
into benchmarks/results/categorical_<dataset>_hybrid.json. With --unet, the cases of more than two
symbols are trained as images (`thermodiff train images --data train.npy --set
diffusion.kind=categorical`: the image default's U-Net on one-hot states), next to the vectors'
MLP, into benchmarks/results/categorical_<dataset>_unet.json.

write benchmarks/results/categorical_<dataset>.json and the sample grids categorical_<dataset>_*.png.
"""

import argparse
import math
import tempfile
import time
from pathlib import Path

import numpy as np
from record import RESULTS, thermodiff_json, write_result

from thermodiff.data.images import load_cifar10, load_mnist
from thermodiff.tasks.plotting import image_grid_png

LEVELS = 4
#: a few minutes of a shared CPU make a few hundred updates: no validation split (its scoring would
#: take a good part of them; the last weights are evaluated) and a weight average over ~100 updates
#: (the default 0.999 would still hold mostly the initial weights)
#: (the default 0.999 would still hold mostly the initial weights); minutes of CPU time, so that
#: a run beside other jobs does the work it would do alone
BUDGET_FLAGS = ["--set", "data.val_fraction=0", "--set", "train.ema_decay=0.99", "--set", "train.clock=cpu"]
PALETTE = 16


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


#: `train images` on images of symbols: categorical diffusion asked for (an integer image array is
#: read as 8-bit images otherwise), and no validation split, as for the vectors
IMAGE_FLAGS = ("--set", "diffusion.kind=categorical")


def diffusion_bits(folder: Path, train: np.ndarray, test: np.ndarray, minutes: float, t_samples: int,
                   flags: tuple[str, ...] = (), experiment: str = "vectors") -> dict:
    """Train on ``train`` with the ``experiment`` config's automatic choices (and ``flags``),
    evaluate the bound on ``test``."""
    np.save(folder / "train.npy", train)
    np.save(folder / "test.npy", test)
    run = folder / "run"
    start = time.perf_counter()
    flags = [*BUDGET_FLAGS, *flags]
    trained = thermodiff_json(["train", experiment, "--data", str(folder / "train.npy"), "--out", str(run), "--overwrite",
                               "--minutes", str(minutes), *flags])
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
        "command": f"thermodiff train {experiment} --data train.npy --minutes {minutes} {' '.join(flags)}; "
                   f"thermodiff evaluate RUN --data test.npy --t-samples {t_samples}",
    }, np.load(samples)


def palette_kmeans(images: np.ndarray, colours: int, pixels: int = 200_000, iterations: int = 25,
                   seed: int = 0) -> np.ndarray:
    """A palette of ``colours`` RGB colours (float, 0..255) by Lloyd's k-means on ``pixels`` pixels drawn
    from ``images`` (N, 3, H, W), started from distinct drawn pixels."""
    rng = np.random.default_rng(seed)
    rgb = images.transpose(0, 2, 3, 1).reshape(-1, 3)
    sample = rgb[rng.choice(len(rgb), pixels, replace=False)].astype(np.float64)
    centres = np.unique(sample, axis=0)[rng.choice(len(np.unique(sample, axis=0)), colours, replace=False)]
    for _ in range(iterations):
        nearest = nearest_colour(sample, centres)
        centres = np.stack([sample[nearest == k].mean(0) if (nearest == k).any() else centres[k] for k in range(colours)])
    return centres


def nearest_colour(rgb: np.ndarray, palette: np.ndarray, chunk: int = 1 << 18) -> np.ndarray:
    """The index of each (..., 3) colour's nearest palette colour (Euclidean in RGB), ``chunk``
    colours at a time (a (pixels, colours, 3) difference of all of CIFAR-10 would take gigabytes)."""
    flat = rgb.reshape(-1, 3).astype(np.float64)
    nearest = np.concatenate([((part[:, None, :] - palette) ** 2).sum(-1).argmin(-1)
                              for part in np.array_split(flat, max(1, len(flat) // chunk))])
    return nearest.astype(np.uint8).reshape(rgb.shape[:-1])


def mnist_cases(data_dir: str, n_train: int, n_test: int):
    """(record fields, [(name, train, test, levels, grid of symbols -> uint8 images)])."""
    train = load_mnist(data_dir, "train")[0][:n_train].reshape(n_train, -1)
    test = load_mnist(data_dir, "test")[0][:n_test].reshape(n_test, -1)
    cases = []
    for name, quantise, levels in (("levels4", lambda v: v // (256 // LEVELS), LEVELS),
                                   ("binarised", lambda v: (v >= 128).astype(np.uint8), 2)):
        def grid(samples, levels=levels):
            return (samples.reshape(-1, 1, 28, 28) * (255 // (levels - 1))).astype(np.uint8)
        cases.append((name, quantise(train), quantise(test), levels, grid))
    return {"data": "MNIST", "quantisation": {"levels4": f"v // {256 // LEVELS}", "binarised": "v >= 128"}}, cases


def cifar10_cases(data_dir: str, n_train: int, n_test: int):
    """CIFAR-10's colours as indices into a k-means palette of :data:`PALETTE` colours."""
    train, test = (load_cifar10(data_dir, split)[0] for split in ("train", "test"))
    train, test = train[:n_train], test[:n_test]
    palette = palette_kmeans(train, PALETTE)

    def symbols(images):
        return nearest_colour(images.transpose(0, 2, 3, 1), palette).reshape(len(images), -1)

    def grid(samples):
        return palette[samples.round().astype(int).reshape(-1, 32, 32)].transpose(0, 3, 1, 2).round().astype(np.uint8)

    fields = {"data": "CIFAR-10", "quantisation": f"palette of {PALETTE} colours, k-means (Lloyd, 25 iterations) in RGB on "
              "200000 training pixels, each pixel its nearest palette colour",
              "palette_rgb": palette.round(2).tolist()}
    return fields, [(f"palette{PALETTE}", symbols(train), symbols(test), PALETTE, grid)]


CASES = {"mnist": mnist_cases, "cifar10": cifar10_cases}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", choices=sorted(CASES), default="mnist")
    parser.add_argument("--data-dir", default=None, help="default ../shared/data/<dataset>")
    parser.add_argument("--n-train", type=int, default=20000, help="the first N official training images")
    parser.add_argument("--n-test", type=int, default=1000, help="the first N official test images")
    parser.add_argument("--minutes", type=float, default=5.0, help="training time per model (CPU minutes)")
    parser.add_argument("--t-samples", type=int, default=50, help="stratified steps per image of the bound")
    variants = parser.add_mutually_exclusive_group()
    variants.add_argument("--hybrid", action="store_true",
                          help="train the cases of more than two symbols on the bound and on D3PM's hybrid loss, "
                               "side by side (categorical_<dataset>_hybrid.json)")
    variants.add_argument("--unet", action="store_true",
                          help="train the cases of more than two symbols as vectors (MLP) and as images (U-Net), "
                               "side by side (categorical_<dataset>_unet.json)")
    args = parser.parse_args()
    fields, cases = CASES[args.dataset](args.data_dir or f"../shared/data/{args.dataset}", args.n_train, args.n_test)
    record = fields | {"split": f"train: the first {args.n_train} official training images; test: the first {args.n_test} official test images",
                       "n_train": args.n_train, "n_test": args.n_test, "dim": cases[0][1].shape[1]}
    with tempfile.TemporaryDirectory() as tmp:
        for name, train, test, levels, grid in cases:
            if (args.hybrid or args.unet) and levels == 2:
                continue  # the binomial model is not what they compare
            folder = Path(tmp) / name
            folder.mkdir()
            result, samples = diffusion_bits(folder, train, test, args.minutes, args.t_samples)
            record[name] = {"levels": levels, "diffusion_model": result,
                            "independent_per_pixel": independent_bits(train, test, levels)}
            if args.hybrid:
                (folder / "hybrid").mkdir()
                record[name]["diffusion_model_hybrid_loss"], _ = diffusion_bits(
                    folder / "hybrid", train, test, args.minutes, args.t_samples, ("--set", "train.loss=hybrid"))
            elif args.unet:
                (folder / "unet").mkdir()
                side = math.isqrt(train.shape[1])  # one symbol a pixel: a grey level, or a palette colour's index
                as_images = [x.reshape(len(x), 1, side, side) for x in (train, test)]
                record[name]["diffusion_model_unet"], samples = diffusion_bits(
                    folder / "unet", *as_images, args.minutes, args.t_samples, IMAGE_FLAGS, "images")
                (RESULTS / f"categorical_{args.dataset}_{name}_unet.png").write_bytes(
                    image_grid_png(grid(samples.reshape(len(samples), -1)), 8))
            else:
                (RESULTS / f"categorical_{args.dataset}_{name}.png").write_bytes(image_grid_png(grid(samples), 8))
    variant = "_hybrid" if args.hybrid else "_unet" if args.unet else ""
    print(write_result(f"categorical_{args.dataset}{variant}", record))


if __name__ == "__main__":
    main()
