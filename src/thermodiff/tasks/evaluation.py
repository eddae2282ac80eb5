"""Evaluate a trained run: the exact bound K on held-out data, in the units the paper reports,
with how it was measured."""

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from tqdm import tqdm

from thermodiff.errors import UserError
from thermodiff.process.bound import PILOT_EXAMPLES, PILOT_STEPS, BoundEstimate, TSampling, exact_bound, standard_error
from thermodiff.process.contract import Process
from thermodiff.process.gaussian import GaussianParameterization
from thermodiff.process.ode import ATOL, METHOD, RTOL, Trace, flow_log_likelihood
from thermodiff.process.respace import VarianceFit, VarianceRule, respaced_process, spacing_of
from thermodiff.process.samplers import Sampler
from thermodiff.process.tensors import LN2
from thermodiff.run.autoconfig import default_t_samples
from thermodiff.run.config import AUTO, EvalConfig
from thermodiff.run.experiment import Run, paper_row
from thermodiff.run.machine import hardware
from thermodiff.tasks.entropy import entropy_examples, entropy_report, entropy_steps
from thermodiff.tasks.reports import require_finite


@contextmanager
def counting_bar(desc: str, enabled: bool) -> Iterator[Callable[[int, int], None]]:
    """A progress bar of network calls, as the ``callback(done, total)`` that exact_bound and
    respace.VarianceFit report to; shown from the first call, so that an input refused before any
    work leaves no bar behind its one-line error."""
    bar = None

    def report(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(desc=desc, total=total, unit="call", disable=not enabled, leave=False, mininterval=1.0)
        bar.update(done - bar.n)

    try:
        yield report
    finally:
        if bar is not None:
            bar.close()


#: training examples that ``--variance fitted`` fits the chain's variances on (one forward draw each)
FIT_EXAMPLES = 500


@dataclass(frozen=True)
class ChainSpec:
    """The chain that a command's --respace or --steps, --variance and --clip-x0 name: the run's,
    respaced to ``steps`` (None: all T; see respace.respaced_timesteps), with ``variance``'s rule
    (respace.VarianceRule; None: fitted for the bound-optimal ``optimalN`` steps, which are chosen
    for fitted variances, else moments), and with ``clip_x0`` the network's x_0 clipped to the
    data's range in every kernel (GaussianDiffusion.clipped)."""

    steps: int | str | None = None
    variance: VarianceRule | None = None  # a name is read as a VarianceRule
    clip_x0: bool = False

    def __post_init__(self):
        if self.variance is not None:
            object.__setattr__(self, "variance", VarianceRule(self.variance))

    @property
    def rule(self) -> VarianceRule:
        if self.variance is not None:
            return self.variance
        return VarianceRule.FITTED if spacing_of(self.steps) == "optimal" else VarianceRule.MOMENTS

    @property
    def respaced(self) -> bool:
        """Whether the chain is a respaced one (steps, or variances other than the network's own)."""
        return self.steps is not None or self.rule is not VarianceRule.MOMENTS

    @property
    def is_runs_own(self) -> bool:
        """Whether the chain is the run's own: all T steps, its own variances, nothing clipped."""
        return not self.respaced and not self.clip_x0


def run_chain(run: Run, chain: ChainSpec, flag: str, seed: int = 0, progress: bool = True,
              sampler: Sampler | str = Sampler.ANCESTRAL) -> Process:
    """The chain that ``chain`` names (``flag``: the command's --respace or --steps), the fitted
    rule's variances fitted on the first :data:`FIT_EXAMPLES` training examples. The rules set the
    ancestral kernels' variances: with another ``sampler`` only the default is taken."""
    rule = chain.rule
    if rule is not VarianceRule.MOMENTS and Sampler(sampler) is not Sampler.ANCESTRAL:
        asked = f"--variance {rule.value}" if chain.variance else f"{flag} {chain.steps} (steps for fitted variances)"
        raise UserError(f"{asked} sets the ancestral chain's kernel variances; --sampler {Sampler(sampler).value} "
                        f"steps by its own rule: drop {asked.split()[0]} or sample ancestrally")
    base = run.diffusion
    if chain.clip_x0:
        try:
            base = base.clipped(*run.dataset.model_bounds())
        except ValueError as e:
            raise UserError(f"--clip-x0: {run.path}: {e}") from None
    if rule is not VarianceRule.FITTED:
        return respaced_process(base, chain.steps, flag, rule)
    if not len(run.dataset.train):
        raise UserError(f"--variance fitted: {run.path}'s training data are not loaded here; fit on the run's own "
                        "data (without --data)")
    generator = torch.Generator().manual_seed(seed)
    x = run.dataset.to_model(run.dataset.train[:FIT_EXAMPLES], generator, run.device, run.diffusion.dequantizes)
    with counting_bar("fit variances", progress) as report:
        fit = VarianceFit(run.model, torch.split(x, run.config.eval.batch_size), draws_on(run.device, generator, seed),
                          report)
        return respaced_process(base, chain.steps, flag, rule, fit)


def chain_record(run: Run, process: Process, chain: ChainSpec) -> dict:
    """What a report says of ``process``, the chain from :func:`run_chain` for ``chain``, unless it
    is the run's own: its steps, how they were chosen and its variance rule, and the box x_0 is
    clipped to (model units)."""
    record = {}
    if chain.clip_x0:
        low, high = run.dataset.model_bounds()
        record["x0_clipped_to"] = [low.tolist(), high.tolist()]
    if not chain.respaced:
        return record
    return record | {"T_trained": run.diffusion.T, "respaced_timesteps": process.timesteps.tolist(),
                     "variance_rule": chain.rule.value, "spacing": spacing_of(chain.steps),
                     **({"variance_fit_examples": min(FIT_EXAMPLES, len(run.dataset.train))}
                        if chain.rule is VarianceRule.FITTED else {})}


def _per(value: float | None, count: int) -> float | None:
    """A figure per dimension or pixel; an undefined standard error (None) stays undefined."""
    return None if value is None else value / count


def require_finite_bound(per_example: torch.Tensor, origin: str, what: str = "the bound") -> None:
    """Refuse a bound that is NaN or infinite for any example, rather than report NaN."""
    bad = int((~torch.isfinite(per_example)).sum())
    if bad:
        raise UserError(f"{origin}: {what} is not finite for {bad} of {len(per_example)} examples (the model produced "
                        "NaN or infinite values: the run may have diverged); evaluate an earlier checkpoint or train "
                        "again with a lower train.lr")


def bound_report(dataset, per_example: torch.Tensor, null: torch.Tensor, discrete: bool = False) -> dict:
    """A bound per example (nats) in the units reported: bits per example and per dimension with
    standard errors, K - L_null, K in the data's original units, and for images per pixel and as
    a negative log-likelihood of the 8-bit data. ``discrete``: the bound is of the discrete values."""
    mean, dim = float(per_example.mean()), dataset.dim
    gain = per_example - null
    log_det_bits = 0.0 if discrete else dataset.log_det() / LN2  # a probability has no units
    result = {
        "unit": "bits/image" if dataset.is_image else "bits/sample",
        "dim": dim,
        "K_bits": mean / LN2,
        "stderr_bits": standard_error(per_example, LN2),
        "K_minus_L_null_bits": float(gain.mean()) / LN2,
        "K_minus_L_null_stderr_bits": standard_error(gain, LN2),
        "L_null_bits": float(null.mean()) / LN2,
        "K_bits_per_dim": mean / LN2 / dim,
        "K_original_units_bits": mean / LN2 + log_det_bits,
        "log_det_scaling_bits": log_det_bits,
    }
    if dataset.is_image:
        pixels = dim // dataset.event_shape[0]  # all colour channels of a pixel together
        # the bound as a negative log-likelihood of the 8-bit data, K in their original units per
        # dimension: of the discrete values themselves (discretized decoder, no units), or of the
        # dequantised density in pixel units
        nll_kind = ("symbols" if dataset.lattice is not None else "discrete") if discrete else \
            "dequantized" if dataset.dequantize else None
        nll = -result["K_original_units_bits"] / dim if nll_kind else None
        result |= {
            "pixels": pixels,
            "K_bits_per_pixel": result["K_bits"] / pixels,
            "stderr_bits_per_pixel": _per(result["stderr_bits"], pixels),
            "K_minus_L_null_bits_per_pixel": result["K_minus_L_null_bits"] / pixels,
            "K_minus_L_null_stderr_bits_per_pixel": _per(result["K_minus_L_null_stderr_bits"], pixels),
            "nll_bits_per_dim": nll,
            "nll_stderr_bits_per_dim": _per(result["stderr_bits"], dim),
            "nll_bound": nll_kind,
        }
    return result


def evaluate_baseline(run: Run, n_draws: int, max_examples: int, seed: int, split_name: str,
                      per_example: bool = False) -> dict:
    """A VAE's ELBO in K's place (same units, same null model) with its importance-weighted bound,
    an MCGSM's exact log-likelihood in K's place, or a DAE's denoising error, on the same held-out
    examples as a diffusion run's. ``per_example``: as :func:`evaluate`'s (the ELBO or log p per example)."""
    cfg, process = run.config, run.diffusion
    generator = torch.Generator().manual_seed(seed)
    test = run.dataset.test[:max_examples] if max_examples else run.dataset.test
    result = {"experiment": cfg.name, "run_dir": str(run.path), **run.training, "split": split_name,
              "n_examples": len(test), "model": cfg.baseline.kind, "hardware": hardware(run.device),
              "device": str(run.device)}
    if cfg.baseline.kind == "dae":
        if per_example:
            raise UserError(f"{run.path}: a dae baseline has no bound per example; drop --per-example")
        return result | {"noise_std": process.noise_std, **process.denoise_report(run.model, run.dataset, test, seed)}
    x = run.dataset.to_model(test, generator)
    batches = torch.split(x.to(run.device), cfg.eval.batch_size)
    if cfg.baseline.kind == "mcgsm":
        with torch.no_grad():
            k = torch.cat([process.log_likelihood(run.model, batch).cpu() for batch in batches])
        require_finite_bound(k, str(run.path), "the log-likelihood")
        result["likelihood"] = "exact (autoregressive)"
    else:
        k, iw = process.bounds(run.model, batches, n_draws, draws_on(run.device, generator, seed))
        require_finite_bound(k, str(run.path), "the ELBO")
        result |= {"n_draws": n_draws, "latent": process.latent, "n_importance": process.n_importance,
                   "K_iw_bits": float(iw.mean()) / LN2, "K_iw_stderr_bits": standard_error(iw, LN2)}
    result |= bound_report(run.dataset, k, process.null_log_likelihood(x.double()))
    if per_example:
        result["per_example_original_units_bits"] = (k / LN2 + result["log_det_scaling_bits"]).tolist()
    return result


@dataclass(frozen=True)
class OdeOptions:
    """How ``evaluate --ode`` integrates the probability-flow ODE (thermodiff.process.ode)."""

    rtol: float = RTOL
    atol: float = ATOL
    trace: Trace = Trace.HUTCHINSON


def ode_report(run: Run, test, options: OdeOptions, batch_size: int, seed: int) -> dict:
    """The exact log-likelihood of the run's probability-flow ODE on ``test`` (original units): per
    example log p in bits of the model's input, in original units, and for images as an NLL of the
    8-bit data per dimension, with the standard error over examples (which holds the dequantisation
    and Hutchinson noise: one draw of each per example), the solver's evaluations and tolerances,
    and log p per example in original units (``ode_per_example_original_units_bits``)."""
    generator = torch.Generator().manual_seed(seed)
    x, log_volume = run.dataset.to_model_density(test, generator)
    start, per_example, nfe = time.perf_counter(), [], []
    for batch in torch.split(x.to(run.device), batch_size):  # the probes are drawn on the CPU (flow_log_likelihood)
        result = flow_log_likelihood(run.diffusion, run.model, batch, options.rtol, options.atol,
                                     options.trace, generator)
        per_example.append(result.per_example.cpu())
        nfe.append(result.nfe)
    per_example = torch.cat(per_example)
    require_finite_bound(per_example, str(run.path), "the ODE log-likelihood")
    dataset, dim = run.dataset, run.dataset.dim
    original = per_example / LN2 + (dataset.log_det() + log_volume) / LN2
    discrete = dataset.dequantize or dataset.lattice is not None
    report = {
        "ode_log_likelihood_bits": float(per_example.mean()) / LN2,
        "ode_stderr_bits": standard_error(per_example, LN2),
        "ode_log_likelihood_original_units_bits": float(original.mean()),
        "ode_bound": "discrete: uniform dequantisation, a lower bound on log P of the values" if discrete else None,
        "ode_n_examples": len(per_example),
        "ode_trace": options.trace.value,
        "ode_solver": f"torchdiffeq {METHOD}",
        "ode_rtol": options.rtol,
        "ode_atol": options.atol,
        "ode_nfe": sum(nfe),
        "ode_nfe_per_batch": nfe,
        "ode_gammas": list(run.diffusion.flow_gammas()),
        "ode_wall_s": time.perf_counter() - start,
        "ode_per_example_original_units_bits": original.tolist(),
    }
    if dataset.is_image:
        report |= {"ode_nll_bits_per_dim": -float(original.mean()) / dim,
                   "ode_nll_stderr_bits_per_dim": _per(report["ode_stderr_bits"], dim)}
    return report


def estimator_name(estimate) -> str:
    """How a bound was computed, for reports."""
    if estimate.t_samples is None:
        return "exact: every step summed"
    if estimate.t_sampling is TSampling.IMPORTANCE:
        return (f"unbiased: {estimate.t_samples} importance-sampled steps per example, in strata of equal mass of a "
                f"pilot ({PILOT_EXAMPLES} examples at {PILOT_STEPS} steps)")
    return f"unbiased: {estimate.t_samples} stratified steps per example"


@dataclass
class MeasuredBound:
    """What :func:`measure_bound` computed: the estimate, its report (:func:`bound_report`), the
    model-space batches, the generator after the draws, and the null model's log-likelihood."""

    estimate: BoundEstimate
    report: dict
    batches: tuple[torch.Tensor, ...]
    generator: torch.Generator
    null: torch.Tensor


def draws_on(device: torch.device, generator: torch.Generator, seed: int) -> torch.Generator:
    """The generator of the draws made on ``device`` once the examples are there: ``generator``
    itself on the CPU (a CPU evaluation draws what it always drew), else a new one on ``device``
    seeded with ``seed`` (a torch generator draws on its own device only, so a GPU draws other
    noise than the CPU: the estimates agree within their standard errors, not to the bit)."""
    return generator if device.type == "cpu" else torch.Generator(device).manual_seed(seed)


def measure_bound(diffusion, model, dataset, test, n_draws: int, t_samples: int, seed: int, batch_size: int,
                  progress: bool, origin: str, device=None, t_sampling: str = EvalConfig.t_sampling) -> MeasuredBound:
    """The bound K of ``model`` under ``diffusion`` on the examples ``test`` (original units) of
    ``dataset``: 8-bit images with fresh dequantisation noise, or at their bins' centres for the
    discretized decoder; ``t_samples`` stratified steps per example (0: every step summed), drawn
    as ``t_sampling`` says (:class:`thermodiff.process.bound.TSampling`).
    ``origin`` names the model in the message that refuses a non-finite bound."""
    generator = torch.Generator().manual_seed(seed)
    discrete = not diffusion.dequantizes
    x = dataset.to_model(test, generator, dequantize=not discrete)
    batches = tuple(b.to(device) for b in torch.split(x, batch_size))
    generator = draws_on(torch.device(device or "cpu"), generator, seed)
    with counting_bar("bound", progress) as report:
        estimate = exact_bound(diffusion, model, batches, n_draws, generator, callback=report,
                               t_samples=t_samples or None, t_sampling=t_sampling)
    require_finite_bound(estimate.per_example, origin)
    null = diffusion.null_log_likelihood(x.double().to(device)).cpu()
    return MeasuredBound(estimate, bound_report(dataset, estimate.per_example, null, discrete), batches, generator, null)


def _bound_record(run: Run, diffusion, measured: MeasuredBound, split_name: str, n_examples: int, n_draws: int) -> dict:
    """What :func:`evaluate` measured and how: the run, the split, the estimator, the process, the bound."""
    cfg, estimate = run.config, measured.estimate
    return {
        "experiment": cfg.name,
        "run_dir": str(run.path),
        "checkpoint": run.checkpoint,
        **run.training,
        "split": split_name,
        "n_examples": n_examples,
        "n_test": len(run.dataset.test),
        "estimator": estimator_name(estimate),
        "t_samples": estimate.t_samples,
        "t_sampling": estimate.t_sampling and estimate.t_sampling.value,
        "n_draws": n_draws,
        "T": diffusion.T,
        "diffusion": type(run.diffusion).__name__,
        "parameterization": run.diffusion.parameterization.value,
        "decoder": run.diffusion.decoder.value,
        "schedule": cfg.diffusion.schedule,
        "beta_1": float(run.diffusion.schedule.betas()[0].detach()),
        "train_loss": cfg.train.loss,
        "t_sampler": cfg.train.t_sampler,
        **measured.report,
        "per_timestep_bits": (estimate.terms / LN2).tolist(),
        "hardware": hardware(run.device),
        "device": str(run.device),
        "auto_choices": cfg.auto,
    }


def evaluate(run: Run, n_draws: int | None = None, max_examples: int | None = None, seed: int = 0,
             progress: bool = True, split_name: str = "test", chain: ChainSpec = ChainSpec(),
             t_samples: int | None = None, per_example: bool = False, ode: OdeOptions | None = None,
             t_sampling: str | None = None) -> dict:
    """K, K - L_null (bits per sample and per dimension), K in the data's original units, and
    the per-timestep terms, on the run's test split (or the data that replaced it), of the chain
    that ``chain`` names (:func:`run_chain`: respaced, with other variances, x_0 clipped).
    ``t_samples`` (default ``eval.t_samples``): steps per example of an unbiased stratified
    estimate, 0 for the exact sum over every step, drawn as ``t_sampling`` says (default
    ``eval.t_sampling``). ``per_example``: also K of every example, in bits
    in the data's original units (``per_example_original_units_bits``), and with ``ode`` its log p. ``ode``: also the exact
    log-likelihood through the probability-flow ODE on the same examples (:func:`ode_report`). The report
    always has each reverse kernel's entropy next to the paper's bounds (``entropy``; tasks/entropy.py)."""
    cfg = run.config
    n_draws = n_draws or cfg.eval.n_draws
    max_examples = max_examples if max_examples is not None else cfg.eval.max_examples
    if cfg.baseline.kind:  # not a diffusion (baselines.py)
        if ode is not None:
            raise UserError(f"{run.path}: --ode is for diffusion runs; a {cfg.baseline.kind} has no probability-flow ODE")
        return require_finite(evaluate_baseline(run, n_draws, max_examples, seed, split_name, per_example), str(run.path))
    if t_samples is None:
        t_samples = cfg.eval.t_samples if cfg.eval.t_samples != AUTO else default_t_samples(run.dataset.is_image)
    if ode is not None and chain.clip_x0:
        raise UserError("--ode integrates the network's own probability-flow ODE, which clips nothing; drop --clip-x0")
    diffusion = run_chain(run, chain, "--respace", seed, progress)
    test = run.dataset.test[:max_examples] if max_examples else run.dataset.test
    m = measure_bound(diffusion, run.model, run.dataset, test, n_draws, t_samples, seed, cfg.eval.batch_size,
                      progress, str(run.path), run.device, t_sampling or cfg.eval.t_sampling)
    estimate, report, batches, generator, null = m.estimate, m.report, m.batches, m.generator, m.null
    result = _bound_record(run, diffusion, m, split_name, len(test), n_draws)
    if run.diffusion.continuous_time:  # its continuous-time bound too, besides its T-step chain's
        continuous = run.diffusion.continuous_bound(run.model, batches, n_draws, generator)
        result["continuous_time"] = bound_report(run.dataset, continuous.per_example, null) | {
            "n_draws": n_draws, "terms_bits": (continuous.terms / LN2).tolist()}
    # after the bounds, so that their draws (and figures) are those of an evaluation without it
    steps = tqdm(entropy_steps(diffusion.T, estimate.t_samples), desc="entropy", unit="step", disable=not progress,
                 leave=False, mininterval=1.0)
    result["entropy"] = entropy_report(diffusion, run.model, torch.cat(batches), steps, cfg.eval.batch_size, generator,
                                       entropy_examples(run.dataset.is_image))
    if run.diffusion.parameterization is GaussianParameterization.EPS:
        result["eps_variance"] = run.diffusion.eps_variance.value
    result |= chain_record(run, diffusion, chain)
    if per_example:
        result["per_example_original_units_bits"] = (estimate.per_example / LN2 + report["log_det_scaling_bits"]).tolist()
    if ode is not None:
        try:
            result |= ode_report(run, test, ode, cfg.eval.batch_size, seed)
            if not per_example:
                del result["ode_per_example_original_units_bits"]
        except ValueError as e:  # a process without the ODE, a network that takes integer steps only
            raise UserError(f"{run.path}: --ode: {e}") from None
    if paper_row(cfg) is not None and split_name == "test":
        result["paper"] = paper_row(cfg)
    return require_finite(result, str(run.path))
