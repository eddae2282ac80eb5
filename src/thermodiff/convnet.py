"""Convolutional reverse-model network for images (paper App. D.2.1 and Fig. D.1).

``net(x_t, t) -> z`` maps images ``x_t`` of shape (N, C, H, W) and the paper's 1-based times
``t`` (LongTensor (N,), values 1..T) to ``z`` of shape (N, K, C, H, W), K = ``outputs_per_dim``
(2 for Gaussian diffusion: z_mu, z_Sigma; 1 for binomial).

The network, as in the paper and its reference code (``regression.MLP_conv_dense``):

1. lower half, in parallel:

   - multi-scale convolution: ``n_conv_layers`` layers of ``conv_channels`` channels; in each,
     for every scale s = 0..n_scales-1 the layer input is mean-pooled by 2^s, convolved with its
     own ``filter_size`` x ``filter_size`` kernel (zero "same" padding), upsampled back to full
     resolution (nearest neighbour), the scales are summed, then the nonlinearity is applied
     (the paper's text; the reference code applies the nonlinearity per scale and averages);
   - optionally a dense pathway: the flattened image through ``n_dense_layers`` fully connected
     layers of ``dense_hidden`` units, then a linear map to ``dense_out_per_pixel * H * W``
     outputs (followed by the nonlinearity too when ``dense_output_activation``, as in the
     reference code), reshaped to (N, dense_out_per_pixel, H, W).

   The two are concatenated along channels; with both present, each is divided by the square
   root of its channel count first (``balance_paths``, as the reference code does).
2. upper half: a per-pixel MLP as 1x1 convolutions, ``n_upper_layers`` layers of
   ``upper_hidden`` channels with the nonlinearity, then a linear 1x1 convolution to K*C*J
   channels (the readout coefficients).
3. temporal readout (paper Eqs. 62-63): the coefficients, viewed as (N, K, C, J, H, W), are
   contracted with the bump weights g(t) = ``temporal_basis(T, J, width_factor)[t - 1]``.

Time enters only in step 3: the body (:meth:`ConvReverseNet.coefficients`) is shared across t.

Initialisation (reference code): convolution weights N(0, std = sqrt(1 / out_channels) /
filter_size**2), fully connected and 1x1 weights orthogonal, biases 0. The final 1x1 readout
convolution is orthogonal scaled by ``readout_init_scale`` (0.1), so z starts near 0 and the
reverse kernel starts near the forward kernel (the reference code leaves it unscaled).

``n_conv_layers = 0`` removes the convolutional pathway (the paper's MNIST network: dense pathway
only); ``dense_out_per_pixel = 0`` or ``dense_hidden = 0`` removes the dense pathway (the
reference code's switch). At least one must remain.

Presets: :data:`PRESETS`, built with :func:`build_conv_net`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from thermodiff.networks import ACTIVATIONS, basis_at, check_image_shape, temporal_basis

__all__ = ["PRESETS", "ConvReverseNet", "MultiScaleConv", "auto_n_scales", "build_conv_net", "preset_kwargs"]


def auto_n_scales(size: int, min_size: int = 4) -> int:
    """The most scales such that the coarsest image (size / 2^(n-1)) is a whole number of pixels
    and at least ``min_size`` wide: 8 -> 2, 28 -> 3 (28, 14, 7), 32 -> 4 (32, 16, 8, 4)."""
    n = 1
    while size % 2**n == 0 and size // 2**n >= min_size:
        n += 1
    return n


def _activation(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; choose from {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


class MultiScaleConv(nn.Module):
    """One multi-scale convolution layer, before its nonlinearity (paper App. D.2.1):
    sum over s of upsample_{2^s}(conv_s(meanpool_{2^s}(x))).

    Computed coarse to fine, as the reference code does: pooling by 2 repeatedly, and
    acc <- upsample_2(acc) + conv_s(pool_s), which equals the sum of the separately upsampled
    scales. Only the finest scale's convolution has a bias (the biases of the coarser scales
    would add the same constant per channel, so they are redundant).
    """

    def __init__(self, in_channels: int, out_channels: int, n_scales: int, filter_size: int = 3):
        super().__init__()
        if n_scales < 1:
            raise ValueError(f"n_scales must be >= 1, got {n_scales}")
        if filter_size < 1 or filter_size % 2 == 0:
            raise ValueError(f"filter_size must be odd and positive, got {filter_size}")
        self.n_scales = n_scales
        self.convs = nn.ModuleList(
            nn.Conv2d(in_channels, out_channels, filter_size, padding=filter_size // 2, bias=(s == 0))
            for s in range(n_scales)
        )

    def forward(self, x: Tensor) -> Tensor:
        pyramid = [x]
        for _ in range(1, self.n_scales):
            pyramid.append(F.avg_pool2d(pyramid[-1], 2))
        acc = self.convs[-1](pyramid[-1])
        for s in range(self.n_scales - 2, -1, -1):
            acc = F.interpolate(acc, scale_factor=2, mode="nearest") + self.convs[s](pyramid[s])
        return acc


class ConvReverseNet(nn.Module):
    """Reverse model for (N, C, H, W) images, H = W = ``size``; see the module docstring.

    Keyword defaults are the reference code's (MNIST) defaults. ``n_scales`` may be ``"auto"``
    (:func:`auto_n_scales`). ``config`` holds every constructor argument (resolved), so
    ``ConvReverseNet(**net.config)`` rebuilds the same architecture for a state_dict.
    """

    def __init__(
        self,
        channels: int,
        size: int,
        outputs_per_dim: int,
        T: int,
        *,
        n_conv_layers: int = 4,
        conv_channels: int = 20,
        n_scales: int | str = 1,
        filter_size: int = 3,
        conv_activation: str = "leaky_relu",
        n_dense_layers: int = 3,
        dense_hidden: int = 500,
        dense_out_per_pixel: int = 2,
        dense_activation: str = "leaky_relu",
        dense_output_activation: bool = True,
        balance_paths: bool = True,
        n_upper_layers: int = 1,
        upper_hidden: int = 20,
        upper_activation: str = "leaky_relu",
        n_basis: int = 10,
        width_factor: float = 0.5,
        readout_init_scale: float = 0.1,
    ):
        super().__init__()
        for name, value in (("channels", channels), ("size", size), ("outputs_per_dim", outputs_per_dim), ("T", T)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name, value in (("n_conv_layers", n_conv_layers), ("conv_channels", conv_channels),
                            ("n_dense_layers", n_dense_layers), ("dense_hidden", dense_hidden),
                            ("dense_out_per_pixel", dense_out_per_pixel), ("n_upper_layers", n_upper_layers),
                            ("upper_hidden", upper_hidden)):
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        if n_scales == "auto":
            n_scales = auto_n_scales(size)
        if not isinstance(n_scales, int) or n_scales < 1:
            raise ValueError(f"n_scales must be a positive integer or 'auto', got {n_scales!r}")
        if size % 2 ** (n_scales - 1) != 0:
            raise ValueError(
                f"image size {size} is not divisible by 2^(n_scales - 1) = {2 ** (n_scales - 1)} "
                f"(n_scales = {n_scales}); choose fewer scales or n_scales='auto'")
        for name in (conv_activation, dense_activation, upper_activation):
            _activation(name)  # validates the name
        if n_basis < 2:
            raise ValueError(f"n_basis must be >= 2, got {n_basis}")
        use_conv = n_conv_layers > 0 and conv_channels > 0
        use_dense = dense_out_per_pixel > 0 and dense_hidden > 0
        if not (use_conv or use_dense):
            raise ValueError("both pathways are disabled: need n_conv_layers > 0 (and conv_channels > 0) "
                             "or dense_out_per_pixel > 0 and dense_hidden > 0")
        if n_upper_layers > 0 and upper_hidden < 1:
            raise ValueError("upper_hidden must be >= 1 when n_upper_layers > 0")

        self.config = dict(
            channels=channels, size=size, outputs_per_dim=outputs_per_dim, T=T,
            n_conv_layers=n_conv_layers if use_conv else 0, conv_channels=conv_channels, n_scales=n_scales,
            filter_size=filter_size, conv_activation=conv_activation,
            n_dense_layers=n_dense_layers, dense_hidden=dense_hidden if use_dense else 0,
            dense_out_per_pixel=dense_out_per_pixel if use_dense else 0,
            dense_activation=dense_activation, dense_output_activation=dense_output_activation,
            balance_paths=balance_paths, n_upper_layers=n_upper_layers, upper_hidden=upper_hidden,
            upper_activation=upper_activation, n_basis=n_basis, width_factor=width_factor,
            readout_init_scale=readout_init_scale,
        )
        self.channels, self.size, self.outputs_per_dim, self.T = channels, size, outputs_per_dim, T
        self.n_basis, self.n_scales = n_basis, n_scales

        # lower half: multi-scale convolutions
        self.conv = None
        if use_conv:
            layers, width = [], channels
            for _ in range(n_conv_layers):
                layers += [MultiScaleConv(width, conv_channels, n_scales, filter_size), _activation(conv_activation)]
                width = conv_channels
            self.conv = nn.Sequential(*layers)
        # lower half: dense pathway on the flattened image
        self.dense = None
        if use_dense:
            layers, width = [], channels * size * size
            for _ in range(n_dense_layers):
                layers += [nn.Linear(width, dense_hidden), _activation(dense_activation)]
                width = dense_hidden
            layers.append(nn.Linear(width, dense_out_per_pixel * size * size))
            if dense_output_activation:
                layers.append(_activation(dense_activation))
            self.dense = nn.Sequential(*layers)
        conv_out = conv_channels if use_conv else 0
        dense_out = dense_out_per_pixel if use_dense else 0
        self.n_features = conv_out + dense_out
        scale = balance_paths and use_conv and use_dense
        self.conv_scale = conv_out**-0.5 if scale else 1.0
        self.dense_scale = dense_out**-0.5 if scale else 1.0

        # upper half: per-pixel MLP (1x1 convolutions), then the linear readout of coefficients
        layers, width = [], self.n_features
        for _ in range(n_upper_layers):
            layers += [nn.Conv2d(width, upper_hidden, 1), _activation(upper_activation)]
            width = upper_hidden
        self.upper = nn.Sequential(*layers)
        self.readout = nn.Conv2d(width, outputs_per_dim * channels * n_basis, 1)

        # temporal readout weights g(t), rows t - 1 (paper Eqs. 62-63)
        self.register_buffer("basis", temporal_basis(T, n_basis, width_factor))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The reference code's initialisation (module docstring)."""
        for module in self.modules():
            if isinstance(module, MultiScaleConv):
                for conv in module.convs:
                    k = conv.kernel_size[0]
                    conv.weight.normal_(0.0, (1.0 / conv.out_channels) ** 0.5 / k**2)
                    if conv.bias is not None:
                        conv.bias.zero_()
        layers = [m for m in (self.dense or []) if isinstance(m, nn.Linear)]
        layers += [m for m in self.upper if isinstance(m, nn.Conv2d)]
        for layer in layers:
            nn.init.orthogonal_(layer.weight)
            layer.bias.zero_()
        nn.init.orthogonal_(self.readout.weight, gain=self.config["readout_init_scale"])
        self.readout.bias.zero_()

    @property
    def size_multiple(self) -> int | None:
        """Without the dense pathway the network is fully convolutional: it takes images of any
        size divisible by the coarsest pooling, 2^(n_scales - 1) (paper Fig. 5 inpaints a large
        image with a network trained on small crops). None: only the trained size."""
        return None if self.dense is not None else 2 ** (self.n_scales - 1)

    def features(self, x: Tensor) -> Tensor:
        """The lower half's output (N, n_features, H, W): conv and dense features concatenated."""
        if x.ndim != 4:
            raise ValueError(f"expected a batch of images (N, C, H, W), got shape {tuple(x.shape)}")
        check_image_shape(x.shape[1:], self.channels, self.size, self.size_multiple)
        parts = []
        if self.conv is not None:
            h = self.conv(x)
            parts.append(h * self.conv_scale if self.conv_scale != 1.0 else h)
        if self.dense is not None:
            d = self.dense(x.flatten(1)).unflatten(1, (-1, self.size, self.size))
            if parts and not parts[0].is_contiguous() and parts[0].is_contiguous(memory_format=torch.channels_last):
                d = d.contiguous(memory_format=torch.channels_last)  # stay channels-last
            parts.append(d * self.dense_scale if self.dense_scale != 1.0 else d)
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def coefficients(self, x: Tensor) -> Tensor:
        """The time-shared body: readout coefficients, shape (N, K, C, J, H, W)."""
        c = self.readout(self.upper(self.features(x)))
        return c.unflatten(1, (self.outputs_per_dim, self.channels, self.n_basis))

    def forward(self, x_t: Tensor, t: Tensor) -> Tensor:
        coeffs = self.coefficients(x_t)
        g = basis_at(self.basis, t, self.config["width_factor"]).to(coeffs.dtype)  # (N, J)
        return torch.einsum("nkcjhw,nj->nkchw", coeffs, g)

    def extra_repr(self) -> str:
        c = self.config
        return (f"channels={c['channels']}, size={c['size']}, K={c['outputs_per_dim']}, T={c['T']}, "
                f"n_scales={c['n_scales']}, J={c['n_basis']}")


_REFERENCE = dict(
    n_conv_layers=4, conv_channels=20, n_scales=1, filter_size=3, conv_activation="leaky_relu",
    n_dense_layers=3, dense_hidden=500, dense_out_per_pixel=2, dense_activation="leaky_relu",
    dense_output_activation=True, balance_paths=True,
    n_upper_layers=1, upper_hidden=20, upper_activation="leaky_relu",
    n_basis=10, width_factor=0.5, readout_init_scale=0.1,
)

#: Named architectures: constructor keyword arguments for :class:`ConvReverseNet`.
PRESETS: dict[str, dict] = {
    # the reference code's defaults (its MNIST run): leaky ReLU 0.05, single scale; dense path
    # 784 -> 500 -> 500 -> 500 -> 2 per pixel; upper 22 -> 20 -> K*C*10
    "reference_mnist": dict(_REFERENCE),
    # the reference README's CIFAR-10 command: n_layers_conv=6, n_hidden_conv=100,
    # n_hidden_dense_lower=1000 (6 dense maps: 5 hidden layers), 5 outputs per pixel,
    # n_layers_dense_upper=4 (3 hidden layers of 100 + the readout)
    "reference_cifar10": dict(_REFERENCE, n_conv_layers=6, conv_channels=100, n_dense_layers=5,
                              dense_hidden=1000, dense_out_per_pixel=5, n_upper_layers=3, upper_hidden=100),
    # the paper's text: multi-scale (coarsest scale >= 4 pixels), softplus after the multi-scale
    # sum, tanh in the dense and 1x1 layers, bump width = the centre spacing; dense pathway in
    # parallel (its CIFAR-10 network). Widths are the reference code's (the text gives none).
    "paper": dict(_REFERENCE, n_scales="auto", conv_activation="softplus", dense_activation="tanh",
                  upper_activation="tanh", width_factor=1.0),
    # the paper's MNIST network: the dense pathway only
    "paper_mnist": dict(_REFERENCE, n_conv_layers=0, n_scales="auto", conv_activation="softplus",
                        dense_activation="tanh", upper_activation="tanh", width_factor=1.0),
    # fast on a CPU, for tests and demos: two multi-scale layers, a small dense pathway
    "small": dict(_REFERENCE, n_conv_layers=2, conv_channels=16, n_scales="auto", n_dense_layers=1,
                  dense_hidden=64, dense_out_per_pixel=2, n_upper_layers=1, upper_hidden=32, n_basis=6),
}


def preset_kwargs(preset: str, **overrides) -> dict:
    """The preset's keyword arguments with ``overrides`` applied (unknown names are errors)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown conv-net preset {preset!r}; choose from {sorted(PRESETS)}")
    unknown = sorted(set(overrides) - set(_REFERENCE))
    if unknown:
        raise ValueError(f"unknown conv-net option(s) {unknown}; valid options: {sorted(_REFERENCE)}")
    return {**PRESETS[preset], **overrides}


def build_conv_net(preset: str, channels: int, size: int, outputs_per_dim: int, T: int,
                   **overrides) -> ConvReverseNet:
    """The named architecture (a key of :data:`PRESETS`) for ``channels`` x ``size`` x ``size``
    images, K = ``outputs_per_dim``, T steps; ``overrides`` replace preset options.

    Raises ValueError for an unknown preset or option, or a size not divisible by 2^(n_scales-1).
    """
    return ConvReverseNet(channels, size, outputs_per_dim, T, **preset_kwargs(preset, **overrides))
