"""How every output was made: the provenance stamp on generated images, labels, model cards and
data sets. The only module that reads the plugin's version.

Provenance travels with the data: as JSON in a TIFF's ImageDescription (:func:`.io.write_tiff`)
and in a napari layer's ``metadata["zfdiffusion"]``.
"""

from __future__ import annotations

import datetime as _dt

from .._version import __version__ as PLUGIN_VERSION

METADATA_KEY = "zfdiffusion"  # where provenance lives in a napari layer's metadata (and the writer reads it)


def now() -> str:
    """The time, in UTC, to the second (ISO 8601)."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def stamp(kind: str, *, model=None, device=None, **fields) -> dict:
    """A provenance record: ``kind`` (e.g. "zfdiffusion.cascade"), the model (anything with ``name``
    and ``path``), the plugin version, the device, the time, then ``fields`` (seed, depth, ...)."""
    out: dict = {"kind": kind}
    if model is not None:
        out.update(model=model.name, model_path=str(model.path))
    out["plugin_version"] = PLUGIN_VERSION
    if device is not None:
        out["device"] = str(device)
    out["created"] = now()
    out.update(fields)
    return out


def is_ours(provenance) -> bool:
    """Whether a provenance record (a TIFF's, a layer's) says this plugin made the data: its values
    are then already in [0, 1] and its depth, seed and model are known."""
    return isinstance(provenance, dict) and str(provenance.get("kind", "")).startswith("zfdiffusion")


def made_by() -> dict:
    """What a model card or a training record says about the code that wrote it."""
    return {"plugin_version": PLUGIN_VERSION}


__all__ = ["METADATA_KEY", "PLUGIN_VERSION", "is_ours", "made_by", "now", "stamp"]
