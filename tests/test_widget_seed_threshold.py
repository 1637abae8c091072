"""The Segment dock's "seed threshold" (issue 14): under Advanced, set from the model's card, passed to
the segmentation and to "Copy CLI command" only when it differs from the model's default. Runs under
Xvfb (pytest-xvfb) like the other widget tests, with conftest's tiny U-Net.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import tifffile
from conftest import errors

pytest.importorskip("napari")
pytest.importorskip("qtpy")

pytestmark = pytest.mark.gui


def _dock(viewer, model):
    from napari_zfdiffusion.widgets.segment import SegmentWidget

    w = SegmentWidget(viewer)
    viewer.window.add_dock_widget(w, name="Segment")
    w.device.value = "cpu"
    w.model_folder.value = model
    return w


def with_seeds(model, dest, value):
    shutil.copytree(model, dest)
    card = json.loads((dest / "model.json").read_text())
    card["seed_threshold"] = value
    (dest / "model.json").write_text(json.dumps(card, indent=2))
    return dest


def test_the_control_is_under_advanced_and_follows_the_card(make_napari_viewer, tiny_segmenter, tmp_path, notes):
    from test_widget_cli_command import copied, press
    from test_widget_layout import _names

    viewer = make_napari_viewer()
    path = tmp_path / "cells.tif"
    tifffile.imwrite(path, np.zeros((64, 64), np.uint8))
    (layer,) = viewer.open(str(path))
    seeded = with_seeds(tiny_segmenter, tmp_path / "seeded", 0.35)
    w = _dock(viewer, seeded)
    assert "seed_threshold" in _names(w, w.sections.advanced)
    assert "seed threshold" in w.seed_threshold.tooltip and "card" in w.seed_threshold.tooltip
    assert w.seed_threshold.value == 0.35 and w.seed_threshold.enabled
    assert "seed_threshold" not in w.params()  # the model's default: the card's value
    assert "--seed-threshold" not in press(w.cli_button)

    w.seed_threshold.value = 0.6
    assert w.params()["seed_threshold"] == 0.6
    a = copied(w, notes)
    assert a.seed_threshold == 0.6 and a.threshold == 0.5 and a.input == path

    w.model_folder.value = tiny_segmenter  # a card without seed_threshold: the control shows its threshold
    assert w.seed_threshold.value == 0.5 and "seed_threshold" not in w.params()
    w.threshold.value = 0.3  # untouched, the seeds follow the threshold, as before the control existed
    assert "seed_threshold" not in w.params() and "--seed-threshold" not in press(w.cli_button)
    w.seed_threshold.value = 0.4
    assert w.params()["seed_threshold"] == 0.4 and copied(w, notes).seed_threshold == 0.4
    assert layer in viewer.layers and errors(notes) == []


def test_segment_uses_the_control(make_napari_viewer, tiny_segmenter, tmp_path, notes):
    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((64, 64), np.uint8) + np.eye(64, dtype=np.uint8) * 200, name="cells")
    w = _dock(viewer, with_seeds(tiny_segmenter, tmp_path / "seeded", 0.35))
    w.segment_button.clicked.emit()
    assert w.wait(120)
    assert viewer.layers["cells labels"].metadata["zfdiffusion"]["seed_threshold"] == 0.35  # the card's
    w.seed_threshold.value = 0.7
    w.segment_button.clicked.emit()
    assert w.wait(120)
    assert viewer.layers["cells labels"].metadata["zfdiffusion"]["seed_threshold"] == 0.7
    assert errors(notes) == []


def test_the_join_control_follows_the_card_and_reaches_segment_and_the_cli(make_napari_viewer, tiny_segmenter,
                                                                          tmp_path, notes):
    """"join cores above": under Advanced beside the seed threshold, the card's join_threshold (for a
    card without one: the seed threshold, which joins nothing); passed on only when changed, and held
    at the seed threshold."""
    from test_widget_cli_command import copied, press
    from test_widget_layout import _names

    viewer = make_napari_viewer()
    path = tmp_path / "cells.tif"
    tifffile.imwrite(path, np.zeros((64, 64), np.uint8) + np.eye(64, dtype=np.uint8) * 200)
    viewer.open(str(path))
    joined = with_seeds(tiny_segmenter, tmp_path / "joined", 0.5)
    card = json.loads((joined / "model.json").read_text())
    (joined / "model.json").write_text(json.dumps({**card, "join_threshold": 0.3}))
    w = _dock(viewer, joined)
    assert "join_threshold" in _names(w, w.sections.advanced) and w.join_threshold.enabled
    assert w.join_threshold.value == 0.3 and "join_threshold" not in w.params()
    assert "--join-threshold" not in press(w.cli_button)
    w.join_threshold.value = 0.2
    assert w.params()["join_threshold"] == 0.2 and copied(w, notes).join_threshold == 0.2
    w.join_threshold.value = 0.8  # above the seed threshold: no joining
    assert w.params()["join_threshold"] == 0.5
    w.segment_button.clicked.emit()
    assert w.wait(120)
    assert "join_threshold" not in viewer.layers["cells labels"].metadata["zfdiffusion"]
    w.join_threshold.value = 0.3  # the card's again
    w.segment_button.clicked.emit()
    assert w.wait(120)
    assert viewer.layers["cells labels"].metadata["zfdiffusion"].get("join_threshold", 0.3) == 0.3
    w.model_folder.value = tiny_segmenter  # no join_threshold in the card: the seed threshold, no joining
    assert w.join_threshold.value == 0.5 and "join_threshold" not in w.params()
    assert errors(notes) == []
