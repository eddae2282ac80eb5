"""The ``thermodiff`` command line. Every command can print one JSON object (``--json``);
bad input ends with a one-line message and exit code 2 (and, with ``--json``, a JSON object
naming the error on stdout).

The parser is built without torch, numpy or the library's modules, so that ``--help`` answers at
once: each command imports what it uses when it runs (a few seconds of imports otherwise)."""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import shlex
import sys
import typing
from pathlib import Path

from thermodiff.errors import UserError, os_error_message
from thermodiff.run.config import MEMORY_OVERRIDE_FLAG, MEMORY_OVERRIDE_HELP, RANGES, EvalConfig, ScheduleName
from thermodiff.run.stopping import RunStopped
from thermodiff.tasks import reports
from thermodiff.tasks.options import DENOISE_METHODS, KNOWN_VALUES, SAMPLERS, VARIANCE_RULES

if typing.TYPE_CHECKING:
    import numpy as np


def _emit(args, result: dict, text: str) -> None:
    print(reports.to_json(result) if args.json else text)


def _write_npy(path: Path, array: np.ndarray) -> None:
    import io

    import numpy as np

    from thermodiff.run.checkpoint import atomic_write_bytes

    buffer = io.BytesIO()
    np.save(buffer, array)
    atomic_write_bytes(path, buffer.getvalue())


def _overrides(args) -> list[str]:
    sets = list(args.set or [])
    flag_keys = {"steps": "train.steps", "T": "diffusion.T", "seed": "seed", "diffusion": "diffusion.kind",
                 "schedule": "diffusion.schedule", "data": "data.source", "data_dir": "data.data_dir"}
    if getattr(args, "download", False):
        sets.append("data.download=true")
    for flag, key in flag_keys.items():
        value = getattr(args, flag, None)
        if value is not None:
            sets.append(f"{key}={json.dumps(value, ensure_ascii=False)}")
    return sets


def _train(args) -> dict:
    from thermodiff.run.config import load_config
    from thermodiff.run.training import train

    overrides = _overrides(args)
    if args.steps is not None and args.minutes is None and not args.resume:
        overrides.append("train.max_minutes=0")  # --steps N trains N steps, whatever the config's time budget
    ignored = [o for o in overrides if not o.startswith("train.steps=")]
    if args.resume and ignored:
        raise UserError(f"--resume continues the run with its saved config (only --steps and --minutes may change); "
                        f"drop {', '.join(ignored)}")
    cfg = load_config(args.config, overrides)
    out = Path(args.out or f"runs/{cfg.name}")
    return train(cfg, out, resume=args.resume, overwrite=args.overwrite, progress=not args.quiet, device=args.device,
                 max_minutes=args.minutes, memory_check=not args.ignore_memory_check)


def cmd_train(args) -> None:
    summary = _train(args)
    _emit(args, summary, reports.describe_training(summary))


def _check_eval_flags(args) -> None:
    for flag, value, least in (("--draws", args.draws, 1), ("--max-examples", args.max_examples, 0),
                               ("--t-samples", args.t_samples, 0)):
        if value is not None and value < least:
            raise UserError(f"{flag} must be at least {least}, got {value}")


def _evaluate(run_dir: str, args, data: str | None = None) -> dict:
    import numpy as np

    from thermodiff.run.distributed import resolve_device
    from thermodiff.run.experiment import SplitUnavailable, load_run
    from thermodiff.tasks.evaluation import ChainSpec, evaluate

    _check_eval_flags(args)
    per_example = getattr(args, "per_example", None)
    if per_example is not None:
        if Path(per_example).suffix != ".npy":
            raise UserError(f"--per-example {per_example}: write the bound per example as .npy")
        _refuse_existing(Path(per_example), getattr(args, "overwrite", False))
        if getattr(args, "ode", False):
            _refuse_existing(_ode_per_example_path(per_example), args.overwrite)
    try:
        run = load_run(run_dir, data, split=data is None, device=resolve_device(args.device))
    except SplitUnavailable as e:
        raise UserError(f"{e}; or pass --data FILE to evaluate on other data") from None
    chain = ChainSpec(getattr(args, "respace", None), getattr(args, "variance", None), getattr(args, "clip_x0", False))
    exact = getattr(args, "exact", False)
    result = evaluate(run, args.draws, 0 if exact else args.max_examples, args.eval_seed, progress=not args.quiet,
                      split_name="test" if data is None else str(data), chain=chain,
                      t_samples=0 if exact else args.t_samples, per_example=per_example is not None,
                      ode=_ode_options(args), t_sampling=args.t_sampling)
    if per_example is not None:
        _write_npy(Path(per_example), np.asarray(result.pop("per_example_original_units_bits")))
        result["per_example_file"] = str(per_example)
        if "ode_per_example_original_units_bits" in result:  # with --ode: FILE_ode.npy beside it
            ode_file = _ode_per_example_path(per_example)
            _write_npy(ode_file, np.asarray(result.pop("ode_per_example_original_units_bits")))
            result["ode_per_example_file"] = str(ode_file)
    if data is None and chain.is_runs_own:  # evaluation.json is the run's own chain's
        _save_beside_run(Path(run_dir) / "evaluation.json", result, "evaluate")
    return result


def _ode_per_example_path(per_example: str) -> Path:
    """Where --per-example FILE.npy with --ode writes log p per example: FILE_ode.npy."""
    return Path(per_example).with_name(Path(per_example).stem + "_ode.npy")


def _ode_options(args):
    """The --ode flags as OdeOptions, or None without --ode (tolerances must be positive)."""
    if not getattr(args, "ode", False):
        return None
    from thermodiff.tasks.evaluation import OdeOptions, Trace

    tolerances = {"rtol": args.ode_rtol, "atol": args.ode_atol}
    for name, value in tolerances.items():
        if value is not None and not value > 0:
            raise UserError(f"--ode-{name} must be a positive tolerance, got {value}")
    trace = Trace.EXACT if args.ode_exact_trace else Trace.HUTCHINSON
    return OdeOptions(**{k: v for k, v in tolerances.items() if v is not None}, trace=trace)


def _save_beside_run(path: Path, result: dict, command: str) -> None:
    """Keep a command's result in the run (``path``). The result is what was asked for: when the
    run cannot be written (read-only, a full disk) it is still printed, with a one-line warning."""
    from thermodiff.run.checkpoint import atomic_write_text

    try:
        atomic_write_text(path, reports.to_json(result) + "\n")
    except OSError as e:
        print(f"thermodiff {command}: warning: not saved, {os_error_message(e)}; the result printed is complete",
              file=sys.stderr)


def cmd_evaluate(args) -> None:
    if args.diffusers is not None:
        result = _evaluate_diffusers(args)
        _emit(args, result, reports.describe_foreign(result))
        return
    if args.run_dir is None:
        raise UserError("give a run directory to evaluate, or --diffusers DIR for a saved diffusers pipeline")
    if args.data_dir is not None:
        raise UserError("--data-dir is for --diffusers; a run evaluates on its own data, or on --data FILE")
    result = _evaluate(args.run_dir, args, args.data)
    _emit(args, result, reports.describe_evaluation(result))


def _evaluate_diffusers(args) -> dict:
    """``evaluate --diffusers DIR --data DATA``: the bound of a diffusers model (tasks/foreign.py)."""
    from thermodiff.run.autoconfig import IMAGE_T_SAMPLES
    from thermodiff.run.distributed import resolve_device
    from thermodiff.tasks.foreign import evaluate_diffusers

    given = [flag for flag, value in (("RUN_DIR", args.run_dir), ("--respace", args.respace),
                                      ("--variance", args.variance), ("--per-example", args.per_example),
                                      ("--clip-x0", args.clip_x0 or None))
             if value is not None]
    if given:
        raise UserError(f"--diffusers evaluates a saved diffusers pipeline; drop {', '.join(given)}")
    if not args.data:
        raise UserError("--diffusers needs --data: cifar10 or mnist (with --data-dir), a folder of images or an .npz/.npy")
    _check_eval_flags(args)
    t_samples = 0 if args.exact else IMAGE_T_SAMPLES if args.t_samples is None else args.t_samples
    return evaluate_diffusers(args.diffusers, args.data, args.data_dir, args.max_examples or None, t_samples,
                              n_draws=args.draws or 1, seed=args.eval_seed, device=resolve_device(args.device),
                              progress=not args.quiet, t_sampling=args.t_sampling or EvalConfig.t_sampling)


def _refuse_existing(path: Path, overwrite: bool) -> None:
    if path.is_dir():
        raise UserError(f"{path}: is a directory")
    if path.exists() and not overwrite:
        raise UserError(f"{path}: already exists; pass --overwrite to replace it")


def _checked_sample_args(args) -> Path:
    """``thermodiff sample``'s --out, once the flags that need no run are checked (one-line errors)."""
    out = Path(args.out)
    if out.suffix not in (".npy", ".png"):
        raise UserError(f"--out {out}: samples are written as .npy (original units) or .png (an image grid)")
    for flag, value in (("-n", args.n), ("--batch-size", args.batch_size)):
        if value < 1:
            raise UserError(f"{flag} must be at least 1, got {value}")
    _refuse_existing(out, args.overwrite)
    if args.respace is not None and args.steps is not None:
        raise UserError("--steps and --respace name the same chain; pass one of them")
    return out


def cmd_sample(args) -> None:
    import time

    import numpy as np
    import torch

    from thermodiff.process.samplers import CountingModel, Sampler, checked_sampler, sample
    from thermodiff.process.sampling import sample_in_batches
    from thermodiff.run.checkpoint import atomic_write_bytes
    from thermodiff.run.distributed import resolve_device
    from thermodiff.run.experiment import SplitUnavailable, load_run, sampling_memory
    from thermodiff.run.memory import require_fits
    from thermodiff.run.training import sampling_network
    from thermodiff.process.respace import VarianceRule
    from thermodiff.tasks.evaluation import ChainSpec, chain_record, run_chain

    out = _checked_sample_args(args)
    chain = ChainSpec(args.respace or args.steps, args.variance, args.clip_x0)
    try:  # the fit needs the training data
        run = load_run(args.run_dir, split=chain.rule is VarianceRule.FITTED, device=resolve_device(args.device))
    except SplitUnavailable as e:
        raise UserError(f"{e}; --variance fitted fits on the run's training data") from None
    if out.suffix == ".png" and not run.dataset.is_image:
        raise UserError(f"--out {out}: a .png grid needs an image model; write .npy for vector data")
    if not args.ignore_memory_check:
        require_fits(sampling_memory(run, args.n, args.batch_size))
    flag = "--respace" if args.respace is not None else "--steps"
    diffusion = run_chain(run, chain, flag, args.seed, not args.quiet, args.sampler)
    sampler, eta = checked_sampler(diffusion, args.sampler, args.eta)
    draw = functools.partial(sample, sampler=sampler, eta=eta)
    network = sampling_network(run.model, run.config.train, args.precision)
    model, precision = CountingModel(network), network.precision
    start = time.perf_counter()
    batches = sample_in_batches(diffusion, model, args.n, run.dataset.event_shape, args.batch_size,
                                torch.Generator(run.device).manual_seed(args.seed), progress=not args.quiet,
                                draw=draw)
    samples = np.concatenate([run.dataset.from_model(x) for x in batches])
    wall = time.perf_counter() - start
    if out.suffix == ".png":
        from thermodiff.tasks.plotting import image_grid_png

        atomic_write_bytes(out, image_grid_png(run.dataset.grey_levels(samples)))
    else:
        _write_npy(out, samples)
    label = sampler.value + (f", eta {eta:g}" if sampler is Sampler.DDIM else "") + (", x_0 clipped" if chain.clip_x0 else "")
    calls = model.calls / math.ceil(args.n / args.batch_size) or None  # None: a VAE, whose decoder is not counted
    counted = f"{calls:g}" if calls else "uncounted"
    _emit(args, {"out": str(out), "n": args.n, "shape": list(samples.shape), "units": "original", "steps": diffusion.T,
                 "sampler": sampler.value, "eta": eta if sampler is Sampler.DDIM else None, "precision": precision,
                 "network_calls_per_sample": calls, "sample_wall_s": round(wall, 3), "device": str(run.device),
                 **chain_record(run, diffusion, chain)},
          f"wrote {args.n} samples (original units, {label}, {diffusion.T} steps, {counted} network calls each "
          f"in {precision}, "
          f"{wall:.1f} s) to {out}")


def _plot(run_dir: str, out_dir: str | None, quiet: bool, overwrite: bool) -> tuple[list[str], str | None]:
    """The figures written, and why those that need the run's data were not (None: all were)."""
    from thermodiff.run.experiment import SplitUnavailable, load_run
    from thermodiff.tasks import plotting
    from thermodiff.tasks.evaluation import evaluate

    try:
        run, unavailable = load_run(run_dir, split=True), None
    except SplitUnavailable as e:  # the figures of the model alone still can be drawn
        run, unavailable = load_run(run_dir), str(e)
    if run.config.baseline.kind:
        raise UserError(f"{run_dir}: a {run.config.baseline.kind} baseline; plot draws a diffusion's figures "
                        "(compare them with thermodiff compare)")
    out = Path(out_dir or run_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a directory")
    figures = [(plotting.samples_panel, "samples.png")]
    if run.dataset.event_shape == (2,) and not run.dataset.binary:
        figures = [(plotting.conditional_figure, "conditional.png"), *figures]
        if unavailable is None:  # the forward trajectory starts at held-out data
            figures = [(plotting.figure_1, "figure1.png"), *figures]
    evaluation_path = Path(run_dir) / "evaluation.json"
    bound = evaluation_path.exists() or unavailable is None
    for name in [name for _, name in figures] + ["bound.png"] * bound:
        _refuse_existing(out / name, overwrite)
    evaluation = reports.read_evaluation(evaluation_path) if evaluation_path.exists() else None  # damaged: refused now
    out.mkdir(parents=True, exist_ok=True)
    written = [draw(run, out / name) for draw, name in figures]
    if (evaluation is None or "entropy" not in evaluation) and unavailable is None:  # none, or one from before the entropies
        evaluation = evaluate(run, n_draws=1, max_examples=1000, progress=not quiet)
    if bound:
        written.append(plotting.bound_terms(evaluation, out / "bound.png"))
    skipped = None if unavailable is None else (
        f"figures of held-out data skipped ({unavailable}; samples are drawn without data"
        f"{'' if bound else ', and bound.png needs evaluation.json or the data'})")
    return [str(p) for p in written], skipped


def cmd_plot(args) -> None:
    files, skipped = _plot(args.run_dir, args.out, args.quiet, args.overwrite)
    _emit(args, {"files": files, "skipped": skipped}, "wrote " + ", ".join(files) + (f"; {skipped}" if skipped else ""))


def cmd_parzen(args) -> None:
    from thermodiff.run.distributed import resolve_device
    from thermodiff.run.experiment import load_run
    from thermodiff.tasks.evaluation import ChainSpec
    from thermodiff.tasks.parzen import parzen_evaluate

    run = load_run(args.run_dir, split=True, device=resolve_device(args.device))
    result = parzen_evaluate(run, args.samples, args.valid, args.max_test, seed=args.seed, progress=not args.quiet,
                             memory_check=not args.ignore_memory_check,
                             chain=ChainSpec(args.steps, args.variance, args.clip_x0), sampler=args.sampler,
                             eta=args.eta, precision=args.precision)
    _save_beside_run(Path(args.run_dir) / "parzen.json", result, "parzen")
    _emit(args, result, reports.describe_parzen(result))


def cmd_reproduce(args) -> None:
    from thermodiff.run.config import load_config
    from thermodiff.run.experiment import paper_experiments, paper_row

    if paper_row(load_config(args.experiment)) is None:
        raise UserError(f"{args.experiment!r} is not one of the paper's experiments; reproduce one of "
                        f"{', '.join(paper_experiments())} (or a .toml config of the paper's data)")
    args.config, args.resume = args.experiment, False
    summary = _train(args)
    result = _evaluate(summary["run_dir"], args)
    files, _ = _plot(summary["run_dir"], None, args.quiet, args.overwrite)  # the data were just trained on
    _emit(args, {"train": summary, "evaluation": result, "figures": files},
          reports.describe_reproduction(summary, result, files))


def cmd_compare(args) -> None:
    from thermodiff.run.config import load_config
    from thermodiff.tasks.compare import compare, format_table

    if args.samples < 1:
        raise UserError(f"--samples must be at least 1, got {args.samples}")
    _check_eval_flags(args)
    sets = _overrides(args)
    if args.minutes is not None:  # time decides, not steps
        sets += [f"train.max_minutes={args.minutes}", f"train.steps={10**9}"]
    configs = [load_config(name, sets) for name in args.configs]
    record = compare(configs, list(args.configs), Path(args.out), args.overwrite, not args.quiet, args.device,
                     args.draws, args.max_examples, args.eval_seed, args.samples, not args.ignore_memory_check,
                     args.t_samples, args.t_sampling)
    _emit(args, record, format_table(record))


def _read_input(path: str, run, flag: str) -> np.ndarray:
    """A numeric .npy array, or for image runs a .png image, in original units, as float64."""
    import numpy as np

    from thermodiff.data.dataset import load_npy

    p = Path(path)
    if not p.is_file():
        raise UserError(f"{flag} {p}: no such file")
    if p.suffix.lower() == ".png":
        from thermodiff.data.images import load_image

        if not run.dataset.is_image:
            raise UserError(f"{flag} {p}: a PNG needs an image run; give vector data as .npy")
        return load_image(p).astype(np.float64)
    if p.suffix.lower() != ".npy":
        raise UserError(f"{flag} {p}: expected a .npy array{' or a .png image' if run.dataset.is_image else ''}")
    try:
        x = load_npy(p)
    except UserError as e:
        raise UserError(f"{flag} {e}") from None
    if not (np.issubdtype(x.dtype, np.number) or x.dtype == bool) or np.iscomplexobj(x):
        raise UserError(f"{flag} {p}: expected a numeric array, got dtype {x.dtype}")
    return x.astype(np.float64)


def _write_posterior(out: Path, inputs: np.ndarray, samples: np.ndarray, run, mean: np.ndarray | None = None) -> None:
    """Inputs, samples and the posterior mean (``mean``, else the samples' mean) as .npz or a .png grid."""
    import io

    import numpy as np

    from thermodiff.run.checkpoint import atomic_write_bytes

    samples_mean = samples.astype(np.float64).mean(0)
    mean = samples_mean if mean is None else mean
    if out.suffix == ".png":
        if not run.dataset.is_image:
            raise UserError(f"--out {out}: a .png needs an image run; write .npz")
        from thermodiff.tasks.plotting import image_grid_png

        rows = [np.clip(np.rint(inputs), 0, 255).astype(np.uint8), np.clip(np.rint(mean), 0, 255).astype(np.uint8),
                *samples.astype(np.uint8)]
        atomic_write_bytes(out, image_grid_png(np.concatenate(rows), columns=len(inputs)))
    else:
        buffer = io.BytesIO()
        np.savez(buffer, input=inputs, samples=samples, mean=mean, samples_mean=samples_mean)
        atomic_write_bytes(out, buffer.getvalue())


#: where denoise and inpaint write without --out: next to the input, with this ending
POSTERIOR_OUT = {"denoise": "_denoised.npz", "inpaint": "_inpainted.npz"}


def _posterior_out(args) -> Path:
    out = Path(args.out or Path(args.input).with_suffix("").as_posix() + POSTERIOR_OUT[args.command])
    if out.suffix not in (".npz", ".png"):
        raise UserError(f"--out {out}: posterior samples are written as .npz or .png")
    if args.n < 1:
        raise UserError(f"-n must be at least 1, got {args.n}")
    _refuse_existing(out, args.overwrite)
    return out


def cmd_denoise(args) -> None:
    from thermodiff.run.distributed import resolve_device
    from thermodiff.run.experiment import load_run
    from thermodiff.tasks.conditioning import as_examples, denoise, denoise_mean

    out = _posterior_out(args)
    run = load_run(args.run_dir, device=resolve_device(args.device))
    noisy = as_examples(_read_input(args.input, run, "--input"), run, args.input)
    samples = denoise(run, noisy, args.sigma, args.n, args.seed, progress=not args.quiet, method=args.method)
    # the model's E[x | y] in one call per draw beats the mean of a few samples (their spread adds to its error)
    mean = denoise_mean(run, noisy, args.sigma, seed=args.seed) if args.method == "start" else None
    _write_posterior(out, noisy, samples, run, mean)
    _emit(args, {"out": str(out), "inputs": len(noisy), "samples_per_input": args.n, "sigma": args.sigma,
                 "method": args.method, "device": str(run.device)},
          f"wrote {args.n} posterior samples and their mean for {len(noisy)} input(s) to {out}")


def cmd_inpaint(args) -> None:
    from thermodiff.run.distributed import resolve_device
    from thermodiff.run.experiment import load_run
    from thermodiff.tasks.conditioning import as_examples, inpaint, inpainting_mask

    out = _posterior_out(args)
    run = load_run(args.run_dir, device=resolve_device(args.device))
    values = as_examples(_read_input(args.input, run, "--input"), run, args.input)
    mask = _read_input(args.mask, run, "--mask")
    if Path(args.mask).suffix.lower() == ".png":  # black = unknown, white = known
        mask = mask / 255
    mask = inpainting_mask(run, values, mask, f"--mask {args.mask}", f"--input {args.input}")
    samples = inpaint(run, values, mask, args.n, args.seed, progress=not args.quiet, known=args.known)
    _write_posterior(out, values, samples, run)
    _emit(args, {"out": str(out), "inputs": len(values), "samples_per_input": args.n,
                 "known_fraction": float(mask.mean()), "device": str(run.device)},
          f"wrote {args.n} completions and their mean for {len(values)} input(s) to {out}")


class _UsageError(Exception):
    """A bad command line: main prints it in one line (and its JSON) and exits with code 2."""

    def __init__(self, prog: str, message: str):
        super().__init__(f"{prog}: error: {message} (see {prog} --help)")
        self.command, self.message = prog.partition(" ")[2] or None, message


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line too (argparse prints the whole usage first), exit code 2."""

    def error(self, message: str):
        raise _UsageError(self.prog, message)


def _number_type(convert: typing.Callable[[str], float], expected: str, ok: typing.Callable[[float], bool],
                 requirement: str) -> typing.Callable[[str], float]:
    """An argparse type: `convert` the text, then check it; each failure is one line saying what was wanted."""
    def parse(text: str) -> float:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must {requirement}, got {text}")
        return value
    return parse


# a seed that every generator accepts (the range of the config's seed)
_seed = _number_type(int, "an integer", *RANGES["seed"])
# a positive, finite training time
_minutes = _number_type(float, "a number of minutes", lambda value: 0 < value < math.inf, "be positive")
# DDIM's eta
_eta = _number_type(float, "a number from 0 to 1", lambda value: 0 <= value <= 1,
                    "lie in [0, 1] (0: deterministic, 1: the ancestral chain's noise)")


SAMPLING_PRECISIONS = ("fp32", "bf16")
PRECISION_HELP = ("the network's precision while sampling (default: bf16 if it trained in bf16 and this machine "
                  "computes bf16 natively, else fp32; bf16 samples the image default's U-Net 1.7 times as fast as "
                  "fp32 on a CPU with AMX, and far slower on one without AMX or AVX-512 BF16)")
DEVICE_HELP = "auto (CUDA if available), cpu, cuda or cuda:N"
RESPACE_HELP = ("a respaced chain: N steps evenly spaced from 1 to T, quadN for N quadratically spaced (dense near "
                "the data, DDIM's quad), optimalN for the N steps whose chain with fitted variances has the highest "
                "bound (chosen on the fit's training images), or a comma-separated list of the trained steps to keep, "
                "from 1 to T (Gaussian runs)")
CLIP_HELP = ("clip the x_0 that the network implies to the data's range in every reverse kernel (DDPM's "
             "clip_denoised, diffusers' clip_sample): the chain stays Gaussian, so evaluate bounds the clipped chain "
             "that sample draws from; 8-bit images and integer-valued vectors")
VARIANCE_HELP = ("the chain's reverse variances: moments (default: the network's own, carried to longer steps), "
                 "interpolate (improved-diffusion's respacing) or fitted (per step, the variance that maximises the "
                 "bound for the network's mean, fitted on 500 training images: a real bound for a chain respaced from "
                 "a fixed-variance network; Bao et al. 2022)")


SAMPLER_HELP = ("ancestral: the reverse chain's kernels; ddim: DDIM (Song et al. 2021), deterministic at --eta 0; heun: "
                "Heun's method on the probability-flow ODE (Karras et al. 2022), two network calls a step; dpm2m: "
                "DPM-Solver++(2M) (Lu et al. 2022), second order at one call a step, the best of these at 10 to 20 "
                "steps (ddim, heun, dpm2m: Gaussian runs)")


def _training_flags(p: argparse.ArgumentParser) -> None:
    """The flags of every command that trains: train and reproduce."""
    p.add_argument("--out", help="run directory (default runs/NAME)")
    p.add_argument("--steps", type=int, help="training steps (train.steps)")
    p.add_argument("--minutes", type=_minutes, help="stop after M minutes of training time in all (train.max_minutes; "
                                                 "like --steps, a new total for --resume)")
    p.add_argument("--T", type=int, help="diffusion steps (diffusion.T)")
    p.add_argument("--seed", type=_seed, help="seed for data, split, init and noise")
    p.add_argument("--schedule", help=" | ".join(typing.get_args(ScheduleName)))
    p.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key, e.g. train.lr=3e-4")
    p.add_argument(MEMORY_OVERRIDE_FLAG, action="store_true", help=MEMORY_OVERRIDE_HELP)


def _eval_flags(p: argparse.ArgumentParser) -> None:
    """The flags of every command that scores the bound: evaluate, compare and reproduce."""
    p.add_argument("--draws", type=int, help="noise draws per example and timestep (eval.n_draws)")
    p.add_argument("--max-examples", type=int, help="evaluate on the first N test examples")
    p.add_argument("--t-samples", type=int, help="steps per example of an unbiased stratified estimate of the "
                                                 "bound (eval.t_samples); 0: the exact sum over every step")
    p.add_argument("--t-sampling", choices=["uniform", "importance"],
                   help="how --t-samples draws each step (eval.t_sampling): importance (the default), strata of "
                        "equal mass of a pilot's terms, or uniform in equal strata")
    p.add_argument("--eval-seed", type=_seed, default=0)


def _chain_flags(p: argparse.ArgumentParser) -> None:
    """The flags that choose the chain and its sampler, shared by sample and parzen (parzen scores what sample draws)."""
    p.add_argument("--steps", metavar="N|STEPS", help=f"{RESPACE_HELP}; default: all T steps (evaluate --respace "
                                                      "gives the bound of the ancestral chain on these steps)")
    p.add_argument("--sampler", choices=SAMPLERS, default="ancestral", help=SAMPLER_HELP)
    p.add_argument("--eta", type=_eta, help="DDIM's noise, from 0 (deterministic, the default) to 1 (the ancestral "
                                            "chain's, for a kernel variance of beta-tilde)")
    p.add_argument("--variance", choices=VARIANCE_RULES, help=VARIANCE_HELP)
    p.add_argument("--clip-x0", action="store_true", help=CLIP_HELP)
    p.add_argument("--precision", choices=SAMPLING_PRECISIONS, help=PRECISION_HELP)
    p.add_argument("--device", default="auto", help=f"where the network samples: {DEVICE_HELP} (the draws depend on it)")
    p.add_argument(MEMORY_OVERRIDE_FLAG, action="store_true", help=MEMORY_OVERRIDE_HELP)


def _add_train(sub, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("train", parents=[common], help="train a model")
    p.add_argument("config", help="experiment name (configs/NAME.toml) or a .toml path")
    p.add_argument("--data", help="a .npy, .npz or .csv array (N x D) instead of the config's data")
    p.add_argument("--diffusion", choices=["auto", "gaussian", "binomial", "categorical"])
    p.add_argument("--data-dir", help="folder holding MNIST / CIFAR-10 files (data.data_dir)")
    p.add_argument("--download", action="store_true", help="download MNIST / CIFAR-10 and verify md5")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    _training_flags(p)
    p.set_defaults(func=cmd_train)


def _add_evaluate(sub, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("evaluate", parents=[common], help="the bound K on held-out data, and each reverse step's entropy "
                                                          "against the paper's bounds")
    p.add_argument("run_dir", nargs="?", help="a run directory (or --diffusers DIR)")
    p.add_argument("--data", help="evaluate on this array (original units) instead of the test split; with "
                                  "--diffusers: cifar10, mnist, a folder of images or an .npz/.npy of images")
    p.add_argument("--diffusers", metavar="DIR", help="a diffusers pipeline saved with save_pretrained (unet/ and "
                                                      "scheduler/, safetensors): its bound in bits/dim on --data "
                                                      "(needs pip install thermodiff[diffusers])")
    p.add_argument("--data-dir", help="with --diffusers: the folder holding the MNIST / CIFAR-10 files")
    p.add_argument("--device", default="auto", help=f"where the network runs: {DEVICE_HELP}")
    _eval_flags(p)
    p.add_argument("--respace", metavar="N|STEPS", help=RESPACE_HELP)
    p.add_argument("--variance", choices=VARIANCE_RULES, help=VARIANCE_HELP)
    p.add_argument("--clip-x0", action="store_true", help=CLIP_HELP)
    p.add_argument("--exact", action="store_true", help="the exact bound: every step of every test example "
                                                        "(the default may sample steps or examples; the report says)")
    p.add_argument("--per-example", metavar="FILE.npy", help="also write K per example (bits, original units); "
                                                             "with --ode its log p to FILE_ode.npy")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --per-example file")
    p.add_argument("--ode", action="store_true", help="also the exact log-likelihood through the probability-flow "
                                                      "ODE (Song et al. 2021) on the same examples")
    p.add_argument("--ode-rtol", type=float, help="the ODE solver's relative tolerance (default 1e-5)")
    p.add_argument("--ode-atol", type=float, help="the ODE solver's absolute tolerance (default 1e-5)")
    p.add_argument("--ode-exact-trace", action="store_true", help="the divergence's exact trace (one backward pass "
                                                                   "per dimension) instead of Hutchinson's estimate")
    p.set_defaults(func=cmd_evaluate)


def _add_sample(sub, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("sample", parents=[common], help="draw samples (original units) to a .npy file")
    p.add_argument("run_dir")
    p.add_argument("-n", type=int, default=1000)
    p.add_argument("--out", required=True, help="FILE.npy (original units) or FILE.png (image grid)")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--seed", type=_seed, default=0)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--respace", metavar="N|STEPS", help="the same as --steps")
    _chain_flags(p)
    p.set_defaults(func=cmd_sample)


def _add_posteriors(sub, common: argparse.ArgumentParser) -> None:
    for name, help_text in (("denoise", "posterior samples of clean data given noisy data (paper Fig. 3)"),
                            ("inpaint", "fill in unknown values, known ones kept (paper Fig. 5)")):
        p = sub.add_parser(name, parents=[common], help=help_text)
        p.add_argument("run_dir")
        p.add_argument("--input", required=True, help="a .npy array (one example or a stack) or, for image runs, a .png")
        if name == "denoise":
            p.add_argument("--sigma", type=float, required=True, help="noise std in original units (pixel values 0..255)")
            p.add_argument("--method", choices=DENOISE_METHODS, default="start",
                           help="start the reverse chain from y at the step whose noise level matches sigma (exact "
                                "under the model, default) or multiply every kernel by N(y; x, sigma^2) (the paper's)")
        else:
            p.add_argument("--mask", required=True, help="same shape as one example (or as the input): 1 or true = "
                                                       "known, 0 = unknown; a .png: white = known, black = unknown")
            p.add_argument("--known", choices=KNOWN_VALUES, default="clamp",
                           help="known values held at their values at every step (the paper's, default) or "
                                "following a forward trajectory to them")
        mean = ("with --method start the model's E[x | y], else the samples' mean" if name == "denoise" else
                "the samples' mean")
        p.add_argument("--out", help=f"FILE.npz (input, samples, mean, samples_mean) or FILE.png (grid: input, mean, "
                                     f"samples); mean: {mean} (default INPUT{POSTERIOR_OUT[name]})")
        p.add_argument("-n", type=int, default=4, help="posterior samples per input")
        p.add_argument("--seed", type=_seed, default=0)
        p.add_argument("--device", default="auto",
                       help=f"where the network runs: {DEVICE_HELP} (the draws depend on it)")
        p.add_argument("--overwrite", action="store_true")
        p.set_defaults(func=cmd_denoise if name == "denoise" else cmd_inpaint)


def _add_plot(sub, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("plot", parents=[common], help="figures of a run (Figure 1 for 2-D data)")
    p.add_argument("run_dir")
    p.add_argument("--out", help="folder for the PNGs (default the run directory)")
    p.add_argument("--overwrite", action="store_true", help="replace figures that exist")
    p.set_defaults(func=cmd_plot)


def _add_parzen(sub, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("parzen", parents=[common], help="Parzen-window log-likelihood of the test images (paper Table 2)")
    p.add_argument("run_dir")
    p.add_argument("--samples", type=int, default=10000, help="samples the window is fitted on")
    p.add_argument("--valid", type=int, default=10000, help="validation images for the bandwidth (the last training images)")
    p.add_argument("--max-test", type=int, help="use the first N test images")
    p.add_argument("--seed", type=_seed, default=0, help="seed of the sampling")
    _chain_flags(p)
    p.set_defaults(func=cmd_parzen)


def _add_compare(sub, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("compare", parents=[common], help="train several configs on one data set: one table, bound vs training time")
    p.add_argument("configs", nargs="+", metavar="CONFIG", help="experiment names or .toml paths, all with the same [data] and seed")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--steps", type=int, help="train each for N steps (train.steps)")
    budget.add_argument("--minutes", type=_minutes, help="train each for M minutes of training time")
    p.add_argument("--out", default="runs/compare", help="folder for the runs (OUT/NAME), compare.json and bound_vs_time.png")
    p.add_argument("--samples", type=int, default=200, help="samples drawn to time sampling")
    p.add_argument("--overwrite", action="store_true", help="replace existing runs of these names")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a key in every config")
    p.add_argument(MEMORY_OVERRIDE_FLAG, action="store_true", help=MEMORY_OVERRIDE_HELP)
    _eval_flags(p)
    p.set_defaults(func=cmd_compare)


def _add_reproduce(sub, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("reproduce", parents=[common], help="train, evaluate and plot a paper experiment")
    p.add_argument("experiment", help="a config of one of the paper's experiments: swissroll, swissroll_paper, heartbeat, ...")
    _training_flags(p)
    _eval_flags(p)
    p.set_defaults(func=cmd_reproduce)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="thermodiff", description="Diffusion probabilistic models (Sohl-Dickstein et al. 2015).")
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    common.add_argument("--quiet", action="store_true", help="no progress bars")
    for add_command in (_add_train, _add_evaluate, _add_sample, _add_posteriors, _add_plot, _add_parzen, _add_compare,
                        _add_reproduce):
        add_command(sub, common)
    return parser


def _fail(line: str, code: int, as_json: bool, command: str | None = None, error: str | None = None) -> int:
    """Print the one-line message ``line`` on stderr and, with ``--json``, one JSON object on stdout
    (``error``: the message without the program's prefix); return the exit code."""
    print(line, file=sys.stderr)
    if as_json:
        print(json.dumps({"command": command, "error": error or line, "exit_code": code}, ensure_ascii=False))
    return code


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = build_parser().parse_args(argv)
    except _UsageError as e:
        return _fail(str(e), 2, "--json" in argv, e.command, e.message)
    try:
        args.func(args)
    except RunStopped as e:  # its checkpoint saved or kept: say how to continue
        kind = "error: " if e.exit_code == 2 else ""
        message = f"{e}; continue with: {_resume_command(args, e)}"
        return _fail(f"thermodiff {args.command}: {kind}{message}", e.exit_code, args.json, args.command, message)
    except UserError as e:
        return _fail(f"thermodiff {args.command}: error: {e}", 2, args.json, args.command, str(e))
    except KeyboardInterrupt:
        return _fail("thermodiff: interrupted", 130, args.json, args.command, "interrupted")
    except BrokenPipeError:  # the reader went away (`thermodiff evaluate RUN | head`): not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as e:  # read-only, permission denied, a full disk, a file in the path: one line too
        message = os_error_message(e)
        return _fail(f"thermodiff {args.command}: error: {message}", 2, args.json, args.command, message)
    return 0


def _resume_command(args, stopped: RunStopped) -> str:
    """The command that continues a stopped run (``compare`` trains from several configs: the
    run's own is to be filled in)."""
    config = getattr(args, "config", None) or getattr(args, "experiment", None) or "CONFIG"
    device = ["--device", args.device] if getattr(args, "device", "auto") != "auto" else []
    return shlex.join(["thermodiff", "train", str(config), "--out", str(stopped.run_dir), "--resume",
                       *stopped.limits(), *device])


if __name__ == "__main__":
    sys.exit(main())
