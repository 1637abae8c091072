"""GUI-free core: models, sampling, training, data and I/O. Imports neither Qt nor napari."""

from .errors import Cancelled, UserInputError

__all__ = ["Cancelled", "UserInputError"]
