"""The training loop's weight average."""

import pytest
import torch
from torch import nn

from thermodiff.training import EMA


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
