"""The exact log-likelihood of a diffusion model through its probability-flow ODE (Song, Sohl-Dickstein,
Kingma, Kumar, Ermon and Poole, ICLR 2021, "Score-Based Generative Modeling through Stochastic
Differential Equations", Eq. 39 and appendix D.2).

The process (through the contract, :class:`thermodiff.process.contract.Process`) gives the ODE
dx/dg = f(x, g) of its continuous-time limit in the noise level g = -log SNR, from the data's end
g_0 to the prior's g_1. The model is x_{g_0} / alpha_0 (alpha_0^2 = sigmoid(-g_0), the signal's
scale at g_0) with x_{g_0} the flow of the prior p(x_{g_1}) back to g_0, so (Song et al., Eq. 39)

    log p(x_0) = log p(x_{g_1}) + int_{g_0}^{g_1} div f(x_g, g) dg + D log alpha_0,

with x_{g_0} = alpha_0 x_0 carried forward to x_{g_1}. The state (x_u, int div f) is
integrated by an adaptive Runge-Kutta solver of torchdiffeq (Chen et al. 2018), dopri5 by default,
with the given rtol and atol; the divergence is the trace of df/dx, exact (one backward pass per
dimension, for small D) or Hutchinson's estimate eps^T (df/dx) eps with a Rademacher eps drawn once
per example and kept along its trajectory (one backward pass; unbiased, so the standard error over
examples includes its noise).
"""

from dataclasses import dataclass
from enum import Enum

import torch
from torch import Tensor
from torchdiffeq import odeint


class Trace(str, Enum):
    """How the divergence of the drift is computed."""

    HUTCHINSON = "hutchinson"  # eps^T J eps, eps Rademacher, one per example for the whole trajectory
    EXACT = "exact"  # sum_i dJ_ii, one backward pass per dimension


#: Song et al.'s tolerances (their likelihood.py: rtol = atol = 1e-5) and solver.
RTOL = 1e-5
ATOL = 1e-5
METHOD = "dopri5"


@dataclass
class FlowLikelihood:
    """log p(x_0) per example (nats, float64) and the drift evaluations the solver made (each one
    network call and its backward passes)."""

    per_example: Tensor
    nfe: int


def divergence(drift: Tensor, x: Tensor, probe: Tensor | None) -> Tensor:
    """div f per example at ``x`` (which ``drift`` was computed from, with grad): the exact trace of
    df/dx when ``probe`` is None, else Hutchinson's probe^T (df/dx) probe."""
    if probe is not None:
        (vjp,) = torch.autograd.grad(drift, x, probe)
        return (vjp * probe).flatten(1).sum(1)
    flat = drift.flatten(1)
    trace = torch.zeros(len(x), dtype=torch.float64, device=x.device)
    for i in range(flat.shape[1]):
        (row,) = torch.autograd.grad(flat[:, i].sum(), x, retain_graph=True)
        trace += row.flatten(1)[:, i]
    return trace


def flow_log_likelihood(process, model, x0: Tensor, rtol: float = RTOL, atol: float = ATOL,
                        trace: Trace | str = Trace.HUTCHINSON, generator: torch.Generator | None = None,
                        method: str = METHOD) -> FlowLikelihood:
    """log p(x_0) per example under the probability-flow ODE of ``process`` with the network
    ``model`` (see the module docstring), the network called in ``x0``'s dtype. The tolerances
    bound the solver's local error in the batch's RMS norm over (x_gamma, int div f)."""
    trace = Trace(trace)
    times = torch.tensor(process.flow_gammas(), dtype=torch.float64, device=x0.device)
    log_scale = 0.5 * torch.nn.functional.logsigmoid(-times[0])  # log alpha at gamma_0
    start = x0.double() * log_scale.exp()
    probe = None
    if trace is Trace.HUTCHINSON:
        signs = torch.randint(0, 2, x0.shape, generator=generator, dtype=torch.float64)
        probe = (2 * signs - 1).to(x0.device)
    network = _in_dtype(model, x0.dtype)
    calls = 0

    def dynamics(gamma: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        nonlocal calls
        calls += 1
        with torch.enable_grad():
            x = state[0].detach().requires_grad_(True)
            drift = process.flow_drift(network, x, gamma)
            return drift.detach(), divergence(drift, x, probe).detach()

    with torch.no_grad():
        end, integral = odeint(dynamics, (start, torch.zeros(len(x0), dtype=torch.float64, device=x0.device)),
                               times, rtol=rtol, atol=atol, method=method)
    log_p = process.flow_prior_log_prob(end[-1]) + integral[-1] + x0[0].numel() * log_scale
    return FlowLikelihood(per_example=log_p, nfe=calls)


def _in_dtype(model, dtype: torch.dtype):
    """``model`` called with its input in ``dtype`` (the data's: the network's own), its output as it gives it."""
    return lambda x, s: model(x.to(dtype), s)
