"""Running core jobs off the GUI thread: progress relays, a worker starter, and :class:`JobWidget`,
the base of dock widgets that run one job at a time (with the rows every dock has: model, folder,
device, seed; the layout of :mod:`._layout`; a progress bar with the stage in plain words and the
time left, from :mod:`._progress`; a "Copy CLI command" button that puts the ``zfdiffusion``
command doing what the dock would do on the clipboard).

The widgets never compute. They hand a plain function to :func:`start_job`, which runs it in a
napari ``thread_worker`` with a :class:`~napari_zfdiffusion.core.errors.CancelToken` and a
progress callback. The callback runs in the worker thread: it first checks the token (a pressed
Cancel stops the job within one step) and then sends the :class:`Progress` through a Qt signal,
which Qt queues to the GUI thread, where the napari progress bar is updated.
"""

from __future__ import annotations

import logging
import secrets
import shlex
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from magicgui.widgets import ComboBox, Container, FileEdit, Label, ProgressBar, PushButton, SpinBox
from napari.layers import Image
from napari.qt.threading import create_worker
from napari.utils import progress
from napari.utils.notifications import show_error, show_info
from qtpy.QtCore import QObject, Signal
from qtpy.QtWidgets import QApplication, QSizePolicy

from ..core.device import available_devices
from ..core.errors import Cancelled, CancelToken, UserInputError
from ..core.progress import Progress
from ..core.store import resolve_model
from ._layout import device_line, help_link, is_gpu, lay_out
from ._models import checked_cascade
from ._progress import TimeLeft, cascade_costs, plain_stage

MAX_SEED = 2**31 - 1
log = logging.getLogger(__name__)


class ProgressRelay(QObject):
    """Carries :class:`Progress` from the worker thread to the GUI thread (a queued signal), and when
    each step was sent (``sent``, in the order sent; ``last_sent``: that of the step being handled),
    so that rates are measured where the work is done, not when a busy GUI gets to the step."""

    progress = Signal(object)

    def __init__(self):
        super().__init__()
        self.sent: deque[float] = deque()
        self.last_sent: float | None = None


class ItemRelay(QObject):
    """Carries partial results (a finished plane, ...) from the worker thread to the GUI thread (a queued
    signal). Create it in the GUI thread; items arrive in the order sent, before the job's end."""

    item = Signal(object)


def step_callback(token: CancelToken, relay: ProgressRelay) -> Callable[[Progress], None]:
    def callback(p: Progress) -> None:
        token.check()
        relay.sent.append(time.monotonic())
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


def _plain(p: Progress) -> tuple[str, float]:
    return f"{plain_stage(p.stage)} ({p.step}/{p.total})", p.fraction


def _update_bar(pbar: progress, what: str, p: Progress, ended: Callable[[], bool] = lambda: False,
                describe: Callable[[Progress], tuple[str, float]] = _plain) -> None:
    if pbar.total != BAR_TOTAL:
        pbar.total = BAR_TOTAL
    text, fraction = describe(p)
    done = min(int(fraction * BAR_TOTAL), BAR_TOTAL)
    pbar.set_description(f"{what}: {text}")
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
    describe: Callable[[Progress], tuple[str, float]] = _plain,
) -> Job:
    """Run ``fn(callback, token)`` in a napari thread worker and wire its outcome to the handlers.

    ``on_progress``, ``on_result``, ``on_error``, ``on_cancel`` and ``on_finish`` run in the GUI
    thread. ``on_finish`` always runs last, after the result, the error or the cancel.
    ``describe(p)``: napari's progress bar's text and share done for a step (after ``on_progress(p)``).
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
        relay.last_sent = relay.sent.popleft() if relay.sent else time.monotonic()
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
                _update_bar(pbar, what, shown, lambda: state["ended"], describe)
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


CLI_TIP = ("copy the zfdiffusion command that does what this dock would do with these settings, for batch work "
           "over folders: paste it in a terminal and put your own file names in place of the ones it shows")


def cli_value(value) -> str:
    """A setting as a command-line word: floats as short as they stay equal ("3", "0.45"), paths as is."""
    if isinstance(value, float):
        short = f"{value:g}"
        return short if float(short) == value else repr(value)
    return str(value)


def cli_line(words: list[str], options: list[tuple[str, object]]) -> str:
    """``zfdiffusion WORDS OPTIONS`` as one shell line (:func:`shlex.join`: paths with spaces are quoted).
    ``options``: (flag, value) in order; a value of None or False is left out, True gives the bare flag,
    a flag of "" gives the value alone (a positional argument)."""
    args = ["zfdiffusion", *words]
    for flag, value in options:
        if value is None or value is False:
            continue
        if value is True:
            args.append(flag)
        else:
            args += [flag, cli_value(value)] if flag else [cli_value(value)]
    return shlex.join(args)


def cli_model(value: str | None) -> str | None:
    """A dock's model choice as ``--model`` takes it: the name of a bundled, cached or downloadable
    model (what ``zfdiffusion models`` lists), else the folder's absolute path."""
    if value is None:
        return None
    folder = Path(value)
    if not folder.is_dir():
        return str(value)  # a name (a registry model not downloaded yet)
    try:
        if resolve_model(folder.name).resolve() == folder.resolve():
            return folder.name
    except UserInputError:
        pass
    return str(folder.resolve())


def layer_file(layer) -> Path | None:
    """The file napari opened ``layer`` from, if it knows one (None for a layer made in napari, a sample,
    or one saved since: napari keeps the file a layer came from, not where it was saved)."""
    path = getattr(getattr(layer, "source", None), "path", None)
    return Path(path) if path else None


def row(label: str, *widgets) -> Container:
    """Widgets side by side as one labelled row of a dock."""
    r = Container(layout="horizontal", labels=False, label=label, widgets=list(widgets))
    r.margins = (0, 0, 0, 0)
    return r


class JobWidget(Container):
    """A dock widget that runs one job at a time: start, progress, cancel, errors, results.

    Subclasses create the model rows with :meth:`_model_rows` (``model``, ``model_folder``,
    ``device``, ``device_info``), the seed row with :meth:`_seed_row` where they take a seed, the run
    row with :meth:`_run_row` (and ``cancel_button``, and ``cli_button`` in ``cli_row``), lay the dock
    out with :meth:`_lay_out` (which adds ``cli_row``, ``progress_bar`` and ``status``), and define
    ``_set_running(running)``, ``_load_model_info()`` and :meth:`cli_command`.
    """

    GUIDE_SECTION = ""  # the anchor of this dock's section in docs/user-guide.md

    def __init__(self, viewer, **kwargs):
        kwargs.pop("labels", None)  # the sections have the labels (see _layout.lay_out)
        super().__init__(labels=False, **kwargs)
        self._viewer = viewer
        self._job: Job | None = None
        self._models: list[tuple[str, str]] = []
        self.last_progress: Progress | None = None
        self._time = TimeLeft()
        self._shown: tuple[Progress | None, str, float] = (None, "", 0.0)
        self.sections = None
        self.progress_bar = ProgressBar(label="progress", value=0, min=0, max=1000,
                                        tooltip="how much of the running job is done")
        self.status = Label(label="status", value="", tooltip="what the dock is doing, or what it did last")
        self.status.native.setWordWrap(True)
        # the row's width, whatever the text: a long word (a path in a copied command) must not widen the dock
        self.status.native.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
        self.cli_row: Container | None = None
        self.cli_notes: list[str] = []  # what the last command copied leaves to the user (save a layer first, ...)

    def _model_rows(self, choices: list[tuple[str, str]], tooltip: str, folder_tooltip: str) -> None:
        """The model box (``choices``: (label, folder)), "or folder", the device box and the line under
        it that says what the device choice means here. The choices are a callable: napari calls
        reset_choices() on dock widgets whenever layers change."""
        self._models = choices
        self.model = ComboBox(label="model", choices=lambda _: list(self._models), nullable=True, tooltip=tooltip)
        self.model_folder = FileEdit(label="model folder", mode="d", nullable=True, tooltip=folder_tooltip)
        self._device_rows("the model runs")

    def _device_rows(self, what: str) -> None:
        """The device box and the line under it that says what the choice means on this computer
        (``what``: "the model runs", "the training runs", for the tooltip)."""
        self.device = ComboBox(label="device", choices=available_devices(), value="auto",
                               tooltip=f"where {what}: auto takes a GPU (CUDA or Apple MPS) when there "
                                       "is one, else the CPU (slower, but works everywhere)")
        self.device_info = Label(label="", value=device_line("auto"),
                                 tooltip="what the device choice means on this computer")
        self.device.changed.connect(lambda v: setattr(self.device_info, "value", device_line(v)))

    def _sampler_rows(self, steps: int, steps_tooltip: str, few: str) -> None:
        """``sampler`` and ``steps``, as every diffusion dock has them (``few``: how many steps
        dpmsolver++ needs with this dock's models, for the tooltip)."""
        from ..core.diffusion.sampling import DEFAULT_SAMPLER, SAMPLERS

        self.sampler = ComboBox(label="sampler", choices=list(SAMPLERS), value=DEFAULT_SAMPLER,
                                tooltip=f"the denoising method: dpmsolver++ needs few steps ({few}); ddim a few "
                                        "more; ddpm many (hundreds)")
        self.steps = SpinBox(label="steps", value=steps, min=1, max=1000, tooltip=steps_tooltip)

    def _seed_row(self, tooltip: str = "") -> Container:
        """``seed`` and a "New seed" button beside it, as one row."""
        tooltip = tooltip or "seed: the same seed and settings give the same result; change it for another one"
        self.seed = SpinBox(label="seed", value=0, min=0, max=MAX_SEED, tooltip=tooltip)
        self.new_seed_button = PushButton(text="New seed", tooltip="pick a random seed: a different result")
        self.new_seed_button.changed.connect(self.new_seed)
        return row("seed", self.seed, self.new_seed_button)

    def _run_row(self, text: str, action: Callable[[], None], tooltip: str = "") -> tuple[PushButton, Container]:
        """The button that starts this dock's job (``action``), Cancel and the "?" link beside it, as one row."""
        button = PushButton(text=text, tooltip=tooltip or f"{text.lower()} with the settings above (in the "
                                                          "background: the viewer stays usable)")
        button.changed.connect(lambda *_: action())
        self.cancel_button = PushButton(text="Cancel", enabled=False,
                                        tooltip="stop the running job after the step in progress; nothing is added")
        self.cancel_button.changed.connect(lambda *_: self.cancel())
        self.help = help_link(self.GUIDE_SECTION)
        self.cli_button = PushButton(text="Copy CLI command", tooltip=CLI_TIP)
        self.cli_button.changed.connect(lambda *_: self.copy_cli_command())
        self.cli_row = row("", self.cli_button)
        return button, row("", button, self.cancel_button, self.help)

    def _lay_out(self, body: list, advanced: list, footer: list) -> None:
        """Essential controls, a collapsed "Advanced" section, and the footer (then the "Copy CLI command"
        row, the progress bar and the status line), as :func:`._layout.lay_out` arranges them."""
        tail = [self.cli_row] if self.cli_row is not None else []
        self.sections = lay_out(self, body, advanced, [*footer, *tail, self.progress_bar, self.status])

    def reset_choices(self, *_) -> None:
        """Refresh every choice box (napari calls this when layers change): they live in the sections."""
        for part in self.sections.containers() if self.sections is not None else ():
            part.reset_choices()

    def resolution_default(self, resolutions: list[int]) -> int:
        """The resolution a cascade dock starts at: up to 128 px on a CPU (seconds), 512 on a GPU."""
        cap = 512 if is_gpu(self.device.value) else 128
        fitting = [r for r in resolutions if r <= cap]
        return fitting[-1] if fitting else resolutions[0]

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

    # ------------------------------------------------------------ the command line
    def cli_command(self) -> str:
        """The ``zfdiffusion`` command (one shell line) that does what this dock's job would do with the
        settings shown now; what it leaves to the user goes into ``cli_notes``. Each dock defines it."""
        raise NotImplementedError

    def _cli_device(self) -> str | None:
        """``--device``'s value: the device chosen, or None for "auto" (the command's default)."""
        return None if self.device.value in (None, "auto") else str(self.device.value)

    def _cli_input(self, layer, placeholder: str, what: str = "the image") -> str:
        """The file of an image ``layer`` for the command, or ``placeholder`` with a note in ``cli_notes``
        saying why (no layer chosen, or napari knows no file for it) and what to do."""
        path = layer_file(layer) if layer is not None else None
        if layer is None:
            self.cli_notes.append(f"no image layer chosen: put {what} in place of {placeholder}")
        elif path is None:
            self.cli_notes.append(f"layer '{layer.name}' was not opened from a file: save it first (File > Save "
                                  f"Selected Layers) and put that file in place of {placeholder}")
        else:
            same = [other for other in self._viewer.layers if isinstance(other, Image) and layer_file(other) == path]
            if len(same) > 1:  # napari opens a file's channels as layers: the command reads one channel
                self.cli_notes.append(f"if '{path.name}' has several channels, add --channel N (0-based) for the "
                                      f"channel of layer '{layer.name}'")
            return str(path)
        return placeholder

    def copy_cli_command(self, **kwargs) -> str | None:
        """Put :meth:`cli_command` (given ``kwargs``) on the clipboard, in the status line and in a
        notification; the command (None, with an error notification, where it cannot be made)."""
        self.cli_notes = []
        try:
            command = self.cli_command(**kwargs)
        except Exception as e:  # noqa: BLE001 - a dock in a state without a command says why
            show_error(f"no command to copy: {error_message(e)}")
            return None
        clipboard = QApplication.clipboard()
        if clipboard is not None:
            clipboard.setText(command)
        notes = "".join(f"; {n}" for n in self.cli_notes)
        self.status.value = f"copied to the clipboard: {command}{notes}"
        show_info(f"zfdiffusion: copied to the clipboard (paste it in a terminal): {command}{notes}")
        return command

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

    def _start(self, fn, what: str, on_result, costs: list[float] | None = None) -> None:
        """Start ``fn`` (see :func:`start_job`); ``costs``: the relative cost of its stages, for the time left."""
        if self._job is not None:
            show_info("a job is running: wait for it or press Cancel.")
            return
        if self.model.value is None:
            show_error("choose a model first (or a model folder).")
            return
        self.last_progress = None
        self._time = TimeLeft(costs)
        self._shown = (None, "", 0.0)
        self.progress_bar.value = 0
        self.status.value = f"{what}: loading the model"
        self._set_running(True)

        def done(result):
            self.progress_bar.value = self.progress_bar.max
            on_result(result)

        self._job = start_job(fn, what=what, on_progress=self._on_progress, on_result=done,
                              on_error=self._on_error, on_cancel=self._on_cancel, on_finish=self._on_finish,
                              describe=self._describe_step)

    def _stage_words(self, p: Progress) -> str:
        """The stage in plain words (docks with a cascade know its base resolution)."""
        return plain_stage(p.stage)

    def _on_progress(self, p: Progress) -> None:
        self.last_progress = p
        self._time.update(p, self._job.relay.last_sent if self._job is not None else None)
        text = f"{self._stage_words(p)} ({p.step}/{p.total}){self._time.text()}"
        self._shown = (p, text, self._time.fraction)
        self.progress_bar.value = int(min(self._time.fraction, 1.0) * self.progress_bar.max)
        self.status.value = text

    def _describe_step(self, p: Progress) -> tuple[str, float]:
        shown, text, fraction = self._shown
        return (text, fraction) if shown is p else _plain(p)

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
        self.resolution.value = self.resolution_default(cascade.resolutions)
        return cascade

    def _resolutions(self, *_) -> list[int]:
        return [] if self._cascade is None else self._cascade.resolutions

    def _stage_words(self, p: Progress) -> str:
        base = self._cascade.resolutions[0] if self._cascade is not None else 64
        return plain_stage(p.stage, base)

    def _stage_costs(self, resolution: int, steps: int, sr_steps: int, planes: int = 1,
                     first: int | None = None) -> list[float] | None:
        """The relative cost of each stage of a job up to ``resolution`` (from ``first`` px on, for an
        upsampling), for the time left."""
        if self._cascade is None:
            return None
        res = [r for r in self._cascade.resolutions if r <= resolution and (first is None or r >= first)]
        return cascade_costs(res, steps, sr_steps, planes) if first is None else \
            cascade_costs([0, *res], 0, sr_steps)[1:]


__all__ = ["CLI_TIP", "MAX_SEED", "CascadeJobWidget", "ItemRelay", "Job", "JobWidget", "ProgressRelay", "cli_line",
           "cli_model", "cli_value", "error_message", "layer_file", "row", "start_job", "step_callback"]
