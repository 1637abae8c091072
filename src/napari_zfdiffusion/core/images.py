"""Images as the models see them: intensity normalisation, grayscale, model space, resizing and
augmentation. Shared by every model family; reading files is :mod:`.io`.

Model space is [-1, 1]: a user's image is percentile-normalised to [0, 1] (:class:`Normalisation`)
and mapped by ``x * 2 - 1`` (the original EM work's mean 0.5 / std 0.5); :func:`to_unit` maps back.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .errors import UserInputError


@dataclass(frozen=True)
class Normalisation:
    """Percentile normalisation: ``low``/``high`` percentiles of each stack map to 0 and 1."""

    low: float = 1.0
    high: float = 99.8
    per: str = "stack"

    def apply(self, arr: np.ndarray) -> np.ndarray:
        """``arr`` mapped to [0, 1] by its own percentiles, as a new float32 array (one copy, then in
        place: big planes cost one plane of memory)."""
        out = np.array(arr, dtype=np.float32)
        lo, hi = (float(v) for v in np.percentile(out, [self.low, self.high]))
        return self._scaled(out, lo, hi)

    def scale(self, arr: np.ndarray, lo: float, hi: float) -> np.ndarray:
        """``arr`` mapped to [0, 1] with given percentile values ``lo`` -> 0 and ``hi`` -> 1 (a stack's,
        computed once by :func:`stack_percentiles`), clipped: a new float32 array."""
        return self._scaled(np.array(arr, dtype=np.float32), lo, hi)

    @staticmethod
    def _scaled(out: np.ndarray, lo: float, hi: float) -> np.ndarray:
        if not hi > lo:
            hi = lo + 1.0
        out -= lo
        out /= hi - lo
        return np.clip(out, 0.0, 1.0, out=out)

    def to_dict(self) -> dict:
        return {"method": "percentile", **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict | None) -> Normalisation:
        d = dict(d or {})
        d.pop("method", None)
        return cls(**{k: v for k, v in d.items() if k in ("low", "high", "per")})


def _blocks(arr, rows: int):
    """A 2D plane (or each plane of a (Z, Y, X) stack) ``rows`` rows at a time, read as it goes."""
    planes = [arr] if len(arr.shape) == 2 else (arr[z] for z in range(arr.shape[0]))
    for plane in planes:
        for a in range(0, plane.shape[0], rows):
            yield np.asarray(plane[a:a + rows])


def _float_keys(rows: np.ndarray) -> np.ndarray:
    """float32 values as uint32 keys in the same order (-0.0 just below +0.0)."""
    u = np.ascontiguousarray(rows, np.float32).view(np.uint32)
    return u ^ np.where(u >> 31, np.uint32(0xFFFFFFFF), np.uint32(0x80000000))


def _key_value(key: int) -> np.float32:
    u = key ^ 0x80000000 if key >> 31 else key ^ 0xFFFFFFFF
    return np.array([u], np.uint32).view(np.float32)[0]


def order_statistics(arr, ranks, *, rows: int = 1024, name: str = "the image") -> dict[int, np.float32]:
    """The values of rank ``ranks`` (0 = smallest) of a 2D plane or a (Z, Y, X) stack as float32, as
    ``np.sort`` of ``arr.astype(np.float32)`` has them, read ``rows`` rows at a time (memory: a band,
    not the plane; ``arr`` may be a memory map or a lazy Zarr view).

    Exact for every data type: integers of 8 or 16 bits by one histogram of their values; anything
    else by two histograms of the float32 bit patterns (the top 16 bits, then the low 16 bits inside
    the buckets the ranks fall in). Refuses NaN or infinite values, counting them over the plane.
    """
    dt = np.dtype(arr.dtype)
    ranks = sorted({int(r) for r in ranks})
    out: dict[int, np.float32] = {}
    if dt.kind in "uib" and dt.itemsize <= 2:
        lo = int(np.iinfo(dt).min) if dt.kind == "i" else 0
        counts = np.zeros(2 ** (8 * dt.itemsize), np.int64)
        for band in _blocks(arr, rows):
            v = band.ravel()
            counts += np.bincount(v.astype(np.int32) - lo if lo else v, minlength=len(counts))
        cum = np.cumsum(counts)
        for r in ranks:
            out[r] = np.float32(int(np.searchsorted(cum, r, side="right")) + lo)
        return out
    top = np.zeros(65536, np.int64)
    bad = 0
    for band in _blocks(arr, rows):
        if np.issubdtype(band.dtype, np.floating):
            bad += int(band.size - np.count_nonzero(np.isfinite(band)))
        top += np.bincount((_float_keys(band) >> 16).ravel(), minlength=65536)
    if bad:  # as check_finite words it, for the whole plane
        raise UserInputError(f"{name} holds {bad} NaN or infinite value(s): replace them (e.g. with 0) first.")
    cum = np.cumsum(top)
    where = {r: int(np.searchsorted(cum, r, side="right")) for r in ranks}
    buckets = sorted(set(where.values()))
    low = {k: np.zeros(65536, np.int64) for k in buckets}
    for band in _blocks(arr, rows):
        keys = _float_keys(band).ravel()
        hi16 = keys >> 16
        for k in buckets:
            low[k] += np.bincount((keys[hi16 == k] & 0xFFFF).astype(np.int64), minlength=65536)
    for r in ranks:
        k = where[r]
        within = r - (int(cum[k - 1]) if k else 0)
        lo16 = int(np.searchsorted(np.cumsum(low[k]), within, side="right"))
        out[r] = _key_value((k << 16) | lo16)
    return out


def percentiles_from_ranks(n: int, qs, value_at) -> list[float]:
    """``np.percentile(a, qs)`` (method "linear") of an array of ``n`` values, given the sorted values
    by rank (``value_at(rank)`` -> float32): the same arithmetic as NumPy's, so the same floats."""
    q = np.true_divide(list(qs), 100)
    virtual = (n - 1) * q
    prev = np.floor(virtual)
    nxt = prev + 1
    above = virtual >= n - 1
    prev[above] = -1
    nxt[above] = -1
    prev, nxt = prev.astype(np.intp), nxt.astype(np.intp)
    a = np.array([value_at(int(i) % n) for i in prev], np.float32)
    b = np.array([value_at(int(i) % n) for i in nxt], np.float32)
    gamma = np.asanyarray(virtual - prev, dtype=virtual.dtype)
    diff = b - a
    res = np.add(a, diff * gamma)
    np.subtract(b, diff * (1 - gamma), out=res, where=gamma >= 0.5, casting="unsafe", dtype=res.dtype)
    return [float(v) for v in res]


def exact_percentiles(arr, qs, *, rows: int = 1024, name: str = "the image") -> tuple[list[float], np.float32]:
    """``np.percentile(arr.astype(np.float32), qs)`` of a 2D plane or a (Z, Y, X) stack, exactly, read
    a band of rows at a time (see :func:`order_statistics`), and the largest value. NaN or infinite
    values are refused, counted over the whole array."""
    n = int(np.prod(arr.shape))
    need: set[int] = {n - 1}

    def rank(i: int) -> np.float32:
        need.add(i)
        return np.float32(0)

    percentiles_from_ranks(n, qs, rank)  # which ranks the percentiles need
    values = order_statistics(arr, need, rows=rows, name=name)
    return percentiles_from_ranks(n, qs, values.__getitem__), values[n - 1]


def stack_percentiles(planes, low: float, high: float, *, name: str = "the stack") -> tuple[float, float]:
    """The ``low`` and ``high`` percentiles of a whole stack, exactly as ``np.percentile`` of it in
    memory, read a band at a time (:func:`exact_percentiles`)."""
    (lo, hi), _ = exact_percentiles(planes, (low, high), name=name)
    return lo, hi


def looks_rgb(arr: np.ndarray) -> bool:
    return arr.ndim >= 3 and arr.shape[-1] in (3, 4) and arr.shape[-2] > 4


def check_finite(arr: np.ndarray, name: str) -> None:
    if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr)).sum())
        raise UserInputError(f"{name} holds {bad} NaN or infinite value(s): replace them (e.g. with 0) first.")


def to_gray(arr: np.ndarray, name: str, notices: list[str]) -> np.ndarray:
    """RGB(A) to one channel (luminance; alpha dropped), with a notice saying so."""
    if not looks_rgb(arr):
        return arr
    rgb = arr[..., :3].astype(np.float32)
    gray = rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    notices.append(f"{name}: RGB{'A' if arr.shape[-1] == 4 else ''} image {arr.shape} converted to grayscale "
                   "(luminance" + (", alpha dropped)" if arr.shape[-1] == 4 else ")"))
    return gray


def unit_to_model(unit: np.ndarray) -> np.ndarray:
    """A float32 image in [0, 1] mapped to model space [-1, 1], in place."""
    unit *= 2.0
    unit -= 1.0
    return unit


def model_space(arr: np.ndarray, norm: Normalisation) -> np.ndarray:
    """``arr`` as the models see it: percentile-normalised, then mapped to [-1, 1] (float32; one copy
    of ``arr``, the rest in place, so a big plane costs one plane of memory)."""
    return unit_to_model(norm.apply(arr))


def to_model(image, norm: Normalisation = Normalisation(), *, normalise: bool = True,
             name: str = "the image") -> torch.Tensor:
    """A user's 2D image (any dtype) as a (1, 1, H, W) float32 tensor in model space [-1, 1].

    ``normalise``: percentile normalisation, as the training data had; False takes the values as
    already in [0, 1] (an image this plugin generated) and clips them. RGB(A), arrays that are not
    2D, and NaN or infinite values are refused with the reason.
    """
    arr = np.asarray(image)
    if looks_rgb(arr):
        raise UserInputError(f"{name} looks like RGB(A), shape {arr.shape}: give one grayscale channel.")
    if arr.ndim != 2:
        raise UserInputError(f"give a 2D image (Y, X); {name} has shape {arr.shape}.")
    if not np.issubdtype(arr.dtype, np.number) or arr.dtype == bool:
        raise UserInputError(f"{name} must hold numbers, got {arr.dtype}.")
    check_finite(arr, name)
    x = model_space(arr, norm) if normalise else np.clip(arr.astype(np.float32), 0.0, 1.0) * 2.0 - 1.0
    return torch.from_numpy(x)[None, None]


def to_unit(x: torch.Tensor | np.ndarray) -> np.ndarray:
    """Model space [-1, 1] to float32 images in [0, 1]."""
    if torch.is_tensor(x):
        x = x.detach().float().cpu().numpy()
    return np.clip((x + 1.0) / 2.0, 0.0, 1.0).astype(np.float32)


def square(arr: torch.Tensor, offset: float | None = None) -> torch.Tensor:
    """Cut the (..., Y, X) tensor to a square along its longer side; offset in [0, 1] (None = centre)."""
    h, w = arr.shape[-2:]
    s = min(h, w)
    f = 0.5 if offset is None else offset
    y0 = round((h - s) * f)
    x0 = round((w - s) * f)
    return arr[..., y0:y0 + s, x0:x0 + s]


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Resize (B, C, H, W) to size x size: antialiased bilinear down, bilinear up.

    The single resize used to make training targets and to feed super-resolution stages, so the
    low-res images a stage sees in training and in sampling are made the same way.
    """
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    down = size < x.shape[-1]
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=down)


def dihedral(x: torch.Tensor, k: int, flip: bool) -> torch.Tensor:
    """One of the 8 flips and 90-degree rotations of the last two axes."""
    if flip:
        x = x.flip(-1)
    return torch.rot90(x, k, dims=(-2, -1))


def random_dihedral(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A random flip and 90-degree rotation of one (C, H, W) item."""
    k = int(torch.randint(0, 4, (1,), generator=gen))
    return dihedral(x, k, bool(torch.rand(1, generator=gen) < 0.5))


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random flip and 90-degree rotation of each (C, H, W) item of a (B, C, H, W) batch."""
    return torch.stack([random_dihedral(item, gen) for item in x])


def random_crop(x: torch.Tensor, crop: int, gen: torch.Generator) -> torch.Tensor:
    """One random crop of a (B, C, H, W) tensor (stack aligned images as channels to crop them alike)."""
    h, w = x.shape[-2:]
    if crop >= min(h, w):
        return x
    y = int(torch.randint(0, h - crop + 1, (1,), generator=gen))
    x0 = int(torch.randint(0, w - crop + 1, (1,), generator=gen))
    return x[..., y:y + crop, x0:x0 + crop]


__all__ = ["Normalisation", "augment", "check_finite", "dihedral", "looks_rgb", "model_space", "stack_percentiles",
           "exact_percentiles", "order_statistics", "percentiles_from_ranks", "random_crop",
           "random_dihedral", "resize", "square", "to_gray", "to_model", "to_unit", "unit_to_model"]
