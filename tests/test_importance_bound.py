"""The importance-sampled estimate of the bound (``eval.t_sampling = "importance"``): its strata,
its exactness when the pilot is proportional to every example's terms, its unbiasedness against the
exact sum on a real chain, its variance where one step dominates, and the command line."""

import math

import torch

from thermodiff import GaussianDiffusion, exact_bound, make_schedule
from thermodiff.process.bound import PILOT_EXAMPLES, TSampling, importance_strata, strata, term_profile


class ScaledTerms:
    """A stand-in process whose diffusion term at step t is scale(x_0) g(t), with no noise; prior
    and decoder terms of zero. K of an example is then -scale(x_0) sum_t g(t), known exactly."""

    def __init__(self, g: torch.Tensor):
        self.g = g.double()  # g[t - 2] for t = 2..T
        self.T = len(g) + 1

    @staticmethod
    def scale(x0: torch.Tensor) -> torch.Tensor:
        return 1 + x0.double().abs().sum(1)

    def prior_kl(self, x0):
        return torch.zeros(len(x0), dtype=torch.float64)

    def decoder_log_likelihood(self, model, x0, generator=None):
        return torch.zeros(len(x0), dtype=torch.float64)

    def reverse_kl(self, model, x0, t, generator=None):
        return self.scale(x0) * self.g[t - 2]

    def exact(self, x0: torch.Tensor) -> torch.Tensor:
        return -self.scale(x0) * self.g.sum()


def test_strata_of_equal_mass_cover_every_step_once():
    profile = torch.ones(99, dtype=torch.float64)
    profile[-1] = 100.0  # the last step weighs as much as all the others together
    groups = importance_strata(profile, 10)
    steps = torch.cat([g.steps for g in groups])
    assert torch.equal(steps, torch.arange(2, 101))  # contiguous, in order, each step once
    assert len(groups) <= 10
    for g in groups:
        torch.testing.assert_close(g.probs.sum(), torch.tensor(1.0, dtype=torch.float64))
        torch.testing.assert_close(g.probs, profile[g.steps - 2] / profile[g.steps - 2].sum())
    assert groups[-1].steps.tolist() == [100]  # the heavy step is a stratum of its own: in every example
    light = [float(profile[g.steps - 2].sum()) for g in groups[:-1]]
    assert len(light) == 8 and max(light) < 1.2 * min(light)  # the rest in strata of (nearly) equal mass
    uniform = importance_strata(torch.ones(99), 9)  # a flat profile: equal strata, uniform draws
    assert [len(g.steps) for g in uniform] == [len(g.steps) for g in strata(100, 9)]
    assert len(importance_strata(profile, 500)) == 99  # more samples than steps: the exact sum


def test_the_pilot_interpolates_log_linear_terms_exactly():
    g = torch.exp(-0.03 * torch.arange(2, 301, dtype=torch.float64))  # over 9 nats: above the floor
    process = ScaledTerms(g)
    x0 = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    profile = term_profile(process, None, x0, n_steps=20)
    torch.testing.assert_close(profile / profile.sum(), g / g.sum(), rtol=1e-9, atol=0)


def test_a_proportional_pilot_makes_every_example_exact():
    """Terms scale(x_0) g(t) with log g piecewise linear on the pilot's grid: the pilot is
    proportional to every example's terms, so each example's estimate is its exact bound."""
    g = torch.exp(-0.02 * torch.arange(2, 401, dtype=torch.float64))  # log-linear: the pilot recovers it
    process = ScaledTerms(g)
    x0 = torch.randn(30, 2, generator=torch.Generator().manual_seed(1))
    estimate = exact_bound(process, None, [x0[:12], x0[12:]], 1, torch.Generator().manual_seed(2), t_samples=20,
                           t_sampling="importance")
    assert estimate.t_sampling is TSampling.IMPORTANCE and estimate.t_samples <= 20
    torch.testing.assert_close(estimate.per_example, process.exact(x0), rtol=1e-9, atol=0)
    uniform = exact_bound(process, None, [x0], 1, torch.Generator().manual_seed(2), t_samples=20)
    assert not torch.allclose(uniform.per_example, process.exact(x0), rtol=1e-3)  # uniform draws are not exact


def test_one_heavy_step_costs_the_uniform_estimate_its_precision():
    """One step (the last, as on a cosine schedule clipped near 1) holds half of every example's
    bound: uniform strata reach it with probability 1 / 20 at a weight of 20; equal-mass strata
    draw it in every example (the pilot's log-linear interpolation next to it is what is left)."""
    g = torch.ones(399, dtype=torch.float64)
    g[-1] = 399.0
    process = ScaledTerms(g)
    x0 = torch.zeros(400, 1)  # one scale: all variation is the estimator's
    exact = process.exact(x0)
    uniform = exact_bound(process, None, [x0], 1, torch.Generator().manual_seed(3), t_samples=20)
    importance = exact_bound(process, None, [x0], 1, torch.Generator().manual_seed(3), t_samples=20,
                             t_sampling="importance")
    assert uniform.stderr > 20 * importance.stderr > 0  # the pilot's grid straddles the spike's neighbour
    for estimate in (uniform, importance):
        assert abs(estimate.mean - float(exact[0])) < 4 * estimate.stderr


def test_importance_sampled_estimate_is_unbiased_on_a_gaussian_chain():
    diffusion = GaussianDiffusion(make_schedule("log_snr", 40, 1e-3), parameterization="eps_residual")
    wavy = lambda x_t, t: torch.stack([torch.sin(3 * x_t) * t[:, None] / 40, 0.3 * torch.cos(x_t)], 1)
    x = torch.tensor([[0.5, -1.0]], dtype=torch.float64).repeat(3000, 1)
    exact = exact_bound(diffusion, wavy, [x], 1, torch.Generator().manual_seed(2))
    sampled = exact_bound(diffusion, wavy, [x], 1, torch.Generator().manual_seed(3), t_samples=5,
                          t_sampling="importance")
    assert sampled.t_sampling is TSampling.IMPORTANCE and sampled.t_samples <= 5
    assert abs(exact.mean - sampled.mean) < 4 * math.hypot(exact.stderr, sampled.stderr)
    assert len(x) > PILOT_EXAMPLES  # the pilot sees only the first examples


def test_evaluate_takes_the_importance_estimate_from_the_command_line(cli, tmp_path):
    from conftest import assert_one_line_error, write_tiny_images

    config = write_tiny_images(tmp_path)
    run = tmp_path / "run"
    assert cli("train", config, "--out", run, "--T", 60, "--steps", 1, "--quiet").rc == 0
    r = cli("evaluate", run, "--max-examples", 4, "--t-samples", 10, "--t-sampling", "importance", "--json", "--quiet")
    assert r.rc == 0, r
    result = r.json()
    assert result["t_sampling"] == "importance" and result["t_samples"] <= 10
    assert result["estimator"].startswith(f"unbiased: {result['t_samples']} importance-sampled steps per example")
    assert math.isfinite(result["K_bits"])
    default = cli("evaluate", run, "--max-examples", 4, "--t-samples", 10, "--json", "--quiet").json()
    assert default["t_sampling"] == "importance"  # the default (eval.t_sampling)
    assert_one_line_error(cli("evaluate", run, "--t-samples", -1, "--quiet"), "--t-samples")
    assert_one_line_error(cli("evaluate", run, "--t-sampling", "sideways", "--quiet"), "--t-sampling", "importance")
