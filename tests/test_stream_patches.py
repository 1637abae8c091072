"""Patch training data that streams (the autoencoder, latent diffusion and the U-Net): images and masks
stay on disk in their dtype, each image's percentiles are exact and computed once, crops are read
window by window, and a torchrun rank reads only its own images.

Exactness is checked against the in-memory data set this replaced, recomputed here the old way
(whole images read, normalised and encoded, then cut): the same crops bit for bit, for the same
generator. Memory is checked by counting the bytes the data set holds."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from napari_zfdiffusion.core.errors import UserInputError
from napari_zfdiffusion.core.images import (
    Normalisation,
    check_finite,
    model_space,
    random_dihedral,
    to_gray,
)
from napari_zfdiffusion.core.io import list_images
from napari_zfdiffusion.core.masks import encode_mask, mask_encoding, targets_from_mask
from napari_zfdiffusion.core.reader import open_image
from napari_zfdiffusion.core.training import patches
from napari_zfdiffusion.core.training.patches import PatchData


# ----------------------------------------------------------------------------- the old, in-memory way
def _read_whole(paths, notices, channel=None, axes=None):
    out, names = [], []
    for f in list_images(paths):
        planes = open_image(f, channel=channel, axes=axes).planes()
        for i in range(len(planes)):
            p = to_gray(np.asarray(planes[i]), f.name, notices if i == 0 else [])
            check_finite(p, f.name)
            out.append(p.astype(np.float32))
            names.append(f"{f.name}[{i}]" if len(planes) > 1 else f.name)
    return out, names


def old_tensors(images, masks=None, *, patch, norm=None, val_fraction=0.2, segmentation=False, channel=None,
                axes=None):
    """Training and validation (C, H, W) tensors, and the notices, as PatchData had them in memory."""
    norm = norm or Normalisation(per="image")
    notices: list[str] = []
    imgs, _ = _read_whole(images, notices, channel, axes)
    chans = [torch.from_numpy(model_space(i, norm))[None] for i in imgs]
    encoding = None
    if masks is not None:
        mks, mnames = _read_whole(masks, notices)
        encoding = mask_encoding(mks)
        empty = [nb for m, nb in zip(mks, mnames) if not np.any(encode_mask(m, "binary") >= 0.5)]
        if empty:
            notices.append(f"{len(empty)} of {len(mks)} mask(s) are empty ({', '.join(empty[:3])}"
                           f"{', ...' if len(empty) > 3 else ''}): those images teach background only")
        if segmentation:
            chans = [torch.cat([c, torch.from_numpy(targets_from_mask(m) * 2.0 - 1.0)]) for c, m in zip(chans, mks)]
        if encoding == "interior":
            notices.append("masks are label images: the model learns each object's interior, so touching "
                           "objects stay separate")
        if not segmentation:
            chans = [torch.cat([c, torch.from_numpy(encode_mask(m, encoding) * 2.0 - 1.0)[None]])
                     for c, m in zip(chans, mks)]
    n = len(chans)
    if val_fraction <= 0:
        train, val = chans, []
    elif n >= 5:
        k = max(1, round(n * val_fraction))
        train, val = chans[: n - k], chans[n - k:]
    else:
        train, val = [], []
        for c in chans:
            h = c.shape[1]
            if h >= 2 * patch:
                cut = h - max(patch, round(h * val_fraction))
                train.append(c[:, :cut])
                val.append(c[:, cut:])
            else:
                train.append(c)
        if not val:
            notices.append(f"no validation split: images need at least {2 * patch} rows, or give 5 or more images")
    return train, val, encoding, notices


def old_random_crops(train, n, crop, gen, augment=True):
    areas = torch.tensor([max(1, (t.shape[1] - crop + 1) * (t.shape[2] - crop + 1)) for t in train],
                         dtype=torch.float64)
    which = torch.multinomial(areas, n, replacement=True, generator=gen)
    out = []
    for i in which.tolist():
        t = train[i]
        y = int(torch.randint(0, t.shape[1] - crop + 1, (1,), generator=gen))
        x = int(torch.randint(0, t.shape[2] - crop + 1, (1,), generator=gen))
        c = t[:, y:y + crop, x:x + crop]
        out.append(random_dihedral(c, gen) if augment else c)
    return torch.stack(out)


def old_val_crops(val, crop, limit=64):
    out = [t[:, y:y + crop, x:x + crop] for t in val
           for y in range(0, t.shape[1] - crop + 1, crop) for x in range(0, t.shape[2] - crop + 1, crop)]
    if not out:
        return None
    idx = np.linspace(0, len(out) - 1, min(limit, len(out))).round().astype(int)
    return torch.stack([out[i] for i in sorted(set(idx.tolist()))])


# ----------------------------------------------------------------------------- data
def touching_labels(rng, shape, k=9, background=0.35):
    """Label image of ``k`` objects that touch (nearest seed), with some background between them."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    seeds = rng.random((k, 2)) * shape
    d = (yy[None] - seeds[:, 0, None, None]) ** 2 + (xx[None] - seeds[:, 1, None, None]) ** 2
    lab = (np.argmin(d, 0) + 1).astype(np.uint16)
    lab[np.min(d, 0) > (background * min(shape)) ** 2] = 0
    return lab


def write_set(folder: Path, kind: str) -> tuple[Path, Path | None]:
    rng = np.random.default_rng(sum(map(ord, kind)))
    img_dir, mask_dir = folder / "images", folder / "masks"
    img_dir.mkdir(parents=True)
    mask_dir.mkdir()
    if kind == "labels_five":  # 6 uint16 images, touching labels; one file compressed (a chunked Zarr view)
        for i in range(6):
            shape = (70 + 3 * i, 90 - 2 * i)
            img = (rng.random(shape) ** 3 * 60000).astype(np.uint16)
            tifffile.imwrite(img_dir / f"a{i}.tif", img, compression="zlib" if i == 2 else None)
            tifffile.imwrite(mask_dir / f"a{i}.tif", touching_labels(rng, shape))
    elif kind == "mixed_tall":  # 3 tall images: labels, a 0/255 binary mask, probabilities in [0, 1]
        for i in range(3):
            shape = (100, 61 + i)
            tifffile.imwrite(img_dir / f"b{i}.tif", (rng.random(shape) * 255).astype(np.uint8))
        tifffile.imwrite(mask_dir / "b0.tif", touching_labels(rng, (100, 61)))
        tifffile.imwrite(mask_dir / "b1.tif", ((touching_labels(rng, (100, 62)) % 2) * 255).astype(np.uint8))
        tifffile.imwrite(mask_dir / "b2.tif", rng.random((100, 63)).astype(np.float32))
    elif kind == "float_stack":  # float images (a stack and a plane); probabilities first, then labels
        tifffile.imwrite(img_dir / "c0.tif", (rng.normal(size=(3, 72, 80)) * 50 - 20).astype(np.float32))
        tifffile.imwrite(img_dir / "c1.tif", rng.normal(size=(80, 72)).astype(np.float64))
        tifffile.imwrite(mask_dir / "c0.tif", rng.random((3, 72, 80)).astype(np.float32))
        tifffile.imwrite(mask_dir / "c1.tif", touching_labels(rng, (80, 72)).astype(np.int32) * 3 - 5)
    elif kind == "rgb_png":
        from PIL import Image

        for i in range(2):
            Image.fromarray((rng.random((72, 64, 3)) * 255).astype(np.uint8)).save(img_dir / f"d{i}.png")
        return img_dir, None
    return img_dir, mask_dir


CASES = {  # kind: (from_paths keywords, crop)
    "labels_five": ({"patch": 32}, 24),
    "mixed_tall": ({"patch": 40, "segmentation": True}, 32),
    "float_stack": ({"patch": 32, "norm": Normalisation(2.0, 97.5, per="image")}, 30),
    "rgb_png": ({"patch": 32}, 32),
}


@pytest.mark.parametrize("kind", list(CASES))
def test_streamed_crops_equal_the_in_memory_ones(tmp_path, kind):
    kw, crop = CASES[kind]
    imgs, masks = write_set(tmp_path, kind)
    d = PatchData.from_paths(imgs, masks, **kw)
    train, val, encoding, notices = old_tensors(imgs, masks, **kw)
    assert d.mask_encoding == encoding and d.notices == notices
    assert len(d.train) == len(train) and len(d.val) == len(val) and len(val) > 0
    for new, old in [*zip(d.train, train), *zip(d.val, val)]:  # whole images, read one at a time
        assert new.dtype == torch.float32 and torch.equal(new, old)
    assert d.train.shapes == [tuple(t.shape) for t in train]
    for seed, augment in [(0, True), (1, False), (2, True)]:
        a = d.random_crops(24, crop, torch.Generator().manual_seed(seed), augment=augment)
        b = old_random_crops(train, 24, crop, torch.Generator().manual_seed(seed), augment=augment)
        assert torch.equal(a, b)
    for limit in (64, 3):
        assert torch.equal(d.val_crops(crop, limit), old_val_crops(val, crop, limit))
    if kind != "rgb_png":
        assert d.held_bytes() == 0


def test_mask_windows_cut_through_touching_objects(tmp_path):
    """Every window position of a label mask: the interior (which needs the neighbours) equals the
    whole mask's, including at the image's borders."""
    imgs, masks = write_set(tmp_path, "labels_five")
    for seg in (False, True):
        d = PatchData.from_paths(imgs, masks, patch=32, segmentation=seg, val_fraction=0)
        train, *_ = old_tensors(imgs, masks, patch=32, segmentation=seg, val_fraction=0)
        whole = train[1]
        h, w = whole.shape[1:]
        for y0, y1, x0, x1 in [(0, 16, 0, 16), (0, h, w - 9, w), (h - 5, h, 3, 40), (17, 41, 29, 60), (1, 2, 1, 2)]:
            assert torch.equal(d.window(1, y0, y1, x0, x1), whole[:, y0:y1, x0:x1])


def test_ome_tzyx_and_a_channel_of_a_two_channel_file(tmp_path):
    rng = np.random.default_rng(0)
    tzcyx = (rng.random((3, 4, 2, 40, 48)) * 1000).astype(np.uint16)
    (tmp_path / "i").mkdir()
    (tmp_path / "m").mkdir()
    tifffile.imwrite(tmp_path / "i" / "movie.ome.tif", tzcyx[:, :, 0], ome=True, metadata={"axes": "TZYX"})
    labels = np.stack([[touching_labels(rng, (40, 48)) for _ in range(4)] for _ in range(3)])
    tifffile.imwrite(tmp_path / "m" / "movie.ome.tif", labels, ome=True, metadata={"axes": "TZYX"})
    d = PatchData.from_paths(tmp_path / "i", tmp_path / "m", patch=32)
    assert len(d.names) == 12 and d.names[5] == "movie.ome.tif[5]" and d.split == "last 2 of 12 images held out"
    train, val, *_ = old_tensors(tmp_path / "i", tmp_path / "m", patch=32)
    g = [torch.Generator().manual_seed(4) for _ in range(2)]
    assert torch.equal(d.random_crops(16, 32, g[0]), old_random_crops(train, 16, 32, g[1]))
    assert torch.equal(d.val[1], val[1])
    np.testing.assert_array_equal(d.train[5][0].numpy(), model_space(tzcyx[1, 1, 0], Normalisation(per="image")))

    f = tmp_path / "two.ome.tif"
    tifffile.imwrite(f, tzcyx[0], ome=True, metadata={"axes": "ZCYX"})
    with pytest.raises(UserInputError, match="2 channels"):
        PatchData.from_paths(f, patch=32)
    d = PatchData.from_paths(f, patch=32, channel=1, val_fraction=0)
    assert d.names == [f"two.ome.tif[{z}]" for z in range(4)]
    for z in range(4):
        np.testing.assert_array_equal(d.train[z][0].numpy(), model_space(tzcyx[0, z, 1], Normalisation(per="image")))
    train, *_ = old_tensors(f, patch=32, channel=1, val_fraction=0)
    g = [torch.Generator().manual_seed(9) for _ in range(2)]
    assert torch.equal(d.random_crops(10, 24, g[0]), old_random_crops(train, 10, 24, g[1]))


# ----------------------------------------------------------------------------- memory
def small_files(folder: Path, n: int, shape) -> tuple[Path, Path]:
    rng = np.random.default_rng(1)
    (folder / "i").mkdir(parents=True)
    (folder / "m").mkdir()
    for i in range(n):
        tifffile.imwrite(folder / "i" / f"s{i:03d}.tif", (rng.random(shape) * 4000).astype(np.uint16))
        tifffile.imwrite(folder / "m" / f"s{i:03d}.tif", touching_labels(rng, shape, k=4))
    return folder / "i", folder / "m"


def _retained(fn) -> tuple[object, int]:
    """``fn()`` and the bytes it leaves allocated (tracemalloc; NumPy's arrays are traced)."""
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        out = fn()
        return out, tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()


def test_many_files_are_not_held(tmp_path):
    """300 image + mask pairs of 192 x 256 pixels: 118 MB as the float32 tensors the in-memory data set
    held; the streaming one holds no pixels, keeps at most KEEP_OPEN files open, and what it keeps
    (names, shapes, two numbers per image, the open files' metadata: about 1 MB) does not grow with
    the size of the images."""
    n, shape = 300, (48, 64)
    imgs, masks = small_files(tmp_path / "small", n, shape)
    d, kept_small = _retained(lambda: PatchData.from_paths(imgs, masks, patch=32))
    assert d.held_bytes() == 0 and len(d.stats) == len(d.names) == n
    assert len(d.images._open) <= patches.KEEP_OPEN and len(d.masks._open) <= patches.KEEP_OPEN
    x = d.random_crops(64, 32, torch.Generator().manual_seed(0))
    assert x.shape == (64, 2, 32, 32) and d.held_bytes() == 0 and len(d.images._open) <= patches.KEEP_OPEN

    big = (4 * shape[0], 4 * shape[1])  # 16x the pixels
    big_imgs, big_masks = small_files(tmp_path / "big", n, big)
    d_big, kept_big = _retained(lambda: PatchData.from_paths(big_imgs, big_masks, patch=32))
    float_bytes = n * 2 * big[0] * big[1] * 4
    assert d_big.held_bytes() == 0 and kept_big < float_bytes / 50
    assert kept_big < kept_small * 1.25 + 65536  # not 16x


def test_files_beyond_the_open_limit_are_reopened(tmp_path, monkeypatch):
    monkeypatch.setattr(patches, "KEEP_OPEN", 2)
    imgs, masks = write_set(tmp_path, "labels_five")
    d = PatchData.from_paths(imgs, masks, patch=32)
    train, *_ = old_tensors(imgs, masks, patch=32)
    a = d.random_crops(30, 24, torch.Generator().manual_seed(7))
    assert torch.equal(a, old_random_crops(train, 30, 24, torch.Generator().manual_seed(7)))
    assert len(d.images._open) <= 2 and len(d.masks._open) <= 2


# ----------------------------------------------------------------------------- sharding
def test_a_rank_reads_only_its_own_images(tmp_path):
    imgs, masks = write_set(tmp_path, "labels_five")  # 6 images: 5 train, 1 held out
    train, *_ = old_tensors(imgs, masks, patch=32)
    for rank, mine in [(0, [0, 2, 4]), (1, [1, 3])]:
        d = PatchData.from_paths(imgs, masks, patch=32, rank=rank, world=2)
        assert d.mine == mine and len(d.train) == len(mine)
        assert sorted(d.stats) == (mine + [5] if rank == 0 else mine)  # rank 0 also validates
        g = [torch.Generator().manual_seed(3) for _ in range(2)]
        assert torch.equal(d.random_crops(12, 24, g[0]), old_random_crops([train[i] for i in mine], 12, 24, g[1]))
        assert d.describe() == PatchData.from_paths(imgs, masks, patch=32).describe()
    d = PatchData.from_paths(imgs, masks, patch=32, rank=3, world=8)  # fewer images than ranks: all of them
    assert d.mine == [0, 1, 2, 3, 4] and sorted(d.stats) == [0, 1, 2, 3, 4]


CHILD = r"""
import json, os, sys
import torch.distributed as dist
from napari_zfdiffusion.core.training import patches
dist.init_process_group("gloo")
rank = dist.get_rank()
seen = []
real = patches.scan_mask
patches.scan_mask = lambda plane, name: (seen.append(name), real(plane, name))[1]
d = patches.PatchData.from_paths(sys.argv[1], sys.argv[2], patch=40, segmentation=True, rank=rank, world=2)
json.dump({"scanned": seen, "mine": d.mine, "stats": sorted(d.stats), "encoding": d.mask_encoding,
           "notices": d.notices, "values": [list(map(float, (v.lo, v.hi))) + [v.integral, v.many]
                                            for v in d.mask_values]},
          open(os.path.join(sys.argv[3], f"rank{rank}.json"), "w"))
dist.destroy_process_group()
"""


def test_under_torchrun_each_rank_scans_its_own_masks(tmp_path):
    imgs, masks = write_set(tmp_path, "mixed_tall")  # 3 images, bottom rows held out
    empty = np.zeros((100, 62), np.uint8)
    tifffile.imwrite(masks / "b1.tif", empty)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, str(imgs), str(masks), str(tmp_path)],
                              env={**os.environ, "RANK": str(r), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                                   "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}) for r in range(2)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    assert r0["scanned"] == ["b0.tif", "b2.tif"] and r1["scanned"] == ["b1.tif"]
    assert r0["mine"] == [0, 2] and r1["mine"] == [1] and r0["stats"] == [0, 1, 2] and r1["stats"] == [1]
    one = PatchData.from_paths(imgs, masks, patch=40, segmentation=True)
    for r in (r0, r1):
        assert r["encoding"] == one.mask_encoding and r["notices"] == one.notices
        assert r["values"] == [list(map(float, (v.lo, v.hi))) + [v.integral, v.many] for v in one.mask_values]
    assert "1 of 3 mask(s) are empty (b1.tif)" in one.notices[0]


# ----------------------------------------------------------------------------- bad input, as before
def test_nan_in_an_image_or_a_mask_is_refused_as_before(tmp_path):
    imgs, masks = write_set(tmp_path, "float_stack")
    bad = tifffile.imread(imgs / "c1.tif")
    bad[3, :5] = np.nan
    tifffile.imwrite(imgs / "c1.tif", bad)
    with pytest.raises(UserInputError) as old:
        old_tensors(imgs, None, patch=32)
    with pytest.raises(UserInputError) as new:
        PatchData.from_paths(imgs, patch=32)
    assert str(new.value) == str(old.value) == "c1.tif holds 5 NaN or infinite value(s): replace them (e.g. with 0) first."
    tifffile.imwrite(imgs / "c1.tif", np.nan_to_num(bad))
    m = tifffile.imread(masks / "c0.tif")
    m[1, 7, :2] = np.inf
    tifffile.imwrite(masks / "c0.tif", m)
    with pytest.raises(UserInputError, match=r"^c0.tif holds 2 NaN or infinite"):
        PatchData.from_paths(imgs, masks, patch=32)


def _mapped_kb(folder: Path) -> int:
    """Resident kB of this process's mappings of the files in ``folder`` (Linux /proc/self/smaps)."""
    total, current = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()
        if head and "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
            current = len(head) >= 6 and head[-1].startswith(str(folder))
        elif current and line.startswith("Rss:"):
            total += int(head[1])
    return total


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="Linux only")
def test_pages_the_crops_read_do_not_pile_up(tmp_path):
    """Memory-mapped pages touched by the statistics pass and by each batch of crops are unmapped after
    it (they stay in the page cache), so resident memory does not grow as training reads the files."""
    rng = np.random.default_rng(2)
    (tmp_path / "i").mkdir()
    (tmp_path / "m").mkdir()
    for i in range(3):
        tifffile.imwrite(tmp_path / "i" / f"s{i}.tif", (rng.random((1024, 1024)) * 4000).astype(np.uint16))
        tifffile.imwrite(tmp_path / "m" / f"s{i}.tif", touching_labels(rng, (1024, 1024), k=12))
    d = PatchData.from_paths(tmp_path / "i", tmp_path / "m", patch=64)
    assert _mapped_kb(tmp_path) == 0
    d.window(0, 0, 512, 0, 512)  # a read without a release: its pages are mapped
    assert _mapped_kb(tmp_path) > 512
    for seed in range(3):
        d.random_crops(8, 128, torch.Generator().manual_seed(seed))
        assert _mapped_kb(tmp_path) == 0 and d.held_bytes() == 0
    assert d.val_crops(64) is not None and _mapped_kb(tmp_path) == 0
    assert d.train[1].shape == (2, 819, 1024) and _mapped_kb(tmp_path) == 0  # rows above the held-out ones
