"""The Segment dock widget and the "Segment with zfdiffusion" layer command, in a real napari viewer.

Runs under Xvfb (pytest-xvfb starts it) with the normal xcb platform, so the canvas has OpenGL.
The model is conftest's tiny U-Net trained for seconds on blobs: it finds bright discs.
"""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from conftest import errors, make_blobs

pytest.importorskip("napari")
pytest.importorskip("qtpy")

pytestmark = pytest.mark.gui

COMMAND = "napari-zfdiffusion.segment_layer"


def blob_images(tmp_path, n: int = 1, shape=(96, 128), seed: int = 1) -> np.ndarray:
    """(n, Y, X) uint8 images of bright discs (conftest.make_blobs), and their true labels."""
    imgs, masks = make_blobs(tmp_path / f"blobs-{seed}", n=n, shape=shape, seed=seed)
    return (np.stack([tifffile.imread(p) for p in sorted(imgs.glob("*.tif"))]),
            np.stack([tifffile.imread(p) for p in sorted(masks.glob("*.tif"))]))


def _dock(viewer, model=None):
    """Dock the widget in ``viewer`` with ``model`` (a folder) chosen, on the CPU."""
    from napari_zfdiffusion.widgets.segment import SegmentWidget

    w = SegmentWidget(viewer)
    viewer.window.add_dock_widget(w, name="Segment")
    w.device.value = "cpu"
    if model is not None:
        w.model_folder.value = model
    return w


@pytest.fixture
def widget(make_napari_viewer, tiny_segmenter):
    viewer = make_napari_viewer()
    return viewer, _dock(viewer, tiny_segmenter)


def test_controls_follow_the_model_card(widget, tiny_segmenter, notes):
    _, w = widget
    assert w.model.value == str(tiny_segmenter)
    # the tiny model's card: tile 64, overlap 16, threshold 0.5, min size 16, with an interior output
    assert (w.tile.value, w.overlap.value, w.threshold.value, w.min_size.value) == (64, 16, 0.5, 16)
    assert w.use_interior.enabled and w.use_interior.value and not w.add_probability.value
    assert "U-Net (foreground, center)" in w.info.value
    assert w.segment_button.enabled and not w.cancel_button.enabled
    assert w.params() == {"tile": 64, "overlap": 16, "threshold": 0.5, "min_size": 16, "use_interior": True,
                          "diameter": None, "stack": "planes"}
    assert errors(notes) == []


def test_the_demo_model_comes_first_and_is_chosen(make_napari_viewer, tiny_segmenter, tiny_paired, notes):
    import shutil

    from napari_zfdiffusion.core.store import user_models_dir
    from napari_zfdiffusion.widgets.segment import DEMO_MODEL, model_choices

    for name in ("aaa-unet", DEMO_MODEL):  # user models (the real demo is bundled; the order is the same)
        shutil.copytree(tiny_segmenter, user_models_dir() / name)
    shutil.copytree(tiny_paired, user_models_dir() / "a-latent")  # another kind: not listed
    choices = model_choices()
    labels = [label for label, _ in choices]
    assert labels[0].startswith(f"{DEMO_MODEL} (") and "a-latent (user)" not in labels
    assert [v for v in labels if v.endswith("(user)")] == [f"{DEMO_MODEL} (user)", "aaa-unet (user)"]
    viewer = make_napari_viewer()
    w = _dock(viewer)
    assert w.model.value == choices[0][1] and "model not usable" not in w.info.value
    assert errors(notes) == []


def test_no_model_installed_says_what_to_do(make_napari_viewer, notes, monkeypatch):
    from napari_zfdiffusion.widgets import segment

    monkeypatch.setattr(segment, "model_choices", list)  # as if nuclei-unet-demo were not bundled
    viewer = make_napari_viewer()
    w = _dock(viewer)
    assert w.model.value is None and w.info.value.startswith("no model")
    assert "no model" in w.info.value and not w.segment_button.enabled
    viewer.add_image(np.zeros((32, 32), np.float32), name="img")
    w.segment()
    msgs = errors(notes)
    assert len(msgs) == 1 and "train unet" in msgs[0]
    assert len(viewer.layers) == 1


def test_segment_a_2d_layer(widget, tmp_path, notes):
    viewer, w = widget
    img, truth = blob_images(tmp_path)
    src = viewer.add_image(img[0], name="cells", scale=(0.5, 0.25), translate=(10, 20))
    assert w.layer.value is src  # follows the layer selected in the layer list
    w.segment_button.clicked.emit()
    assert w._worker is not None and not w.segment_button.enabled and w.cancel_button.enabled
    assert w.wait(120)
    assert errors(notes) == []
    assert [layer.name for layer in viewer.layers] == ["cells", "cells labels"]
    labels = viewer.layers["cells labels"]
    assert labels.data.shape == img[0].shape and labels.data.dtype == np.int32
    n = int(labels.data.max())
    assert n >= 3  # six discs (some may touch or overlap)
    assert (labels.data > 0)[truth[0] > 0].mean() > 0.7  # the discs are found ...
    assert (labels.data > 0)[truth[0] == 0].mean() < 0.1  # ... and little else
    assert tuple(labels.scale) == (0.5, 0.25) and tuple(labels.translate) == (10, 20)
    prov = labels.metadata["zfdiffusion"]
    assert prov["kind"] == "zfdiffusion-segmentation" and prov["source_layer"] == "cells"
    assert prov["objects"] == n and prov["tile"] == 64 and prov["labels_from"] == "watershed from centers"
    assert w.last_progress is not None and w.last_progress.stage == "tiles"
    assert w.last_progress.step == w.last_progress.total
    assert f"{n} objects" in w.status.value
    assert w.layer.value is src and w.segment_button.enabled and not w.cancel_button.enabled


def test_a_new_run_replaces_the_previous_result(widget, tmp_path, notes):
    """"replace previous result" (on by default): the same source segmented again gives one labels (and
    probability) layer, not "labels [1]"; off, the new result is added beside, with a unique name."""
    viewer, w = widget
    img, _ = blob_images(tmp_path)
    src = viewer.add_image(img[0], name="cells")
    other = viewer.add_image(img[0][::-1].copy(), name="other")
    assert w.replace.value
    w.add_probability.value = True
    w.segment(src)
    assert w.wait(120)
    first = viewer.layers["cells labels"]
    w.threshold.value = 0.7
    w.segment(src)
    assert w.wait(120)
    assert [layer.name for layer in viewer.layers] == ["cells", "cells probability", "cells labels", "other"]
    assert viewer.layers["cells labels"] is not first
    assert viewer.layers["cells labels"].metadata["zfdiffusion"]["threshold"] == 0.7
    assert w.status.value.startswith("added 'cells labels' (replacing the previous result): ")
    w.segment(other)  # another source: its own result, the first source's stays
    assert w.wait(120)
    assert {"cells labels", "other labels"} <= {layer.name for layer in viewer.layers}
    w.replace.value = False
    w.add_probability.value = False
    w.segment(src)
    assert w.wait(120)
    names = [layer.name for layer in viewer.layers]  # the newest just above the source
    assert names[:4] == ["cells", "cells labels 2", "cells probability", "cells labels"]
    assert w.status.value.startswith("added 'cells labels 2': ") and errors(notes) == []


def test_segment_a_stack_with_the_probability_map(widget, tmp_path, notes):
    viewer, w = widget
    stack, _ = blob_images(tmp_path, n=3, shape=(80, 72), seed=2)
    src = viewer.add_image(stack, name="stack", scale=(2.0, 1.0, 1.0))
    viewer.add_image(np.zeros((16, 16), np.float32), name="other")  # above it in the list
    w.add_probability.value = True
    w.use_interior.value = False
    viewer.layers.selection.active = src
    assert w.stack.enabled and w.stack.value == "volume"  # a stack with a z scale: a volume by default
    w.stack.value = "planes"  # three unrelated images
    w.segment(src, min_size=4)
    assert w.wait(120)
    assert errors(notes) == []
    assert [layer.name for layer in viewer.layers] == ["stack", "stack probability", "stack labels", "other"]
    prob, labels = viewer.layers["stack probability"], viewer.layers["stack labels"]
    assert prob.data.shape == labels.data.shape == stack.shape
    assert prob.data.dtype == np.float32 and 0 <= prob.data.min() and prob.data.max() <= 1
    assert not prob.visible and prob.blending == "additive" and prob.colormap.name == "magma"
    assert tuple(labels.scale) == tuple(prob.scale) == (2.0, 1.0, 1.0)
    for k in range(3):  # objects on every plane, numbered across the stack
        ids = set(np.unique(labels.data[k])) - {0}
        assert ids and (k == 0 or min(ids) > max(set(np.unique(labels.data[k - 1])) - {0}))
    prov = labels.metadata["zfdiffusion"]
    assert prov["min_size"] == 4 and prov["labels_from"] == "connected components"
    assert prov["input_shape"] == [3, 80, 72]
    assert "3 planes" in w.status.value
    assert viewer.layers.selection.active is labels and w.layer.value is src


def test_a_zstack_becomes_3d_objects_and_a_time_series_planes(widget, tmp_path, notes):
    viewer, w = widget
    img, _ = blob_images(tmp_path, n=1, shape=(80, 72), seed=3)
    z = viewer.add_image(np.concatenate([img] * 3), name="zstack")  # no z scale: a note says how to set it
    assert w.layer.value is z and w.stack.enabled and w.stack.value == "volume"
    w.segment(z)
    assert w.wait(120)
    assert errors(notes) == []
    lab = viewer.layers["zstack labels"].data
    assert np.array_equal(lab[0], lab[2]) and lab.max() == len(np.unique(lab[0])) - 1  # one label per 3D object
    assert any("set the z scale" in str(n) for n in notes)
    assert w.min_volume_fraction.enabled and w.params()["min_volume_fraction"] == 0.1
    assert viewer.layers["zstack labels"].metadata["zfdiffusion"]["min_volume_fraction"] == 0.1
    assert "--min-volume-fraction" not in w.cli_command()  # the default: not spelled out
    w.min_volume_fraction.value = 0.0
    assert "--stack volume --min-volume-fraction 0" in w.cli_command()
    t = viewer.add_image(np.concatenate([img] * 2), name="movie", axis_labels=("t", "y", "x"))
    viewer.layers.selection.active = t
    assert w.layer.value is t and w.stack.value == "planes"  # from the layer's axis label
    assert not w.min_volume_fraction.enabled and "min_volume_fraction" not in w.params()  # volumes only
    w.segment(t)
    assert w.wait(120)
    lab = viewer.layers["movie labels"].data
    assert lab.max() == 2 * (len(np.unique(lab[0])) - 1)  # time points labelled apart
    flat = viewer.add_image(img[0], name="flat")
    viewer.layers.selection.active = flat
    assert not w.stack.enabled  # a single plane: nothing to ask


def test_the_object_size_is_a_control(widget, tmp_path, notes):
    viewer, w = widget
    img, _ = blob_images(tmp_path, n=1, shape=(96, 96), seed=4)
    src = viewer.add_image(img[0], name="img")
    assert "objects of about" in w.info.value  # the model's training size, in 'about'
    w.auto_diameter.value = True
    assert not w.diameter.enabled
    w.segment(src)
    assert w.wait(120)
    prov = viewer.layers["img labels"].metadata["zfdiffusion"]
    assert "rescaled_by" in prov and prov["model_diameter_px"] > 0
    w.auto_diameter.value = False
    w.diameter.value = 10_000  # larger than the image: a notification, no layer
    w.segment(src)
    w.wait(60)
    assert any("larger than the image" in e for e in errors(notes))


def test_source_layer_deleted_while_running(widget, tmp_path, notes):
    viewer, w = widget
    img, _ = blob_images(tmp_path)
    src = viewer.add_image(img[0], name="cells")
    w.segment()
    viewer.layers.remove(src)  # the job has the data; its result still arrives
    assert w.wait(60)
    assert errors(notes) == []
    assert [layer.name for layer in viewer.layers] == ["cells labels"] and w.layer.value is None


def test_a_constant_plane_gives_a_notice(widget, notes):
    viewer, w = widget
    w.segment(viewer.add_image(np.full((48, 48), 7, np.uint16), name="flat"))
    assert w.wait(60)
    assert errors(notes) == []
    assert any("constant" in m for s, m in notes if s == "info")
    assert viewer.layers["flat labels"].data.max() == 0


def test_cancel_stops_within_a_batch_of_tiles_and_adds_nothing(widget, notes, qtbot):
    from qtpy.QtCore import Qt

    viewer, w = widget
    rng = np.random.default_rng(0)
    viewer.add_image((rng.random((20, 512, 512)) * 255).astype(np.uint8), name="big")
    seen = []  # every batch of tiles reported, recorded in the worker thread as it happens
    w.segment()
    job = w._job
    job.relay.progress.connect(seen.append, Qt.ConnectionType.DirectConnection)
    qtbot.waitUntil(lambda: w.last_progress is not None, timeout=60000)
    w.cancel_button.clicked.emit()
    at_cancel = len(seen)
    assert job.token.cancelled and not w.cancel_button.enabled
    assert w.wait(60)
    total = w.last_progress.total
    assert len(viewer.layers) == 1
    assert errors(notes) == []
    assert any("cancelled" in m for s, m in notes if s == "info")
    assert 1 <= len(seen) <= at_cancel + 1 and seen[-1].step < total  # the batch in flight, no more
    assert w.status.value == "cancelled" and w.segment_button.enabled


@pytest.mark.parametrize("which", ["cascade", "latent", "empty"])
def test_a_folder_of_another_kind_gives_a_notification(widget, tiny_cascade, tiny_paired, tmp_path, notes, which):
    viewer, w = widget
    viewer.add_image(np.zeros((32, 32), np.float32), name="img")
    folder = {"cascade": tiny_cascade, "latent": tiny_paired, "empty": tmp_path / "not-a-model"}[which]
    folder.mkdir(exist_ok=True)
    w.model_folder.value = folder
    expected = {"cascade": "Generate slices", "latent": "Generate EM patches", "empty": "not a model folder"}[which]
    msgs = errors(notes)
    assert len(msgs) == 1 and expected in msgs[0] and "train unet" in msgs[0], msgs
    assert not w.segment_button.enabled and w.info.value == "model not usable"
    w.segment()  # pressing Segment anyway answers with the same reason, never crashes
    assert w.wait(60)
    assert len(errors(notes)) == 2 and errors(notes)[1] == msgs[0]
    assert [layer.name for layer in viewer.layers] == ["img"]


def test_broken_weights_give_a_notification(make_napari_viewer, tiny_segmenter, tmp_path, notes):
    import shutil

    broken = tmp_path / "broken-unet"
    shutil.copytree(tiny_segmenter, broken)
    (broken / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"not weights")
    viewer = make_napari_viewer()
    w = _dock(viewer, broken)
    viewer.add_image(np.zeros((32, 32), np.float32), name="img")
    assert w.segment_button.enabled  # only the card is read when choosing
    w.segment()
    assert w.wait(60)
    msgs = errors(notes)
    assert len(msgs) == 1 and "broken-unet" in msgs[0] and len(viewer.layers) == 1
    assert w.status.value == "failed" and w.segment_button.enabled


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda v: v.add_image(np.zeros((2, 2, 64, 64), np.float32), name="4d"), "4 dimensions"),
        (lambda v: v.add_image(np.full((64, 64), np.nan, np.float32), name="nan"), "NaN"),
        (lambda v: v.add_labels(np.zeros((64, 64), np.int32), name="labels"), "choose an Image layer"),
        (lambda v: None, "choose an Image layer"),
    ],
    ids=["4d", "nan", "labels-layer-only", "no-layer"],
)
def test_bad_layers_give_a_notification(widget, notes, make, expected):
    viewer, w = widget
    make(viewer)
    n = len(viewer.layers)
    w.segment()
    assert w.wait(60)
    msgs = errors(notes)
    assert len(msgs) == 1 and expected in msgs[0], msgs
    assert len(viewer.layers) == n and w.segment_button.enabled and w.status.value in ("", "failed")


def test_rgb_layer_is_made_grayscale_with_a_notice(widget, tmp_path, notes):
    viewer, w = widget
    img, _ = blob_images(tmp_path, seed=3)
    rgb = np.stack([img[0]] * 3, axis=-1)
    w.segment(viewer.add_image(rgb, name="rgb", rgb=True))
    assert w.wait(60)
    assert errors(notes) == []
    assert viewer.layers["rgb labels"].data.shape == img[0].shape
    assert any("RGB" in m or "gray" in m for s, m in notes if s == "info")


def test_segment_the_layer_that_the_em_widget_generates(make_napari_viewer, tiny_paired, tiny_segmenter, notes):
    from napari_zfdiffusion.widgets.em import GenerateEMWidget

    viewer = make_napari_viewer()
    em = GenerateEMWidget(viewer)
    viewer.window.add_dock_widget(em, name="Generate EM patches")
    em.device.value = "cpu"
    em.model_folder.value = tiny_paired
    em.generate(n=2, steps=2, seed=0)
    assert em.wait(120)
    w = _dock(viewer, tiny_segmenter)
    patches = viewer.layers["tiny-paired patches s0-1"]
    viewer.layers.selection.active = patches
    assert w.layer.value is patches
    w.segment()
    assert w.wait(120)
    assert errors(notes) == []
    labels = viewer.layers.selection.active  # named after the patches, apart from the generator's own labels
    assert labels.name == "tiny-paired patches s0-1 labels"
    assert w.status.value.startswith("added 'tiny-paired patches s0-1 labels': ")
    assert labels.data.shape == patches.data.shape == (2, 32, 32)
    prov = labels.metadata["zfdiffusion"]
    assert prov["input_provenance"]["seed"] == 0  # how the segmented patches were made


def test_screenshot_with_the_widget_is_not_blank(make_napari_viewer, tiny_segmenter, tmp_path):
    viewer = make_napari_viewer(show=True)
    w = _dock(viewer, tiny_segmenter)
    img, _ = blob_images(tmp_path, n=2, seed=4)
    viewer.add_image(img, name="cells")
    w.add_probability.value = True
    w.segment()
    assert w.wait(120)
    assert len(viewer.layers) == 3 and viewer.layers["cells labels"].data.max() > 0
    shot = viewer.screenshot(canvas_only=False)
    assert shot.ndim == 3 and shot.shape[-1] == 4 and shot[..., :3].std() > 0
    canvas = viewer.screenshot(canvas_only=True)
    assert canvas[..., :3].std() > 0


def test_widget_through_napari(make_napari_viewer):
    from napari_zfdiffusion.widgets.segment import SegmentWidget

    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget("napari-zfdiffusion", "Segment")
    assert isinstance(widget, SegmentWidget)


def _context_menu(viewer):
    """The layer list's right-click menu as napari builds it, updated for the current selection."""
    from napari._app_model.constants import MenuId
    from napari._app_model.context import get_context
    from napari._qt._qapp_model import build_qmodel_menu

    menu = build_qmodel_menu(MenuId.LAYERLIST_CONTEXT, parent=viewer.window._qt_window)
    menu.update_from_context(get_context(viewer.layers))
    return menu


def _action(menu, title):
    return next((a for a in menu.actions() if a.text() == title), None)


def test_layer_command_in_the_layers_menu_and_the_right_click_menu(make_napari_viewer, tiny_segmenter, notes):
    from napari._app_model import get_app_model
    from napari._app_model.context import get_context

    from napari_zfdiffusion.widgets.segment import (
        MENU_TITLE,
        SegmentWidget,
        register_layer_context_menu,
    )

    viewer = make_napari_viewer()
    app = get_app_model()
    assert COMMAND in app.commands
    segment_menu = [getattr(i, "command", None) for i in app.menus.get_menu("napari/layers/segment")]
    assert COMMAND in [c.id for c in segment_menu if c is not None]  # Layers > Segment, from napari.yaml

    labels = viewer.add_labels(np.zeros((32, 32), np.int32), name="labels")
    image = viewer.add_image(np.zeros((4, 32, 32), np.float32), name="stack")
    assert register_layer_context_menu()
    assert register_layer_context_menu()  # once only
    menu = _context_menu(viewer)
    assert len([a for a in menu.actions() if a.text() == MENU_TITLE]) == 1
    assert _action(menu, MENU_TITLE).isVisible()  # the image layer is selected
    viewer.layers.selection.active = labels
    menu.update_from_context(get_context(viewer.layers))
    assert not _action(menu, MENU_TITLE).isVisible()  # not offered for a Labels layer

    viewer.layers.selection.active = image
    menu = _context_menu(viewer)
    _action(menu, MENU_TITLE).trigger()  # right-click > Segment with zfdiffusion
    docked = [w for w in viewer.window.dock_widgets.values() if isinstance(w, SegmentWidget)]
    # napari gives plugin widgets its viewer behind a PublicOnlyProxy: layers compare equal, not identical
    assert len(docked) == 1 and docked[0].layer.value == image
    docked[0].model_folder.value = tiny_segmenter
    docked[0].device.value = "cpu"

    other = viewer.add_image(np.zeros((40, 40), np.float32), name="other")
    viewer.layers.selection.active = image  # the command again, through napari's app model: same widget
    app.commands.execute_command(COMMAND).result()
    docked = [w for w in viewer.window.dock_widgets.values() if isinstance(w, SegmentWidget)]
    assert len(docked) == 1 and docked[0].layer.value == image and other in docked[0].layer.choices
    docked[0].segment()
    assert docked[0].wait(60)
    assert "stack labels" in viewer.layers
    assert errors(notes) == []


def test_layer_command_without_an_image_layer(make_napari_viewer, notes):
    from napari_zfdiffusion.widgets.segment import segment_layer

    viewer = make_napari_viewer()
    viewer.add_labels(np.zeros((32, 32), np.int32), name="labels")
    segment_layer(viewer)
    msgs = errors(notes)
    assert len(msgs) == 1 and "Image layer" in msgs[0]
    assert not viewer.window.dock_widgets


def test_labels_layers_save_with_their_provenance(tmp_path):
    import npe2

    from napari_zfdiffusion._writer import write_image_tiff
    from napari_zfdiffusion.core.io import read_provenance

    pm = npe2.PluginManifest.from_distribution("napari-zfdiffusion")
    assert any(w.layer_types == ["labels"] for w in pm.contributions.writers)
    lab = np.zeros((2, 16, 16), np.int32)
    lab[0, 2:5, 2:5] = 1
    out = write_image_tiff(str(tmp_path / "l.tif"), lab, {"name": "x labels",
                                                          "metadata": {"zfdiffusion": {"model": "m", "objects": 1}}})
    assert read_provenance(out[0])["objects"] == 1


# ----------------------------------------------------------------------------- correct and fine-tune
def test_fine_tune_on_corrections_makes_a_model_that_changes_the_prediction(widget, tmp_path, notes):
    """Segment, correct the labels as a person does (erase an object, paint a missed one), press
    "Fine-tune on my corrections": a new model in the user models folder, chosen in the dock, and a
    new labels layer from it; the corrected layer is kept as it was edited."""
    from napari_zfdiffusion.core.segment import Segmenter
    from napari_zfdiffusion.core.store import user_models_dir

    viewer, w = widget
    img, _ = blob_images(tmp_path, seed=4)
    src = viewer.add_image(img[0], name="cells")
    w.finetune_button.clicked.emit()  # nothing segmented yet: says what to do
    assert any("segment an image first" in m for m in errors(notes))
    notes.clear()
    w.segment_button.clicked.emit()
    assert w.wait(120) and errors(notes) == []
    labels = viewer.layers["cells labels"]
    viewer.layers.selection.active = labels
    w.finetune_button.clicked.emit()  # not edited yet
    assert any("no corrections yet" in m for m in errors(notes))
    notes.clear()
    before = Segmenter.load(w.model.value, "cpu").predict(img[0][None], tile=64, overlap=16)
    edited = labels.data.copy()
    edited[edited == edited.max()] = 0  # erase one object
    edited[5:15, 5:15] = edited.max() + 1  # paint a missed one
    labels.data = edited
    w.ft_steps.value = 5
    w.finetune_button.clicked.emit()
    assert w.running and not w.finetune_button.enabled
    assert w.wait(180)
    assert errors(notes) == []
    made = [p for p in user_models_dir().iterdir() if "-ft-" in p.name]
    assert len(made) == 1 and (made[0] / "model.json").is_file()
    assert w.model.value == str(made[0]) and "(fine-tuned)" in w.model.native.currentText()
    assert "cells labels (fine-tuned)" in viewer.layers
    assert np.array_equal(viewer.layers["cells labels"].data, edited)  # the corrections are kept
    after = Segmenter.load(made[0], "cpu").predict(img[0][None], tile=64, overlap=16)
    assert np.abs(after - before).max() > 1e-3
    assert "fine-tuned on 1 corrected plane" in w.status.value
    # a new segmentation with "replace" on keeps the edited layer
    viewer.layers.selection.active = src
    w.segment_button.clicked.emit()
    assert w.wait(120)
    assert "cells labels" in viewer.layers and any("kept 'cells labels'" in m for _, m in notes)


def test_fine_tune_cancel_leaves_no_model(widget, tmp_path, notes):
    from napari_zfdiffusion.core.store import user_models_dir

    viewer, w = widget
    img, _ = blob_images(tmp_path, seed=6)
    viewer.add_image(img[0], name="cells")
    w.segment_button.clicked.emit()
    assert w.wait(120)
    labels = viewer.layers["cells labels"]
    labels.data = np.where(labels.data == 1, 0, labels.data)
    viewer.layers.selection.active = labels
    w.ft_steps.value = 2000
    w.finetune_button.clicked.emit()
    w.cancel()
    assert w.wait(120)
    assert errors(notes) == [] and w.status.value == "cancelled"
    assert not [p for p in user_models_dir().iterdir() if "-ft-" in p.name] if user_models_dir().is_dir() else True
    assert "cells labels (fine-tuned)" not in viewer.layers
