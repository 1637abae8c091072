"""The Train dock in a real napari viewer: it runs the `zfdiffusion train` command in a separate process
(a tiny U-Net, seconds on one CPU thread), plots the loss from the run's log, adds a preview layer at each
checkpoint, stops and resumes, asks before napari closes over a running training, and refuses bad input
with a notification (nothing started).

Runs under Xvfb (pytest-xvfb) with the normal xcb platform, like the other widget tests. The training
process inherits OMP_NUM_THREADS (run the tests with OMP_NUM_THREADS=1 on a shared machine).
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
from conftest import errors, make_blobs

pytest.importorskip("napari")
pytest.importorskip("qtpy")

pytestmark = pytest.mark.gui

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "user-guide.md"


def _blobs(tmp_path, shape=(96, 128)):
    imgs, masks = make_blobs(tmp_path / "blobs", n=1, shape=shape)
    return tifffile.imread(next(imgs.glob("*.tif"))), tifffile.imread(next(masks.glob("*.tif"))).astype(np.int32)


@pytest.fixture
def dock(make_napari_viewer, tmp_path):
    """A viewer with the Train dock, an image layer and its labels layer chosen, the `test` preset, the CPU.
    At the end, any process a test left running is ended (before the viewer closes and would ask)."""
    from napari_zfdiffusion.widgets.train import TrainWidget

    viewer = make_napari_viewer(show=True)
    w = TrainWidget(viewer)
    viewer.window.add_dock_widget(w, name="Train")
    image, labels = _blobs(tmp_path)
    w.image_layer.value = viewer.add_image(image, name="blobs")
    w.labels_layer.value = viewer.add_labels(labels, name="blobs labels")
    w.preset.value = "test"
    w.device.value = "cpu"
    leftover: list[int] = []
    w._leftover = leftover
    yield viewer, w
    if w.running:
        w.stop(wait=True)
    w.wait(30)
    for pid in leftover:
        try:
            os.killpg(pid, signal.SIGKILL)
        except OSError:
            pass


def _logged(out: Path) -> list[dict]:
    path = out / "training" / "unet" / "log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _wait_until(qtbot, condition, timeout: float = 90.0) -> None:
    qtbot.waitUntil(condition, timeout=int(timeout * 1000))


def test_the_dock_fits_a_1366x768_screen_and_explains_itself(make_napari_viewer, qtbot, notes):
    from napari_zfdiffusion.widgets._layout import controls
    from napari_zfdiffusion.widgets.train import TrainWidget

    viewer = make_napari_viewer(show=True)
    viewer.window._qt_window.resize(1366, 740)
    w = TrainWidget(viewer)
    dock = viewer.window.add_dock_widget(w, name="Train")
    qtbot.wait(200)
    assert not w.sections.collapsible.isExpanded()
    hint = dock.sizeHint()
    assert hint.height() <= 600 and hint.width() <= 460, hint
    w.sections.collapsible.expand(animate=False)
    qtbot.wait(200)
    assert dock.sizeHint().height() <= 700
    for part in w.sections.containers():
        for c in controls(part):
            assert c.tooltip and len(c.tooltip) > 10, (c.label, c.name, type(c).__name__)
    essential = {id(c) for c in controls(w.sections.body)}
    advanced = {id(c) for c in controls(w.sections.advanced)}
    footer = {id(c) for c in controls(w.sections.footer)}
    assert {id(w.what), id(w.image_layer), id(w.labels_layer), id(w.preset), id(w.steps), id(w.out),
            id(w.device)} <= essential
    assert {id(w.size), id(w.checkpoint_every), id(w.batch_size), id(w.lr), id(w.extra)} <= advanced
    assert {id(w.start_button), id(w.stop_button), id(w.resume_button), id(w.help), id(w.command_line),
            id(w.progress_bar), id(w.status)} <= footer
    headings = [re.sub(r"[^a-z0-9 -]", "", h.lower()).replace(" ", "-")
                for h in re.findall(r"^## (.+)$", GUIDE.read_text(encoding="utf-8"), re.MULTILINE)]
    assert w.help.url.rsplit("#", 1)[1] in headings
    # the controls follow the kind: labels for the U-Net, the autoencoder for ldm, the stage for the cascade
    shown = lambda c: not c.native.isHidden()  # noqa: E731
    assert shown(w.labels_layer) and not shown(w.autoencoder) and not shown(w.stage)
    w.what.value = "ldm"
    assert shown(w.autoencoder) and shown(w.labels_layer) and w.out.value.name == "my-ldm"
    w.what.value = "cascade"
    assert shown(w.stage) and not shown(w.labels_layer) and not shown(w.autoencoder)
    assert "--stage base" in w.command_line.value or w.command_line.value == ""  # no data yet: no command
    dock.grab().save("/tmp/dock_train.png")
    assert errors(notes) == []


def test_plugins_menu_opens_the_dock(make_napari_viewer):
    from napari_zfdiffusion.widgets.train import TrainWidget

    viewer = make_napari_viewer()
    _, w = viewer.window.add_plugin_dock_widget("napari-zfdiffusion", "Train")  # as Plugins > zfdiffusion > Train
    assert isinstance(w, TrainWidget)


def test_presets_set_size_steps_and_checkpoints(dock):
    from napari_zfdiffusion.widgets.train import PRESET_SETTINGS

    _, w = dock
    assert (w.size.value, w.steps.value, w.checkpoint_every.value) == ("tiny", 60, 25)
    w.preset.value = "quick"
    assert (w.size.value, w.steps.value) == ("small", PRESET_SETTINGS["unet"]["quick"].steps)
    w.preset.value = "full"
    assert w.size.value == "base"
    w.preset.value = "test"
    args = w.plan().args
    assert args[:2] == ["train", "unet"] and args[args.index("--size") + 1] == "tiny"
    assert args[args.index("--steps") + 1] == "60" and args[args.index("--checkpoint-every") + 1] == "25"
    assert args[-2:] == ["--crop", "64"] and "--device" in args


def test_a_tiny_training_plots_its_loss_and_previews_each_checkpoint(dock, qtbot, notes):
    from napari_zfdiffusion.core.store import user_models_dir

    viewer, w = dock
    out = Path(w.out.value)
    assert out.parent == user_models_dir() and out.name == "my-unet"
    command = w.command_line.value
    assert command.startswith(f"{sys.executable} -m napari_zfdiffusion.cli train unet --images ")
    assert w.start()
    assert w.running and not w.start_button.enabled and w.stop_button.enabled
    assert (out / "training" / "layers" / "images" / "blobs.tif").is_file()  # the layers, written first
    assert (out / "training" / "layers" / "masks" / "blobs.tif").is_file()
    assert w.command_line.value == command
    _wait_until(qtbot, lambda: not w.running, 120)
    assert w.wait(60)
    assert errors(notes) == [], w.log_view.toPlainText()
    assert w.status.value.startswith("done: 60 steps")
    steps = [r["step"] for r in _logged(out) if "loss" in r]
    assert steps == [50, 60]
    x, loss, smooth = w.plot_data()
    assert x == steps and len(loss) == len(smooth) == 2 and all(np.isfinite(loss))
    assert json.loads((out / "model.json").read_text())["kind"] == "segmentation"
    preview = viewer.layers["my-unet preview labels"]
    assert preview.data.shape == (96, 128) and preview.data.dtype.kind in "iu"
    assert "train unet: 100%" in w.log_view.toPlainText()
    assert w.resume_button.enabled and w.progress_bar.value == w.progress_bar.max
    # the output folder now holds this run: Start again is refused (Resume goes on)
    assert not w.start()
    assert "press Resume" in errors(notes)[-1]


def test_stop_then_resume_goes_on_to_the_requested_steps(dock, qtbot, notes):
    from napari_zfdiffusion.core.training import monitor

    viewer, w = dock
    out = Path(w.out.value)
    w.steps.value = 100_000
    assert w.start()
    _wait_until(qtbot, lambda: len(w.plot_data()[0]) >= 1 and monitor.has_state(out, "unet"))
    proc = w._proc
    w.stop()
    assert not w.stop_button.enabled
    _wait_until(qtbot, lambda: not w.running, 30)
    assert proc.poll() is not None and w.status.value.startswith("stopped at step")
    assert w.resume_button.enabled and w.start_button.enabled and errors(notes) == []
    done = max(r["step"] for r in _logged(out))
    assert 50 <= done < 100_000
    # a dock opened later (napari restarted) resumes the run on the layers it wrote, with no data chosen
    from napari_zfdiffusion.widgets.train import TrainWidget

    later = TrainWidget(viewer)
    later.out.value = out
    assert later.image_layer.value is None and later.resume_button.enabled
    args = later.plan(resume=True).args
    layers = out / "training" / "layers"
    assert args[args.index("--images") + 1] == str(layers / "images")
    assert args[args.index("--masks") + 1] == str(layers / "masks") and args[-1] == "--resume"
    target = done + 50  # past the last checkpoint (which is at most the last step logged)
    w.steps.value = target
    w.resume_button.changed.emit(True)  # as a click does
    assert w.running
    assert w.command_line.value.endswith("--resume") and f"--steps {target} " in w.command_line.value
    _wait_until(qtbot, lambda: not w.running, 120)
    assert w.wait(60)
    assert errors(notes) == [], w.log_view.toPlainText()
    logged = _logged(out)
    assert max(r["step"] for r in logged) == target
    assert w.plot_data()[0] == [float(r["step"]) for r in logged if "loss" in r]
    assert w.plot_data()[0][-1] == target and w.status.value.startswith(f"done: {target} steps")
    shown = w.log_view.toPlainText()  # both runs' output, each line once (the resumed run appends to console.log)
    assert shown.count("$ ") == 2 and shown.count("note: masks are label images") == 2
    assert (out / "training" / "unet" / "console.log").read_text().count("$ ") == 2


def test_closing_napari_asks_what_to_do_with_a_running_training(dock, qtbot, monkeypatch, tmp_path):
    from napari_zfdiffusion.widgets import train

    viewer, w = dock
    answers = []
    monkeypatch.setattr(train, "ask_close", lambda parent, text: answers.pop(0))
    w.steps.value = 100_000
    assert w.start()
    proc = w._proc
    # cancel: the window stays open and the training goes on
    answers.append("cancel")
    viewer.window._qt_window.close()
    qtbot.wait(50)
    assert viewer.window._qt_window.isVisible() and w.running and proc.poll() is None and not answers
    # stop: the process ends before the window closes
    answers.append("stop")
    assert w.window_closing() is True
    assert proc.poll() is not None and not w.running
    # keep: the dock lets go, the process runs on (its output goes to console.log)
    w.out.value = tmp_path / "kept"
    assert w.start()
    proc = w._proc
    w._leftover.append(proc.pid)
    answers.append("keep")
    assert w.window_closing() is True
    assert not w.running and proc.poll() is None and "in the background" in w.status.value
    assert (tmp_path / "kept" / "training" / "unet" / "console.log").is_file()
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)


def test_bad_input_is_answered_and_nothing_starts(dock, notes, tmp_path):
    viewer, w = dock
    out = Path(w.out.value)
    w.labels_layer.value = None
    assert not w.start()
    assert "choose a labels layer" in errors(notes)[-1]
    w.image_layer.value = None
    assert not w.start()
    assert "no training data" in errors(notes)[-1]
    w.image_layer.value = viewer.layers["blobs"]
    w.labels_layer.value = viewer.add_labels(np.zeros((10, 10), np.int32), name="small")
    assert not w.start()
    assert "has shape (10, 10)" in errors(notes)[-1]
    w.labels_layer.value = viewer.layers["blobs labels"]
    w.extra.value = "--out elsewhere"
    assert not w.start() and "--out cannot be among" in errors(notes)[-1]
    w.extra.value = "--crop '64"
    assert not w.start() and "cannot be read" in errors(notes)[-1]
    w.extra.value = ""
    w.lr.value = "fast"
    assert not w.start() and "learning rate" in errors(notes)[-1]
    w.lr.value = ""
    other = tmp_path / "a-vae"
    other.mkdir()
    (other / "model.json").write_text(json.dumps({"kind": "vae"}))
    w.out.value = other
    assert not w.start() and "already holds another model (vae)" in errors(notes)[-1]
    busy = tmp_path / "notes"
    busy.mkdir()
    (busy / "thesis.txt").write_text("mine")
    w.out.value = busy
    assert not w.start() and "is not empty" in errors(notes)[-1]
    w.out.value = tmp_path / "fresh"
    assert not w.resume_button.enabled
    assert not w.start(resume=True) and "no training state" in errors(notes)[-1]
    w.what.value = "ldm"
    w.out.value = tmp_path / "fresh-ldm"
    w.autoencoder.value = None
    assert not w.start() and "needs an autoencoder" in errors(notes)[-1]
    w.what.value = "cascade"
    w.out.value = tmp_path / "fresh-cascade"
    assert not w.start() and "is a 2D image" in errors(notes)[-1]
    assert not w.running and not out.exists() and not (tmp_path / "fresh").exists()
    assert not any((tmp_path / name).exists() for name in ("fresh-ldm", "fresh-cascade"))
    assert "not started" in w.status.value


def test_previews_of_the_patch_models_and_the_cascade(tiny_latent, tiny_cascade):
    from napari_zfdiffusion.widgets.train import make_preview

    image = np.random.default_rng(0).random((40, 48)).astype(np.float32)
    vae = make_preview("vae", tiny_latent, (image, (1.0, 1.0), (0.0, 0.0), None), None)
    kind, rec, geometry = vae["(autoencoded)"]
    assert kind == "image" and rec.shape == (40, 48) and geometry["translate"] == (0.0, 0.0)
    # plane 2 of a stack with a z-step of 3 and an offset: the preview lies on that plane
    kind, rec, geometry = make_preview("vae", tiny_latent, (image, (0.5, 0.5), (10.0, 20.0), (2, 3.0, 1.0)),
                                       None)["(autoencoded)"]
    assert rec.shape == (1, 40, 48) and geometry == {"scale": (3.0, 0.5, 0.5), "translate": (7.0, 10.0, 20.0)}
    kind, patches, _ = make_preview("ldm", tiny_latent, None, None)["patches"]
    assert kind == "image" and patches.shape == (4, 32, 32)
    kind, sample, _ = make_preview("cascade", tiny_cascade, None, None)["slice"]
    assert kind == "image" and sample.shape == (64, 64) and np.isfinite(sample).all()


def test_the_log_reader_keeps_a_half_written_line_and_follows_a_trimmed_log(tmp_path):
    from napari_zfdiffusion.core.training.monitor import ConsoleFollower, LogFollower, describe_validation

    path = tmp_path / "log.jsonl"
    f = LogFollower(path)
    assert not f.poll() and f.log.steps == []  # no file yet
    path.write_text('{"step": 50, "loss": 1.5, "loss_smooth": 1.6}\n{"step": 100, "lo')
    assert f.poll() and f.log.steps == [50]
    with open(path, "a") as fh:
        fh.write('ss": 1.2, "loss_smooth": 1.4}\n{"step": 100, "validation": {"iou": 0.8125, "n": 3}}\n')
    assert f.poll() and f.log.steps == [50, 100] and f.log.loss == [1.5, 1.2]
    assert f.log.last_validation == {"iou": 0.8125, "n": 3} and f.log.last_step == 100
    assert describe_validation(f.log.last_validation) == "iou 0.812, n 3"
    assert not f.poll()
    tmp = tmp_path / "log.tmp"  # a resumed run trims the log to its checkpoint (a new file, renamed)
    tmp.write_text('{"step": 50, "loss": 1.5, "loss_smooth": 1.6}\n')
    os.replace(tmp, path)
    assert f.poll() and f.log.steps == [50] and f.log.validation == []
    path.unlink()  # a fresh run deletes it
    assert f.poll() and f.log.steps == []
    console = tmp_path / "console.log"
    console.write_bytes(b"note: hello\ntrain unet:  10%|#| 1/10\rtrain unet:  20%|##| 2/10")
    c = ConsoleFollower(console)
    assert c.poll() == ["note: hello"] and c.current == "train unet:  20%|##| 2/10"
