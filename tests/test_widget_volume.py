"""The Generate volume dock widget in a real napari viewer (under Xvfb, like test_widget_generate.py)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import errors, make_tiny_cascade

pytest.importorskip("napari")
pytest.importorskip("qtpy")

pytestmark = pytest.mark.gui


def _dock(viewer, model, *, resolution: int = 64, steps: int = 2):
    """Dock the widget in ``viewer`` with ``model`` chosen, on the CPU."""
    from napari_zfdiffusion.widgets.volume import GenerateVolumeWidget

    w = GenerateVolumeWidget(viewer)
    viewer.window.add_dock_widget(w, name="Generate volume")
    w.model_folder.value = model
    w.device.value = "cpu"
    w.resolution.value = resolution
    w.steps.value = w.sr_steps.value = steps
    return w


@pytest.fixture
def widget(make_napari_viewer, tiny_volume):
    viewer = make_napari_viewer()
    return viewer, _dock(viewer, tiny_volume)


def test_widget_defaults_follow_the_model(widget, tiny_volume):
    _, w = widget
    assert w.model.value == str(tiny_volume)
    assert (w.first_depth.min, w.first_depth.max, w.last_depth.max) == (0, 2, 2)
    assert (w.first_depth.value, w.last_depth.value) == (0, 2)
    assert w.first_meaning.value == w._cascade.depth_label(0) and w.last_meaning.value == w._cascade.depth_label(2)
    assert list(w.resolution.choices) == [64, 128]
    assert w.continuity.enabled and w.continuity.value == 1.0 and w.guidance.value == 3.0
    assert w.start_layer.value is None and w.start_layer.current_choice == "none"
    assert w.generate_button.enabled and not w.cancel_button.enabled
    w.first_depth.value = 2  # the range goes down the stack: last follows first, and back
    assert w.last_depth.value == 2 and w.first_meaning.value == w._cascade.depth_label(2)
    w.last_depth.value = 1
    assert w.first_depth.value == 1
    assert w.params()["depths"] == (1,)


def test_generate_fills_one_layer_plane_by_plane(widget, notes, tiny_volume):
    from napari_zfdiffusion.core.cascade import Cascade
    from napari_zfdiffusion.widgets._layers import data_limits

    viewer, w = widget
    w.seed.value = 5
    seen = []  # in the GUI thread, right after the widget has put each plane in

    def record(item):
        run, k, image = item
        seen.append((k, run.layer.data.copy(), viewer.dims.current_step[0], image))

    w._planes.item.connect(record)
    w.generate_button.clicked.emit()
    assert w._worker is not None
    assert len(viewer.layers) == 1 and viewer.layers[0].data.shape == (3, 64, 64)  # made at the start
    assert not viewer.layers[0].data.any()
    assert not w.generate_button.enabled and w.cancel_button.enabled
    assert w.wait(120)
    assert errors(notes) == []
    assert len(viewer.layers) == 1
    layer = viewer.layers["tiny-volume volume d0-2 64px s5"]  # model, depths, resolution, seed
    assert w.status.value == "added 'tiny-volume volume d0-2 64px s5' (3 planes)"
    assert layer.data.shape == (3, 64, 64) and layer.data.dtype == np.float32
    assert 0 <= layer.data.min() and layer.data.max() <= 1 and layer.data.std() > 0
    assert tuple(layer.contrast_limits) == pytest.approx(data_limits(layer.data))  # from the data
    prov = layer.metadata["zfdiffusion"]
    assert prov["operation"] == "volume" and prov["depths"] == [0, 1, 2] and prov["seed"] == 5
    assert prov["continuity_guidance"] == 1.0 and prov["guidance"] == 3.0 and prov["steps"] == 2
    assert prov["resolution"] == 64 and prov["stages"] == ["base"] and prov["first_plane_given"] is False
    # progressive: plane k arrives in order, is in the layer at once, the viewer shows it, later ones are 0
    assert [k for k, *_ in seen] == [0, 1, 2]
    for k, data, step, image in seen:
        assert step == k
        np.testing.assert_array_equal(data[k], image)
        assert all(data[j].any() for j in range(k + 1)) and not data[k + 1:].any()
    np.testing.assert_array_equal(seen[-1][1], layer.data)
    assert w.progress_bar.value == w.progress_bar.max and w.last_progress.stage == "plane 3/3 base"
    assert w.generate_button.enabled and not w.cancel_button.enabled
    # the widget adds nothing of its own: the same volume as the core makes
    same = Cascade.load(tiny_volume, "cpu").generate_volume((0, 1, 2), resolution=64, steps=2, seed=5)
    np.testing.assert_array_equal(same.images, layer.data)


def test_cancel_keeps_the_planes_made(widget, notes, qtbot):
    from qtpy.QtCore import Qt

    from napari_zfdiffusion.widgets._layers import data_limits

    viewer, w = widget
    w.resolution.value = 128
    w.steps.value = w.sr_steps.value = 40
    seen = []  # every step reported, recorded in the worker thread as it happens
    w.generate()
    job = w._job
    job.relay.progress.connect(seen.append, Qt.ConnectionType.DirectConnection)
    qtbot.waitUntil(lambda: w._run is not None and w._run.done >= 1, timeout=60000)
    w.cancel_button.clicked.emit()
    at_cancel = len(seen)
    assert job.token.cancelled and not w.cancel_button.enabled
    assert w.wait(60)
    assert errors(notes) == []
    assert any("cancelled" in m and "kept" in m for s, m in notes if s == "info")
    assert len(seen) <= at_cancel + 1 < 3 * 2 * 40  # the step in flight at most; the run stopped early
    [layer] = viewer.layers
    k = layer.data.shape[0]
    assert 1 <= k < 3 and layer.name == f"tiny-volume volume d0-2 128px s0 (cancelled, {k}/3 planes)"
    assert layer.data.shape == (k, 128, 128) and all(p.std() > 0 for p in layer.data)
    assert tuple(layer.contrast_limits) == pytest.approx(data_limits(layer.data))
    prov = layer.metadata["zfdiffusion"]
    assert prov["complete"] is False and prov["planes_done"] == k and prov["depths"] == [0, 1, 2]
    assert w.status.value.startswith("cancelled") and w.generate_button.enabled


def test_names_are_unique_and_progress_is_in_words(widget, notes):
    viewer, w = widget
    w.last_depth.value = 1
    words = []
    shown = w._on_progress

    def spy(p):
        shown(p)
        words.append(w.status.value)

    w._on_progress = spy
    for _ in range(2):
        w.generate()
        assert w.wait(120)
    assert [layer.name for layer in viewer.layers] == ["tiny-volume volume d0-1 64px s0",
                                                       "tiny-volume volume d0-1 64px s0 2"]
    assert w.status.value == "added 'tiny-volume volume d0-1 64px s0 2' (2 planes)" and errors(notes) == []
    assert words[0] == "plane 1 of 2: drafting at 64 px (1/2)"
    assert words[1].startswith("plane 1 of 2: drafting at 64 px (2/2) - about ") and words[1].endswith(" left")
    assert words[3].startswith("plane 2 of 2: drafting at 64 px (2/2) - about ")


def test_cancel_before_any_plane_adds_nothing(widget, notes, qtbot):
    viewer, w = widget
    w.resolution.value = 128
    w.steps.value = 40
    w.generate()
    qtbot.waitUntil(lambda: w.last_progress is not None, timeout=60000)
    w.cancel()
    assert w.wait(60)
    assert len(viewer.layers) == 0 and errors(notes) == []
    assert any("nothing was added" in m for s, m in notes if s == "info")


def test_start_from_a_generated_layer(widget, notes):
    viewer, w = widget
    rng = np.random.default_rng(0)
    src = viewer.add_image(rng.random((2, 64, 64)).astype(np.float32), name="slices",
                           metadata={"zfdiffusion": {"kind": "zfdiffusion.cascade", "depth": 0, "seed": 9}})
    viewer.dims.set_current_step(0, 1)
    w.start_layer.value = src
    w.generate()
    assert w.wait(120)
    assert errors(notes) == []
    vol = viewer.layers[-1]
    assert vol.data.shape == (3, 64, 64)
    np.testing.assert_allclose(vol.data[0], src.data[1], atol=1e-6)  # taken as in [0, 1] already
    assert vol.data[1].std() > 0 and not np.allclose(vol.data[1], vol.data[0])
    prov = vol.metadata["zfdiffusion"]
    assert prov["first_plane_given"] is True and prov["first_plane_normalised"] is True
    assert prov["source_layer"] == "slices" and prov["source_plane"] == 1 and prov["source"]["seed"] == 9


def test_start_from_a_plane_of_a_real_stack(widget, notes):
    from napari_zfdiffusion._sample_data import cho_stack
    from napari_zfdiffusion.core.images import to_unit
    from napari_zfdiffusion.core.cascade.volume import first_plane_tensor

    viewer, w = widget
    data = cho_stack()[0][0][:, :128, :128]
    viewer.add_image(data, name="cho")
    viewer.dims.set_current_step(0, 3)
    w.start_layer.value = viewer.layers["cho"]
    w.first_depth.value = 1
    w.generate()
    assert w.wait(120)
    assert errors(notes) == []
    vol = viewer.layers[-1]
    assert vol.name == "tiny-volume volume d1-2 64px s0" and vol.data.shape == (2, 64, 64)
    expected = to_unit(first_plane_tensor(data[3], 64, w._cascade.normalisation)[0, 0])
    np.testing.assert_allclose(vol.data[0], expected, atol=1e-6)  # normalised like the training data
    prov = vol.metadata["zfdiffusion"]
    assert prov["source_plane"] == 3 and prov["first_plane_normalised"] is False and "source" not in prov


def test_a_model_without_continuity_makes_independent_planes(make_napari_viewer, notes, tiny_cascade,
                                                             tiny_volume):
    viewer = make_napari_viewer()
    w = _dock(viewer, tiny_cascade)
    assert not w.continuity.enabled and w.continuity.value == 0
    assert "not a volume model" in w.continuity.tooltip and "not a volume model" in w.status.value
    w.last_depth.value = 1
    w.generate()
    assert w.wait(120)
    assert errors(notes) == []
    layer = viewer.layers["tiny-cascade volume d0-1 64px s0"]
    assert layer.data.shape == (2, 64, 64) and layer.data.std() > 0
    assert layer.metadata["zfdiffusion"]["continuity_guidance"] == 0
    w.model_folder.value = tiny_volume  # a volume model: the control comes back, at 1
    assert w.continuity.enabled and w.continuity.value == 1.0


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda v: v.add_image(np.ones((32, 32), np.float32), name="small"), "smaller than"),
        (lambda v: v.add_image(np.ones((64, 80), np.float32), name="wide"), "square"),
        (lambda v: v.add_image(np.zeros((64, 64, 3), np.uint8), rgb=True, name="rgb"), "RGB"),
        (lambda v: v.add_image(np.zeros((2, 2, 64, 64), np.float32), name="4d"), "2D image"),
    ],
    ids=["too-small", "not-square", "rgb", "4d"],
)
def test_a_bad_first_plane_gives_a_notification_and_no_layer(widget, notes, make, expected):
    viewer, w = widget
    w.start_layer.value = make(viewer)
    w.generate()
    assert w.wait(60)
    msgs = errors(notes)
    assert len(msgs) == 1 and expected in msgs[0], msgs
    assert len(viewer.layers) == 1 and w.generate_button.enabled  # nothing added; the viewer lives on


def test_depths_outside_the_model_give_a_notification(widget, notes):
    viewer, w = widget
    w.generate(depths=(2, 3))  # the spin boxes cannot go there; the core still answers
    assert w.wait(60)
    msgs = errors(notes)
    assert len(msgs) == 1 and "depth 3 is out of range" in msgs[0]
    assert len(viewer.layers) == 0


def test_screenshot_with_the_widget_is_not_blank(make_napari_viewer, tiny_volume):
    viewer = make_napari_viewer(show=True)
    w = _dock(viewer, tiny_volume)
    w.generate()
    assert w.wait(120)
    assert len(viewer.layers) == 1
    shot = viewer.screenshot(canvas_only=False)
    assert shot.ndim == 3 and shot.shape[-1] == 4 and shot[..., :3].std() > 0
    canvas = viewer.screenshot(canvas_only=True)
    assert canvas[..., :3].std() > 0
    panel = w.native.grab().toImage()
    assert panel.width() > 100 and panel.height() > 200


def test_widget_through_napari_opens_with_the_bundled_demo(make_napari_viewer, notes):
    from napari_zfdiffusion.widgets.volume import GenerateVolumeWidget

    viewer = make_napari_viewer()
    _, w = viewer.window.add_plugin_dock_widget("napari-zfdiffusion", "Generate volume")
    assert isinstance(w, GenerateVolumeWidget)
    assert w.model.value is not None and w.model.value.endswith("zf-cascade-demo")
    assert w.generate_button.enabled and errors(notes) == []
    assert w.continuity.enabled == w._cascade.continuity  # the demo becomes a volume model later


def test_demo_docks_four_tabs(monkeypatch):
    import napari

    from napari_zfdiffusion import demo

    monkeypatch.setattr(napari, "run", lambda *a, **k: None)
    assert demo.run_gui() == 0
    viewer = napari.current_viewer()
    try:
        docks = viewer.window.dock_widgets
        assert {"Generate slices", "Generate volume", "Generate EM patches", "Segment"} <= set(docks)
    finally:
        viewer.close()


def test_a_volume_layer_has_its_true_z_step(make_napari_viewer, tmp_path):
    import json

    model = make_tiny_cascade(tmp_path / "geo", stages=("base",), continuity=True)
    card = json.loads((model / "cascade.json").read_text())
    (model / "cascade.json").write_text(json.dumps({**card, "field_um": 32.0, "z_step_um": 2.0}))
    viewer = make_napari_viewer()
    w = _dock(viewer, model, resolution=64, steps=1)
    w.generate()
    assert w.wait(60)
    layer = viewer.layers[-1]
    assert tuple(layer.scale) == (2.0, 0.5, 0.5)  # z-step, and 32 um over 64 px
    assert layer.metadata["zfdiffusion"]["pixel_size_um"] == {"z": 2.0, "y": 0.5, "x": 0.5}
