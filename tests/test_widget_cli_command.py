""""Copy CLI command" in every dock: the ``zfdiffusion`` command that does what the dock would do.

Each test sets some controls as a person would, presses the button, and parses the clipboard's text
with the real parser (``cli.build_parser()``): the namespace must hold the dock's settings. Runs under
Xvfb (pytest-xvfb) like the other widget tests; no job runs (the models' cards are read, no weights).
"""

from __future__ import annotations

import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
from conftest import errors

pytest.importorskip("napari")
pytest.importorskip("qtpy")

pytestmark = pytest.mark.gui


def press(button) -> str:
    """Press ``button`` and return the clipboard's text."""
    from qtpy.QtWidgets import QApplication

    QApplication.clipboard().clear()
    button.clicked.emit()
    return QApplication.clipboard().text()


def parse(command: str):
    """The command parsed as the shell and the ``zfdiffusion`` command would parse it."""
    from napari_zfdiffusion.cli import build_parser

    words = shlex.split(command)
    assert words[0] == "zfdiffusion", command
    return build_parser().parse_args(words[1:])


def copied(w, notes, button=None):
    """Press the dock's "Copy CLI command" (or ``button``): the parsed command; checks the clipboard, the
    status line and the notification agree."""
    command = press(button or w.cli_button)
    assert command.startswith("zfdiffusion ") and "\n" not in command
    assert w.status.value.startswith(f"copied to the clipboard: {command}")
    assert any(command in m for s, m in notes if s == "info"), notes
    assert errors(notes) == []
    return parse(command)


def open_file(viewer, path: Path):
    """A layer opened from ``path`` as napari opens it (File > Open)."""
    (layer,) = viewer.open(str(path))
    viewer.layers.selection.active = layer
    return layer


def in_spaced_folder(model: Path, tmp_path: Path) -> Path:
    """A copy of the model folder ``model`` in a folder whose names have spaces."""
    return Path(shutil.copytree(model, tmp_path / "my models" / f"{model.name} copy"))


def test_every_dock_has_the_button_with_a_plain_tooltip(make_napari_viewer):
    from test_widget_layout import DOCKS, make_dock

    viewer = make_napari_viewer()
    for which in DOCKS:
        w, _ = make_dock(viewer, which)
        assert w.cli_button.text == "Copy CLI command"
        assert "copy the zfdiffusion command that does what this dock would do" in w.cli_button.tooltip
        assert "batch work over folders" in w.cli_button.tooltip
        assert w.cli_row in list(w.sections.footer)  # always in sight, below the run buttons


# ---------------------------------------------------------------- Generate slices
def _slices(viewer, model):
    from napari_zfdiffusion.widgets.generate import GenerateSlicesWidget

    w = GenerateSlicesWidget(viewer)
    viewer.window.add_dock_widget(w, name="Generate slices")
    if model is not None:
        w.model_folder.value = model
    return w


def test_generate_command_has_the_dock_settings(make_napari_viewer, tiny_cascade, tmp_path, notes):
    model = in_spaced_folder(tiny_cascade, tmp_path)
    w = _slices(make_napari_viewer(), model)
    w.device.value = "cpu"
    w.depth.value = 2
    w.guidance.value = 4.5
    w.resolution.value = 64
    w.n_samples.value = 3
    w.sampler.value = "ddim"
    w.steps.value = 7
    w.sr_steps.value = 5
    w.seed.value = 1234
    a = copied(w, notes)
    assert a.command == "generate" and a.func.__name__ == "cmd_generate"
    assert Path(a.model) == model.resolve() and " " in a.model  # the folder, quoted
    p = w.params()
    assert (a.depth, a.guidance, a.resolution, a.n, a.seed) == (p["depth"], p["guidance"], p["resolution"], p["n"],
                                                                  p["seed"]) == (2, 4.5, 64, 3, 1234)
    assert (a.sampler, a.steps, a.sr_steps, a.device) == ("ddim", 7, 5, "cpu")
    assert a.out == Path("slices.tif")


def test_a_bundled_model_is_named_and_auto_is_left_out(make_napari_viewer, notes):
    from napari_zfdiffusion.core.store import bundled_dir

    if bundled_dir() is None or not (bundled_dir() / "zf-cascade-demo").is_dir():
        pytest.skip("the bundled demo cascade is not installed")
    w = _slices(make_napari_viewer(), None)
    assert Path(w.model.value).name == "zf-cascade-demo" and w.device.value == "auto"
    command = press(w.cli_button)
    assert "--device" not in command
    a = parse(command)
    assert a.model == "zf-cascade-demo" and a.device == "auto" and a.resolution == w.resolution.value


def test_upsample_command_takes_the_selected_layers_file(make_napari_viewer, tiny_cascade, tmp_path, notes):
    viewer = make_napari_viewer()
    w = _slices(viewer, tiny_cascade)
    w.depth.value = 1
    w.resolution.value = 128
    w.sr_steps.value = 6
    w.seed.value = 7
    path = tmp_path / "my images" / "slice one.tif"
    path.parent.mkdir()
    tifffile.imwrite(path, (np.random.default_rng(0).random((64, 64)) * 255).astype(np.uint8))
    open_file(viewer, path)
    a = copied(w, notes, w.upsample_cli_button)
    assert a.command == "upsample" and a.input == path  # the file napari opened
    assert (a.depth, a.resolution, a.steps, a.seed, a.sampler) == (1, 128, 6, 7, w.sampler.value)
    assert Path(a.model) == tiny_cascade.resolve() and a.out == Path("slice one_128px.tif")
    assert "save it first" not in w.status.value

    unsaved = viewer.add_image(np.zeros((64, 64), np.float32), name="drawn")
    viewer.layers.selection.active = unsaved
    a = copied(w, notes, w.upsample_cli_button)
    assert a.input == Path("IMAGE.tif")
    assert "layer 'drawn' was not opened from a file: save it first" in w.status.value


# ---------------------------------------------------------------- Generate volume
def test_volume_command_has_the_dock_settings(make_napari_viewer, tiny_volume, tmp_path, notes):
    from napari_zfdiffusion.core.cascade.depths import parse_depths
    from napari_zfdiffusion.widgets.volume import GenerateVolumeWidget

    viewer = make_napari_viewer()
    w = GenerateVolumeWidget(viewer)
    viewer.window.add_dock_widget(w, name="Generate volume")
    w.model_folder.value = tiny_volume
    w.first_depth.value, w.last_depth.value = 1, 2
    w.resolution.value = 64
    w.guidance.value = 2.5
    w.continuity.value = 1.75
    w.steps.value, w.sr_steps.value = 9, 4
    w.seed.value = 42
    a = copied(w, notes)
    p = w.params()
    assert a.command == "volume" and Path(a.model) == tiny_volume.resolve() and a.device == "auto"
    assert parse_depths(a.depths, 3, consecutive=True) == p["depths"] == (1, 2)
    assert (a.guidance, a.continuity_guidance, a.resolution, a.seed, a.steps, a.sr_steps, a.sampler) == \
        (p["guidance"], p["continuity_guidance"], p["resolution"], p["seed"], p["steps"], p["sr_steps"],
         p["sampler"]) == (2.5, 1.75, 64, 42, 9, 4, "dpmsolver++")
    assert a.first_plane is None and a.out == Path("volume.tif")

    path = tmp_path / "top plane.tif"
    tifffile.imwrite(path, np.zeros((64, 64), np.uint16))
    w.start_layer.value = open_file(viewer, path)
    assert parse(press(w.cli_button)).first_plane == path
    w.start_layer.value = viewer.add_image(np.zeros((3, 64, 64), np.float32), name="stack")
    assert parse(press(w.cli_button)).first_plane == Path("FIRST_PLANE.tif")
    assert "--first-plane takes a 2D image: save plane" in w.status.value


# ---------------------------------------------------------------- Generate EM patches
def test_em_command_has_the_dock_settings_and_the_mask_outputs(make_napari_viewer, tiny_paired, tiny_latent,
                                                                notes):
    from napari_zfdiffusion.widgets.em import GenerateEMWidget

    viewer = make_napari_viewer()
    w = GenerateEMWidget(viewer)
    viewer.window.add_dock_widget(w, name="Generate EM patches")
    w.model_folder.value = tiny_paired
    w.device.value = "cpu"
    w.n_patches.value = 5
    w.steps.value = 3
    w.seed.value = 9
    w.sampler.value = "ddpm"
    w.threshold.value = 0.35
    w.min_size.value = 20
    w.keep_probability.value = False
    a = copied(w, notes)
    p = w.params()
    assert (a.command, a.what) == ("em", "generate") and Path(a.model) == tiny_paired.resolve()
    assert (a.n, a.steps, a.seed, a.sampler, a.threshold, a.min_size, a.device) == \
        (p["n"], p["steps"], p["seed"], p["sampler"], p["threshold"], p["min_size"], "cpu") == \
        (5, 3, 9, "ddpm", 0.35, 20, "cpu")
    assert a.out == Path("patches.tif") and a.masks_out == Path("patches_labels.tif") and a.prob_out is None
    w.keep_probability.value = True
    assert parse(press(w.cli_button)).prob_out == Path("patches_probability.tif")

    w.model_folder.value = tiny_latent  # images only: no mask options
    command = press(w.cli_button)
    assert not {"--masks-out", "--prob-out", "--threshold", "--min-size"} & set(shlex.split(command))
    assert Path(parse(command).model) == tiny_latent.resolve()


# ---------------------------------------------------------------- Segment
def _segment(viewer, model=None):
    from napari_zfdiffusion.widgets.segment import SegmentWidget

    w = SegmentWidget(viewer)
    viewer.window.add_dock_widget(w, name="Segment")
    if model is not None:
        w.model_folder.value = model
    return w


def _bundled_segmenter() -> Path:
    from napari_zfdiffusion.core.store import bundled_dir

    if bundled_dir() is None or not (bundled_dir() / "nuclei-unet-demo").is_dir():
        pytest.skip("the bundled segmentation model is not installed")
    return bundled_dir() / "nuclei-unet-demo"


def test_segment_command_takes_the_layers_file_and_the_settings(make_napari_viewer, tmp_path, notes):
    bundled = _bundled_segmenter()
    viewer = make_napari_viewer()
    path = tmp_path / "my images" / "cells 1.tif"
    path.parent.mkdir()
    tifffile.imwrite(path, (np.random.default_rng(1).random((96, 128)) * 255).astype(np.uint8))
    layer = open_file(viewer, path)
    w = _segment(viewer)
    assert w.layer.value is layer and Path(w.model.value) == bundled
    w.device.value = "cpu"
    w.threshold.value = 0.3
    w.min_size.value = 25
    w.tile.value = 128
    w.overlap.value = 24
    w.use_interior.value = False
    w.diameter.value = 30
    w.add_probability.value = True
    a = copied(w, notes)
    p = w.params()
    assert a.command == "segment" and a.model == "nuclei-unet-demo" and a.input == path
    assert (a.tile, a.overlap, a.threshold, a.min_size, not a.no_interior, float(a.diameter), a.device) == \
        (p["tile"], p["overlap"], p["threshold"], p["min_size"], p["use_interior"], p["diameter"], "cpu") == \
        (128, 24, 0.3, 25, False, 30.0, "cpu")
    assert a.stack == "auto"  # a 2D image: nothing to choose
    assert a.out == Path("cells 1_labels.tif") and a.prob_out == Path("cells 1_probability.tif")
    assert "save it first" not in w.status.value

    w.use_interior.value = True
    w.auto_diameter.value = True
    w.add_probability.value = False
    a = parse(press(w.cli_button))
    assert not a.no_interior and a.diameter == "auto" and a.prob_out is None


def test_segment_command_for_a_stack_and_a_layer_without_a_file(make_napari_viewer, tmp_path, notes):
    bundled = _bundled_segmenter()
    viewer = make_napari_viewer()
    stack = viewer.add_image(np.zeros((3, 64, 64), np.float32), name="movie", axis_labels=("t", "y", "x"))
    model = in_spaced_folder(bundled, tmp_path)
    w = _segment(viewer, model)
    assert w.layer.value is stack and w.stack.value == "planes"  # a time series
    a = copied(w, notes)
    assert a.input == Path("IMAGE.tif") and a.out == Path("IMAGE_labels.tif") and a.stack == "planes"
    assert Path(a.model) == model.resolve()
    assert "layer 'movie' was not opened from a file: save it first" in w.status.value
    w.stack.value = "volume"
    assert parse(press(w.cli_button)).stack == "volume"
    assert w.diameter.value == 0 and "--diameter" not in w.status.value  # 0: the image as it is


def test_no_usable_model_gives_an_error_not_a_command(make_napari_viewer, tmp_path, notes):
    w = _slices(make_napari_viewer(), None)
    bad = tmp_path / "not a model"
    bad.mkdir()
    w.model_folder.value = bad  # "model not usable"
    notes.clear()
    assert press(w.cli_button) == ""
    assert any(s == "error" and "no command to copy" in m for s, m in notes)
