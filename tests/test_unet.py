"""The U-Net reverse network: its contract (shapes, integer and continuous times agree, zero
output at initialisation, time reaches every block, sizes its pooling divides), its validation,
and end to end through the CLI (trained with bf16 autocast on the CPU), larger images included."""

import json
import re

import numpy as np
import pytest
import torch
from conftest import write_tiny_images

from thermodiff.cli import main
from thermodiff.nets.unet import UNET_PRESETS, AttentionBlock, UNet, UNetOptions, build_unet
from thermodiff.nets.vector import timestep_embedding
from thermodiff.run.experiment import load_run


def randomise_readout(net: UNet) -> None:
    torch.nn.init.normal_(net.out[-1].weight, std=0.1)


@pytest.mark.parametrize("preset", ["small", "cpu"])
def test_shapes_and_zero_start(preset):
    torch.manual_seed(0)
    net = build_unet(preset, 3, 16, 2, 50)
    x, t = torch.randn(4, 3, 16, 16), torch.tensor([1, 7, 25, 50])
    z = net(x, t)
    assert z.shape == (4, 2, 3, 16, 16)
    assert torch.equal(z, torch.zeros_like(z))  # the reverse kernel starts at the forward one


def test_integer_steps_sit_at_their_continuous_times():
    torch.manual_seed(1)
    T = 40
    net = build_unet("small", 1, 8, 2, T)
    randomise_readout(net)
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([1, 20, 40])
    torch.testing.assert_close(net(x, t), net(x, (t - 1).double() / (T - 1)))


@torch.no_grad()
def test_every_block_takes_the_time():
    """With train-like weights the output moves with t, and every residual block's time projection
    is used: zeroing any one of them changes the output (GroupNorm couples all pixels, so a
    receptive-field test would not isolate the levels)."""
    torch.manual_seed(2)
    net = build_unet("small", 1, 8, 2, 100)
    randomise_readout(net)
    for p in net.parameters():  # train-like weights: the zero-initialised readout alone is not enough
        p.add_(0.05 * torch.randn_like(p))
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([5, 95])
    z = net(x, t)
    assert float((z[0] - net(x[:1], torch.tensor([95]))[0]).abs().max()) > 1e-3
    blocks = [m for m in net.modules() if hasattr(m, "emb")]
    assert len(blocks) == 2 * 1 + 2 + 2 * 2  # down, middle, up (blocks_per_level + 1 per level)
    for block in blocks:
        saved = block.emb[1].weight.clone()
        block.emb[1].weight.zero_()
        assert float((net(x, t) - z).abs().max()) > 1e-6
        block.emb[1].weight.copy_(saved)


def test_timestep_embedding():
    e = timestep_embedding(torch.tensor([0.0, 0.5]), 8)
    assert e.shape == (2, 8)
    torch.testing.assert_close(e[0], torch.tensor([1.0] * 4 + [0.0] * 4))  # cos 0, sin 0
    torch.testing.assert_close(e[1, 0], torch.cos(torch.tensor(500.0)))  # s = 0.5 -> step 500, freq 1


@pytest.mark.parametrize("kwargs, message", [
    (dict(preset="huge"), "unknown U-Net preset"),
    (dict(preset="small", depth=3), "unknown U-Net option"),
    (dict(preset="small", channel_mults=(1, 2, 2, 2), size=12), "divisible by 2^(levels - 1)"),
    (dict(preset="small", base_channels=12), "divisible by groups"),
    (dict(preset="small", attention_resolutions=(8,), heads=3), "heads 3 must divide the width 32"),
    (dict(preset="small", fourier_period=-0.1), "fourier_period must be 0, or > 0"),
    (dict(preset="small", fourier_period=0.1, one_hot_states=4), "fourier_period must be 0, or > 0 for continuous"),
])
def test_bad_options(kwargs, message):
    size = kwargs.pop("size", 16)
    with pytest.raises(ValueError, match=re.escape(message)):
        build_unet(kwargs.pop("preset"), 1, size, 2, 10, **kwargs)


def test_fourier_features_are_sin_and_cos_of_x_at_one_and_two_periods():
    """The stem's input against the features written out in float64: x_t, then per channel sin of
    2 pi x / p and 2 pi x / 2p, then the cosines; unchanged when x_t moves by whole multiples of 2p,
    and the stem widened to take them. The tolerances: each float32 angle (|x| <= 3.5, so at most
    2 pi 3.5 / p = 440 rad) is within 440 * 3 * 2^-24 = 8e-5 of the exact one (the roundings of x,
    of the frequency and of their product), and the shifted and unshifted features carry one each."""
    period = 0.05
    net = build_unet("small", 2, 8, 1, 10, fourier_period=period)
    assert net.stem.in_channels == 2 * 5 and not any("fourier" in k for k in net.state_dict())
    x = (torch.rand(3, 2, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1) * 3
    x64 = x.double()
    angles = [2 * torch.pi * x64[:, c] / (k * period) for c in range(2) for k in (1, 2)]
    expected = torch.cat([x64, torch.stack([a.sin() for a in angles], 1), torch.stack([a.cos() for a in angles], 1)], 1)
    torch.testing.assert_close(net.with_fourier_features(x).double(), expected, rtol=0, atol=1e-4)
    shifted = net.with_fourier_features(x + 2 * period * torch.randint(-5, 6, x.shape))
    torch.testing.assert_close(shifted[:, 2:], net.with_fourier_features(x)[:, 2:], rtol=0, atol=2e-4)
    plain = build_unet("small", 2, 8, 1, 10)
    assert plain.stem.in_channels == 2 and torch.equal(plain.with_fourier_features(x), x)


def test_images_its_pooling_does_not_divide_are_refused():
    net = build_unet("cpu", 3, 32, 2, 10)  # pools twice: sides divisible by 4
    assert net(torch.zeros(1, 3, 12, 20), torch.tensor([3])).shape == (1, 2, 3, 12, 20)
    with pytest.raises(ValueError, match="divisible by 4"):
        net(torch.zeros(1, 3, 14, 20), torch.tensor([3]))
    with pytest.raises(ValueError, match="3 x H x W"):
        net(torch.zeros(1, 1, 12, 20), torch.tensor([3]))


def test_presets_build():
    for name in UNET_PRESETS:
        assert isinstance(build_unet(name, 3, 32, 2, 1000), UNet)


def test_config_holds_every_option_and_rebuilds_the_network():
    net = build_unet("small", 1, 8, 2, 10, dropout=0.1)
    assert net.config == dict(channels=1, size=8, outputs_per_dim=2, T=10, one_hot_states=None, base_channels=16,
                              channel_mults=[1, 2], blocks_per_level=1, dropout=0.1, groups=8, attention_resolutions=[],
                              heads=1, fourier_period=0.0)
    assert UNET_PRESETS["cpu"] == UNetOptions()
    again = UNet(**net.config)
    again.load_state_dict(net.state_dict())
    symbols = build_unet("small", 1, 8, 3, 10, one_hot_states=4)  # categorical images: one-hot states in
    UNet(**symbols.config).load_state_dict(symbols.state_dict())


def test_attention_is_softmax_attention_per_head_and_starts_as_the_identity():
    """AttentionBlock against the attention written out: per head, softmax(q^T k / sqrt(d)) over the
    pixels, from the normalised input's 1x1 projections; with its zero-initialised output projection
    the block is the identity."""
    torch.manual_seed(0)
    block = AttentionBlock(8, groups=4, heads=2)
    x = torch.randn(3, 8, 4, 5)
    assert torch.equal(block(x), x)
    torch.nn.init.normal_(block.proj.weight)
    q, k, v = block.qkv(block.norm(x).flatten(2)).chunk(3, dim=1)  # (N, C, pixels) each
    heads = []
    for h in range(2):
        part = slice(4 * h, 4 * h + 4)
        weights = torch.softmax(q[:, part].transpose(1, 2) @ k[:, part] / 2.0, dim=-1)  # (N, pixels, pixels)
        heads.append(v[:, part] @ weights.transpose(1, 2))
    expected = x + block.proj(torch.cat(heads, dim=1)).view_as(x)
    torch.testing.assert_close(block(x), expected, rtol=1e-5, atol=1e-5)


def test_attention_goes_where_it_is_asked_and_leaves_the_other_names_alone():
    """improved_cpu: attention after every block at 16 and 8 pixels of a 32-pixel image and in the
    middle; its other parameters are named as in the same U-Net without attention."""
    net = build_unet("improved_cpu", 3, 32, 2, 1000)
    assert sorted(net.attention) == sorted(["down_1_0", "down_1_1", "down_2_0", "down_2_1", "middle",
                                            "up_0_0", "up_0_1", "up_0_2", "up_1_0", "up_1_1", "up_1_2"])
    plain = build_unet("improved_cpu", 3, 32, 2, 1000, attention_resolutions=())
    assert {k for k in net.state_dict() if not k.startswith("attention.")} == set(plain.state_dict())
    assert 1.6e6 < sum(p.numel() for p in net.parameters()) < 1.7e6
    randomise_readout(net)
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([1, 900])
    plain.load_state_dict(net.state_dict(), strict=False)  # attention blocks start as the identity
    torch.testing.assert_close(net(x, t), plain(x, t))


@pytest.fixture(scope="module")
def unet_run(tmp_path_factory):
    """A U-Net run on the tiny 8 x 8 images, trained through the CLI with bf16 autocast on the CPU,
    noise prediction and L_simple. Read-only."""
    folder = tmp_path_factory.mktemp("unet")
    run = folder / "run"
    args = ["train", write_tiny_images(folder), "--out", run, "--quiet", "--device", "cpu", "--set", "model.network=unet",
            "--set", "train.precision=bf16", "--set", "diffusion.parameterization=eps", "--set", "train.loss=simple"]
    assert main([str(a) for a in args]) == 0
    return run


def test_evaluate_and_sample_a_unet_run(unet_run, tmp_path, capsys):
    capsys.readouterr()
    assert main(["evaluate", str(unet_run), "--quiet", "--json"]) == 0
    e = json.loads(capsys.readouterr().out)
    assert e["n_examples"] == 12 and torch.isfinite(torch.tensor(e["K_bits"]))
    assert main(["sample", str(unet_run), "-n", "3", "--out", str(tmp_path / "s.npy"), "--quiet"]) == 0
    assert np.load(tmp_path / "s.npy").shape == (3, 1, 8, 8)


def test_unet_options_are_validated_through_the_cli(tiny_images, tmp_path, capsys):
    args = ["train", tiny_images, "--out", tmp_path / "r", "--quiet", "--set", "model.network=unet",
            "--set", "model.unet={depth = 2}"]
    assert main([str(a) for a in args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown U-Net option" in err


def test_fourier_period_auto_is_one_grey_level_of_the_data_and_rebuilds(tiny_images, tmp_path, capsys):
    """model.fourier = "auto" on 8-bit images: two images one grey level apart are one period apart
    in the model's units, the reason is recorded, and evaluation rebuilds the network with it. On
    the conv net it resolves to 0, and a period set for the conv net is refused in one line."""
    run = tmp_path / "run"
    args = ["train", tiny_images, "--out", run, "--quiet", "--set", "model.network=unet", "--set", "model.fourier=auto",
            "--set", "diffusion.parameterization=eps"]
    assert main([str(a) for a in args]) == 0
    loaded = load_run(run)
    period = loaded.config.model.fourier
    grey = np.full((1, 1, 8, 8), 100, np.uint8)
    one_level = loaded.dataset.to_model(grey + 1, dequantize=False) - loaded.dataset.to_model(grey, dequantize=False)
    torch.testing.assert_close(one_level, torch.full_like(one_level, period), rtol=1e-5, atol=0)
    assert loaded.model.stem.in_channels == 5 and "grey level" in loaded.config.auto["model.fourier"]
    capsys.readouterr()
    assert main(["evaluate", str(run), "--quiet", "--json"]) == 0
    assert np.isfinite(json.loads(capsys.readouterr().out)["K_bits"])

    conv = tmp_path / "conv"
    assert main([str(a) for a in ["train", tiny_images, "--out", conv, "--quiet", "--set", "model.fourier=auto"]]) == 0
    assert load_run(conv).config.model.fourier == 0.0
    assert main([str(a) for a in ["train", tiny_images, "--out", tmp_path / "bad", "--quiet",
                                  "--set", "model.fourier=0.01"]]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "fourier = 0.01 is for network = 'unet'" in err


def test_fully_convolutional_runs_inpaint_and_denoise_larger_images(unet_run, tiny_images, tmp_path, capsys):
    """Paper Fig. 5 inpaints a large image with a network trained on small crops: a U-Net run
    trained on 8 x 8 images fills a hole in a 12 x 16 image, known pixels exactly kept; sides
    that the U-Net's pooling does not divide, and a network with a dense pathway (tied to its
    trained size), are one-line errors."""
    run = unet_run
    image = np.random.default_rng(0).integers(0, 256, (1, 12, 16)).astype(float)
    mask = np.ones((1, 12, 16))
    mask[:, 4:8, 6:10] = 0
    np.save(tmp_path / "big.npy", image)
    np.save(tmp_path / "mask.npy", mask)
    args = ["inpaint", str(run), "--input", str(tmp_path / "big.npy"), "--mask", str(tmp_path / "mask.npy"), "-n", "2", "--quiet"]
    assert main([*args, "--out", str(tmp_path / "i.npz")]) == 0
    samples = np.load(tmp_path / "i.npz")["samples"]
    assert samples.shape == (2, 1, 1, 12, 16)
    assert (samples[:, 0][:, mask.astype(bool)] == image[mask.astype(bool)]).all()
    assert main(["denoise", str(run), "--input", str(tmp_path / "big.npy"), "--sigma", "30", "-n", "1", "--quiet",
                 "--out", str(tmp_path / "d.npz")]) == 0
    assert np.load(tmp_path / "d.npz")["mean"].shape == (1, 1, 12, 16)

    np.save(tmp_path / "odd.npy", image[:, :11])
    np.save(tmp_path / "odd_mask.npy", mask[:, :11])
    capsys.readouterr()
    assert main(["inpaint", str(run), "--input", str(tmp_path / "odd.npy"), "--mask", str(tmp_path / "odd_mask.npy"),
                 "--quiet", "--out", str(tmp_path / "o.npz")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "divisible by 2" in err

    conv = tmp_path / "conv"  # the small conv preset has a dense pathway: its size is fixed
    assert main(["train", str(tiny_images), "--out", str(conv), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["inpaint", str(conv), *args[2:], "--out", str(tmp_path / "c.npz")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not fit run" in err and "divisible" not in err
