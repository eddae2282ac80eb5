"""Inpainting (paper Fig. 5): held-out images with a central square hole, filled by
`thermodiff inpaint`; PSNR over the hole of posterior samples and of their mean against the truth,
next to two baselines fitted on the training images: the mean grey level (mean-fill) and the
Gaussian conditional mean of the hole given the known pixels (the best linear fill).

    python benchmarks/inpaint.py RUN_DIR [--images 50] [--samples 2] [--hole 12] [--known clamp forward]
    python benchmarks/inpaint.py RUN_DIR --window 128 --hole 100 --images 4 --known clamp   # paper Fig. 5

Writes benchmarks/results/inpaint_<experiment>.json and inpaint_<experiment>.png (rows: truth,
the input with its hole, the posterior mean, samples). ``--window N`` (texture runs with a fully
convolutional network) instead fills holes in N x N windows of the texture's held-out region,
larger than the training crops, as the paper's Fig. 5 does; results get the suffix _windowN (no
Gaussian conditional fill there: its covariance would be N^2 x N^2).
"""

import argparse
import json
import time

import numpy as np
from denoise import psnr, score_samples, summary  # sibling modules: benchmarks/ is on sys.path when run

from record import write_grid, write_result
from thermodiff.data.images import load_grey_image, texture_crops
from thermodiff.run.experiment import load_run
from thermodiff.tasks.conditioning import inpaint


def gaussian_fill(train: np.ndarray, images: np.ndarray, hole: np.ndarray) -> np.ndarray:
    """E[x_hole | x_known] under the Gaussian fitted to the training images: mu_h + C_hk C_kk^-1 (x_k - mu_k)."""
    x = train.reshape(len(train), -1).astype(np.float64)
    h = hole.reshape(-1)
    mu, c = x.mean(0), np.cov(x, rowvar=False)
    known = images.reshape(len(images), -1).astype(np.float64)[:, ~h]
    fill = mu[h] + (known - mu[~h]) @ np.linalg.solve(c[np.ix_(~h, ~h)], c[np.ix_(~h, h)])
    out = images.reshape(len(images), -1).astype(np.float64).copy()
    out[:, h] = fill
    return out.reshape(images.shape)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir")
    parser.add_argument("--images", type=int, default=50)
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--hole", type=int, default=12, help="side of the central square hole, pixels")
    parser.add_argument("--known", nargs="+", choices=["clamp", "forward"], default=["clamp", "forward"])
    parser.add_argument("--window", type=int, help="N x N held-out windows of a texture run's image (paper Fig. 5)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    run = load_run(args.run_dir)
    if not run.dataset.is_image:
        raise SystemExit(f"{args.run_dir}: not an image run")
    if args.window:
        data = run.config.data
        if data.source != "texture":
            raise SystemExit(f"{args.run_dir}: --window needs a texture run (data.source = 'texture')")
        truth = texture_crops(load_grey_image(data.path), args.images, args.window, args.seed, "test",
                              data.test_fraction).astype(np.float64)
    else:
        truth = run.dataset.test[: args.images].astype(np.float64)
    size = truth.shape[-1]
    name = f"inpaint_{run.config.name}" + (f"_window{args.window}" if args.window else "")
    lo = (size - args.hole) // 2
    hole = np.zeros(truth.shape[1:], dtype=bool)
    hole[..., lo:lo + args.hole, lo:lo + args.hole] = True
    masked = np.where(hole, 128.0, truth)  # the hole's values are never read
    results = {
        "mean_fill": summary(psnr(np.where(hole, run.dataset.train.mean(), truth), truth, hole)),
    }
    if not args.window:
        results["gaussian_conditional_fill"] = summary(psnr(gaussian_fill(run.dataset.train, truth, hole), truth, hole))
    seconds, panels = {}, [truth, np.where(hole, 0.0, truth)]
    for known in args.known:
        start = time.perf_counter()
        samples = inpaint(run, masked, np.broadcast_to(~hole, truth.shape), args.samples, args.seed, known=known)
        seconds[known] = round(time.perf_counter() - start, 1)
        results[f"posterior_mean_{known}"], results[f"posterior_sample_{known}"] = score_samples(samples, truth, hole)
        panels += [samples.astype(np.float64).mean(0), samples[0]]
    write_grid(name, panels)
    record = {
        "command": f"python benchmarks/inpaint.py {args.run_dir} --images {args.images} --samples {args.samples} "
                   f"--hole {args.hole} --known {' '.join(args.known)} --seed {args.seed}"
                   + (f" --window {args.window}" if args.window else ""),
        "experiment": run.config.name, "train_steps": run.step, "T": run.diffusion.T,
        "setup": (f"{args.images} random {size}x{size} windows of the texture's held-out rows (seed {args.seed}), "
                  f"the network trained on {run.dataset.event_shape[-1]}x{run.dataset.event_shape[-1]} crops"
                  if args.window else f"first {args.images} test images ({size}x{size})") + f", central {args.hole}x{args.hole} hole; PSNR over the "
                 f"hole only; posterior mean of {args.samples} samples; known pixels held at their values at every step "
                 f"(clamp, the paper's) or following a forward trajectory to them (forward)",
        "figure": f"{name}.png: rows truth, input, then per method the posterior mean and one sample",
        "psnr": results, "sampling_seconds": seconds,
    }
    write_result(name, record)
    print(json.dumps(results, indent=2))
