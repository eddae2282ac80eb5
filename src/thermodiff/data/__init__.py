"""Data: loading and scaling examples (dataset), image folders and the paper's image data sets
(images), and densities with known exact likelihoods for testing defaults (known_densities).
"""
