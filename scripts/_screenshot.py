"""Helpers the widget screenshot scripts share: a napari window with one widget docked, choosing its
model, saving the whole window.

napari and Qt are imported inside the functions, so that a script's ``--help`` does not load them.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def open_viewer(widget_cls, dock_name: str, size: str):
    """A shown napari viewer of ``size`` ("WxH") with ``widget_cls(viewer)`` docked on the right as
    ``dock_name``; also the list the messages of error notifications are appended to from now on.

    Returns ``(viewer, widget, errors)``.
    """
    import napari
    from napari.utils.notifications import notification_manager

    errors: list[str] = []
    notification_manager.notification_ready.connect(
        lambda n: errors.append(n.message) if str(n.severity) == "error" else None)

    viewer = napari.Viewer(show=True, title="napari-zfdiffusion")
    w, h = (int(v) for v in size.lower().split("x"))
    viewer.window._qt_window.resize(w, h)  # no public API for the window size
    widget = widget_cls(viewer)
    viewer.window.add_dock_widget(widget, name=dock_name, area="right")
    return viewer, widget, errors


def choose_model(widget, path: Path) -> None:
    """Select the model folder ``path`` in the widget: from its model list if it is there, else
    through its "or folder" field."""
    if str(path) in widget.model.choices:
        widget.model.value = str(path)
    else:
        widget.model_folder.value = path.expanduser().resolve()


def open_cascade_widget(widget_cls, dock_name: str, size: str, model: str | None):
    """``open_viewer`` for a depth-cascade widget with ``model`` (a name or folder; default: the bundled
    demo) chosen. Returns ``(viewer, widget, errors)``, or an exit code after printing why not."""
    import sys

    from napari_zfdiffusion.core.store import resolve_model
    from napari_zfdiffusion.widgets._models import cascade_choices

    model = model or next((path for _, path in cascade_choices()), None)  # the demo comes first
    if model is None:
        print("no bundled model found: give --model FOLDER", file=sys.stderr)
        return 2
    viewer, widget, errors = open_viewer(widget_cls, dock_name, size)
    choose_model(widget, resolve_model(model))  # a name of a bundled/user model, or a folder
    if widget._cascade is None:
        print(f"model '{model}' could not be loaded: {errors}", file=sys.stderr)
        return 1
    return viewer, widget, errors


def save_screenshot(viewer, out: Path) -> None:
    """Let Qt settle, then write the whole window (not only the canvas) to ``out``: a PNG of 256
    colours (a third of the size, no visible difference for a screenshot; the repository's size budget)."""
    from PIL import Image
    from qtpy.QtWidgets import QApplication

    for _ in range(20):
        QApplication.processEvents()
    out.parent.mkdir(parents=True, exist_ok=True)
    viewer.screenshot(str(out), canvas_only=False)
    Image.open(out).convert("RGB").quantize(256).save(out, optimize=True)
