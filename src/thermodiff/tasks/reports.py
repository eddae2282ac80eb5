"""Text reports of the records that training, evaluation, Parzen estimation and reproduction
return (the ``thermodiff`` commands print them, or the records as strict JSON)."""

import json
import math
from pathlib import Path

from thermodiff.errors import UserError

# (label, key, its standard error's key) of the figures compared with the paper's
COMPARED = [("K", "K_bits", "stderr_bits"), ("K - L_null", "K_minus_L_null_bits", "K_minus_L_null_stderr_bits"),
            ("K", "K_bits_per_pixel", "stderr_bits_per_pixel"),
            ("K - L_null", "K_minus_L_null_bits_per_pixel", "K_minus_L_null_stderr_bits_per_pixel")]


def finite(obj):
    """NaN and infinities become null, so the output is strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [finite(v) for v in obj]
    return obj


def nonfinite(obj, where: str = "") -> list[tuple[str, float]]:
    """(where, value) of every NaN or infinite number in ``obj`` (None, an undefined figure, is not one)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return [(where, obj)]
    if isinstance(obj, dict):
        return [bad for k, v in obj.items() for bad in nonfinite(v, f"{where}.{k}" if where else str(k))]
    if isinstance(obj, list):
        return [bad for i, v in enumerate(obj) for bad in nonfinite(v, f"{where}[{i}]")]
    return []


def require_finite(record: dict, origin: str) -> dict:
    """``record`` if all its numbers are finite; else a UserError naming the first that is not,
    so that no command reports (and exits 0 with) a NaN figure."""
    bad = nonfinite(record)
    if bad:
        where, value = bad[0]
        raise UserError(f"{origin}: {where} is {value} ({len(bad)} figure(s) not finite: the model produced NaN or "
                        "infinite values, the run may have diverged); evaluate an earlier checkpoint or train again "
                        "with a lower train.lr")
    return record


def plus_minus(stderr: float | None, spec: str) -> str:
    """' +- stderr', or that a single example has no standard error."""
    return " (1 example: no standard error)" if stderr is None else f" +- {stderr:{spec}}"


def to_json(record: dict) -> str:
    """``record`` as indented strict JSON (non-finite numbers as null)."""
    return json.dumps(finite(record), indent=2, allow_nan=False)


def read_evaluation(path: Path) -> dict:
    """A record that :func:`to_json` wrote (``thermodiff evaluate``'s evaluation.json); a damaged
    file is refused with the way to write it again."""
    try:
        record = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        record = e
    if not isinstance(record, dict) or not {"per_timestep_bits", "experiment", "K_bits"} <= record.keys():
        raise UserError(f"{path}: damaged (not an evaluation record); delete it or write it again with "
                        f"thermodiff evaluate {path.parent}")
    return record


def describe_training(s: dict) -> str:
    """One line on a finished run: steps, time, folder, the running K estimate and the best weights."""
    if s.get("new_steps") == 0:
        return (f"nothing trained: {s['run_dir']} is already at step {s['steps']}, its step or time limit; pass a "
                "larger --steps or --minutes with --resume to train it further")
    best = s["best"]
    kept = (f"; best validation K {best['K_bits']:.3f}{plus_minus(best['stderr_bits'], '.3f')} bits per example at step "
            f"{best['step']} (best.safetensors)" if best else "")
    return (f"trained {s['steps']} steps in {s['wall_s']:.1f} s -> {s['run_dir']} "
            f"(running K estimate {s['K_bits_running']:.3f} bits per example{kept})")


def trained_for(r: dict) -> str:
    """The scored weights' training, from a report's ``train_*`` entries: "step N, M wall minutes"."""
    minutes = f", {r['train_s'] / 60:.1f} {r['train_clock']} minutes" if r.get("train_s") is not None else ""
    return f"step {r['train_steps']}{minutes}"


def describe_baseline(r: dict) -> str:
    """A baseline's evaluation: a DAE's denoising error, an MCGSM's log-likelihood, or a VAE's ELBO and
    importance-weighted bound."""
    head = f"{r['experiment']} ({r['model']} baseline, {r['split']} split, {r['n_examples']} examples, {trained_for(r)})"
    if r["model"] == "dae":
        psnr = (lambda name: f" (PSNR {r[f'{name}_psnr_db']:.2f} dB)" if f"{name}_psnr_db" in r else "")
        return "\n".join([head, f"  denoised output: MSE {r['output_mse']:.4g}{plus_minus(r['output_mse_stderr'], '.2g')}{psnr('output')}",
                          f"  noisy input:     MSE {r['noisy_input_mse']:.4g}{plus_minus(r['noisy_input_mse_stderr'], '.2g')}"
                          f"{psnr('noisy_input')} (noise std {r['noise_std']} of the scaled data)"])
    if r["model"] == "mcgsm":
        lines = [head, f"  log p          = {r['K_bits']:.4f}{plus_minus(r['stderr_bits'], '.4f')} {r['unit']} "
                       f"({r['K_bits_per_dim']:.4f} bits/dim, exact)",
                 f"  log p - L_null = {r['K_minus_L_null_bits']:.4f}{plus_minus(r['K_minus_L_null_stderr_bits'], '.4f')} {r['unit']}"]
    else:
        lines = [head, f"  ELBO           = {r['K_bits']:.4f}{plus_minus(r['stderr_bits'], '.4f')} {r['unit']} "
                       f"({r['K_bits_per_dim']:.4f} bits/dim, {r['n_draws']} draws of z)",
                 f"  importance-weighted ({r['n_importance']}) = {r['K_iw_bits']:.4f}{plus_minus(r['K_iw_stderr_bits'], '.4f')} {r['unit']}",
                 f"  ELBO - L_null  = {r['K_minus_L_null_bits']:.4f}{plus_minus(r['K_minus_L_null_stderr_bits'], '.4f')} {r['unit']}"]
    if r.get("nll_bits_per_dim") is not None:
        lines.append(nll_line(r))
    return "\n".join(lines)


def describe_evaluation(r: dict) -> str:
    """An evaluation record (:func:`thermodiff.tasks.evaluation.evaluate`): the bound and how it was
    estimated, the paper's figures beside it, and the settings chosen from the data."""
    if "model" in r:
        return describe_baseline(r)
    respaced = (f" respaced from {r['T_trained']} ({r.get('spacing', 'even')} steps), {r['variance_rule']} variances"
                if "T_trained" in r else "") + (", x_0 clipped to the data's range" if "x0_clipped_to" in r else "")
    lines = [f"{r['experiment']} ({r['split']} split, {r['n_examples']} of {r['n_test']} examples, {r['n_draws']} draws/t, "
             f"T = {r['T']}{respaced}, {r['parameterization']} parameterisation, {r['schedule']} schedule, "
             f"{r['checkpoint']} weights: {trained_for(r)})",
             f"  bound: {r['estimator']}",
             f"  K              = {r['K_bits']:.4f}{plus_minus(r['stderr_bits'], '.4f')} {r['unit']} ({r['K_bits_per_dim']:.4f} bits/dim)",
             f"  K - L_null     = {r['K_minus_L_null_bits']:.4f}{plus_minus(r['K_minus_L_null_stderr_bits'], '.4f')} {r['unit']}",
             f"  K (orig units) = {r['K_original_units_bits']:.4f} {r['unit']}"]
    if "continuous_time" in r:
        c = r["continuous_time"]
        lines.append(f"  K, continuous time = {c['K_bits']:.4f}{plus_minus(c['stderr_bits'], '.4f')} {r['unit']} ({c['n_draws']} draws of t)")
    if "K_bits_per_pixel" in r:
        lines.append(f"  per pixel: K = {r['K_bits_per_pixel']:.4f}{plus_minus(r['stderr_bits_per_pixel'], '.4f')}, "
                     f"K - L_null = {r['K_minus_L_null_bits_per_pixel']:.4f} bits/pixel")
    if r.get("nll_bits_per_dim") is not None:
        lines.append(nll_line(r))
    if "ode_log_likelihood_bits" in r:
        nll = f", NLL {r['ode_nll_bits_per_dim']:.4f} bits/dim" if "ode_nll_bits_per_dim" in r else ""
        lines.append(f"  ODE log-likelihood = {r['ode_log_likelihood_bits']:.4f}{plus_minus(r['ode_stderr_bits'], '.4f')} "
                     f"{r['unit']} ({r['ode_log_likelihood_original_units_bits']:.4f} in original units{nll}; "
                     f"{r['ode_n_examples']} examples, {r['ode_trace']} trace, {r['ode_nfe']} evaluations, "
                     f"rtol {r['ode_rtol']:g}, atol {r['ode_atol']:g})")
    for label, key, _ in COMPARED:
        if key in r.get("paper", {}):
            lines.append(f"  paper: {label} = {r['paper'][key]} ({key})")
    if "entropy" in r:
        lines.append(describe_entropy(r["entropy"]))
    if r.get("auto_choices"):
        lines.append("  chosen from the training data:")
        lines += [f"    {key} = {why}" for key, why in r["auto_choices"].items()]
    return "\n".join(lines)


def describe_entropy(e: dict) -> str:
    """The reverse kernels' entropies against the paper's bounds (tasks/entropy.py), in one or two lines."""
    largest = (f"; largest excursion {e['largest_excursion_bits']:+.4g} bits at t = {e['largest_excursion_t']}"
               f" ({'above the upper' if e['largest_excursion_bits'] > 0 else 'below the lower'} bound)"
               if e["n_outside"] else "")
    line = (f"  reverse-kernel entropy: {e['n_outside']} of {e['n_steps']} steps outside the paper's bounds on "
            f"H_q(X_t-1|X_t) ({e['n_above']} above, {e['n_below']} below; {e['n_examples']} examples){largest}")
    if e["n_bounds_crossed"]:
        line += (f"\n    at {e['n_bounds_crossed']} steps the bounds cross (lower > upper): the marginal entropy falls "
                 "there (data carrying more entropy than the stationary distribution), so the upper bound does not hold")
    return line


def describe_foreign(r: dict) -> str:
    """A bound of a model trained elsewhere (:func:`thermodiff.tasks.foreign.evaluate_diffusers`)."""
    clip = "" if r["clip_x0"] is None else f", x_0 clipped to +-{r['clip_x0']:g}"
    return "\n".join([
        f"{r['model_dir']} on {r['data']} ({r['n_examples']} test images, T = {r['T']}, {r['prediction_type']} prediction, "
        f"{r['variance_type']} variance{clip}, discretized decoder)",
        f"  bound: {r['estimator']}",
        f"  NLL bound = {r['nll_bits_per_dim']:.4f}{plus_minus(r['nll_stderr_bits_per_dim'], '.4f')} bits/dim"])


def nll_line(r: dict) -> str:
    """The bound as a negative log-likelihood per dimension: of 8-bit images, or of the symbols of
    categorical ones."""
    if r["nll_bound"] == "symbols":
        return f"  NLL bound of the symbols = {r['nll_bits_per_dim']:.4f} bits/symbol"
    return f"  NLL bound of the 8-bit data ({r['nll_bound']}) = {r['nll_bits_per_dim']:.4f} bits/dim"


def describe_parzen(r: dict) -> str:
    """A Parzen-window record (:func:`thermodiff.tasks.parzen.parzen_evaluate`) beside the paper's figure."""
    paper = f"; paper {r['paper']['parzen_bits']} bits" if "paper" in r else ""
    edge = " (on the grid's edge)" if r["sigma_on_grid_edge"] else ""
    return (f"{r['experiment']}: Parzen-window log-likelihood of {r['n_test']} test images = "
            f"{r['parzen_bits']:.2f}{plus_minus(r['parzen_stderr_bits'], '.2f')} bits ({r['parzen_nats']:.2f} nats){paper}\n"
            f"  sigma = {r['sigma']:.4g}{edge}, chosen on {r['n_valid']} validation images; "
            f"{r['n_samples']} {r['sampler']} samples on {r['sampling_steps']} of {r['T']} steps ({trained_for(r)})"
            f"{', x_0 clipped' if 'x0_clipped_to' in r else ''}\n"
            f"  samples: {r['samples_kept']}")


def describe_reproduction(summary: dict, result: dict, figures: list[str]) -> str:
    """A paper experiment reproduced: the evaluation, a table of ours against the paper's
    figures, the training time and the figures drawn."""
    rows = []
    for label, key, err in COMPARED:
        if key in result.get("paper", {}):
            unit = "bits/pixel" if key.endswith("per_pixel") else result["unit"]
            rows.append(f"  {f'{label} [{unit}]':28}{result[key]:>10.3f}{plus_minus(result[err], '<8.3f')}{result['paper'][key]:>10}")
    return "\n".join([
        describe_evaluation(result),
        "",
        f"  {'':28}{'thermodiff':>21}{'paper':>9}",
        *rows,
        f"  trained {summary['steps']} steps in {summary['wall_s']:.0f} s; figures: {', '.join(figures)}",
    ])
