"""Object size as a user control (a diameter, or "auto") and 3D instances for z-stacks (issue 14):
the math of linking planes, the rescaling round trip, the CLI, and one test per bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile

from napari_zfdiffusion import cli
from napari_zfdiffusion.core.errors import UserInputError
from napari_zfdiffusion.core.masks import median_diameter, object_diameters, stitch_planes
from napari_zfdiffusion.core.segment import Segmenter


def discs(shape, centres, radius):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    lab = np.zeros(shape, np.int32)
    for k, (cy, cx) in enumerate(centres, 1):
        lab[(yy - cy) ** 2 + (xx - cx) ** 2 <= radius ** 2] = k
    return lab


# ----------------------------------------------------------------------------- the math
def test_object_diameters_are_those_of_discs():
    lab = discs((100, 100), [(25, 25), (70, 70)], 10)
    d = object_diameters(lab)
    assert d.shape == (2,) and np.allclose(d, 20, atol=0.6)
    assert np.allclose(object_diameters(lab > 0), d)  # a binary mask: its connected components
    assert median_diameter([lab, discs((60, 60), [(30, 30)], 4)]) == pytest.approx(20, abs=0.6)
    assert median_diameter([np.zeros((8, 8), int)]) is None


def test_the_typical_diameter_is_that_of_the_objects_that_cover_the_foreground():
    """'auto' sizes: a crowd of small specks (faint out-of-focus nuclei, debris) does not pull the
    estimate below the nuclei that make up most of the foreground, as the plain median would."""
    from napari_zfdiffusion.core.masks import foreground_diameters, typical_diameter

    big = discs((300, 300), [(60, 60), (60, 200), (200, 120)], 30)
    specks = discs((300, 300), [(y, x) for y in range(140, 300, 22) for x in range(220, 300, 22)][:12], 4)
    d = foreground_diameters((big > 0) | (specks > 0), min_size=16)
    assert len(d) == 15 and np.median(d) < 10  # the specks outnumber the nuclei
    assert typical_diameter(d) == pytest.approx(60, abs=1.5)
    assert typical_diameter([20.0]) == 20.0 and typical_diameter([]) is None
    assert typical_diameter([10.0] * 5 + [20.0] * 5) == 20.0  # area-weighted: four times the pixels


def test_stitching_links_overlapping_objects_and_only_them():
    z = 6
    stack = np.zeros((z, 64, 64), np.int32)
    n = 0
    for k in range(z):  # object A drifts by a pixel a plane; B sits in planes 0-1 and again in 4-5
        centres = [(20, 15 + k)] + ([(45, 45)] if k in (0, 1, 4, 5) else [])
        plane = discs((64, 64), centres, 6)
        stack[k] = np.where(plane > 0, plane + n, 0)  # numbered across the stack, as `segment` does
        n += int(plane.max())
    out = stitch_planes(stack.copy())
    a = {int(out[k, 20, 15 + k]) for k in range(z)}
    assert len(a) == 1  # one object through all planes
    b_early, b_late = int(out[0, 45, 45]), int(out[4, 45, 45])
    assert out[1, 45, 45] == b_early and out[5, 45, 45] == b_late and b_early != b_late  # a gap: two objects
    assert sorted(np.unique(out).tolist()) == [0, 1, 2, 3]  # renumbered 1..K
    assert ((out > 0) == (stack > 0)).all()  # only the numbers change


def test_stitching_takes_the_best_match_once(tmp_path):
    """Two objects of plane 1 over one of plane 0: the one overlapping most takes its label; and the
    stack may be a memory map."""
    p0 = discs((40, 80), [(20, 30)], 12)
    p1 = np.zeros_like(p0)
    p1[discs((40, 80), [(20, 28)], 10) > 0] = 1
    p1[discs((40, 80), [(20, 48)], 5) > 0] = 2
    mm = np.lib.format.open_memmap(tmp_path / "l.npy", mode="w+", dtype=np.int32, shape=(2, 40, 80))
    mm[0], mm[1] = p0, np.where(p1 > 0, p1 + 1, 0)
    stitch_planes(mm)
    assert mm[1, 20, 28] == mm[0, 20, 30] and mm[1, 20, 48] not in (0, mm[0, 20, 30])


def test_a_low_overlap_is_not_linked():
    stack = np.stack([discs((40, 40), [(20, 14)], 6), discs((40, 40), [(20, 24)], 6) * 2])
    assert len(np.unique(stitch_planes(stack.copy(), iou=0.25))) == 3  # two objects + background
    assert len(np.unique(stitch_planes(stack.copy(), iou=0.01))) == 2


def test_small_3d_objects_go_and_the_rest_are_renumbered(tmp_path):
    """After linking: pieces under a share of the typical object's voxels (a nucleus's out-of-focus
    glow in one plane, fragments) are dropped, whatever the pixel size; nuclei cut by the volume's
    edge (half a nucleus) stay; and the stack may be a memory map."""
    from napari_zfdiffusion.core.masks import drop_small_volumes, typical_volume

    assert typical_volume([100, 100, 100, 1000, 1000]) == 1000  # the object the median voxel belongs to
    assert typical_volume([]) is None and typical_volume([0, 0]) is None
    z = 8
    stack = np.zeros((z, 80, 80), np.int32)
    for k in range(z):
        stack[k][discs((80, 80), [(20, 20)], 10) > 0] = 1  # a nucleus through every plane (~2500 voxels)
        stack[k][discs((80, 80), [(55, 55)], 10) > 0] = 3
        if k < 4:
            stack[k][discs((80, 80), [(20, 60)], 10) > 0] = 5  # cut by the volume's top: half a nucleus
    stack[7][discs((80, 80), [(60, 15)], 4) > 0] = 9  # glow: one plane, 49 voxels
    stack[2][discs((80, 80), [(40, 40)], 2) > 0] = 7  # a fragment
    mm = np.lib.format.open_memmap(tmp_path / "l.npy", mode="w+", dtype=np.int32, shape=stack.shape)
    mm[:] = stack
    assert drop_small_volumes(mm, 0.1) == 3
    assert sorted(np.unique(mm).tolist()) == [0, 1, 2, 3]  # renumbered 1..K in the old labels' order
    assert mm[0, 20, 20] == 1 and mm[0, 55, 55] == 2 and mm[0, 20, 60] == 3
    assert mm[7, 60, 15] == 0 and mm[2, 40, 40] == 0
    kept = stack.copy()
    assert drop_small_volumes(kept, 0.0) == 5  # 0: every object stays (renumbered)
    assert ((kept > 0) == (stack > 0)).all()
    coarse = stack[:, ::2, ::2].copy()  # the same scene at half the pixel size: the same objects go
    assert drop_small_volumes(coarse, 0.1) == 3


# ----------------------------------------------------------------------------- the segmenter
def blob_image(shape, radius, seed=0, n=6):
    rng = np.random.default_rng(seed)
    centres = [(int(rng.integers(radius + 2, shape[0] - radius - 2)), int(rng.integers(radius + 2, shape[1] - radius - 2)))
               for _ in range(n)]
    lab = discs(shape, centres, radius)
    img = ((lab > 0) * 0.6 + rng.random(shape) * 0.3) * 255
    return img.astype(np.uint8), lab


def test_the_card_says_the_training_object_size(tiny_segmenter):
    seg = Segmenter.load(tiny_segmenter, "cpu")
    assert 8 < seg.diameter < 16  # the blobs have radii 4-7


def test_a_diameter_rescales_and_labels_stay_on_the_image_grid(tiny_segmenter):
    seg = Segmenter.load(tiny_segmenter, "cpu")
    img, lab = blob_image((160, 192), radius=int(round(seg.diameter)), seed=3)  # objects twice the training size
    res = seg.segment(img, tile=64, overlap=16, diameter=2 * seg.diameter)
    assert res.labels.shape == img.shape and res.probability.shape == img.shape
    assert res.provenance["rescaled_by"] == pytest.approx(0.5)
    fg = res.labels > 0
    iou = (fg & (lab > 0)).sum() / (fg | (lab > 0)).sum()
    assert iou > 0.6
    auto = seg.segment(img, tile=64, overlap=16, diameter="auto")
    assert auto.provenance["diameter_px"] == pytest.approx(2 * seg.diameter, rel=0.35)
    assert any("diameter 'auto'" in n for n in auto.notices)
    same = seg.segment(img, tile=64, overlap=16, diameter=seg.diameter)  # the training size: not rescaled
    plain = seg.segment(img, tile=64, overlap=16)
    assert same.provenance["rescaled_by"] == 1.0 and np.array_equal(same.labels, plain.labels)


def test_a_volume_links_planes_and_planes_do_not(tiny_segmenter):
    seg = Segmenter.load(tiny_segmenter, "cpu")
    img, _ = blob_image((96, 96), radius=6, seed=1)
    stack = np.stack([img, img, img])
    planes = seg.segment(stack, tile=64, overlap=16, stack="planes")
    vol = seg.segment(stack, tile=64, overlap=16, stack="volume")
    k = int(planes.labels[0].max())
    assert k > 0 and planes.n_objects == 3 * k  # each plane its own labels
    assert vol.n_objects == k and np.array_equal(vol.labels[0], vol.labels[2])  # one 3D object each
    two = seg.segment(np.concatenate([stack, stack]), tile=64, overlap=16, stack="volume", depth=3)
    assert two.n_objects == 2 * k  # two volumes (time points): linked within each, not across
    assert not set(np.unique(two.labels[:3])[1:]) & set(np.unique(two.labels[3:])[1:])


def test_a_volume_drops_the_glow_of_a_nucleus_in_a_plane_of_its_own(tiny_segmenter):
    """A blob seen in one plane only (as out-of-focus glow is) is a 3D object of a few hundred voxels
    beside nuclei of thousands: the volume drops it by default, keeps it at 0, and says which."""
    seg = Segmenter.load(tiny_segmenter, "cpu")
    img, lab = blob_image((96, 96), radius=6, seed=1)
    rng = np.random.default_rng(5)
    empty = (rng.random(img.shape) * 0.3 * 255).astype(np.uint8)
    free = next((y, x) for y in range(8, 88, 4) for x in range(8, 88, 4)
                if not lab[max(0, y - 9):y + 10, max(0, x - 9):x + 10].any())  # where no nucleus lies
    lone = empty.copy()
    lone[discs(img.shape, [free], 6) > 0] = 200  # one blob in the last plane only
    stack = np.stack([img] * 12 + [lone])  # nuclei through 12 planes, the glow in one
    every = seg.segment(stack, tile=64, overlap=16, stack="volume", min_volume_fraction=0)
    default = seg.segment(stack, tile=64, overlap=16, stack="volume")
    assert default.provenance["min_volume_fraction"] == 0.1
    assert every.n_objects == default.n_objects + 1 and default.labels[12][free] == 0 < every.labels[12][free]
    assert np.array_equal(default.labels[:12] > 0, every.labels[:12] > 0)  # the nuclei are untouched
    for bad in (-0.1, 1.0, float("nan")):
        with pytest.raises(UserInputError, match="minimum volume fraction"):
            seg.segment(stack, tile=64, overlap=16, stack="volume", min_volume_fraction=bad)


@pytest.mark.parametrize("kw, message", [
    ({"diameter": 0}, "must be a positive number"),
    ({"diameter": -5}, "must be a positive number"),
    ({"diameter": 500}, "larger than the image"),
    ({"diameter": "big"}, "a number of pixels or 'auto'"),
    ({"diameter": 0.5}, "more than 8x"),
    ({"stack": "volume"}, "single plane: it cannot be segmented as a volume"),
    ({"stack": "cube"}, "stack must be 'planes' or 'volume'"),
])
def test_bad_sizes_and_stacks_are_refused(tiny_segmenter, kw, message):
    seg = Segmenter.load(tiny_segmenter, "cpu")
    img, _ = blob_image((96, 96), radius=6)
    with pytest.raises(UserInputError, match=message):
        seg.segment(img, tile=64, overlap=16, **kw)


def test_a_model_without_a_size_says_so(tiny_segmenter, tmp_path):
    import shutil

    old = tmp_path / "old"
    shutil.copytree(tiny_segmenter, old)
    card = json.loads((old / "model.json").read_text())
    card.pop("object_diameter_px")
    (old / "model.json").write_text(json.dumps(card))
    img, _ = blob_image((96, 96), radius=6)
    with pytest.raises(UserInputError, match="does not say the size of the objects"):
        Segmenter.load(old, "cpu").segment(img, tile=64, overlap=16, diameter=12)


# ----------------------------------------------------------------------------- the CLI
def test_cli_segments_a_zstack_as_a_volume_by_default(tiny_segmenter, tmp_path, capsys):
    img, _ = blob_image((96, 96), radius=6, seed=2)
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, np.stack([img] * 4), imagej=True, metadata={"axes": "ZYX"})
    out = tmp_path / "labels.tif"
    assert cli.main(["-q", "segment", "--model", str(tiny_segmenter), "--in", str(path), "--out", str(out),
                     "--tile", "64", "--overlap", "16", "--device", "cpu"]) == 0
    said = capsys.readouterr().out
    lab = tifffile.imread(out)
    assert np.array_equal(lab[0], lab[3]) and lab.max() == len(np.unique(lab[0])) - 1
    assert "as a volume" in said and "z-step" in said  # no z-step in the file: a note says how to set it
    assert cli.main(["-q", "segment", "--model", str(tiny_segmenter), "--in", str(path), "--out", str(out),
                     "--tile", "64", "--overlap", "16", "--device", "cpu", "--stack", "planes"]) == 0
    assert tifffile.imread(out).max() == 4 * lab.max()
    bad = tmp_path / "bad.tif"
    assert cli.main(["-q", "segment", "--model", str(tiny_segmenter), "--in", str(path), "--out", str(bad),
                     "--device", "cpu", "--min-volume-fraction", "1.5"]) == 2
    assert "--min-volume-fraction must be at least 0 and below 1" in capsys.readouterr().err and not bad.exists()


def test_cli_time_series_are_planes_and_diameters_in_micrometres(tiny_segmenter, tmp_path, capsys):
    seg = Segmenter.load(tiny_segmenter, "cpu")
    img, _ = blob_image((128, 128), radius=int(round(seg.diameter)), seed=4)
    path = tmp_path / "movie.tif"
    tifffile.imwrite(path, np.stack([img] * 2), imagej=True, metadata={"axes": "TYX", "unit": "um"},
                     resolution=(2.0, 2.0))  # 0.5 um pixels
    out = tmp_path / "labels.tif"
    d_um = 2 * seg.diameter * 0.5  # objects of 2x the training size, in micrometres
    assert cli.main(["-q", "segment", "--model", str(tiny_segmenter), "--in", str(path), "--out", str(out),
                     "--tile", "64", "--overlap", "16", "--device", "cpu", "--diameter-um", str(d_um)]) == 0
    lab = tifffile.imread(out)
    assert lab.max() == 2 * len(np.unique(lab[0][lab[0] > 0]))  # time points: labelled apart
    from napari_zfdiffusion.core.io import read_provenance

    assert read_provenance(out)["rescaled_by"] == pytest.approx(0.5, rel=0.02)
    capsys.readouterr()
    assert cli.main(["-q", "segment", "--model", str(tiny_segmenter), "--in", str(path), "--out", str(out),
                     "--device", "cpu", "--stack", "volume"]) == 2
    assert "time series" in capsys.readouterr().err
    plain = tmp_path / "plain.tif"
    tifffile.imwrite(plain, img)
    assert cli.main(["-q", "segment", "--model", str(tiny_segmenter), "--in", str(plain), "--out", str(out),
                     "--device", "cpu", "--diameter-um", "5"]) == 2
    assert "pixel size" in capsys.readouterr().err


# ----------------------------------------------------------------------------- training augmentation
def test_zoomed_crops_are_other_sizes_of_the_same_data(tmp_path):
    import torch

    from conftest import make_blobs
    from napari_zfdiffusion.core.images import Normalisation
    from napari_zfdiffusion.core.segment.train import augment_blur, zoomed_crops
    from napari_zfdiffusion.core.training.patches import PatchData

    imgs, masks = make_blobs(tmp_path / "b", n=2, shape=(160, 160))
    data = PatchData.from_paths(imgs, masks, patch=32, norm=Normalisation(1, 99.8, per="image"), segmentation=True,
                                val_fraction=0.0)
    a = zoomed_crops(data, 6, 64, torch.Generator().manual_seed(0), (0.5, 2.0))
    b = zoomed_crops(data, 6, 64, torch.Generator().manual_seed(0), (0.5, 2.0))
    assert a.shape == (6, 3, 64, 64) and torch.equal(a, b)  # reproducible from the generator
    assert a.min() >= -1 and a.max() <= 1
    fg = ((a[:, 1] + 1) / 2).mean((1, 2))  # objects' share of each crop varies with the zoom
    none = zoomed_crops(data, 6, 64, torch.Generator().manual_seed(0), (1.0, 1.0))
    assert torch.equal(none, data.random_crops(6, 64, torch.Generator().manual_seed(0)))
    assert fg.std() > 0
    x = a[:, :1]
    blurred = augment_blur(x, torch.Generator().manual_seed(1), 1.5)
    changed = [(blurred[i] != x[i]).any().item() for i in range(6)]
    assert 0 < sum(changed) < 6  # about a third of the crops
    for i in range(6):
        if changed[i]:
            assert blurred[i].std() < x[i].std()  # blur smooths
    assert torch.equal(augment_blur(x, torch.Generator().manual_seed(1), 0.0), x)


@pytest.mark.parametrize("kw, message", [({"zoom_aug": (0.05, 2)}, "--zoom-aug"), ({"zoom_aug": (2, 1)}, "--zoom-aug"),
                                         ({"blur_aug": -1}, "--blur-aug")])
def test_bad_augmentation_options(kw, message):
    from napari_zfdiffusion.core.segment.train import UnetConfig

    with pytest.raises(UserInputError, match=message):
        UnetConfig(**kw).validate()


def test_the_boundary_offset_says_outside_and_inside():
    from scipy import ndimage as ndi

    from napari_zfdiffusion.evaluation.generalist import boundary_offset

    truth = discs((64, 64), [(32, 32)], 10)
    for grow, sign in ((0, 0), (2, 1), (-2, -1)):
        pred = truth.copy()
        if grow > 0:
            pred = ndi.binary_dilation(truth, iterations=grow).astype(int)
        if grow < 0:
            pred = ndi.binary_erosion(truth, iterations=-grow).astype(int)
        s, n = boundary_offset(pred, truth)
        assert n > 0 and np.sign(round(s / n, 1)) == sign
        if grow:
            assert 1.4 < abs(s / n) < 2.1


# ----------------------------------------------------------------------------- the centre target
@pytest.mark.parametrize("radius", [5, 12, 30])
def test_centre_targets_keep_touching_objects_apart_at_any_size(radius):
    """The normalised distance to the edge: 1 at each object's middle, 0 on the background and where
    two objects touch; its cores (>= 0.5) seed one object each, small or large."""
    from napari_zfdiffusion.core.masks import center_map, instances, targets_from_mask

    side = 8 * radius + 16
    lab = discs((side, side), [(side // 2, side // 2 - radius), (side // 2, side // 2 + radius)], radius)
    c = center_map(lab)
    assert c.dtype == np.float32 and c[lab == 0].max() == 0.0
    for k in (1, 2):
        assert c[lab == k].max() == pytest.approx(1.0)
    assert c[side // 2, side // 2] < 0.2  # where they touch
    fg, centre = targets_from_mask(lab, "center")
    got = instances(fg, centre)
    assert got.max() == 2
    for k in (1, 2):  # each found object is one of the discs
        best = max(((got == j) & (lab == k)).sum() / ((got == j) | (lab == k)).sum() for j in (1, 2))
        assert best > 0.9
    # a binary mask has no instances to tell apart: its connected components are the objects
    binary = center_map(lab > 0)
    assert binary.max() == pytest.approx(1.0) and np.count_nonzero(binary > 0.99) >= 1


def test_centre_targets_of_a_crop_are_those_of_the_whole_mask(tmp_path):
    """Crops read from disk with a margin give the centre targets of the whole mask (objects smaller
    than the margin), so a crop is what the whole image teaches."""
    import torch

    from conftest import make_blobs
    from napari_zfdiffusion.core.images import Normalisation
    from napari_zfdiffusion.core.masks import targets_from_mask
    from napari_zfdiffusion.core.training.patches import PatchData

    imgs, masks = make_blobs(tmp_path / "b", n=1, shape=(120, 140))
    data = PatchData.from_paths(imgs, masks, patch=32, norm=Normalisation(1, 99.8, per="image"),
                                segmentation="center", val_fraction=0.0)
    assert data.channels == ["image", "foreground", "center"]
    whole = targets_from_mask(tifffile.imread(next(masks.glob("*.tif"))), "center")
    win = data.window(0, 30, 94, 40, 104)
    assert torch.allclose((win[1:] + 1) / 2, torch.from_numpy(whole[:, 30:94, 40:104]), atol=1e-6)


def test_renormalised_crops_stretch_an_empty_field():
    """augment_renorm: a share of the crops percentile-normalised on their own, as an empty field of
    a user's image is (its faint noise then fills the range); reproducible, and 0 changes nothing."""
    import torch

    from napari_zfdiffusion.core.segment.train import augment_renorm

    g = torch.Generator().manual_seed(0)
    x = -0.9 + 0.02 * torch.rand((16, 1, 32, 32), generator=g)  # dark, nearly flat fields
    a = augment_renorm(x, torch.Generator().manual_seed(3), 0.5)
    b = augment_renorm(x, torch.Generator().manual_seed(3), 0.5)
    assert torch.equal(a, b)
    changed = [not torch.equal(a[i], x[i]) for i in range(16)]
    assert 0 < sum(changed) < 16
    for i in range(16):
        if changed[i]:
            assert a[i].min() == -1 and a[i].max() == 1  # stretched to the whole range
    assert torch.equal(augment_renorm(x, g, 0.0), x)
    assert a.dtype == x.dtype and a.shape == x.shape


@pytest.mark.parametrize("kw, message", [({"inner": "edges"}, "--inner"), ({"renorm_aug": 1.5}, "--renorm-aug")])
def test_bad_target_options(kw, message):
    from napari_zfdiffusion.core.segment.train import UnetConfig

    with pytest.raises(UserInputError, match=message):
        UnetConfig(**kw).validate()
