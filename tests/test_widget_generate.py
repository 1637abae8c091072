"""The Generate slices dock widget, the sample data and the writer, in a real napari viewer.

Runs under Xvfb (pytest-xvfb starts it) with the normal xcb platform, so the canvas has OpenGL.
"""

from __future__ import annotations

import numpy as np
import pytest

from conftest import errors

pytest.importorskip("napari")
pytest.importorskip("qtpy")

pytestmark = pytest.mark.gui



@pytest.fixture
def widget(make_napari_viewer, tiny_cascade):
    """A viewer with the widget docked and the tiny cascade chosen: 128 px, 2 steps."""
    viewer = make_napari_viewer()
    return viewer, _dock(viewer, tiny_cascade, resolution=128)


def _dock(viewer, model, *, resolution: int, steps: int = 2):
    """Dock the widget in ``viewer`` with ``model`` chosen, on the CPU."""
    from napari_zfdiffusion.widgets.generate import GenerateSlicesWidget

    w = GenerateSlicesWidget(viewer)
    viewer.window.add_dock_widget(w, name="Generate slices")
    w.model_folder.value = model
    w.device.value = "cpu"
    w.resolution.value = resolution
    w.steps.value = w.sr_steps.value = steps
    return w


def test_widget_defaults_follow_the_model(widget, tiny_cascade):
    viewer, w = widget
    assert w.model.value == str(tiny_cascade)
    assert (w.depth.min, w.depth.max) == (0, 2)
    assert list(w.resolution.choices) == [64, 128, 256, 512]
    assert w.guidance.value == 3.0 and w.sampler.value == "dpmsolver++"
    w.depth.value = 2
    assert w.depth_meaning.value and w.depth_meaning.value == w._cascade.depth_label(2)
    assert w.generate_button.enabled and not w.cancel_button.enabled
    seeds = [w.new_seed() for _ in range(5)]
    assert len(set(seeds)) > 1 and all(0 <= s < 2**31 for s in seeds) and w.seed.value == seeds[-1]


def test_the_resolution_starts_where_a_cpu_finishes_in_seconds(widget, monkeypatch):
    """128 px on a CPU, 512 on a GPU, from the resolved device; the line under the device says which."""
    import napari_zfdiffusion.widgets._jobs as jobs

    _, w = widget
    w.device.value = "auto"  # this machine: a CPU
    assert w.resolution.value == 128 and "CPU" in w.device_info.value and w.device_info.value.startswith("auto")
    monkeypatch.setattr(jobs, "is_gpu", lambda choice: True)
    assert w.resolution_default([64, 128, 256, 512]) == 512 and w.resolution_default([64, 128]) == 128


def test_generate_adds_a_layer_with_provenance(widget, notes):
    viewer, w = widget
    w.depth.value = 2
    w.seed.value = 0
    w.n_samples.value = 2
    w.generate_button.clicked.emit()
    assert w._worker is not None
    assert not w.generate_button.enabled and w.cancel_button.enabled  # usable while running
    assert w.wait(60)
    assert errors(notes) == []
    layer = viewer.layers["tiny-cascade d2 128px s0-1"]  # model, depth, resolution, seeds
    assert w.status.value == "added 'tiny-cascade d2 128px s0-1'"
    assert layer.data.shape == (2, 128, 128) and layer.data.dtype == np.float32
    assert 0 <= layer.data.min() and layer.data.max() <= 1
    lo, hi = layer.contrast_limits  # from the data, not a fixed (0, 1)
    assert np.percentile(layer.data, 0.1) == pytest.approx(lo, abs=1e-4)
    assert np.percentile(layer.data, 99.9) == pytest.approx(hi, abs=1e-4)
    prov = layer.metadata["zfdiffusion"]
    assert prov["depth"] == 2 and prov["seed"] == 0 and prov["steps"] == 2 and prov["resolution"] == 128
    assert prov["stages"] == ["base", "sr128"] and prov["sampler"] == "dpmsolver++"
    assert w.last_progress is not None and w.last_progress.stage == "sr128"
    assert w.generate_button.enabled and not w.cancel_button.enabled
    assert w.progress_bar.value == w.progress_bar.max


def test_names_are_unique_and_the_status_names_the_layer(widget, notes):
    viewer, w = widget
    w.resolution.value = 64
    for _ in range(3):  # the same settings three times
        w.generate(depth=1, seed=4)
        assert w.wait(60)
    names = [layer.name for layer in viewer.layers]
    assert names == ["tiny-cascade d1 64px s4", "tiny-cascade d1 64px s4 2", "tiny-cascade d1 64px s4 3"]
    assert w.status.value == "added 'tiny-cascade d1 64px s4 3'"
    w.generate(depth=0, seed=4)
    assert w.wait(60)
    assert viewer.layers[-1].name == "tiny-cascade d0 64px s4" and errors(notes) == []


def test_progress_says_the_stage_in_words_and_the_time_left(widget, notes):
    """The status names the stage in plain words and, from the second step on, the time left; the
    dock's own progress bar moves with the work (stages weighted by their cost)."""
    _, w = widget
    seen, bars = [], []
    shown = w._on_progress

    def spy(p):
        shown(p)
        seen.append(w.status.value)
        bars.append(w.progress_bar.value)

    w._on_progress = spy
    w.generate(steps=4, sr_steps=4)
    assert w.wait(60) and errors(notes) == []
    assert len(seen) == 8  # 4 steps at 64 px, 4 at 128
    assert seen[0] == "drafting at 64 px (1/4)"  # no estimate from one step
    assert seen[1].startswith("drafting at 64 px (2/4) - about ") and seen[1].endswith(" left")
    assert all(s.startswith("upscaling to 128 px (") and s.endswith(" left") for s in seen[4:])
    assert bars == sorted(bars) and 0 < bars[0] and w.progress_bar.value == w.progress_bar.max
    # the 64 px stage is weighted as the cheaper one: 4 of its steps are less than half of the work
    assert bars[3] < w.progress_bar.max / 2


def test_cancel_stops_within_a_step_and_adds_nothing(widget, notes, qtbot):
    viewer, w = widget
    w.resolution.value = 512
    w.steps.value = 50
    from qtpy.QtCore import Qt

    seen = []  # every step reported, recorded in the worker thread as it happens
    w.generate()
    job = w._job
    job.relay.progress.connect(seen.append, Qt.ConnectionType.DirectConnection)
    qtbot.waitUntil(lambda: w.last_progress is not None, timeout=30000)
    w.cancel_button.clicked.emit()
    at_cancel = len(seen)
    assert job.token.cancelled and not w.cancel_button.enabled
    assert w.wait(30)
    assert len(viewer.layers) == 0
    assert errors(notes) == []
    assert any("cancelled" in m for s, m in notes if s == "info")
    # at most the step in flight finished after Cancel; the run (4 stages x 50 steps) stopped early
    assert 1 <= len(seen) <= at_cancel + 1 < 200
    assert w.status.value == "cancelled" and w.generate_button.enabled


def test_screenshot_after_generating_is_not_blank(make_napari_viewer, tiny_cascade):
    viewer = make_napari_viewer(show=True)
    w = _dock(viewer, tiny_cascade, resolution=64)
    w.generate()
    assert w.wait(60)
    assert len(viewer.layers) == 1
    shot = viewer.screenshot(canvas_only=True)
    assert shot.ndim == 3 and shot.shape[-1] == 4
    assert shot[..., :3].std() > 0


def test_upsample_a_generated_layer_keeps_its_depth(widget, notes):
    viewer, w = widget
    w.resolution.value = 64
    w.depth.value = 1
    w.generate()
    assert w.wait(60)
    src = viewer.layers[-1]
    w.depth.value = 0  # the layer's own depth must win
    w.resolution.value = 128
    viewer.layers.selection.active = src
    w.upsample_button.clicked.emit()
    assert w.wait(60)
    assert errors(notes) == []
    out = viewer.layers[-1]
    assert out.data.shape == (128, 128)  # one sample: a 2D layer
    prov = out.metadata["zfdiffusion"]
    assert prov["operation"] == "upsample" and prov["depth"] == 1 and prov["source"]["depth"] == 1
    assert prov["stages"] == ["sr128"]


def test_upsample_a_plane_of_a_generated_volume_uses_that_planes_depth(widget, notes):
    viewer, w = widget
    vol = np.random.default_rng(0).random((3, 64, 64)).astype(np.float32)
    prov = {"kind": "zfdiffusion.cascade", "operation": "volume", "depths": [0, 1, 2]}
    viewer.add_image(vol, name="volume", metadata={"zfdiffusion": prov})
    viewer.dims.set_current_step(0, 2)
    w.depth.value = 0
    w.resolution.value = 128
    w.upsample_selected()
    assert w.wait(60)
    assert errors(notes) == []
    out = viewer.layers[-1]
    assert out.name == "volume [plane 2] 128px s0"
    assert out.metadata["zfdiffusion"]["depth"] == 2  # the plane's own depth, not the widget's
    assert out.metadata["zfdiffusion"]["source"]["operation"] == "volume"


def test_upsample_a_plane_of_a_real_stack(widget, notes):
    from napari_zfdiffusion._sample_data import cho_stack

    viewer, w = widget
    data, kw, _ = cho_stack()[0]
    viewer.add_image(data[:, :128, :128], name="cho")
    viewer.dims.set_current_step(0, 3)
    w.resolution.value = 256
    w.upsample_selected()
    assert w.wait(60)
    assert errors(notes) == []
    out = viewer.layers[-1]
    assert out.name == "cho [plane 3] 256px s0" and out.data.shape == (256, 256)
    assert out.metadata["zfdiffusion"]["input_shape"] == [128, 128]


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda v: v.add_image(np.zeros((64, 64, 3), np.uint8), rgb=True, name="rgb"), "RGB"),
        (lambda v: v.add_image(np.zeros((3, 64, 80), np.float32), name="wide"), "square"),
        (lambda v: v.add_image(np.zeros((2, 2, 64, 64), np.float32), name="4d"), "2D image"),
        (lambda v: v.add_points(np.zeros((1, 2))), "Image layer"),
    ],
    ids=["rgb", "non-square-3d", "4d", "not-an-image"],
)
def test_bad_layers_give_a_notification(widget, notes, make, expected):
    viewer, w = widget
    make(viewer)
    w.resolution.value = 512
    w.upsample_selected()
    assert w.wait(60)
    msgs = errors(notes)
    assert len(msgs) == 1 and expected in msgs[0], msgs
    assert w.upsample_button.enabled and w.generate_button.enabled
    assert len(viewer.layers) == 1  # nothing added; the viewer lives on


def test_missing_model_and_bad_depth_give_a_notification(widget, notes, tmp_path):
    viewer, w = widget
    w.generate(depth=7)  # the slider cannot go there; the core still answers
    assert w.wait(60)
    assert len(errors(notes)) == 1 and "depth 7 is out of range" in errors(notes)[0]
    notes.clear()
    empty = tmp_path / "not-a-model"
    empty.mkdir()
    w.model_folder.value = empty
    msgs = errors(notes)
    assert len(msgs) == 1 and "not a cascade model folder" in msgs[0]
    assert not w.generate_button.enabled
    w.generate()  # pressing Generate on a broken model still answers, never crashes
    assert w.wait(60)
    assert len(viewer.layers) == 0


def test_sample_data_is_the_real_cho_stack():
    from napari_zfdiffusion._sample_data import cho_stack

    [(data, kw, kind)] = cho_stack()
    assert kind == "image" and data.shape == (5, 256, 256) and data.dtype == np.uint8
    assert data.std() > 0 and "Cell Tracking Challenge" in kw["metadata"]["credit"]


def test_sample_data_through_napari(make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.open_sample("napari-zfdiffusion", "cho_stack")
    assert viewer.layers[-1].data.shape == (5, 256, 256)


def test_writer_stores_provenance(tmp_path):
    from napari_zfdiffusion._writer import write_image_tiff
    from napari_zfdiffusion.core.io import read_provenance

    import tifffile

    data = np.random.default_rng(0).random((2, 64, 64)).astype(np.float32)
    prov = {"kind": "zfdiffusion.cascade", "model": "tiny", "seed": 5, "depth": 1}
    out = write_image_tiff(str(tmp_path / "gen.tif"), data, {"name": "depth 1 seed 5", "metadata": {"zfdiffusion": prov}})
    assert out == [str(tmp_path / "gen.tif")]
    np.testing.assert_array_equal(tifffile.imread(out[0]), data)
    back = read_provenance(out[0])
    assert back["seed"] == 5 and back["depth"] == 1 and back["model"] == "tiny"
    assert not list(tmp_path.glob(".*part"))  # no temporary file left behind


def test_writer_through_napari(make_napari_viewer, tmp_path):
    viewer = make_napari_viewer()
    layer = viewer.add_image(np.ones((8, 8), np.float32), name="x", metadata={"zfdiffusion": {"seed": 3}})
    from napari_zfdiffusion.core.io import read_provenance

    paths = layer.save(str(tmp_path / "x.tif"), plugin="napari-zfdiffusion")
    assert paths == [str(tmp_path / "x.tif")]
    assert read_provenance(paths[0])["seed"] == 3


def test_the_bundled_demo_is_chosen_when_the_widget_opens(make_napari_viewer, notes):
    from napari_zfdiffusion.widgets.generate import GenerateSlicesWidget

    w = GenerateSlicesWidget(make_napari_viewer())
    assert w.model.value is not None and w.model.value.endswith("zf-cascade-demo")
    assert w.generate_button.enabled and [m for s, m in notes if s == "error"] == []


def test_all_resolutions_of_one_field_overlay(make_napari_viewer, tmp_path):
    """With the training field in the card, a 64 and a 256 px slice cover the same world extent."""
    import json

    from conftest import make_tiny_cascade

    model = make_tiny_cascade(tmp_path / "geo", stages=("base", "sr128", "sr256"))
    card = json.loads((model / "cascade.json").read_text())
    (model / "cascade.json").write_text(json.dumps({**card, "field_um": 90.0, "z_step_um": 1.0}))
    viewer = make_napari_viewer()
    w = _dock(viewer, model, resolution=64, steps=1)
    for res in (64, 256):
        w.generate(resolution=res)
        assert w.wait(60)
    small, big = viewer.layers[-2], viewer.layers[-1]
    assert small.data.shape == (64, 64) and big.data.shape == (256, 256)
    assert tuple(small.scale) == (90 / 64, 90 / 64) and tuple(big.scale) == (90 / 256, 90 / 256)
    for layer, n in ((small, 64), (big, 256)):  # the outer edges of the first and last pixels: 0 and 90 um
        np.testing.assert_allclose(layer.data_to_world((-0.5, -0.5)), (0, 0), atol=1e-9)
        np.testing.assert_allclose(layer.data_to_world((n - 0.5, n - 0.5)), (90, 90))
