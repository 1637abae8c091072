"""Running core jobs off the GUI thread: a model cache, a progress relay, a worker starter, and
:class:`JobWidget`, the base of dock widgets that run one job at a time.

The widgets never compute. They hand a plain function to :func:`start_job`, which runs it in a
napari ``thread_worker`` with a :class:`~napari_zfdiffusion.core.errors.CancelToken` and a
progress callback. The callback runs in the worker thread: it first checks the token (a pressed
Cancel stops the job within one step) and then sends the :class:`Progress` through a Qt signal,
which Qt queues to the GUI thread, where the napari progress bar is updated.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import numpy as np
from magicgui.widgets import Container
from napari.qt.threading import create_worker
from napari.utils import progress
from napari.utils.notifications import show_error, show_info
from qtpy.QtCore import QObject, Signal

from ..core.cascade import Cascade
from ..core.errors import Cancelled, CancelToken, UserInputError
from ..core.sampling import Progress
from ..core.store import list_models, resolve_model

if TYPE_CHECKING:
    from napari.layers import Image

_CACHE: OrderedDict[tuple[type, str, str], object] = OrderedDict()
_CACHE_SIZE = 2  # (model, device) pairs kept per model class: enough to switch back and forth
_LOCK = threading.Lock()
MAX_SEED = 2**31 - 1
DEMO_CASCADE = "zf-cascade-demo"  # the bundled slice cascade, chosen when a cascade widget opens
PROVENANCE_KEY = "zfdiffusion"  # layer.metadata[PROVENANCE_KEY]: how a layer was made
log = logging.getLogger(__name__)

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


def cascade_choices() -> list[tuple[str, str]]:
    """(label, folder) for each cascade model, bundled first; the demo cascade first of all."""
    entries = [m for m in list_models() if m.kind == "cascade"]
    entries.sort(key=lambda m: (m.name != DEMO_CASCADE, m.source != "bundled"))
    return [(f"{m.name} ({m.source})", str(m.path)) for m in entries]


def checked_cascade(model: str, device: str) -> Cascade:
    """:func:`get_cascade`, refusing a model without depth classes (a UserInputError that says so)."""
    cascade = get_cascade(model, device)
    if not cascade.depth_classes:
        raise UserInputError(f"model '{cascade.name}' lists no depth classes in its cascade.json.")
    return cascade


def clear_cache() -> None:
    with _LOCK:
        _CACHE.clear()


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


def generated_provenance(layer) -> dict | None:
    """The provenance of a layer this plugin made (values already in [0, 1]), else None."""
    prov = layer.metadata.get(PROVENANCE_KEY)
    if isinstance(prov, dict) and str(prov.get("kind", "")).startswith("zfdiffusion"):
        return prov
    return None


def layer_image(layer: Image, purpose: str) -> np.ndarray:
    """The data of a grayscale Image layer, 2D (Y, X) or a stack (N, Y, X) (the full-resolution level of
    a multiscale one); a UserInputError naming ``purpose`` (e.g. "upsampling") for anything else."""
    if layer.rgb:
        raise UserInputError(f"'{layer.name}' is an RGB image: {purpose} takes one grayscale channel. "
                             "Split its channels (right-click > Split RGB) and select one.")
    data = layer.data[0] if layer.multiscale else layer.data
    if data.ndim not in (2, 3):
        raise UserInputError(f"'{layer.name}' has shape {tuple(data.shape)}: {purpose} takes a 2D image "
                             "(Y, X) or a stack (N, Y, X).")
    return data


def shown_plane(viewer, layer: Image, data: np.ndarray) -> int:
    """The index of the plane of a (N, Y, X) layer that the viewer shows now."""
    return int(np.clip(round(layer.world_to_data(viewer.dims.point)[0]), 0, data.shape[0] - 1))


def error_message(exc: BaseException) -> str:
    if isinstance(exc, UserInputError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


class JobWidget(Container):
    """A dock widget that runs one job at a time: start, progress, cancel, errors, results.

    Subclasses create ``model`` (ComboBox of (label, folder) choices from ``self._models``),
    ``model_folder`` (FileEdit), ``seed``, ``status`` and ``cancel_button``, and define
    ``_set_running(running)`` and ``_load_model_info()``.
    """

    def __init__(self, viewer, **kwargs):
        super().__init__(**kwargs)
        self._viewer = viewer
        self._job: Job | None = None
        self._models: list[tuple[str, str]] = []
        self.last_progress: Progress | None = None

    def _set_running(self, running: bool) -> None:
        raise NotImplementedError

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

    def _wire_model(self) -> None:
        """Follow the model, device and folder choices, and start on the demo model (or the first one)."""
        self.model.changed.connect(self._load_model_info)
        self.device.changed.connect(self._load_model_info)
        self.model_folder.changed.connect(self._on_folder)
        if self._models:  # reading a model's cards is quick; its weights load on first use
            self.model.value = self._models[0][1]
        else:
            self._load_model_info()

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


__all__ = ["DEMO_CASCADE", "MAX_SEED", "PROVENANCE_KEY", "CascadeJobWidget", "ItemRelay", "Job", "JobWidget", "ProgressRelay",
           "cached_model", "cascade_choices", "checked_cascade", "clear_cache", "error_message", "generated_provenance",
           "get_cascade", "get_model", "layer_image", "shown_plane", "start_job", "step_callback"]
