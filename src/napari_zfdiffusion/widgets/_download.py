"""The "Download NAME (SIZE)" button under a dock's model box.

A model of the registry that is not downloaded yet shows in a model box as "NAME (download, SIZE)"
(:func:`._models.model_choices`). Choosing it shows this button (hidden otherwise), and the status
line says to press it: a choice to download is no error. The button fetches the model into the cache
as ``zfdiffusion models --fetch NAME`` does, with the same code (:func:`..core.store.fetch_model`,
that is :func:`..core.registry.download_model`: every file sha256-checked, the model assembled in a
hidden folder that gets its name only when it is complete), in a worker thread with the dock's job
machinery (:func:`._jobs.start_job`): its progress bar and status line in bytes, and its Cancel.

When the download ends, the model list of every open dock is refreshed (the model now "cached");
the dock that downloaded it, and any dock whose box held its name, choose it. The errors are the
core's messages (a wrong sha256, a server that cannot be reached, a connection closed mid-file,
offline mode naming each missing file), shown as an error notification, with the first line in the
status line. Cancel stops at the next block received and leaves nothing under the model's name (the
files already downloaded and checked stay in the hidden folder; the next Download goes on from them).

A dock wires it in three places: ``self.download = ModelDownload(self, choices)`` after its model
rows (``choices``: the function that lists its model box), ``self.download.button`` right under the
model box, and on each model choice :meth:`ModelDownload.update` (a dock reading a card) or
:meth:`ModelDownload.load_cascade` (a cascade dock, in place of ``_load_cascade``).
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable
from pathlib import Path

from magicgui.widgets import PushButton
from napari.utils.notifications import show_error, show_info

from ..core.errors import UserInputError
from ..core.progress import Progress
from ..core.registry import OFFLINE_ENV, format_size, is_offline
from ..core.store import ModelEntry, fetch_model
from ._jobs import error_message, start_job
from ._models import downloadable
from ._progress import TimeLeft

log = logging.getLogger(__name__)
GUIDE_SECTION = '"Models: bundled, downloadable, offline" in the user guide'
_OPEN: weakref.WeakSet[ModelDownload] = weakref.WeakSet()  # every dock's, to refresh their model lists


class ModelDownload:
    """The Download button of ``dock`` (a :class:`._jobs.JobWidget` with a model box), and its job.

    ``choices()``: the (label, value) list of the dock's model box, as the dock made it (refreshed
    after a download; entries the dock added itself, a folder or a fine-tuned model, are kept).
    """

    def __init__(self, dock, choices: Callable[[], list[tuple[str, str]]]):
        self.dock = dock
        self.choices = choices
        self.entry: ModelEntry | None = None  # the registry model chosen now, while not downloaded
        self._listed = {value for _, value in dock._models}  # the values that came from choices()
        self._time = TimeLeft()
        self.button = PushButton(text="Download", label="", visible=False,
                                 tooltip="download the chosen model from the model registry into the cache, "
                                         "every file checked against its sha256")
        self.button.changed.connect(lambda *_: self.start())
        _OPEN.add(self)

    # ------------------------------------------------------------ the choice
    @property
    def note(self) -> str:
        """What the status line says while a model to download is chosen ("" otherwise)."""
        e = self.entry
        if e is None:
            return ""
        text = (f"'{e.name}' is not downloaded yet ({format_size(e.size or 0)}, from the model registry): press "
                f"'Download {e.name}' to put it in {e.path}")
        if is_offline():
            text += (f". Offline ({OFFLINE_ENV}=1) nothing is downloaded: copy the model folder there from a "
                     f"machine that has it (see {GUIDE_SECTION})")
        return text + "."

    def _show(self) -> ModelEntry | None:
        """Show the button for a model to download (enabled while the dock is idle), hide it for any
        other choice; the registry model chosen, or None."""
        self.entry = entry = downloadable(self.dock.model.value)
        if entry is not None:
            size = format_size(entry.size or 0)
            self.button.text = f"Download {entry.name} ({size})"
            self.button.tooltip = (f"download '{entry.name}' ({size}) from the model registry into {entry.path}, "
                                   "every file checked against its sha256 (in the background: Cancel stops it "
                                   "and keeps nothing under its name)")
        self.button.visible = entry is not None
        self.button.enabled = entry is not None and self.dock._job is None
        return entry

    def update(self) -> ModelEntry | None:
        """On a model choice: the button shown or hidden; for a model to download, the status line
        says to press it. The registry model chosen (the dock then reads no card), or None."""
        entry = self._show()
        if entry is not None:
            self.dock.status.value = self.note
        return entry

    def load_cascade(self):
        """:meth:`update`, then for a cascade dock (:class:`._jobs.CascadeJobWidget`) its
        ``_load_cascade()``: the chosen cascade, or None (also, without an error, for a model to download:
        no cascade, Generate disabled, no resolutions)."""
        if self.update() is None:
            return self.dock._load_cascade()
        dock = self.dock
        dock._cascade = None
        dock.generate_button.enabled = False
        dock.resolution.reset_choices()
        return None

    # ------------------------------------------------------------ the job
    def start(self) -> None:
        """Download the chosen model in the background (the button's action)."""
        dock = self.dock
        if dock._job is not None:
            show_info("a job is running: wait for it or press Cancel.")
            return
        entry = self._show()
        if entry is None:
            show_info("the chosen model needs no download: choose a 'NAME (download, SIZE)' model.")
            return
        name, size = entry.name, format_size(entry.size or 0)
        self._time = TimeLeft()
        dock.last_progress = None
        dock.progress_bar.value = 0
        dock.status.value = f"downloading {name} ({size}): connecting"
        dock._set_running(True)
        self.button.enabled = False

        def job(callback, token):
            return fetch_model(name, callback)  # what `zfdiffusion models --fetch NAME` runs

        dock._job = started = start_job(job, what=f"downloading {name}", on_progress=self._on_progress,
                                        on_result=lambda path: self._on_done(entry, Path(path)),
                                        on_error=lambda exc: self._on_error(name, exc),
                                        on_cancel=lambda: self._on_cancel(name), on_finish=self._on_finish,
                                        describe=self._describe)
        if dock._job is started:  # napari's bar (Activity) says "connecting", not "loading the model"
            started.pbar.set_description(f"downloading {name}: connecting")

    def _bytes(self, p: Progress) -> str:
        return f"{format_size(p.step)} of {format_size(p.total)}{self._time.text()}"

    def _describe(self, p: Progress) -> tuple[str, float]:
        """napari's progress bar: "downloading NAME: " (start_job's) and this."""
        return self._bytes(p), p.fraction

    def _on_progress(self, p: Progress) -> None:
        dock = self.dock
        dock.last_progress = p
        self._time.update(p, dock._job.relay.last_sent if dock._job is not None else None)
        dock.progress_bar.value = int(min(p.fraction, 1.0) * dock.progress_bar.max)
        dock.status.value = f"{p.stage}: {self._bytes(p)}"  # "downloading NAME: 0.5 MB of 1.4 MB ..."

    def _on_done(self, entry: ModelEntry, path: Path) -> None:
        dock = self.dock
        dock.progress_bar.value = dock.progress_bar.max
        refresh_model_lists(entry.name, path, chosen_by=self)
        size = format_size(entry.size or 0)
        dock.status.value = (f"downloaded '{entry.name}' ({size}), every file checked against the registry's "
                             f"sha256: {path}")
        show_info(f"zfdiffusion: model '{entry.name}' downloaded into {path}, and chosen in the model box.")

    def _on_error(self, name: str, exc: BaseException) -> None:
        if not isinstance(exc, UserInputError):  # a bug: its traceback goes to the log
            log.error("zfdiffusion: the download of model '%s' failed", name, exc_info=exc)
        message = error_message(exc)
        self.dock.status.value = f"download of '{name}' failed: {message.splitlines()[0]}"
        show_error(message)

    def _on_cancel(self, name: str) -> None:
        message = (f"download of '{name}' cancelled: nothing is under its name in the cache; the files already "
                   "downloaded and checked are kept (hidden), and the next Download goes on from them.")
        self.dock.status.value = message
        show_info(f"zfdiffusion: {message}")

    def _on_finish(self) -> None:
        self.dock._on_finish()
        self._show()

    # ------------------------------------------------------------ the model list
    def refresh(self, name: str, path: Path, choose: bool = False) -> None:
        """The dock's model list as ``choices()`` gives it now (with the entries the dock added itself);
        the model ``name`` downloaded into ``path`` chosen where ``choose`` or where the box held its name."""
        dock = self.dock
        fresh = list(self.choices())
        values = {value for _, value in fresh}
        extra = [(label, value) for label, value in dock._models if value not in self._listed and value not in values]
        self._listed = values
        target = next((value for _, value in fresh if _same(value, path)), None)
        current = dock.model.value
        if target is None or not (choose or current == name) or current == target:
            dock._models = fresh + extra
            dock.model.reset_choices()
            return
        # keep the current entry while choosing the new one: the box never falls back to another model
        held = [(label, value) for label, value in dock._models if value == current and value not in values]
        dock._models = fresh + extra + held
        dock.model.reset_choices()
        dock.model.value = target
        dock._models = fresh + extra
        dock.model.reset_choices()


def _same(value: str, path: Path) -> bool:
    try:
        return Path(value).resolve() == path.resolve()
    except OSError:
        return False


def refresh_model_lists(name: str, path: Path, chosen_by: ModelDownload | None = None) -> None:
    """After model ``name`` was downloaded into ``path``: every open dock's model list refreshed;
    ``chosen_by``'s dock, and each dock whose box held ``name``, choose it."""
    for download in list(_OPEN):
        try:
            download.refresh(name, path, choose=download is chosen_by)
        except RuntimeError:  # its Qt widgets are gone (a closed viewer)
            _OPEN.discard(download)


__all__ = ["ModelDownload", "refresh_model_lists"]
