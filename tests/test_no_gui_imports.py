"""The core and the CLI import neither Qt nor napari (DESIGN: "Core without GUI")."""

from __future__ import annotations

import subprocess
import sys

CODE = (
    "import pkgutil, importlib, napari_zfdiffusion.core as core, napari_zfdiffusion.cli; "
    "[importlib.import_module(f'napari_zfdiffusion.core.{m.name}') for m in pkgutil.iter_modules(core.__path__)]; "
    "import sys; "
    "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('PyQt5', 'PyQt6', 'PySide2', 'PySide6', "
    "'qtpy', 'napari', 'magicgui', 'superqt', 'vispy')); "
    "assert not bad, bad"
)


def test_core_and_cli_import_no_gui():
    proc = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
