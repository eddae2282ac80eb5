"""Noise prediction (Ho et al. 2020), learned interpolated variances and the hybrid loss
(Nichol & Dhariwal 2021), importance sampling of t, and the discretised decoder for 8-bit data:
the formulas against literal transcriptions, the same K wherever two parameterisations give the
same kernels, the losses' gradients, the sampler's unbiasedness, and the decoder's normalisation."""

import json
import math

import numpy as np
import pytest
import torch

from linear_gaussian import analytic_model, wavy_model
from thermodiff import BinomialDiffusion, GaussianDiffusion, exact_bound, make_schedule, training_loss
from thermodiff.process.bound import LossAwareSampler, training_draws
from thermodiff.process.distributions import discretized_gaussian_log_prob
from thermodiff.process.gaussian import Bins
from thermodiff.process.tensors import LN2


def tables(betas):
    """abar_t, abar_{t-1} and beta-tilde_t (t = 1..T) by hand, float64 numpy."""
    b = np.asarray(betas, dtype=np.float64)
    abar = np.cumprod(1 - b)
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    return abar, abar_prev, b * (1 - abar_prev) / (1 - abar)


# ----------------------------------------------------------------------------------------------
# the kernels against Ho et al. (2020) and Nichol & Dhariwal (2021)

@pytest.mark.parametrize("parameterization, eps_variance", [("eps", None), ("eps", "beta"), ("eps_learned_var", None)])
def test_eps_kernels_match_the_published_formulas(parameterization, eps_variance):
    T, N, D = 9, 40, 3
    diffusion = GaussianDiffusion(make_schedule("cosine", T), parameterization, eps_variance=eps_variance)
    b = diffusion.schedule.betas().numpy()
    abar, _, beta_tilde = tables(b)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, D, generator=g, dtype=torch.float64)
    t = torch.arange(N) % T + 1
    z = torch.randn(N, 2, D, generator=g, dtype=torch.float64)
    mean, var = diffusion.p_mean_var(lambda *_: z, x, t)
    i = (t - 1).numpy()[:, None]
    # Ho et al. Eq. 11: mu = (x_t - beta_t / sqrt(1 - abar_t) eps) / sqrt(1 - beta_t)
    expected_mean = (x.numpy() - b[i] / np.sqrt(1 - abar[i]) * z[:, 0].numpy()) / np.sqrt(1 - b[i])
    np.testing.assert_allclose(mean.numpy(), expected_mean, rtol=1e-11, atol=1e-12)
    small = np.concatenate([beta_tilde[1:2], beta_tilde[1:]])  # beta-tilde_1 = 0 clipped to beta-tilde_2
    if parameterization == "eps_learned_var":  # N & D Eq. 15 with v = (z + 1) / 2
        v = (z[:, 1].numpy() + 1) / 2
        expected_var = np.exp(v * np.log(b[i]) + (1 - v) * np.log(small[i]))
    else:
        expected_var = np.broadcast_to((b if eps_variance == "beta" else small)[i], (N, D))
    np.testing.assert_allclose(var.numpy(), expected_var, rtol=1e-11)


def test_q_posterior_in_ho_form_is_x0_at_t1_and_inverts():
    diffusion = GaussianDiffusion(make_schedule("learned", 7, beta_1=1e-6))
    g = torch.Generator().manual_seed(1)
    x0, xt = (torch.randn(7, 2, generator=g, dtype=torch.float64) for _ in range(2))
    t = torch.arange(1, 8)
    mean, var = diffusion.q_posterior(x0, xt, t)
    assert torch.equal(mean[0], x0[0]) and float(var[0, 0].detach()) == 0.0
    _, _, beta_tilde = tables(diffusion.schedule.betas().detach().numpy())
    np.testing.assert_allclose(var[:, 0].detach().numpy(), beta_tilde, rtol=1e-10)
    torch.testing.assert_close(diffusion.x0_from_posterior_mean(mean, xt, t), x0, rtol=1e-9, atol=1e-9)


def test_eps_variance_is_refused_for_other_parameterizations():
    with pytest.raises(ValueError, match="eps_variance"):
        GaussianDiffusion(make_schedule("reference", 5), "reference", eps_variance="beta")


# ----------------------------------------------------------------------------------------------
# the same kernels give the same K, to rounding

def as_eps_model(model, source: GaussianDiffusion, learned_var: bool):
    """The network output under which the eps parameterisations reproduce ``source``'s kernels:
    eps from Ho's Eq. 11 inverted, v from N & D's Eq. 15 inverted (by hand, in numpy terms)."""
    b = torch.as_tensor(source.schedule.betas().detach())
    abar, _, beta_tilde = (torch.as_tensor(a) for a in tables(b.numpy()))
    small = torch.cat([beta_tilde[1:2], beta_tilde[1:]])

    def eps_model(x, t):
        mean, var = source.p_mean_var(model, x, t)
        bt, at, st = (a[t - 1].reshape(-1, *[1] * (x.ndim - 1)) for a in (b, abar, small))
        eps = (x.double() - mean * (1 - bt).sqrt()) * (1 - at).sqrt() / bt
        v = (var.log() - st.log()) / (bt.log() - st.log()) if learned_var else torch.zeros_like(var)
        return torch.stack([eps, 2 * v - 1], 1)

    return eps_model


@pytest.mark.parametrize("source_parameterization", ["reference", "paper"])
@pytest.mark.parametrize("decoder", ["forward", "learned"])
def test_eps_learned_var_with_the_same_kernels_gives_the_same_bound(source_parameterization, decoder):
    T = 8
    schedule = make_schedule("learned", T, beta_1=1e-4)
    source = GaussianDiffusion(schedule, source_parameterization, decoder)
    target = GaussianDiffusion(schedule, "eps_learned_var", decoder)
    x0 = torch.randn(300, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    k_source = exact_bound(source, wavy_model, [x0], 2, torch.Generator().manual_seed(3))
    k_target = exact_bound(target, as_eps_model(wavy_model, source, True), [x0], 2, torch.Generator().manual_seed(3))
    torch.testing.assert_close(k_target.per_example, k_source.per_example, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(k_target.terms, k_source.terms, rtol=1e-9, atol=1e-9)


def test_eps_with_fixed_variance_gives_the_reference_bound_of_the_same_kernels():
    """A reference-parameterised model whose variance is beta-tilde_t, and its mean read as a noise
    prediction: the same kernels, the same K; for data N(0, s^2) and the true reverse means the
    bound is near the exact log-likelihood."""
    T, s = 10, 0.5
    schedule = make_schedule("reference", T)
    betas = schedule.betas().tolist()
    truth = analytic_model(betas, s, "reference")
    _, _, beta_tilde = tables(betas)
    logit = lambda v: math.log(v / (1 - v))  # noqa: E731
    z_sigma = torch.tensor([math.sqrt(T) * (logit(beta_tilde[max(t, 1)]) - logit(betas[t])) for t in range(T)],
                           dtype=torch.float64)

    def source_model(x, t):  # the true reverse means, variance beta-tilde_t
        z = truth(x, t)
        return torch.stack([z[:, 0], z_sigma[t - 1][:, None].expand_as(x).double()], 1)

    source = GaussianDiffusion(schedule, "reference", "learned")
    target = GaussianDiffusion(schedule, "eps", "learned")
    x0 = torch.randn(4000, 1, generator=torch.Generator().manual_seed(4), dtype=torch.float64) * s
    k_source = exact_bound(source, source_model, [x0], 1, torch.Generator().manual_seed(5))
    k_target = exact_bound(target, as_eps_model(source_model, source, False), [x0], 1, torch.Generator().manual_seed(5))
    torch.testing.assert_close(k_target.per_example, k_source.per_example, rtol=1e-9, atol=1e-9)
    # below log p(x_0): the true reverse variance is not beta-tilde_t for data N(0, s^2), which costs ~0.1 nats
    log_p = float((-0.5 * (math.log(2 * math.pi * s * s) + x0**2 / (s * s))).mean())
    assert log_p - 0.3 < k_target.mean < log_p


# ----------------------------------------------------------------------------------------------
# the training losses

class Affine(torch.nn.Module):
    """z = (a x + b_t, c x + d_t): separate parameters for the mean's and the variance's output."""

    def __init__(self, T):
        super().__init__()
        g = torch.Generator().manual_seed(6)
        self.a, self.c = (torch.nn.Parameter(torch.randn(1, generator=g, dtype=torch.float64)) for _ in range(2))
        self.b, self.d = (torch.nn.Parameter(0.3 * torch.randn(T + 1, generator=g, dtype=torch.float64)) for _ in range(2))

    def forward(self, x, t):
        x = x.double()
        return torch.stack([self.a * x + self.b[t][:, None], self.c * x + self.d[t][:, None]], 1)


def grads(loss, model):
    model.zero_grad()
    loss.backward()
    return {k: p.grad.clone() for k, p in model.named_parameters()}


@pytest.mark.parametrize("decoder", ["forward", "learned"])
def test_simple_and_hybrid_losses_have_the_published_gradients(decoder):
    T, N, D, lam = 6, 64, 2, 1e-3
    diffusion = GaussianDiffusion(make_schedule("cosine", T), "eps_learned_var", decoder)
    model = Affine(T)
    x0 = torch.randn(N, D, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    draws = training_draws(diffusion, x0, torch.Generator().manual_seed(8))

    # L_simple by hand: t uniform on 1..T (t = 1 weighted 1/T, t >= 2 by (T - 1)/T), mean over dims
    abar = torch.as_tensor(tables(diffusion.schedule.betas().numpy())[0])

    def sq_err(t, noise):
        a = abar[t - 1][:, None]
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        return ((noise - model(x_t, t)[:, 0]) ** 2).mean(1)

    simple_by_hand = (T - 1) / T * sq_err(draws.t, draws.noise_t)
    if decoder == "learned":
        simple_by_hand = simple_by_hand + sq_err(torch.ones_like(draws.t), draws.noise_1) / T
    simple, k_simple = training_loss(diffusion, model, x0, draws=draws, loss="simple")
    assert float(simple.detach()) == pytest.approx(float(simple_by_hand.mean().detach()), rel=1e-12)
    g_simple = grads(simple, model)
    g_by_hand = grads(simple_by_hand.mean(), model)
    for k in g_simple:
        torch.testing.assert_close(g_simple[k], g_by_hand[k], rtol=1e-10, atol=1e-14)
    assert g_simple["c"].abs().max() == 0 and g_simple["d"].abs().max() == 0  # L_simple ignores the variance

    bound, k_bound = training_loss(diffusion, model, x0, draws=draws, loss="bound")
    torch.testing.assert_close(k_simple, k_bound, rtol=1e-12, atol=1e-12)  # the same K estimate
    g_bound = grads(bound, model)
    hybrid, _ = training_loss(diffusion, model, x0, draws=draws, loss="hybrid", hybrid_lambda=lam)
    assert float(hybrid.detach()) == pytest.approx(float(simple.detach() + lam * bound.detach() / (D * LN2)), rel=1e-12)
    g_hybrid = grads(hybrid, model)
    # the mean learns from L_simple only (stop-gradient), the variance from lambda L_vlb, in bits/dim
    for k in ("a", "b"):
        torch.testing.assert_close(g_hybrid[k], g_simple[k], rtol=1e-10, atol=1e-14)
    for k in ("c", "d"):
        torch.testing.assert_close(g_hybrid[k], lam / (D * LN2) * g_bound[k], rtol=1e-10, atol=1e-14)
    assert g_bound["c"].abs().max() > 0


def test_losses_refuse_what_they_cannot_train():
    with pytest.raises(ValueError, match="parameterization 'eps'"):
        GaussianDiffusion(make_schedule("reference", 5), "reference", loss="simple")
    with pytest.raises(ValueError, match="'eps_learned_var'"):
        GaussianDiffusion(make_schedule("reference", 5), "eps", loss="hybrid")
    with pytest.raises(ValueError, match="schedule"):
        GaussianDiffusion(make_schedule("learned", 5), "eps", loss="simple")
    with pytest.raises(ValueError, match="train.loss must be one of"):
        GaussianDiffusion(make_schedule("reference", 5), loss="vlb")
    with pytest.raises(ValueError, match="'bound'"):
        BinomialDiffusion(make_schedule("erase", 5), 0.3, loss="simple")
    with pytest.raises(ValueError, match="parameterization 'eps'"):  # the free function asks the process too
        training_loss(GaussianDiffusion(make_schedule("reference", 5)), wavy_model, torch.zeros(3, 2), loss="simple")
    with pytest.raises(ValueError, match="t sampler"):
        GaussianDiffusion(make_schedule("reference", 5), t_sampler=LossAwareSampler(6))
    assert GaussianDiffusion(make_schedule("learned", 5), "eps", loss="bound").loss.value == "bound"


# ----------------------------------------------------------------------------------------------
# importance sampling of t

def warm_sampler(T, scale):
    """A sampler that has seen L_t = scale[t - 2] (10 times each): p_t proportional to scale."""
    sampler = LossAwareSampler(T)
    t = torch.arange(2, T + 1).repeat(10)
    sampler.update(t, torch.as_tensor(scale, dtype=torch.float64)[t - 2])
    return sampler


def test_loss_aware_sampler_warms_up_then_follows_the_second_moment():
    T = 6
    sampler = LossAwareSampler(T)
    torch.testing.assert_close(sampler.probs(), torch.full((T - 1,), 0.2, dtype=torch.float64))
    sampler.update(torch.tensor([2, 3]), torch.tensor([1.0, float("nan")], dtype=torch.float64))  # NaN ignored
    assert sampler.seen.tolist() == [1, 0, 0, 0, 0]
    scale = [1.0, 2.0, 4.0, 8.0, 1.0]
    p = warm_sampler(T, scale).probs()
    expected = 0.999 * torch.tensor(scale, dtype=torch.float64) / sum(scale) + 0.001 / (T - 1)
    torch.testing.assert_close(p, expected, rtol=1e-12, atol=0)


def test_importance_sampled_bound_is_unbiased():
    """K estimated with t drawn from a skewed p_t and weights 1 / p_t against exact_bound,
    Monte Carlo with error bars; the uniform estimate agrees, and the skew is large enough to matter."""
    T = 6
    diffusion = GaussianDiffusion(make_schedule("reference", T), "eps_learned_var", "learned",
                                  t_sampler=warm_sampler(T, [8.0, 4.0, 2.0, 1.0, 0.5]))
    assert float(diffusion.t_sampler.probs().max() / diffusion.t_sampler.probs().min()) > 10
    base = torch.tensor([[0.3, -1.2], [1.5, 0.4], [-0.8, -0.1], [0.0, 2.0]], dtype=torch.float64)
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():  # no update: the proposal stays fixed
        _, k_is = training_loss(diffusion, wavy_model, base.repeat(5000, 1), g)
    exact = exact_bound(diffusion, wavy_model, [base.repeat(500, 1)], n_draws=2, generator=g)
    se = math.sqrt(float(k_is.var()) / len(k_is) + exact.stderr**2)
    assert abs(float(k_is.mean()) - exact.mean) < 4 * se, (float(k_is.mean()), exact.mean, se)
    assert float(-exact.terms[1:T].sum()) / (T - 1) < -8 * se  # the weighting is visible at this precision
    seen = diffusion.t_sampler.seen.clone()
    training_loss(diffusion, wavy_model, base, g)  # under grad: the sampler learns from the terms
    assert float(diffusion.t_sampler.seen.sum() - seen.sum()) == len(base)


def test_training_with_hybrid_loss_and_importance_sampling_end_to_end(cli, tiny_config, tmp_path):
    from thermodiff.run.checkpoint import load_checkpoint

    run = tmp_path / "run"
    flags = ["--set", "diffusion.parameterization=eps_learned_var", "--set", "diffusion.schedule=cosine",
             "--set", "diffusion.decoder=learned", "--set", "train.loss=hybrid", "--set", "train.t_sampler=loss_aware"]
    r = cli("train", tiny_config, "--out", run, "--quiet", "--json", *flags)
    assert r.rc == 0, r
    tensors, meta = load_checkpoint(run / "checkpoint.safetensors")
    train = meta["config"]["train"]
    assert float(tensors["diffusion.t_sampler.seen"].sum()) == train["steps"] * train["batch_size"]  # saved with the run
    r = cli("evaluate", run, "--quiet", "--json")
    e = r.json()
    assert e["parameterization"] == "eps_learned_var" and e["train_loss"] == "hybrid" and e["t_sampler"] == "loss_aware"
    assert math.isfinite(e["K_bits"])
    r = cli("train", tiny_config, "--out", tmp_path / "bad", "--quiet", "--set", "train.loss=simple")
    assert r.rc == 2 and "parameterization 'eps'" in r.err


# ----------------------------------------------------------------------------------------------
# the discretised decoder

def normal_cdf(x):
    return 0.5 * (1 + torch.erf(x / math.sqrt(2)))


@pytest.mark.parametrize("seed", [0, 1])
def test_discretized_probabilities_sum_to_one_and_edges_take_the_tails(seed):
    g = torch.Generator().manual_seed(seed)
    low, width, count = -1.7, 2 / 255, 256
    n = 50
    mean = torch.randn(n, 1, generator=g, dtype=torch.float64) * 2  # also far outside the bins
    var = torch.exp(torch.randn(n, 1, generator=g, dtype=torch.float64) * 4 - 6)  # std from ~1e-6 to ~10
    centres = low + width * torch.arange(count, dtype=torch.float64)
    log_p = discretized_gaussian_log_prob(centres.expand(n, count), mean, var, low, width, count)
    assert torch.isfinite(log_p).all() and (log_p <= 0).all() and log_p.min() < -1e5  # finite far into the tails
    torch.testing.assert_close(log_p.exp().sum(1), torch.ones(n, dtype=torch.float64), rtol=0, atol=1e-12)
    std = var.sqrt()
    torch.testing.assert_close(log_p[:, 0].exp(), normal_cdf((low + width / 2 - mean[:, 0]) / std[:, 0]), rtol=1e-9, atol=1e-15)
    last = low + (count - 1) * width
    torch.testing.assert_close(log_p[:, -1].exp(), 1 - normal_cdf((last - width / 2 - mean[:, 0]) / std[:, 0]),
                               rtol=1e-9, atol=1e-15)
    # values off the centres fall in their bins; a far-out bin keeps a finite, accurate log-probability
    wobble = (torch.rand(n, count, generator=g, dtype=torch.float64) - 0.5) * 0.9 * width
    torch.testing.assert_close(discretized_gaussian_log_prob(centres + wobble, mean, var, low, width, count), log_p)
    far = discretized_gaussian_log_prob(torch.tensor([0.0]), torch.tensor([40.0]), torch.tensor([1.0]), -1.0, 0.01, 201)
    exact_far = -0.5 * 40.0**2 - math.log(math.sqrt(2 * math.pi)) + math.log(0.01)  # density x width, to O(width^2)
    assert float(far) == pytest.approx(exact_far, rel=1e-4)


def test_discretized_log_prob_has_finite_gradients_at_the_edges():
    mean = torch.tensor([-30.0, 0.0, 30.0, 0.2], dtype=torch.float64, requires_grad=True)
    var = torch.tensor([1.0, 1e-8, 1.0, 4.0], dtype=torch.float64, requires_grad=True)
    x = torch.tensor([-1.0, 1.0, 1.0, -1.0], dtype=torch.float64)  # the edge bins
    discretized_gaussian_log_prob(x, mean, var, -1.0, 2 / 255, 256).sum().backward()
    assert torch.isfinite(mean.grad).all() and torch.isfinite(var.grad).all()


def test_discretized_decoder_term_is_a_log_probability_and_samples_are_on_the_bins():
    bins = Bins(low=-1.3, width=0.01, count=256)
    diffusion = GaussianDiffusion(make_schedule("cosine", 5), "eps_learned_var", "discretized", bins=bins)
    g = torch.Generator().manual_seed(10)
    x0 = bins.snap(torch.rand(200, 3, generator=g, dtype=torch.float64) * 2.55 - 1.3)
    assert (diffusion.decoder_log_likelihood(wavy_model, x0, g) <= 0).all()  # every draw: a log-probability
    x0_sample = diffusion.p_sample(wavy_model, x0, 1, g)
    k = torch.round((x0_sample - bins.low) / bins.width)
    torch.testing.assert_close(x0_sample, bins.low + k * bins.width)
    assert k.min() >= 0 and k.max() <= 255
    with pytest.raises(ValueError, match="bins"):
        GaussianDiffusion(make_schedule("cosine", 5), "eps", "discretized")


def test_discretized_decoder_on_images_reports_discrete_bits_per_dim(cli, tiny_images, tmp_path):
    from thermodiff.run.config import load_config
    from thermodiff.run.experiment import data_bins, prepare_dataset

    overrides = ["diffusion.schedule=cosine", "diffusion.parameterization=eps", "diffusion.decoder=discretized",
                 "train.loss=simple"]
    dataset, _ = prepare_dataset(load_config(str(tiny_images), overrides))
    bins = data_bins(dataset)
    x = dataset.to_model(dataset.test, dequantize=False).double()
    np.testing.assert_allclose(((x - bins.low) / bins.width).numpy(), dataset.test, atol=1e-3)  # v itself
    run = tmp_path / "run"
    flags = [arg for override in overrides for arg in ("--set", override)]
    assert cli("train", tiny_images, "--out", run, "--quiet", "--device", "cpu", *flags).rc == 0
    e = cli("evaluate", run, "--quiet", "--json").json()
    assert e["decoder"] == "discretized" and e["nll_bound"] == "discrete" and e["eps_variance"] == "beta_tilde"
    assert e["nll_bits_per_dim"] == pytest.approx(-e["K_bits"] / 64) and e["K_original_units_bits"] == e["K_bits"]
    assert e["nll_bits_per_dim"] > 0  # a bound on -log2 of a probability (untrained: far above 8 bits)
    assert json.loads((run / "evaluation.json").read_text())["nll_bound"] == "discrete"
