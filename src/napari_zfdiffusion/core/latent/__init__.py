"""Latent diffusion for 2D patches (EM cells, nuclei with their masks): the KL autoencoder
(:mod:`.autoencoder`), the latent diffusion model (:mod:`.model`) and their training (:mod:`.train`)."""

from .autoencoder import Autoencoder
from .model import LatentModel, PatchResult, describe

__all__ = ["Autoencoder", "LatentModel", "PatchResult", "describe"]
