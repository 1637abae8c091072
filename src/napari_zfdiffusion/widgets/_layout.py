"""How every dock is laid out, so that it fits a 1366x768 screen beside napari's own panels.

From top to bottom: the essential controls, an "Advanced" section (sampler, steps, seed, device,
tiles, the model folder) collapsed by default, both in a scroll area that asks for no more height
than they need, up to :func:`max_scroll_height` (480 px on a 768 px screen); then, always visible
right below it, the footer: the run buttons with the "?" button that opens the dock's section of the
user guide, the dock's progress bar and its status line. Empty space goes below the footer.

Also here: the device line shown under the device box ("auto → CPU (no CUDA in this torch build)").
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, metadata

from magicgui.widgets import Container, PushButton
from magicgui.widgets.bases import Widget
from qtpy.QtCore import QEvent, QSize, Qt, QUrl
from qtpy.QtGui import QDesktopServices
from qtpy.QtWidgets import QApplication, QScrollArea, QSizePolicy, QVBoxLayout, QWidget
from superqt import QCollapsible

from ..core.device import resolve_device
from ..core.errors import UserInputError

MAX_SCROLL_HEIGHT = 480  # px: the scrolled part's size hint at most on a 768 px screen (the footer adds ~110)
SCREEN_MARGIN = 300  # px of a taller screen's height left to the title, menu and status bars, the footer
GUIDE = "https://github.com/zfdiffusion/napari-zfdiffusion/blob/main/docs/user-guide.md"


def guide_url(anchor: str) -> str:
    """The user guide's section ``anchor`` (the Documentation URL of the installed package)."""
    url = GUIDE
    try:
        for entry in metadata("napari-zfdiffusion").get_all("Project-URL") or []:
            name, _, value = entry.partition(",")
            if name.strip() == "Documentation":
                url = value.strip()
    except PackageNotFoundError:
        pass
    return f"{url}#{anchor}"


def help_link(anchor: str) -> PushButton:
    """A "?" button that opens the user guide's section ``anchor`` in the web browser (its ``url``)."""
    button = PushButton(text="?", tooltip="open this dock's section of the user guide in your web browser")
    button.url = guide_url(anchor)
    button.native.setFixedWidth(button.native.sizeHint().height() + 4)
    button.changed.connect(lambda *_: QDesktopServices.openUrl(QUrl(button.url)))
    return button


def max_scroll_height() -> int:
    """The most height the controls' scroll area asks for: :data:`MAX_SCROLL_HEIGHT`, or more on a taller
    screen (its available height less :data:`SCREEN_MARGIN`)."""
    screen = QApplication.primaryScreen()
    height = screen.availableGeometry().height() if screen is not None else 0
    return max(MAX_SCROLL_HEIGHT, height - SCREEN_MARGIN)


class FitScrollArea(QScrollArea):
    """A vertical scroll area whose size hint is its content's, up to ``max_height`` (so that a dock's
    size hint fits the screen); it grows up to its content's height where the dock has room (never
    more: the room left goes below the footer), and scrolls where it has less."""

    def __init__(self, content: QWidget, max_height: int | None = None):
        super().__init__()
        self.max_height = max_height or max_scroll_height()
        self.setSizePolicy(QSizePolicy.Policy.Preferred, QSizePolicy.Policy.Preferred)
        self.setWidgetResizable(True)
        self.setFrameShape(QScrollArea.Shape.NoFrame)
        self.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.setVerticalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAsNeeded)
        self.setWidget(content)
        self._fit()

    def _content_height(self) -> int:
        """The content's height at the width it has (wrapped lines are taller in a narrow dock)."""
        content = self.widget()
        height = content.sizeHint().height()
        width = self.viewport().width()
        if content.hasHeightForWidth() and width > 0:
            height = max(height, content.heightForWidth(width))
        frame = self.height() - self.viewport().height() if self.viewport().height() > 0 else 2 * self.frameWidth()
        return height + max(frame, 0)  # a style's border around the viewport

    def _fit(self) -> None:
        height = max(self._content_height(), 120)
        if height != self.maximumHeight():
            self.setMaximumHeight(height)

    def resizeEvent(self, event) -> None:
        super().resizeEvent(event)
        self._fit()

    def eventFilter(self, obj, event) -> bool:
        """The content's layout changed (Advanced opened or closed, a line grew): ask for the new height."""
        if obj is self.widget() and event.type() == QEvent.Type.LayoutRequest:
            self._fit()
            self.updateGeometry()
        return super().eventFilter(obj, event)

    def _bar(self) -> int:
        return self.verticalScrollBar().sizeHint().width()

    def sizeHint(self) -> QSize:
        hint = self.widget().sizeHint()
        return QSize(hint.width() + self._bar(), min(self._content_height(), self.max_height))

    def minimumSizeHint(self) -> QSize:
        return QSize(self.widget().minimumSizeHint().width() + self._bar(), 120)


@dataclass
class DockLayout:
    """The parts of a dock laid out by :func:`lay_out`."""

    body: Container
    advanced: Container
    collapsible: QCollapsible
    scroll: FitScrollArea
    footer: Container

    def containers(self) -> tuple[Container, ...]:
        return self.body, self.advanced, self.footer


def lay_out(dock: Container, body: list, advanced: list, footer: list) -> DockLayout:
    """Put ``body`` (the essential controls), a collapsed "Advanced" section with ``advanced``, and
    ``footer`` (always visible) into ``dock``, a magicgui Container without widgets of its own."""
    essential = Container(labels=True, widgets=body)
    more = Container(labels=True, widgets=advanced)
    section = QCollapsible("Advanced", expandedIcon="▾", collapsedIcon="▸")
    section.toggleButton().setToolTip("more settings: sampler, steps, seed, device, tiles, model folder")
    section.setDuration(120)
    section.addWidget(more.native)
    section.collapse(animate=False)
    section.layout().setContentsMargins(0, 0, 0, 0)

    page = QWidget()
    column = QVBoxLayout(page)
    column.setContentsMargins(0, 0, 0, 0)
    column.setSpacing(0)
    column.addWidget(essential.native)
    column.addWidget(section)
    column.addStretch(1)
    scroll = FitScrollArea(page)

    bottom = Container(labels=True, widgets=footer)
    layout = dock.native.layout()
    layout.setContentsMargins(0, 0, 0, 0)
    layout.setSpacing(0)
    layout.addWidget(scroll, 1000)  # the controls take the room they need (up to their height) ...
    layout.addWidget(bottom.native)
    layout.addStretch(1)  # ... and the rest goes below the footer
    return DockLayout(essential, more, section, scroll, bottom)


def controls(container: Container) -> Iterator[Widget]:
    """Every widget inside ``container`` (rows and sections opened, not compound widgets such as
    FileEdit), in order."""
    for w in container:
        if type(w) is Container:
            yield from controls(w)
        else:
            yield w


def device_line(choice: str) -> str:
    """What a device choice means on this machine: "auto → CPU (no CUDA in this torch build)",
    "auto → cuda:0 (NVIDIA H200)", or why it cannot be had."""
    import torch

    try:
        device = resolve_device(choice)
    except UserInputError:
        return f"{choice} → not available here ({_no_gpu_reason(torch)}): choose auto or cpu"
    if device.type == "cuda":
        try:
            index = device.index if device.index is not None else torch.cuda.current_device()
            return f"{choice} → cuda:{index} ({torch.cuda.get_device_name(index)})"
        except Exception as e:  # noqa: BLE001 - a GPU that cannot be asked its name
            return f"{choice} → {device} (not usable: {e})"
    if device.type == "mps":
        return f"{choice} → Apple GPU (MPS)"
    return f"{choice} → CPU" + (f" ({_no_gpu_reason(torch)})" if choice == "auto" else "")


def _no_gpu_reason(torch) -> str:
    if torch.version.cuda is None:
        return "no CUDA in this torch build"
    if not torch.cuda.is_available():
        return "no CUDA GPU found"
    return "a GPU is there: choose auto or cuda"


def is_gpu(choice: str) -> bool:
    """Whether a device choice resolves to a GPU (False where it cannot be resolved)."""
    try:
        return resolve_device(choice).type != "cpu"
    except UserInputError:
        return False


__all__ = ["GUIDE", "MAX_SCROLL_HEIGHT", "DockLayout", "FitScrollArea", "controls", "device_line", "guide_url",
           "help_link", "is_gpu", "lay_out"]
