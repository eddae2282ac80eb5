"""Reverse-model networks and the temporal readout (paper App. D, Eqs. 62-63)."""

import math

import pytest
import torch
from torch import nn

from thermodiff.nets.vector import TimeReadout, build_vector_net, mlp, temporal_basis


@pytest.mark.parametrize("T,J,width", [(40, 10, 0.5), (1000, 10, 0.5), (40, 10, 1.0), (5, 3, 0.5)])
def test_temporal_basis_rows_sum_to_one_and_bumps_peak_in_order(T, J, width):
    g = temporal_basis(T, J, width)
    assert g.shape == (T, J)
    assert (g >= 0).all()
    torch.testing.assert_close(g.sum(1), torch.ones(T), rtol=0, atol=1e-6)
    peaks = g.argmax(0)  # the time at which each bump weighs most
    assert (peaks[1:] > peaks[:-1]).all(), peaks
    assert int(peaks[0]) == 0 and int(peaks[-1]) == T - 1
    # and the bump that dominates each time moves forward monotonically
    dominant = g.argmax(1)
    assert (dominant[1:] >= dominant[:-1]).all()
    assert int(dominant[0]) == 0 and int(dominant[-1]) == J - 1


def test_temporal_basis_matches_eq_63_by_loop():
    T, J, wf = 12, 4, 0.5
    g = temporal_basis(T, J, wf)
    spacing = 2.0 / (J - 1)
    for i in range(T):
        tau = -1 + 2.0 * i / (T - 1)
        raw = [math.exp(-((tau - (-1 + spacing * j)) ** 2) / (2 * (wf * spacing) ** 2)) for j in range(J)]
        for j in range(J):
            assert float(g[i, j]) == pytest.approx(raw[j] / sum(raw), rel=1e-5, abs=1e-7)


def test_temporal_basis_needs_two_bumps():
    with pytest.raises(ValueError):
        temporal_basis(10, 1)


def test_per_step_readout_is_a_separate_linear_layer_per_t():
    T, fin, fout, N = 6, 5, 3, 40
    torch.manual_seed(0)
    readout = TimeReadout(fin, fout, T, readout="per_step")
    layers = [nn.Linear(fin, fout) for _ in range(T)]
    with torch.no_grad():
        for t, layer in enumerate(layers):
            layer.weight.normal_()
            layer.bias.normal_()
            readout.weight[t] = layer.weight.T
            readout.bias[t] = layer.bias
    g = torch.Generator().manual_seed(1)
    h = torch.randn(N, fin, generator=g)
    t = torch.randint(1, T + 1, (N,), generator=g)
    out = readout(h, t)
    expected = torch.stack([layers[int(t[n]) - 1](h[n]) for n in range(N)])
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_bumps_readout_is_basis_weighted_sum_of_linear_maps():
    T, fin, fout, J, N = 30, 4, 6, 5, 25
    torch.manual_seed(2)
    readout = TimeReadout(fin, fout, T, readout="bumps", n_basis=J)
    with torch.no_grad():
        readout.weight.normal_()
        readout.bias.normal_()
    g = torch.Generator().manual_seed(3)
    h = torch.randn(N, fin, generator=g)
    t = torch.randint(1, T + 1, (N,), generator=g)
    out = readout(h, t)
    basis = temporal_basis(T, J)
    for n in range(N):
        acc = torch.zeros(fout)
        for j in range(J):
            acc += basis[int(t[n]) - 1, j] * (h[n] @ readout.weight[j] + readout.bias[j])
        torch.testing.assert_close(out[n], acc, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["rbf", "mlp"])
@pytest.mark.parametrize("K", [1, 2])
@pytest.mark.parametrize("readout", ["bumps", "per_step"])
def test_build_vector_net_shapes_and_gradients(kind, K, readout):
    T, D, N = 7, 2, 11
    torch.manual_seed(4)
    net = build_vector_net(kind, D, K, T, hidden=16, layers=2, readout=readout, n_basis=4)
    x = torch.randn(N, D)
    t = torch.randint(1, T + 1, (N,))
    z = net(x, t)
    assert z.shape == (N, K, D)
    assert torch.isfinite(z).all()
    (z**2).sum().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    # time enters only through the readout: the features are shared across t
    h = net.features(x)
    assert h.shape == (N, 16)


def test_per_step_readout_makes_each_t_independent():
    T, D = 5, 3
    torch.manual_seed(5)
    net = build_vector_net("mlp", D, 2, T, hidden=8, readout="per_step")
    x = torch.randn(4, D)
    z_before = [net(x, torch.full((4,), t)).detach() for t in range(1, T + 1)]
    with torch.no_grad():
        net.readout.weight[2] += 1.0  # t = 3 only
    z_after = [net(x, torch.full((4,), t)).detach() for t in range(1, T + 1)]
    for t in range(T):
        changed = not torch.equal(z_before[t], z_after[t])
        assert changed == (t == 2)


def test_rbf_layer_is_normalised():
    torch.manual_seed(6)
    net = build_vector_net("rbf", 2, 2, 5, hidden=16)
    h = net.features(torch.randn(20, 2) * 3)
    torch.testing.assert_close(h.sum(1), torch.ones(20), rtol=0, atol=1e-6)
    assert (h >= 0).all()
    # 16 units in 2-D start on a 4 x 4 grid
    centres = net.features.centres.detach()
    assert len(torch.unique(centres[:, 0])) == 4 and len(torch.unique(centres[:, 1])) == 4


def test_mlp_builder_and_errors():
    m = mlp(20, 50, 3, "sigmoid")
    linears = [l for l in m if isinstance(l, nn.Linear)]
    assert [(l.in_features, l.out_features) for l in linears] == [(20, 50), (50, 50), (50, 50)]
    assert sum(isinstance(l, nn.Sigmoid) for l in m) == 3
    with pytest.raises(ValueError):
        mlp(2, 4, 1, "nope")
    with pytest.raises(ValueError):
        build_vector_net("cnn", 2, 2, 5, hidden=4)
