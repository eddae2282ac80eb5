"""Baselines from the source material, trained and measured like the diffusion models (same
splits, same units): a variational auto-encoder (Kingma and Welling 2014), whose ELBO is a lower
bound on the log-likelihood as K is, and a denoising auto-encoder (Vincent et al. 2008), for the
denoising comparison at SNR 1 (paper Fig. 3). The lecture among the sources introduces both (and
warns that a DAE trained on the squared error outputs E[x | y], which may be unlikely under
p(x | y)); the talk names VAEs among the models in which multiplying distributions is hard.

As with a diffusion process, each class here is the math (objective, bound, sampling) and the
network a separate module (``model``): MLPs on flattened examples (:class:`VAENet`,
:class:`DenoiserNet`, built from ``[model]`` by experiment.build_model), so they take vectors and
images alike. Both implement the training side of the process contract
(:class:`thermodiff.process.contract.Trainable`: ``training_draws`` / ``training_loss``), and the VAE
samples as a one-step chain (:class:`thermodiff.process.contract.Chain`); evaluation.evaluate_baseline
reports them.
"""

import math

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from thermodiff.data.images import psnr_db
from thermodiff.errors import UserError
from thermodiff.nets.vector import mlp
from thermodiff.process.bound import standard_error
from thermodiff.process.contract import Trainable
from thermodiff.process.distributions import (
    bernoulli_log_prob,
    gaussian_kl,
    gaussian_log_prob,
    standard_normal_log_prob,
)
from thermodiff.process.tensors import sum_except_batch


def mlp_map(n_in: int, n_out: int, hidden: int, layers: int, activation: str) -> nn.Sequential:
    """``layers`` hidden layers (networks.mlp), then a linear map to ``n_out``."""
    return nn.Sequential(*mlp(n_in, hidden, layers, activation), nn.Linear(hidden if layers else n_in, n_out))


class VAENet(nn.Module):
    """Encoder x -> (mean, log variance) of q(z | x), shape (N, 2, latent); decoder z -> the
    parameters of p(x | z), shape (N, K, *event_shape)."""

    def __init__(self, event_shape: tuple[int, ...], latent: int, outputs_per_dim: int, hidden: int, layers: int,
                 activation: str):
        super().__init__()
        self.event_shape, self.latent, self.outputs_per_dim = tuple(event_shape), latent, outputs_per_dim
        dim = math.prod(event_shape)
        self.encoder = mlp_map(dim, 2 * latent, hidden, layers, activation)
        self.decoder = mlp_map(latent, outputs_per_dim * dim, hidden, layers, activation)

    def encode(self, x: Tensor) -> Tensor:
        return self.encoder(x.flatten(1)).unflatten(1, (2, self.latent))

    def decode(self, z: Tensor) -> Tensor:
        return self.decoder(z).unflatten(1, (self.outputs_per_dim, *self.event_shape))


class DenoiserNet(nn.Module):
    """y -> x_hat, an MLP on the flattened example."""

    def __init__(self, event_shape: tuple[int, ...], hidden: int, layers: int, activation: str):
        super().__init__()
        self.event_shape = tuple(event_shape)
        dim = math.prod(event_shape)
        self.net = mlp_map(dim, dim, hidden, layers, activation)

    def forward(self, y: Tensor) -> Tensor:
        return self.net(y.flatten(1)).unflatten(1, self.event_shape)


class VAE(Trainable):
    """p(z) = N(0, I); p(x | z) Bernoulli for binary data, else Gaussian with variance
    min_var + softplus(.) per entry (min_var: the bound's resolution, as beta_1 is the diffusion's;
    without a floor the density of data on a curve grows without limit); q(z | x) = N(mean, diag var).
    A one-step latent chain: ``T`` = 1, so ancestral_sample draws z ~ p(z), then x ~ p(x | z)."""

    T = 1

    def __init__(self, latent: int, bernoulli: bool, min_var: float = 1e-6, n_importance: int = 64,
                 null_p: float | None = None):
        super().__init__()
        if latent < 1 or n_importance < 1 or not min_var >= 0:
            raise ValueError("vae: latent and n_importance must be at least 1 and min_var >= 0")
        if bernoulli and not (null_p is not None and 0 < null_p < 1):
            raise ValueError("vae: binary data need a mean activity in (0, 1) for the null model")
        self.latent, self.bernoulli, self.min_var, self.n_importance, self.null_p = latent, bernoulli, min_var, n_importance, null_p
        self.outputs_per_dim = 1 if bernoulli else 2

    def log_likelihood(self, x: Tensor, out: Tensor) -> Tensor:
        """log p(x | z) per example from the decoder's output ``out`` (N, K, ...)."""
        out = out.double()
        if self.bernoulli:
            return -sum_except_batch(F.binary_cross_entropy_with_logits(out[:, 0], x.double(), reduction="none"))
        return sum_except_batch(gaussian_log_prob(x.double(), out[:, 0], self.min_var + F.softplus(out[:, 1])))

    def posterior(self, model, x: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and variance of q(z | x), float64."""
        q = model.encode(x).double()
        return q[:, 0], q[:, 1].exp()

    def elbo(self, model, x: Tensor, noise: Tensor) -> Tensor:
        """The evidence lower bound per example (Kingma and Welling 2014, Eq. 10):
        E_q log p(x | z) - KL(q(z | x) || p(z)), one reparameterised draw z = mean + sqrt(var) noise,
        the KL in closed form."""
        mean, var = self.posterior(model, x)
        z = mean + var.sqrt() * noise
        kl = sum_except_batch(gaussian_kl(mean, var, torch.zeros_like(mean), torch.ones_like(var)))
        return self.log_likelihood(x, model.decode(z.to(x.dtype))) - kl

    def importance_weighted_bound(self, model, x: Tensor, k: int, generator: torch.Generator | None = None) -> Tensor:
        """log (1/k) sum_j p(x, z_j) / q(z_j | x), z_j ~ q(z | x), per example (Burda et al. 2016,
        Eq. 8): a bound between the ELBO (k = 1) and log p(x), tighter as k grows."""
        mean, var = self.posterior(model, x)
        log_w = []
        for _ in range(k):
            z = mean + var.sqrt() * torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
            log_prior = sum_except_batch(standard_normal_log_prob(z))
            log_w.append(self.log_likelihood(x, model.decode(z.to(x.dtype))) + log_prior
                         - sum_except_batch(gaussian_log_prob(z, mean, var)))
        return torch.logsumexp(torch.stack(log_w), 0) - math.log(k)

    def null_log_likelihood(self, x0: Tensor) -> Tensor:
        """L_null as for the diffusion models: independent Bernoulli at the training data's mean
        activity for binary data, N(0, I) on the scaled data otherwise."""
        x = x0.double()
        if self.bernoulli:
            return sum_except_batch(bernoulli_log_prob(x, torch.full_like(x, self.null_p)))
        return sum_except_batch(standard_normal_log_prob(x))

    def training_draws(self, x0: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return torch.randn((len(x0), self.latent), generator=generator, device=x0.device, dtype=torch.float64)

    def training_loss(self, model, x0: Tensor, draws: Tensor) -> tuple[Tensor, Tensor]:
        """(-mean ELBO, ELBO per example detached), in nats."""
        k = self.elbo(model, x0, draws)
        return -k.mean(), k.detach()

    def sample_prior(self, shape: tuple[int, ...], generator: torch.Generator | None = None, device=None) -> Tensor:
        """z ~ N(0, I) for shape[0] examples."""
        return torch.randn((shape[0], self.latent), generator=generator, device=device)

    def p_sample(self, model, z: Tensor, t: int, generator: torch.Generator | None = None, factor=None) -> Tensor:
        """x ~ p(x | z)."""
        if factor is not None:
            raise UserError("a VAE cannot multiply its kernels by a factor; posterior sampling needs a diffusion run")
        out = model.decode(z).double()
        if self.bernoulli:
            return torch.bernoulli(torch.sigmoid(out[:, 0]), generator=generator).float()
        noise = torch.randn(out[:, 0].shape, generator=generator, device=out.device, dtype=out.dtype)
        return (out[:, 0] + (self.min_var + F.softplus(out[:, 1])).sqrt() * noise).float()

    @torch.no_grad()
    def bounds(self, model, batches, n_draws: int = 1, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Per example: the ELBO averaged over ``n_draws`` draws of z, and the importance-weighted
        bound with ``n_importance`` samples."""
        elbo, iw = [], []
        for x in batches:
            elbo.append(sum(self.elbo(model, x, self.training_draws(x, generator)) for _ in range(n_draws)) / n_draws)
            iw.append(self.importance_weighted_bound(model, x, self.n_importance, generator))
        return torch.cat(elbo).cpu(), torch.cat(iw).cpu()


class DAE(Trainable):
    """Trained to map y = x + N(0, noise_std^2 I) (scaled data) back to x on the squared error, so
    that its output estimates E[x | y] (Vincent et al. 2008). Not a density model: no bound, no
    samples; the value logged in K's place during training is minus the squared error (nats slot)."""

    def __init__(self, noise_std: float = 1.0):
        super().__init__()
        if not noise_std > 0:
            raise ValueError(f"dae: noise_std must be positive, got {noise_std}")
        self.noise_std = noise_std

    @property
    def T(self) -> int:
        raise UserError("a denoising auto-encoder is not a generative model: it has no chain, samples or bound")

    def squared_error(self, model, x0: Tensor, noise: Tensor) -> Tensor:
        """||g(x + noise_std noise) - x||^2 per example: the denoising criterion (Vincent et al. 2008)."""
        y = x0 + self.noise_std * noise.to(x0.dtype)
        return sum_except_batch((model(y).double() - x0.double()) ** 2)

    def training_draws(self, x0: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return torch.randn(x0.shape, generator=generator, device=x0.device, dtype=torch.float64)

    def training_loss(self, model, x0: Tensor, draws: Tensor) -> tuple[Tensor, Tensor]:
        se = self.squared_error(model, x0, draws)
        return se.mean(), -se.detach()

    def noise_std_original(self, dataset) -> np.ndarray:
        """noise_std in the data's original units (grey levels for images), per dimension, broadcastable."""
        return self.noise_std / dataset.model_scale().numpy()

    @torch.no_grad()
    def denoise(self, model, dataset, noisy: np.ndarray) -> np.ndarray:
        """The output for noisy examples, both in original units (8-bit images come back as uint8)."""
        device = next(model.parameters()).device
        return dataset.from_model(model(dataset.to_model(noisy, device=device, dequantize=False)))

    def denoise_report(self, model, dataset, test: np.ndarray, seed: int = 0) -> dict:
        """``test`` (original units) plus Gaussian noise of noise_std in units of the scaled data (1
        is SNR 1 there), the output against the noisy input: mean squared error per entry in
        original units, and for 8-bit images PSNR in dB (peak 255), with standard errors."""
        truth = test.astype(np.float64)
        sigma = self.noise_std_original(dataset)
        noisy = truth + np.random.default_rng(seed).normal(size=truth.shape) * sigma
        denoised = self.denoise(model, dataset, noisy)
        report = {"noise_std_original_units": sigma.tolist()}
        for name, estimate in (("output", denoised), ("noisy_input", noisy)):
            mse = torch.from_numpy(((estimate - truth) ** 2).reshape(len(truth), -1).mean(1))
            report |= {f"{name}_mse": float(mse.mean()), f"{name}_mse_stderr": standard_error(mse)}
            if dataset.is_image:
                psnr = psnr_db(mse)
                report |= {f"{name}_psnr_db": float(psnr.mean()), f"{name}_psnr_stderr_db": standard_error(psnr)}
        return report
