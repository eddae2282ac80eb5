"""What a trained run is used for: evaluation of the bound, posteriors (denoising, inpainting),
Parzen estimates, comparisons at equal training time, plots and text reports.
"""
