"""The core and the CLI import neither Qt nor napari (DESIGN: "Core without GUI")."""

from __future__ import annotations

import subprocess
import sys

import pytest

CODE = (
    "import pkgutil, importlib, napari_zfdiffusion.core as core, napari_zfdiffusion.cli; "
    "[importlib.import_module(m.name) for m in pkgutil.walk_packages(core.__path__, 'napari_zfdiffusion.core.')]; "
    "import sys; "
    "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('PyQt5', 'PyQt6', 'PySide2', 'PySide6', "
    "'qtpy', 'napari', 'magicgui', 'superqt', 'vispy')); "
    "assert not bad, bad"
)


def test_core_and_cli_import_no_gui():
    proc = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_public_names_load_from_the_package():
    """What the user guide shows: the three model families from the package itself."""
    import napari_zfdiffusion as zf
    from napari_zfdiffusion.core.cascade import Cascade
    from napari_zfdiffusion.core.latent import Autoencoder, LatentModel
    from napari_zfdiffusion.core.segment import Segmenter

    assert (zf.Cascade, zf.LatentModel, zf.Autoencoder, zf.Segmenter) == (Cascade, LatentModel, Autoencoder, Segmenter)
    assert set(zf.__all__) >= {"Cascade", "LatentModel", "Segmenter", "__version__"}
    with pytest.raises(AttributeError):
        zf.NoSuchThing  # noqa: B018


def test_importing_the_package_stays_light():
    """napari imports the package to read its manifest: that must not load torch or diffusers."""
    code = ("import sys, napari_zfdiffusion; "
            "bad = sorted(m for m in ('torch', 'diffusers') if m in sys.modules); assert not bad, bad")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
