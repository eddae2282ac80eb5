"""The mixture of conditional Gaussian scale mixtures (MCGSM; Theis, Hosseini and Bethge 2012,
"Mixtures of conditional Gaussian scale mixtures applied to multiscale image representations",
PLoS ONE 7(7): e39857): the model the paper's Table 2 sets against diffusion on dead leaves,
trained and scored here on the same splits and in the same units as a diffusion run.

An autoregressive model of grey images: in raster order, each pixel y is drawn given the causal
neighbourhood x of the pixels before it (``radius`` rows above, ``radius`` columns either side,
and ``radius`` pixels to its left; outside the image x holds 0, the scaled data's mean), from a
mixture over components c and scales s:

    p(c, s | x) proportional to exp(eta_cs - exp(alpha_cs) / 2 * sum_n beta_cn^2 (b_n . x)^2)
    p(y | x, c, s) = N(y; a_c . x, 1 / (exp(alpha_cs) rho_c))

the factorised form of the gate's precision matrices, K_c = sum_n beta_cn^2 b_n b_n^T, with
``features`` shared directions b_n. The product of the conditionals over the pixels is a
normalised density of the image, so its log-likelihood is exact: not a bound like K, and scored
on the same dequantised, scaled test images it says how far below an autoregressive model's
likelihood K is.

As with the other baselines (baselines.py), :class:`MCGSMNet` holds the parameters and
:class:`MCGSM` the math: the likelihood, the training loss and sampling as a one-step chain
(the prior draw is the Gaussian noise of every pixel, ``p_sample`` runs the raster scan).
"""

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from thermodiff.errors import UserError
from thermodiff.process.contract import Trainable
from thermodiff.process.distributions import standard_normal_log_prob
from thermodiff.process.tensors import sum_except_batch


def causal_size(radius: int) -> int:
    """Pixels in the causal neighbourhood of ``radius``: ``radius`` full rows of 2 radius + 1 above,
    ``radius`` to the left."""
    return radius * (2 * radius + 1) + radius


class MCGSMNet(nn.Module):
    """The MCGSM's parameters, and its conditional at every pixel from causal neighbourhoods."""

    def __init__(self, event_shape: tuple[int, ...], radius: int, components: int, scales: int, features: int):
        super().__init__()
        if len(event_shape) != 3 or event_shape[0] != 1:
            raise ValueError(f"the MCGSM models grey images (1, H, W), got examples of shape {tuple(event_shape)}")
        if min(radius, components, scales, features) < 1:
            raise ValueError("the MCGSM needs radius, components, scales and features of at least 1")
        self.event_shape, self.radius = tuple(event_shape), radius
        m = causal_size(radius)
        self.predictors = nn.Parameter(torch.randn(m, components) / m)  # a_c as columns
        self.directions = nn.Parameter(torch.randn(m, features) / math.sqrt(m))  # b_n
        self.weights = nn.Parameter(torch.randn(components, features) / math.sqrt(features))  # beta
        self.log_priors = nn.Parameter(torch.zeros(components, scales))  # eta
        # scales spread over a factor e^2 either way, so that they start apart
        self.log_scales = nn.Parameter(torch.linspace(-2, 2, scales).repeat(components, 1)
                                       + 0.1 * torch.randn(components, scales))  # alpha
        self.log_precisions = nn.Parameter(torch.zeros(components))  # log rho

    def neighbourhoods(self, images: Tensor) -> Tensor:
        """(N, H W, M): each pixel's causal neighbourhood in raster order, zeros outside the image."""
        r = self.radius
        padded = F.pad(images, (r, r, r, 0))
        windows = F.unfold(padded, (r + 1, 2 * r + 1))  # (N, (r + 1)(2r + 1), H W), row-major in the window
        return windows[:, :causal_size(r)].transpose(1, 2)  # the rows above, then the pixels to the left

    def window(self, padded: Tensor, i: int, j: int) -> Tensor:
        """(N, M): the causal neighbourhood of pixel (i, j) from a canvas padded as :meth:`neighbourhoods` pads."""
        r = self.radius
        return padded[:, 0, i:i + r + 1, j:j + 2 * r + 1].flatten(1)[:, :causal_size(r)]

    def conditional(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """For neighbourhoods ``x`` (..., M): log p(c, s | x) (..., C, S), the means a_c . x (..., C)
        and the log-precisions alpha_cs + log rho_c (C, S)."""
        energy = (x @ self.directions) ** 2 @ (self.weights ** 2).T  # (..., C): x' K_c x
        gate = self.log_priors - 0.5 * self.log_scales.exp() * energy[..., None]
        log_gate = gate.flatten(-2).log_softmax(-1).unflatten(-1, gate.shape[-2:])
        return log_gate, x @ self.predictors, self.log_scales + self.log_precisions[:, None]


class MCGSM(Trainable):
    """The MCGSM's likelihood, training loss and sampling (the network: :class:`MCGSMNet`)."""

    T = 1  # a one-step chain: the prior draw is each pixel's noise, p_sample the raster scan

    def pixel_log_prob(self, model: MCGSMNet, x: Tensor, y: Tensor) -> Tensor:
        """log p(y | x) per pixel (float64), for neighbourhoods ``x`` (..., M) and pixels ``y`` (...)."""
        log_gate, means, log_precision = (v.double() for v in model.conditional(x))
        residual = (y.double()[..., None] - means)[..., None]  # (..., C, 1)
        log_normal = 0.5 * (log_precision - math.log(2 * math.pi) - log_precision.exp() * residual ** 2)
        return torch.logsumexp((log_gate + log_normal).flatten(-2), -1)

    def log_likelihood(self, model: MCGSMNet, images: Tensor) -> Tensor:
        """log p(image) per image (nats, float64): the sum of every pixel's conditional."""
        return self.pixel_log_prob(model, model.neighbourhoods(images), images.flatten(1)).sum(-1)

    def null_log_likelihood(self, x0: Tensor) -> Tensor:
        """L_null as for the diffusion models of continuous data: N(0, I) on the scaled data."""
        return sum_except_batch(standard_normal_log_prob(x0.double()))

    def training_draws(self, x0: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return torch.empty((len(x0), 0), device=x0.device)  # nothing random: the likelihood is exact

    def training_loss(self, model, x0: Tensor, draws: Tensor) -> tuple[Tensor, Tensor]:
        """(-mean log-likelihood, log-likelihood per example detached), in nats."""
        ll = self.log_likelihood(model, x0)
        return -ll.mean(), ll.detach()

    def sample_prior(self, shape: tuple[int, ...], generator: torch.Generator | None = None, device=None) -> Tensor:
        """The standard Gaussian noise of every pixel, which :meth:`p_sample` scales into the image."""
        return torch.randn(shape, generator=generator, device=device)

    @torch.no_grad()
    def p_sample(self, model: MCGSMNet, noise: Tensor, t: int, generator: torch.Generator | None = None,
                 factor=None) -> Tensor:
        """An image drawn pixel by pixel in raster order: (c, s) from the gate of the neighbourhood
        drawn so far, then y = a_c . x + noise / sqrt(exp(alpha_cs) rho_c)."""
        if factor is not None:
            raise UserError("an MCGSM cannot multiply its conditionals by a factor; posterior sampling needs a "
                            "diffusion run")
        r, (_, height, width) = model.radius, noise.shape[1:]
        padded = F.pad(torch.zeros_like(noise), (r, r, r, 0))
        for i in range(height):
            for j in range(width):
                log_gate, means, log_precision = model.conditional(model.window(padded, i, j))
                pick = torch.multinomial(log_gate.flatten(1).exp(), 1)[:, 0]
                c, s = pick // log_gate.shape[-1], pick % log_gate.shape[-1]
                std = (-0.5 * log_precision[c, s]).exp()
                padded[:, 0, i + r, j + r] = means.gather(1, c[:, None])[:, 0] + std * noise[:, 0, i, j]
        return padded[:, :, r:, r:-r].clone()
