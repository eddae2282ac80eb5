"""Reverse-model networks (vector MLPs with the paper's temporal readout, the paper's multi-scale
convolutional network, a time-conditioned U-Net) and the baseline models compared against
diffusion (denoising and variational auto-encoders).
"""
