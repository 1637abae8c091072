"""npe2 writer: one image or labels layer to a TIFF whose description holds the zfdiffusion provenance."""

from __future__ import annotations

from typing import Any

import numpy as np

from .core.io import write_tiff
from .core.provenance import METADATA_KEY


def write_image_tiff(path: str, data: Any, meta: dict) -> list[str]:
    """Write ``data`` to ``path`` (written to a temporary name, then renamed); return ``[path]``.

    The layer's ``metadata["zfdiffusion"]`` provenance (model, seed, depth, ...) goes into the
    TIFF's ImageDescription as JSON, so ``zfdiffusion`` and :func:`core.io.read_provenance` read it back.
    """
    prov = dict((meta or {}).get("metadata", {}).get(METADATA_KEY) or {})
    if meta and meta.get("name"):
        prov.setdefault("layer_name", meta["name"])
    scale = [float(s) for s in (meta or {}).get("scale") or []]
    if "pixel_size_um" not in prov and len(scale) >= 2 and scale[-2:] != [1.0, 1.0]:  # a layer in micrometres
        prov["pixel_size_um"] = {"y": scale[-2], "x": scale[-1], **({"z": scale[-3]} if len(scale) >= 3 and
                                                                     scale[-3] != 1.0 else {})}
    write_tiff(path, np.asarray(data), prov)
    return [path]
