"""Forward noise schedules, checked against independent scalar formulas."""

import math

import numpy as np
import pytest
import torch

from thermodiff import GaussianDiffusion, training_loss
from thermodiff.process.schedules import Schedule, make_schedule


def _abar(betas):
    out, acc = [], 1.0
    for b in betas:
        acc *= 1.0 - b
        out.append(acc)
    return np.array(out)


@pytest.mark.parametrize("T", [2, 3, 10, 40, 1000])
def test_reference_schedule_matches_reference_code_formula(T):
    # reference code: beta = 1/linspace(T, 2, T); kept in [1e-6, 1 - 1e-5] by
    # beta = floor + beta * (1 - floor - 1e-5), floor = 1e-6, first step's floor + 1e-3.
    expected = []
    for i in range(T):
        lin = T + (2.0 - T) * i / (T - 1)  # linspace(T, 2, T)[i]
        floor = 1e-6 + (1e-3 if i == 0 else 0.0)
        expected.append(floor + (1.0 / lin) * (1.0 - floor - 1e-5))
    betas = make_schedule("reference", T).betas()
    assert betas.dtype == torch.float64 and betas.shape == (T,)
    np.testing.assert_allclose(betas.numpy(), expected, rtol=1e-13, atol=0)
    # consequences stated in PAPER.md: beta_1 ~ 1/T + 1e-3 (at least 4e-4 above 1/T), beta_T ~ 1/2
    assert 0.4e-3 < float(betas[0]) - 1.0 / T < 1.001e-3
    assert float(betas[-1]) == pytest.approx(0.5, abs=1e-5)


def test_erase_schedule_destroys_linearly():
    T = 7
    betas = make_schedule("erase", T).betas().numpy()
    np.testing.assert_allclose(betas, [1.0 / (T - t + 1) for t in range(1, T + 1)], rtol=1e-15)
    abar = _abar(betas)
    np.testing.assert_allclose(abar, [(T - t) / T for t in range(1, T + 1)], rtol=1e-12, atol=1e-15)
    assert abar[-1] == 0.0


def test_cosine_schedule_matches_cos_squared():
    T, s = 1000, 0.008
    betas = make_schedule("cosine", T).betas().numpy()
    abar = _abar(betas)
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    expected = np.array([f(t) / f(0) for t in range(1, T + 1)])
    # the last step is clipped at beta = 0.999 (cos^2 reaches 0 there); all earlier ones are exact
    np.testing.assert_allclose(abar[:-1], expected[:-1], rtol=1e-9, atol=1e-15)
    assert betas[-1] == pytest.approx(0.999)
    assert (betas[:-1] < 0.999).all()


def test_linear_schedule_endpoints():
    b = make_schedule("linear", 1000).betas().numpy()
    assert b[0] == pytest.approx(1e-4) and b[-1] == pytest.approx(0.02)
    np.testing.assert_allclose(np.diff(b), (0.02 - 1e-4) / 999, rtol=1e-9)
    b100 = make_schedule("linear", 100).betas().numpy()
    assert b100[0] == pytest.approx(1e-3) and b100[-1] == pytest.approx(0.2)


def test_beta_1_override():
    s = make_schedule("reference", 10, beta_1=0.05)
    assert float(s.betas()[0]) == 0.05
    np.testing.assert_allclose(s.betas()[1:].numpy(), make_schedule("reference", 10).betas()[1:].numpy())


@pytest.mark.parametrize("kind", ["reference", "learned", "linear", "cosine", "erase"])
def test_too_few_steps_raise(kind):
    for T in (0, 1):
        with pytest.raises(ValueError):
            make_schedule(kind, T)


@pytest.mark.parametrize("beta_1", [0.0, 1.0, -0.1, 1.5])
def test_beta_1_outside_unit_interval_raises(beta_1):
    with pytest.raises(ValueError):
        make_schedule("reference", 10, beta_1=beta_1)


def test_schedule_rejects_bad_betas():
    with pytest.raises(ValueError):
        Schedule(np.array([0.1, 0.0, 0.2]))
    with pytest.raises(ValueError):
        Schedule(np.array([0.1, 1.2]))
    with pytest.raises(ValueError):
        Schedule(np.array([0.1]))


def test_learned_schedule_starts_at_reference_and_fixes_beta_1():
    T = 12
    learned = make_schedule("learned", T)
    np.testing.assert_allclose(learned.betas().detach().numpy(), make_schedule("reference", T).betas().numpy(), rtol=1e-12)
    params = list(learned.parameters())
    assert sum(p.numel() for p in params) == T - 1  # beta_2..beta_T only
    w = torch.randn(T, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    (learned.betas() * w).sum().backward()
    (grad,) = [p.grad for p in params]
    assert grad is not None and grad.shape == (T - 1,)
    assert (grad != 0).all() and torch.isfinite(grad).all()
    # beta_1 is not reachable by any parameter: perturbing all of them leaves it unchanged
    b1 = float(learned.betas()[0].detach())
    with torch.no_grad():
        for p in params:
            p.add_(0.7)
    assert float(learned.betas()[0].detach()) == b1
    assert not (learned.betas()[1:].detach().numpy() == make_schedule("reference", T).betas()[1:].numpy()).any()
    # fixed schedules have no parameters at all
    assert list(make_schedule("reference", T).parameters()) == []


def test_learned_schedule_gradient_of_bound_matches_finite_differences():
    """'Frozen noise' (paper 2.4.1): with the same noise draws K is a smooth function of
    beta_2..beta_T; autograd through training_loss must match central differences."""
    T = 6
    sched = make_schedule("learned", T)
    diffusion = GaussianDiffusion(sched, parameterization="reference", decoder="forward")

    def model(x, t):
        return torch.stack([0.3 * torch.tanh(x) + 0.05 * t[:, None], -0.4 + 0.2 * x], 1).double()

    x0 = torch.randn(64, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def loss():
        return training_loss(diffusion, model, x0, torch.Generator().manual_seed(123))[0]

    (param,) = list(sched.parameters())
    param.grad = None
    loss().backward()
    grad = param.grad.clone()
    assert (grad != 0).all()
    eps = 1e-6
    fd = torch.zeros_like(grad)
    with torch.no_grad():
        for i in range(len(grad)):
            param[i] += eps
            up = float(loss())
            param[i] -= 2 * eps
            down = float(loss())
            param[i] += eps
            fd[i] = (up - down) / (2 * eps)
    torch.testing.assert_close(grad, fd, rtol=1e-5, atol=1e-8)
