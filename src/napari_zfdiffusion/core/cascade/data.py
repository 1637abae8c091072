"""A lab's (Z, Y, X) stacks as cascade training data: one stack per specimen, one depth class per
plane (or per bin of planes, :mod:`.depths`).

Training data for the cascade is a folder (or list) of TIFFs, one per specimen, each (Z, Y, X) of
any dtype. Every plane is cut to a square (centre crop; a random offset while training), scaled
to [-1, 1] after percentile normalisation, and resized once per cascade resolution.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import UserInputError
from ..images import Normalisation, check_finite, looks_rgb, model_space
from ..io import list_images, read_image
from .depths import depth_bins


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
            t = torch.from_numpy(model_space(s, norm))
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


__all__ = ["DepthDataset", "read_stack"]
