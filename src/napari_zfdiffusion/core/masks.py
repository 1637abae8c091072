"""Masks and instance labels, shared by the paired patch generator, segmentation and evaluation.

* Training masks may be **binary** (two values, or floats in [0, 1]) or **label images** (1, 2, 3,
  ...). A label image is learned as each object's *interior*: the foreground without the one-pixel
  rim where objects touch, so that connected interiors give separate objects again.
* Labels come back from a probability map by connected components (:func:`labels_from_mask`), or
  by a watershed seeded from predicted interiors (:func:`instances`); the classical baseline is
  :func:`otsu_watershed`. Every path drops small objects through one filter, :func:`drop_small`.
"""

from __future__ import annotations

import numpy as np

MASK_ENCODINGS = ("binary", "interior")


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


def targets_from_mask(mask: np.ndarray) -> np.ndarray:
    """(2, Y, X) float32 segmentation targets from a mask: foreground, and interior.

    A label image (more than two values) gives the interior without the one-pixel rim where objects
    touch; a binary mask (any two values, or floats in [0, 1] thresholded at 0.5) has no instances to
    separate, so its interior is the foreground itself.
    """
    enc = mask_encoding([mask])
    fg = encode_mask(mask, "binary") if enc == "binary" else (mask > 0).astype(np.float32)
    fg = (fg >= 0.5).astype(np.float32)
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


def instances(foreground: np.ndarray, interior: np.ndarray | None = None, *, threshold: float = 0.5,
              min_size: int = 0) -> np.ndarray:
    """Instance labels (int32, 1..K) of one 2D probability map.

    With ``interior``: connected regions of ``interior >= threshold`` are the seeds of a watershed
    over the foreground probability, inside ``foreground >= threshold``; foreground regions with no
    seed become objects of their own. Without: connected components. Objects smaller than
    ``min_size`` pixels are removed and the labels renumbered 1..K.
    """
    from skimage.measure import label
    from skimage.segmentation import watershed

    mask = foreground >= threshold
    if interior is None:
        lab = label(mask, connectivity=1)
    else:
        seeds = label((interior >= threshold) & mask, connectivity=1)
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


__all__ = ["MASK_ENCODINGS", "drop_small", "encode_mask", "instances", "labels_from_mask", "mask_encoding",
           "otsu_watershed", "targets_from_mask"]
