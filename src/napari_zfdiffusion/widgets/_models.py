"""The models behind the docks: one cache of loaded models for every widget, and the choices a
widget's model box offers (bundled, user and downloadable models of the kinds it can use)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import TypeVar

from ..core.cascade import Cascade
from ..core.errors import UserInputError
from ..core.registry import format_size
from ..core.store import ModelEntry, list_models, resolve_model

_CACHE: OrderedDict[tuple[type, str, str], object] = OrderedDict()
_CACHE_SIZE = 2  # (model, device) pairs kept per model class: enough to switch back and forth
_LOCK = threading.Lock()
DEMO_CASCADE = "zf-cascade-demo"  # the bundled slice cascade, chosen when a cascade widget opens

M = TypeVar("M")


def get_model(loader: type[M], model: str, device: str) -> M:
    """``loader.load(folder, device)`` for (model, device), loaded once and then cached.

    One cache for every model class (a cascade, a latent model, an autoencoder), keyed by the class,
    the resolved folder and the device; the :data:`_CACHE_SIZE` most recently used entries of each
    class are kept. Loading runs outside the lock, so a slow load never blocks other lookups.
    """
    path = resolve_model(model).resolve()
    key = (loader, str(path), str(device))
    with _LOCK:
        if key in _CACHE:
            _CACHE.move_to_end(key)
            return _CACHE[key]
    loaded = loader.load(path, device)
    with _LOCK:
        loaded = _CACHE.setdefault(key, loaded)
        _CACHE.move_to_end(key)
        same = [k for k in _CACHE if k[0] == key[0]]
        for old in same[:-_CACHE_SIZE]:
            del _CACHE[old]
    return loaded


def cached_model(loader: type[M], model: str, device: str) -> M | None:
    """The cached ``loader`` model for (model, device) if one is loaded, else None (never loads)."""
    try:
        path = resolve_model(model).resolve()
    except UserInputError:
        return None
    with _LOCK:
        return _CACHE.get((loader, str(path), str(device)))


def get_cascade(model: str, device: str) -> Cascade:
    """The cascade for (model, device), loaded once and then cached.

    :meth:`Cascade.load` reads only the JSON cards; each stage's weights load on first use, in
    the worker thread, and stay on the cached object for the next job.
    """
    return get_model(Cascade, model, device)


def model_choices(kinds: tuple[str, ...], demo: str, notes: dict[str, str] | None = None) -> list[tuple[str, str]]:
    """(label, folder) of every model of ``kinds`` (in that order of kinds), bundled before user models,
    the ``demo`` model first of all, the registry's models not downloaded yet last: (label, name), with
    "(download, SIZE)" in the label; choosing one shows the dock's "Download NAME (SIZE)" button
    (:mod:`._download`). ``notes``: a word added to the label per kind."""
    notes = notes or {}
    entries = [m for m in list_models(downloadable=True) if m.kind in kinds]
    entries.sort(key=lambda m: (m.source == "downloadable", kinds.index(m.kind), m.name != demo,
                                m.source != "bundled"))
    return [(f"{m.name} (download, {format_size(m.size or 0)})", m.name) if m.source == "downloadable" else
            (f"{m.name} ({m.source}{notes.get(m.kind, '')})", str(m.path)) for m in entries]


def downloadable(value: str | None) -> ModelEntry | None:
    """The registry's model that a model box's ``value`` names while it is not downloaded yet (a
    "NAME (download, SIZE)" choice of :func:`model_choices`), else None (a folder, a model in the cache,
    no choice, or a registry that cannot be read: the dock says why when it reads the model)."""
    if not value:
        return None
    try:
        entries = list_models(downloadable=True)
    except UserInputError:
        return None
    return next((m for m in entries if m.source == "downloadable" and m.name == str(value)), None)


def cascade_choices() -> list[tuple[str, str]]:
    """(label, folder) for each cascade model, bundled first; the demo cascade first of all."""
    return model_choices(("cascade",), DEMO_CASCADE)


def checked_cascade(model: str, device: str) -> Cascade:
    """:func:`get_cascade`, refusing a model without depth classes (a UserInputError that says so)."""
    cascade = get_cascade(model, device)
    if not cascade.depth_classes:
        raise UserInputError(f"model '{cascade.name}' lists no depth classes in its cascade.json.")
    return cascade


def clear_cache() -> None:
    with _LOCK:
        _CACHE.clear()


__all__ = ["DEMO_CASCADE", "cached_model", "cascade_choices", "checked_cascade", "clear_cache", "downloadable",
           "get_cascade", "get_model", "model_choices"]
