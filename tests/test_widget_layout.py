"""What every dock shares: it fits a 1366x768 screen (Advanced collapsed, scrollable), every control
explains itself in a tooltip, "?" opens its section of the user guide, the device line, and the
progress words and time left (:mod:`napari_zfdiffusion.widgets._progress`).

The docks run under Xvfb (pytest-xvfb) like the other widget tests. A screenshot of each dock, docked
alone in a 1366x768 window, is written to /tmp/dock_<name>.png to look at.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("napari")
pytest.importorskip("qtpy")

pytestmark = pytest.mark.gui

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "user-guide.md"
DOCKS = ["slices", "volume", "em", "segment"]
# what must be under Advanced, and what must stay in sight (issue 16: the object size and stack controls)
ADVANCED = {"slices": {"sampler", "steps", "sr_steps", "seed", "device", "model_folder"},
            "volume": {"sampler", "steps", "sr_steps", "seed", "device", "model_folder"},
            "em": {"sampler", "steps", "seed", "device", "model_folder"},
            "segment": {"tile", "overlap", "device", "model_folder"}}
ESSENTIAL = {"slices": {"model", "depth", "guidance", "resolution", "n_samples"},
             "volume": {"model", "first_depth", "last_depth", "resolution", "guidance", "continuity", "start_layer"},
             "em": {"model", "n_patches", "threshold", "min_size"},
             "segment": {"layer", "model", "diameter", "auto_diameter", "stack", "threshold", "min_size",
                         "replace"}}


def make_dock(viewer, which: str):
    from napari_zfdiffusion.widgets.em import GenerateEMWidget
    from napari_zfdiffusion.widgets.generate import GenerateSlicesWidget
    from napari_zfdiffusion.widgets.segment import SegmentWidget
    from napari_zfdiffusion.widgets.volume import GenerateVolumeWidget

    cls = {"slices": GenerateSlicesWidget, "volume": GenerateVolumeWidget, "em": GenerateEMWidget,
           "segment": SegmentWidget}[which]
    w = cls(viewer)
    return w, viewer.window.add_dock_widget(w, name=which)


def _settle(qtbot, ms: int = 200) -> None:
    qtbot.wait(ms)


def _names(w, part) -> set[str]:
    from napari_zfdiffusion.widgets._layout import controls

    found = {id(c) for c in controls(part)}
    return {k for k, v in vars(w).items() if id(v) in found}


@pytest.mark.parametrize("which", DOCKS)
def test_the_dock_fits_a_1366x768_screen(make_napari_viewer, qtbot, which, notes):
    viewer = make_napari_viewer(show=True)
    viewer.window._qt_window.resize(1366, 740)
    w, dock = make_dock(viewer, which)
    _settle(qtbot)
    assert not w.sections.collapsible.isExpanded()  # Advanced starts collapsed
    hint = dock.sizeHint()
    assert hint.height() <= 600 and hint.width() <= 460, hint
    # nothing hidden by scrolling at this size: the controls' area is as tall as they are
    scroll = w.sections.scroll
    assert scroll.verticalScrollBar().maximum() == 0
    w.sections.collapsible.expand(animate=False)
    _settle(qtbot)
    assert dock.sizeHint().height() <= 700  # open, it still asks for less than the screen (and scrolls)
    assert [m for s, m in notes if s == "error"] == []


@pytest.mark.parametrize("which", DOCKS)
def test_essential_controls_first_and_expert_ones_under_advanced(make_napari_viewer, which):
    w, _ = make_dock(make_napari_viewer(), which)
    assert ADVANCED[which] <= _names(w, w.sections.advanced)
    assert ESSENTIAL[which] <= _names(w, w.sections.body)
    assert {"cancel_button", "progress_bar", "status", "help"} <= _names(w, w.sections.footer)


@pytest.mark.parametrize("which", DOCKS)
def test_every_control_has_a_tooltip_and_the_guide_is_one_click_away(make_napari_viewer, which):
    from napari_zfdiffusion.widgets._layout import controls

    w, _ = make_dock(make_napari_viewer(), which)
    for part in w.sections.containers():
        for c in controls(part):
            assert c.tooltip and len(c.tooltip) > 10, (which, c.label, c.name, type(c).__name__)
    assert w.sections.collapsible.toggleButton().toolTip()
    if which in ("slices", "volume"):  # plain words, as the issue asks
        assert w.guidance.tooltip.startswith("guidance: how strongly") and "3 is typical" in w.guidance.tooltip
    anchor = w.help.url.rsplit("#", 1)[1]
    headings = [re.sub(r"[^a-z0-9 -]", "", h.lower()).replace(" ", "-")
                for h in re.findall(r"^## (.+)$", GUIDE.read_text(encoding="utf-8"), re.MULTILINE)]
    assert anchor in headings, (anchor, headings)


@pytest.mark.parametrize("which", DOCKS)
def test_screenshot_of_the_dock(make_napari_viewer, qtbot, which):
    """Written to /tmp/dock_<name>.png (Advanced collapsed) and /tmp/dock_<name>_advanced.png."""
    viewer = make_napari_viewer(show=True)
    viewer.window._qt_window.resize(1366, 740)
    w, dock = make_dock(viewer, which)
    _settle(qtbot)
    for suffix in ("", "_advanced"):
        if suffix:
            w.sections.collapsible.expand(animate=False)
            _settle(qtbot)
        shot = dock.grab()
        assert shot.save(f"/tmp/dock_{which}{suffix}.png")
        image = shot.toImage()
        assert image.width() > 300 and image.height() > 300
        assert len({image.pixel(x, y) for x in range(0, image.width(), 7) for y in range(0, image.height(), 7)}) > 5
    viewer.window._qt_window.grab().save(f"/tmp/dock_{which}_window.png")


def test_device_line_says_what_auto_means(monkeypatch):
    import torch

    from napari_zfdiffusion.widgets._layout import device_line, is_gpu

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", None)
    assert device_line("auto") == "auto → CPU (no CUDA in this torch build)"
    assert device_line("cpu") == "cpu → CPU" and not is_gpu("auto")
    assert "not available here (no CUDA in this torch build)" in device_line("cuda")
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    assert device_line("auto") == "auto → CPU (no CUDA GPU found)"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "NVIDIA H200")
    assert device_line("auto") == "auto → cuda:0 (NVIDIA H200)" and is_gpu("auto")


def test_stage_names_in_plain_words():
    from napari_zfdiffusion.widgets._progress import plain_stage

    assert plain_stage("sr256") == "upscaling to 256 px"
    assert plain_stage("base") == "drafting at 64 px" and plain_stage("base", 32) == "drafting at 32 px"
    assert plain_stage("plane 2/5 sr128") == "plane 2 of 5: upscaling to 128 px"
    assert plain_stage("tiles") == "segmenting tiles" and plain_stage("decode") == "decoding patches"
    assert plain_stage("something new") == "something new"


def test_time_left_is_measured_from_the_first_steps():
    from napari_zfdiffusion.core.progress import Progress
    from napari_zfdiffusion.widgets._progress import TimeLeft, cascade_costs, format_seconds

    # one stage of 10 steps, 2 s each, after 5 s of loading the model (not counted)
    t = TimeLeft()
    assert t.update(Progress("tiles", 1, 10), now=5.0) is None and t.text() == ""  # one step: no rate yet
    assert t.update(Progress("tiles", 2, 10), now=7.0) == pytest.approx(16.0)
    assert t.update(Progress("tiles", 5, 10), now=13.0) == pytest.approx(10.0)
    assert t.text() == " - about 10 s left" and t.fraction == pytest.approx(0.5)

    # two stages, the second 4 times as costly per step (64 -> 128 px weighs less: see step_cost)
    costs = cascade_costs([128, 256], steps=10, sr_steps=10)
    assert costs[1] == 4 * costs[0]
    t = TimeLeft(costs)
    for k in range(1, 11):  # 1 s a step at 128 px
        t.update(Progress("base", k, 10, 0, 2), now=float(k))
    assert t.fraction == pytest.approx(0.2) and t.seconds_left == pytest.approx(40.0)  # 10 steps x 4 s
    t.update(Progress("sr256", 1, 10, 1, 2), now=14.0)  # the new stage is measured from its second step on
    assert t.seconds_left == pytest.approx(36.0)
    t.update(Progress("sr256", 2, 10, 1, 2), now=17.0)  # 3 s a step, measured
    assert t.seconds_left == pytest.approx(24.0)
    assert [format_seconds(s) for s in (0.2, 7, 42, 130, 1300, 4000)] == \
        ["1 s", "7 s", "40 s", "2 min 10 s", "22 min", "1 h 6 min"]


def test_unique_names_and_contrast_limits_from_the_data(make_napari_viewer):
    from napari_zfdiffusion.widgets._layers import data_limits, unique_name

    viewer = make_napari_viewer()
    assert unique_name(viewer, "a") == "a"
    viewer.add_image(np.zeros((4, 4)), name="a")
    viewer.add_image(np.zeros((4, 4)), name="a 2")
    assert unique_name(viewer, "a") == "a 3"
    assert data_limits(np.full((8, 8), 3.0)) == (3.0, 4.0)
    lo, hi = data_limits(np.linspace(0.2, 0.7, 10_000))
    assert 0.2 <= lo < 0.201 and 0.699 < hi <= 0.7
