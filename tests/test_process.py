"""The process contract (process.py) and the shared tensor helpers (tensors.py): every process and
baseline implements it and states by attributes what callers used to find out by its type; the
t-sampler is a constructor argument, saved with the process and followed by its training draws."""

import math

import pytest
import torch

from thermodiff import BinomialDiffusion, GaussianDiffusion, LossAwareSampler, Process, make_schedule
from thermodiff.nets.baselines import DAE, VAE
from thermodiff.process.contract import Trainable
from thermodiff.process.gaussian import Bins
from thermodiff.process.respace import respace
from thermodiff.process.tensors import LN2, gather, per_example, sum_except_batch
from thermodiff.process.vdm import VDM


def processes() -> dict[str, Process]:
    schedule = make_schedule("cosine", 8)
    return {
        "gaussian": GaussianDiffusion(schedule),
        "discretized": GaussianDiffusion(schedule, "eps", "discretized", bins=Bins(low=-1.0, width=2 / 255)),
        "respaced": respace(GaussianDiffusion(schedule, "eps"), 4),
        "binomial": BinomialDiffusion(make_schedule("erase", 8), 0.3),
        "vdm": VDM(8),
        "vdm_respaced": respace(VDM(8), 4),
    }


def test_every_process_states_what_callers_ask():
    expected = {  # dequantizes, binary, continuous_time, stationary_p
        "gaussian": (True, False, False, None),
        "discretized": (False, False, False, None),
        "respaced": (True, False, False, None),
        "binomial": (True, True, False, 0.3),
        "vdm": (True, False, True, None),
        "vdm_respaced": (True, False, True, None),
    }
    for name, process in processes().items():
        assert isinstance(process, Process), name
        got = (process.dequantizes, process.binary, process.continuous_time, process.stationary_p)
        assert got == pytest.approx(expected[name]), name


def test_baselines_are_trainable_with_the_defaults():
    for baseline in (VAE(2, bernoulli=False), DAE()):
        assert isinstance(baseline, Trainable) and not isinstance(baseline, Process)
        assert (baseline.dequantizes, baseline.binary, baseline.continuous_time, baseline.stationary_p) == (
            True, False, False, None)


def test_a_process_missing_part_of_the_contract_cannot_be_made():
    class Partial(Process):
        def prior_kl(self, x0):
            return x0.sum(1)

    with pytest.raises(TypeError, match="abstract"):
        Partial()


def test_the_t_sampler_is_a_constructor_argument_saved_with_the_process():
    T = 6
    sampler = LossAwareSampler(T)
    t = torch.arange(2, T + 1).repeat(10)
    sampler.update(t, torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0], dtype=torch.float64)[t - 2])  # only t = T matters
    for process in (GaussianDiffusion(make_schedule("reference", T), t_sampler=sampler),
                    BinomialDiffusion(make_schedule("erase", T), 0.5, t_sampler=sampler)):
        assert process.state_dict().keys() >= {"t_sampler.second_moment", "t_sampler.seen"}
        draws = process.training_draws(torch.zeros(2000, 3), torch.Generator().manual_seed(0))
        assert float((draws.t == T).float().mean()) > 0.99
        torch.testing.assert_close(draws.weight, 1 / sampler.probs()[draws.t - 2])
    assert "t_sampler.seen" not in GaussianDiffusion(make_schedule("reference", T)).state_dict()
    uniform = GaussianDiffusion(make_schedule("reference", T)).training_draws(torch.zeros(2000, 3), torch.Generator())
    assert set(uniform.t.tolist()) == set(range(2, T + 1)) and bool((uniform.weight == T - 1).all())


def test_tensor_helpers():
    assert LN2 == math.log(2)
    x = torch.arange(24.0).reshape(2, 3, 4)
    torch.testing.assert_close(sum_except_batch(x), torch.tensor([66.0, 210.0]))
    assert per_example(torch.tensor([1.0, 2.0]), x).shape == (2, 1, 1)
    table = torch.tensor([10.0, 20.0, 30.0])
    torch.testing.assert_close(gather(table, torch.tensor([3, 1]), x), torch.tensor([30.0, 10.0]).reshape(2, 1, 1))
