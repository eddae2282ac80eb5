"""The choices of the posterior tasks, apart from their code (which needs torch), so that the
command line can offer them without importing it."""

#: How ``denoise`` conditions on y: "start" begins the reverse chain at the step whose noise level
#: matches sigma, from y itself (exact under the model, see GaussianDiffusion.diffuse_observation);
#: "product" multiplies every reverse kernel by N(y; x, sigma^2), the paper's section 4 recipe.
DENOISE_METHODS = ("start", "product")

#: How ``inpaint`` treats the known values: "clamp" holds them at their values at every step
#: (paper Fig. 5); "forward" lets them follow a forward trajectory to their values (see
#: :class:`~thermodiff.process.posterior.Clamp`).
KNOWN_VALUES = ("clamp", "forward")

#: How ``sample`` draws (thermodiff.process.samplers.Sampler): the reverse chain's kernels, DDIM
#: (Song et al. 2021; --eta 0 deterministic), Heun's method on the probability-flow ODE (Karras et al. 2022),
#: DPM-Solver++(2M) (Lu et al. 2022).
SAMPLERS = ("ancestral", "ddim", "heun", "dpm2m")

#: How a respaced chain's reverse variances are set (thermodiff.process.respace.VarianceRule): the
#: network's own belief about x_0 carried to the longer step, improved-diffusion's interpolation, or
#: per step the variance that maximises the bound for the network's mean, fitted on training data.
VARIANCE_RULES = ("moments", "interpolate", "fitted")
