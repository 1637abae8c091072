"""2D training images (and masks) for the patch models: the autoencoder, latent diffusion and the
segmentation U-Net.

Images of any size, TIFF, OME-TIFF, OME-Zarr or PNG, 8 or 16 bit (or float); a file may hold one
image or a stack of 2D images (N, Y, X; every plane of a time series or OME file, ``channel`` of a
multichannel one). Each is percentile-normalised to [0, 1] and seen as [-1, 1] (the original work's
mean 0.5 / std 0.5). Masks are matched to images by sorted order and must have the same shapes;
they may be binary masks or label images:

* **binary** (two values, or floats in [0, 1]): the foreground;
* **labels** (more than two integer values): the *interior* of each object, i.e. the foreground
  without the one-pixel rim where objects touch, so that connected components of a generated mask
  give separate objects again (see :mod:`..masks`).

Validation: with 5 or more images the last fifth of them are held out; with fewer, the bottom
``patch`` rows of each image tall enough (at least twice the patch) are held out, so training and
validation crops never overlap.

**Memory follows the work, not the data set.** The images and masks stay on disk in their own
dtype (memory maps or chunked Zarr, :mod:`..reader`) and a crop reads only its window. Each image's
percentiles are computed once, exactly, in one pass a band of rows at a time
(:func:`..images.exact_percentiles`), and each crop is normalised with them: a crop equals, bit for
bit, the same window of the whole image normalised in memory. A mask window is read with a
one-pixel margin and encoded there (object interiors need their neighbours), which equals encoding
the whole mask; what the encodings decide from a whole mask (its range, whether it holds labels,
whether it is empty) comes from one pass over each mask when the data are opened. Training and
validation images are row ranges of the files, read when a crop (or a whole held-out image, for
validation) is asked for. At most :data:`KEEP_OPEN` files are open at a time, so file handles and
mapped pages stay bounded however many files there are. Under torchrun each rank crops from (and
computes the percentiles of) only its share of the training images; validation runs on rank 0.

RGB(A) images are the exception: their grayscale (luminance) is computed whole, as before, and kept
for the images a process uses (a per-window conversion would not be bit-identical).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import UserInputError
from ..images import Normalisation, exact_percentiles, random_dihedral, to_gray, unit_to_model
from ..io import list_images
from ..masks import center_map, encode_mask
from ..reader import open_image, release

KEEP_OPEN = 32  # files open at once per list of files (images, masks): file handles and mapped pages
BAND_PIXELS = 1 << 22  # pixels per band of rows in the passes over whole masks


def _looks_rgb(shape: tuple[int, ...]) -> bool:
    """:func:`..images.looks_rgb` from a plane's shape alone."""
    return len(shape) >= 3 and shape[-1] in (3, 4) and shape[-2] > 4


class _PlaneView:
    """Plane ``index`` of a lazy (N, Y, X) array, indexed like a 2D array: reads only what is asked for."""

    def __init__(self, planes, index: int):
        self._planes = planes
        self._index = index
        self.shape = tuple(int(s) for s in planes.shape[1:])
        self.dtype = np.dtype(planes.dtype)

    def __getitem__(self, key) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        return np.asarray(self._planes[(self._index, *key)])


@dataclass(frozen=True)
class _Plane:
    file: int
    index: int
    shape: tuple[int, ...]  # (Y, X), after grayscale
    rgb: bool


class _Source:
    """The 2D planes of a list of files, opened for reading on demand (at most :data:`KEEP_OPEN` files
    at once) and read a window at a time in their own dtype. Opening checks each plane's size and
    says which are RGB(A), from the metadata only."""

    def __init__(self, paths, *, min_size: int, notices: list[str], channel: int | None = None,
                 axes: str | None = None):
        self.files = list_images(paths)
        self.channel, self.axes = channel, axes
        self.planes: list[_Plane] = []
        self.names: list[str] = []
        self.file_names: list[str] = []  # each plane's file name (messages)
        self._open: OrderedDict[int, object] = OrderedDict()
        self._gray: dict[int, np.ndarray] = {}
        for k, f in enumerate(self.files):
            planes = self._file(k)
            n = len(planes)
            shape = tuple(int(s) for s in planes.shape[1:])
            rgb = _looks_rgb(shape)
            if rgb:  # as to_gray words it (once per file)
                notices.append(f"{f.name}: RGB{'A' if shape[-1] == 4 else ''} image {shape} converted to grayscale "
                               "(luminance" + (", alpha dropped)" if shape[-1] == 4 else ")"))
            hw = shape[:2] if rgb else shape
            for i in range(n):
                if min(hw) < min_size:
                    raise UserInputError(
                        f"{f.name}{f' plane {i}' if n > 1 else ''} is {hw[0]}x{hw[1]} pixels: "
                        f"smaller than the {min_size}x{min_size} patches. Use larger images, or a smaller --patch-size.")
                self.planes.append(_Plane(k, i, hw, rgb))
                self.names.append(f"{f.name}[{i}]" if n > 1 else f.name)
                self.file_names.append(f.name)

    def __len__(self) -> int:
        return len(self.planes)

    def _file(self, k: int):
        planes = self._open.pop(k, None)
        if planes is None:
            planes = open_image(self.files[k], channel=self.channel, axes=self.axes).planes()
        self._open[k] = planes
        while len(self._open) > KEEP_OPEN:
            self._open.popitem(last=False)
        return planes

    def release(self) -> None:
        """Unmap the pages reads touched in the open memory-mapped files (they stay in the system's page
        cache; the next read maps them again), so that what the crops read does not pile up in this
        process's resident memory. Chunked (Zarr) and in-memory files keep nothing to release."""
        for planes in self._open.values():
            release(planes)

    def close(self) -> None:
        """Close the open files (they reopen when read): unmaps the pages a pass over them touched."""
        self._open.clear()

    def plane(self, j: int):
        """Plane ``j`` as a 2D array-like (rows and columns read when sliced); an RGB(A) plane as its
        grayscale, computed whole and kept."""
        p = self.planes[j]
        if not p.rgb:
            return _PlaneView(self._file(p.file), p.index)
        if j not in self._gray:
            self._gray[j] = to_gray(np.asarray(self._file(p.file)[p.index]), self.file_names[j], [])
        return self._gray[j]

    def window(self, j: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        return np.asarray(self.plane(j)[y0:y1, x0:x1])

    def held_bytes(self) -> int:
        """Bytes of pixels held in memory: RGB(A) planes' grayscale, and open files that could not be
        mapped (PNG, or TIFF without zarr), which are read whole."""
        held = sum(g.nbytes for g in self._gray.values())
        for planes in self._open.values():
            if isinstance(planes, np.ndarray) and not isinstance(planes, np.memmap):
                base = planes
                while isinstance(base.base, np.ndarray):
                    base = base.base
                held += base.nbytes
        return held


@dataclass(frozen=True)
class MaskValues:
    """What the mask encodings decide from a whole mask (as float32, as masks are read): its range,
    whether every value is an integer, whether it has more than two values."""

    lo: float
    hi: float
    integral: bool
    many: bool

    @property
    def encoding(self) -> str:
        """:func:`..masks.mask_encoding` of this mask alone."""
        return "interior" if self.integral and self.many else "binary"

    @property
    def empty(self) -> bool:
        """No foreground in :func:`..masks.encode_mask` (binary) of the whole mask."""
        if self.lo >= 0.0 and self.hi <= 1.0:
            return not self.hi >= 0.5
        return self.lo == self.hi and not self.lo > 0


def scan_mask(plane, name: str) -> MaskValues:
    """:class:`MaskValues` of one 2D mask in one pass, a band of rows at a time; NaN or infinite values
    are refused (counted over the mask, as :func:`..images.check_finite` words it)."""
    h, w = plane.shape[:2]
    rows = max(1, BAND_PIXELS // max(w, 1))
    bad, lo, hi, integral = 0, np.float32(np.inf), np.float32(-np.inf), True
    values = np.empty(0, np.float32)
    for a in range(0, h, rows):
        band = np.asarray(plane[a:a + rows], dtype=np.float32)
        n_bad = band.size - int(np.count_nonzero(np.isfinite(band)))
        bad += n_bad
        if bad:
            continue
        lo, hi = min(lo, band.min()), max(hi, band.max())
        integral = integral and bool(np.all(band == np.round(band)))
        if len(values) <= 2:
            values = np.union1d(values, np.unique(band))
    if bad:
        raise UserInputError(f"{name} holds {bad} NaN or infinite value(s): replace them (e.g. with 0) first.")
    return MaskValues(np.float32(lo), np.float32(hi), integral, len(values) > 2)


def _binary(m: np.ndarray, v: MaskValues) -> np.ndarray:
    """:func:`..masks.encode_mask` (binary) of a whole mask, at a window ``m`` of it (float32)."""
    if v.lo >= 0.0 and v.hi <= 1.0:
        return (m >= 0.5).astype(np.float32) if v.integral else m.astype(np.float32)
    return (m > v.lo).astype(np.float32) if v.lo != v.hi else (m > 0).astype(np.float32)


def _targets(m: np.ndarray, v: MaskValues, inner: str = "interior") -> np.ndarray:
    """:func:`..masks.targets_from_mask` of a whole mask, at a window ``m`` of it (with a margin)."""
    enc = v.encoding
    fg = _binary(m, v) if enc == "binary" else (m > 0).astype(np.float32)
    fg = (fg >= 0.5).astype(np.float32)
    if inner == "center":
        return np.stack([fg, center_map(m if enc == "interior" else fg)])
    interior = encode_mask(m, "interior") if enc == "interior" else fg
    return np.stack([fg, interior])


#: the margin (pixels) around a crop's window in which the ``center`` targets are computed: objects
#: up to about twice this across are normalised by their own largest distance to the edge
CENTER_MARGIN = 48


def _gather(parts: dict, world: int) -> dict:
    """Every rank's ``parts`` merged (under torchrun); ``parts`` itself in one process."""
    import torch.distributed as dist

    if world <= 1 or not (dist.is_available() and dist.is_initialized()):
        return parts
    got: list = [None] * dist.get_world_size()
    dist.all_gather_object(got, parts)
    merged: dict = {}
    for g in got:
        merged.update(g)
    return merged


def _sharing(world: int) -> bool:
    import torch.distributed as dist

    return world > 1 and dist.is_available() and dist.is_initialized()


class Images(Sequence):
    """Training or validation images, as (C, H, W) float32 tensors in [-1, 1], each read from disk when
    indexed (nothing is held). ``shapes``: their shapes, without reading."""

    def __init__(self, data: PatchData, views: list[tuple[int, int, int]]):
        self._data = data
        self._views = views

    def __len__(self) -> int:
        return len(self._views)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(len(self))[i]]
        k, r0, r1 = self._views[i]
        out = self._data.window(k, r0, r1, 0, self._data.width(k))
        self._data._release()
        return out

    @property
    def shapes(self) -> list[tuple[int, int, int]]:
        return [(self._data.n_channels, r1 - r0, self._data.width(k)) for k, r0, r1 in self._views]


@dataclass
class PatchData:
    """Training and validation images (and masks), read lazily (see the module docstring).

    ``train`` and ``val``: :class:`Images`, (C, H, W) tensors in [-1, 1] read when indexed; channel 1
    (and 2) the mask if any. ``train`` is this process's share under torchrun (all in one process).
    Each entry of ``train_views``/``val_views`` is (image, first row, end row); ``mine`` indexes the
    training views this process crops from; ``stats``: image -> (low, high) percentile values.
    """

    names: list[str]
    channels: list[str]
    mask_encoding: str | None
    normalisation: Normalisation
    split: str
    notices: list[str] = field(default_factory=list)
    mask_names: list[str] = field(default_factory=list)
    images: _Source | None = field(default=None, repr=False)
    masks: _Source | None = field(default=None, repr=False)
    mask_values: list[MaskValues] = field(default_factory=list, repr=False)
    segmentation: bool | str = False
    train_views: list[tuple[int, int, int]] = field(default_factory=list, repr=False)
    val_views: list[tuple[int, int, int]] = field(default_factory=list, repr=False)
    mine: list[int] = field(default_factory=list, repr=False)
    stats: dict[int, tuple[float, float]] = field(default_factory=dict, repr=False)

    @property
    def n_channels(self) -> int:
        return len(self.channels)

    @property
    def train(self) -> Images:
        return Images(self, [self.train_views[j] for j in self.mine])

    @property
    def val(self) -> Images:
        return Images(self, self.val_views)

    @classmethod
    def from_paths(cls, images, masks=None, *, patch: int = 256, norm: Normalisation | None = None,
                   val_fraction: float = 0.2, segmentation: bool | str = False, channel: int | None = None,
                   axes: str | None = None, rank: int = 0, world: int = 1) -> PatchData:
        """Open ``images`` (and ``masks``; metadata, and one pass over each mask), split off validation
        images (none if ``val_fraction`` is 0), and compute the percentiles of the images this process
        uses: its share of the training images (``rank`` of ``world`` under torchrun: images k with
        k % world == rank, all of them when there are fewer than ``world``), and on rank 0 the
        held-out images too.

        ``segmentation``: the masks become two target channels, foreground and interior (True or
        "interior") or centre ("center"; see :func:`..masks.targets_from_mask`), instead of the one
        mask channel of the patch generators.
        """
        norm = norm or Normalisation(per="image")
        notices: list[str] = []
        src = _Source(images, min_size=patch, notices=notices, channel=channel, axes=axes)
        names = src.names
        n = len(src)
        # ---- validation split (row ranges of the images)
        full = [(k, 0, src.planes[k].shape[0]) for k in range(n)]
        late: list[str] = []
        if val_fraction <= 0:
            train, val, split = full, [], "no validation split"
        elif n >= 5:
            k = max(1, round(n * val_fraction))
            train, val = full[: n - k], full[n - k:]
            split = f"last {k} of {n} images held out"
        else:
            train, val = [], []
            for k, _, h in full:
                if h >= 2 * patch:
                    cut = h - max(patch, round(h * val_fraction))
                    train.append((k, 0, cut))
                    val.append((k, cut, h))
                else:
                    train.append((k, 0, h))
            split = f"bottom rows of {len(val)} of {n} images held out" if val else "no validation (images too small)"
            if not val:
                late.append(f"no validation split: images need at least {2 * patch} rows, or give 5 or more images")
        mine = (list(range(len(train))) if world <= 1 or len(train) < world
                else [j for j in range(len(train)) if j % world == rank])
        # ---- masks: shapes, then one pass over each (this rank's share of them under torchrun)
        encoding, msrc, values = None, None, []
        if masks is not None:
            msrc = _Source(masks, min_size=patch, notices=notices)
            if len(msrc) != n:
                raise UserInputError(
                    f"{n} image(s) but {len(msrc)} mask(s): give one mask per image (matched by sorted "
                    "file name; a stack counts one per plane)."
                )
            for a, b, na, nb in zip(src.planes, msrc.planes, names, msrc.names):
                if a.shape != b.shape:
                    raise UserInputError(
                        f"mask {nb} is {b.shape[0]}x{b.shape[1]} but its image {na} is {a.shape[0]}x{a.shape[1]}: "
                        "each mask must have its image's shape."
                    )
            shared = _sharing(world)
            scanned = {}
            for k in range(n):
                if not shared or k % world == rank:
                    scanned[k] = scan_mask(msrc.plane(k), msrc.file_names[k])
                    msrc.release()
            scanned = _gather(scanned, world) if shared else scanned
            values = [scanned[k] for k in range(n)]
            encoding = "binary"  # masks.mask_encoding: the first mask that decides
            for v in values:
                if not v.integral:
                    break
                if v.many:
                    encoding = "interior"
                    break
            empty = [nb for v, nb in zip(values, msrc.names) if v.empty]
            if segmentation and len(empty) == n:
                raise UserInputError(
                    "every mask is empty (no foreground pixels): check that the masks are the right files, "
                    "and that objects are non-zero (binary masks: two values; label images: 1, 2, 3, ...).")
            if empty:
                notices.append(f"{len(empty)} of {n} mask(s) are empty ({', '.join(empty[:3])}"
                               f"{', ...' if len(empty) > 3 else ''}): those images teach background only")
            if encoding == "interior" and segmentation:
                what = "centre" if segmentation == "center" else "interior"
                notices.append(f"masks are label images: the model learns each object's {what}, so touching "
                               "objects stay separate")
            elif encoding == "interior":
                notices.append("masks are label images: the model learns each object's interior, so touching "
                               "objects stay separate")
        names_ch = ["image"] if masks is None else (["image", "foreground", "center" if segmentation == "center" else "interior"] if segmentation
                                                     else ["image", "mask"])
        data = cls(names, names_ch, encoding, norm, split, notices + late,
                   msrc.names if msrc is not None else [], src, msrc, values, segmentation, train, val, mine)
        need = {train[j][0] for j in mine} | ({k for k, _, _ in val} if rank == 0 else set())
        for k in sorted(need):
            data.percentiles(k)
        for s in (src, msrc):
            if s is not None:
                s.close()
        return data

    # ------------------------------------------------------------------ reading
    def percentiles(self, k: int) -> tuple[float, float]:
        """Image ``k``'s low and high percentile values: computed once (one pass over the image)."""
        if k not in self.stats:
            (lo, hi), _ = exact_percentiles(self.images.plane(k), (self.normalisation.low, self.normalisation.high),
                                            name=self.images.file_names[k])
            self.stats[k] = (lo, hi)
            self.images.release()
        return self.stats[k]

    def normalisation_stats(self) -> dict[str, list[float]]:
        """The low and high percentile values of each training image this process reads (computed now
        if not yet), by image name: what the card records about the normalisation."""
        out = {}
        for j in self.mine:
            k = self.train_views[j][0]
            out[self.names[k]] = [float(v) for v in self.percentiles(k)]
        return out

    def width(self, k: int) -> int:
        return self.images.planes[k].shape[1]

    def window(self, k: int, y0: int, y1: int, x0: int, x1: int) -> torch.Tensor:
        """Rows y0:y1, columns x0:x1 of image ``k`` (and its mask) in model space: (C, h, w) float32,
        read from disk now; equal to that window of the whole image normalised (and encoded) in memory."""
        unit = self.normalisation.scale(self.images.window(k, y0, y1, x0, x1), *self.percentiles(k))
        image = unit_to_model(unit)[None]
        if self.masks is None:
            return torch.from_numpy(image)
        v = self.mask_values[k]
        enc = v.encoding if self.segmentation else self.mask_encoding
        a, b, c, d = y0, y1, x0, x1
        inner = "center" if self.segmentation == "center" else "interior"
        margin = CENTER_MARGIN if self.segmentation and inner == "center" else 1 if enc == "interior" else 0
        if margin:  # interiors need the neighbours (centres the whole object): a margin, clipped at the border
            h, w = self.masks.planes[k].shape
            a, b, c, d = max(0, y0 - margin), min(h, y1 + margin), max(0, x0 - margin), min(w, x1 + margin)
        m = np.asarray(self.masks.window(k, a, b, c, d), dtype=np.float32)  # masks are read as float32
        t = _targets(m, v, inner) if self.segmentation else (encode_mask(m, enc) if enc == "interior" else _binary(m, v))[None]
        t = t[:, y0 - a:y1 - a, x0 - c:x1 - c]
        return torch.from_numpy(np.concatenate([image, t * 2.0 - 1.0]))

    def smallest_side(self) -> int:
        """The largest square crop that every training image of this process can give."""
        return min(min(r1 - r0, self.width(k)) for k, r0, r1 in (self.train_views[j] for j in self.mine))

    def random_crops(self, n: int, crop: int, gen: torch.Generator, *, augment: bool = True) -> torch.Tensor:
        """``n`` random crops (n, C, crop, crop) from this process's training images, each picked in
        proportion to its area, with a random flip and 90-degree rotation."""
        views = [self.train_views[j] for j in self.mine]
        areas = torch.tensor([max(1, (r1 - r0 - crop + 1) * (self.width(k) - crop + 1)) for k, r0, r1 in views],
                             dtype=torch.float64)
        which = torch.multinomial(areas, n, replacement=True, generator=gen)
        out = []
        for i in which.tolist():
            k, r0, r1 = views[i]
            y = int(torch.randint(0, r1 - r0 - crop + 1, (1,), generator=gen))
            x = int(torch.randint(0, self.width(k) - crop + 1, (1,), generator=gen))
            c = self.window(k, r0 + y, r0 + y + crop, x, x + crop)
            if augment:
                c = random_dihedral(c, gen)
            out.append(c)
        self._release()
        return torch.stack(out)

    def val_crops(self, crop: int, limit: int = 64) -> torch.Tensor | None:
        """Non-overlapping crops tiling the validation images (at most ``limit``, spread evenly), or None;
        only the crops returned are read."""
        tiles = [(k, r0 + y, x) for k, r0, r1 in self.val_views
                 for y in range(0, r1 - r0 - crop + 1, crop) for x in range(0, self.width(k) - crop + 1, crop)]
        if not tiles:
            return None
        idx = np.linspace(0, len(tiles) - 1, min(limit, len(tiles))).round().astype(int)
        out = torch.stack([self.window(k, y, y + crop, x, x + crop)
                           for k, y, x in (tiles[i] for i in sorted(set(idx.tolist())))])
        self._release()
        return out

    def _release(self) -> None:
        for s in (self.images, self.masks):
            if s is not None:
                s.release()

    def held_bytes(self) -> int:
        """Bytes of pixel data this data set holds in memory (only RGB(A) grayscale planes and unmapped
        open files; the images and masks stay on disk, the percentiles are two numbers per image)."""
        return sum(s.held_bytes() for s in (self.images, self.masks) if s is not None)

    def describe(self) -> dict:
        return {
            "images": len(self.names),
            "files": sorted({n.split("[")[0] for n in self.names}),
            "mask_files": sorted({n.split("[")[0] for n in self.mask_names}),
            "channels": self.channels,
            "mask_encoding": self.mask_encoding,
            "validation": self.split,
        }


__all__ = ["Images", "MaskValues", "PatchData", "scan_mask"]
