"""Running core jobs off the GUI thread: progress relays, a worker starter, and :class:`JobWidget`,
the base of dock widgets that run one job at a time (with the rows every dock has: model, folder,
device, seed).

The widgets never compute. They hand a plain function to :func:`start_job`, which runs it in a
napari ``thread_worker`` with a :class:`~napari_zfdiffusion.core.errors.CancelToken` and a
progress callback. The callback runs in the worker thread: it first checks the token (a pressed
Cancel stops the job within one step) and then sends the :class:`Progress` through a Qt signal,
which Qt queues to the GUI thread, where the napari progress bar is updated.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

from magicgui.widgets import ComboBox, Container, FileEdit, PushButton, SpinBox
from napari.qt.threading import create_worker
from napari.utils import progress
from napari.utils.notifications import show_error, show_info
from qtpy.QtCore import QObject, Signal

from ..core.device import available_devices
from ..core.errors import Cancelled, CancelToken, UserInputError
from ..core.progress import Progress
from ._models import checked_cascade

MAX_SEED = 2**31 - 1
log = logging.getLogger(__name__)


class ProgressRelay(QObject):
    """Carries :class:`Progress` from the worker thread to the GUI thread (a queued signal)."""

    progress = Signal(object)


class ItemRelay(QObject):
    """Carries partial results (a finished plane, ...) from the worker thread to the GUI thread (a queued
    signal). Create it in the GUI thread; items arrive in the order sent, before the job's end."""

    item = Signal(object)


def step_callback(token: CancelToken, relay: ProgressRelay) -> Callable[[Progress], None]:
    def callback(p: Progress) -> None:
        token.check()
        relay.progress.emit(p)

    return callback


@dataclass
class Job:
    """A running job: its worker, its cancel token and its progress bar."""

    worker: object
    token: CancelToken
    pbar: progress
    relay: ProgressRelay

    def cancel(self) -> None:
        self.token.cancel()


BAR_TOTAL = 100  # the bar counts percent: stages may differ in length (sampling steps, decoded batches)


def _update_bar(pbar: progress, what: str, p: Progress, ended: Callable[[], bool] = lambda: False) -> None:
    if pbar.total != BAR_TOTAL:
        pbar.total = BAR_TOTAL
    done = min(int(p.fraction * BAR_TOTAL), BAR_TOTAL)
    pbar.set_description(f"{what}: {p.stage} {p.step}/{p.total} (stage {p.stage_index + 1}/{p.n_stages})")
    if not ended() and done > pbar.n:  # the job may have ended inside set_description (see start_job)
        pbar.update(done - pbar.n)


def start_job(
    fn: Callable[[Callable[[Progress], None], CancelToken], object],
    *,
    what: str,
    on_progress: Callable[[Progress], None],
    on_result: Callable[[object], None],
    on_error: Callable[[BaseException], None],
    on_cancel: Callable[[], None],
    on_finish: Callable[[], None],
) -> Job:
    """Run ``fn(callback, token)`` in a napari thread worker and wire its outcome to the handlers.

    ``on_progress``, ``on_result``, ``on_error``, ``on_cancel`` and ``on_finish`` run in the GUI
    thread. ``on_finish`` always runs last, after the result, the error or the cancel.
    """
    token = CancelToken()
    relay = ProgressRelay()
    pbar = progress(total=0, desc=f"{what}: loading the model")

    def run():
        token.check()
        return fn(step_callback(token, relay), token)

    # napari's progress bar calls QApplication.processEvents() whenever it changes, so queued steps,
    # the result and the end of the job run *inside* a bar update. Updating the bar for each of
    # those nested steps would nest again, as deep as the queue is long (a fast GPU job overflows
    # the stack). So: the widget hears of every step at once, in the order sent; the bar is
    # updated by the outermost call only, to the latest step, and never once the job has ended.
    state = {"ended": False, "latest": None, "updating": False}

    def progressed(p: Progress) -> None:
        if state["ended"]:
            return
        on_progress(p)
        state["latest"] = p
        if state["updating"]:
            return  # an outer call is updating the bar and will show this step
        state["updating"] = True
        try:
            shown = None
            while not state["ended"] and state["latest"] is not shown:
                shown = state["latest"]
                _update_bar(pbar, what, shown, lambda: state["ended"])
        finally:
            state["updating"] = False

    def errored(exc: BaseException) -> None:
        if isinstance(exc, Cancelled):
            on_cancel()
        else:
            on_error(exc)

    def finished() -> None:
        state["ended"] = True
        relay.progress.disconnect(progressed)
        pbar.close()
        on_finish()

    relay.progress.connect(progressed)
    worker = create_worker(run, _start_thread=False, _ignore_errors=True)
    worker.returned.connect(on_result)
    worker.errored.connect(errored)
    worker.finished.connect(finished)
    worker.start()
    return Job(worker, token, pbar, relay)


def error_message(exc: BaseException) -> str:
    if isinstance(exc, UserInputError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def row(label: str, *widgets) -> Container:
    """Widgets side by side as one labelled row of a dock."""
    r = Container(layout="horizontal", labels=False, label=label, widgets=list(widgets))
    r.margins = (0, 0, 0, 0)
    return r


class JobWidget(Container):
    """A dock widget that runs one job at a time: start, progress, cancel, errors, results.

    Subclasses create the model rows with :meth:`_model_rows` (``model``, ``model_folder``,
    ``device``), the seed row with :meth:`_seed_row` where they take a seed, ``status`` and
    ``cancel_button``, and define ``_set_running(running)`` and ``_load_model_info()``.
    """

    def __init__(self, viewer, **kwargs):
        super().__init__(**kwargs)
        self._viewer = viewer
        self._job: Job | None = None
        self._models: list[tuple[str, str]] = []
        self.last_progress: Progress | None = None

    def _model_rows(self, choices: list[tuple[str, str]], tooltip: str, folder_tooltip: str) -> None:
        """The model box (``choices``: (label, folder)), "or folder" and the device box. The choices
        are a callable: napari calls reset_choices() on dock widgets whenever layers change."""
        self._models = choices
        self.model = ComboBox(label="model", choices=lambda _: list(self._models), nullable=True, tooltip=tooltip)
        self.model_folder = FileEdit(label="or folder", mode="d", nullable=True, tooltip=folder_tooltip)
        self.device = ComboBox(label="device", choices=available_devices(), value="auto")

    def _seed_row(self, tooltip: str = "") -> Container:
        """``seed`` and a "New seed" button beside it, as one row."""
        self.seed = SpinBox(label="seed", value=0, min=0, max=MAX_SEED, tooltip=tooltip)
        self.new_seed_button = PushButton(text="New seed")
        self.new_seed_button.changed.connect(self.new_seed)
        return row("seed", self.seed, self.new_seed_button)

    def _run_row(self, text: str, action: Callable[[], None]) -> tuple[PushButton, Container]:
        """The button that starts this dock's job (``action``) and Cancel beside it, as one row."""
        button = PushButton(text=text)
        button.changed.connect(lambda *_: action())
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.cancel_button.changed.connect(lambda *_: self.cancel())
        return button, row("", button, self.cancel_button)

    def _set_running(self, running: bool) -> None:
        raise NotImplementedError

    def _wire_model(self) -> None:
        """Follow the model, device and folder choices, and start on the demo model (or the first one)."""
        self.model.changed.connect(self._load_model_info)
        self.device.changed.connect(self._load_model_info)
        self.model_folder.changed.connect(self._on_folder)
        if self._models:  # reading a model's cards is quick; its weights load on first use
            self.model.value = self._models[0][1]
        else:
            self._load_model_info()

    def _load_model_info(self, *_) -> None:
        raise NotImplementedError

    def _on_folder(self, *_) -> None:
        """A folder chosen with "or folder": add it to the model choices and choose it."""
        folder = self.model_folder.value
        if folder is None or str(folder) in ("", "."):
            return
        value = str(folder)
        if value not in [v for _, v in self._models]:
            self._models.append((f"{folder.name} (folder)", value))
            self.model.reset_choices()
        if self.model.value == value:
            self._load_model_info()
        else:
            self.model.value = value

    def new_seed(self, *_) -> int:
        self.seed.value = secrets.randbelow(MAX_SEED + 1)
        return self.seed.value

    @property
    def _worker(self):
        """The running napari worker, or None when idle."""
        return None if self._job is None else self._job.worker

    @property
    def running(self) -> bool:
        return self._job is not None

    def _start(self, fn, what: str, on_result) -> None:
        if self._job is not None:
            show_info("a job is running: wait for it or press Cancel.")
            return
        if self.model.value is None:
            show_error("choose a model first (or a model folder).")
            return
        self.last_progress = None
        self.status.value = f"{what}: loading the model"
        self._set_running(True)
        self._job = start_job(fn, what=what, on_progress=self._on_progress, on_result=on_result,
                              on_error=self._on_error, on_cancel=self._on_cancel, on_finish=self._on_finish)

    def _on_progress(self, p: Progress) -> None:
        self.last_progress = p
        self.status.value = str(p)

    def _on_error(self, exc: BaseException) -> None:
        if not isinstance(exc, UserInputError):
            log.error("zfdiffusion job failed", exc_info=exc)
        self.status.value = "failed"
        show_error(error_message(exc))

    def _on_cancel(self) -> None:
        self.status.value = "cancelled"
        show_info("zfdiffusion: cancelled; nothing was added.")

    def _on_finish(self) -> None:
        self._job = None
        self._set_running(False)

    def cancel(self) -> None:
        if self._job is not None:
            self._job.cancel()
            self.cancel_button.enabled = False
            self.status.value = "cancelling (stops after this step)"

    def wait(self, timeout: float = 60.0) -> bool:
        """Process Qt events until the running job has finished and its layer is added (for tests)."""
        from qtpy.QtCore import QCoreApplication, QEventLoop

        deadline = time.monotonic() + timeout
        while self._job is not None and time.monotonic() < deadline:
            QCoreApplication.processEvents(QEventLoop.ProcessEventsFlag.AllEvents, 50)
            time.sleep(0.005)
        return self._job is None


class CascadeJobWidget(JobWidget):
    """A :class:`JobWidget` that works with a depth cascade: the model choice, reading its cards and
    the resolutions it reaches. Subclasses also create ``resolution`` (ComboBox with
    ``choices=self._resolutions``) and ``generate_button``, and fill the rest in ``_load_model_info``."""

    _cascade = None

    def _load_cascade(self):
        """The chosen cascade (cards only), with the resolution set to its highest; or None, with the
        status and a notification saying why."""
        self._cascade = None
        self.generate_button.enabled = False
        if self.model.value is None:
            self.status.value = "no model: choose a folder"
            return None
        try:
            cascade = checked_cascade(self.model.value, self.device.value)
        except Exception as e:  # noqa: BLE001 - any bad folder becomes a message
            self.resolution.reset_choices()
            self.status.value = "model not usable"
            show_error(error_message(e))
            return None
        self._cascade = cascade
        self.resolution.reset_choices()
        self.resolution.value = cascade.resolutions[-1]
        return cascade

    def _resolutions(self, *_) -> list[int]:
        return [] if self._cascade is None else self._cascade.resolutions


__all__ = ["MAX_SEED", "CascadeJobWidget", "ItemRelay", "Job", "JobWidget", "ProgressRelay", "error_message", "row",
           "start_job", "step_callback"]
