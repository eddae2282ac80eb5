"""A time-conditioned U-Net reverse-model network for images (Ho et al. 2020, after PixelCNN++).

The paper's network (:mod:`thermodiff.nets.convnet`) shares its whole body across t and lets time in
only through the readout. This one, the architecture of the diffusion models that followed, feeds
t to every residual block, so each block can act differently at each noise level; that matters
most for denoising, where the network must be a good E[x_0 | x_t] at one particular t.

``net(x_t, t) -> z`` has the same contract as every reverse network here: images (N, C, H, W),
the paper's 1-based integer steps t (values 1..T) or continuous times in [0, 1] (floating
point, :mod:`thermodiff.process.vdm`), output (N, K, C, H, W) with K = ``outputs_per_dim``. Step t of T
sits at s = (t - 1) / (T - 1), as for the bump readout, so one network serves both. With
``one_hot_states`` S (categorical diffusion) the images hold integer states 0..S-1, fed to the stem
as one-hot codes, C S channels, as Hoogeboom et al. (2021) and D3PM feed theirs.

Layout: a 3x3 stem (over x_t and, with ``fourier_period`` p > 0, sin and cos of 2 pi x_t / p and of
2 pi x_t / 2p per channel), then per resolution ``blocks_per_level`` residual blocks (GroupNorm, SiLU,
3x3 convolution, the time embedding added per channel, again, dropout before the second
convolution), 2x mean-pool down between levels (the stem, every block and every pooling keep
their output as a skip); a middle pair of blocks; the mirror image up
(nearest-neighbour upsampling, a 3x3 convolution), each block taking the matching skip by
concatenation. The last convolution starts at zero, so z starts at 0 and the reverse kernel at
the forward one, as ``readout_init_scale`` does for the paper's network. Self-attention
(improved-diffusion's AttentionBlock) follows every block at the pixel sizes listed in
``attention_resolutions``, and sits between the middle pair when the coarsest size is listed; the
presets have none: at these sizes it costs more CPU time than it gains (``improved_cpu``, the
yardstick with attention at 16 and 8 pixels, measures that).

Options: :class:`UNetOptions`; presets: :data:`UNET_PRESETS`, built with :func:`build_unet`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from thermodiff.nets.presets import from_preset
from thermodiff.nets.vector import check_image_shape, continuous_time, timestep_embedding

__all__ = ["UNET_PRESETS", "UNet", "UNetOptions", "build_unet"]


class ResBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, emb_dim: int, groups: int, dropout: float):
        super().__init__()
        self.in_layers = nn.Sequential(nn.GroupNorm(groups, in_channels), nn.SiLU(),
                                       nn.Conv2d(in_channels, out_channels, 3, padding=1))
        self.emb = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, out_channels))
        self.out_layers = nn.Sequential(nn.GroupNorm(groups, out_channels), nn.SiLU(), nn.Dropout(dropout),
                                        nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.in_layers(x) + self.emb(emb)[:, :, None, None]
        return self.skip(x) + self.out_layers(h)


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the pixels, added to its input (improved-diffusion's
    AttentionBlock); the output projection starts at zero, so the block starts as the identity."""

    def __init__(self, channels: int, groups: int, heads: int):
        super().__init__()
        if channels % heads:
            raise ValueError(f"attention heads {heads} must divide the width {channels}")
        self.heads = heads
        self.norm = nn.GroupNorm(groups, channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj = nn.Conv1d(channels, channels, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x).flatten(2)).reshape(n, 3, self.heads, c // self.heads, h * w).unbind(1)
        a = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        return x + self.proj(a.transpose(-1, -2).reshape(n, c, h * w)).view(n, c, h, w)


@dataclass(frozen=True)
class UNetOptions:
    """The options of :class:`UNet`: ``len(channel_mults)`` resolutions of ``base_channels * mult``
    channels, ``blocks_per_level`` residual blocks each, GroupNorm over ``groups`` groups. The
    defaults are the ``cpu`` preset's."""

    base_channels: int = 32
    channel_mults: tuple[int, ...] = (1, 2, 2)
    blocks_per_level: int = 1
    dropout: float = 0.0
    groups: int = 8
    attention_resolutions: tuple[int, ...] = ()  # pixel sizes with self-attention after every block
    heads: int = 1  # attention heads
    fourier_period: float = 0.0  # > 0: Fourier features of x_t at this period and twice it join the input

    @property
    def widths(self) -> list[int]:
        """The channels of each resolution, finest first."""
        return [self.base_channels * m for m in self.channel_mults]


def _check_options(o: UNetOptions, size: int, T: int, one_hot_states: int | None) -> None:
    """Refuse options no U-Net can be built from, each with what to change."""
    levels = len(o.channel_mults)
    if levels < 1 or size % 2 ** (levels - 1):
        raise ValueError(f"image size {size} must be divisible by 2^(levels - 1) = {2 ** (levels - 1)}")
    if any(w % o.groups for w in [o.base_channels, *o.widths]):
        raise ValueError(f"every width {[o.base_channels, *o.widths]} must be divisible by groups = {o.groups}")
    if T < 2:
        raise ValueError("the U-Net needs T >= 2 (times are scaled by T - 1)")
    if o.fourier_period < 0 or (o.fourier_period > 0 and one_hot_states is not None):
        raise ValueError(f"fourier_period must be 0, or > 0 for continuous images, got {o.fourier_period}")


class UNet(nn.Module):
    """U-Net over ``channels`` x ``size`` x ``size`` images (module docstring); the keyword
    ``options`` are the fields of :class:`UNetOptions`."""

    def __init__(self, channels: int, size: int, outputs_per_dim: int, T: int, one_hot_states: int | None = None,
                 **options):
        super().__init__()
        o = UNetOptions(**options)
        _check_options(o, size, T, one_hot_states)
        base_channels, groups = o.base_channels, o.groups
        self.channels, self.size, self.outputs_per_dim, self.T = channels, size, outputs_per_dim, T
        self.one_hot_states = one_hot_states
        self.config = dict(channels=channels, size=size, outputs_per_dim=outputs_per_dim, T=T,
                           one_hot_states=one_hot_states, **asdict(o)) | {
            "channel_mults": list(o.channel_mults), "attention_resolutions": list(o.attention_resolutions)}
        emb_dim = 4 * base_channels
        self.sinusoid_dim = base_channels
        self.time_mlp = nn.Sequential(nn.Linear(base_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        # angular frequencies of the Fourier features: one cycle per period p and per 2p
        frequencies = [2 * math.pi / (k * o.fourier_period) for k in (1, 2)] if o.fourier_period else []
        self.register_buffer("fourier_frequencies", torch.tensor(frequencies), persistent=False)
        inputs_per_channel = (one_hot_states or 1) + 2 * len(frequencies)
        self.stem = nn.Conv2d(channels * inputs_per_channel, base_channels, 3, padding=1)
        width = self._build_levels(o, size, emb_dim)
        self.out = nn.Sequential(nn.GroupNorm(groups, width), nn.SiLU(),
                                 nn.Conv2d(width, outputs_per_dim * channels, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    def _build_levels(self, o: UNetOptions, size: int, emb_dim: int) -> int:
        """The down path, the middle and the up path, with attention where ``o`` asks; returns the
        width of the last up block. Modules are made in a fixed order, so a seed gives the same weights."""
        base_channels, groups, widths = o.base_channels, o.groups, o.widths
        levels = len(widths)

        def block(c_in: int, c_out: int) -> ResBlock:
            return ResBlock(c_in, c_out, emb_dim, groups, o.dropout)

        # keyed by the block they follow ("down_LEVEL_BLOCK", "middle", "up_LEVEL_BLOCK"): the blocks'
        # own parameter names stay those of a U-Net without attention
        self.attention = nn.ModuleDict()

        def attend_after(key: str, level: int, width: int) -> None:
            if size // 2 ** level in o.attention_resolutions:
                self.attention[key] = AttentionBlock(width, groups, o.heads)

        self.down = nn.ModuleList()
        skip_widths, width = [base_channels], base_channels
        for i, w in enumerate(widths):
            if i > 0:
                skip_widths.append(width)  # the pooled input of this level is a skip too
            level = nn.ModuleList()
            for j in range(o.blocks_per_level):
                level.append(block(width, w))
                width = w
                skip_widths.append(width)
                attend_after(f"down_{i}_{j}", i, width)
            self.down.append(level)
        self.middle = nn.ModuleList([block(width, width), block(width, width)])
        attend_after("middle", levels - 1, width)
        self.up = nn.ModuleList()
        self.up_convs = nn.ModuleList()  # after every level but the finest: upsample, then this convolution
        for i, w in reversed(list(enumerate(widths))):
            level = nn.ModuleList()
            for j in range(o.blocks_per_level + 1):
                level.append(block(width + skip_widths.pop(), w))
                width = w
                attend_after(f"up_{len(self.up)}_{j}", i, width)
            self.up.append(level)
            if i > 0:
                self.up_convs.append(nn.Conv2d(width, width, 3, padding=1))
        return width

    @property
    def size_multiple(self) -> int:
        """Fully convolutional: any image size divisible by the coarsest pooling, 2^(levels - 1)."""
        return 2 ** (len(self.down) - 1)

    def forward(self, x_t: Tensor, t: Tensor) -> Tensor:
        if x_t.ndim != 4:
            raise ValueError(f"expected a batch of images (N, C, H, W), got shape {tuple(x_t.shape)}")
        check_image_shape(x_t.shape[1:], self.channels, self.size, self.size_multiple)
        if self.one_hot_states is not None:  # integer states 0..S-1: (N, C, H, W) -> one-hot (N, C S, H, W)
            x_t = F.one_hot(x_t.round().long(), self.one_hot_states).movedim(-1, 2).flatten(1, 2)
            x_t = x_t.to(torch.get_default_dtype())
        x_t = self.with_fourier_features(x_t)
        emb = self.time_mlp(timestep_embedding(continuous_time(t, self.T), self.sinusoid_dim).to(x_t.dtype))
        h = self.stem(x_t)
        skips = [h]
        for i, level in enumerate(self.down):
            if i > 0:
                h = F.avg_pool2d(h, 2)
                skips.append(h)
            for j, blk in enumerate(level):
                h = self.attend(f"down_{i}_{j}", blk(h, emb))
                skips.append(h)
        h = self.middle[1](self.attend("middle", self.middle[0](h, emb)), emb)
        for i, level in enumerate(self.up):
            for j, blk in enumerate(level):
                h = self.attend(f"up_{i}_{j}", blk(torch.cat([h, skips.pop()], dim=1), emb))
            if i < len(self.up_convs):
                h = self.up_convs[i](F.interpolate(h, scale_factor=2, mode="nearest"))
        return self.out(h).unflatten(1, (self.outputs_per_dim, self.channels))

    def with_fourier_features(self, x_t: Tensor) -> Tensor:
        """``x_t`` and, per channel, sin and cos of each Fourier frequency times it (the Fourier
        features of VDM, Kingma et al. 2021: 2^6 and 2^7 cycles per unit of its [-1, 1] data, a
        period of two and of one grey level), so that at low noise the network sees where x_t lies
        within its grey level, which the bound's smallest steps turn on and a stack of smooth
        convolutions resolves poorly."""
        if not len(self.fourier_frequencies):
            return x_t
        angles = x_t.unsqueeze(2) * self.fourier_frequencies.to(x_t.dtype).view(-1, 1, 1)  # (N, C, F, H, W)
        return torch.cat([x_t, angles.sin().flatten(1, 2), angles.cos().flatten(1, 2)], dim=1)

    def attend(self, key: str, h: Tensor) -> Tensor:
        """``h`` through the attention block that follows block ``key``, if it has one."""
        return self.attention[key](h) if key in self.attention else h

    def extra_repr(self) -> str:
        c = self.config
        return f"channels={c['channels']}, size={c['size']}, K={c['outputs_per_dim']}, T={c['T']}, widths={c['base_channels']}x{c['channel_mults']}"


#: Named U-Net sizes, built with :func:`build_unet`.
UNET_PRESETS: dict[str, UNetOptions] = {
    # fast on a CPU, for tests and demos
    "small": UNetOptions(base_channels=16, channel_mults=(1, 2)),
    # a CPU budget for 32 x 32 images: 32 / 64 / 64 channels at 32 / 16 / 8 pixels, ~1M parameters
    "cpu": UNetOptions(),
    # the yardstick of improved-diffusion's recipe on a CPU budget: the cpu preset's widths, two blocks per
    # level and attention at 16 and 8 pixels, 64 channels a head as in its CIFAR-10 model (~1.7M parameters)
    "improved_cpu": UNetOptions(blocks_per_level=2, attention_resolutions=(16, 8), heads=1),
    # DDPM's CIFAR-10 widths (128 x (1, 2, 2, 2), 2 blocks per level, dropout 0.1), without attention
    "ddpm_cifar10": UNetOptions(base_channels=128, channel_mults=(1, 2, 2, 2), blocks_per_level=2, dropout=0.1,
                                groups=32),
}


def build_unet(preset: str, channels: int, size: int, outputs_per_dim: int, T: int, one_hot_states: int | None = None,
               **overrides) -> UNet:
    """The named U-Net (a key of :data:`UNET_PRESETS`) with ``overrides`` replacing its options.

    Raises ValueError for an unknown preset or option, or a size the levels do not divide.
    """
    return UNet(channels, size, outputs_per_dim, T, one_hot_states,
                **asdict(from_preset("U-Net", UNET_PRESETS, preset, overrides)))
