"""Running core jobs off the GUI thread: a cascade cache, a progress relay and a worker starter.

The widgets never compute. They hand a plain function to :func:`start_job`, which runs it in a
napari ``thread_worker`` with a :class:`~napari_zfdiffusion.core.errors.CancelToken` and a
progress callback. The callback runs in the worker thread: it first checks the token (a pressed
Cancel stops the job within one step) and then sends the :class:`Progress` through a Qt signal,
which Qt queues to the GUI thread, where the napari progress bar is updated.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from napari.qt.threading import create_worker
from napari.utils import progress
from qtpy.QtCore import QObject, Signal

from ..core.cascade import Cascade
from ..core.errors import Cancelled, CancelToken
from ..core.sampling import Progress
from ..core.store import resolve_model

_CACHE: OrderedDict[tuple[str, str], Cascade] = OrderedDict()
_CACHE_SIZE = 2  # (model, device) pairs kept: enough to switch back and forth without reloading
_LOCK = threading.Lock()


def get_cascade(model: str, device: str) -> Cascade:
    """The cascade for (model, device), loaded once and then cached.

    :meth:`Cascade.load` reads only the JSON cards; each stage's weights load on first use, in
    the worker thread, and stay on the cached object for the next job.
    """
    path = resolve_model(model).resolve()
    key = (str(path), str(device))
    with _LOCK:
        if key in _CACHE:
            _CACHE.move_to_end(key)
            return _CACHE[key]
    cascade = Cascade.load(path, device)
    with _LOCK:
        cascade = _CACHE.setdefault(key, cascade)
        _CACHE.move_to_end(key)
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    return cascade


def clear_cache() -> None:
    with _LOCK:
        _CACHE.clear()


class ProgressRelay(QObject):
    """Carries :class:`Progress` from the worker thread to the GUI thread (a queued signal)."""

    progress = Signal(object)


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


def _update_bar(pbar: progress, what: str, p: Progress) -> None:
    total = p.total * p.n_stages
    if pbar.total != total:
        pbar.total = total
    done = min(p.stage_index * p.total + p.step, total)
    pbar.set_description(f"{what}: {p.stage} {p.step}/{p.total} (stage {p.stage_index + 1}/{p.n_stages})")
    if done > pbar.n:
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

    def progressed(p: Progress) -> None:
        _update_bar(pbar, what, p)
        on_progress(p)

    def errored(exc: BaseException) -> None:
        if isinstance(exc, Cancelled):
            on_cancel()
        else:
            on_error(exc)

    def finished() -> None:
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


__all__ = ["Job", "ProgressRelay", "clear_cache", "get_cascade", "start_job", "step_callback"]
