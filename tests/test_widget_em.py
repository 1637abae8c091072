"""The Generate EM patches dock widget and the EM sample data, in a real napari viewer.

Runs under Xvfb (pytest-xvfb starts it) with the normal xcb platform, so the canvas has OpenGL.
The models are the tiny random ones from conftest (32x32 patches): right shapes, meaningless images.
"""

from __future__ import annotations

import numpy as np
import pytest

from conftest import errors

pytest.importorskip("napari")
pytest.importorskip("qtpy")

pytestmark = pytest.mark.gui



def _dock(viewer, model, *, steps: int = 2, n: int = 2):
    """Dock the widget in ``viewer`` with ``model`` (a folder) chosen, on the CPU."""
    from napari_zfdiffusion.widgets.em import GenerateEMWidget

    w = GenerateEMWidget(viewer)
    viewer.window.add_dock_widget(w, name="Generate EM patches")
    w.device.value = "cpu"
    w.model_folder.value = model
    w.steps.value = steps
    w.n_patches.value = n
    return w


@pytest.fixture
def unpaired(make_napari_viewer, tiny_latent):
    viewer = make_napari_viewer()
    return viewer, _dock(viewer, tiny_latent)


@pytest.fixture
def paired(make_napari_viewer, tiny_paired):
    viewer = make_napari_viewer()
    return viewer, _dock(viewer, tiny_paired)


def test_controls_follow_the_model(unpaired, tiny_paired, notes):
    _, w = unpaired
    assert w.model.value == str(w.model_folder.value)
    assert (w.n_patches.min, w.n_patches.max, w.sampler.value) == (1, 256, "dpmsolver++")
    assert w.generate_button.enabled and not w.cancel_button.enabled and w.roundtrip_button.enabled
    assert not w.threshold.enabled and not w.min_size.enabled  # no masks from an unpaired model
    assert "32x32 patches" in w.info.value and "masks" not in w.info.value
    w.model_folder.value = tiny_paired
    assert w.threshold.enabled and w.min_size.enabled and "with masks" in w.info.value
    seeds = [w.new_seed() for _ in range(5)]
    assert len(set(seeds)) > 1 and w.seed.value == seeds[-1]
    assert errors(notes) == []
    p = w.params()
    assert p == {"n": 2, "seed": seeds[-1], "sampler": "dpmsolver++", "steps": 2, "threshold": 0.5, "min_size": 16}


def test_generate_unpaired_adds_an_image_layer(unpaired, notes):
    from napari_zfdiffusion.widgets._layers import data_limits
    viewer, w = unpaired
    w.seed.value = 3
    w.generate_button.clicked.emit()
    assert w._worker is not None and not w.generate_button.enabled and w.cancel_button.enabled
    assert w.wait(120)
    assert errors(notes) == []
    # what the model makes (its name without -latent), the seeds, the model
    assert [layer.name for layer in viewer.layers] == ["tiny patches s3-4 (tiny-latent)"]
    assert w.status.value == "added 'tiny patches s3-4 (tiny-latent)' (2 patches)"
    layer = viewer.layers[0]
    assert layer.data.shape == (2, 32, 32) and layer.data.dtype == np.float32
    assert 0 <= layer.data.min() and layer.data.max() <= 1
    assert tuple(layer.contrast_limits) == pytest.approx(data_limits(layer.data))
    prov = layer.metadata["zfdiffusion"]
    assert prov["seed"] == 3 and prov["seeds"] == [3, 4] and prov["steps"] == 2 and not prov["paired"]
    assert w.last_progress is not None and w.last_progress.stage == "decode"
    assert w.generate_button.enabled and not w.cancel_button.enabled
    assert "tiny test model" in w.info.value  # the loaded model's full description


def test_generate_paired_adds_aligned_labels(paired, notes):
    viewer, w = paired
    w.generate(n=3, seed=1)
    assert w.wait(120)
    assert errors(notes) == []
    image, prob, labels = (viewer.layers["tiny-paired patches s1-3"], viewer.layers["tiny-paired mask probability s1-3"],
                           viewer.layers["tiny-paired labels s1-3"])
    assert image.data.shape == prob.data.shape == labels.data.shape == (3, 32, 32)
    assert labels.data.dtype == np.int32 and not prob.visible
    assert tuple(labels.scale) == tuple(image.scale) and tuple(labels.translate) == tuple(image.translate)
    assert labels.metadata["zfdiffusion"]["mask_threshold"] == 0.5
    assert w.layer.value is image  # encode / decode is ready for the generated patches
    w.generate(n=3, seed=1)  # the same again: new names, the status names the real one
    assert w.wait(120)
    assert [layer.name for layer in viewer.layers][3:] == [
        "tiny-paired patches s1-3 2", "tiny-paired mask probability s1-3 2", "tiny-paired labels s1-3 2"]
    assert w.status.value.startswith("added 'tiny-paired patches s1-3 2' (3 patches, ")


def test_names_say_what_the_model_makes():
    from napari_zfdiffusion.widgets.em import seeds_text, subject

    assert subject("nuclei-ldm-demo") == "nuclei" and subject("em-ldm-demo") == "EM"
    assert subject("mito_latent") == "mito" and subject("ldm-demo") == "generated"
    assert subject("tiny-paired") == "tiny-paired"
    assert seeds_text(0, 1) == "s0" and seeds_text(5, 4) == "s5-8"


def test_paired_without_probability_layer(paired):
    viewer, w = paired
    w.keep_probability.value = False
    w.generate(n=1)
    assert w.wait(120)
    assert [type(layer).__name__ for layer in viewer.layers] == ["Image", "Labels"]


def test_cancel_stops_within_a_step_and_adds_nothing(unpaired, notes, qtbot):
    from qtpy.QtCore import Qt

    viewer, w = unpaired
    seen = []  # every step reported, recorded in the worker thread as it happens
    w.generate(steps=1000, n=1)
    job = w._job
    job.relay.progress.connect(seen.append, Qt.ConnectionType.DirectConnection)
    qtbot.waitUntil(lambda: w.last_progress is not None, timeout=60000)
    w.cancel_button.clicked.emit()
    at_cancel = len(seen)
    assert job.token.cancelled and not w.cancel_button.enabled
    assert w.wait(60)
    assert len(viewer.layers) == 0
    assert errors(notes) == []
    assert any("cancelled" in m for s, m in notes if s == "info")
    assert 1 <= len(seen) <= at_cancel + 1 < 1000  # at most the step in flight finished after Cancel
    assert w.status.value == "cancelled" and w.generate_button.enabled


def test_bad_model_folder_gives_a_notification(unpaired, tiny_cascade, tmp_path, notes):
    viewer, w = unpaired
    empty = tmp_path / "not-a-model"
    empty.mkdir()
    w.model_folder.value = empty
    msgs = errors(notes)
    assert len(msgs) == 1 and "not a patch model folder" in msgs[0]
    assert not w.generate_button.enabled and not w.roundtrip_button.enabled
    w.generate()  # pressing Generate on a broken model still answers, never crashes
    assert w.wait(60)
    assert len(errors(notes)) == 2 and "not a patch model folder" in errors(notes)[1]
    notes.clear()
    w.model_folder.value = tiny_cascade  # a model of the wrong kind
    assert len(errors(notes)) == 1 and "Generate slices" in errors(notes)[0]
    assert len(viewer.layers) == 0


def test_broken_weights_give_a_notification(make_napari_viewer, tiny_latent, tmp_path, notes):
    import shutil

    broken = tmp_path / "broken-latent"
    shutil.copytree(tiny_latent, broken)
    (broken / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"not weights")
    viewer = make_napari_viewer()
    w = _dock(viewer, broken)
    assert w.generate_button.enabled  # only the card is read when choosing
    w.generate()
    assert w.wait(60)
    msgs = errors(notes)
    assert len(msgs) == 1 and "broken-latent" in msgs[0] and len(viewer.layers) == 0
    assert w.status.value == "failed" and w.generate_button.enabled


def test_encode_decode_a_plane_of_a_stack(unpaired, notes):
    viewer, w = unpaired
    rng = np.random.default_rng(0)
    src = viewer.add_image((rng.random((3, 40, 36)) * 255).astype(np.uint8), name="stack", scale=(1, 2, 2))
    other = viewer.add_image(np.zeros((8, 8), np.float32), name="other")
    viewer.dims.set_current_step(0, 2)
    assert w.layer.value is other  # the layer selected in the layer list (napari selects a new layer)
    viewer.layers.selection.active = src
    assert w.layer.value is src
    w.roundtrip_button.clicked.emit()
    assert w.wait(60)
    assert errors(notes) == []
    out = viewer.layers["stack [plane 2] (autoencoded, tiny-latent)"]
    diff = viewer.layers["stack [plane 2] (difference, tiny-latent)"]
    # just above its source: the difference (hidden), then the reconstruction
    assert viewer.layers.index(diff) == viewer.layers.index(src) + 1 and not diff.visible
    assert viewer.layers.index(out) == viewer.layers.index(src) + 2
    assert w.layer.value is src
    assert out.data.shape == diff.data.shape == (40, 36) and out.data.dtype == np.float32
    assert tuple(out.scale) == tuple(diff.scale) == (2, 2)
    prov = out.metadata["zfdiffusion"]
    assert prov["plane"] == 2 and prov["source_layer"] == "stack" and prov["normalised"]
    # in the source's intensity range (its 1st and 99.8th percentiles, as the model's normalisation) and
    # shown with the source's contrast limits; the difference is from the source as the model saw it
    plane = src.data[2].astype(np.float32)
    lo, hi = prov["intensity_range"]
    assert (lo, hi) == pytest.approx(tuple(np.percentile(plane, [1.0, 99.8])))
    assert lo - 1e-3 <= out.data.min() and out.data.max() <= hi + 1e-3 and out.data.max() > 1
    assert tuple(out.contrast_limits) == tuple(src.contrast_limits)
    np.testing.assert_allclose(diff.data, out.data - np.clip(plane, lo, hi), atol=1e-3)
    assert diff.contrast_limits[0] == -diff.contrast_limits[1] and diff.colormap.name == "PiYG"
    for key in ("MSE", "PSNR", "SSIM"):
        assert key in w.status.value
    assert set(w.last_figures) >= {"mse", "psnr", "ssim", "latent_shape"}


def test_encode_decode_a_generated_layer_with_an_autoencoder_only_model(make_napari_viewer, tiny_latent,
                                                                       tmp_path, notes):
    import shutil

    vae_only = tmp_path / "tiny-vae"
    shutil.copytree(tiny_latent / "vae", vae_only / "vae")
    from napari_zfdiffusion.core.io import write_json
    from napari_zfdiffusion.core.store import read_json

    card = read_json(tiny_latent / "model.json")
    card["kind"] = "vae"
    write_json(vae_only / "model.json", card)
    viewer = make_napari_viewer()
    w = _dock(viewer, vae_only)
    assert not w.generate_button.enabled and w.roundtrip_button.enabled and "encode / decode only" in w.info.value
    layer = viewer.add_image(np.random.default_rng(1).random((32, 32)).astype(np.float32), name="patch",
                             metadata={"zfdiffusion": {"kind": "zfdiffusion.latent"}})
    w.roundtrip(layer)
    assert w.wait(60)
    assert errors(notes) == []
    out = viewer.layers["patch (autoencoded, tiny-vae)"]
    assert out.data.shape == (32, 32) and out.metadata["zfdiffusion"]["normalised"] is False
    assert out.metadata["zfdiffusion"]["intensity_range"] == [0.0, 1.0]  # a layer of ours: [0, 1] as it is
    w.generate()  # refused with a message: an autoencoder makes no patches
    assert len(errors(notes)) == 1 and "autoencoder only" in errors(notes)[0]


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda v: v.add_image(np.zeros((64, 64, 3), np.uint8), rgb=True, name="rgb"), "RGB"),
        (lambda v: v.add_image(np.zeros((2, 2, 64, 64), np.float32), name="4d"), "2D image"),
        (lambda v: None, "choose an Image layer"),
    ],
    ids=["rgb", "4d", "no-layer"],
)
def test_bad_layers_give_a_notification(unpaired, notes, make, expected):
    viewer, w = unpaired
    make(viewer)
    n = len(viewer.layers)
    w.roundtrip()
    assert w.wait(60)
    msgs = errors(notes)
    assert len(msgs) == 1 and expected in msgs[0], msgs
    assert len(viewer.layers) == n and w.roundtrip_button.enabled


def test_screenshot_with_the_widget_is_not_blank(make_napari_viewer, tiny_paired):
    viewer = make_napari_viewer(show=True)
    w = _dock(viewer, tiny_paired)
    w.generate()
    assert w.wait(120)
    assert len(viewer.layers) == 3
    shot = viewer.screenshot(canvas_only=False)
    assert shot.ndim == 3 and shot.shape[-1] == 4
    assert shot[..., :3].std() > 0
    canvas = viewer.screenshot(canvas_only=True)
    assert canvas[..., :3].std() > 0


def test_em_sample_data_is_the_real_islet_crop():
    from napari_zfdiffusion._sample_data import em_islet

    [(data, kw, kind)] = em_islet()
    assert kind == "image" and data.shape == (512, 512) and data.dtype == np.uint8
    assert data.std() > 10 and "Arrojo e Drigo" in kw["metadata"]["credit"]
    assert kw["metadata"]["pixel_size_nm"] == 5.0


def test_em_sample_data_through_napari(make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.open_sample("napari-zfdiffusion", "em_islet")
    layer = viewer.layers[-1]
    assert layer.data.shape == (512, 512) and layer.metadata["pixel_size_nm"] == 5.0


def test_widget_through_napari(make_napari_viewer):
    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget("napari-zfdiffusion", "Generate EM patches")
    from napari_zfdiffusion.widgets.em import GenerateEMWidget

    assert isinstance(widget, GenerateEMWidget)


def test_progress_reaches_the_widget_in_order_and_before_the_end(make_napari_viewer):
    """napari's progress bar re-enters the Qt event loop (processEvents) on every change, so queued
    steps, the result and the end arrive inside a bar update. A fast job (many steps queued) must
    neither overflow the stack nor reorder them: the widget sees every step in the order sent,
    then the result, then the end."""
    import time

    from qtpy.QtCore import QCoreApplication

    from napari_zfdiffusion.core.progress import Progress
    from napari_zfdiffusion.widgets._jobs import start_job

    make_napari_viewer()  # its activity dialog holds the bars that call processEvents
    sent = [Progress("sample" if i < 1500 else "decode", i % 1500 + 1, 1500, i // 1500, 2) for i in range(2000)]
    events = []

    def fn(callback, token):
        for p in sent:
            callback(p)
        return "result"

    for _ in range(3):
        events.clear()
        start_job(fn, what="test", on_progress=events.append, on_result=events.append, on_error=events.append,
                  on_cancel=lambda: events.append("cancel"), on_finish=lambda: events.append("end"))
        deadline = time.monotonic() + 60
        while events[-1:] != ["end"] and time.monotonic() < deadline:
            QCoreApplication.processEvents()
        assert events == [*sent, "result", "end"]
