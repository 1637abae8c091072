"""npe2 reader: the plugin's own TIFFs (generated images, volumes, labels, with their provenance and
pixel size) and OME-TIFF / OME-Zarr files with physical sizes, as napari layers.

Reading goes through :func:`.core.reader.open_image` (the same reader as every command), lazily: napari
gets the memory map or the Zarr array, not a copy. What comes back:

* ``metadata["zfdiffusion"]``: the provenance, so a generated layer saved with this plugin's writer
  and opened again is still recognised (its depth, its [0, 1] values) by the docks;
* the layer's scale (micrometres) and, for images this plugin generated, the half-pixel translate the
  docks use, so the layer lands where it was; a file's channels as separate layers
  (``channel_axis``);
* instance labels (the ``segment`` command's and the widgets' outputs) as a Labels layer.

Plain TIFFs without a pixel size or provenance are left to napari's own reader (this one returns None).
"""

from __future__ import annotations

from pathlib import Path

from .core.errors import UserInputError
from .core.provenance import METADATA_KEY
from .core.reader import ImageSource, layer_geometry, open_image

LABELS = ("instance labels",)


def get_reader(path):
    """The reader for ``path`` if this plugin should open it, else None (napari then tries others)."""
    if isinstance(path, (list, tuple)):
        return None
    p = Path(path)
    if p.suffix.lower() not in (".tif", ".tiff", ".zarr") and not p.is_dir():
        return None
    try:
        src = open_image(p)
    except UserInputError:
        return None
    if not (src.provenance or any(src.pixel_um.values()) or p.is_dir() or p.suffix.lower() == ".zarr"):
        return None
    return read


def _axes(src: ImageSource) -> str:
    """The file's axes, with those this plugin recorded for its own outputs (e.g. segmentation of a
    TZYX movie) and an unnamed leading axis named: depth in a volume, else samples (no size)."""
    recorded = str(src.provenance.get("axes") or "")
    if len(recorded) == len(src.shape):
        return recorded
    axes = src.axes
    if src.provenance and sum(a not in "TZCYXS" for a in axes) == 1:
        what = "Z" if src.provenance.get("operation") == "volume" or "z" in (src.provenance.get("pixel_size_um")
                                                                             or {}) else "Q"
        axes = "".join(what if a not in "TZCYXS" else a for a in axes)
    return axes


def read(path) -> list[tuple]:
    src = open_image(path)
    axes = _axes(src)
    prov = src.provenance
    kwargs: dict = {"name": Path(path).name.split(".")[0]}
    if prov:
        kwargs["metadata"] = {METADATA_KEY: prov}
    px = {a.lower(): v for a, v in src.pixel_um.items() if v and a in axes}
    if px.get("y") and px.get("x"):
        spatial = [a for a in axes if a not in "CS"]
        scale = [px.get(a.lower(), 1.0) for a in spatial]
        geometry = layer_geometry(px, len(spatial), z="Z" in spatial)
        kwargs["scale"] = tuple(scale)
        if str(prov.get("kind", "")).startswith("zfdiffusion.") and prov.get("operation") != "segmentation":
            kwargs["translate"] = geometry["translate"]  # where the docks put generated layers
    if "C" in axes and src.size("C") > 1:
        kwargs["channel_axis"] = axes.index("C")
        if "metadata" in kwargs:
            kwargs["metadata"] = [kwargs["metadata"]] * src.size("C")
    layer_type = "labels" if prov.get("content") in LABELS else "image"
    if layer_type == "image" and src.rgb:
        kwargs["rgb"] = True
    if layer_type == "image" and str(prov.get("kind", "")).startswith("zfdiffusion.") and "channel_axis" not in kwargs:
        kwargs.setdefault("contrast_limits", (0, 1))  # generated images are in [0, 1]
    return [(src.data, kwargs, layer_type)]


__all__ = ["get_reader", "read"]
