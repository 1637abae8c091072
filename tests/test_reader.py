"""The one image reader (core.reader): formats, axes, channels and physical sizes, and how training,
segmentation and generation use them (specimens from T, --channel, pixel sizes carried to outputs)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile

from napari_zfdiffusion import cli
from napari_zfdiffusion.core.cascade import Cascade
from napari_zfdiffusion.core.cascade.data import DepthDataset
from napari_zfdiffusion.core.cascade.train import TrainConfig, train_stage
from napari_zfdiffusion.core.errors import UserInputError
from napari_zfdiffusion.core.io import TiffMemmap, read_provenance, write_tiff
from napari_zfdiffusion.core.reader import Planes, open_image, to_um
from napari_zfdiffusion.core.training.patches import PatchData

from conftest import make_tiny_cascade

RNG = np.random.default_rng(0)
TZCYX = (RNG.random((3, 4, 2, 40, 48)) * 1000).astype(np.uint16)


def ome(path, data, axes, **sizes):
    tifffile.imwrite(path, data, ome=True, metadata={"axes": axes, **sizes})
    return path


# ----------------------------------------------------------------------------- formats and axes
def test_ome_tiff_axes_sizes_and_lazy_planes(tmp_path):
    f = ome(tmp_path / "a.ome.tif", TZCYX, "TZCYX", PhysicalSizeX=500, PhysicalSizeXUnit="nm", PhysicalSizeY=0.5,
            PhysicalSizeZ=2.0)
    src = open_image(f)
    assert src.axes == "TZCYX" and src.pixel_um == {"Z": 2.0, "Y": 0.5, "X": 0.5}
    assert isinstance(src.data, np.memmap)  # nothing read yet
    stacks = src.stacks(channel=1)
    assert [name for name, _ in stacks] == ["a.ome_t0", "a.ome_t1", "a.ome_t2"]  # T: one specimen each
    np.testing.assert_array_equal(stacks[2][1][...], TZCYX[2, :, 1])
    planes = src.planes(channel=0)
    assert planes.shape == (12, 40, 48)
    np.testing.assert_array_equal(planes[5], TZCYX[1, 1, 0])  # time-major, then depth


def test_compressed_tiff_is_read_plane_by_plane(tmp_path):
    f = tmp_path / "c.tif"
    tifffile.imwrite(f, TZCYX[:, :, 0], compression="zlib", metadata={"axes": "TZYX"})
    src = open_image(f)
    assert src.axes == "TZYX" and not isinstance(src.data, np.ndarray)  # a chunked (Zarr) view
    planes = src.planes()
    assert isinstance(planes, Planes) and planes.shape == (12, 40, 48)
    np.testing.assert_array_equal(planes[7], TZCYX[1, 3, 0])
    np.testing.assert_array_equal(np.asarray(planes[2:4]), TZCYX[0, 2:4, 0])


def test_imagej_hyperstack_sizes(tmp_path):
    f = tmp_path / "ij.tif"
    tifffile.imwrite(f, TZCYX, imagej=True, resolution=(4.0, 4.0), metadata={"axes": "TZCYX", "spacing": 3.0,
                                                                             "unit": "um"})
    src = open_image(f)
    assert src.axes == "TZCYX" and src.pixel_um == {"Z": 3.0, "Y": 0.25, "X": 0.25}


def test_ome_zarr(tmp_path):
    zarr = pytest.importorskip("zarr")
    g = zarr.open_group(str(tmp_path / "a.ome.zarr"), mode="w")
    g.create_array("0", data=TZCYX)
    axes = [{"name": "t", "type": "time"}, {"name": "z", "type": "space", "unit": "micrometer"},
            {"name": "c", "type": "channel"}, {"name": "y", "type": "space", "unit": "nanometer"},
            {"name": "x", "type": "space", "unit": "nanometer"}]
    g.attrs["multiscales"] = [{"version": "0.4", "axes": axes, "datasets": [
        {"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1, 2.5, 1, 300, 300]}]}]}]
    src = open_image(tmp_path / "a.ome.zarr", channel=1)
    assert src.axes == "TZCYX" and src.pixel_um == {"Z": 2.5, "Y": 0.3, "X": 0.3}
    np.testing.assert_array_equal(src.stacks()[1][1][3], TZCYX[1, 3, 1])


def test_plain_stacks_png_and_rgb(tmp_path):
    tifffile.imwrite(tmp_path / "z3.tif", TZCYX[0, :3, 0], metadata=None)  # 3 planes: tifffile calls them samples
    src = open_image(tmp_path / "z3.tif")
    assert src.stack_axes() == "ZYX" and src.stacks()[0][1].shape == (3, 40, 48)
    from PIL import Image

    Image.fromarray((TZCYX[0, 0, 0] % 256).astype(np.uint8)).save(tmp_path / "p.png")
    assert open_image(tmp_path / "p.png").planes().shape == (1, 40, 48)
    tifffile.imwrite(tmp_path / "rgb.tif", (RNG.random((40, 48, 3)) * 255).astype(np.uint8), photometric="rgb")
    src = open_image(tmp_path / "rgb.tif")
    assert src.rgb and src.planes().shape == (1, 40, 48, 3)


@pytest.mark.parametrize("axes, channel, match", [
    ("TZCYX", None, "2 channels"),
    ("TZCYX", 5, "channel 5 does not exist"),
    ("TZYX", 1, "one channel"),
])
def test_channel_errors(tmp_path, axes, channel, match):
    data = TZCYX if "C" in axes else TZCYX[:, :, 0]
    f = ome(tmp_path / "a.ome.tif", data, axes)
    with pytest.raises(UserInputError, match=match):
        open_image(f, channel=channel).planes()


def test_unnamed_axes_are_refused_with_the_axes_found(tmp_path):
    tifffile.imwrite(tmp_path / "odd.tif", TZCYX[:, :, 0], metadata=None)
    with pytest.raises(UserInputError, match=r"odd.tif has 4 dimensions \(axes \w*YX"):
        open_image(tmp_path / "odd.tif").stacks()


def test_bad_sources(tmp_path):
    zarr = pytest.importorskip("zarr")
    zarr.open_group(str(tmp_path / "g.zarr"), mode="w")
    with pytest.raises(UserInputError, match="not an OME-Zarr image"):
        open_image(tmp_path / "g.zarr")
    with pytest.raises(UserInputError, match="does not exist"):
        open_image(tmp_path / "none.tif")
    (tmp_path / "bad.tif").write_bytes(b"not a tiff")
    with pytest.raises(UserInputError, match="could not read"):
        open_image(tmp_path / "bad.tif")


def test_units():
    assert to_um(500, "nm") == 0.5 and to_um(2, "µm") == 2 and to_um(1, "mm") == 1000
    assert to_um(1, "pixel") is None and to_um(0, "um") is None and to_um("x", "um") is None


# ----------------------------------------------------------------------------- pixel sizes written
def test_tiffs_carry_their_pixel_size(tmp_path):
    write_tiff(tmp_path / "a.tif", np.zeros((2, 16, 16), np.float32),
               {"kind": "zfdiffusion.test", "pixel_size_um": {"z": 2.0, "y": 0.4, "x": 0.4}})
    src = open_image(tmp_path / "a.tif")
    assert src.pixel_um == {"Z": 2.0, "Y": 0.4, "X": 0.4} and src.provenance["kind"] == "zfdiffusion.test"
    with tifffile.TiffFile(tmp_path / "a.tif") as tf:  # what Fiji reads: pixels per centimetre
        assert tf.pages[0].tags["ResolutionUnit"].value == 3
    with TiffMemmap(tmp_path / "m.tif", (4, 8), np.int32, {"pixel_size_um": {"y": 0.5, "x": 0.25}}) as arr:
        arr[:] = 1
    assert open_image(tmp_path / "m.tif").pixel_um == {"Z": None, "Y": 0.5, "X": 0.25}


# ----------------------------------------------------------------------------- training and segmentation
def test_cascade_trains_from_an_ome_movie(tmp_path):
    """TZCYX: each time point is a specimen, the chosen channel, z-step and pixel size into the card;
    generated slices at every resolution then cover the same field (they overlay in napari)."""
    f = ome(tmp_path / "movie.ome.tif", TZCYX, "TZCYX", PhysicalSizeX=0.5, PhysicalSizeY=0.5, PhysicalSizeZ=2.0)
    with pytest.raises(UserInputError, match="--channel"):
        DepthDataset.from_paths(f)
    ds = DepthDataset.from_paths(f, channel=1)
    assert len(ds.names) == 3 and ds.n_planes == 4 and ds.pixel_um == {"Z": 2.0, "Y": 0.5, "X": 0.5}
    out = tmp_path / "model"
    cfg = TrainConfig(stage="base", size="tiny", steps=1, batch_size=2, checkpoint_every=1, channel=1)
    train_stage(f, out, cfg, device="cpu", show_progress=False)
    card = json.loads((out / "cascade.json").read_text())
    assert card["z_step_um"] == 2.0 and card["pixel_size_um"] == {"y": 0.5, "x": 0.5}
    assert card["field_um"] == 40 * 0.5  # the square cut from each 40 x 48 plane
    assert card["training_data"]["specimens"] == 3 and "z = 2 um" in card["depth_classes"][1]["label"]


def test_generated_outputs_carry_pixel_sizes_that_overlay(tmp_path):
    model = make_tiny_cascade(tmp_path / "tiny")
    card = json.loads((model / "cascade.json").read_text())
    card.update(field_um=64.0, z_step_um=2.0)
    (model / "cascade.json").write_text(json.dumps(card))
    cas = Cascade.load(model, "cpu")
    r64 = cas.generate(0, resolution=64, steps=1)
    r128 = cas.generate(0, resolution=128, steps=1)
    assert r64.provenance["pixel_size_um"] == {"y": 1.0, "x": 1.0}
    assert r128.provenance["pixel_size_um"] == {"y": 0.5, "x": 0.5}  # same 64 um field, twice the pixels
    vol = cas.generate_volume("0-1", resolution=64, steps=1, continuity_guidance=0)
    assert vol.provenance["pixel_size_um"] == {"z": 2.0, "y": 1.0, "x": 1.0}
    assert cli.main(["-q", "generate", "--model", str(model), "--depth", "0", "--resolution", "128", "--steps", "1",
                     "--device", "cpu", "--out", str(tmp_path / "g.tif")]) == 0
    assert open_image(tmp_path / "g.tif").pixel_um["X"] == 0.5


def test_segment_an_ome_movie_with_a_channel(tiny_segmenter, tmp_path, capsys):
    data = np.zeros((2, 3, 2, 64, 80), np.uint16)
    yy, xx = np.mgrid[:64, :80]
    data[..., 1, :, :] = ((yy - 30) ** 2 + (xx - 40) ** 2 < 100) * 1000 + 50
    f = ome(tmp_path / "cells.ome.tif", data, "TZCYX", PhysicalSizeX=0.2, PhysicalSizeY=0.2, PhysicalSizeZ=1.0)
    out = tmp_path / "labels.tif"
    assert cli.main(["-q", "segment", "--model", str(tiny_segmenter), "--in", str(f), "--out", str(out),
                     "--device", "cpu"]) == 2
    assert "--channel" in capsys.readouterr().err and not out.exists()
    assert cli.main(["-q", "segment", "--model", str(tiny_segmenter), "--in", str(f), "--out", str(out),
                     "--channel", "1", "--device", "cpu", "--tile", "64", "--overlap", "16"]) == 0
    labels = tifffile.imread(out)
    assert labels.shape == (2, 3, 64, 80)  # T, Z, Y, X: the input's shape without the channel
    assert (labels[:, :, 30, 40] > 0).all()
    prov = read_provenance(out)
    assert prov["axes"] == "TZYX" and prov["channel"] == 1
    assert open_image(out).pixel_um == {"Z": 1.0, "Y": 0.2, "X": 0.2}


def test_patch_data_from_a_two_channel_file(tmp_path):
    f = ome(tmp_path / "two.ome.tif", TZCYX[0], "ZCYX")
    with pytest.raises(UserInputError, match="2 channels"):
        PatchData.from_paths(f, patch=32)
    d = PatchData.from_paths(f, patch=32, channel=0, val_fraction=0)
    assert len(d.names) == 4 and d.names[0] == "two.ome.tif[0]"


def test_axes_for_a_file_that_does_not_name_them(tmp_path, capsys):
    tifffile.imwrite(tmp_path / "movie.tif", TZCYX[:, :, 0], metadata=None)  # (3, 4, 40, 48), no axes
    src = open_image(tmp_path / "movie.tif", axes="tzyx")
    assert src.axes == "TZYX" and len(src.stacks()) == 3
    with pytest.raises(UserInputError, match="has 4 dimensions"):
        open_image(tmp_path / "movie.tif", axes="ZYX")
    out = tmp_path / "m"
    assert cli.main(["-q", "train", "cascade", "--data", str(tmp_path / "movie.tif"), "--axes", "TZYX", "--out",
                     str(out), "--size", "tiny", "--steps", "1", "--batch-size", "2", "--device", "cpu"]) == 0
    card = json.loads((out / "cascade.json").read_text())
    assert card["n_planes"] == 4 and card["training_data"]["specimens"] == 3
    assert cli.main(["-q", "train", "cascade", "--data", str(tmp_path / "movie.tif"), "--out", str(tmp_path / "n"),
                     "--size", "tiny", "--steps", "1", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "4 dimensions" in err and "--axes" in err  # the axes it found, and the way out
    assert not (tmp_path / "n").exists()


def test_depth_in_micrometres_lets_different_stacks_train_together(tmp_path):
    """Two stacks, 6 planes 1 um apart and 3 planes 2 um apart: bins of 2 um give 3 shared classes."""
    rng = np.random.default_rng(1)
    ome(tmp_path / "fine.ome.tif", (rng.random((6, 40, 48)) * 1000).astype(np.uint16), "ZYX", PhysicalSizeZ=1.0)
    ome(tmp_path / "coarse.ome.tif", (rng.random((3, 40, 48)) * 1000).astype(np.uint16), "ZYX", PhysicalSizeZ=2.0)
    with pytest.raises(UserInputError, match="--depth-bin-um"):
        DepthDataset.from_paths(tmp_path)  # different numbers of planes: the way out is named
    ds = DepthDataset.from_paths(tmp_path, depth_bin_um=2.0)
    by_name = {n: ds.classes[ds.specimen == i].tolist() for i, n in enumerate(ds.names)}
    assert by_name == {"coarse.ome.tif": [0, 1, 2], "fine.ome.tif": [0, 0, 1, 1, 2, 2]} and ds.n_classes == 3
    with pytest.raises(UserInputError, match="hold no plane"):
        DepthDataset.from_paths(tmp_path, depth_bin_um=0.5)
    out = tmp_path / "m"
    assert cli.main(["-q", "train", "cascade", "--data", str(tmp_path), "--depth-bin-um", "2", "--out", str(out),
                     "--size", "tiny", "--steps", "1", "--batch-size", "2", "--device", "cpu"]) == 0
    card = json.loads((out / "cascade.json").read_text())
    assert card["depth_bin_um"] == 2.0 and [c["z_um"] for c in card["depth_classes"]] == [[0, 2], [2, 4], [4, 6]]
    assert Cascade.load(out, "cpu").depth_label(1) == "z = 2-4 um (middle)"  # what the depth slider shows


def test_a_file_that_changes_while_being_read_is_refused(tmp_path):
    import os

    f = tmp_path / "s.tif"
    tifffile.imwrite(f, TZCYX[0, :, 0])
    stack = open_image(f).stacks()[0][1]
    stack[0]  # reading works
    tifffile.imwrite(f, TZCYX[0, :2, 0])  # rewritten by another program
    os.utime(f, ns=(1, 1))
    with pytest.raises(UserInputError, match="changed while it was being read"):
        stack[1]


@pytest.mark.parametrize("kw", [{"compression": "lzw"}, {"compression": "zstd"}, {"compression": "jpeg"},
                                {"tile": (16, 16)}, {"tile": (16, 16), "compression": "lzw"}],
                         ids=["lzw (Fiji)", "zstd", "jpeg", "tiled", "tiled lzw"])
def test_compressed_and_tiled_tiffs(tmp_path, kw):
    """The TIFFs labs have (imagecodecs): read lazily, plane by plane, equal to what was written."""
    data = (TZCYX[0, :, 0] // 8).astype(np.uint8) if kw.get("compression") == "jpeg" else TZCYX[0, :, 0]
    f = tmp_path / "c.tif"
    tifffile.imwrite(f, data, **kw)
    planes = open_image(f).planes()
    assert planes.shape == data.shape
    got = np.asarray(planes[2])
    if kw.get("compression") == "jpeg":  # lossy
        assert np.abs(got.astype(int) - data[2]).mean() < 3
    else:
        np.testing.assert_array_equal(got, data[2])
