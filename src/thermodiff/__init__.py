"""thermodiff: diffusion probabilistic models (Sohl-Dickstein et al., ICML 2015).

The package is layered; each layer imports only from itself and the layers listed before it (and ``errors``):

- ``process``: the math of diffusion processes and bounds (the contract every process implements,
  closed-form distributions, schedules, the Gaussian, binomial, categorical and VDM processes, the bound K,
  respacing, ancestral sampling, DDIM and ODE samplers, posterior factors).
- ``data``: loading and scaling examples, image data sets, densities with known likelihoods.
- ``nets``: reverse-model networks and the baseline models compared against diffusion.
- ``run``: typed config, settings derived from the data, assembly, training, checkpoints.
- ``tasks``: evaluation, posteriors (denoising, inpainting), Parzen estimates, comparisons, plots,
  reports.
- ``cli``: the command line, which parses arguments and calls the layers above.

The names below are the library's entry points for use from Python.
"""

import importlib

__version__ = "0.1.0"

# name -> the module that defines it; imported on first use (PEP 562), so that the command line,
# which imports this package first, starts without loading torch for --help
_ENTRY_POINTS = {
    "BinomialDiffusion": "thermodiff.process.binomial",
    "BinomialParameterization": "thermodiff.process.binomial",
    "BoundEstimate": "thermodiff.process.bound",
    "CategoricalDiffusion": "thermodiff.process.categorical",
    "CategoricalKernel": "thermodiff.process.categorical",
    "Decoder": "thermodiff.process.contract",
    "FixedVariance": "thermodiff.process.gaussian",
    "GaussianDiffusion": "thermodiff.process.gaussian",
    "GaussianParameterization": "thermodiff.process.gaussian",
    "LossAwareSampler": "thermodiff.process.bound",
    "Process": "thermodiff.process.contract",
    "Schedule": "thermodiff.process.schedules",
    "TrainingLoss": "thermodiff.process.bound",
    "ancestral_sample": "thermodiff.process.sampling",
    "build_vector_net": "thermodiff.nets.vector",
    "eps_model_bound": "thermodiff.tasks.foreign",
    "exact_bound": "thermodiff.process.bound",
    "make_schedule": "thermodiff.process.schedules",
    "respace": "thermodiff.process.respace",
    "sample_ddim": "thermodiff.process.samplers",
    "sample_dpm_solver_2m": "thermodiff.process.samplers",
    "sample_heun": "thermodiff.process.samplers",
    "training_loss": "thermodiff.process.bound",
}

__all__ = sorted(_ENTRY_POINTS)


def __getattr__(name: str):
    if name not in _ENTRY_POINTS:
        raise AttributeError(f"module 'thermodiff' has no attribute {name!r}")
    return getattr(importlib.import_module(_ENTRY_POINTS[name]), name)


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
