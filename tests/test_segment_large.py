"""Big single planes (issue 12, part 6): segmentation in horizontal strips gives the whole-plane
result with the memory of a few strips. The strip path is forced on small images here by setting a
Segmenter's ``strip_threshold`` to 0 and ``strip_pixels`` to a few rows; the measured memory of real
sizes (9000^2, 16384^2) is in benchmarks/bench_segment_large.py and docs/benchmarks.md."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import torch
from scipy import ndimage as ndi

from napari_zfdiffusion.core.errors import Cancelled, UserInputError
from napari_zfdiffusion.core.images import Normalisation
from napari_zfdiffusion.core.masks import StripInstances, instances
from napari_zfdiffusion.core.metrics import match_objects
from napari_zfdiffusion.core.segment import Segmenter
from napari_zfdiffusion.core.segment.segmenter import plane_limits
from napari_zfdiffusion.core.tiling import predict_tiled, predict_tiled_rows


@pytest.fixture(scope="module")
def seg(tmp_path_factory):
    """A tiny U-Net with the interior target: it gives the big disc of these tests (6x the size of its
    training blobs) one seed, so an object across many strips can be checked; the centre target
    splits a disc that far from its training size (use the diameter for that), which is not what
    these tests are about. The strip logic is the same for both targets."""
    from conftest import make_tiny_segmenter

    return Segmenter.load(make_tiny_segmenter(tmp_path_factory.mktemp("m") / "unet", inner="interior"), "cpu")


@pytest.fixture
def strips(seg, monkeypatch):
    """``strips(rows, width)``: segment every plane in strips of about ``rows`` rows."""

    def use(rows: int, width: int) -> Segmenter:
        monkeypatch.setattr(seg, "strip_threshold", 0)
        monkeypatch.setattr(seg, "strip_pixels", rows * width)
        return seg

    return use


def whole(seg: Segmenter, image, **kw):
    """The whole-plane path (today's), whatever the plane's size."""
    old = seg.strip_threshold
    seg.strip_threshold = 10**12
    try:
        return seg.segment(image, **kw)
    finally:
        seg.strip_threshold = old


def blob_image(h: int, w: int, seed: int = 0, big: tuple[int, int, int] | None = None) -> np.ndarray:
    """uint8 bright discs (radius 4-11) on noise, as the tiny model was trained on; ``big``: one more
    disc (cy, cx, r), e.g. one that spans several strips."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    img = rng.random((h, w)) * 0.3
    for _ in range(h * w // 300):
        cy, cx, r = rng.integers(0, h), rng.integers(0, w), rng.integers(4, 12)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] += 0.6
    if big is not None:
        cy, cx, r = big
        img[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = 0.9
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def same_objects(a: np.ndarray, b: np.ndarray, pixels: float = 1e-3) -> None:
    """Labels equal, or (watershed ties, see masks.StripInstances) the same objects with at most a
    share ``pixels`` of the foreground on the other side of a contact."""
    if np.array_equal(a, b):
        return
    assert a.max() == b.max()
    assert match_objects(a, b)["f1"] >= 0.99
    assert (a != b).sum() <= pixels * max(1, (a > 0).sum())


# ----------------------------------------------------------------------------- normalisation limits
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int16, np.float32, np.float64, np.int32])
def test_plane_limits_are_numpys_percentiles_exactly(dtype):
    """Histograms of the values give np.percentile's limits to the last bit, band by band."""
    rng = np.random.default_rng(1)
    norm = Normalisation()
    for k in range(6):
        h, w = rng.integers(8, 90, 2)
        if np.issubdtype(dtype, np.integer):
            hi = min(np.iinfo(dtype).max, 70000)
            a = rng.integers(0, hi, (h, w)) if k % 2 else rng.integers(0, 4, (h, w))
        else:
            a = rng.standard_normal((h, w)) * 10.0 ** rng.uniform(-4, 4) if k % 2 else np.round(rng.random((h, w)), 1)
        a = a.astype(dtype)
        lo, hi_, constant = plane_limits(a, norm, rows=int(rng.integers(1, 20)))
        ref = [float(v) for v in np.percentile(np.array(a, np.float32), [norm.low, norm.high])]
        assert (lo, hi_) == (ref[0], ref[1] if ref[1] > ref[0] else ref[0] + 1.0)
        assert constant == (not norm.apply(a).any())
    assert plane_limits(np.full((20, 30), 7, dtype), norm)[2]


def test_plane_limits_refuse_nan_counting_the_whole_plane():
    a = np.ones((50, 40), np.float32)
    a[3, 3] = np.nan
    a[45, 1] = np.inf
    with pytest.raises(UserInputError, match="cells.tif holds 2 NaN"):
        plane_limits(a, Normalisation(), rows=10, name="cells.tif")


# ----------------------------------------------------------------------------- prediction by rows
@pytest.mark.parametrize(("h", "w", "tile", "overlap", "align", "band", "batch"),
                         [(300, 200, 64, 16, 1, 40, 3), (301, 157, 64, 16, 8, 1, 4), (50, 40, 64, 16, 8, 5, 4),
                          (333, 50, 32, 12, 16, 7, 5)])
def test_rows_equal_the_whole_plane_bit_for_bit(h, w, tile, overlap, align, band, batch):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 5, padding=2), torch.nn.ReLU(),
                              torch.nn.Conv2d(4, 2, 5, padding=2)).eval()
    img = np.random.default_rng(0).random((h, w), dtype=np.float32)
    kw = {"tile": tile, "overlap": overlap, "out_channels": 2, "batch": batch, "align": align}
    ref = predict_tiled(lambda x: torch.sigmoid(net(x)), img, **kw)
    reads, out, end = [], np.full_like(ref, np.nan), 0
    for r0, r1, block in predict_tiled_rows(lambda x: torch.sigmoid(net(x)), lambda a, b: reads.append((a, b)) or img[a:b],
                                            (h, w), band_rows=band, **kw):
        assert r0 == end and (r1 - r0 >= band or r1 == h)
        out[:, r0:r1] = block
        end = r1
    assert end == h and np.array_equal(out, ref)
    assert sum(b - a for a, b in reads) < h + tile  # each row read about once


# ----------------------------------------------------------------------------- labels by strips
def prob_maps(h: int, w: int, seed: int, ties: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Foreground and interior probabilities of round objects, some touching (no network)."""
    rng = np.random.default_rng(seed)
    n = h * w // 200
    imp = np.zeros((h, w))
    imp[rng.integers(0, h, n), rng.integers(0, w, n)] = rng.uniform(0.7, 1.3, n)
    fg = ndi.gaussian_filter(imp, 4) * 2 * np.pi * 16
    fg = np.clip(fg * 1.3, 0, 0.999) + rng.random((h, w)) * 1e-4  # no two values alike: no watershed ties
    if ties:
        fg = np.round(fg * 4) / 4
    fg = fg.astype(np.float32)
    return fg, ((fg > 0.8) * 0.9).astype(np.float32)


def by_strips(fg, interior, rows, *, min_size=0, max_rows=None, halo=None, use_interior=True):
    h, w = fg.shape
    s = StripInstances(h, w, interior=use_interior, threshold=0.5, min_size=min_size, max_rows=max_rows, halo=halo)
    out, end = np.zeros((h, w), np.int32), 0
    for a in range(0, h, rows):
        for r0, r1, lab in s.add(fg[a:a + rows], interior[a:a + rows] if use_interior else None):
            assert r0 == end
            out[r0:r1], end = lab, r1
    assert end == h
    return s.lookup(0)[out], s


@pytest.mark.parametrize("rows", [1, 7, 60])
@pytest.mark.parametrize("use_interior", [True, False])
def test_strip_labels_equal_whole_plane_labels(rows, use_interior):
    """Same labels, same numbering, whatever the strips: every region is labelled once it is complete."""
    for seed in range(3):
        fg, interior = prob_maps(180, 150, seed)
        ref = instances(fg, interior if use_interior else None, threshold=0.5, min_size=12)
        got, s = by_strips(fg, interior, rows, min_size=12, use_interior=use_interior)
        assert ref.max() > (20 if use_interior else 10) and s.forced_cuts == 0
        assert np.array_equal(got, ref)


def test_watershed_ties_move_a_few_contact_pixels_only():
    """With many exactly equal probabilities (here only 4 levels) the watershed's order among equal
    seeds depends on the whole image (skimage pops all seeds first): a few pixels where two objects
    touch may change side (0.2 % of the foreground here); the objects stay the same."""
    for seed in range(3):
        fg, interior = prob_maps(180, 150, seed, ties=True)
        ref = instances(fg, interior, threshold=0.5, min_size=12)
        same_objects(by_strips(fg, interior, 9, min_size=12)[0], ref, pixels=0.01)


def test_objects_spanning_many_strips_stay_one_object():
    fg = np.zeros((120, 60), np.float32)
    fg[10:110, 20:35] = 0.9  # a bar across 100 one-row strips
    fg[30:33, 40:43] = 0.9   # 9 px, and a seedless one
    interior = np.zeros_like(fg)
    interior[12:108, 22:33] = 0.9
    got, _ = by_strips(fg, interior, 1)
    assert got.max() == 2 and np.array_equal(got, instances(fg, interior))
    assert (got == 1).sum() == 100 * 15


def test_small_objects_are_dropped_by_their_merged_size():
    """Pieces under min_size in every strip, but the object is larger: kept; a smaller one: dropped."""
    fg = np.zeros((60, 40), np.float32)
    fg[5:35, 10:12] = 0.9   # 60 px, 2 per one-row strip
    fg[40:47, 30:32] = 0.9  # 14 px
    interior = fg.copy()
    got, _ = by_strips(fg, interior, 1, min_size=20)
    assert got.max() == 1 and (got == 1).sum() == 60
    assert np.array_equal(got, instances(fg, interior, min_size=20))


@pytest.mark.parametrize("use_interior", [True, False])
def test_regions_taller_than_the_budget_are_cut_and_merged(use_interior):
    """A region taller than ``max_rows`` is not held back whole: it is cut, and joined across the cut
    (exactly for connected components, for one seed cut in two, for seedless fragments)."""
    fg = np.zeros((200, 50), np.float32)
    fg[5:195, 10:20] = 0.9     # one long object with one long seed
    fg[20:180, 30:33] = 0.9    # one long seedless object
    fg[100:110, 40:45] = 0.9   # a small one
    interior = np.zeros_like(fg)
    interior[7:193, 12:18] = 0.9
    interior[102:108, 41:44] = 0.9
    got, s = by_strips(fg, interior, 10, max_rows=30, halo=10, min_size=5, use_interior=use_interior)
    assert s.forced_cuts > 3 and s.largest_window <= 30 + 10 + 10
    ref = instances(fg, interior if use_interior else None, min_size=5)
    assert got.max() == ref.max() == 3 and np.array_equal(got, ref)


# ----------------------------------------------------------------------------- the Segmenter
@pytest.mark.parametrize(("rows", "use_interior", "min_size", "seed_threshold"),
                         [(20, True, 16, None), (3, True, 0, None), (50, False, 16, None), (20, True, 16, 0.3)])
def test_strip_path_equals_the_whole_plane_path(seg, strips, rows, use_interior, min_size, seed_threshold):
    img = blob_image(300, 200, seed=1, big=(150, 100, 40))  # the big disc spans several strips
    kw = {"min_size": min_size, "use_interior": use_interior, "seed_threshold": seed_threshold}
    ref = whole(seg, img, tile=64, overlap=16, **kw)
    got = strips(rows, 200).segment(img, tile=64, overlap=16, **kw)
    assert seg.strip_stats["largest_band"] < 300  # it did go in strips
    assert np.array_equal(got.probability, ref.probability)  # the same tiles, sums and limits
    same_objects(got.labels, ref.labels)
    assert got.n_objects == ref.n_objects > 20 and got.provenance["objects"] == ref.provenance["objects"]
    big = np.bincount(got.labels[150 - 35:150 + 35, 100].ravel())[1:]
    assert big.max() >= 60  # one object across the strips


def test_a_stack_of_big_planes_is_numbered_across_planes(seg, strips):
    stack = np.stack([blob_image(200, 150, seed=2), np.zeros((200, 150), np.uint8), blob_image(200, 150, seed=3)])
    ref = whole(seg, stack, tile=64, overlap=16)
    got = strips(10, 150).segment(stack, tile=64, overlap=16)
    for a, b in zip(got.labels, ref.labels):
        same_objects(a, b)
    assert got.n_objects == ref.n_objects and got.labels[2][got.labels[2] > 0].min() == got.labels[0].max() + 1
    assert "plane 1 is constant: no objects" in got.notices and got.probability[1].max() == 0


def test_memory_mapped_input_and_outputs(seg, strips, tmp_path):
    """As the CLI runs it: a read-only memory-mapped TIFF in, memory-mapped TIFFs out."""
    from napari_zfdiffusion.core.io import TiffMemmap, read_image_lazy

    img = blob_image(260, 180, seed=4)
    tifffile.imwrite(tmp_path / "in.tif", img)
    lazy = read_image_lazy(tmp_path / "in.tif")
    assert isinstance(lazy, np.memmap)
    ref = whole(seg, img, tile=64, overlap=16)
    with TiffMemmap(tmp_path / "l.tif", img.shape, np.int32) as lab, \
            TiffMemmap(tmp_path / "p.tif", img.shape, np.float32) as prob:
        strips(16, 180).segment(lazy, tile=64, overlap=16, labels_out=lab, prob_out=prob, probability=False)
    same_objects(tifffile.imread(tmp_path / "l.tif"), ref.labels)
    assert np.array_equal(tifffile.imread(tmp_path / "p.tif"), ref.probability)


def test_progress_reaches_the_end_and_cancel_leaves_nothing(seg, strips, tmp_path):
    from napari_zfdiffusion.core.io import TiffMemmap

    img = np.stack([blob_image(200, 150, seed=5)] * 2)
    s = strips(10, 150)
    seen = []
    s.segment(img, tile=64, overlap=16, batch=3, callback=seen.append)
    ref = []
    whole(seg, img, tile=64, overlap=16, batch=3, callback=ref.append)
    assert [(p.step, p.total) for p in seen] == [(p.step, p.total) for p in ref]  # tiles over the job, as today
    assert seen[-1].step == seen[-1].total

    def stop_at(n):
        def cb(p):
            if p.step >= n:
                raise Cancelled("stop")
        return cb

    with pytest.raises(Cancelled), TiffMemmap(tmp_path / "l.tif", img.shape, np.int32) as lab:
        s.segment(img, tile=64, overlap=16, batch=3, labels_out=lab, callback=stop_at(4))
    assert list(tmp_path.iterdir()) == []  # cancelled within one batch, nothing half-written


def test_constant_and_nan_planes_in_strips(seg, strips):
    s = strips(10, 60)
    r = s.segment(np.full((80, 60), 9, np.uint16), tile=64, overlap=16)
    assert r.n_objects == 0 and r.probability.max() == 0 and any("constant" in n for n in r.notices)
    bad = np.ones((2, 80, 60), np.float32)
    bad[1, 70, 5] = np.nan
    with pytest.raises(UserInputError, match="plane 1 holds 1 NaN"):
        s.segment(bad, tile=64, overlap=16)


def test_memory_is_a_few_strips_not_the_plane(seg, strips):
    """NumPy's allocations (tracemalloc sees them; the outputs are allocated beforehand): a plane four
    times as tall needs the same, under 2 float32 planes' worth; the whole-plane path needs over 5."""
    import tracemalloc

    def peak(fn, h):
        img = blob_image(h, 256, seed=6)
        lab, prob = np.zeros(img.shape, np.int32), np.zeros(img.shape, np.float32)
        tracemalloc.start()
        try:
            fn(img, tile=64, overlap=16, labels_out=lab, prob_out=prob)
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    s = strips(16, 256)
    s.segment(blob_image(128, 256), tile=64, overlap=16)  # imports and first-call allocations
    short, tall = peak(s.segment, 512), peak(s.segment, 2048)
    assert seg.strip_stats["largest_window"] <= 4 * 16 + 64 + 2 * 64  # held rows: the budget and a band
    plane = 2048 * 256 * 4  # one float32 plane
    assert tall < 1.3 * short and tall < 2 * plane
    assert peak(lambda img, **kw: whole(seg, img, **kw), 2048) > 5 * plane
