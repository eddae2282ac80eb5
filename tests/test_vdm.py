"""VDM (vdm.py): the learned schedule is monotone with gamma(0) fixed; its prior and reconstruction
terms against torch.distributions; its chain is the 2015 definition's (the same q(x_t | x_0), the
same posteriors, KLs equal to the Gaussian KL of the kernels); the discrete-time bound of the T-step
chain approaches the continuous-time bound as T grows, both against their closed forms for Gaussian
data with the optimal noise predictor; schedule_gradient = 'variance' gives the schedule's shape the
gradient of mean(L_diffusion^2) and leaves the loss, the network's and gamma(1)'s gradients alone, and
lowers the estimate's variance; and a tiny run trains, evaluates and samples via the CLI."""

import copy
import json
import math

import numpy as np
import pytest
import torch
from conftest import TINY_TOML, assert_one_line_error, write_tiny_config
from torch.distributions import Normal, kl_divergence

from thermodiff.nets.vector import build_vector_net
from thermodiff.process.bound import exact_bound
from thermodiff.process.gaussian import GaussianDiffusion
from thermodiff.process.respace import respace
from thermodiff.process.schedules import Schedule
from thermodiff.process.vdm import VDM, NoiseSchedule, ScheduleGradient

BETA_1 = 1e-3
GAMMA_0 = math.log(BETA_1 / (1 - BETA_1))


def trained_like_schedule(seed: int = 0, end_point: bool = False) -> NoiseSchedule:
    """A learned schedule with large random weights, far from its initial line."""
    torch.manual_seed(seed)
    g = NoiseSchedule(GAMMA_0, 5.0, learn=True, features=16, end_point=end_point)
    with torch.no_grad():
        for p in g.parameters():
            p.copy_(3 * torch.randn_like(p))
    return g


@pytest.mark.parametrize("end_point", [False, True])
def test_learned_schedule_is_increasing_with_gamma_0_fixed(end_point):
    g = trained_like_schedule(end_point=end_point)
    s = torch.linspace(0, 1, 2001, dtype=torch.float64)
    values, slopes = (v.detach() for v in g.with_slope(s))
    assert (values[1:] > values[:-1]).all() and (slopes > 0).all()
    torch.testing.assert_close(slopes[1:-1], (values[2:] - values[:-2]) / (s[2:] - s[:-2]), rtol=1e-3, atol=0)
    assert float(values[0]) == pytest.approx(GAMMA_0, abs=1e-12)
    if end_point:  # gamma(1) is gamma_0 + |span|, whatever the network's shape
        assert float(values[-1]) == pytest.approx(GAMMA_0 + float(g.span.detach().abs()), abs=1e-12)
    # and a gradient step leaves gamma(0) where it was
    opt = torch.optim.SGD(g.parameters(), lr=1.0)
    (g(torch.rand(64, dtype=torch.float64)) ** 2).sum().backward()
    opt.step()
    assert float(g(torch.zeros(1)).detach()) == pytest.approx(GAMMA_0, abs=1e-12)


def test_prior_and_reconstruction_terms_against_torch_distributions():
    vdm = VDM(10, "learned", BETA_1)
    x = torch.randn(50, 3, dtype=torch.float64)
    g0, g1 = vdm.gamma(torch.zeros(1)), vdm.gamma(torch.ones(1))
    alpha_1, sigma_1 = torch.sigmoid(-g1).sqrt(), torch.sigmoid(g1).sqrt()
    expected = kl_divergence(Normal(alpha_1 * x, sigma_1), Normal(0.0, 1.0)).sum(1)
    torch.testing.assert_close(vdm.prior_kl(x), expected.detach())
    # reconstruction: p(x | z_0) = N(z_0 / alpha_0, exp(gamma_0)), z_0 ~ q(z_0 | x)
    closed = vdm.decoder_log_likelihood(None, x).detach()
    torch.testing.assert_close(closed, -3 * Normal(0.0, (g0 / 2).exp()).entropy().expand(50).detach())
    z0 = vdm.diffuse(x, g0.expand(50), torch.randn(4000, 50, 3, dtype=torch.float64)).detach()
    alpha_0 = torch.sigmoid(-g0).sqrt().detach()
    draws = Normal(z0 / alpha_0, (g0.detach() / 2).exp()).log_prob(x).sum(-1)
    assert ((draws.mean(0) - closed).abs() < 5 * draws.std(0) / math.sqrt(len(draws))).all()  # 5 standard errors


def test_chain_is_a_2015_gaussian_chain_with_the_induced_betas():
    """Same q(x_t | x_0) and q(x_{t-1} | x_t, x_0) as GaussianDiffusion with the chain's betas, and
    every reverse KL equal to the Gaussian KL of the two kernels."""
    T = 12
    vdm = VDM(T, "learned", BETA_1)
    vdm.gamma = trained_like_schedule()
    chain = GaussianDiffusion(Schedule(vdm.betas().detach()))
    x0 = torch.randn(40, 2, dtype=torch.float64)
    net = build_vector_net("mlp", 2, 1, T, 16, 2, "tanh", "bumps", 5).double()
    for t in (2, 5, T):
        tt = torch.full((40,), t)
        noise = torch.randn(40, 2, dtype=torch.float64)
        z = vdm.q_sample(x0, tt, noise=noise)
        torch.testing.assert_close(z, chain.q_sample(x0, tt, noise=noise))
        for a, b in zip(vdm.q_posterior(x0, z, tt), chain.q_posterior(x0, z, tt)):
            torch.testing.assert_close(a, b.detach())
        mean_q, var_q = vdm.q_posterior(x0, z, tt)
        mean_p, var_p = vdm.step_distribution(net, z, t)
        kl = kl_divergence(Normal(mean_q, var_q.sqrt()), Normal(mean_p, var_p.sqrt())).sum(1)
        torch.testing.assert_close(vdm.reverse_kl(net, x0, tt, noise=noise), kl)
    torch.testing.assert_close(vdm.prior_kl(x0), chain.prior_kl(x0).detach())


class OptimalEps(torch.nn.Module):
    """E[eps | z_s] for data x ~ N(0, v I): sigma_s z / (alpha_s^2 v + sigma_s^2), at continuous time s.
    Like a network, it reads the schedule without passing gradients to it."""

    def __init__(self, vdm: VDM, v: float):
        super().__init__()
        self.vdm, self.v = vdm, v

    def forward(self, z: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        assert s.is_floating_point()
        g = self.vdm.gamma(s).detach()[:, None]
        eps = torch.sigmoid(g).sqrt() * z / (torch.sigmoid(-g) * self.v + torch.sigmoid(g))
        return eps[:, None].to(z.dtype)


def diffusion_loss_closed_form(gammas: torch.Tensor, v: float, dim: int, continuous: bool) -> float:
    """E over x ~ N(0, v I) and eps of the diffusion loss with the optimal predictor, whose error
    E||eps - eps_hat||^2 = D v / (v + exp(gamma)): continuous time 0.5 D int v / (v + e^g) dg =
    0.5 D [g - log(v + e^g)] between the end points; discrete 0.5 sum expm1(dg) D v / (v + e^{g_u})."""
    if continuous:
        f = lambda g: float(g - torch.log(v + g.exp()))  # noqa: E731
        return 0.5 * dim * (f(gammas[-1]) - f(gammas[0]))
    g_s, g_u = gammas[:-1], gammas[1:]
    return float(0.5 * dim * (torch.expm1(g_u - g_s) * v / (v + g_u.exp())).sum())


def test_discrete_bound_approaches_continuous_bound_as_T_grows():
    torch.manual_seed(0)
    v, dim, n = 0.5, 2, 4000
    vdm = VDM(2, "linear", BETA_1)
    net = OptimalEps(vdm, v)
    x0 = math.sqrt(v) * torch.randn(n, dim)
    end_terms = float((vdm.decoder_log_likelihood(None, x0) - vdm.prior_kl(x0)).mean())
    cont = vdm.continuous_bound(net, [x0], n_draws=8, generator=torch.Generator().manual_seed(1))
    cont_exact = -diffusion_loss_closed_form(vdm.gamma(torch.linspace(0, 1, 2)), v, dim, continuous=True)
    assert abs(cont.mean - end_terms - cont_exact) < 4 * cont.stderr
    gaps = []
    for T in (3, 30, 300):
        vdm.T = T
        chain = exact_bound(vdm, net, [x0], n_draws=1, generator=torch.Generator().manual_seed(T))
        exact = -diffusion_loss_closed_form(vdm.gamma(vdm.times(torch.arange(1, T + 1))), v, dim, continuous=False)
        assert abs(chain.mean - end_terms - exact) < 4 * chain.stderr + 1e-9, T
        gaps.append(cont_exact - exact)
        assert exact <= cont_exact  # more steps, a tighter bound (VDM sec. 4.1)
    assert gaps[0] > gaps[1] > gaps[2] and gaps[2] < 0.02 * abs(cont_exact)
    # and the estimates themselves: T = 300 agrees with continuous time within their errors
    assert abs(chain.mean - cont.mean) < 4 * math.hypot(chain.stderr, cont.stderr) + gaps[2]


def test_variance_gradient_is_that_of_the_mean_squared_diffusion_loss():
    """One batch and one set of draws, schedule_gradient 'variance' against 'bound' on the same
    schedule: the same loss and K, bit for bit; the same gradients for the network and for gamma(1)
    (the span); for the shape's parameters, autograd's gradient of mean(L_diffusion^2), not the bound's."""
    T = 10
    torch.manual_seed(0)
    variance = VDM(T, "learned", BETA_1, "variance")
    with torch.no_grad():
        for p in variance.gamma.parameters():  # far from the initial line, the span included
            p.copy_(p + torch.randn_like(p))
    bound = copy.deepcopy(variance)
    bound.schedule_gradient = ScheduleGradient.BOUND
    net = build_vector_net("mlp", 2, 1, T, 16, 2, "tanh", "bumps", 5).double()
    x0 = torch.randn(64, 2, dtype=torch.float64)
    draws = variance.training_draws(x0, torch.Generator().manual_seed(1))

    def step(vdm: VDM):
        net.zero_grad()
        loss, k = vdm.training_loss(net, x0, draws)
        loss.backward()
        return loss.detach(), k, [p.grad.clone() for p in net.parameters()], dict(vdm.gamma.named_parameters())

    loss_v, k_v, net_v, schedule_v = step(variance)
    loss_b, k_b, net_b, schedule_b = step(bound)
    assert torch.equal(loss_v, loss_b) and torch.equal(k_v, k_b)
    for a, b in zip(net_v, net_b):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(schedule_v["span"].grad, schedule_b["span"].grad)
    shape = ("slope", "w2", "b2", "w3")
    squared = (bound.diffusion_loss(net, x0, draws.s, draws.noise) ** 2).mean()
    expected = torch.autograd.grad(squared, [schedule_b[name] for name in shape])
    for name, e in zip(shape, expected):
        torch.testing.assert_close(schedule_v[name].grad, e, rtol=1e-9, atol=1e-12 * float(e.abs().max()))
        assert (schedule_v[name].grad - schedule_b[name].grad).abs().max() > 0.1 * e.abs().max(), name


def test_variance_gradient_lowers_the_estimate_variance_and_keeps_the_bound():
    """Gaussian data and the optimal predictor: 150 Adam steps on the schedule alone in 'variance' mode
    cut the per-example variance of the one-draw continuous-time diffusion loss (by ~45% here; 'bound'
    mode, whose expected gradient for the shape is 0, changes it by ~+5%), and the continuous-time bound
    still agrees with its closed form at the schedule's end points, within Monte Carlo error."""
    torch.manual_seed(0)
    v, dim = 0.5, 2
    vdm = VDM(2, "learned", BETA_1, "variance")
    net = OptimalEps(vdm, v)
    x_eval = math.sqrt(v) * torch.randn(10000, dim, dtype=torch.float64)

    def measure() -> float:
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            s = torch.rand(len(x_eval), generator=gen, dtype=torch.float64)
            loss = vdm.diffusion_loss(net, x_eval, s, torch.randn(x_eval.shape, generator=gen, dtype=torch.float64))
            cont = vdm.continuous_bound(net, [x_eval], generator=gen)
            end_terms = float((vdm.decoder_log_likelihood(None, x_eval) - vdm.prior_kl(x_eval)).mean())
            exact = end_terms - diffusion_loss_closed_form(vdm.gamma(torch.linspace(0, 1, 2)), v, dim, continuous=True)
        assert abs(cont.mean - exact) < 4 * cont.stderr
        return float(loss.var())

    before = measure()
    opt = torch.optim.Adam(vdm.gamma.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(2)
    for _ in range(150):
        x0 = math.sqrt(v) * torch.randn(128, dim, generator=gen, dtype=torch.float64)
        loss, _ = vdm.training_loss(net, x0, vdm.training_draws(x0, gen))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert measure() < 0.75 * before
    assert float(vdm.gamma(torch.zeros(1)).detach()) == pytest.approx(GAMMA_0, abs=1e-12)


def test_network_time_float_matches_integer_steps_and_per_step_refuses_it():
    T = 9
    net = build_vector_net("mlp", 2, 1, T, 8, 1, "tanh", "bumps", 4)
    x = torch.randn(T, 2)
    steps = torch.arange(1, T + 1)
    torch.testing.assert_close(net(x, steps), net(x, (steps - 1).double() / (T - 1)))
    per_step = build_vector_net("rbf", 2, 2, T, 4, readout="per_step")
    with pytest.raises(ValueError, match="bumps"):
        per_step(x, torch.rand(T, dtype=torch.float64))


VDM_TOML = TINY_TOML.replace('kind = "auto"', 'kind = "vdm"').replace('schedule = "reference"', 'schedule = "learned"\nbeta_1 = 1e-4') \
    .replace('parameterization = "reference"\n', '') \
    .replace('hidden = 8', 'hidden = 8\nreadout = "bumps"\nn_basis = 4')


def test_vdm_run_trains_evaluates_and_samples(cli, tmp_path):
    config = write_tiny_config(tmp_path, VDM_TOML)
    run = tmp_path / "run"
    assert cli("train", config, "--out", run, "--quiet").rc == 0
    r = cli("evaluate", run, "--json", "--quiet").json()
    assert r["diffusion"] == "VDM" and r["parameterization"] == "eps" and r["T"] == 6
    assert r["beta_1"] == pytest.approx(1e-4)
    c = r["continuous_time"]
    assert math.isfinite(r["K_bits"]) and math.isfinite(c["K_bits"]) and c["stderr_bits"] > 0
    assert len(r["per_timestep_bits"]) == 7 and len(c["terms_bits"]) == 3
    out = tmp_path / "s.npy"
    assert cli("sample", run, "-n", 7, "--out", out, "--quiet").rc == 0
    respaced = cli("evaluate", run, "--respace", 3, "--json", "--quiet").json()  # its own chain on 3 of the 6 times
    assert respaced["T"] == 3 and len(respaced["per_timestep_bits"]) == 4 and math.isfinite(respaced["K_bits"])
    assert respaced["respaced_timesteps"] == [1, 3, 6]
    assert cli("sample", run, "-n", 5, "--respace", 3, "--out", tmp_path / "r.npy", "--quiet").rc == 0
    np.save(tmp_path / "y.npy", np.load(out)[:2])
    for method in ("start", "product"):
        assert cli("denoise", run, "--input", tmp_path / "y.npy", "--sigma", 0.3, "-n", 2, "--method", method,
                   "--out", tmp_path / f"{method}.npz", "--quiet").rc == 0
    assert cli("plot", run, "--quiet").rc == 0 and (run / "conditional.png").exists()
    saved = json.loads((run / "config.json").read_text())
    assert saved["diffusion"]["kind"] == "vdm" and saved["diffusion"]["parameterization"] == "eps"


def test_vdm_config_errors_are_one_line(cli, tmp_path):
    per_step = write_tiny_config(tmp_path, VDM_TOML.replace('readout = "bumps"', 'readout = "per_step"'))
    assert_one_line_error(cli("train", per_step, "--out", tmp_path / "a"), "readout = 'bumps'")
    wrong = write_tiny_config(tmp_path, VDM_TOML.replace('schedule = "learned"', 'schedule = "cosine"'))
    assert_one_line_error(cli("train", wrong, "--out", tmp_path / "b"), "vdm", "schedule")
    for name, toml in (("c", VDM_TOML), ("d", TINY_TOML), ("e", VDM_TOML.replace('"learned"', '"linear"'))):
        value = "varience" if name == "c" else "variance"
        bad = write_tiny_config(tmp_path, toml.replace("[diffusion]", f'[diffusion]\nschedule_gradient = "{value}"'))
        assert_one_line_error(cli("train", bad, "--out", tmp_path / name), "schedule_gradient")


def test_vdm_variance_run_trains_and_reloads(cli, tmp_path):
    config = write_tiny_config(tmp_path, VDM_TOML.replace("[diffusion]", '[diffusion]\nschedule_gradient = "variance"'))
    run = tmp_path / "run"
    assert cli("train", config, "--out", run, "--quiet").rc == 0
    r = cli("evaluate", run, "--json", "--quiet").json()
    assert math.isfinite(r["K_bits"]) and math.isfinite(r["continuous_time"]["K_bits"])
    assert json.loads((run / "config.json").read_text())["diffusion"]["schedule_gradient"] == "variance"


def test_respaced_vdm_is_its_own_chain_on_the_kept_times():
    """Continuous time makes respacing exact: N evenly spaced steps of a T-step VDM are the same
    model's N-step chain (same betas, same exact bound with the same draws), all T steps are the
    chain itself, and an explicit list of steps sits at those steps' times."""
    torch.manual_seed(3)
    v, dim = 0.5, 2
    vdm = VDM(31, "learned", BETA_1)
    vdm.gamma = trained_like_schedule(4)
    net = OptimalEps(vdm, v)
    x0 = math.sqrt(v) * torch.randn(200, dim)

    def bound(chain) -> float:
        return exact_bound(chain, net, [x0], n_draws=1, generator=torch.Generator().manual_seed(5)).mean

    full = respace(vdm, 31)
    torch.testing.assert_close(full.betas(), vdm.betas(), rtol=0, atol=0)
    assert bound(full) == bound(vdm)
    short, same = respace(vdm, 7), copy.copy(vdm)
    same.T = 7  # steps 1, 6, 11, ..., 31 of 31 are the times of a 7-step chain
    torch.testing.assert_close(short.betas(), same.betas(), rtol=1e-12, atol=0)
    assert bound(short) == pytest.approx(bound(same), rel=1e-12)
    listed = respace(vdm, "1,2,10,31")
    torch.testing.assert_close(listed.times(torch.arange(1, 5)), torch.tensor([0, 1, 9, 30], dtype=torch.float64) / 30)
    assert vdm.T == 31 and vdm.step_times is None  # the trained chain is untouched
