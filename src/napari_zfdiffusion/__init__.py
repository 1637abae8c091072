"""napari-zfdiffusion: diffusion models that generate microscopy, and a U-Net that segments it."""

__version__ = "0.1.0"
