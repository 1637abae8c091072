"""The "About the model" panel of every dock, and the warning when an input layer looks out of domain.

:class:`AboutPanel`: a collapsible section "About the model" (collapsed by default, like the docks'
"Advanced", so that they still fit a 1366x768 screen) with what the model's cards say
(:func:`..core.modelinfo.about_lines`: what it makes, depth classes and their meaning, pixel size,
training data, measured quality, training intensities) and a "Model card" button that opens the
folder's MODEL_CARD.md; above it a warning line, shown only when the chosen input layer looks unlike
the model's training data (:func:`..core.modelinfo.domain_warnings`), and a napari notification once
per layer and model when the dock's job starts on such a layer.

:func:`layer_warnings` reads what the rules need from a napari layer: the plane shown (a 2D layer as
is), its pixel size (``layer.scale[-1]`` where ``layer.units`` are a length, in micrometres; unknown
otherwise), and whether the plugin made it (values already in [0, 1]: intensities are not compared).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
from magicgui.widgets import Container, Label, PushButton
from napari.layers import Image
from napari.utils.notifications import show_warning
from qtpy.QtCore import QSize, Qt, QUrl
from qtpy.QtGui import QDesktopServices
from qtpy.QtWidgets import QSizePolicy, QVBoxLayout, QWidget
from superqt import QCollapsible

from ..core.errors import UserInputError
from ..core.modelinfo import MAX_SAMPLE, about_lines, domain_warnings, model_card_file, model_entry
from ._layers import generated_provenance

log = logging.getLogger(__name__)

TITLE = "About the model"
WARNING_STYLE = "color: #f0a030;"  # amber: readable on napari's dark and light themes
TEXT_TIP = ("what the chosen model's cards say: what it makes, its depth classes, the pixel size and data it was "
            "trained on, and its measured quality")


class _Wrapped(QWidget):
    """The panel's content: its size hint is as tall as its word-wrapped lines need at its width (what
    the collapsible section opens to), not at the narrow width Qt's layouts would ask about (a word-wrapped
    label in a button-wide column: many times too tall), and so is its minimum size hint. A new width resizes
    it, and the section asks again."""

    def hasHeightForWidth(self) -> bool:
        return False  # the layouts above take the size hint, which is already for this width

    def sizeHint(self) -> QSize:
        hint = super().sizeHint()
        layout, width = self.layout(), self.width()
        if layout is not None and layout.hasHeightForWidth() and width > 0:
            hint.setHeight(layout.totalHeightForWidth(width))
        return hint

    def minimumSizeHint(self) -> QSize:
        """As tall as the size hint: a scroll area gives its page no more than its minimum height (the
        section's own limit, 0 when collapsed, still applies)."""
        return QSize(super().minimumSizeHint().width(), self.sizeHint().height())


class AboutPanel:
    """A dock's "About the model" section (``collapsible``, holding ``text`` and ``card_button``) and its
    domain ``warning`` line; ``native`` is the QWidget to put into the dock (see :meth:`install`).
    ``lead``: a dock's own line about the model (a word-wrapped Label), put first in the section."""

    def __init__(self, what: str = "the chosen layer", lead: Label | None = None):
        self.what = what  # the input the warnings are about, in the warning's tooltip
        self.card_path: Path | None = None
        self.lines: list[str] = []
        self.warnings: list[str] = []
        self._notified: set[tuple[int, str]] = set()

        self.text = Label(value="", tooltip=TEXT_TIP)
        self.text.native.setWordWrap(True)
        self.text.native.setTextFormat(Qt.TextFormat.PlainText)
        self.text.native.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.text.native.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
        self.card_button = PushButton(text="Model card", enabled=False,
                                      tooltip="open the model's MODEL_CARD.md (data, licence, training, measured "
                                              "quality) in your editor or browser")
        self.card_button.changed.connect(lambda *_: self.open_card())
        self.warning = Label(value="", tooltip=f"{what} looks unlike the data the model was trained on: the "
                                               "result may be poor (see the user guide, 'The docks, in general')")
        self.warning.native.setWordWrap(True)
        self.warning.native.setTextFormat(Qt.TextFormat.PlainText)
        self.warning.native.setStyleSheet(WARNING_STYLE)
        self.warning.native.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
        self.warning.native.setVisible(False)

        if lead is not None:
            lead.native.setWordWrap(True)
            lead.native.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
            lead.changed.connect(self._refit)
        inner = Container(labels=False, widgets=[*([lead] if lead is not None else []), self.text, self.card_button])
        inner.margins = (0, 0, 0, 0)
        content = _Wrapped()
        box = QVBoxLayout(content)
        box.setContentsMargins(0, 0, 0, 0)
        box.addWidget(inner.native)
        self.collapsible = QCollapsible(TITLE, expandedIcon="▾", collapsedIcon="▸")  # as _layout's "Advanced"
        self.collapsible.toggleButton().setToolTip("what the model is: its training data, pixel size, depth classes, "
                                                   "measured quality, and its model card")
        self.collapsible.setDuration(120)
        self.collapsible.addWidget(content)
        self.collapsible.collapse(animate=False)
        self.collapsible.layout().setContentsMargins(0, 0, 0, 0)

        self.native = QWidget()
        column = QVBoxLayout(self.native)
        column.setContentsMargins(0, 0, 0, 0)
        column.setSpacing(2)
        column.addWidget(self.warning.native)
        column.addWidget(self.collapsible)

    def install(self, sections) -> None:
        """Put the panel into a dock laid out by :func:`._layout.lay_out` (``sections``: its DockLayout):
        below the essential controls, just above "Advanced", over the dock's whole width."""
        column = sections.collapsible.parentWidget().layout()
        column.insertWidget(column.indexOf(sections.collapsible), self.native)

    # ------------------------------------------------------------ the model
    def show_model(self, model: str | None, card: dict | None = None) -> None:
        """Show what the cards of ``model`` (a dock's model choice: a folder, or a registry name) say;
        ``card``: its card when the dock has read it. The "Model card" button opens its MODEL_CARD.md."""
        self.card_path = None
        if model is None:
            self.lines = ["no model chosen"]
        else:
            try:
                entry = model_entry(model)
                self.lines = about_lines(entry, card)
                if entry.source != "downloadable":
                    self.card_path = model_card_file(entry.path)
            except UserInputError as e:
                self.lines = [str(e)]
            except Exception as e:  # noqa: BLE001 - a card of odd form: the dock says what is wrong elsewhere
                log.warning("zfdiffusion: could not describe %s", model, exc_info=e)
                self.lines = [f"its cards could not be read ({type(e).__name__}: {str(e)[:100]})"]
        self.text.value = "\n".join(self.lines)
        self.card_button.enabled = self.card_path is not None
        self.card_button.tooltip = (f"open {self.card_path} (data, licence, training, measured quality)"
                                    if self.card_path is not None else "this model has no MODEL_CARD.md")
        self._refit()

    def _refit(self, *_) -> None:
        """An open section as tall as its lines now."""
        if self.collapsible.isExpanded():
            self.collapsible.expand(animate=False)

    def open_card(self) -> bool:
        """Open the model's MODEL_CARD.md with the desktop's program for it; whether it was asked to."""
        if self.card_path is None:
            return False
        return bool(QDesktopServices.openUrl(QUrl.fromLocalFile(str(self.card_path))))

    # ------------------------------------------------------------ domain warnings
    def set_warnings(self, warnings: list[str]) -> None:
        """Show ``warnings`` above the section (hidden when there are none)."""
        self.warnings = list(warnings)
        self.warning.value = "\n".join(f"⚠ {w}" for w in self.warnings)
        self.warning.native.setVisible(bool(self.warnings))

    def notify(self, layer, model: str | None, warnings: list[str]) -> bool:
        """A napari warning about ``layer`` with ``warnings``, once per layer and model; whether one was shown."""
        key = (id(layer), str(model))
        if not warnings or key in self._notified:
            return False
        self._notified.add(key)
        name = Path(str(model)).name if model else "the model"
        show_warning(f"zfdiffusion: layer '{layer.name}' looks unlike the training data of '{name}': "
                     + " ".join(warnings))
        return True


def layer_pixel_size_um(layer) -> float | None:
    """The layer's pixel size in micrometres (its last axis), where its units are a length (napari's
    default, pixels, and anything else: None)."""
    try:
        unit = tuple(layer.units)[-1]
        size = (float(layer.scale[-1]) * unit).to("micrometer").magnitude
    except Exception:  # noqa: BLE001 - pixels, no units, a unit that is not a length
        return None
    return float(size) if math.isfinite(size) and size > 0 else None


def layer_plane(viewer, layer: Image) -> tuple[object, float]:
    """What the model will see of ``layer``: a 2D layer as is, the plane shown of a stack; RGB made gray
    (the mean of its colours, on a strided sample). Of a multiscale layer its smallest level (cheap: the
    full-resolution one may be gigabytes far away), and how many full-resolution pixels one of its pixels
    spans along x (1 for other layers)."""
    full = layer.data[0] if layer.multiscale else layer.data
    data = layer.data[-1] if layer.multiscale else layer.data
    down = [a / b if b else 1.0 for a, b in zip(full.shape, data.shape)]
    spatial = data.ndim - int(bool(layer.rgb))
    if spatial > 2:
        point = layer.world_to_data(viewer.dims.point)  # full-resolution data coordinates
        data = data[tuple(int(np.clip(round(point[i] / down[i]), 0, data.shape[i] - 1)) for i in range(spatial - 2))]
    if layer.rgb:
        step = max(1, math.ceil(math.sqrt(data.shape[0] * data.shape[1] / MAX_SAMPLE)))
        small = np.asarray(data[::step, ::step, :3])
        data = small.mean(-1).astype(small.dtype)
    return data, down[spatial - 1]


def layer_warnings(viewer, layer, card: dict | None, kind: str, *, rescaled: bool = False) -> list[str]:
    """:func:`..core.modelinfo.domain_warnings` for the plane of ``layer`` the model will see ([] without
    a card or an Image layer; never an exception: a layer of odd form is answered by the job itself).
    The layer's own pixel size is compared; the field of view (``kind`` "slices") is that of the plane
    looked at (a multiscale level's pixels are larger)."""
    if card is None or not isinstance(layer, Image):
        return []
    try:
        image, down = layer_plane(viewer, layer)
        size = layer_pixel_size_um(layer)
        if size is not None and kind == "slices":
            size *= down
        return domain_warnings(card, image, size, kind, rescaled=rescaled,
                               normalised=generated_provenance(layer) is not None)
    except Exception as e:  # noqa: BLE001 - a warning is a help, never a failure
        log.debug("zfdiffusion: no domain check for layer %r", getattr(layer, "name", layer), exc_info=e)
        return []


__all__ = ["AboutPanel", "layer_pixel_size_um", "layer_plane", "layer_warnings"]
