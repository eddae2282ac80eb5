"""The convolutional reverse-model network for images (paper App. D.2.1, Fig. D.1; reference code
regression.MLP_conv_dense): shapes, the temporal readout (Eqs. 62-63), multi-scale convolution,
the dense pathway, initialisation, presets and their parameter counts."""

import math
import pickle
from dataclasses import asdict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from thermodiff.nets.convnet import (
    PRESETS,
    ConvNetOptions,
    ConvReverseNet,
    MultiScaleConv,
    auto_n_scales,
    build_conv_net,
    preset_kwargs,
)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tensors are tiny: extra intra-op threads only cost (and on a shared, loaded machine
    oversubscription made this file ~5x slower), so run the module on one thread, then restore."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def images(n, c, size, seed=0):
    return torch.randn(n, c, size, size, generator=torch.Generator().manual_seed(seed))


def times(n, T, seed=1):
    return torch.randint(1, T + 1, (n,), generator=torch.Generator().manual_seed(seed))


def bump_weights(T, J, width_factor):
    """g_j(t) of paper Eq. 63, written out independently of thermodiff.nets.vector.temporal_basis."""
    spacing = 2.0 / (J - 1)
    rows = []
    for i in range(T):
        tau = -1 + 2.0 * i / (T - 1)
        raw = [math.exp(-((tau - (-1 + spacing * j)) ** 2) / (2 * (width_factor * spacing) ** 2)) for j in range(J)]
        rows.append([r / sum(raw) for r in raw])
    return torch.tensor(rows, dtype=torch.float64)


# ---------------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("size", [8, 28, 32])
@pytest.mark.parametrize("C", [1, 3])
@pytest.mark.parametrize("K", [1, 2])
def test_small_preset_shapes_for_several_sizes(size, C, K):
    torch.manual_seed(0)
    T, N = 20, 2
    net = build_conv_net("small", C, size, K, T)
    z = net(images(N, C, size), times(N, T))
    assert z.shape == (N, K, C, size, size)
    assert z.dtype == torch.float32 and torch.isfinite(z).all()
    assert net.coefficients(images(N, C, size)).shape == (N, K, C, net.n_basis, size, size)


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("C,K", [(1, 1), (3, 2)])
def test_every_preset_shape_and_gradients_reach_every_parameter(preset, C, K):
    torch.manual_seed(1)
    T, N, size = 30, 3, 8
    net = build_conv_net(preset, C, size, K, T)
    x = images(N, C, size).requires_grad_()
    z = net(x, times(N, T))
    assert z.shape == (N, K, C, size, size)
    assert torch.isfinite(z).all()
    (z.sin().sum() + (z**2).sum()).backward()
    names = [name for name, _ in net.named_parameters()]
    assert any(n.startswith("readout") for n in names)
    for name, p in net.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    assert x.grad.abs().sum() > 0


@pytest.mark.parametrize("preset,C,size", [("reference_mnist", 1, 28), ("reference_cifar10", 3, 32),
                                           ("paper", 3, 32), ("paper_mnist", 1, 28)])
def test_presets_at_their_native_size(preset, C, size):
    torch.manual_seed(2)
    net = build_conv_net(preset, C, size, 2, 1000)
    with torch.no_grad():
        z = net(images(2, C, size), torch.tensor([1, 1000]))
    assert z.shape == (2, 2, C, size, size)
    assert torch.isfinite(z).all()
    # the readout starts small, so the reverse kernel starts near the forward one
    assert z.abs().max() < 0.1
    print(f"{preset} ({C}x{size}x{size}, K=2): {sum(p.numel() for p in net.parameters()):,d} parameters")


# ------------------------------------------------------------------------- temporal readout


def test_readout_equals_explicit_sum_over_bumps():
    torch.manual_seed(3)
    T, N, C, K, size = 25, 4, 3, 2, 8
    net = build_conv_net("small", C, size, K, T, n_basis=5, width_factor=0.7)
    with torch.no_grad():
        net.readout.weight.normal_()
        net.readout.bias.normal_()
    x, t = images(N, C, size), times(N, T)
    z = net(x, t).double()
    # the readout conv's output channels, in the order (k, c, j), computed by hand from the
    # upper half's output h
    h = net.upper(net.features(x)).detach().double()
    W = net.readout.weight.detach().double()[:, :, 0, 0]
    b = net.readout.bias.detach().double()
    g = bump_weights(T, 5, 0.7)
    J = 5
    for n in range(N):
        for k in range(K):
            for c in range(C):
                acc = torch.zeros(size, size, dtype=torch.float64)
                for j in range(J):
                    o = (k * C + c) * J + j
                    coeff = torch.einsum("i,ihw->hw", W[o], h[n]) + b[o]
                    acc += g[int(t[n]) - 1, j] * coeff
                torch.testing.assert_close(z[n, k, c], acc, rtol=1e-4, atol=1e-5)


def test_time_enters_only_through_the_readout():
    torch.manual_seed(4)
    T, N, C, size = 50, 3, 2, 8
    net = build_conv_net("small", C, size, 2, T)
    with torch.no_grad():
        net.readout.weight.normal_()
    x = images(N, C, size)
    seen = []
    net.readout.register_forward_hook(lambda mod, args, out: seen.append((args[0].detach().clone(), out.detach().clone())))
    t_early, t_late = torch.full((N,), 1), torch.full((N,), T)
    z_early, z_late = net(x, t_early), net(x, t_late)
    # the body's features and the readout coefficients are the same for both times ...
    assert torch.equal(seen[0][0], seen[1][0]) and torch.equal(seen[0][1], seen[1][1])
    # ... and the outputs differ, only through g(t)
    assert not torch.allclose(z_early, z_late)
    coeffs = net.coefficients(x)
    for t, z in ((t_early, z_early), (t_late, z_late)):
        expected = (coeffs * net.basis[t - 1][:, None, None, :, None, None]).sum(3)
        torch.testing.assert_close(z, expected, rtol=1e-5, atol=1e-6)
    # with every row of the basis equal, the output does not depend on t at all
    with torch.no_grad():
        net.basis.copy_(net.basis[7].expand_as(net.basis))
    outs = [net(x, torch.full((N,), t)) for t in (1, 2, 17, T)]
    for z in outs[1:]:
        torch.testing.assert_close(z, outs[0], rtol=0, atol=0)


def test_basis_buffer_is_the_temporal_basis_of_eq_63():
    net = build_conv_net("small", 1, 8, 2, 40, n_basis=10, width_factor=0.5)
    torch.testing.assert_close(net.basis.double(), bump_weights(40, 10, 0.5), rtol=1e-5, atol=1e-6)
    assert build_conv_net("paper", 1, 8, 2, 40).config["width_factor"] == 1.0


@pytest.mark.parametrize("preset", ["small", "reference_mnist", "paper_mnist"])
def test_zero_readout_gives_exactly_zero(preset):
    torch.manual_seed(5)
    net = build_conv_net(preset, 3, 8, 2, 10)
    with torch.no_grad():
        net.readout.weight.zero_()
        net.readout.bias.zero_()
    z = net(images(2, 3, 8) * 5, times(2, 10))
    assert torch.equal(z, torch.zeros_like(z))


# ---------------------------------------------------------------------- multi-scale layer


def conv2d_by_loops(x, w, b):
    """'same' zero-padded 3x3 cross-correlation, one output pixel at a time."""
    n_in, H, W = x.shape
    n_out, _, k, _ = w.shape
    r = k // 2
    xp = torch.zeros(n_in, H + 2 * r, W + 2 * r, dtype=x.dtype)
    xp[:, r:r + H, r:r + W] = x
    out = torch.zeros(n_out, H, W, dtype=x.dtype)
    for o in range(n_out):
        for i in range(H):
            for j in range(W):
                out[o, i, j] = (w[o] * xp[:, i:i + k, j:j + k]).sum() + (b[o] if b is not None else 0)
    return out


def test_multiscale_layer_equals_explicit_pool_conv_upsample_sum():
    torch.manual_seed(6)
    layer = MultiScaleConv(2, 3, n_scales=2).double()
    with torch.no_grad():
        layer.convs[0].bias.normal_()
    x = torch.randn(1, 2, 4, 4, dtype=torch.float64)
    out = layer(x)[0]
    c0, c1 = layer.convs
    fine = conv2d_by_loops(x[0], c0.weight.detach(), c0.bias.detach())
    pooled = x[0].reshape(2, 2, 2, 2, 2).mean(dim=(2, 4))  # 2x2 block means: (2, 2, 2)
    assert pooled[0, 0, 1] == pytest.approx(float(x[0, 0, 0:2, 2:4].mean()))
    coarse = conv2d_by_loops(pooled, c1.weight.detach(), None)
    upsampled = coarse.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2)
    torch.testing.assert_close(out, fine + upsampled, rtol=1e-10, atol=1e-10)
    assert c1.bias is None  # the coarse scales' biases would be redundant


@pytest.mark.parametrize("n_scales", [1, 3, 4])
def test_multiscale_layer_equals_sum_of_separately_upsampled_scales(n_scales):
    torch.manual_seed(7)
    layer = MultiScaleConv(3, 5, n_scales=n_scales).double()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    expected = 0
    for s, conv in enumerate(layer.convs):
        f = 2**s
        y = conv(F.avg_pool2d(x, f) if f > 1 else x)
        expected = expected + (F.interpolate(y, scale_factor=f, mode="nearest") if f > 1 else y)
    torch.testing.assert_close(layer(x), expected, rtol=1e-10, atol=1e-10)


def test_nonlinearity_follows_the_multiscale_sum():
    torch.manual_seed(8)
    net = ConvReverseNet(1, 8, 2, 10, n_conv_layers=1, conv_channels=4, n_scales=2, conv_activation="softplus",
                         dense_out_per_pixel=0, n_upper_layers=0)
    layer = net.conv[0]
    assert isinstance(layer, MultiScaleConv) and isinstance(net.conv[1], nn.Softplus)
    x = images(2, 1, 8)
    torch.testing.assert_close(net.features(x), F.softplus(layer(x)), rtol=0, atol=0)


def test_auto_n_scales_keeps_the_coarsest_scale_at_least_4_pixels():
    assert [auto_n_scales(s) for s in (4, 6, 8, 12, 28, 32, 64)] == [1, 1, 2, 2, 3, 4, 5]
    assert build_conv_net("paper", 1, 28, 2, 10).n_scales == 3
    assert build_conv_net("paper", 3, 32, 2, 10).n_scales == 4
    assert build_conv_net("reference_mnist", 1, 28, 2, 10).n_scales == 1


# -------------------------------------------------------------------------- dense pathway


def test_dense_pathway_on_and_off():
    torch.manual_seed(9)
    size, C, T = 8, 1, 10
    kw = dict(n_conv_layers=1, conv_channels=4, n_scales=1, n_dense_layers=1, dense_hidden=16,
              dense_out_per_pixel=3, n_upper_layers=1, upper_hidden=8)
    on = ConvReverseNet(C, size, 2, T, **kw)
    off = ConvReverseNet(C, size, 2, T, **{**kw, "dense_out_per_pixel": 0})
    assert on.dense is not None and off.dense is None
    assert on.n_features == 4 + 3 and off.n_features == 4
    n_on, n_off = (sum(p.numel() for p in m.parameters()) for m in (on, off))
    dense_params = (C * 64 * 16 + 16) + (16 * 3 * 64 + 3 * 64)
    assert n_on - n_off == dense_params + 3 * 8  # plus the upper layer's extra inputs
    assert ConvReverseNet(C, size, 2, T, **{**kw, "dense_hidden": 0}).dense is None  # the reference switch

    # receptive field: without the dense pathway a single 3x3 layer + 1x1 layers cannot see a
    # far pixel; with it every output sees the whole image
    x = images(1, C, size)
    x2 = x.clone()
    x2[..., 7, 7] += 3.0
    t = torch.tensor([5])
    for net, sees in ((off, False), (on, True)):
        with torch.no_grad():
            net.readout.weight.normal_()
        d = (net(x2, t) - net(x, t))[..., 0, 0].abs().max()
        assert (d > 0) == sees, (sees, d)

    # the features: [conv / sqrt(4), dense / sqrt(3)] as in the reference code
    h = on.features(x)
    torch.testing.assert_close(h[:, :4], on.conv(x) / 2.0)
    torch.testing.assert_close(h[:, 4:], on.dense(x.flatten(1)).reshape(1, 3, size, size) / 3**0.5)


def test_dense_only_network_like_the_papers_mnist():
    net = build_conv_net("paper_mnist", 1, 8, 2, 10)
    assert net.conv is None and net.dense is not None
    linears = [m for m in net.dense if isinstance(m, nn.Linear)]
    assert [(l.in_features, l.out_features) for l in linears] == [(64, 500), (500, 500), (500, 500), (500, 2 * 64)]
    assert sum(isinstance(m, nn.Tanh) for m in net.dense) == 4
    assert torch.equal(net.features(images(2, 1, 8)), net.dense(images(2, 1, 8).flatten(1)).reshape(2, 2, 8, 8))
    with pytest.raises(ValueError, match="both pathways"):
        build_conv_net("paper_mnist", 1, 8, 2, 10, dense_out_per_pixel=0)


# -------------------------------------------------------------------------- initialisation


def test_initialisation_follows_the_reference_code():
    torch.manual_seed(10)
    net = build_conv_net("reference_cifar10", 3, 8, 2, 10)
    convs = [c for m in net.conv if isinstance(m, MultiScaleConv) for c in m.convs]
    w = torch.cat([c.weight.detach().flatten() for c in convs[1:]])  # 100 -> 100 channel layers
    assert float(w.std()) == pytest.approx((1 / 100) ** 0.5 / 9, rel=0.03)
    assert all(float(c.bias.detach().abs().max()) == 0 for c in convs)
    for layer in [m for m in net.dense if isinstance(m, nn.Linear)] + [m for m in net.upper if isinstance(m, nn.Conv2d)]:
        W = layer.weight.detach().flatten(1).double()
        gram = W @ W.T if W.shape[0] <= W.shape[1] else W.T @ W
        torch.testing.assert_close(gram, torch.eye(len(gram), dtype=torch.float64), rtol=0, atol=1e-4)
        assert float(layer.bias.detach().abs().max()) == 0
    R = net.readout.weight.detach().flatten(1).double()  # 60 x 100: orthogonal rows times 0.1
    torch.testing.assert_close(R @ R.T, 0.01 * torch.eye(60, dtype=torch.float64), rtol=0, atol=1e-5)


def test_preset_nonlinearities():
    ref = build_conv_net("reference_mnist", 1, 8, 2, 10)
    acts = [m for m in ref.modules() if isinstance(m, (nn.LeakyReLU, nn.Softplus, nn.Tanh))]
    assert acts and all(isinstance(m, nn.LeakyReLU) and m.negative_slope == 0.05 for m in acts)
    paper = build_conv_net("paper", 1, 8, 2, 10)
    assert sum(isinstance(m, nn.Softplus) for m in paper.conv) == 4
    assert not any(isinstance(m, (nn.Tanh, nn.LeakyReLU)) for m in paper.conv)
    assert sum(isinstance(m, nn.Tanh) for m in paper.dense) == 4
    assert sum(isinstance(m, nn.Tanh) for m in paper.upper) == 1


# ---------------------------------------------------------------------- parameter counts


def test_reference_mnist_parameter_count_by_hand():
    net = build_conv_net("reference_mnist", 1, 28, 2, 1000)
    conv = (1 * 20 * 9 + 20) + 3 * (20 * 20 * 9 + 20)  # 4 layers of 20 3x3 filters
    dense = (784 * 500 + 500) + 2 * (500 * 500 + 500) + (500 * 2 * 784 + 2 * 784)  # 784-500-500-500-2/px
    upper = (22 * 20 + 20) + (20 * 2 * 1 * 10 + 2 * 1 * 10)  # 22 -> 20 -> 2 * colors * 10
    total = sum(p.numel() for p in net.parameters())
    print(f"reference_mnist: conv {conv:,d} + dense {dense:,d} + upper {upper:,d} = {total:,d}")
    assert (conv, dense, upper) == (11_060, 1_679_068, 880)
    assert total == conv + dense + upper == 1_691_008
    assert sum(p.numel() for p in net.conv.parameters()) == conv
    assert sum(p.numel() for p in net.dense.parameters()) == dense


def test_reference_cifar10_parameter_count_by_hand():
    kw = preset_kwargs("reference_cifar10")
    net = ConvReverseNet(3, 32, 2, 1000, **kw)
    conv = (3 * 100 * 9 + 100) + 5 * (100 * 100 * 9 + 100)
    dense = (3072 * 1000 + 1000) + 4 * (1000 * 1000 + 1000) + (1000 * 5 * 1024 + 5 * 1024)
    upper = (105 * 100 + 100) + 2 * (100 * 100 + 100) + (100 * 60 + 60)
    total = sum(p.numel() for p in net.parameters())
    print(f"reference_cifar10: conv {conv:,d} + dense {dense:,d} + upper {upper:,d} = {total:,d}")
    assert total == conv + dense + upper == 12_692_280


def test_multiscale_parameter_count():
    # n_scales convolutions per layer, one bias per layer
    net = ConvReverseNet(3, 16, 2, 10, n_conv_layers=2, conv_channels=8, n_scales=3, dense_out_per_pixel=0,
                         n_upper_layers=0, n_basis=4)
    assert sum(p.numel() for p in net.parameters()) == (3 * (3 * 8 * 9) + 8) + (3 * (8 * 8 * 9) + 8) + (8 * 24 + 24)


# ----------------------------------------------------------------------- errors, config


def test_bad_preset_option_or_size_raises_value_error():
    with pytest.raises(ValueError, match="unknown conv-net preset 'resnet'"):
        build_conv_net("resnet", 1, 28, 2, 10)
    with pytest.raises(ValueError, match="n_hidden_conv"):
        build_conv_net("small", 1, 28, 2, 10, n_hidden_conv=5)
    with pytest.raises(ValueError, match="not divisible"):
        build_conv_net("small", 1, 28, 2, 10, n_scales=4)  # 28 / 8
    with pytest.raises(ValueError, match="not divisible"):
        ConvReverseNet(1, 10, 2, 10, n_scales=3)
    with pytest.raises(ValueError, match="activation"):
        build_conv_net("small", 1, 8, 2, 10, conv_activation="gelu6")
    with pytest.raises(ValueError):
        build_conv_net("small", 1, 8, 0, 10)
    net = build_conv_net("small", 1, 8, 2, 10)
    with pytest.raises(ValueError, match="expected images of shape"):
        net(images(2, 1, 16), times(2, 10))


def test_without_the_dense_pathway_any_divisible_size_is_taken():
    """Fully convolutional (the bark network, paper Fig. 5): trained at 8 x 8, applied to 16 x 24;
    each output pixel sees only its neighbourhood, so a crop's interior matches the big image's."""
    torch.manual_seed(3)
    net = build_conv_net("small", 1, 8, 2, 10, dense_hidden=0, n_scales=1)
    assert net.size_multiple == 1 and build_conv_net("small", 1, 8, 2, 10).size_multiple is None
    big, t = images(1, 1, 24), times(1, 10)
    z = net(big[..., :16, :], t)
    assert z.shape == (1, 2, 1, 16, 24)
    inner = net(big[..., 4:12, 8:16], t)  # 2 layers of 3 x 3: the centre 4 x 4 sees only the crop
    torch.testing.assert_close(inner[..., 2:6, 2:6], z[..., 6:10, 10:14])
    with pytest.raises(ValueError, match="divisible by 2"):
        build_conv_net("small", 1, 8, 2, 10, dense_hidden=0)(images(1, 1, 12)[..., :9, :], t)


def test_the_defaults_are_the_reference_codes_and_config_holds_them_resolved():
    assert preset_kwargs("reference_mnist") == asdict(ConvNetOptions())
    net = ConvReverseNet(1, 8, 2, 10, n_scales="auto", dense_hidden=0)
    resolved = asdict(ConvNetOptions(n_scales=2, dense_hidden=0, dense_out_per_pixel=0))
    assert net.config == dict(channels=1, size=8, outputs_per_dim=2, T=10, **resolved)
    with pytest.raises(TypeError):
        ConvReverseNet(1, 8, 2, 10, n_hidden_conv=5)


def test_config_rebuilds_the_network_and_pickles():
    torch.manual_seed(11)
    net = build_conv_net("small", 3, 8, 2, 10)
    assert net.config["n_scales"] == 2  # 'auto' resolved
    x, t = images(2, 3, 8), times(2, 10)
    z = net(x, t)
    again = ConvReverseNet(**net.config)
    again.load_state_dict(net.state_dict())
    assert torch.equal(again(x, t), z)
    assert torch.equal(pickle.loads(pickle.dumps(net))(x, t), z)


def test_channels_last_and_bf16_autocast():
    torch.manual_seed(12)
    net = build_conv_net("small", 3, 8, 2, 10)
    x, t = images(4, 3, 8), times(4, 10)
    with torch.no_grad():
        z = net(x, t)
    net_cl = build_conv_net("small", 3, 8, 2, 10)
    net_cl.load_state_dict(net.state_dict())
    net_cl = net_cl.to(memory_format=torch.channels_last)
    with torch.no_grad():
        z_cl = net_cl(x.contiguous(memory_format=torch.channels_last), t)
    torch.testing.assert_close(z_cl, z, rtol=1e-4, atol=1e-6)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        zb = net(x, t)
    assert zb.shape == z.shape and torch.isfinite(zb).all()
    assert float((zb.float() - z).abs().max()) < 0.05 * float(z.abs().max()) + 1e-4
