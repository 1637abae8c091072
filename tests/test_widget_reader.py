"""The napari reader (napari_zfdiffusion._reader): the plugin's TIFFs round-trip through napari with
their provenance and geometry; OME files open with their physical sizes and channels."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile

pytest.importorskip("napari")
pytest.importorskip("qtpy")

pytestmark = pytest.mark.gui


def test_plain_tiffs_are_left_to_napari(tmp_path):
    from napari_zfdiffusion._reader import get_reader

    tifffile.imwrite(tmp_path / "plain.tif", np.zeros((3, 16, 16), np.uint8))
    assert get_reader(str(tmp_path / "plain.tif")) is None
    assert get_reader(str(tmp_path / "x.png")) is None
    assert get_reader([str(tmp_path / "plain.tif")]) is None


def test_a_generated_layer_round_trips(make_napari_viewer, tmp_path):
    """Generate (with a known field), save with the plugin's writer, open again: same data, same
    provenance, same place in the world."""
    from conftest import make_tiny_cascade

    from napari_zfdiffusion._writer import write_image_tiff
    from napari_zfdiffusion.widgets.generate import GenerateSlicesWidget

    model = make_tiny_cascade(tmp_path / "geo", stages=("base", "sr128"))
    card = json.loads((model / "cascade.json").read_text())
    (model / "cascade.json").write_text(json.dumps({**card, "field_um": 64.0, "z_step_um": 2.0}))
    viewer = make_napari_viewer()
    w = GenerateSlicesWidget(viewer)
    w.model_folder.value = model
    w.device.value = "cpu"
    w.steps.value = 1
    w.generate(resolution=128)
    assert w.wait(60)
    layer = viewer.layers[-1]
    data, meta, _ = layer.as_layer_data_tuple()
    path = tmp_path / "slice.tif"
    write_image_tiff(str(path), data, meta)
    (back,) = viewer.open(str(path), plugin="napari-zfdiffusion")
    np.testing.assert_array_equal(np.asarray(back.data), layer.data)
    assert back.metadata["zfdiffusion"]["seed"] == layer.metadata["zfdiffusion"]["seed"]
    np.testing.assert_allclose(back.scale, layer.scale)
    np.testing.assert_allclose(back.translate, layer.translate)
    assert tuple(back.contrast_limits) == (0, 1)


def test_ome_channels_and_sizes(make_napari_viewer, tmp_path):
    data = (np.random.default_rng(0).random((2, 3, 2, 32, 40)) * 1000).astype(np.uint16)
    path = tmp_path / "cells.ome.tif"
    tifffile.imwrite(path, data, ome=True, metadata={"axes": "TZCYX", "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5,
                                                     "PhysicalSizeZ": 2.0})
    viewer = make_napari_viewer()
    layers = viewer.open(str(path), plugin="napari-zfdiffusion")
    assert len(layers) == 2  # one per channel
    assert tuple(layers[0].scale) == (1.0, 2.0, 0.5, 0.5) and layers[0].data.shape == (2, 3, 32, 40)


def test_segmentation_labels_open_as_labels(make_napari_viewer, tiny_segmenter, tmp_path):
    from napari_zfdiffusion import cli

    img = np.zeros((3, 64, 80), np.uint16)
    img[:, 20:40, 30:50] = 1000
    src = tmp_path / "stack.ome.tif"
    tifffile.imwrite(src, img, ome=True, metadata={"axes": "ZYX", "PhysicalSizeX": 0.2, "PhysicalSizeY": 0.2,
                                                   "PhysicalSizeZ": 1.0})
    out = tmp_path / "labels.tif"
    assert cli.main(["-q", "segment", "--model", str(tiny_segmenter), "--in", str(src), "--out", str(out),
                     "--tile", "64", "--overlap", "16", "--device", "cpu"]) == 0
    viewer = make_napari_viewer()
    (image,) = viewer.open(str(src), plugin="napari-zfdiffusion")
    (labels,) = viewer.open(str(out), plugin="napari-zfdiffusion")
    assert labels.__class__.__name__ == "Labels" and labels.metadata["zfdiffusion"]["axes"] == "ZYX"
    np.testing.assert_allclose(labels.scale, image.scale)  # they overlay
    assert tuple(labels.scale) == (1.0, 0.2, 0.2)
