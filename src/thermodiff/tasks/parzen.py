"""Gaussian Parzen-window log-likelihood of test images under a model's samples: the protocol of
Breuleux et al. (2011) and Goodfellow et al. (2014, ``parzen_ll.py``) behind the paper's MNIST
figure (Table 2, 317 bits).

An isotropic Gaussian window of bandwidth sigma is put on each of N samples, pixels scaled to
[0, 1]; sigma is the grid value that maximises the mean log-likelihood of validation images, and
the figure is the mean log-likelihood of the test images. It is a biased estimate in high
dimension, kept to compare with published numbers; the bound K is the model's own figure.
"""

import hashlib
import io
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from thermodiff.errors import UserError, os_error_message
from thermodiff.process.bound import standard_error
from thermodiff.process.respace import VarianceRule
from thermodiff.process.samplers import Sampler, checked_sampler, sample
from thermodiff.process.tensors import LN2
from thermodiff.run import memory
from thermodiff.run.checkpoint import atomic_write_bytes
from thermodiff.run.config import Precision
from thermodiff.run.experiment import Run, batch_activations, paper_row, sample_bytes
from thermodiff.run.training import sampling_network
from thermodiff.tasks.evaluation import ChainSpec, chain_record, hardware, run_chain
from thermodiff.tasks.reports import require_finite

# Goodfellow et al.'s grid: numpy.logspace(sigma_start=-1, sigma_end=0, num=cross_val=10)
DEFAULT_SIGMAS: tuple[float, ...] = tuple(float(s) for s in np.logspace(-1, 0, 10))


def _check_sigmas(sigmas: Sequence[float]) -> list[float]:
    sigmas = [float(s) for s in sigmas]
    if not sigmas or not all(s > 0 and math.isfinite(s) for s in sigmas):
        raise ValueError(f"bandwidths must be a non-empty list of positive finite numbers, got {sigmas}")
    return sigmas


def _log_densities(x: Tensor, samples: Tensor, sigmas: Sequence[float], batch_size: int) -> Tensor:
    """log p_sigma(x_i) for every sigma, shape (len(sigmas), M), float64 nats. The squared
    distances of a batch are computed once for all sigmas, as ||x||^2 + ||s||^2 - 2 x.s: memory
    is batch_size x N, never M x N x D."""
    sigmas = _check_sigmas(sigmas)
    if x.ndim != 2 or samples.ndim != 2:
        raise ValueError(f"expected 2-D (examples, dims) tensors, got shapes {tuple(x.shape)} and {tuple(samples.shape)}")
    if x.shape[1] != samples.shape[1]:
        raise ValueError(f"dimension mismatch: data have {x.shape[1]} dimensions, samples {samples.shape[1]}")
    if len(x) < 1 or len(samples) < 1:
        raise ValueError(f"need at least one example and one sample, got {len(x)} and {len(samples)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    x, samples = x.double(), samples.double()
    n, d = samples.shape
    samples_sq = (samples**2).sum(1)
    rows = []
    for xb in x.split(batch_size):
        sq = ((xb**2).sum(1, keepdim=True) + samples_sq - 2 * xb @ samples.T).clamp_min_(0)  # (B, N)
        rows.append(torch.stack([torch.logsumexp(sq * (-0.5 / s**2), 1) for s in sigmas]))
    log_norm = torch.tensor([math.log(n) + 0.5 * d * math.log(2 * math.pi * s**2) for s in sigmas], dtype=torch.float64)
    return torch.cat(rows, 1) - log_norm[:, None]


#: test or validation images whose distances to every sample are computed at once
ROWS = 500


def parzen_memory(run: Run, n_samples: int, n_sigmas: int) -> memory.Estimate:
    """The memory of :func:`parzen_evaluate` on ``n_samples`` samples: the samples (drawn, joined,
    as float64 pixels), the distances of a batch of images to all of them (one array per bandwidth,
    and the squares'), and a sampling batch's working set."""
    batch = min(n_samples, run.config.eval.batch_size)
    return memory.Estimate(f"the Parzen estimate on {n_samples} samples", {
        f"{n_samples} samples": n_samples * (2 * sample_bytes(run) + 8 * run.dataset.dim),
        f"the distances of {ROWS} images to every sample": ROWS * n_samples * 8 * (n_sigmas + 2),
        "a sampling batch's working set": batch_activations(run.dataset, run.diffusion, run.model, batch),
    }, "lower --samples")


def parzen_log_likelihood(test: Tensor, samples: Tensor, sigma: float, batch_size: int = ROWS) -> Tensor:
    """log (1/N) sum_j N(x_i; s_j, sigma^2 I) for each row x_i of ``test`` (M, D) under the
    ``samples`` (N, D): per-example nats, float64, computed with logsumexp in batches of rows."""
    return _log_densities(test, samples, [sigma], batch_size)[0]


def select_bandwidth(valid: Tensor, samples: Tensor, sigmas: Sequence[float] = DEFAULT_SIGMAS,
                     batch_size: int = ROWS) -> tuple[float, Tensor]:
    """The sigma of ``sigmas`` with the highest mean validation log-likelihood, and that mean
    (nats) for every sigma: Goodfellow et al.'s cross-validation of the bandwidth."""
    sigmas = _check_sigmas(sigmas)
    scores = _log_densities(valid, samples, sigmas, batch_size).mean(1)
    return sigmas[int(scores.argmax())], scores


def parzen_score(samples: Tensor, valid: Tensor, test: Tensor, sigmas: Sequence[float] = DEFAULT_SIGMAS) -> dict:
    """The protocol on (N, D) rows of pixels on [0, 1]: the bandwidth of ``sigmas`` that
    :func:`select_bandwidth` picks on ``valid``, then the mean log-likelihood of ``test`` in bits
    and nats, with its standard error over test images, and every bandwidth's validation score."""
    sigma, scores = select_bandwidth(valid, samples, sigmas)
    log_p = parzen_log_likelihood(test, samples, sigma)
    return {
        "parzen_bits": float(log_p.mean()) / LN2,
        "parzen_stderr_bits": standard_error(log_p, LN2),
        "parzen_nats": float(log_p.mean()),
        "parzen_stderr_nats": standard_error(log_p),
        "sigma": sigma,
        "sigma_on_grid_edge": sigma in (min(sigmas), max(sigmas)),
        "sigmas_scores": [{"sigma": s, "valid_nats": float(v)} for s, v in zip(sigmas, scores)],
    }


def unit_pixels(images: np.ndarray, eight_bit: bool = True) -> Tensor:
    """Images (N, ...) in original units -> (N, D) float64 on [0, 1], as the protocol scales
    them: 8-bit values / 255; binary images (``eight_bit`` False) are already 0 / 1."""
    x = torch.as_tensor(np.asarray(images, dtype=np.float64)).flatten(1)
    return x / 255 if eight_bit else x


def _unit_pixels(run: Run, images: np.ndarray) -> Tensor:
    """:func:`unit_pixels` for the run's data (8-bit if it dequantises them)."""
    return unit_pixels(images, run.dataset.dequantize)


def _batch_generator(seed: int, index: int, device: torch.device) -> torch.Generator:
    """Batch ``index``'s own random stream on ``device``, from (seed, index): a batch drawn again
    after a stop is the batch that was lost, whichever batches were kept."""
    return torch.Generator(device).manual_seed(int(np.random.SeedSequence((seed, index)).generate_state(1)[0]))


def _kept_batch(path: Path, shape: tuple[int, ...]) -> np.ndarray | None:
    """A batch kept by an earlier call, or None when there is none (or it is not what this call
    would draw: another shape, an unreadable file)."""
    try:
        batch = np.load(path, allow_pickle=False)
    except (OSError, ValueError):
        return None
    return batch if batch.shape == shape else None


def _keep_batch(path: Path, batch: np.ndarray) -> str | None:
    """Write ``batch`` to ``path`` atomically; None, or why it could not be kept."""
    buffer = io.BytesIO()
    np.save(buffer, batch, allow_pickle=False)
    try:
        atomic_write_bytes(path, buffer.getvalue())
    except OSError as e:
        return os_error_message(e)
    return None


def sampler_label(sampler: Sampler | str, eta: float) -> str:
    """``sampler`` by name, DDIM's with its eta (``ddim_eta0.5``)."""
    sampler = Sampler(sampler)
    return sampler.value + (f"_eta{eta:g}" if sampler is Sampler.DDIM else "")


class KeptSamples(NamedTuple):
    samples: np.ndarray  # in the data's original units
    kept: str  # where they are kept, or why they are not
    chain_steps: int  # the steps of the chain they were drawn on
    sampler: Sampler
    eta: float  # DDIM's (0 for the other samplers)
    precision: Precision  # the network's
    chain: dict  # what evaluation.chain_record says of it


def draw_kept_samples(run: Run, chain: ChainSpec, n_samples: int, seed: int = 0, progress: bool = True,
                      sampler: Sampler | str = Sampler.ANCESTRAL, eta: float | None = None,
                      precision: Precision | None = None) -> KeptSamples:
    """``n_samples`` samples of the chain that ``chain`` names (respaced, with other variances, x_0
    clipped: :func:`~thermodiff.tasks.evaluation.run_chain`) drawn by ``sampler`` (samplers.sample; ``eta`` DDIM's, checked by
    :func:`checked_sampler` before any is drawn), the network in ``precision`` (default the one it
    trained in, :func:`sampling_network`), in the data's original units, in batches
    of ``eval.batch_size``, each kept in the run as it is drawn (``RUN/parzen_samples/KEY/NNNNN.npy``,
    KEY naming the checkpoint's step, the sampler, the chain's kept steps, a variance rule other
    than moments and clipping, the seed, the batch size, a precision other than fp32 and a device
    other than the CPU, whose draws differ): a stop loses one batch at most, and a second call
    reuses what the first drew. Each batch has its own seeded stream, so the samples do not depend
    on where a call stopped. Two calls at once draw the same batches and write the same files
    (each write atomic). A run that cannot be written (read-only, a full disk) is sampled all the
    same and keeps nothing."""
    diffusion = run_chain(run, chain, "--steps", seed, progress, sampler)
    record = chain_record(run, diffusion, chain)
    sampler, eta = checked_sampler(diffusion, sampler, eta)
    network = sampling_network(run.model, run.config.train, precision)
    precision = network.precision
    kept_steps = record.get("respaced_timesteps", list(range(1, run.diffusion.T + 1)))
    steps_hash = hashlib.sha256(json.dumps(kept_steps).encode()).hexdigest()[:12]
    batch = run.config.eval.batch_size
    sizes = [min(batch, n_samples - i) for i in range(0, n_samples, batch)]
    key = (f"step{run.step}-{sampler_label(sampler, eta)}-chain{diffusion.T}-{steps_hash}-seed{seed}-batch{batch}"
           + ("" if chain.rule is VarianceRule.MOMENTS else f"-{chain.rule.value}") + ("-clip" if chain.clip_x0 else "")
           + ("" if precision == "fp32" else f"-{precision}")  # the key samples were first kept under, for moments in fp32
           + ("" if run.device.type == "cpu" else f"-{run.device.type}"))  # another device draws other noise
    folder = run.path / "parzen_samples" / key
    parts = [_kept_batch(folder / f"{i:05d}.npy", (size, *run.dataset.event_shape)) for i, size in enumerate(sizes)]
    reused, failure = sum(part is not None for part in parts), None
    todo = [i for i, part in enumerate(parts) if part is None]
    with tqdm(total=len(todo) * diffusion.T, desc="parzen: sample", unit="t", disable=not progress, leave=False,
              mininterval=1.0) as bar:
        for i in todo:
            generator = _batch_generator(seed, i, run.device)
            x = sample(diffusion, network, (sizes[i], *run.dataset.event_shape), generator, run.device,
                       callback=lambda t, x: bar.update(1) if t > 0 else None, sampler=sampler, eta=eta)
            parts[i] = run.dataset.from_model(x)
            if failure is None and (failure := _keep_batch(folder / f"{i:05d}.npy", parts[i])):
                print(f"thermodiff parzen: warning: samples not kept as they are drawn, {failure}", file=sys.stderr)
    kept = f"not kept: {failure}" if failure else f"{folder} ({reused} of {len(sizes)} batches reused)"
    return KeptSamples(np.concatenate(parts), kept, diffusion.T, sampler, eta, precision, record)


def _check_request(run: Run, n_samples: int, n_valid: int, max_test: int | None) -> None:
    """A one-line UserError for a Parzen request that cannot be met, before any sampling."""
    if not run.dataset.is_image:
        raise UserError(f"{run.path}: models vectors of shape {run.dataset.event_shape}; "
                        "the Parzen-window protocol is for image runs")
    if n_samples < 1:
        raise UserError(f"the number of samples must be at least 1, got {n_samples}")
    if not 1 <= n_valid <= len(run.dataset.train):
        raise UserError(f"the number of validation images must lie in 1..{len(run.dataset.train)} (the run's "
                        f"training images), got {n_valid}")
    if max_test is not None and max_test < 1:
        raise UserError(f"the number of test images must be at least 1, got {max_test}")


def _protocol(drawn: KeptSamples, clip_x0: bool, T: int, sigmas: Sequence[float], n_valid: int, n_test: int) -> str:
    """The record's one-sentence account of how its Parzen figure was measured."""
    chain = (f"{drawn.chain_steps} steps of the run's {T}"
             + (f", {drawn.chain['spacing']} steps with {drawn.chain['variance_rule']} variances"
                if "variance_rule" in drawn.chain else "")
             + (", x_0 clipped to the data's range" if clip_x0 else ""))
    return (f"Gaussian Parzen window (Breuleux et al. 2011, Goodfellow et al. 2014) on {len(drawn.samples)} "
            f"{sampler_label(drawn.sampler, drawn.eta)} samples ({chain}, the network in {drawn.precision}) rounded "
            f"to pixel values, pixels scaled to [0, 1]; bandwidth chosen from {len(sigmas)} values in "
            f"[{min(sigmas):.3g}, {max(sigmas):.3g}] by the mean log-likelihood of the last {n_valid} training "
            f"images; mean log-likelihood of {n_test} test images, standard error over images")


def parzen_evaluate(run: Run, n_samples: int = 10000, n_valid: int = 10000, max_test: int | None = None,
                    sigmas: Sequence[float] = DEFAULT_SIGMAS, seed: int = 0, progress: bool = True,
                    memory_check: bool = True, chain: ChainSpec = ChainSpec(),
                    sampler: Sampler | str = Sampler.ANCESTRAL, eta: float | None = None,
                    precision: Precision | None = None) -> dict:
    """The Parzen-window log-likelihood of the run's test images (all, or the first ``max_test``)
    in bits and nats, with its standard error over test images.

    ``n_samples`` images are drawn by ``sampler`` (ancestral sampling unless told; ``eta`` DDIM's;
    the network in ``precision``, by default the one it trained in) with :func:`draw_kept_samples`
    (kept in the run as they are drawn, so a stopped call resumes) and rounded to the data's pixel
    values, on the chain that ``chain`` names (its steps: ``thermodiff sample --steps``; the
    protocol's 10000 samples cost T network calls each on the run's own chain, and ``thermodiff
    evaluate --respace`` gives a chain's bound). The bandwidth is validated on the *last*
    ``n_valid`` training images, as Goodfellow et al. took MNIST training images 50000-59999;
    unlike their model, a run trained on all 60000 has seen these. ``memory_check``: refuse
    ``n_samples`` whose memory (:func:`parzen_memory`) exceeds the available memory.
    """
    _check_request(run, n_samples, n_valid, max_test)
    sigmas = _check_sigmas(sigmas)  # before the slow sampling
    train, test = run.dataset.train, run.dataset.test
    if memory_check:
        memory.require_fits(parzen_memory(run, n_samples, len(sigmas)))
    drawn = draw_kept_samples(run, chain, n_samples, seed, progress, sampler, eta, precision)
    samples = _unit_pixels(run, drawn.samples)
    valid = _unit_pixels(run, train[-n_valid:])
    test = _unit_pixels(run, test[:max_test])
    result = {
        "experiment": run.config.name,
        "run_dir": str(run.path),
        **run.training,
        **parzen_score(samples, valid, test, sigmas),
        "n_samples": n_samples,
        "n_valid": n_valid,
        "n_test": len(test),
        "seed": seed,
        "T": run.diffusion.T,
        "sampling_steps": drawn.chain_steps,
        "sampler": drawn.sampler.value,
        "eta": drawn.eta if drawn.sampler is Sampler.DDIM else None,
        "precision": drawn.precision,
        **drawn.chain,
        "samples_kept": drawn.kept,
        "protocol": _protocol(drawn, chain.clip_x0, run.diffusion.T, sigmas, n_valid, len(test)),
        "hardware": hardware(run.device),
        "device": str(run.device),
    }
    paper = paper_row(run.config)
    if paper and "parzen_bits" in paper:
        result["paper"] = {"parzen_bits": paper["parzen_bits"]}
    return require_finite(result, str(run.path))
