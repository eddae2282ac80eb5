"""The math of diffusion processes and the bound, apart from networks and data: the contract
every process implements (contract), shared tensor helpers, closed-form distributions, noise
schedules, the Gaussian, binomial, categorical and VDM processes, the bound K, respacing, ancestral sampling
and the factors that posteriors multiply in.
"""
