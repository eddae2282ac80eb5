"""thermodiff: diffusion probabilistic models (Sohl-Dickstein et al., ICML 2015).

The package is layered so each part can be read on its own:

- ``distributions``: closed-form KLs, entropies and log-densities (pure functions).
- ``schedules``: the forward noise schedules beta_t, fixed or learned.
- ``process``: the contract every process implements; ``tensors``: shared tensor helpers.
- ``gaussian`` / ``binomial`` / ``vdm``: one object per diffusion process owning its math.
- ``bound``: the variational bound K assembled from the processes' terms.
- ``networks``: reverse-model networks and the temporal readout.
- ``sampling``: ancestral sampling; ``respace``: chains on fewer steps.
- ``data``, ``training``, ``evaluation``, ``checkpoint``, ``config``, ``plotting``, ``cli``.
"""

from thermodiff.binomial import BinomialDiffusion, BinomialParameterization
from thermodiff.bound import BoundEstimate, LossAwareSampler, TrainingLoss, exact_bound, training_loss
from thermodiff.gaussian import FixedVariance, GaussianDiffusion, GaussianParameterization
from thermodiff.process import Decoder, Process
from thermodiff.networks import build_vector_net
from thermodiff.respace import respace
from thermodiff.sampling import ancestral_sample
from thermodiff.schedules import Schedule, make_schedule

__version__ = "0.1.0"

__all__ = [
    "BinomialDiffusion",
    "BinomialParameterization",
    "BoundEstimate",
    "Decoder",
    "FixedVariance",
    "GaussianDiffusion",
    "GaussianParameterization",
    "LossAwareSampler",
    "Process",
    "Schedule",
    "TrainingLoss",
    "ancestral_sample",
    "build_vector_net",
    "exact_bound",
    "make_schedule",
    "respace",
    "training_loss",
]
