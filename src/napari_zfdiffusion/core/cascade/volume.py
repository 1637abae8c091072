"""Volumes: the user's first plane that a volume can start from.

Generation itself is :meth:`.model.Cascade.generate_volume` (the cascade's one sampling path); depth
ranges are :func:`.depths.parse_depths` (``consecutive=True``) and the agreement of neighbouring
planes is :func:`..metrics.neighbour_agreement`.
"""

from __future__ import annotations

import torch

from ..errors import UserInputError
from ..images import Normalisation, looks_rgb, resize, to_model


def first_plane_tensor(plane, resolution: int, norm: Normalisation, *, normalise: bool = True) -> torch.Tensor:
    """A user's 2D plane as a (1, 1, R, R) model-space tensor: square, at least ``resolution`` on a side.

    ``normalise=False`` takes values as already in [0, 1] (a generated layer)."""
    import numpy as np

    arr = np.asarray(plane)
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 2 and not looks_rgb(arr):
        raise UserInputError(f"the first plane must be one 2D plane (Y, X), got shape {arr.shape}.")
    x = to_model(arr, norm, normalise=normalise, name="the first plane")
    h, w = x.shape[-2:]
    if h != w:
        raise UserInputError(f"the first plane is {h}x{w}: it must be square (crop it to a square first).")
    if h < resolution:
        raise UserInputError(f"the first plane is {h}x{w}, smaller than the volume's {resolution}x{resolution}: "
                             "choose a lower resolution or a larger plane.")
    return resize(x, resolution)


__all__ = ["first_plane_tensor"]
