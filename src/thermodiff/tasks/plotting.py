"""Figures: the paper's Figure 1 for 2-D data, sample panels, and the per-timestep bound."""

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from thermodiff.process.sampling import ancestral_sample  # noqa: E402
from thermodiff.run.checkpoint import atomic_write_bytes  # noqa: E402
from thermodiff.run.experiment import Run  # noqa: E402
from thermodiff.tasks.reports import plus_minus  # noqa: E402


def save_figure(fig, path: Path, dpi: int = 110) -> Path:
    """Close ``fig`` and write it as PNG atomically: a failed write (a full disk, a read-only
    folder) leaves the previous file, never half an image."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def _times(T: int) -> list[int]:
    return [0, T // 2, T]


@torch.no_grad()
def figure_1(run: Run, path: Path, n: int = 2000, seed: int = 0) -> Path:
    """Paper Fig. 1: the forward trajectory q(x_t) (top), reverse samples p(x_t) (middle) and
    the learned drift mu(x_t, t) - x_t (bottom), at t = 0, T/2, T; 2-D data only."""
    diffusion, model, T = run.diffusion, run.model, run.diffusion.T
    generator = torch.Generator().manual_seed(seed)
    x0 = run.dataset.to_model(run.dataset.test[:n])
    times = _times(T)
    reverse = {}
    ancestral_sample(diffusion, model, (len(x0), 2), generator,
                     callback=lambda t, x: reverse.__setitem__(t, x.numpy()) if t in times else None)
    lim = 1.1 * float(x0.abs().max()) + 0.5
    fig, axes = plt.subplots(3, 3, figsize=(10, 10), sharex=True, sharey=True)
    grid = np.linspace(-lim, lim, 17)
    gx, gy = np.meshgrid(grid, grid)
    points = torch.as_tensor(np.stack([gx.ravel(), gy.ravel()], 1), dtype=torch.float32)
    for col, t in enumerate(times):
        tt = torch.full((len(x0),), max(t, 1), dtype=torch.long)
        forward = x0 if t == 0 else diffusion.q_sample(x0, tt, generator)
        axes[0, col].scatter(*forward.numpy().T, s=1, alpha=0.5)
        axes[0, col].set_title(f"q(x_t), t = {t}")
        axes[1, col].scatter(*reverse[t].T, s=1, alpha=0.5, color="C1")
        axes[1, col].set_title(f"p(x_t), t = {t}")
        mean, _ = diffusion.step_distribution(model, points, max(t, 1))
        drift = (mean - points.double()).numpy()  # float64: the last steps move points by ~beta_1
        axes[2, col].scatter(*reverse[t].T, s=1, alpha=0.15, color="C1")
        axes[2, col].quiver(gx, gy, drift[:, 0].reshape(gx.shape), drift[:, 1].reshape(gx.shape), color="k")
        axes[2, col].set_title(f"drift mu(x_t, t) - x_t, t = {max(t, 1)}")
    for ax in axes.flat:
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")
    fig.suptitle(f"{run.config.name}: forward trajectory, reverse samples, drift (T = {T}, step {run.step})")
    fig.tight_layout()
    return save_figure(fig, path)


@torch.no_grad()
def conditional_figure(run: Run, path: Path, n: int = 400, noise_std: float = 0.1, seed: int = 0) -> Path:
    """2-D data: samples of p(x_2 | x_1) at five values of x_1, with x_1 known exactly (held at its
    value at every step as the paper does, or following a forward trajectory to it) and with x_1
    observed with Gaussian noise of std ``noise_std`` in model units: every reverse kernel is
    multiplied by the factor (paper section 4)."""
    from thermodiff.process.posterior import Clamp, GaussianObservation

    generator = torch.Generator().manual_seed(seed)
    data = run.dataset.to_model(run.dataset.test[:2000]).numpy()
    observed = torch.tensor([True, False])
    axis = "z" if run.dataset.scaling.rotation is not None else "x"  # whitened coordinates, or the data's own
    fig, axes = plt.subplots(1, 3, figsize=(15, 5.2), sharex=True, sharey=True)
    titles = {"clamp": f"{axis}_1 known, held at its value (paper)", "forward": f"{axis}_1 known, forward trajectory to it",
              "noisy": f"{axis}_1 observed with noise std {noise_std}"}
    for ax, how in zip(axes, titles):
        ax.scatter(*data.T, s=1, color="0.75")
        for i, c in enumerate(np.linspace(-1.5, 1.5, 5)):
            values = torch.tensor([[c, 0.0]], dtype=torch.float64).expand(n, 2)
            factor = (GaussianObservation(values, noise_std**2, observed) if how == "noisy" else
                      Clamp(values, observed, forward=run.diffusion if how == "forward" else None))
            x = ancestral_sample(run.diffusion, run.model, (n, 2), generator, factor=factor).numpy()
            ax.scatter(*x.T, s=3, color=f"C{i}", alpha=0.6)
            ax.axvline(c, color=f"C{i}", lw=0.8, ls=":")
        ax.set_title(titles[how])
        ax.set_xlabel(f"{axis}_1")
        ax.set_aspect("equal")
    axes[0].set_ylabel(f"{axis}_2")
    units = "whitened units (data.scaling = 'pca')" if axis == "z" else "model units"
    fig.suptitle(f"{run.config.name}: posterior samples of {axis}_2 given {axis}_1, in {units} (grey: held-out data)")
    fig.tight_layout()
    return save_figure(fig, path)


def image_grid(images: np.ndarray, columns: int | None = None) -> np.ndarray:
    """uint8 (N, C, H, W) -> one (rows*H, columns*W[, C]) image, tiles separated by 1-pixel gaps."""
    n, c, h, w = images.shape
    columns = columns or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / columns))
    grid = np.full((c, rows * (h + 1) - 1, columns * (w + 1) - 1), 255, dtype=np.uint8)
    for i, image in enumerate(images):
        r, col = divmod(i, columns)
        grid[:, r * (h + 1): r * (h + 1) + h, col * (w + 1): col * (w + 1) + w] = image
    return grid[0] if c == 1 else grid.transpose(1, 2, 0)


def image_grid_png(images: np.ndarray, columns: int | None = None) -> bytes:
    """uint8 (N, C, H, W) -> the PNG file of their :func:`image_grid`."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image_grid(images, columns)).save(buffer, format="PNG")
    return buffer.getvalue()


@torch.no_grad()
def samples_panel(run: Run, path: Path, n: int = 40, seed: int = 0) -> Path:
    """Samples next to training data (when the run has them): image grids for images, rows as
    images for binary sequences, else a scatter of the first two dimensions."""
    generator = torch.Generator().manual_seed(seed)
    dataset = run.dataset
    if dataset.is_image:
        n = 36
    samples = ancestral_sample(run.diffusion, run.model, (n, *dataset.event_shape), generator)
    panels = [(dataset.train[:n], "training data")] * (len(dataset.train) > 0) + [(samples, "samples")]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.5 if not dataset.is_image else 5.2),
                             squeeze=False)
    for ax, (x, title) in zip(axes[0], panels):
        if dataset.is_image:
            images = dataset.from_model(x) if torch.is_tensor(x) else x
            ax.imshow(image_grid(dataset.grey_levels(images)), cmap="gray", vmin=0, vmax=255)
            ax.axis("off")
        else:
            x = dataset.to_model(x).numpy() if not torch.is_tensor(x) else x.numpy()
            if dataset.binary:
                ax.imshow(x, cmap="gray_r", aspect="auto", interpolation="nearest")
                ax.set_xlabel("dimension")
                ax.set_ylabel("example")
            else:
                ax.scatter(x[:, 0], x[:, 1 if x.shape[1] > 1 else 0], s=4)
        ax.set_title(title)
    fig.tight_layout()
    return save_figure(fig, path)


def bound_terms(evaluation: dict, path: Path) -> Path:
    """Per-timestep loss terms of the bound (bits): KL at t = 2..T, with the decoder and prior terms;
    beside them, when the evaluation has them, each reverse kernel's entropy between the paper's
    bounds on H_q(X_{t-1}|X_t) (:func:`entropy_panel`)."""
    terms = np.asarray(evaluation["per_timestep_bits"])
    T = len(terms) - 1
    entropy = evaluation.get("entropy")
    fig, axes = plt.subplots(1, 2 if entropy else 1, figsize=(14 if entropy else 7, 4), squeeze=False)
    ax = axes[0, 0]
    ax.plot(np.arange(2, T + 1), terms[1:T], marker="." if T <= 100 else None)
    ax.set_xlabel("t")
    ax.set_ylabel("E KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t))  [bits]")
    ax.set_yscale("log")
    ax.set_title(f"{evaluation['experiment']}: K = {evaluation['K_bits']:.3f}{plus_minus(evaluation['stderr_bits'], '.3f')} bits; "
                 f"decoder {-terms[0]:.3f}, prior KL {terms[T]:.4f} bits", fontsize=9)
    if entropy:
        entropy_panel(entropy, axes[0, 1])
    fig.tight_layout()
    return save_figure(fig, path)


def entropy_panel(entropy: dict, ax) -> None:
    """The learned kernel's entropy per step (with 3 standard errors) between the paper's lower and
    upper bounds on H_q(X_{t-1}|X_t), all drawn relative to the upper bound (bits per example: the
    band is narrow next to the entropies themselves), the steps outside the bounds in red."""
    steps = entropy["per_step"]
    t = np.array([s["t"] for s in steps])
    column = {key: np.array([s[key] for s in steps]) for key in ("lower_bits", "upper_bits", "kernel_bits", "kernel_stderr_bits")}
    upper = column["upper_bits"]
    ax.fill_between(t, column["lower_bits"] - upper, 0 * upper, color="C0", alpha=0.25,
                    label="paper's bounds on H_q(X_{t-1}|X_t)")
    ax.axhline(0, color="C0", lw=0.8)
    ax.errorbar(t, column["kernel_bits"] - upper, yerr=3 * column["kernel_stderr_bits"], color="k", lw=0.8, ms=2,
                marker="." if len(t) <= 100 else None, label="learned kernel H_p(X_{t-1}|x_t), E over q(x_t) (3 s.e.)")
    out = np.array([s["outside"] for s in steps])
    if out.any():
        ax.scatter(t[out], column["kernel_bits"][out] - upper[out], color="red", s=14, zorder=3, label="outside the bounds")
    ax.set_xlabel("t")
    ax.set_ylabel(f"entropy - upper bound H_q(X_t|X_{{t-1}})  [{entropy['unit']}]", fontsize=8)
    ax.legend(fontsize=7, loc="lower left")
    largest = (f" (largest excursion {entropy['largest_excursion_bits']:+.3g} bits at t = {entropy['largest_excursion_t']})"
               if entropy["n_outside"] else "")
    ax.set_title(f"kernel entropy: {entropy['n_outside']} of {entropy['n_steps']} steps outside the bounds{largest}", fontsize=9)
