"""Masks and instance labels, shared by the paired patch generator, segmentation and evaluation.

* Training masks may be **binary** (two values, or floats in [0, 1]) or **label images** (1, 2, 3,
  ...). A label image is learned as each object's *interior*: the foreground without the one-pixel
  rim where objects touch, so that connected interiors give separate objects again.
* Labels come back from a probability map by connected components (:func:`labels_from_mask`), or
  by a watershed seeded from predicted interiors (:func:`instances`); the classical baseline is
  :func:`otsu_watershed`. Every path drops small objects through one filter, :func:`drop_small`.
* :class:`StripInstances` gives :func:`instances` of a plane too big to hold whole, fed a strip of
  rows at a time.
* The watershed's seeds have their own threshold (``seed_threshold``, checked by
  :func:`check_seed_threshold`); None is the foreground threshold, as before it existed.
* Cores that meet above a lower ``join_threshold`` are one seed (hysteresis, as in Canny's edge
  linking): a large textured nucleus whose centre output has several peaks stays one object, while
  touching nuclei, whose centre output falls towards 0 where they meet, stay apart. None: no joining.
"""

from __future__ import annotations

import numpy as np

from .errors import UserInputError

MASK_ENCODINGS = ("binary", "interior")
#: what a segmentation U-Net's second output learns from label images (see :func:`targets_from_mask`)
INNER_TARGETS = ("center", "interior")


def mask_encoding(masks: list[np.ndarray]) -> str:
    """``binary`` for two-valued (or [0, 1] float) masks, ``interior`` for label images."""
    for m in masks:
        if np.issubdtype(m.dtype, np.floating) and not np.all(m == np.round(m)):
            return "binary"  # probabilities
        if len(np.unique(m)) > 2:
            return "interior"
    return "binary"


def encode_mask(mask: np.ndarray, encoding: str) -> np.ndarray:
    """A mask (binary or labels) as a float foreground channel in [0, 1]."""
    if encoding == "binary":
        if np.issubdtype(mask.dtype, np.floating) and mask.max() <= 1.0 and mask.min() >= 0.0:
            return (mask >= 0.5).astype(np.float32) if np.all(mask == np.round(mask)) else mask.astype(np.float32)
        return (mask > mask.min()).astype(np.float32) if mask.min() != mask.max() else (mask > 0).astype(np.float32)
    from skimage.segmentation import find_boundaries

    labels = mask.astype(np.int64)
    return ((labels > 0) & ~find_boundaries(labels, mode="inner")).astype(np.float32)


def center_map(labels: np.ndarray) -> np.ndarray:
    """Each object's normalised distance to its edge (float32 in [0, 1]): 1 on the object's innermost
    pixels, falling to about 0 at its outline and where it touches another object; 0 on background.
    ``labels``: a label image (a binary mask: its connected components are the objects).

    Thresholded at 0.5 it gives each object's core (half its inner radius), and the cores of touching
    round objects lie apart by about a radius, however large the objects are: the seeds of
    :func:`instances` for models trained with the ``center`` target."""
    from scipy import ndimage as ndi
    from skimage.measure import label

    lab = np.asarray(labels)
    if lab.max() <= 1 or not np.all(lab == np.round(lab)):
        lab = label(lab > (0.5 if lab.max() <= 1 else 0), connectivity=1)
    lab = lab.astype(np.int64)
    if not lab.any():
        return np.zeros(lab.shape, np.float32)
    inner = encode_mask(lab, "interior") > 0  # objects apart: no pixel touches another object
    dist = ndi.distance_transform_edt(inner)
    ids = np.unique(lab[lab > 0])
    top = np.asarray(ndi.maximum(dist, lab, index=ids), np.float64)
    lut = np.zeros(int(ids.max()) + 1, np.float64)
    lut[ids] = top
    denom = lut[lab]
    out = np.divide(dist, denom, out=np.zeros(lab.shape, np.float64), where=denom > 0)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def targets_from_mask(mask: np.ndarray, inner: str = "interior") -> np.ndarray:
    """(2, Y, X) float32 segmentation targets from a mask: foreground, and the objects' inner part.

    ``inner="interior"``: a label image (more than two values) gives the interior without the
    one-pixel rim where objects touch; a binary mask (any two values, or floats in [0, 1]
    thresholded at 0.5) has no instances to separate, so its interior is the foreground itself.
    ``inner="center"``: each object's normalised distance to its edge (:func:`center_map`; a binary
    mask's connected components are its objects), whose cores stay apart for touching objects of
    any size.
    """
    enc = mask_encoding([mask])
    fg = encode_mask(mask, "binary") if enc == "binary" else (mask > 0).astype(np.float32)
    fg = (fg >= 0.5).astype(np.float32)
    if inner == "center":
        return np.stack([fg, center_map(mask if enc == "interior" else fg)])
    interior = encode_mask(mask, "interior") if enc == "interior" else fg
    return np.stack([fg, interior])


def drop_small(labels: np.ndarray, min_size: int) -> np.ndarray:
    """``labels`` without the objects smaller than ``min_size`` pixels (changed in place), renumbered
    1..K as int32 in the order they had. The one size filter of every labelling path."""
    from skimage.segmentation import relabel_sequential

    lab = labels
    if min_size > 1 and lab.max() > 0:
        small = np.bincount(lab.ravel()) < min_size
        small[0] = False
        lab[small[lab]] = 0
    return relabel_sequential(lab.astype(np.int32))[0].astype(np.int32)


def object_diameters(labels: np.ndarray, min_size: int = 16) -> np.ndarray:
    """The equivalent diameter (of the disc of the same area, in pixels) of each object of a 2D
    label image (a binary mask: its connected components); objects under ``min_size`` pixels left out."""
    from skimage.measure import label

    lab = np.asarray(labels)
    if lab.max() <= 1:
        lab = label(lab > 0, connectivity=1)
    areas = np.bincount(lab.ravel().astype(np.int64))[1:]
    areas = areas[areas >= max(1, min_size)]
    return 2.0 * np.sqrt(areas / np.pi)


def foreground_diameters(mask: np.ndarray, min_size: int = 16) -> np.ndarray:
    """The objects' equivalent diameters (pixels) from a foreground mask alone, robust to how the
    objects are split: for each connected region, its largest inscribed disc (radius r, the peak of
    the distance transform) says how wide one object is, and area / (pi r^2), rounded, how many objects
    of that width it holds (touching objects merge, a split object is whole again). A region of n
    objects gives n diameters of sqrt(area / n / pi) * 2. For a disc or an ellipse up to 1.5:1 this
    is the equivalent diameter of :func:`object_diameters`; for two touching discs, each one's."""
    from scipy import ndimage as ndi
    from skimage.measure import label

    lab = label(np.asarray(mask) > 0, connectivity=1)
    if not lab.any():
        return np.zeros(0)
    ids = np.arange(1, int(lab.max()) + 1)
    areas = np.bincount(lab.ravel())[1:].astype(np.float64)
    radius = np.asarray(ndi.maximum(ndi.distance_transform_edt(lab > 0), lab, index=ids), np.float64)
    keep = (areas >= max(1, min_size)) & (radius > 0)
    areas, radius = areas[keep], radius[keep]
    n = np.maximum(1, np.round(areas / (np.pi * radius ** 2)))
    return np.repeat(2.0 * np.sqrt(areas / n / np.pi), n.astype(np.int64))


def typical_diameter(diameters) -> float | None:
    """The area-weighted median of ``diameters`` (pixels): the diameter of the object that the median
    foreground pixel belongs to (None: none). Unlike the plain median, a crowd of small fragments or
    faint specks (CHO's out-of-focus nuclei, debris) does not pull it below the nuclei that make up
    most of the foreground."""
    d = np.asarray(diameters, np.float64).ravel()
    return _weighted_median(d, d ** 2)


def _weighted_median(values: np.ndarray, weights: np.ndarray) -> float | None:
    """The value at which the cumulative ``weights`` (in the values' order) reach half their sum (None: no values)."""
    if values.size == 0:
        return None
    order = np.argsort(values, kind="stable")
    w = np.cumsum(weights[order])
    return float(values[order][np.searchsorted(w, 0.5 * w[-1])])


def median_diameter(label_images, min_size: int = 16) -> float | None:
    """The median equivalent diameter over the objects of several 2D label images (None: no objects)."""
    d = [object_diameters(lab, min_size) for lab in label_images]
    d = np.concatenate(d) if d else np.zeros(0)
    return float(np.median(d)) if d.size else None


def stitch_planes(labels: np.ndarray, iou: float = 0.25) -> np.ndarray:
    """Link the 2D labels of a (Z, Y, X) stack into 3D objects, in place: an object of plane z takes
    the label of the object of plane z-1 it overlaps most, when their intersection over union is at
    least ``iou`` (each object of z-1 goes to at most one of z, best matches first); the others start
    new objects. Labels are then renumbered 1..K over the stack. Plane by plane, so ``labels`` may be
    a memory map. Returns ``labels``."""
    if labels.ndim != 3:
        raise ValueError("stitch_planes needs a (Z, Y, X) label stack")
    next_id = int(labels[0].max()) if labels.shape[0] else 0
    prev = np.asarray(labels[0])
    for z in range(1, labels.shape[0]):
        cur = np.asarray(labels[z]).astype(np.int64)
        ids = np.unique(cur[cur > 0])
        mapping = {}
        if ids.size and prev.any():
            both = (cur > 0) & (prev > 0)
            pairs, inter = np.unique(np.stack([cur[both], prev[both]]), axis=1, return_counts=True)
            size_c = dict(zip(*np.unique(cur[cur > 0], return_counts=True)))
            size_p = dict(zip(*np.unique(prev[prev > 0], return_counts=True)))
            scores = sorted(((n / (size_c[c] + size_p[q] - n), c, q) for (c, q), n in zip(pairs.T.tolist(), inter)),
                            reverse=True)
            used = set()
            for score, c, q in scores:
                if score < iou:
                    break
                if c in mapping or q in used:
                    continue
                mapping[c] = q
                used.add(q)
        lut_ids, lut_vals = [], []
        for c in ids.tolist():
            if c not in mapping:
                next_id += 1
                mapping[c] = next_id
            lut_ids.append(c)
            lut_vals.append(mapping[c])
        out = np.zeros_like(cur)
        if lut_ids:
            lut = np.zeros(int(max(lut_ids)) + 1, np.int64)
            lut[lut_ids] = lut_vals
            out = lut[cur]
        labels[z] = out
        prev = out
    # renumber 1..K over the stack, plane by plane (the stack may be a memory map)
    used_ids = np.zeros(next_id + 1, bool)
    for z in range(labels.shape[0]):
        used_ids[np.unique(np.asarray(labels[z]))] = True
    used_ids[0] = False
    lut = np.zeros(next_id + 1, np.int64)
    lut[used_ids] = np.arange(1, int(used_ids.sum()) + 1)
    for z in range(labels.shape[0]):
        labels[z] = lut[np.asarray(labels[z])]
    return labels


def check_min_volume_fraction(value, what: str = "the minimum volume fraction") -> float:
    """``value`` as a float in [0, 1), or a UserInputError that names ``what`` and says what it does."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise UserInputError(f"{what} must be a number in [0, 1), got {value!r}.") from None
    if not 0.0 <= v < 1.0:  # NaN fails this too
        raise UserInputError(f"{what} must be at least 0 and below 1 (a share of the typical object's volume; 0 "
                             f"keeps every object), got {value!r}.")
    return v


def typical_volume(sizes) -> float | None:
    """The volume-weighted median of object ``sizes`` (voxels): the size of the object that the median
    foreground voxel belongs to (None: none), as :func:`typical_diameter` is for diameters."""
    v = np.asarray(sizes, np.float64).ravel()
    v = v[v > 0]
    return _weighted_median(v, v)


def drop_small_volumes(labels: np.ndarray, fraction: float) -> int:
    """Drop the 3D objects of a (Z, Y, X) label stack, in place, that have fewer voxels than
    ``fraction`` of the typical object's (:func:`typical_volume`), and renumber the rest 1..K (in
    the order of their old labels); the number K. Plane by plane, so ``labels`` may be a memory map.

    Linking planes (:func:`stitch_planes`) leaves small pieces that are no nucleus: the out-of-focus
    glow above or below a nucleus seen in a plane or two, and the fragments of a mitotic cell. Each
    is a few hundred voxels where a nucleus has thousands, so a fraction of the stack's own typical
    object removes them at any pixel size (0: keep everything)."""
    if labels.ndim != 3:
        raise ValueError("drop_small_volumes needs a (Z, Y, X) label stack")
    top = 0
    for z in range(labels.shape[0]):
        top = max(top, int(np.asarray(labels[z]).max()))
    if not top:
        return 0
    sizes = np.zeros(top + 1, np.int64)
    for z in range(labels.shape[0]):
        sizes += np.bincount(np.asarray(labels[z]).ravel(), minlength=top + 1)[:top + 1]
    sizes[0] = 0
    keep = sizes > 0
    if fraction > 0:
        keep &= sizes >= fraction * typical_volume(sizes[1:])
    lut = np.zeros(top + 1, np.int64)
    lut[keep] = np.arange(1, int(keep.sum()) + 1)
    for z in range(labels.shape[0]):
        labels[z] = lut[np.asarray(labels[z])]
    return int(keep.sum())


def labels_from_mask(prob: np.ndarray, *, encoding: str = "binary", threshold: float = 0.5,
                     min_size: int = 0) -> np.ndarray:
    """Instance labels (int32) from a foreground probability map in [0, 1] (2D, or a (N, Y, X) batch).

    Connected components of ``prob >= threshold``, objects smaller than ``min_size`` pixels removed;
    for the ``interior`` encoding each object is grown back by the one-pixel rim it was trained without.
    """
    from skimage.measure import label
    from skimage.segmentation import expand_labels

    prob = np.asarray(prob)
    if prob.ndim == 3:
        return np.stack([labels_from_mask(p, encoding=encoding, threshold=threshold, min_size=min_size)
                         for p in prob])
    lab = drop_small(label(prob >= threshold, connectivity=1), min_size)
    if encoding == "interior":
        lab = expand_labels(lab, 1)
    return lab.astype(np.int32)


def _threshold_in(value, high: float, what: str, why: str) -> float | None:
    """``value`` as a float in (0, ``high``] (None stays None), or a UserInputError that names ``what``,
    the range and ``why`` (what the threshold does)."""
    if value is None:
        return None
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise UserInputError(f"{what} must be a number in (0, {high:g}], got {value!r}.") from None
    if not 0.0 < v <= high:  # NaN fails this too
        raise UserInputError(f"{what} must be a number in (0, {high:g}] ({why}), got {value!r}.")
    return v


def check_seed_threshold(value, what: str = "the seed threshold") -> float | None:
    """``value`` as a float in (0, 1] (None stays None: the foreground threshold), or a
    UserInputError that says what is wrong and what to give instead."""
    return _threshold_in(value, 1.0, what, "the centre or interior probability where a seed of the watershed "
                                           "begins; lower merges pieces of one object, higher splits touching ones")


def check_join_threshold(value, seed_threshold: float, what: str = "the join threshold") -> float | None:
    """``value`` as a float in (0, ``seed_threshold``] (None stays None: cores are not joined), or a
    UserInputError that says what is wrong and what to give instead."""
    return _threshold_in(value, seed_threshold, what, "the seed threshold: cores of the centre output that connect "
                                                      "at or above it become one seed, so lower joins more pieces of "
                                                      "one object")


def seed_levels(interior: np.ndarray, seed_threshold: float, join_threshold: float | None = None) -> np.ndarray:
    """uint8 map of the centre (or interior) output: 2 where a seed begins (``>= seed_threshold``),
    1 where only a join reaches (``>= join_threshold``), 0 elsewhere."""
    level = (interior >= seed_threshold).astype(np.uint8) * 2
    if join_threshold is not None and join_threshold < seed_threshold:
        level[(interior >= join_threshold) & (level == 0)] = 1
    return level


def seed_labels(level: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The watershed's seeds (int32, 1..S in raster order of their first pixel): connected regions
    of ``level > 0`` inside ``mask`` that hold at least one pixel of level 2 (:func:`seed_levels`)."""
    from skimage.measure import label

    lab = label((level > 0) & mask, connectivity=1).astype(np.int32)
    n = int(lab.max())
    if not n or not (level == 1).any():
        return lab
    keep = np.zeros(n + 1, bool)
    keep[np.unique(lab[(level == 2) & mask])] = True
    keep[0] = False
    new = np.cumsum(keep).astype(np.int32) * keep  # label's raster order, without the regions dropped
    return new[lab]


def instances(foreground: np.ndarray, interior: np.ndarray | None = None, *, threshold: float = 0.5,
              min_size: int = 0, seed_threshold: float | None = None,
              join_threshold: float | None = None) -> np.ndarray:
    """Instance labels (int32, 1..K) of one 2D probability map.

    With ``interior``: connected regions of ``interior >= seed_threshold`` (None: ``threshold``) are
    the seeds of a watershed over the foreground probability, inside ``foreground >= threshold``;
    foreground regions with no seed become objects of their own. Without: connected components.
    Objects smaller than ``min_size`` pixels are removed and the labels renumbered 1..K.

    A lower ``seed_threshold`` grows each seed towards the object's edge, so that the several cores a
    large textured object may get join into one (fewer split objects), and two touching objects
    whose cores meet merge (more merged ones): :mod:`..evaluation.generalist` tunes it per model
    (the card's ``seed_threshold``).

    ``join_threshold`` (<= the seed threshold; None: off): seeds are the connected regions of
    ``interior >= join_threshold`` that reach the seed threshold somewhere, so cores linked above the
    join threshold are one seed, while a region that never reaches the seed threshold seeds nothing
    (the watershed floods it from its neighbours). It merges the pieces of large textured nuclei
    without the false objects a low seed threshold adds (the card's ``join_threshold``).
    """
    from skimage.measure import label
    from skimage.segmentation import watershed

    st = check_seed_threshold(seed_threshold)
    st = threshold if st is None else st
    jt = check_join_threshold(join_threshold, st)
    mask = foreground >= threshold
    if interior is None:
        lab = label(mask, connectivity=1)
    else:
        seeds = seed_labels(seed_levels(interior, st, jt), mask)
        lab = watershed(-foreground, seeds, mask=mask) if seeds.max() else np.zeros(mask.shape, np.int64)
        orphans = label(mask & (lab == 0), connectivity=1)
        if orphans.max():
            lab = np.where(orphans > 0, orphans + lab.max(), lab)
    return drop_small(lab, min_size)


def otsu_watershed(image: np.ndarray, *, min_size: int = 16, min_distance: int = 5, sigma: float = 1.0) -> np.ndarray:
    """The classical baseline: Gaussian smoothing, Otsu threshold, distance-transform watershed."""
    from scipy import ndimage as ndi
    from skimage.feature import peak_local_max
    from skimage.filters import gaussian, threshold_otsu
    from skimage.segmentation import watershed

    img = gaussian(np.asarray(image, np.float32), sigma=sigma, preserve_range=True)
    if img.max() == img.min():
        return np.zeros(img.shape, np.int32)
    mask = img > threshold_otsu(img)
    dist = ndi.distance_transform_edt(mask)
    peaks = peak_local_max(dist, min_distance=min_distance, labels=ndi.label(mask)[0], exclude_border=False)
    markers = np.zeros(mask.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    return drop_small(watershed(-dist, markers, mask=mask), min_size)


def _first_pixels(lab: np.ndarray, n: int) -> np.ndarray:
    """The raster index of the first pixel of each label 1..n of ``lab`` (int64, (n,))."""
    flat = lab.ravel()
    nz = np.flatnonzero(flat)
    ids, first = np.unique(flat[nz], return_index=True)
    out = np.zeros(n, np.int64)
    out[ids - 1] = nz[first]
    return out


class StripInstances:
    """:func:`instances` of one (H, W) plane whose probabilities arrive in horizontal strips, top to
    bottom, with memory for a few strips instead of the plane.

    ``add(foreground, interior)`` takes the next rows and returns the rows whose labels are settled,
    as ``(r0, r1, labels)`` (int32 *provisional* ids, 0 background); every row comes back once, in
    order, the last with the strip that reaches H. Then :meth:`lookup` gives the table that turns the
    provisional ids into the final labels: ``final = lookup(offset)[provisional]``.

    **Why the result is the whole-plane one.** In :func:`instances` an object never leaves its
    connected region of ``foreground >= threshold`` (its *component*): the watershed floods a
    component from the seeds inside it, and a component without a seed is one object. So a component
    is labelled here only once it is *complete*: all of it received (it does not touch the last row
    received). Its rows are held back until then, and the watershed runs over the held rows plus the
    new strip, restricted to the complete components, which gives each of them the labels the
    whole-plane watershed gives it. Small objects are dropped at the end, by the size of the whole
    object, and the objects are numbered as :func:`instances` numbers them: seeded objects in the
    raster order of their seed's first pixel, then the seedless ones in raster order of theirs.
    One difference remains possible: skimage's watershed pops all seeds first, in an order that
    depends on how many seeds the whole image has; a pixel that touches two different seeds of
    exactly equal foreground value may then go to the other one. Objects are the same; a few
    pixels on such contacts may differ (none in the tests; see tests/test_segment_large.py).

    **Components taller than** ``max_rows``: holding them back would hold the whole plane (a
    connected tissue, say), so the rows above ``halo`` rows from the strip's end are settled with
    the watershed over what was received, and the parts on both sides of that cut are merged where
    they meet across it: when both sides are interior (one seed cut in two) or either is seedless (a
    fragment of an object whose seed is on the other side). Exact for connected components (no
    interior channel); for the watershed an approximation near such a cut only.

    ``interior`` False: labels are connected components (``instances`` without an interior map).
    ``seed_threshold``, ``join_threshold``: as for :func:`instances` (None: ``threshold``; no joining).
    """

    def __init__(self, height: int, width: int, *, interior: bool = True, threshold: float = 0.5,
                 min_size: int = 0, max_rows: int | None = None, halo: int | None = None,
                 seed_threshold: float | None = None, join_threshold: float | None = None):
        self.h, self.w = int(height), int(width)
        self.interior, self.threshold, self.min_size = interior, threshold, min_size
        st = check_seed_threshold(seed_threshold)
        self.seed_threshold = threshold if st is None else st
        self.join_threshold = check_join_threshold(join_threshold, self.seed_threshold)
        self.max_rows = max(1, int(max_rows)) if max_rows else self.h
        self.halo = max(1, int(halo)) if halo else max(1, self.max_rows // 4)
        self.row = 0  # the first row held back
        self.fg = np.zeros((0, self.w), np.float32)
        self.inner = np.zeros((0, self.w), np.uint8)  # seed_levels of the held rows
        self.lab = np.zeros((0, self.w), np.int32)  # held rows: labels of the objects already settled
        self.count = 0  # provisional ids given
        self._size: list[np.ndarray] = []
        self._key: list[np.ndarray] = []
        self._orphan: list[np.ndarray] = []
        self._cuts: list[tuple[int, np.ndarray, np.ndarray | None]] = []  # forced cuts, resolved when flushed
        self._pairs: list[np.ndarray] = []  # provisional ids to merge (across forced cuts)
        self.largest_window = 0  # most rows labelled at once (for tests and benchmarks)
        self.forced_cuts = 0

    def _label(self, fg: np.ndarray, inner: np.ndarray | None, mask: np.ndarray) -> tuple[np.ndarray, int, np.ndarray]:
        """:func:`instances` inside ``mask`` before the size filter: labels 1..m (seeded objects
        first, numbered as ``label`` numbers their seeds, then the seedless), the number of seeded
        objects, and each object's first pixel (its seed's, for a seeded object)."""
        from skimage.measure import label
        from skimage.segmentation import watershed

        if inner is None:
            lab = label(mask, connectivity=1).astype(np.int32)
            m = int(lab.max())
            return lab, 0, _first_pixels(lab, m)
        seeds = seed_labels(inner, mask)
        ns = int(seeds.max())
        lab = watershed(-fg, seeds, mask=mask) if ns else np.zeros(mask.shape, np.int32)
        orphans = label(mask & (lab == 0), connectivity=1).astype(np.int32)
        no = int(orphans.max())
        keys = [_first_pixels(seeds, ns)]
        del seeds
        if no:
            lab = np.where(orphans > 0, orphans + ns, lab)
            keys.append(_first_pixels(orphans, no))
        return lab.astype(np.int32, copy=False), ns, np.concatenate(keys)

    def add(self, foreground: np.ndarray, interior: np.ndarray | None = None) -> list[tuple[int, int, np.ndarray]]:
        """The next rows of the probabilities ((rows, W) float); the rows now settled (see the class)."""
        from scipy import ndimage as ndi
        from skimage.measure import label

        t = self.threshold
        rows_in = len(foreground)
        fg = np.concatenate([self.fg, np.asarray(foreground, np.float32)])
        inner = (np.concatenate([self.inner, seed_levels(np.asarray(interior), self.seed_threshold,
                                                         self.join_threshold)]) if self.interior else None)
        lab = np.concatenate([self.lab, np.zeros((rows_in, self.w), np.int32)])
        r0, n = self.row, len(fg)
        self.largest_window = max(self.largest_window, n)
        last = r0 + n >= self.h
        mask = (fg >= t) & (lab == 0)  # settled objects are left out: they are complete components
        comp = label(mask, connectivity=1)
        cut, forced, open_ = n, False, None
        if not last:
            ids = np.unique(comp[-1])
            ids = ids[ids > 0]
            if ids.size:  # components that may go on below: held back from their first row
                boxes = ndi.find_objects(comp)
                top = min(boxes[i - 1][0].start for i in ids)
                open_ = np.zeros(len(boxes) + 1, bool)
                open_[ids] = True
                forced = n - top > self.max_rows
                cut = max(1, n - self.halo) if forced else top
        if open_ is not None and not forced:
            mask &= ~open_[comp]
        new, ns, first = self._label(fg, inner, mask)
        del mask
        if forced:  # the open components' rows below the cut are labelled again with the next strip
            below = new[cut:]
            below[open_[comp[cut:]]] = 0
            self.forced_cuts += 1
        del comp
        m = len(first)
        size = np.bincount(new.ravel(), minlength=m + 1)[1:]
        lab[new > 0] = new[new > 0] + self.count
        del new
        self._size.append(size)
        self._key.append(first + r0 * self.w)
        self._orphan.append(np.arange(1, m + 1) > ns)
        self.count += m
        # merges across earlier forced cuts whose first row below is settled now
        for c in [c for c in self._cuts if c[0] < r0 + cut]:
            self._merge_across(c, lab[c[0] - r0], None if inner is None else inner[c[0] - r0])
            self._cuts.remove(c)
        if forced:
            self._cuts.append((r0 + cut, lab[cut - 1].copy(), None if inner is None else inner[cut - 1].copy()))
        out = [(r0, r0 + cut, lab[:cut])] if cut else []
        self.fg, self.lab = fg[cut:].copy(), lab[cut:].copy()
        if inner is not None:
            self.inner = inner[cut:].copy()
        self.row = r0 + cut
        return out

    def _merge_across(self, cut, below: np.ndarray, inner_below: np.ndarray | None) -> None:
        _, above, inner_above = cut
        both = (above > 0) & (below > 0) & (above != below)
        if not both.any():
            return
        orphan = np.concatenate([[False], *self._orphan])
        a, b = above[both], below[both]
        join = orphan[a] | orphan[b]
        if inner_above is not None:
            join |= (inner_above[both] > 0) & (inner_below[both] > 0)
        if join.any():
            self._pairs.append(np.unique(np.stack([a[join], b[join]], 1), axis=0))

    def lookup(self, offset: int = 0) -> np.ndarray:
        """provisional id -> final label (int32; 0 -> 0): merged across forced cuts, objects smaller
        than ``min_size`` dropped, numbered 1..K as :func:`instances` numbers them, plus ``offset``
        (the labels of earlier planes). Sets ``self.objects`` = K."""
        n = self.count
        size = np.concatenate([[0], *self._size]).astype(np.int64)
        key = np.concatenate([[0], *self._key]).astype(np.int64)
        orphan = np.concatenate([[False], *self._orphan])
        parent = np.arange(n + 1)
        for pairs in self._pairs:
            for a, b in pairs:
                ra, rb = int(a), int(b)
                while parent[ra] != ra:
                    ra = parent[ra]
                while parent[rb] != rb:
                    rb = parent[rb]
                if ra != rb:
                    parent[max(ra, rb)] = min(ra, rb)
        while True:
            nxt = parent[parent]
            if np.array_equal(nxt, parent):
                break
            parent = nxt
        total = np.bincount(parent, weights=size, minlength=n + 1).astype(np.int64)
        big = np.iinfo(np.int64).max
        seeded_key = np.full(n + 1, big)
        np.minimum.at(seeded_key, parent[~orphan], key[~orphan])
        any_key = np.full(n + 1, big)
        np.minimum.at(any_key, parent, key)
        seedless = seeded_key == big
        rkey = np.where(seedless, any_key, seeded_key)
        roots = np.flatnonzero((parent == np.arange(n + 1)) & (total >= max(1, self.min_size)))
        roots = roots[roots > 0]
        order = roots[np.lexsort((rkey[roots], seedless[roots]))]
        final = np.zeros(n + 1, np.int64)
        final[order] = np.arange(1, len(order) + 1) + offset
        self.objects = len(order)
        lut = final[parent]
        lut[0] = 0
        return lut.astype(np.int32)


__all__ = ["MASK_ENCODINGS", "StripInstances", "check_join_threshold", "check_seed_threshold", "drop_small", "encode_mask", "instances",
           "labels_from_mask",
           "mask_encoding", "otsu_watershed", "targets_from_mask", "center_map", "INNER_TARGETS",
           "foreground_diameters", "typical_diameter"]
