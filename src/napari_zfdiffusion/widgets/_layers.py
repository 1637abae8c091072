"""Layers in and out of the docks: which image a layer holds, the plane the viewer shows, and how a
layer this plugin made is recognised (its provenance in ``layer.metadata["zfdiffusion"]``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from napari.layers import Image

from ..core.errors import UserInputError
from ..core.provenance import METADATA_KEY, is_ours
from ..core.reader import layer_geometry

if TYPE_CHECKING:
    import napari

PROVENANCE_KEY = METADATA_KEY  # layer.metadata[PROVENANCE_KEY]: how a layer was made


def image_layers(viewer: napari.viewer.Viewer) -> list[tuple[str, Image]]:
    """(name, layer) of every Image layer: the choices of a dock's "image layer" box."""
    return [(layer.name, layer) for layer in viewer.layers if isinstance(layer, Image)]


def generated_provenance(layer) -> dict | None:
    """The provenance of a layer this plugin made (values already in [0, 1]), else None."""
    prov = layer.metadata.get(PROVENANCE_KEY)
    return prov if is_ours(prov) else None


def layer_image(layer: Image, purpose: str) -> np.ndarray:
    """The data of a grayscale Image layer, 2D (Y, X) or a stack (N, Y, X) (the full-resolution level of
    a multiscale one); a UserInputError naming ``purpose`` (e.g. "upsampling") for anything else."""
    if layer.rgb:
        raise UserInputError(f"'{layer.name}' is an RGB image: {purpose} takes one grayscale channel. "
                             "Split its channels (right-click > Split RGB) and select one.")
    data = layer.data[0] if layer.multiscale else layer.data
    if data.ndim not in (2, 3):
        raise UserInputError(f"'{layer.name}' has shape {tuple(data.shape)}: {purpose} takes a 2D image "
                             "(Y, X) or a stack (N, Y, X).")
    return data


def shown_plane(viewer, layer: Image, data: np.ndarray) -> int:
    """The index of the plane of a (N, Y, X) layer that the viewer shows now."""
    return int(np.clip(round(layer.world_to_data(viewer.dims.point)[0]), 0, data.shape[0] - 1))


def shown_image(viewer, layer: Image, purpose: str) -> tuple[np.ndarray, int | None]:
    """A layer's 2D image, or for a stack the plane shown now, with that plane's index (None for 2D)."""
    data = layer_image(layer, purpose)
    if data.ndim == 2:
        return np.asarray(data), None
    plane = shown_plane(viewer, layer, data)
    return np.asarray(data[plane]), plane


def unique_name(viewer, name: str) -> str:
    """``name`` if no layer has it, else ``name 2``, ``name 3``, ... (the first one free)."""
    taken = {layer.name for layer in viewer.layers}
    if name not in taken:
        return name
    k = 2
    while f"{name} {k}" in taken:
        k += 1
    return f"{name} {k}"


def data_limits(data: np.ndarray, low: float = 0.1, high: float = 99.9) -> tuple[float, float]:
    """Contrast limits from the data: its ``low`` and ``high`` percentiles (on at most about a million
    values, evenly strided), widened where the data is flat."""
    a = np.asarray(data)
    step = max(1, a.size // 1_000_000)
    values = a.reshape(-1)[::step].astype(np.float32, copy=False)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return 0.0, 1.0
    lo, hi = (float(v) for v in np.percentile(values, [low, high]))
    if not hi > lo:
        lo, hi = float(values.min()), float(values.max())
    if not hi > lo:
        hi = lo + 1.0
    return lo, hi


__all__ = ["PROVENANCE_KEY", "data_limits", "generated_provenance", "image_layers", "layer_geometry", "layer_image",
           "shown_image", "shown_plane", "unique_name"]
