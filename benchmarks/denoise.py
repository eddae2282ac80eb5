"""Denoising at SNR 1 (paper Fig. 3): held-out images plus Gaussian noise whose variance equals
the data's, the posterior mean of `thermodiff denoise` against the noisy input, a Wiener
filter fitted on the training images (the best linear estimator under a Gaussian model) and,
with --dae, a denoising auto-encoder trained at that noise level (baselines.DAE) on the same
noisy images.

    python benchmarks/denoise.py RUN_DIR [--images 100] [--samples 4] [--seed 0] [--methods [start product]]
                                 [--dae DAE_RUN_DIR] [--name NAME]

`--methods` with no methods skips the (slow) samplers: the one-call posterior mean, the Wiener
filter and the DAE only. Writes benchmarks/results/NAME.json (default denoise_<experiment>) with
PSNRs in dB (peak 255), and NAME.png in the style of the paper's Fig. 3 (first 10 images).
"""

import argparse
import json
import time

import numpy as np
import torch

from record import write_grid, write_result  # a sibling module: benchmarks/ is on sys.path when run
from thermodiff.data.images import psnr_db
from thermodiff.run.experiment import load_run
from thermodiff.tasks.conditioning import DENOISE_METHODS, denoise, denoise_mean


def psnr(estimate: np.ndarray, truth: np.ndarray, where: np.ndarray | None = None) -> np.ndarray:
    """Per image, in dB for 8-bit pixel values, over the pixels ``where`` is true (default all)."""
    err = (estimate.astype(np.float64) - truth).reshape(len(truth), -1)
    if where is not None:
        err = err[:, where.reshape(-1)]
    return psnr_db(torch.from_numpy((err**2).mean(1))).numpy()


def wiener(train: np.ndarray, noisy: np.ndarray, noise_var: float) -> np.ndarray:
    """x_hat = mu + C (C + noise_var I)^-1 (y - mu), mean and covariance from the training images."""
    x = train.reshape(len(train), -1).astype(np.float64)
    mu, c = x.mean(0), np.cov(x, rowvar=False)
    gain = np.linalg.solve(c + noise_var * np.eye(len(c)), c).T  # C (C + s2 I)^-1, both symmetric
    y = noisy.reshape(len(noisy), -1)
    return (mu + (y - mu) @ gain.T).reshape(noisy.shape)


def dae_output(run_dir: str, truth: np.ndarray, noisy: np.ndarray, sigma: float):
    """A denoising auto-encoder run's output for ``noisy`` (original units) and the run; refused
    unless it was trained at noise std ``sigma`` (original units) and holds out ``truth``."""
    dae = load_run(run_dir)
    if dae.config.baseline.kind != "dae":
        raise SystemExit(f"--dae {run_dir}: not a denoising auto-encoder run (baseline.kind = {dae.config.baseline.kind!r})")
    trained, scaled = dae.diffusion.noise_std_original(dae.dataset), dae.diffusion.noise_std
    if not np.allclose(trained, sigma, rtol=1e-4, atol=0):
        raise SystemExit(f"--dae {run_dir}: trained at noise std {np.ravel(trained)[0]:.4g} grey levels "
                         f"(baseline.noise_std = {scaled:g} of its scaled data), but these images carry {sigma:.4g} "
                         f"(SNR 1); train it with baseline.noise_std = {scaled * sigma / np.ravel(trained)[0]:.6g}")
    if dae.dataset.test.shape[1:] != truth.shape[1:] or not np.array_equal(dae.dataset.test[: len(truth)], truth):
        raise SystemExit(f"--dae {run_dir}: its first {len(truth)} test images are not those denoised here (other data?)")
    return dae.diffusion.denoise(dae.model, dae.dataset, noisy), dae


def summary(values: np.ndarray) -> dict:
    return {"mean_db": float(values.mean()), "stderr_db": float(values.std(ddof=1) / np.sqrt(len(values)))}


def score_samples(samples: np.ndarray, truth: np.ndarray, where: np.ndarray | None = None) -> tuple[dict, dict]:
    """PSNR summaries of the samples' mean and of one sample (samples: (n, N, ...))."""
    return summary(psnr(samples.astype(np.float64).mean(0), truth, where)), summary(psnr(samples[0], truth, where))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir")
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", nargs="*", choices=DENOISE_METHODS, default=["start"],
                        help="posterior samplers to compare (see thermodiff.tasks.conditioning.DENOISE_METHODS); "
                             "none: the one-call mean, the Wiener filter and --dae only")
    parser.add_argument("--one-step-draws", type=int, default=4,
                        help="draws averaged by the one-call posterior mean (thermodiff.tasks.conditioning.denoise_mean)")
    parser.add_argument("--dae", metavar="DAE_RUN_DIR", help="a denoising auto-encoder run (baseline.kind = 'dae') "
                                                             "trained at this noise level, run on the same noisy images")
    parser.add_argument("--name", help="the result's name: benchmarks/results/NAME.json (default denoise_<experiment>)")
    args = parser.parse_args()
    run = load_run(args.run_dir)
    if not run.dataset.is_image:
        raise SystemExit(f"{args.run_dir}: not an image run")
    truth = run.dataset.test[: args.images].astype(np.float64)
    sigma = float(run.dataset.train.astype(np.float64).std())  # SNR 1: noise variance = data variance
    noisy = truth + np.random.default_rng(args.seed).normal(0, sigma, truth.shape)
    dae_denoised, dae = dae_output(args.dae, truth, noisy, sigma) if args.dae else (None, None)  # refused before sampling
    results, seconds, sample_panels = {}, {}, []
    for method in args.methods:
        start = time.perf_counter()
        samples = denoise(run, noisy, sigma, args.samples, args.seed, progress=True, method=method)
        seconds[method] = round(time.perf_counter() - start, 1)
        results[f"posterior_mean_{method}"], results[f"posterior_sample_{method}"] = score_samples(samples, truth)
        sample_panels.append(samples[0])
    posterior_mean = denoise_mean(run, noisy, sigma, args.one_step_draws, args.seed)
    wiener_estimate = wiener(run.dataset.train, noisy, sigma**2)
    one_step, wiener_db = psnr(posterior_mean, truth), psnr(wiener_estimate, truth)
    results["posterior_mean_one_step"] = summary(one_step)
    results["noisy_input"] = summary(psnr(noisy, truth))
    results["wiener_filter"] = summary(wiener_db)
    results["one_step_minus_wiener_paired"] = summary(one_step - wiener_db)  # same images: the paired difference
    setup = f"first {args.images} test images, noise std {sigma:.2f} grey levels (= the training data's std, SNR 1), "
    if args.methods:
        setup += (f"posterior mean of {args.samples} samples per method: 'start' = the reverse chain from y at the step "
                  f"whose noise level matches sigma, 'product' = the paper's per-step product with N(y; x, sigma^2); ")
    setup += f"'one_step' = the model's E[x | y] from the kernel mean at that step, {args.one_step_draws} draws"
    if dae is not None:
        dae_db = psnr(dae_denoised, truth)
        results["dae_output"] = summary(dae_db)
        results["one_step_minus_dae_paired"] = summary(one_step - dae_db)
        setup += (f"; 'dae_output' = the denoising auto-encoder {args.dae} (step {dae.step}, trained at noise std "
                  f"{dae.diffusion.noise_std:g} of its scaled data, i.e. {sigma:.2f} grey levels) on the same noisy images")
    record = {
        "command": f"python benchmarks/denoise.py {args.run_dir} --images {args.images} --samples {args.samples} "
                   f"--seed {args.seed} --methods{''.join(' ' + m for m in args.methods)} --one-step-draws {args.one_step_draws}"
                   + (f" --dae {args.dae}" if args.dae else "") + (f" --name {args.name}" if args.name else ""),
        "experiment": run.config.name, "train_steps": run.step, "T": run.diffusion.T,
        **({"dae": {"run_dir": args.dae, "experiment": dae.config.name, "train_steps": dae.step,
                    "noise_std_scaled": dae.diffusion.noise_std}} if dae is not None else {}),
        "setup": setup, "psnr": results, "sampling_seconds": seconds,
    }
    name = args.name or f"denoise_{run.config.name}"
    write_grid(name, [truth, noisy, posterior_mean, wiener_estimate, *sample_panels])  # paper Fig. 3 style
    record["figure"] = (f"{name}.png: rows truth, noisy input, posterior mean (one call), Wiener filter, then one "
                        f"posterior sample per method ({', '.join(args.methods) or 'none'})")
    write_result(name, record)
    print(json.dumps(results, indent=2))
