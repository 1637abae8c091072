"""Reading a lab's stacks, normalising intensities, resizing and augmenting.

Training data for the cascade is a folder (or list) of TIFFs, one per specimen, each (Z, Y, X) of
any dtype. Every plane is cut to a square (centre crop; a random offset while training), scaled
to [-1, 1] after percentile normalisation, and resized once per cascade resolution.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .errors import UserInputError

IMAGE_SUFFIXES = (".tif", ".tiff", ".png")


@dataclass(frozen=True)
class Normalisation:
    """Percentile normalisation: ``low``/``high`` percentiles of each stack map to 0 and 1."""

    low: float = 1.0
    high: float = 99.8
    per: str = "stack"

    def apply(self, arr: np.ndarray) -> np.ndarray:
        """``arr`` mapped to [0, 1], as a new float32 array (one copy, then in place: big planes cost
        one plane of memory)."""
        out = np.array(arr, dtype=np.float32)
        lo, hi = (float(v) for v in np.percentile(out, [self.low, self.high]))
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


def list_images(paths: str | Path | Iterable[str | Path]) -> list[Path]:
    """Image files from a folder, a file, or a list of either; sorted, and never empty."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    files: list[Path] = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            files.extend(sorted(q for q in p.iterdir() if q.suffix.lower() in IMAGE_SUFFIXES))
        elif p.is_file():
            files.append(p)
        else:
            raise UserInputError(f"'{p}' does not exist: give a folder of TIFF stacks or a list of TIFF files.")
    if not files:
        raise UserInputError(
            f"no .tif/.tiff/.png images found in {', '.join(str(p) for p in paths)}: "
            "put one (Z, Y, X) TIFF per specimen in the folder."
        )
    return files


def read_image(path: str | Path) -> np.ndarray:
    """Read a TIFF or PNG as a NumPy array, with a clear error for an unreadable file."""
    path = Path(path)
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            arr = tifffile.imread(path)
        else:
            from PIL import Image

            with Image.open(path) as im:
                arr = np.asarray(im)
    except FileNotFoundError:
        raise UserInputError(f"'{path}' does not exist.") from None
    except Exception as e:  # corrupt or not an image
        raise UserInputError(f"could not read '{path}' as an image ({type(e).__name__}: {e}).") from None
    if arr.size == 0:
        raise UserInputError(f"could not read '{path}' as an image: it holds no pixels (empty or corrupted file).")
    return arr


def looks_rgb(arr: np.ndarray) -> bool:
    return arr.ndim >= 3 and arr.shape[-1] in (3, 4) and arr.shape[-2] > 4


def check_finite(arr: np.ndarray, name: str) -> None:
    if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr)).sum())
        raise UserInputError(f"{name} holds {bad} NaN or infinite value(s): replace them (e.g. with 0) first.")


def read_stack(path: str | Path) -> np.ndarray:
    """A (Z, Y, X) stack from one file; 2D, 4D/5D and RGB files are refused with the reason."""
    arr = read_image(path)
    name = Path(path).name
    if looks_rgb(arr):
        raise UserInputError(
            f"{name} looks like an RGB(A) image, shape {arr.shape}: the models take one grayscale "
            "channel. Save a single channel as a (Z, Y, X) TIFF."
        )
    if arr.ndim == 2:
        raise UserInputError(f"{name} is a single 2D plane {arr.shape}: training needs a (Z, Y, X) stack per specimen.")
    if arr.ndim != 3:
        raise UserInputError(
            f"{name} has {arr.ndim} dimensions {arr.shape}: give one (Z, Y, X) stack per file. "
            "Split time points or channels into separate files first (e.g. with tifffile)."
        )
    check_finite(arr, name)
    if min(arr.shape[1:]) < 16:
        raise UserInputError(f"{name}: planes of {arr.shape[1:]} pixels are too small (need at least 16x16).")
    return arr


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


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random flip and 90-degree rotation of each (C, H, W) item of a (B, C, H, W) batch."""
    out = []
    for item in x:
        k = int(torch.randint(0, 4, (1,), generator=gen))
        out.append(dihedral(item, k, bool(torch.rand(1, generator=gen) < 0.5)))
    return torch.stack(out)


def depth_bins(n_planes: int, n_classes: int | None) -> list[int]:
    """The depth class of each plane: one class per plane, or ``n_classes`` equal bins."""
    if n_classes is None or n_classes == n_planes:
        return list(range(n_planes))
    if n_classes < 1 or n_classes > n_planes:
        raise UserInputError(f"--depth-classes must be between 1 and the number of planes ({n_planes}), got {n_classes}.")
    return [min(n_classes - 1, math.floor(z * n_classes / n_planes)) for z in range(n_planes)]


@dataclass
class DepthDataset:
    """All training stacks in memory, as float tensors in [-1, 1] at the source resolution.

    ``raw``: one (Z, Y, X) tensor per specimen; ``classes``: (N,) depth class of each plane;
    ``specimen``: (N,) index of the specimen each plane came from.
    """

    classes: torch.Tensor
    specimen: torch.Tensor
    n_classes: int
    n_planes: int
    files: list[str]
    raw: list[torch.Tensor]

    @classmethod
    def from_paths(cls, paths, *, depth_classes: int | None = None,
                   norm: Normalisation = Normalisation()) -> DepthDataset:
        files = list_images(paths)
        stacks = [read_stack(f) for f in files]
        zs = {s.shape[0] for s in stacks}
        if len(zs) != 1:
            detail = ", ".join(f"{f.name}: {s.shape[0]}" for f, s in zip(files, stacks))
            raise UserInputError(
                f"the stacks have different numbers of planes ({detail}): depth classes need the same "
                "planes in every specimen. Crop them to the same z range, or use --depth-classes K."
            )
        n_planes = zs.pop()
        bins = depth_bins(n_planes, depth_classes)
        raw, classes, spec = [], [], []
        for i, s in enumerate(stacks):
            t = torch.from_numpy(norm.apply(s) * 2.0 - 1.0)
            raw.append(t)  # (Z, Y, X), kept whole so training can choose a crop offset
            classes.extend(bins)
            spec.extend([i] * n_planes)
        return cls(torch.tensor(classes), torch.tensor(spec), max(bins) + 1, n_planes,
                   [str(f) for f in files], raw)

    def __len__(self) -> int:
        return len(self.classes)

    def shard(self, rank: int, world: int) -> torch.Tensor:
        """Indices of the planes this rank trains on (all of them if there are too few to split)."""
        idx = torch.arange(len(self))
        n_spec = int(self.specimen.max()) + 1
        if world <= 1 or n_spec < world:
            return idx
        return idx[(self.specimen % world) == rank]


def random_crop(x: torch.Tensor, crop: int, gen: torch.Generator) -> torch.Tensor:
    """One random crop of a (B, C, H, W) tensor (stack aligned images as channels to crop them alike)."""
    h, w = x.shape[-2:]
    if crop >= min(h, w):
        return x
    y = int(torch.randint(0, h - crop + 1, (1,), generator=gen))
    x0 = int(torch.randint(0, w - crop + 1, (1,), generator=gen))
    return x[..., y:y + crop, x0:x0 + crop]


def to_unit(x: torch.Tensor | np.ndarray) -> np.ndarray:
    """Model space [-1, 1] to float32 images in [0, 1]."""
    if torch.is_tensor(x):
        x = x.detach().float().cpu().numpy()
    return np.clip((x + 1.0) / 2.0, 0.0, 1.0).astype(np.float32)


def from_image(img: np.ndarray, norm: Normalisation = Normalisation()) -> torch.Tensor:
    """A user's 2D image (any dtype) to a (1, 1, H, W) model-space tensor, percentile-normalised."""
    check_finite(np.asarray(img), "the image")
    return torch.from_numpy(norm.apply(img) * 2.0 - 1.0)[None, None]


def dihedral(x: torch.Tensor, k: int, flip: bool) -> torch.Tensor:
    if flip:
        x = x.flip(-1)
    return torch.rot90(x, k, dims=(-2, -1))

