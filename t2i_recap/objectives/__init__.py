"""Diffusion objectives, one file each: each has loss() and sample()."""
