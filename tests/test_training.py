"""The training loop's weight average, its mixed precision and its time limit."""

import pytest
import torch
from torch import nn

from conftest import assert_one_line_error
from thermodiff.config import Config
from thermodiff.training import EMA, autocast


@pytest.mark.parametrize("decay", [0.9, 0.999])
def test_ema_warms_up_and_then_decays_at_its_rate(decay):
    """A weight that jumps from 0 to 1 at the first update: after n updates the average is
    1 - prod_k d_k with d_k = min(decay, (1 + k) / (10 + k)) (TensorFlow's num_updates rule),
    so a short run's average is not its initial weights; late updates decay at ``decay``."""
    layer = nn.Linear(1, 1, bias=False)
    nn.init.zeros_(layer.weight)
    ema = EMA(layer, decay)
    nn.init.ones_(layer.weight)
    remaining = 1.0
    for step in range(1, 201):
        ema.update(layer, step)
        remaining *= min(decay, (1 + step) / (10 + step))
        assert float(ema.shadow["weight"]) == pytest.approx(1 - remaining, abs=1e-6)
    assert float(ema.shadow["weight"]) > 0.9  # without the warm-up, 0.999 leaves 1 - 0.999^200 = 0.18


def test_minutes_limits_training_and_extends_a_resumed_run(cli, tiny_config, tmp_path):
    """--minutes is a total of training time across resumes: a resumed run keeps its limit (and,
    out of time, stops at once) unless --minutes gives a new total, as --steps does for steps."""
    run = tmp_path / "run"
    first = cli("train", tiny_config, "--out", run, "--steps", 10**6, "--minutes", 0.001, "--quiet", "--json").json()
    assert 0 < first["steps"] < 10**6
    again = cli("train", tiny_config, "--out", run, "--resume", "--steps", 10**6, "--quiet", "--json").json()
    assert again["steps"] == first["steps"] + 1  # one step, then out of time (the limit holds)
    more = cli("train", tiny_config, "--out", run, "--resume", "--steps", again["steps"] + 30, "--minutes", 5,
               "--quiet", "--json").json()
    assert more["steps"] == again["steps"] + 30
    assert_one_line_error(cli("train", tiny_config, "--out", tmp_path / "r2", "--minutes", 0), "--minutes")


@pytest.mark.parametrize("precision, expected", [("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float32)])
def test_autocast_lowers_the_network_on_cpu_only_for_bf16(precision, expected):
    """bf16 autocasts on the CPU too; fp16 (which needs CUDA's gradient scaler) leaves the CPU in fp32."""
    cfg = Config()
    cfg.train.precision = precision
    a = torch.randn(4, 4)
    with autocast(cfg, torch.device("cpu")):
        assert (a @ a).dtype == expected
        assert torch.exp(a).dtype == torch.float32  # elementwise math keeps its precision
