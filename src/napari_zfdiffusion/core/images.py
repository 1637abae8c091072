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


def _numpy_linear(sorted_at, n: int, q: float) -> float:
    """``np.percentile(..., method="linear")`` at ``q`` (percent) of ``n`` values, given the k-th
    smallest value as ``sorted_at(k)``: numpy's own index and interpolation formulas."""
    qq = q / 100
    virtual = n * qq + (1 + qq * (1 - 1 - 1)) - 1
    k = int(np.floor(virtual))
    k = min(max(k, 0), n - 1)
    t = min(max(virtual - k, 0.0), 1.0)
    a, b = float(sorted_at(k)), float(sorted_at(min(k + 1, n - 1)))
    diff = b - a
    return a + diff * t if t < 0.5 else b - diff * (1 - t)


def stack_percentiles(planes, low: float, high: float, *, max_values: int = 1 << 24) -> tuple[float, float]:
    """The ``low`` and ``high`` percentiles of a whole stack, read one plane at a time (``planes``:
    anything ``planes[z]`` gives 2D arrays of, e.g. a memory map or a lazy Zarr view).

    8- and 16-bit data: exact (a histogram of every value; equal to ``np.percentile`` of the whole
    stack). Other data: ``np.percentile`` of an even subsample of at most ``max_values`` values
    (exact when the stack is that small)."""
    n_planes = len(planes)
    dtype = np.dtype(planes.dtype)
    if dtype.kind in "ui" and dtype.itemsize <= 2:
        offset = -int(np.iinfo(dtype).min)
        counts = np.zeros(1 << (8 * dtype.itemsize), np.int64)
        for z in range(n_planes):
            counts += np.bincount((np.asarray(planes[z]).ravel().astype(np.int64) + offset), minlength=len(counts))
        cum = np.cumsum(counts)
        n = int(cum[-1])

        def sorted_at(k: int) -> int:
            return int(np.searchsorted(cum, k, side="right")) - offset

        return _numpy_linear(sorted_at, n, low), _numpy_linear(sorted_at, n, high)
    per_plane = max(1, max_values // max(n_planes, 1))
    parts = []
    for z in range(n_planes):
        flat = np.asarray(planes[z], dtype=np.float32).ravel()
        parts.append(flat[:: max(1, len(flat) // per_plane)] if len(flat) > per_plane else flat)
    values = np.concatenate(parts)
    lo, hi = np.percentile(values, [low, high])
    return float(lo), float(hi)


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
           "random_crop", "random_dihedral", "resize", "square", "to_gray", "to_model", "to_unit", "unit_to_model"]
