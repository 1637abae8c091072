"""Volumes: depth ranges, a user's first plane, and how well neighbouring planes agree.

Generation itself is :meth:`.cascade.Cascade.generate_volume` (the cascade's one sampling path);
this module holds what the CLI, the widget, the data sets and the evaluation share around it.
"""

from __future__ import annotations

import numpy as np
import torch

from .data import Normalisation, check_finite, looks_rgb, resize
from .errors import UserInputError


def parse_depth_range(text, n_classes: int) -> tuple[int, ...]:
    """'0-4', 'all' or a single depth as consecutive depth classes, top to bottom.

    A volume model learned each plane from the one above it, so the depths must follow each other.
    """
    t = str(text).strip()
    if t == "all":
        return tuple(range(n_classes))
    try:
        if "-" in t[1:]:
            a, b = (int(v) for v in t.split("-", 1))
        else:
            a = b = int(t)
    except ValueError:
        raise UserInputError(f"depths '{text}': give a range of depth classes like 0-4 (or all).") from None
    if b < a:
        raise UserInputError(f"depths '{text}': the range must go down the stack, top to bottom (e.g. {b}-{a}).")
    if a < 0 or b >= n_classes:
        raise UserInputError(f"depths '{text}' are outside this model: it has depth classes 0-{n_classes - 1}.")
    return tuple(range(a, b + 1))


def first_plane_tensor(plane, resolution: int, norm: Normalisation, *, normalise: bool = True) -> torch.Tensor:
    """A user's 2D plane as a (1, 1, R, R) model-space tensor: square, at least ``resolution`` on a side.

    ``normalise=False`` takes values as already in [0, 1] (a generated layer)."""
    arr = np.asarray(plane)
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    if looks_rgb(arr):
        raise UserInputError(f"the first plane looks like RGB(A), shape {arr.shape}: give one grayscale plane.")
    if arr.ndim != 2:
        raise UserInputError(f"the first plane must be one 2D plane (Y, X), got shape {arr.shape}.")
    if not np.issubdtype(arr.dtype, np.number) or arr.dtype == bool:
        raise UserInputError(f"the first plane must hold numbers, got {arr.dtype}.")
    h, w = arr.shape
    if h != w:
        raise UserInputError(f"the first plane is {h}x{w}: it must be square (crop it to a square first).")
    if h < resolution:
        raise UserInputError(f"the first plane is {h}x{w}, smaller than the volume's {resolution}x{resolution}: "
                             "choose a lower resolution or a larger plane.")
    check_finite(arr, "the first plane")
    if normalise:
        unit = norm.apply(arr)
    else:
        unit = np.clip(arr.astype(np.float32), 0.0, 1.0)
    return resize(torch.from_numpy(unit * 2.0 - 1.0)[None, None], resolution)


def _ssim(a: np.ndarray, b: np.ndarray) -> float:
    from skimage.metrics import structural_similarity

    return float(structural_similarity(a, b, data_range=1.0))


def neighbour_agreement(volume: np.ndarray) -> dict:
    """Pearson correlation and SSIM between each plane and the next, for a (Z, Y, X) volume in [0, 1]."""
    vol = np.asarray(volume, dtype=np.float32)
    if vol.ndim != 3 or vol.shape[0] < 2:
        raise ValueError("neighbour agreement needs a (Z, Y, X) volume with at least 2 planes")
    corr, ssim = [], []
    for a, b in zip(vol[:-1], vol[1:]):
        c = np.corrcoef(a.ravel(), b.ravel())[0, 1]
        corr.append(float(c) if np.isfinite(c) else 0.0)
        ssim.append(_ssim(a, b))
    return {"correlation": corr, "ssim": ssim,
            "mean_correlation": float(np.mean(corr)), "mean_ssim": float(np.mean(ssim))}


__all__ = ["first_plane_tensor", "neighbour_agreement", "parse_depth_range"]
