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

Options: :class:`ConvNetOptions`; presets: :data:`PRESETS`, built with :func:`build_conv_net`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from thermodiff.nets.presets import from_preset
from thermodiff.nets.vector import N_BASIS, WIDTH_FACTOR, activation_layer, basis_at, check_image_shape, temporal_basis

__all__ = ["PRESETS", "ConvNetOptions", "ConvReverseNet", "MultiScaleConv", "auto_n_scales", "build_conv_net",
           "preset_kwargs"]


def auto_n_scales(size: int, min_size: int = 4) -> int:
    """The most scales such that the coarsest image (size / 2^(n-1)) is a whole number of pixels
    and at least ``min_size`` wide: 8 -> 2, 28 -> 3 (28, 14, 7), 32 -> 4 (32, 16, 8, 4)."""
    n = 1
    while size % 2**n == 0 and size // 2**n >= min_size:
        n += 1
    return n


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


@dataclass(frozen=True)
class ConvNetOptions:
    """The options of :class:`ConvReverseNet` (see the module docstring). The defaults are the
    reference code's (its MNIST run): leaky ReLU 0.05, a single scale; dense pathway
    784 -> 500 -> 500 -> 500 -> 2 per pixel; upper half 22 -> 20 -> K*C*10."""

    n_conv_layers: int = 4
    conv_channels: int = 20
    n_scales: int | str = 1  # or "auto" (:func:`auto_n_scales`)
    filter_size: int = 3
    conv_activation: str = "leaky_relu"
    n_dense_layers: int = 3
    dense_hidden: int = 500
    dense_out_per_pixel: int = 2
    dense_activation: str = "leaky_relu"
    dense_output_activation: bool = True
    balance_paths: bool = True
    n_upper_layers: int = 1
    upper_hidden: int = 20
    upper_activation: str = "leaky_relu"
    n_basis: int = N_BASIS
    width_factor: float = WIDTH_FACTOR
    readout_init_scale: float = 0.1


def _checked(size: int, o: ConvNetOptions) -> ConvNetOptions:
    """``o`` with ``n_scales`` resolved and a disabled pathway's sizes zeroed; ValueError if it
    cannot be built for images of side ``size``."""
    for name in ("n_conv_layers", "conv_channels", "n_dense_layers", "dense_hidden", "dense_out_per_pixel",
                 "n_upper_layers", "upper_hidden"):
        value = getattr(o, name)
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    n_scales = auto_n_scales(size) if o.n_scales == "auto" else o.n_scales
    if not isinstance(n_scales, int) or n_scales < 1:
        raise ValueError(f"n_scales must be a positive integer or 'auto', got {n_scales!r}")
    if size % 2 ** (n_scales - 1) != 0:
        raise ValueError(
            f"image size {size} is not divisible by 2^(n_scales - 1) = {2 ** (n_scales - 1)} "
            f"(n_scales = {n_scales}); choose fewer scales or n_scales='auto'")
    for name in (o.conv_activation, o.dense_activation, o.upper_activation):
        activation_layer(name)  # validates the name
    if o.n_basis < 2:
        raise ValueError(f"n_basis must be >= 2, got {o.n_basis}")
    use_conv = o.n_conv_layers > 0 and o.conv_channels > 0
    use_dense = o.dense_out_per_pixel > 0 and o.dense_hidden > 0
    if not (use_conv or use_dense):
        raise ValueError("both pathways are disabled: need n_conv_layers > 0 (and conv_channels > 0) "
                         "or dense_out_per_pixel > 0 and dense_hidden > 0")
    if o.n_upper_layers > 0 and o.upper_hidden < 1:
        raise ValueError("upper_hidden must be >= 1 when n_upper_layers > 0")
    return replace(o, n_scales=n_scales, n_conv_layers=o.n_conv_layers if use_conv else 0,
                   dense_hidden=o.dense_hidden if use_dense else 0,
                   dense_out_per_pixel=o.dense_out_per_pixel if use_dense else 0)


class ConvReverseNet(nn.Module):
    """Reverse model for (N, C, H, W) images, H = W = ``size``; see the module docstring.

    The keyword ``options`` are the fields of :class:`ConvNetOptions`. ``config`` holds every
    constructor argument (resolved), so ``ConvReverseNet(**net.config)`` rebuilds the same
    architecture for a state_dict.
    """

    def __init__(self, channels: int, size: int, outputs_per_dim: int, T: int, **options):
        super().__init__()
        for name, value in (("channels", channels), ("size", size), ("outputs_per_dim", outputs_per_dim), ("T", T)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        o = _checked(size, ConvNetOptions(**options))
        self.config = dict(channels=channels, size=size, outputs_per_dim=outputs_per_dim, T=T, **asdict(o))
        self.channels, self.size, self.outputs_per_dim, self.T = channels, size, outputs_per_dim, T
        self.n_basis, self.n_scales = o.n_basis, o.n_scales
        # lower half: multi-scale convolutions and the dense pathway, in parallel
        self.conv = self._conv_pathway(o) if o.n_conv_layers else None
        self.dense = self._dense_pathway(o) if o.dense_out_per_pixel else None
        conv_out = o.conv_channels if self.conv is not None else 0
        self.n_features = conv_out + o.dense_out_per_pixel
        scale = o.balance_paths and self.conv is not None and self.dense is not None
        self.conv_scale = conv_out**-0.5 if scale else 1.0
        self.dense_scale = o.dense_out_per_pixel**-0.5 if scale else 1.0

        # upper half: per-pixel MLP (1x1 convolutions), then the linear readout of coefficients
        layers, width = [], self.n_features
        for _ in range(o.n_upper_layers):
            layers += [nn.Conv2d(width, o.upper_hidden, 1), activation_layer(o.upper_activation)]
            width = o.upper_hidden
        self.upper = nn.Sequential(*layers)
        self.readout = nn.Conv2d(width, outputs_per_dim * channels * o.n_basis, 1)

        # temporal readout weights g(t), rows t - 1 (paper Eqs. 62-63)
        self.register_buffer("basis", temporal_basis(T, o.n_basis, o.width_factor))
        self.reset_parameters()

    def _conv_pathway(self, o: ConvNetOptions) -> nn.Sequential:
        layers, width = [], self.channels
        for _ in range(o.n_conv_layers):
            layers += [MultiScaleConv(width, o.conv_channels, o.n_scales, o.filter_size),
                       activation_layer(o.conv_activation)]
            width = o.conv_channels
        return nn.Sequential(*layers)

    def _dense_pathway(self, o: ConvNetOptions) -> nn.Sequential:
        """The flattened image through the dense layers, to ``dense_out_per_pixel`` maps."""
        layers, width = [], self.channels * self.size * self.size
        for _ in range(o.n_dense_layers):
            layers += [nn.Linear(width, o.dense_hidden), activation_layer(o.dense_activation)]
            width = o.dense_hidden
        layers.append(nn.Linear(width, o.dense_out_per_pixel * self.size * self.size))
        if o.dense_output_activation:
            layers.append(activation_layer(o.dense_activation))
        return nn.Sequential(*layers)

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


_PAPER = ConvNetOptions(n_scales="auto", conv_activation="softplus", dense_activation="tanh", upper_activation="tanh",
                        width_factor=1.0)

#: Named architectures, built with :func:`build_conv_net`.
PRESETS: dict[str, ConvNetOptions] = {
    # the reference code's defaults (its MNIST run)
    "reference_mnist": ConvNetOptions(),
    # the reference README's CIFAR-10 command: n_layers_conv=6, n_hidden_conv=100,
    # n_hidden_dense_lower=1000 (6 dense maps: 5 hidden layers), 5 outputs per pixel,
    # n_layers_dense_upper=4 (3 hidden layers of 100 + the readout)
    "reference_cifar10": ConvNetOptions(n_conv_layers=6, conv_channels=100, n_dense_layers=5, dense_hidden=1000,
                                        dense_out_per_pixel=5, n_upper_layers=3, upper_hidden=100),
    # the paper's text: multi-scale (coarsest scale >= 4 pixels), softplus after the multi-scale
    # sum, tanh in the dense and 1x1 layers, bump width = the centre spacing; dense pathway in
    # parallel (its CIFAR-10 network). Widths are the reference code's (the text gives none).
    "paper": _PAPER,
    # the paper's MNIST network: the dense pathway only
    "paper_mnist": replace(_PAPER, n_conv_layers=0),
    # fast on a CPU, for tests and demos: two multi-scale layers, a small dense pathway
    "small": ConvNetOptions(n_conv_layers=2, conv_channels=16, n_scales="auto", n_dense_layers=1, dense_hidden=64,
                            dense_out_per_pixel=2, n_upper_layers=1, upper_hidden=32, n_basis=6),
}


def preset_kwargs(preset: str, **overrides) -> dict:
    """The preset's keyword arguments with ``overrides`` applied (unknown names are errors)."""
    return asdict(from_preset("conv-net", PRESETS, preset, overrides))


def build_conv_net(preset: str, channels: int, size: int, outputs_per_dim: int, T: int,
                   **overrides) -> ConvReverseNet:
    """The named architecture (a key of :data:`PRESETS`) for ``channels`` x ``size`` x ``size``
    images, K = ``outputs_per_dim``, T steps; ``overrides`` replace preset options.

    Raises ValueError for an unknown preset or option, or a size not divisible by 2^(n_scales-1).
    """
    return ConvReverseNet(channels, size, outputs_per_dim, T, **preset_kwargs(preset, **overrides))
