"""Reverse-model networks for vector data, and the temporal readout (paper App. D).

Every network here is a callable ``net(x_t, t) -> z`` of shape ``(N, K, D)`` with K outputs
per dimension (2 for Gaussian diffusion: z_mu, z_Sigma; 1 for binomial; the K categories' logits
of x_0 for categorical diffusion, whose states enter one-hot). As in the reference
code, time enters only through the readout: the hidden layers are shared across t, and the
last linear layer's weights depend on t, either separately per step or as a combination of
J bump functions of t. The bumps also take a continuous time s in [0, 1] (a floating-point t,
for continuous-time processes such as :mod:`thermodiff.process.vdm`), at the same positions: step t of
T sits at s = (t - 1) / (T - 1).
"""

import math
from enum import Enum

import numpy as np
import torch
from torch import Tensor, nn


class Readout(str, Enum):
    PER_STEP = "per_step"  # separate weights for every t (paper App. D.1)
    BUMPS = "bumps"  # J Gaussian bumps over t (paper Eqs. 62-63)


ACTIVATIONS = {
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
    "leaky_relu": lambda: nn.LeakyReLU(0.05),  # the reference code's slope
    "softplus": nn.Softplus,
    "silu": nn.SiLU,
}

#: The temporal readout's bumps J and their width in centre spacings: the reference code's (the
#: paper's text has width 1.0).
N_BASIS = 10
WIDTH_FACTOR = 0.5


def activation_layer(name: str) -> nn.Module:
    """A new module of the named nonlinearity (a key of :data:`ACTIVATIONS`)."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; choose from {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


def bump_weights(times: Tensor, n_basis: int, width_factor: float = WIDTH_FACTOR) -> Tensor:
    """Bump weights g_j(tau) at times tau in [-1, 1], shape (len(times), n_basis), each row
    summing to 1 (paper Eq. 63), in the dtype of ``times``.

    Centres linspace(-1, 1, J); width = ``width_factor`` times the centre spacing (the reference
    code uses 0.5, the paper's text 1.0).
    """
    if n_basis < 2:
        raise ValueError("the temporal basis needs at least 2 bumps")
    centres = torch.linspace(-1, 1, n_basis, dtype=times.dtype, device=times.device)
    width = width_factor * 2 / (n_basis - 1)
    log_bumps = -((times[:, None] - centres) ** 2) / (2 * width**2)
    return torch.softmax(log_bumps, dim=1)  # normalised in log space: no underflow between bumps


def temporal_basis(T: int, n_basis: int, width_factor: float = WIDTH_FACTOR) -> Tensor:
    """Bump weights g_j(t) for the steps t = 1..T (times linspace(-1, 1, T)), shape (T, n_basis)."""
    return bump_weights(torch.linspace(-1, 1, T, dtype=torch.float64), n_basis, width_factor).float()


def basis_at(basis: Tensor, t: Tensor, width_factor: float) -> Tensor:
    """The rows of a step-indexed ``basis`` (T, J) for integer steps t = 1..T, or the same bumps
    evaluated at continuous times t in [0, 1] (floating point), shape (N, J)."""
    if t.is_floating_point():
        return bump_weights(2 * t - 1, basis.shape[1], width_factor)
    return basis[t - 1]


def timestep_embedding(s: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of continuous times ``s`` in [0, 1], scaled to [0, 1000] first (the
    range of Ho et al.'s integer steps), shape (N, dim) with dim even."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=s.device) / half)
    angles = 1000.0 * s.float()[:, None] * freqs
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)


def continuous_time(t: Tensor, T: int) -> Tensor:
    """Step t = 1..T (integer) at s = (t - 1) / (T - 1), or continuous times s in [0, 1] as given."""
    return t if t.is_floating_point() else (t - 1).float() / (T - 1)


def check_image_shape(shape: tuple[int, ...], channels: int, size: int, size_multiple: int | None) -> None:
    """That (C, H, W) images fit an image network built for ``channels`` x ``size`` x ``size``:
    that shape, or for a fully convolutional network (``size_multiple`` not None) any H and W that
    ``size_multiple`` divides. Raises ValueError saying what fits."""
    shape = tuple(shape)
    if size_multiple is None:
        fits, need = shape == (channels, size, size), f"{channels} x {size} x {size}"
    else:
        fits = len(shape) == 3 and shape[0] == channels and shape[1] % size_multiple == 0 and shape[2] % size_multiple == 0
        need = f"{channels} x H x W with H and W divisible by {size_multiple}"
    if not fits:
        raise ValueError(f"expected images of shape {need}, got {shape}")


class TimeReadout(nn.Module):
    """A linear layer whose weights depend on t: W(t) = sum_j g_j(t) W_j (paper Eq. 62), with
    g the bump basis, or one-hot in t for a readout separate per step."""

    def __init__(self, in_features: int, out_features: int, T: int, readout: Readout | str = Readout.BUMPS,
                 n_basis: int = N_BASIS, width_factor: float = WIDTH_FACTOR):
        super().__init__()
        self.readout = Readout(readout)
        n = T if self.readout is Readout.PER_STEP else n_basis
        self.width_factor = width_factor
        if self.readout is Readout.BUMPS:
            self.register_buffer("basis", temporal_basis(T, n_basis, width_factor))
        # small initial weights: z ~ 0 starts the reverse kernel near the forward one
        self.weight = nn.Parameter(torch.randn(n, in_features, out_features) * 0.1 / in_features**0.5)
        self.bias = nn.Parameter(torch.zeros(n, out_features))

    def forward(self, h: Tensor, t: Tensor) -> Tensor:
        if self.readout is Readout.PER_STEP:
            if t.is_floating_point():
                raise ValueError("a readout separate per step needs integer steps; continuous time needs readout = 'bumps'")
            return torch.bmm(h.unsqueeze(1), self.weight[t - 1]).squeeze(1) + self.bias[t - 1]
        coeffs = torch.einsum("ni,jio->njo", h, self.weight) + self.bias
        return torch.einsum("njo,nj->no", coeffs, basis_at(self.basis, t, self.width_factor).to(coeffs.dtype))


class NormalizedRBF(nn.Module):
    """Normalised radial-basis-function layer: h_k = softmax_k(-|x - c_k|^2 / (2 w_k^2))
    (paper App. D.1.1). Centres start on a grid for 2-D data (4 x 4 for 16 units)."""

    def __init__(self, dim: int, units: int):
        super().__init__()
        side = int(round(units ** (1 / dim))) if dim <= 3 else 0
        if side**dim == units and side > 1:
            axis = torch.linspace(-1.5, 1.5, side)
            centres = torch.cartesian_prod(*[axis] * dim).reshape(units, dim)
            width = 3.0 / (side - 1)
        else:
            centres, width = torch.randn(units, dim), 1.0
        self.centres = nn.Parameter(centres)
        self.log_width = nn.Parameter(torch.full((units,), float(np.log(width))))

    def forward(self, x: Tensor) -> Tensor:
        sq_dist = torch.cdist(x, self.centres).pow(2)
        return torch.softmax(-sq_dist / (2 * torch.exp(2 * self.log_width)), dim=1)


class VectorReverseNet(nn.Module):
    """Reverse model for N x D data: a time-shared feature network (an RBF layer or an MLP)
    followed by a :class:`TimeReadout` giving K outputs per dimension."""

    def __init__(self, features: nn.Module, hidden: int, dim: int, outputs_per_dim: int, T: int,
                 readout: Readout | str = Readout.BUMPS, n_basis: int = N_BASIS,
                 width_factor: float = WIDTH_FACTOR):
        super().__init__()
        self.dim, self.outputs_per_dim = dim, outputs_per_dim
        self.features = features
        self.readout = TimeReadout(hidden, outputs_per_dim * dim, T, readout, n_basis, width_factor)

    def forward(self, x_t: Tensor, t: Tensor) -> Tensor:
        z = self.readout(self.features(x_t), t)
        return z.reshape(len(x_t), self.outputs_per_dim, self.dim)


class OneHotInput(nn.Module):
    """A vector network fed the one-hot codes of integer states 0..S-1 (categorical diffusion:
    Hoogeboom et al. 2021 and D3PM feed their networks one-hot x_t): (N, D) states become (N, D S)."""

    def __init__(self, net: nn.Module, states: int):
        super().__init__()
        self.net, self.states = net, states

    def forward(self, x_t: Tensor, t: Tensor) -> Tensor:
        codes = nn.functional.one_hot(x_t.round().long(), self.states).flatten(1)
        return self.net(codes.to(torch.get_default_dtype()), t)


class ResidualBlock(nn.Module):
    """h + W2 silu(W1 silu(LayerNorm(h)) + E emb): a pre-norm residual block that sees the time."""

    def __init__(self, width: int, emb_dim: int):
        super().__init__()
        self.norm, self.inner, self.outer = nn.LayerNorm(width), nn.Linear(width, width), nn.Linear(width, width)
        self.emb = nn.Linear(emb_dim, width)

    def forward(self, h: Tensor, emb: Tensor) -> Tensor:
        act = nn.functional.silu
        return h + self.outer(act(self.inner(act(self.norm(h))) + self.emb(emb)))


class ResidualMLP(nn.Module):
    """Reverse model for N x D data in the style of the image U-Nets: a sinusoidal embedding of the
    time (:func:`timestep_embedding`, integer steps or continuous times) enters every residual
    block, so each block can act differently at each noise level, rather than only the readout.
    The output layer starts at zero, so the reverse kernel starts at the forward one (for the
    ``eps_residual`` parameterisation: the exact reverse kernel of whitened Gaussian data)."""

    EMB_DIM = 64

    def __init__(self, dim: int, outputs_per_dim: int, T: int, hidden: int = 256, blocks: int = 3,
                 in_features: int | None = None):
        """``in_features``: the input's width when it is not ``dim`` (one-hot states: :class:`OneHotInput`)."""
        super().__init__()
        self.dim, self.outputs_per_dim, self.T = dim, outputs_per_dim, T
        self.time = nn.Sequential(nn.Linear(self.EMB_DIM, self.EMB_DIM), nn.SiLU())
        self.inp = nn.Linear(in_features or dim, hidden)
        self.blocks = nn.ModuleList(ResidualBlock(hidden, self.EMB_DIM) for _ in range(blocks))
        self.out = nn.Sequential(nn.LayerNorm(hidden), nn.SiLU(), nn.Linear(hidden, outputs_per_dim * dim))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    def forward(self, x_t: Tensor, t: Tensor) -> Tensor:
        emb = self.time(timestep_embedding(continuous_time(t, self.T), self.EMB_DIM).to(x_t.dtype))
        h = self.inp(x_t)
        for block in self.blocks:
            h = block(h, emb)
        return self.out(h).reshape(len(x_t), self.outputs_per_dim, self.dim)


def mlp(dim: int, hidden: int, layers: int, activation: str) -> nn.Sequential:
    """``layers`` hidden layers of ``hidden`` units; the heartbeat net is mlp(20, 50, 3, 'sigmoid')."""
    activation_layer(activation)  # refuses an unknown name even with no layers
    blocks, width = [], dim
    for _ in range(layers):
        blocks += [nn.Linear(width, hidden), activation_layer(activation)]
        width = hidden
    return nn.Sequential(*blocks)


def build_vector_net(kind: str, dim: int, outputs_per_dim: int, T: int, hidden: int, layers: int = 1,
                     activation: str = "tanh", readout: Readout | str = Readout.BUMPS, n_basis: int = N_BASIS,
                     width_factor: float = WIDTH_FACTOR, one_hot_states: int | None = None) -> nn.Module:
    """The named vector network: 'rbf' (Swiss roll), 'mlp' (heartbeat; time in the readout only)
    or 'resmlp' (:class:`ResidualMLP`, ``layers`` residual blocks; time in every block); with
    ``one_hot_states`` S, fed one-hot integer states (:class:`OneHotInput`)."""
    width = dim * (one_hot_states or 1)
    if kind == "resmlp":
        net = ResidualMLP(dim, outputs_per_dim, T, hidden, layers, in_features=width)
    elif kind == "rbf":
        net = VectorReverseNet(NormalizedRBF(width, hidden), hidden, dim, outputs_per_dim, T, readout, n_basis, width_factor)
    elif kind == "mlp":
        net = VectorReverseNet(mlp(width, hidden, layers, activation), hidden, dim, outputs_per_dim, T, readout, n_basis,
                               width_factor)
    else:
        raise ValueError(f"unknown network {kind!r}; choose 'rbf', 'mlp' or 'resmlp'")
    return net if one_hot_states is None else OneHotInput(net, one_hot_states)
