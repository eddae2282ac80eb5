"""thermodiff: diffusion probabilistic models (Sohl-Dickstein et al., ICML 2015).

The package is layered; each layer imports only from itself and the layers listed before it (and ``errors``):

- ``process``: the math of diffusion processes and bounds (the contract every process implements,
  closed-form distributions, schedules, the Gaussian, binomial and VDM processes, the bound K,
  respacing, ancestral sampling, posterior factors).
- ``data``: loading and scaling examples, image data sets, densities with known likelihoods.
- ``nets``: reverse-model networks and the baseline models compared against diffusion.
- ``run``: typed config, settings derived from the data, assembly, training, checkpoints.
- ``tasks``: evaluation, posteriors (denoising, inpainting), Parzen estimates, comparisons, plots,
  reports.
- ``cli``: the command line, which parses arguments and calls the layers above.

The names below are the library's entry points for use from Python.
"""

from thermodiff.nets.vector import build_vector_net
from thermodiff.process.binomial import BinomialDiffusion, BinomialParameterization
from thermodiff.process.bound import BoundEstimate, LossAwareSampler, TrainingLoss, exact_bound, training_loss
from thermodiff.process.contract import Decoder, Process
from thermodiff.process.gaussian import FixedVariance, GaussianDiffusion, GaussianParameterization
from thermodiff.process.respace import respace
from thermodiff.process.sampling import ancestral_sample
from thermodiff.process.schedules import Schedule, make_schedule

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
