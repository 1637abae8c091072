"""Dock widget: train a model from napari (the segmentation U-Net, the patch autoencoder, the latent
diffusion model, a cascade stage) by running the same ``zfdiffusion train ...`` command as the command
line, in a separate process.

The dock gathers the data (image and labels layers, or folders), a preset and a few options, and builds
the command ``python -m napari_zfdiffusion.cli train KIND ...``; it shows it, and runs it with
:class:`subprocess.Popen` in a session of its own, its output going to ``OUT/training/STAGE/console.log``
(a file, not a pipe: a run kept going after napari closes has somewhere to write). A QTimer follows the
run: the console output into the log view and the progress bar, the training log
(:mod:`..core.training.monitor`) into the loss plot (pyqtgraph) and the status line, and the exported
model's card: at each checkpoint a preview is made in a worker thread and put into a layer (labels of a
training image for the U-Net, a reconstruction for the autoencoder, four patches for the latent model,
a 64 px slice for the cascade's base stage).

Layers are written as TIFFs into ``OUT/training/layers/`` before the command starts, so the command is
complete as shown (and can be run again, e.g. with Resume after napari was closed). **Stop** ends the
process (SIGTERM, then SIGKILL after :data:`KILL_AFTER_S`); the last checkpoint stays, and **Resume**
runs the same command with ``--resume`` (with the steps shown now: raise them to train on). Closing the
napari window while a run goes on asks what to do (:func:`ask_close`): stop it, keep it running in the
background, or not close.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
import weakref
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from magicgui.widgets import CheckBox, ComboBox, Container, FileEdit, Label, LineEdit, PushButton, SpinBox
from napari.layers import Image, Labels
from napari.qt.threading import create_worker
from napari.utils.notifications import show_error, show_info
from qtpy.QtCore import QEvent, QObject, QSize, QTimer
from qtpy.QtWidgets import QComboBox, QMainWindow, QMessageBox, QPlainTextEdit

from ..core.errors import UserInputError
from ..core.store import list_models, user_models_dir
from ..core.training import monitor
from ._jobs import CLI_TIP, JobWidget, error_message, row
from ._layers import data_limits, layer_image, shown_image
from ._layout import help_link, is_gpu

if TYPE_CHECKING:
    import napari

KINDS = [("segmentation U-Net (unet)", "unet"), ("EM/nuclei patches: autoencoder (vae)", "vae"),
         ("patches: latent diffusion (ldm, needs an autoencoder)", "ldm"),
         ("zebrafish slices: cascade stage (cascade)", "cascade")]
STAGES = ["base", "sr128", "sr256", "sr512"]
SIZES = ["tiny", "small", "base"]
PRESETS = [("quick (CPU, about an hour)", "quick"), ("full (GPU)", "full"), ("test (seconds)", "test")]
PLOT_HEIGHT = 110  # px: the loss plot
POLL_MS = 500  # how often the run's files are read
KILL_AFTER_S = 10.0  # Stop: SIGKILL when SIGTERM has not ended the process by then
PREVIEW_SIDE = {"unet": 512, "vae": 256}  # previews take a centre crop of at most this side (seconds on a CPU)
PREVIEW_STEPS = 20  # sampling steps of the ldm and cascade previews
LAYERS_FOLDER = "layers"  # OUT/training/layers/{images,masks,stacks}: the layers the run trains on
FORBIDDEN_EXTRA = {"--out", "--resume", "-h", "--help"}


@dataclass(frozen=True)
class Preset:
    """What a preset sets: network size, steps, steps between checkpoints, batch size (0: the command's
    default) and extra arguments (shown in Advanced)."""

    size: str
    steps: int
    checkpoint_every: int
    batch_size: int = 0
    extra: str = ""


# quick: the CLI's small networks for about an hour on a CPU (docs/benchmarks.md, docs/evaluation.md: the
# U-Net ~2000 steps in 20 min, the autoencoder 2500 steps "under an hour" at 128 px crops, the base stage
# 1-2 s a step); full: the GPU networks with the CLI's (or the guide's) step counts; test: tiny networks,
# a handful of steps on small crops, to try the dock (and for its tests).
PRESET_SETTINGS: dict[str, dict[str, Preset]] = {
    "unet": {"quick": Preset("small", 4000, 250), "full": Preset("base", 10000, 500),
             "test": Preset("tiny", 60, 25, 4, "--crop 64")},
    "vae": {"quick": Preset("small", 2500, 250, 0, "--crop 128"), "full": Preset("base", 20000, 1000),
            "test": Preset("tiny", 20, 10, 4, "--patch-size 32")},
    "ldm": {"quick": Preset("small", 4000, 250), "full": Preset("base", 20000, 1000),
            "test": Preset("tiny", 20, 10, 4, "--bank 64")},
    # the command's own presets (core.choices.CASCADE_PRESETS): quick stops each stage after its minutes
    # (the progress bar and time left follow the time limit), full is the GPU's long run
    "cascade": {"quick": Preset("small", 20000, 250, 0, "--preset quick"),
                "full": Preset("base", 40000, 1000, 0, "--preset full"),
                "test": Preset("tiny", 20, 10, 2)},
}
_TQDM = re.compile(r"train[^:|]*:\s*\d+%\|[^|]*\|\s*(\d+)/(\d+)(?:\s*\[[^<\]]*<([^,\]]+))?")


def ask_close(parent, text: str) -> str:
    """Ask what to do with a running training when napari closes: "stop", "keep" or "cancel"."""
    box = QMessageBox(parent)
    box.setIcon(QMessageBox.Icon.Question)
    box.setWindowTitle("A training is running")
    box.setText(text)
    stop = box.addButton("Stop the training", QMessageBox.ButtonRole.DestructiveRole)
    keep = box.addButton("Keep it running in the background", QMessageBox.ButtonRole.AcceptRole)
    cancel = box.addButton("Cancel closing", QMessageBox.ButtonRole.RejectRole)
    box.setDefaultButton(cancel)
    box.exec()
    clicked = box.clickedButton()
    return "stop" if clicked is stop else "keep" if clicked is keep else "cancel"


class _CloseGuard(QObject):
    """Event filter on napari's main window: a close while the dock's run goes on asks first."""

    def __init__(self, dock: TrainWidget, parent: QObject):
        super().__init__(parent)
        self._dock = weakref.ref(dock)

    def eventFilter(self, obj, event) -> bool:
        if event.type() == QEvent.Type.Close:
            dock = self._dock()
            if dock is not None and dock.running and not dock.window_closing():
                event.ignore()
                return True
        return False


@dataclass
class Run:
    """A run the dock started: the command's arguments (after ``zfdiffusion``), where it writes, and
    what its previews are made from."""

    args: list[str]
    kind: str
    stage: str
    out: Path
    steps: int
    preview: dict = field(default_factory=dict)  # {"layer": Image} or {"folder": Path}: what previews show
    notes: list[str] = field(default_factory=list)
    to_write: list = field(default_factory=list)  # (layer, TIFF path): written before the command starts

    @property
    def name(self) -> str:
        return self.out.name

    @property
    def state_dir(self) -> Path:
        return monitor.state_dir(self.out, self.kind, self.stage)

    def command(self) -> list[str]:
        return [sys.executable, "-m", "napari_zfdiffusion.cli", *self.args]


class TrainWidget(JobWidget):
    """Train a model in a separate process (the ``zfdiffusion train`` command) with a live loss plot,
    checkpoint previews as layers, Stop and Resume."""

    GUIDE_SECTION = "train-in-napari"

    def __init__(self, viewer: napari.viewer.Viewer):  # this spelling: napari passes the viewer by it
        super().__init__(viewer, label="Train")
        self._proc: subprocess.Popen | None = None
        self._run: Run | None = None  # the run going on, or the last one
        self._stopping = False
        self._kill_at: float | None = None
        self._log: monitor.LogFollower | None = None
        self._console: monitor.ConsoleFollower | None = None
        self._seen: tuple | None = None  # the model card's signature last previewed
        self._preview_worker = None
        self._preview_again = False
        self._tqdm: tuple[int, int, str | None] | None = None
        self._default_out: Path | None = None

        self.what = ComboBox(label="train", choices=KINDS, value="unet",
                             tooltip="what to train: a segmentation U-Net (images + labels), an autoencoder for "
                                     "patches (the first half of a patch generator), a latent diffusion model on "
                                     "top of an autoencoder, or one stage of the zebrafish slice cascade (stacks)")
        self.image_layer = ComboBox(label="image layer", choices=self._layers(Image), nullable=True, value=None,
                                    tooltip="the images to train on: a 2D image or a (N, Y, X) stack of them; for "
                                            "the cascade one (Z, Y, X) stack per specimen. Written to the output "
                                            "folder as a TIFF when the training starts")
        self.image_folder = FileEdit(label="or image folder", mode="d", nullable=True,
                                     tooltip="or a folder of TIFF/PNG images (for the cascade: of stacks), used when "
                                             "no image layer is chosen")
        self.labels_layer = ComboBox(label="labels layer", choices=self._layers(Labels), nullable=True, value=None,
                                     tooltip="the labels (or masks) of the image layer, the same shape: needed for "
                                             "the U-Net; for the patch models optional (they then learn image + "
                                             "mask pairs)")
        self.mask_folder = FileEdit(label="or masks folder", mode="d", nullable=True,
                                    tooltip="or a folder of label images or masks, one per image in sorted order, "
                                            "used when no labels layer is chosen")
        self.autoencoder = ComboBox(label="autoencoder", choices=self._autoencoders, nullable=True,
                                    tooltip="the autoencoder the latent diffusion model works in: one trained here "
                                            "with 'autoencoder (vae)', or a latent model's")
        self.autoencoder_folder = FileEdit(label="or autoencoder folder", mode="d", nullable=True,
                                           tooltip="or a folder made by `zfdiffusion train vae`, used when no "
                                                   "autoencoder is chosen above")
        self.stage = ComboBox(label="stage", choices=STAGES, value="base",
                              tooltip="the cascade stage to train: base makes 64 px slices from the depth; sr128, "
                                      "sr256 and sr512 upscale; they train one at a time into the same folder")
        self.preset = ComboBox(label="preset", choices=PRESETS, value="full" if is_gpu("auto") else "quick",
                               tooltip="sets network size, steps, checkpoints and batch size: quick trains the small "
                                       "network for about an hour on a CPU; full the large one for hours on a GPU; "
                                       "test a tiny one in seconds, to try the dock (the model is of no use)")
        self.steps = SpinBox(label="steps", value=1, min=1, max=10_000_000, step=100,
                             tooltip="training steps in all (from the preset); raise them and press Resume to "
                                     "train a finished model on")
        self.out = FileEdit(label="output folder", mode="d",
                            tooltip="the model folder to create (in your user models, so the other docks list it); "
                                    "it also holds the training state, the log and the layers trained on")
        self._device_rows("the training runs")
        self.size = ComboBox(label="network size", choices=SIZES, value="small",
                             tooltip="tiny (tests, useless models), small (a CPU trains it), base (wider, for a GPU)")
        self.checkpoint_every = SpinBox(label="checkpoint every", value=250, min=1, max=1_000_000, step=50,
                                        tooltip="steps between checkpoints: the model is saved, a preview made, and "
                                                "Resume goes on from the last one")
        self.batch_size = SpinBox(label="batch size", value=0, min=0, max=4096,
                                  tooltip="training crops per step; 0: the command's default (8 or 16); larger "
                                          "needs more memory")
        self.lr = LineEdit(label="learning rate", value="",
                           tooltip="the optimiser's learning rate, e.g. 3e-4; empty: the command's default")
        self.extra = LineEdit(label="extra arguments", value="",
                              tooltip="more options of the command, as on the command line (e.g. --crop 96 "
                                      "--credit 'my lab'; see `zfdiffusion train unet --help`); presets fill some")
        self.start_button = PushButton(text="Start", tooltip="write the layers, then run the training command in "
                                                             "a separate process (napari stays usable)")
        self.stop_button = PushButton(text="Stop", enabled=False,
                                      tooltip="end the training process; the last checkpoint stays and Resume goes "
                                              "on from it")
        self.resume_button = PushButton(text="Resume", enabled=False,
                                        tooltip="go on from the output folder's last checkpoint: the same command "
                                                "with --resume (and the steps shown now)")
        self.start_button.changed.connect(lambda *_: self.start())
        self.stop_button.changed.connect(lambda *_: self.stop())
        self.resume_button.changed.connect(lambda *_: self.start(resume=True))
        self.help = help_link(self.GUIDE_SECTION)
        self.command_line = LineEdit(label="command", value="",
                                     tooltip="the command the dock runs (or would run now): select and copy it to "
                                             "run it in a terminal, e.g. under torchrun for several GPUs")
        self.command_line.native.setReadOnly(True)
        self.command_line.native.setPlaceholderText("(choose the data: the command appears here)")
        self.cli_button = PushButton(text="Copy", tooltip=CLI_TIP)
        self.cli_button.changed.connect(lambda *_: self.copy_cli_command())
        self.show_log = CheckBox(text="output", value=False,
                                 tooltip="show what the command prints (its messages and errors) below the plot")
        self._plot_box, self.plot, self._curves = _loss_plot()
        self.log_view = QPlainTextEdit()
        self.log_view.setReadOnly(True)
        self.log_view.setMaximumBlockCount(2000)
        self.log_view.setFixedHeight(120)
        self.log_view.setToolTip("the command's output (also in OUT/training/STAGE/console.log)")
        self._log_box = Container(labels=False)
        self._log_box.native.layout().addWidget(self.log_view)
        self._log_box.visible = False
        self.show_log.changed.connect(lambda v: setattr(self._log_box, "visible", bool(v)))

        buttons = row("", self.start_button, self.stop_button, self.resume_button, self.show_log, self.help)
        self._lay_out([self.what, self.image_layer, self.image_folder, self.labels_layer, self.mask_folder,
                       self.autoencoder, self.autoencoder_folder, self.stage,
                       row("preset, steps", self.preset, self.steps), self.out, self.device, self.device_info],
                      [self.size, self.checkpoint_every, self.batch_size, self.lr, self.extra],
                      [buttons, row("command", self.command_line, self.cli_button), self._plot_box, self._log_box])
        # long choices: elided in the box (the dock stays narrow), whole in its drop-down list
        for box, chars in ((self.what, 16), (self.autoencoder, 16), (self.preset, 8)):
            box.native.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
            box.native.setMinimumContentsLength(chars)
        self.steps.native.setMaximumWidth(110)
        # the footer holds the plot too: the scrolled controls ask for that much less, so the dock still fits
        self.sections.scroll.max_height -= PLOT_HEIGHT + 10
        self.sections.scroll.updateGeometry()

        self._timer = QTimer(self.native)
        self._timer.setInterval(POLL_MS)
        self._timer.timeout.connect(self.poll)
        for w in (self.what, self.stage, self.out, self.image_layer, self.image_folder, self.labels_layer,
                  self.mask_folder, self.autoencoder, self.autoencoder_folder, self.steps, self.size,
                  self.checkpoint_every, self.batch_size, self.lr, self.extra, self.device):
            w.changed.connect(self._refresh)
        self.what.changed.connect(self._on_kind)
        self.preset.changed.connect(self._apply_preset)
        self._guard = _CloseGuard(self, self.native)
        self._guarded: list[weakref.ref] = []  # the windows whose closing asks (weakly: no leaked window)
        self._on_kind()

    # ------------------------------------------------------------ choices and defaults
    def _layers(self, cls):
        return lambda *_: [(layer.name, layer) for layer in self._viewer.layers if type(layer) is cls]

    def _autoencoders(self, *_) -> list[tuple[str, str]]:
        return [(f"{m.name} ({m.source})", str(m.path)) for m in list_models()
                if m.kind in ("vae", "latent") and m.path is not None]

    @property
    def kind(self) -> str:
        return self.what.value

    def _on_kind(self, *_) -> None:
        """Show the controls of this kind, take its preset, and a fresh default output folder."""
        kind = self.kind
        self.labels_layer.visible = self.mask_folder.visible = kind != "cascade"
        self.autoencoder.visible = self.autoencoder_folder.visible = kind == "ldm"
        self.stage.visible = kind == "cascade"
        self.image_layer.label = "stack layer" if kind == "cascade" else "image layer"
        self.image_folder.label = "or stacks folder" if kind == "cascade" else "or image folder"
        if kind == "ldm":
            self.autoencoder.reset_choices()
        if self._default_out is None or Path(self.out.value) == self._default_out:
            self._default_out = default_out(kind)
            self.out.value = self._default_out
        self._apply_preset()

    def _apply_preset(self, *_) -> None:
        p = PRESET_SETTINGS[self.kind][self.preset.value]
        self.size.value, self.steps.value, self.checkpoint_every.value = p.size, p.steps, p.checkpoint_every
        self.batch_size.value, self.extra.value = p.batch_size, p.extra
        if self.preset.value == "full" and not is_gpu(self.device.value):
            self.status.value = "note: 'full' is meant for a GPU; on this device it takes days"
        self._refresh()

    def reset_choices(self, *_) -> None:
        super().reset_choices()
        self._refresh()

    def _refresh(self, *_) -> None:
        """The command shown (while idle: the one Start would run) and the buttons."""
        running = self.running
        self.start_button.enabled = not running
        self.stop_button.enabled = running and not self._stopping
        self.resume_button.enabled = not running and self._can_resume()
        if running:
            return
        try:
            run = self.plan()
        except Exception:  # noqa: BLE001 - incomplete settings: no command yet (Start says why)
            self.command_line.value = ""
        else:
            self.command_line.value = shlex.join(run.command())

    def _can_resume(self) -> bool:
        try:
            return monitor.has_state(Path(self.out.value), self.kind, self.stage.value)
        except (OSError, TypeError, ValueError):
            return False

    def _set_running(self, running: bool) -> None:
        self._refresh()

    @property
    def running(self) -> bool:
        return self._proc is not None

    # ------------------------------------------------------------ the command
    def plan(self, resume: bool = False) -> Run:
        """The run the settings shown ask for (nothing is written): its arguments, and the layers to write
        before it starts (``run.to_write``); a UserInputError says what is missing."""
        kind, stage = self.kind, self.stage.value
        out = Path(self.out.value).expanduser()
        if str(self.out.value) in ("", "."):
            raise UserInputError("choose an output folder for the model.")
        out = out.resolve()
        data = out / "training" / LAYERS_FOLDER
        args = ["train", kind]
        notes: list[str] = []
        preview: dict = {}
        to_write: list[tuple[object, Path]] = []
        image, folder = self.image_layer.value, _folder(self.image_folder.value)
        labels, masks = self.labels_layer.value, _folder(self.mask_folder.value)
        if image is not None:
            path = data / ("stacks" if kind == "cascade" else "images") / f"{_safe(image.name)}.tif"
            to_write.append((image, path))
            images = str(path)
            preview = {"layer": image}
        elif folder is not None:
            images = str(folder)
            preview = {"folder": folder}
        elif resume and (data / ("stacks" if kind == "cascade" else "images")).is_dir():
            images = str(data / ("stacks" if kind == "cascade" else "images"))  # the layers of the last run
            preview = {"folder": Path(images)}
        else:
            what = "a stack layer or a folder of stacks" if kind == "cascade" else "an image layer or an image folder"
            raise UserInputError(f"no training data: choose {what}.")
        mask_arg = None
        if kind != "cascade":
            if labels is not None:
                if image is not None and tuple(labels.data.shape) != tuple(layer_image(image, "training").shape):
                    raise UserInputError(f"labels layer '{labels.name}' has shape {tuple(labels.data.shape)} but "
                                         f"image layer '{image.name}' has {tuple(image.data.shape)}: choose the "
                                         "labels of that image.")
                path = data / "masks" / f"{_safe(image.name if image is not None else labels.name)}.tif"
                to_write.append((labels, path))
                mask_arg = str(path)
            elif masks is not None:
                mask_arg = str(masks)
            elif resume and image is None and folder is None and (data / "masks").is_dir():
                mask_arg = str(data / "masks")
            elif kind == "unet":
                raise UserInputError("the U-Net learns from labels: choose a labels layer (or a masks folder) "
                                     "for the images.")
        if kind == "cascade":
            if image is not None and layer_image(image, "training the cascade").ndim != 3:
                raise UserInputError(f"'{image.name}' is a 2D image: the cascade trains on (Z, Y, X) stacks, one "
                                     "per specimen. Choose a stack layer or a folder of stacks.")
            args += ["--data", images, "--stage", stage]
        else:
            args += ["--images", images]
            if mask_arg is not None:
                args += ["--masks", mask_arg]
        if kind == "ldm":
            vae = _folder(self.autoencoder_folder.value) or self.autoencoder.value
            if vae is None:
                raise UserInputError("the latent diffusion model needs an autoencoder: choose one, or train one "
                                     "first with 'autoencoder (vae)'.")
            args += ["--vae", str(vae)]
        args += ["--out", str(out), "--size", self.size.value, "--steps", str(self.steps.value),
                 "--checkpoint-every", str(self.checkpoint_every.value)]
        if self.batch_size.value:
            args += ["--batch-size", str(self.batch_size.value)]
        lr = str(self.lr.value).strip()
        if lr:
            try:
                if not float(lr) > 0:
                    raise ValueError
            except ValueError:
                raise UserInputError(f"the learning rate must be a positive number (e.g. 3e-4), got '{lr}'.") \
                    from None
            args += ["--lr", lr]
        if self.device.value not in (None, "auto"):
            args += ["--device", str(self.device.value)]
        try:
            extra = shlex.split(str(self.extra.value))
        except ValueError as e:
            raise UserInputError(f"the extra arguments cannot be read ({e}): check their quotes.") from None
        bad = sorted({a.split("=")[0] for a in extra} & FORBIDDEN_EXTRA)
        if bad:
            raise UserInputError(f"{', '.join(bad)} cannot be among the extra arguments: the dock sets the output "
                                 "folder, and Resume adds --resume.")
        args += extra
        if resume:
            args.append("--resume")
        if to_write:
            notes.append(f"the layers are written to {data} when you press Start")
        return Run(args, kind, stage if kind == "cascade" else "", out, int(self.steps.value), preview, notes,
                   to_write)

    def cli_command(self) -> str:
        run = self.plan()
        self.cli_notes.extend(run.notes)
        return shlex.join(["zfdiffusion", *run.args])

    def _check_out(self, run: Run, resume: bool) -> None:
        """Refuse an output folder that another model or run holds, or an empty Resume."""
        out, kind = run.out, run.kind
        held = monitor.holder(run.state_dir)
        if held:
            raise UserInputError(f"a training run is writing to '{out}' now ({held}): wait for it, stop it, or "
                                 "choose another output folder.")
        if resume:
            if not monitor.has_state(out, kind, run.stage or "base"):
                raise UserInputError(f"'{out}' holds no training state of this model to resume: press Start.")
            return
        if monitor.has_state(out, kind, run.stage or "base"):
            raise UserInputError(f"'{out}' already holds this training run: press Resume to go on with it "
                                 "(raise the steps to train on), or choose another output folder.")
        found = monitor.folder_kind(out)
        if found is not None and not (kind == "cascade" and found == "cascade"):
            raise UserInputError(f"'{out}' already holds another model ({found}): choose a new output folder "
                                 "(the dock creates it).")
        if out.is_file():
            raise UserInputError(f"'{out}' is a file: choose a folder for the model.")
        if out.is_dir() and found is None and any(p.name != "training" for p in out.iterdir()):
            raise UserInputError(f"'{out}' is not empty: choose a new output folder (the dock creates it).")

    # ------------------------------------------------------------ start, stop, resume
    def start(self, resume: bool = False) -> bool:
        """Write the layers and start the command (with ``--resume``: after the last run's arguments, with
        the steps shown now); False, with a notification saying why, when nothing was started."""
        if self.running:
            show_info("a training is running: wait for it or press Stop.")
            return False
        try:
            run = self._resume_run() if resume else None
            run = run or self.plan(resume)
            self._check_out(run, resume)
            for layer, path in run.to_write:
                self.status.value = f"writing layer '{layer.name}' to {path} (TIFF) for the training command"
                _write_layer(layer, path)
        except Exception as e:  # noqa: BLE001 - bad input or a full disk: a message, nothing started
            self.status.value = f"not started: {error_message(e)}"
            show_error(error_message(e))
            return False
        self._launch(run, resume)
        return True

    def _resume_run(self) -> Run | None:
        """The last run's arguments with --resume and the steps shown now, if it wrote to the folder shown."""
        last = self._run
        if last is None or last.out != Path(self.out.value).expanduser().resolve() or last.kind != self.kind \
                or (last.kind == "cascade" and last.stage != self.stage.value):
            return None
        args = [a for a in last.args if a != "--resume"]
        i = args.index("--steps")
        args[i + 1] = str(self.steps.value)
        return replace(last, args=[*args, "--resume"], steps=int(self.steps.value), to_write=[])

    def _guard_window(self) -> None:
        """Watch the closing of the main window this dock is in (napari has no public hook for it: the
        window is found by walking up from the dock, docked or floating)."""
        w = self.native.parentWidget()
        while w is not None and not isinstance(w, QMainWindow):
            w = w.parentWidget()
        if w is not None and not any(g() is w for g in self._guarded):
            w.installEventFilter(self._guard)
            self._guarded.append(weakref.ref(w))

    def _launch(self, run: Run, resume: bool) -> None:
        self._guard_window()
        sd = run.state_dir
        sd.mkdir(parents=True, exist_ok=True)
        console = sd / monitor.CONSOLE_FILE
        before = console.stat().st_size if resume and console.is_file() else 0  # a resumed run appends
        env = dict(os.environ, PYTHONUNBUFFERED="1", TQDM_MININTERVAL="1")
        with open(console, "ab" if resume else "wb") as f:
            f.write(f"$ {shlex.join(run.command())}\n".encode())
            f.flush()
            kw = {"start_new_session": True} if os.name != "nt" else \
                {"creationflags": getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0)}
            try:
                self._proc = subprocess.Popen(run.command(), stdout=f, stderr=subprocess.STDOUT,
                                              stdin=subprocess.DEVNULL, env=env, **kw)
            except OSError as e:
                self.status.value = f"not started: {e}"
                show_error(f"the training command could not be started: {e}")
                return
        self._run, self._stopping, self._kill_at, self._tqdm = run, False, None, None
        self._log = monitor.LogFollower(sd / monitor.LOG_FILE)
        self._console = monitor.ConsoleFollower(console, offset=before)
        self._seen = monitor.file_signature(monitor.model_marker(run.out, run.kind, run.stage or "base"))
        if not resume:
            self.log_view.clear()
        self._plot([], [], [])
        self.progress_bar.value = 0
        self.command_line.value = shlex.join(run.command())
        written = f"; the layers were written to {run.out / 'training' / LAYERS_FOLDER}" if run.to_write else ""
        self.status.value = f"{'resuming' if resume else 'starting'} the training of '{run.name}'{written}"
        self._timer.start()
        self._refresh()

    def stop(self, wait: bool = False) -> None:
        """End the training process (SIGTERM; SIGKILL after :data:`KILL_AFTER_S`). ``wait``: until it has
        ended (when napari closes)."""
        if self._proc is None:
            return
        self._stopping = True
        self._kill_at = time.monotonic() + KILL_AFTER_S
        _signal(self._proc, signal.SIGTERM)
        self.status.value = "stopping the training (the last checkpoint stays)"
        self._refresh()
        if wait:
            try:
                self._proc.wait(KILL_AFTER_S)
            except subprocess.TimeoutExpired:
                _signal(self._proc, getattr(signal, "SIGKILL", signal.SIGTERM))
                self._proc.wait(5)
            self.poll()

    def detach(self) -> None:
        """Let the running process go on without the dock (its output still goes to its console.log)."""
        if self._proc is None:
            return
        pid, run = self._proc.pid, self._run
        self._proc = None
        self._timer.stop()
        self.status.value = (f"the training of '{run.name}' goes on in the background (process {pid}); its output: "
                             f"{run.state_dir / monitor.CONSOLE_FILE}")
        self._refresh()

    def window_closing(self) -> bool:
        """napari's window is closing while a run goes on: ask; True to let it close."""
        run = self._run
        answer = ask_close(self.native.window(), f"The training of '{run.name}' is still running. Stop it (the "
                                                 "last checkpoint stays, Resume goes on from it), keep it running "
                                                 "in the background, or cancel closing?")
        if answer == "stop":
            self.stop(wait=True)
            return True
        if answer == "keep":
            self.detach()
            return True
        return False

    # ------------------------------------------------------------ following the run
    def poll(self) -> None:
        """Read what the run wrote since the last call (the timer calls this), and notice its end."""
        run, proc = self._run, self._proc
        if run is None:
            return
        code = proc.poll() if proc is not None else None
        if self._console is not None:
            lines = self._console.poll()
            if lines:
                self.log_view.appendPlainText("\n".join(lines))
            for text in [*lines[-3:], self._console.current]:
                m = _TQDM.search(text)
                if m:
                    self._tqdm = (int(m.group(1)), int(m.group(2)), m.group(3))
        if self._log is not None and self._log.poll():
            log = self._log.log
            self._plot(log.steps, log.loss, log.loss_smooth)
        self._show_progress()
        self._check_checkpoint()
        if proc is not None and code is None and self._kill_at is not None and time.monotonic() > self._kill_at:
            _signal(proc, getattr(signal, "SIGKILL", signal.SIGTERM))
            self._kill_at = None
        if proc is not None and code is not None:
            self._finished(code)

    def _show_progress(self) -> None:
        run, log = self._run, self._log.log if self._log is not None else None
        step = max(log.last_step if log is not None else 0, self._tqdm[0] if self._tqdm else 0)
        total = run.steps
        left = f", {self._tqdm[2].strip()} left" if self._tqdm and self._tqdm[2] and self._tqdm[0] < total else ""
        self.progress_bar.value = int(min(step / max(total, 1), 1.0) * self.progress_bar.max)
        if self._proc is None or self._stopping:
            return
        loss = f", loss {log.loss_smooth[-1]:.4g} (smoothed)" if log is not None and log.loss_smooth else ""
        val = monitor.describe_validation(log.last_validation) if log is not None else ""
        self.status.value = (f"training '{run.name}': step {step} of {total}{loss}{left}"
                             + (f"; held-out: {val}" if val else ""))

    def _finished(self, code: int) -> None:
        run, stopped = self._run, self._stopping
        self._proc = None
        self._timer.stop()
        self._stopping, self._kill_at = False, None
        step = self._log.log.last_step if self._log is not None else 0
        if stopped:
            step = max(step, self._tqdm[0] if self._tqdm else 0)
            self.status.value = f"stopped at step {step}: Resume goes on from the last checkpoint"
        elif code == 0:
            self.progress_bar.value = self.progress_bar.max
            self.status.value = f"done: {step} steps; the model is in {run.out}"
            show_info(f"zfdiffusion: training of '{run.name}' done ({step} steps); the model is in {run.out}")
        else:
            tail = [line for line in self.log_view.toPlainText().splitlines() if line.strip()][-6:]
            self.status.value = f"failed (exit code {code}): see the command's output"
            show_error(f"the training of '{run.name}' stopped with an error (exit code {code}):\n" + "\n".join(tail))
        self._check_checkpoint()
        self._refresh()

    # ------------------------------------------------------------ plot
    def _plot(self, steps, loss, smooth) -> None:
        if self._curves:
            self._curves[0].setData(np.asarray(steps, float), np.asarray(loss, float))
            self._curves[1].setData(np.asarray(steps, float), np.asarray(smooth, float))

    def plot_data(self) -> tuple[list[float], list[float], list[float]]:
        """(steps, loss, smoothed loss) drawn now."""
        if not self._curves:
            return [], [], []
        x, y = self._curves[0].getData()
        _, s = self._curves[1].getData()
        as_list = (lambda a: [] if a is None else [float(v) for v in a])
        return as_list(x), as_list(y), as_list(s)

    # ------------------------------------------------------------ previews
    def _check_checkpoint(self) -> None:
        run = self._run
        if run is None:
            return
        sig = monitor.file_signature(monitor.model_marker(run.out, run.kind, run.stage or "base"))
        if sig is None or sig == self._seen:
            return
        if self._preview_worker is not None:
            self._preview_again = True
            return
        self._seen = sig
        if run.kind == "cascade" and run.stage != "base":
            self.log_view.appendPlainText(f"(no preview for stage {run.stage}: previews show the base stage only)")
            return
        source, folder = None, run.preview.get("folder")
        layer = run.preview.get("layer")
        if layer is not None and run.kind in ("unet", "vae"):
            try:  # the plane shown now (of a stack), where the preview is put
                if layer not in self._viewer.layers:
                    raise LookupError(layer.name)
                plane, index = shown_image(self._viewer, layer, "the preview")
                scale, translate = [float(v) for v in layer.scale], [float(v) for v in layer.translate]
                z = None if index is None else (index, scale[-3], translate[-3])
                source = (plane, scale[-2:], translate[-2:], z)
            except Exception:  # noqa: BLE001 - a layer since removed (or changed): the TIFF written of it
                folder = run.out / "training" / LAYERS_FOLDER / "images"
        worker = create_worker(make_preview, run.kind, run.out, source, folder, _start_thread=False,
                               _ignore_errors=True)
        worker.returned.connect(lambda result, run=run: self._show_preview(run, result))
        worker.errored.connect(lambda e: self.log_view.appendPlainText(f"(preview failed: {error_message(e)})"))
        worker.finished.connect(self._preview_done)
        self._preview_worker = worker
        worker.start()

    def _preview_done(self) -> None:
        self._preview_worker = None
        if self._preview_again:
            self._preview_again = False
            self._check_checkpoint()

    def _show_preview(self, run: Run, result: dict) -> None:
        for suffix, (kind, data, geometry) in result.items():
            name = f"{run.name} preview {suffix}"
            layer = self._viewer.layers[name] if name in self._viewer.layers else None
            same = layer is not None and type(layer) is (Labels if kind == "labels" else Image)
            if same and layer.ndim == data.ndim:
                layer.data = data
                if geometry:
                    layer.scale, layer.translate = geometry["scale"], geometry["translate"]
                if kind == "image":
                    layer.contrast_limits = data_limits(data)
                continue
            if layer is not None:
                self._viewer.layers.remove(layer)
            if kind == "labels":
                self._viewer.add_labels(data, name=name, **geometry)
            else:
                self._viewer.add_image(data, name=name, colormap="gray", contrast_limits=data_limits(data),
                                       **geometry)
        self.log_view.appendPlainText(f"(checkpoint preview: {', '.join(f'{run.name} preview {s}' for s in result)})")

    def wait(self, timeout: float = 120.0) -> bool:
        """Process Qt events until the run has ended and its last preview is in (for tests)."""
        from qtpy.QtCore import QCoreApplication, QEventLoop

        deadline = time.monotonic() + timeout
        while (self.running or self._preview_worker is not None) and time.monotonic() < deadline:
            QCoreApplication.processEvents(QEventLoop.ProcessEventsFlag.AllEvents, 50)
            time.sleep(0.02)
        return not self.running and self._preview_worker is None


# ---------------------------------------------------------------- helpers (no widget state)
def default_out(kind: str) -> Path:
    """``<user models>/my-KIND``, or ``my-KIND-2``, ... : the first that does not exist."""
    root = user_models_dir()
    name = f"my-{kind}"
    k = 1
    while (root / name).exists():
        k += 1
        name = f"my-{kind}-{k}"
    return root / name


def _folder(value) -> Path | None:
    if value is None or str(value) in ("", "."):
        return None
    return Path(value).expanduser().resolve()


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "layer"


def _write_layer(layer, path: Path) -> None:
    """An image or labels layer as a TIFF for the command (its pixel size where this plugin knows it)."""
    from ..core.io import write_tiff
    from ._layers import PROVENANCE_KEY

    data = layer.data[0] if getattr(layer, "multiscale", False) else layer.data
    if isinstance(layer, Image):
        data = layer_image(layer, "training")
    prov = layer.metadata.get(PROVENANCE_KEY) if isinstance(layer.metadata, dict) else None
    px = prov.get("pixel_size_um") if isinstance(prov, dict) else None
    path.parent.mkdir(parents=True, exist_ok=True)
    write_tiff(path, np.asarray(data), {"pixel_size_um": px, "source": f"napari layer '{layer.name}'"} if px
               else None)


def _signal(proc: subprocess.Popen, sig) -> None:
    """``sig`` to the process and what it started (its session's group), where that can be done."""
    try:
        if os.name != "nt":
            os.killpg(proc.pid, sig)
        elif sig == signal.SIGTERM:
            proc.terminate()
        else:
            proc.kill()
    except (ProcessLookupError, PermissionError, OSError):
        pass


def _crop(image: np.ndarray, side: int) -> tuple[np.ndarray, tuple[int, int]]:
    """The centre crop of at most ``side`` x ``side`` of a 2D image, and its offset."""
    h, w = image.shape[:2]
    y0, x0 = max(0, (h - side) // 2), max(0, (w - side) // 2)
    return np.asarray(image[y0:y0 + side, x0:x0 + side]), (y0, x0)


def _first_image(folder: Path) -> np.ndarray:
    from ..core.io import list_images
    from ..core.reader import open_image

    files = list_images(folder)
    if not files:
        raise UserInputError(f"no images in '{folder}'")
    return np.asarray(open_image(files[0]).planes()[0])


def make_preview(kind: str, out: Path, source, folder: Path | None) -> dict:
    """A preview of the model exported in ``out`` (runs in a worker thread, on the CPU): {name suffix: (layer
    kind, data, layer geometry)}. ``source``: (2D image, its y/x scale and translate, and for a plane of a stack
    (index, z scale, z translate): the preview is then that one plane of the stack) of the layer trained on,
    else the first image of ``folder`` (then also shown, as "image"); the U-Net and the autoencoder preview a
    centre crop of it, where it lies in the image."""
    result: dict = {}
    if kind in ("unet", "vae"):
        if source is None:
            plane, scale, translate, z = _first_image(folder), (1.0, 1.0), (0.0, 0.0), None
        else:
            plane, scale, translate, z = source
        crop, (y0, x0) = _crop(np.asarray(plane), PREVIEW_SIDE[kind])
        geometry = {"scale": tuple(scale), "translate": (translate[0] + y0 * scale[0], translate[1] + x0 * scale[1])}
        if z is not None:
            index, sz, tz = z
            geometry = {"scale": (sz, *geometry["scale"]), "translate": (tz + index * sz, *geometry["translate"])}
        lift = (lambda a: a[None]) if z is not None else (lambda a: a)
        if source is None:
            result["image"] = ("image", lift(crop.astype(np.float32)), geometry)
        if kind == "unet":
            from ..core.segment import Segmenter

            seg = Segmenter.load(out, "cpu")
            c = seg.card
            labels = seg.segment(crop, tile=int(c.get("tile", 256)), overlap=int(c.get("overlap", 32)),
                                 threshold=float(c.get("threshold", 0.5)), min_size=int(c.get("min_size", 16)),
                                 probability=False).labels
            result["labels"] = ("labels", lift(labels), geometry)
        else:
            from ..core.latent import Autoencoder

            rec, _ = Autoencoder.load(out, "cpu").roundtrip(crop)
            result["(autoencoded)"] = ("image", lift(rec.astype(np.float32)), geometry)
    elif kind == "ldm":
        from ..core.latent import LatentModel

        patches = LatentModel.load(out, "cpu").generate(4, seed=0, steps=PREVIEW_STEPS).images
        result["patches"] = ("image", patches, {})
    elif kind == "cascade":
        from ..core.cascade import Cascade

        cas = Cascade.load(out, "cpu")
        depth = cas.n_classes // 2
        images = cas.generate(depth, resolution=cas.resolutions[0], n=1, seed=0, steps=PREVIEW_STEPS).images
        result["slice"] = ("image", images[0], {})
    return result


def _loss_plot():
    """A Container holding a pyqtgraph plot of the loss against the step, and its two curves (loss,
    smoothed loss); without pyqtgraph, a line saying how to get it."""
    box = Container(labels=False)
    box.margins = (0, 0, 0, 0)
    try:
        import pyqtgraph as pg
    except ImportError:  # pyqtgraph is a dependency; an install without it still trains
        note = Label(value="(no loss plot: pip install pyqtgraph)", tooltip="the loss plot needs pyqtgraph")
        box.append(note)
        return box, None, []

    class Plot(pg.PlotWidget):
        def sizeHint(self):  # pyqtgraph asks for 640 px: the dock's width decides
            return QSize(240, PLOT_HEIGHT)

    plot = Plot()
    plot.setFixedHeight(PLOT_HEIGHT)
    plot.setToolTip("the training loss against the step: grey the mean over each 50 steps, orange smoothed; "
                    "read from the run's log.jsonl as it grows")
    plot.setLabel("bottom", "step")
    plot.setLabel("left", "loss")
    plot.showGrid(x=True, y=True, alpha=0.2)
    plot.setMouseEnabled(x=False, y=False)
    plot.hideButtons()
    legend = plot.addLegend(offset=(-5, 5), labelTextSize="7pt")
    curves = [plot.plot([], [], pen=pg.mkPen((160, 160, 160), width=1), name="loss"),
              plot.plot([], [], pen=pg.mkPen((255, 150, 40), width=2), name="smoothed")]
    legend.setBrush(pg.mkBrush(0, 0, 0, 120))
    box.native.layout().addWidget(plot)
    return box, plot, curves


__all__ = ["KINDS", "PRESETS", "PRESET_SETTINGS", "Preset", "Run", "TrainWidget", "ask_close", "default_out",
           "make_preview"]
