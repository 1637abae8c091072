"""What a model is, and whether an input looks like its training data (issue 16, part 4).

:func:`napari_zfdiffusion.core.modelinfo.domain_warnings` rule by rule (no Qt), then the "About the
model" panel in each dock (under Xvfb, as the other widget tests): the bundled models' facts, the
"Model card" button, and the warning for an out-of-domain layer (and none for an in-domain one).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from napari_zfdiffusion.core.modelinfo import about_lines, domain_warnings, model_card_file, model_entry, sample

WEIGHTS = Path(__file__).resolve().parents[1] / "weights"
STATS = {"a.tif": [100.0, 3000.0], "b.tif": [120.0, 4000.0]}  # raw 1st / 99.8th percentiles per training image


def seg_card(**extra) -> dict:
    """A segmentation card trained at 0.6 um/px on 16-bit images of objects 20 px across."""
    return {"kind": "segmentation", "normalisation": {"method": "percentile", "low": 1.0, "high": 99.8},
            "pixel_size_um": {"x": 0.6, "y": 0.6}, "object_diameter_px": 20.0,
            "training_data": {"credit": "test", "normalisation_stats": STATS}, **extra}


def like_training(shape=(256, 256), seed: int = 0) -> np.ndarray:
    """uint16: a background near 100, bright discs near 3000, noise: like the card's training images."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    img = 100 + rng.normal(0, 10, shape)
    for _ in range(12):
        cy, cx = rng.integers(0, shape[0]), rng.integers(0, shape[1])
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < 100] = 3000
    return np.clip(img, 0, 65535).astype(np.uint16)


# ---------------------------------------------------------------- the rules (no Qt)
def test_an_image_like_the_training_data_gives_no_warning():
    img = like_training()
    assert domain_warnings(seg_card(), img, 0.6) == []
    assert domain_warnings(seg_card(), img, 0.5) == []  # within 1.5x of the card's pixel size
    assert domain_warnings(seg_card(), img) == []  # pixel size unknown: no guess
    assert domain_warnings(seg_card(), img.astype(np.float32) * 1.5, 0.8) == []  # a float image, range within 10x


def test_a_pixel_size_far_from_the_cards_says_which_diameter_rescales():
    img = like_training()
    [w] = domain_warnings(seg_card(), img, 1.8)
    assert w.startswith("pixel size: this layer has 1.8 µm/px, the model was trained at 0.6 µm/px (3.0x")
    assert "Set 'object diameter' to about 7 px" in w  # 20 px objects at 0.6 um/px are about 7 px at 1.8
    [w] = domain_warnings(seg_card(), img, 0.2)
    assert "3.0x smaller pixels" in w and "about 60 px" in w
    assert domain_warnings(seg_card(), img, 1.8, rescaled=True) == []  # the dock rescales: nothing to say
    no_size = seg_card(object_diameter_px=None)
    assert "Resample the image to about 0.6 µm/px" in domain_warnings(no_size, img, 1.8)[0]
    assert domain_warnings({k: v for k, v in seg_card().items() if k != "pixel_size_um"}, img, 1.8) == []
    # an autoencoder's card: resample
    assert "Resample" in domain_warnings(seg_card(kind="vae"), img, 6.0, "patches")[0]


def test_a_cascade_compares_the_field_of_view_not_the_raw_pixel_size():
    card = json.loads((WEIGHTS / "zf-cascade-demo" / "cascade.json").read_text())  # field 89.5 um
    img = like_training((64, 64))
    assert domain_warnings(card, img, 1.4) == []  # 64 px at 1.4 um/px show the model's 89.5 um
    assert domain_warnings(card, like_training((512, 512)), 0.175) == []
    [w] = domain_warnings(card, img, 0.202)  # the training data's pixel size, but only 13 um across
    assert w.startswith("field of view: this image shows 12.9 µm across (64 px at 0.202 µm/px)")
    assert "about 443 px of yours" in w
    assert domain_warnings({k: v for k, v in card.items() if k != "field_um"}, img, 0.202) == []  # no field: no guess


def test_intensities_far_from_every_training_image():
    card = seg_card()
    eight = domain_warnings(card, (like_training() // 16).astype(np.uint8), 0.6)
    assert len(eight) == 1
    assert "this image is 8-bit, but the model was trained on data with values above 255" in eight[0]
    assert "a different camera or microscope often means a different domain" in eight[0]
    dim = domain_warnings(card, (like_training() // 40).astype(np.uint16), 0.6)  # range ~70: 40x smaller
    assert len(dim) == 1 and "its intensity range (99.8th - 1st percentile) is" in dim[0]
    shifted = domain_warnings(card, like_training() + 60000, 0.6)  # the same range, 20x brighter
    assert len(shifted) == 1 and "its 99.8th percentile is" in shifted[0]
    # no statistics in the card, or values the plugin normalised: nothing compared
    plain = seg_card(training_data={"credit": "x"})
    assert domain_warnings(plain, (like_training() // 16).astype(np.uint8), 0.6) == []
    assert domain_warnings(card, (like_training() // 16).astype(np.uint8), 0.6, normalised=True) == []
    # a cascade keeps its statistics at the top of its card
    assert domain_warnings({"kind": "cascade", "normalisation_stats": STATS}, (like_training() // 40)) != []


def test_flat_images():
    card = seg_card()
    assert domain_warnings(card, np.full((64, 64), 7, np.uint16))[0].startswith("empty image: every pixel is 7")
    sparse = np.zeros((100, 100), np.uint16)
    sparse[0, :10] = 3000  # 0.1 % of the pixels
    [w] = domain_warnings(card, sparse)
    assert w.startswith("nearly empty image: its 1st and 99.8th percentiles are both 0")
    rng = np.random.default_rng(0)
    few = (100 + rng.integers(0, 2, (64, 64))).astype(np.uint8)  # an 8-bit nearly constant image
    [w] = domain_warnings(card, few)  # flat: the intensity rule (8-bit) is not added
    assert w.startswith("nearly constant image: only 2 grey levels")
    assert domain_warnings(card, 1000 + rng.normal(0, 1e-3, (64, 64)))[0].startswith("nearly constant image")
    assert domain_warnings(card, np.full((8, 8), np.nan))[0].startswith("empty image: it has no finite values")
    assert domain_warnings(card, np.zeros((8, 8), complex)) == []  # not numbers: the model's checks answer


def test_a_large_memory_mapped_image_is_read_at_a_million_values(tmp_path):
    big = np.lib.format.open_memmap(tmp_path / "big.npy", mode="w+", dtype=np.uint16, shape=(3000, 3100))
    big[:] = np.tile(like_training((100, 100)), (30, 31))
    assert 500_000 < sample(big).size <= 1_000_000
    assert sample(np.broadcast_to(np.uint8(0), (40, 10, 3000))).size <= 1_000_000
    assert domain_warnings(seg_card(), big, 0.6) == []


def test_about_lines_add_the_measured_quality_and_the_model_card():
    lines = about_lines(model_entry("nuclei-unet-demo"))
    assert any(line.startswith("trained on: Fluo-N2DL-HeLa") for line in lines)
    assert "measured quality (from the card):" in lines and any(x.startswith("  dsb: iou 0.855") for x in lines)
    assert lines[-1].startswith("on disk:")
    assert model_card_file(WEIGHTS / "nuclei-unet-demo") == WEIGHTS / "nuclei-unet-demo" / "MODEL_CARD.md"
    card = seg_card()
    assert any(x.startswith("training intensities (2 image(s)): 1st percentile 100 to 120") for x in
               about_lines(model_entry("nuclei-unet-demo"), card))

    from napari_zfdiffusion.cli import _models
    from napari_zfdiffusion.core import modelinfo

    assert _models.describe is modelinfo.describe and _models._cascade is modelinfo._cascade  # names kept


# ---------------------------------------------------------------- the panel in the docks (Xvfb)
def ours(notes) -> list[str]:
    """The domain warnings shown as notifications (not napari's own, such as on units)."""
    return [m for s, m in notes if s == "warning" and m.startswith("zfdiffusion: layer")]


def _dock(viewer, which: str):
    from napari_zfdiffusion.widgets.em import GenerateEMWidget
    from napari_zfdiffusion.widgets.generate import GenerateSlicesWidget
    from napari_zfdiffusion.widgets.segment import SegmentWidget
    from napari_zfdiffusion.widgets.volume import GenerateVolumeWidget

    cls = {"slices": GenerateSlicesWidget, "volume": GenerateVolumeWidget, "em": GenerateEMWidget,
           "segment": SegmentWidget}[which]
    w = cls(viewer)
    viewer.window.add_dock_widget(w, name=which)
    w.device.value = "cpu"
    return w


FACTS = {"slices": ["depth classes (--depth 0 to 4):", "0: plane 0, z = 0 um (top)", "every slice shows 89.5 um"],
         "volume": ["4: plane 4, z = 4 um (bottom)", "volume neighbour correlation:"],
         "em": ["trained on: islet_mito_5nm.png", "reconstruction heldout:"],
         "segment": ["trained on: Fluo-N2DL-HeLa and Fluo-N3DH-CHO", "held out: Dice 0.934"]}
CARDS = {"slices": "zf-cascade-demo", "volume": "zf-cascade-demo", "em": "em-ldm-demo", "segment": "nuclei-unet-demo"}


@pytest.mark.gui
@pytest.mark.parametrize("which", list(FACTS))
def test_each_dock_shows_its_models_facts_and_card(make_napari_viewer, monkeypatch, which, notes):
    from qtpy.QtGui import QDesktopServices

    opened = []
    monkeypatch.setattr(QDesktopServices, "openUrl", staticmethod(lambda url: opened.append(url) or True))
    w = _dock(make_napari_viewer(), which)
    panel = w.about
    assert panel.native.parentWidget() is w.sections.scroll.widget()  # in the dock, above Advanced
    assert not panel.collapsible.isExpanded() and panel.collapsible.toggleButton().text() == "About the model"
    for fact in FACTS[which]:
        assert fact in panel.text.value, (which, fact, panel.text.value)
    assert panel.warning.native.isHidden() and panel.warnings == []
    assert panel.card_button.enabled
    panel.card_button.native.click()
    assert [Path(u.toLocalFile()) for u in opened] == [WEIGHTS / CARDS[which] / "MODEL_CARD.md"]
    assert [m for s, m in notes if s == "error"] == [] and ours(notes) == []


@pytest.fixture
def pixel_model(tmp_path) -> Path:
    """A copy of nuclei-unet-demo whose card says 0.6 um/px, objects of 20 px and its images' statistics,
    without a MODEL_CARD.md."""
    folder = tmp_path / "px-unet"
    shutil.copytree(WEIGHTS / "nuclei-unet-demo", folder)
    (folder / "MODEL_CARD.md").unlink()
    card = json.loads((folder / "model.json").read_text())
    card.update(pixel_size_um={"x": 0.6, "y": 0.6}, object_diameter_px=20.0)
    card["training_data"]["normalisation_stats"] = STATS
    (folder / "model.json").write_text(json.dumps(card))
    return folder


@pytest.mark.gui
def test_segment_warns_about_an_out_of_domain_layer_once(make_napari_viewer, pixel_model, notes):
    viewer = make_napari_viewer()
    w = _dock(viewer, "segment")
    w.model_folder.value = pixel_model
    assert "pixel size: x 0.6 um, y 0.6 um" in w.about.text.value
    assert not w.about.card_button.enabled  # no MODEL_CARD.md in this folder

    good = viewer.add_image(like_training((64, 64)), name="good", scale=(0.6, 0.6), units=("um", "um"))
    w.select_layer(good)
    assert w.about.warnings == [] and w.about.warning.native.isHidden()

    far = viewer.add_image(like_training((64, 64)), name="far", scale=(1.8, 1.8), units=("um", "um"))
    w.select_layer(far)
    [text] = w.about.warnings
    assert text.startswith("pixel size: this layer has 1.8 µm/px") and not w.about.warning.native.isHidden()
    assert "⚠ pixel size" in w.about.warning.value
    w.diameter.value = 7  # rescaled to the model's scale: nothing left to say
    assert w.about.warnings == [] and w.about.warning.native.isHidden()
    w.diameter.value = 0

    big = np.stack([like_training((128, 128), seed=k) for k in range(3)])
    pyramid = viewer.add_image([big, big[:, ::2, ::2]], multiscale=True, name="pyramid", scale=(1, 1.8, 1.8),
                               units=("um", "um", "um"))
    w.select_layer(pyramid)  # its smallest level is looked at, its own pixel size compared
    assert [x[:36] for x in w.about.warnings] == ["pixel size: this layer has 1.8 µm/px"]

    pixels = viewer.add_image(like_training((64, 64)), name="pixels", scale=(1.8, 1.8))  # no units: unknown
    w.select_layer(pixels)
    assert w.about.warnings == []

    flat = viewer.add_image(np.full((64, 64), 100, np.uint8) + (np.arange(64) % 2).astype(np.uint8), name="flat")
    w.select_layer(flat)
    assert w.about.warnings[0].startswith("nearly constant image")
    for _ in range(2):  # a notification at the first press only (per layer and model)
        w.segment()
        assert w.wait(60)
    warned = ours(notes)
    assert len(warned) == 1 and "layer 'flat' looks unlike the training data of 'px-unet'" in warned[0]


@pytest.mark.gui
def test_the_generate_docks_warn_about_the_layer_they_take(make_napari_viewer, notes):
    viewer = make_napari_viewer()
    small = viewer.add_image(like_training((64, 64)), name="small field", scale=(0.202, 0.202), units=("um", "um"))
    right = viewer.add_image(like_training((64, 64)), name="right field", scale=(1.4, 1.4), units=("um", "um"))

    slices = _dock(viewer, "slices")
    viewer.layers.selection.active = right
    assert slices.about.warnings == []
    viewer.layers.selection.active = small  # what "Upsample selected layer" takes
    assert slices.about.warnings[0].startswith("field of view: this image shows 12.9 µm across")
    slices.resolution.value, slices.sr_steps.value = 128, 1
    slices.upsample_selected()
    assert slices.wait(120)
    assert [m.startswith("zfdiffusion: layer 'small field' looks unlike") for m in ours(notes)] == [True]

    volume = _dock(viewer, "volume")
    assert volume.about.warnings == []  # no layer to start from
    volume.start_layer.reset_choices()
    volume.start_layer.value = small
    assert volume.about.warnings[0].startswith("field of view")
    volume.start_layer.value = right
    assert volume.about.warnings == []

    em = _dock(viewer, "em")
    empty = viewer.add_image(np.zeros((64, 64), np.uint8), name="empty")
    viewer.layers.selection.active = empty  # the layer to encode / decode follows the selection
    assert em.layer.value is empty and em.about.warnings[0].startswith("empty image: every pixel is 0")
    # the EM demo learned an 8-bit SEM image (its 1st-99.8th percentiles 102-231): 16-bit fluorescence is
    # another domain, an 8-bit image of that range is not
    viewer.layers.selection.active = right
    assert em.about.warnings[0].startswith("intensities unlike the training data")
    sem = np.clip(np.random.default_rng(0).normal(165, 30, (64, 64)), 0, 255).astype(np.uint8)
    viewer.layers.selection.active = viewer.add_image(sem, name="sem field")
    assert em.about.warnings == [] and em.about.warning.native.isHidden()
    assert [m for s, m in notes if s == "error"] == []
