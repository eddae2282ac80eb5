"""``thermodiff compare``: several configs trained on one data set (the same seeded splits), each
evaluated on the same held-out examples with its own bound in the same units (the 2015 model's
exact K, VDM's chain and continuous-time bounds, a VAE's ELBO; a DAE's denoising error), in one
table, and a plot of the bound against training time from every run's metrics.jsonl."""

import json
import time
from pathlib import Path

import torch

from thermodiff.errors import UserError
from thermodiff.process.sampling import ancestral_sample
from thermodiff.run.checkpoint import atomic_write_text
from thermodiff.run.config import Config
from thermodiff.run.experiment import Run, load_run
from thermodiff.run.training import read_metrics, train
from thermodiff.tasks.evaluation import evaluate, hardware
from thermodiff.tasks.reports import plus_minus


def check_comparable(configs: list[Config], origins: list[str]) -> None:
    """One data set (same [data] and seed, so the same splits) and distinct run names."""
    for cfg, origin in zip(configs[1:], origins[1:]):
        if cfg.data != configs[0].data or cfg.seed != configs[0].seed:
            raise UserError(f"{origin}: its [data] or seed differs from {origins[0]}'s; compare needs one data set")
    names = [cfg.name for cfg in configs]
    if len(set(names)) < len(names):
        raise UserError(f"configs share a name ({', '.join(sorted({n for n in names if names.count(n) > 1}))}); "
                        "every run needs its own folder")


def model_label(run: Run) -> str:
    """The baseline's kind, 'vdm', or a discrete-time chain's kernel and the loss that trained it."""
    cfg = run.config
    if cfg.baseline.kind:
        return cfg.baseline.kind
    if cfg.diffusion.kind == "vdm":
        return "vdm"
    return f"{cfg.diffusion.parameterization}, {cfg.train.loss}"


@torch.no_grad()
def sample_seconds(run: Run, n: int, seed: int = 0) -> float | None:
    """Wall seconds per example to draw ``n`` samples (None for a DAE, which has none)."""
    if run.config.baseline.kind == "dae":
        return None
    start = time.perf_counter()
    ancestral_sample(run.diffusion, run.model, (n, *run.dataset.event_shape), torch.Generator().manual_seed(seed))
    return (time.perf_counter() - start) / n


def compare(configs: list[Config], origins: list[str], out: Path, overwrite: bool = False, progress: bool = True,
            device: str = "auto", n_draws: int | None = None, max_examples: int | None = None, eval_seed: int = 0,
            n_samples: int = 200, memory_check: bool = True, t_samples: int | None = None,
            t_sampling: str | None = None) -> dict:
    """Train every config into ``out/NAME``, evaluate it and time its sampling; write
    ``out/compare.json`` and ``out/bound_vs_time.png``. Returns the record. ``memory_check``: as
    :func:`thermodiff.run.training.train`'s; ``t_samples``, ``t_sampling``: as :func:`evaluate`'s."""
    check_comparable(configs, origins)
    existing = [str(out / cfg.name) for cfg in configs
                if (out / cfg.name).exists() and not ((out / cfg.name).is_dir() and not any((out / cfg.name).iterdir()))]
    if existing and not overwrite:  # before any training; compare has no --resume (each run trains from the start)
        one = len(existing) == 1
        raise UserError(f"--out {out}: {', '.join(existing)} already {'exists' if one else 'exist'}; pass --overwrite "
                        f"to replace {'it' if one else 'them'}, or a new --out (to continue one run, use thermodiff "
                        "train CONFIG --out RUN --resume)")
    rows = []
    for cfg, origin in zip(configs, origins):
        summary = train(cfg, out / cfg.name, overwrite=overwrite, progress=progress, device=device,
                        memory_check=memory_check)
        run = load_run(out / cfg.name, split=True)  # the record describes the data that every run is scored on
        result = evaluate(run, n_draws, max_examples, eval_seed, progress=progress, t_samples=t_samples,
                          t_sampling=t_sampling)
        metrics = read_metrics(out / cfg.name)
        rows.append({"name": cfg.name, "config": origin, "model": model_label(run), "steps": summary["steps"],
                     "train_s": metrics[-1]["elapsed_s"] if metrics else summary["wall_s"],
                     "sample_s_per_example": sample_seconds(run, n_samples, eval_seed), "evaluation": result,
                     "curve": [(m["elapsed_s"], m["K_bits_running"]) for m in metrics if "K_bits_running" in m]})
    # one data set (check_comparable): the last run's describes every run's
    record = {"data": run.dataset.describe(), "n_samples_timed": n_samples,
              "hardware": hardware(), "rows": rows, "plot": str(out / "bound_vs_time.png")}
    plot_bound_vs_time(rows, out / "bound_vs_time.png")
    atomic_write_text(out / "compare.json", json.dumps(record, indent=2) + "\n")
    return record


def _bound(row: dict) -> tuple[float, float] | None:
    e = row["evaluation"]
    return (e["K_bits"], e["stderr_bits"]) if "K_bits" in e else None


def _other_bounds(e: dict) -> list[tuple[str, float, float, str]]:
    """(label, bound, standard error, marker) of a run's held-out bounds besides K: VDM's
    continuous-time one (the bound it trains on, besides its T-step chain's) and a VAE's
    importance-weighted one (K being its ELBO)."""
    marks = []
    if "continuous_time" in e:
        marks.append(("continuous time", e["continuous_time"]["K_bits"], e["continuous_time"]["stderr_bits"], "s"))
    if "K_iw_bits" in e:
        marks.append((f"importance-weighted ({e['n_importance']})", e["K_iw_bits"], e["K_iw_stderr_bits"], "D"))
    return marks


def plot_bound_vs_time(rows: list[dict], path: Path) -> None:
    """The running training estimate of each run's bound against training time (lines; of the
    bound each model trains on, VDM's continuous-time one) and its held-out bounds at the end
    (points with standard errors); a DAE has no bound to draw."""
    from thermodiff.tasks.plotting import plt, save_figure  # pyplot on the Agg backend

    fig, ax = plt.subplots(figsize=(7, 4.5))
    finals = []
    for i, row in enumerate(r for r in rows if _bound(r) is not None):
        colour = f"C{i}"
        if row["curve"]:
            seconds, values = zip(*row["curve"])
            ax.plot(seconds, values, color=colour, alpha=0.6, label=f"{row['name']} ({row['model']}), training estimate")
        marks = [("held out", *_bound(row), "o")]
        marks += [(f"held out, {label}", k, se, marker) for label, k, se, marker in _other_bounds(row["evaluation"])]
        for label, k, se, marker in marks:
            finals.append(k)
            ax.errorbar([row["train_s"]], [k], yerr=[se or 0.0], fmt=marker,  # no bar for one example
                        mfc=colour if marker == "o" else "none", color=colour, capsize=3, label=f"{row['name']}, {label}")
    if finals:  # the early, far lower estimates would flatten the end of the curves
        ax.set_ylim(min(finals) - max(2.0, max(finals) - min(finals)), max(finals) + 1.0)
    ax.set_xlabel("training time (s)")
    ax.set_ylabel(f"bound ({rows[0]['evaluation'].get('unit', 'bits')})")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)


def format_table(record: dict) -> str:
    """One line per run: its bound, per dimension, other figures, and its costs."""
    def number(value: float | None, spec: str = ".3f") -> str:
        return "-" if value is None else format(value, spec)

    lines = [f"{'run':22}{'model':24}{'steps':>8}{'train s':>9}{'bound (bits)':>24}{'bits/dim':>10}"
             f"{'8-bit NLL bits/dim':>20}{'sample ms/ex':>14}  other"]
    for row in record["rows"]:
        e, bound = row["evaluation"], _bound(row)
        other = [f"{label} {k:.3f}{plus_minus(se, '.3f')}" for label, k, se, _ in _other_bounds(e)]
        if "output_mse" in e:
            psnr = (f"PSNR {e['output_psnr_db']:.2f} dB vs noisy {e['noisy_input_psnr_db']:.2f}" if "output_psnr_db" in e
                    else f"MSE {e['output_mse']:.4g} vs noisy {e['noisy_input_mse']:.4g}")
            other.append(f"denoising: {psnr}")
        ms = row["sample_s_per_example"]
        shown = "-" if bound is None else f"{bound[0]:.3f}{plus_minus(bound[1], '.3f')}"
        lines.append(f"{row['name']:22}{row['model']:24}{row['steps']:>8}{row['train_s']:>9.1f}"
                     f"{shown:>24}"
                     f"{number(e.get('K_bits_per_dim')):>10}{number(e.get('nll_bits_per_dim')):>20}"
                     f"{number(None if ms is None else 1000 * ms, '.3g'):>14}  {'; '.join(other)}")
    d = record["data"]
    lines.append(f"data: {d['source']}, {d['n_train']} train / {d['n_test']} test examples of shape {tuple(d['shape'])}; "
                 f"bounds on the held-out examples, in {record['rows'][0]['evaluation'].get('unit', 'bits')}; "
                 f"plot: {record['plot']}")
    return "\n".join(lines)
