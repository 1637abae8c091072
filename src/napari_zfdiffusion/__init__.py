"""napari-zfdiffusion: diffusion models that generate microscopy, and a U-Net that segments it.

For Python users, the three model families load from here::

    from napari_zfdiffusion import Cascade, LatentModel, Segmenter

    slices = Cascade.load("zf-cascade-demo").generate(depth=2, guidance=3, resolution=128, seed=0)
    patches = LatentModel.load("nuclei-ldm-demo").generate(4, seed=0)       # images, masks, labels
    labels = Segmenter.load("nuclei-unet-demo").segment(patches.images).labels

They are imported on first use, so importing the package (as napari does to read its manifest)
stays light.
"""

from ._version import __version__

_PUBLIC = {
    "Cascade": "napari_zfdiffusion.core.cascade",
    "LatentModel": "napari_zfdiffusion.core.latent",
    "Autoencoder": "napari_zfdiffusion.core.latent",
    "Segmenter": "napari_zfdiffusion.core.segment",
    "UserInputError": "napari_zfdiffusion.core.errors",
    "Cancelled": "napari_zfdiffusion.core.errors",
}

__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str):
    if name in _PUBLIC:
        import importlib

        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'napari_zfdiffusion' has no attribute {name!r}")
