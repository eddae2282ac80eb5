"""Reverse models shared by tests. An exactly solvable case: 1-D Gaussian data N(0, s^2) under
the forward process, and a reverse model whose kernels are the true reverse conditionals
q(x_{t-1} | x_t) (or, :func:`exact_eps_model`, only its exact mean). And :func:`wavy_model`, a fixed nonlinear network output for comparing two
chains or parameterisations on the same kernels."""

import math

import numpy as np
import torch


def true_reverse(betas, s):
    """q(x_{t-1} | x_t) = N(a_t x_t, r_t) for the forward process started at N(0, s^2):
    v_t = Var q(x_t), a_t = sqrt(1 - b_t) v_{t-1} / v_t, r_t = v_{t-1} - (1 - b_t) v_{t-1}^2 / v_t."""
    v = [s * s]
    for b in betas:
        v.append((1 - b) * v[-1] + b)
    a = [math.sqrt(1 - b) * v[t] / v[t + 1] for t, b in enumerate(betas)]
    r = [v[t] - (1 - b) * v[t] ** 2 / v[t + 1] for t, b in enumerate(betas)]
    return np.array(a), np.array(r), np.array(v)


def analytic_model(betas, s, parameterization):
    """A reverse model whose kernels p(x_{t-1}|x_t) are exactly q(x_{t-1}|x_t), t = 1..T."""
    T = len(betas)
    a, r, _ = true_reverse(betas, s)
    b = np.asarray(betas)
    logit = lambda v: np.log(v) - np.log1p(-v)  # noqa: E731
    if parameterization == "reference":
        # mean = x sqrt(1 - b) + z_mu sqrt(b) = a x;  var = sigmoid(z_S / sqrt(T) + logit b) = r
        mu_gain = (a - np.sqrt(1 - b)) / np.sqrt(b)
        z_sigma = math.sqrt(T) * (logit(r) - logit(b))
    else:
        # var = sigmoid(z_S + logit b) = r;  mean = x (1 - r) + z_mu r = a x
        mu_gain = (a - (1 - r)) / r
        z_sigma = logit(r) - logit(b)
    mu_gain, z_sigma = torch.tensor(mu_gain), torch.tensor(z_sigma)

    def model(x, t):
        x = x.double()
        return torch.stack([mu_gain[t - 1][:, None] * x, z_sigma[t - 1][:, None].expand_as(x)], 1)

    return model


def exact_eps_model(betas, s):
    """A noise-predicting network (the eps parameterisation) with the exact E[eps | x_t] of data
    N(0, s^2): sqrt(1 - abar_t) x_t / v_t, v_t = abar_t s^2 + 1 - abar_t (its second output unused)."""
    abar = torch.cumprod(1 - torch.tensor(betas, dtype=torch.float64), 0)
    gain = (1 - abar).sqrt() / (abar * s * s + 1 - abar)

    def model(x, t):
        x = x.double()
        return torch.stack([gain[t - 1][:, None] * x, torch.zeros_like(x)], 1)

    return model


def wavy_model(x, t):
    """z = (0.6 sin 2x + 0.05 t, 0.8 cos x - 0.5): smooth in x, varying with t, float64."""
    x = x.double()
    return torch.stack([0.6 * torch.sin(2 * x) + 0.05 * t[:, None], 0.8 * torch.cos(x) - 0.5], 1)
