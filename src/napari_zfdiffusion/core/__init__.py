"""GUI-free core: models, sampling, training, data and I/O. Imports neither Qt nor napari.

One subpackage per model family (:mod:`.cascade`, :mod:`.latent`, :mod:`.segment`), on what every
diffusion model shares (:mod:`.diffusion`) and what every training shares (:mod:`.training`), on a
base of small modules (errors, device, progress, provenance, io, images, masks, store, metrics,
tiling, fetch). The families never import each other; ``make test`` checks it (import-linter).
"""

from .errors import Cancelled, UserInputError

__all__ = ["Cancelled", "UserInputError"]
