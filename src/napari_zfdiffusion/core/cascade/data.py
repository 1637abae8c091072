"""A lab's (Z, Y, X) stacks as cascade training data: one stack per specimen, one depth class per
plane (or per bin of planes, :mod:`.depths`).

Training data for the cascade is a folder (or list) of TIFFs, one per specimen, each (Z, Y, X) of
any dtype. Every plane is cut to a square (centre crop; a random offset while training), scaled
to [-1, 1] after percentile normalisation, and resized once per cascade resolution.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import UserInputError
from ..images import Normalisation, check_finite, model_space
from ..io import list_images
from ..reader import open_image
from .depths import depth_bins


def read_stacks(path: str | Path, channel: int | None = None,
                axes: str | None = None) -> tuple[list[tuple[str, np.ndarray]], dict]:
    """The (Z, Y, X) stacks of one file, one per specimen (time points and other axes besides Z, Y, X
    become specimens; see :mod:`..reader`), with the file's pixel sizes in micrometres. 2D and RGB
    files, several channels without ``channel``, NaNs and tiny planes are refused with the reason."""
    src = open_image(path, channel=channel, axes=axes)
    name = src.name
    if src.rgb:
        raise UserInputError(
            f"{name} looks like an RGB(A) image, shape {src.shape}: the models take one grayscale "
            "channel. Save a single channel as a (Z, Y, X) TIFF."
        )
    axes = src.stack_axes(channel)
    if "Z" not in axes:
        raise UserInputError(f"{name} is a single 2D plane {src.shape}: training needs a (Z, Y, X) stack per "
                             "specimen.")
    out = []
    for stack_name, lazy in src.stacks(channel):
        arr = lazy[...]
        check_finite(arr, name)
        if min(arr.shape[1:]) < 16:
            raise UserInputError(f"{name}: planes of {arr.shape[1:]} pixels are too small (need at least 16x16).")
        out.append((stack_name, arr))
    return out, dict(src.pixel_um)


def _agreed(values: list[float | None], what: str, notices: list[str]) -> float | None:
    """One physical size for the data set: the value all files give, or the median with a notice."""
    known = [v for v in values if v]
    if not known:
        return None
    if len(known) < len(values) or max(known) > min(known) * 1.01:
        notices.append(f"the files disagree on the {what} ({', '.join(f'{v:g}' if v else '?' for v in values)} um): "
                       f"the card records the median, {float(np.median(known)):g} um")
    return float(np.median(known))


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
    names: list[str] = field(default_factory=list)  # one per specimen (file, time point, ...)
    pixel_um: dict = field(default_factory=dict)  # Z / Y / X in micrometres, where the files say
    side_px: int = 0  # the median side of the square cut from each plane (the field generated slices show)
    notices: list[str] = field(default_factory=list)

    @classmethod
    def from_paths(cls, paths, *, depth_classes: int | None = None, norm: Normalisation = Normalisation(),
                   channel: int | None = None, axes: str | None = None) -> DepthDataset:
        files = list_images(paths)
        read = [read_stacks(f, channel, axes) for f in files]
        stacks = [(name, arr) for per_file, _ in read for name, arr in per_file]
        notices: list[str] = []
        pixel = {a: _agreed([px.get(a) for _, px in read], f"{a.lower()} pixel size", notices) for a in "ZYX"}
        zs = {s.shape[0] for _, s in stacks}
        if len(zs) != 1:
            detail = ", ".join(f"{name}: {s.shape[0]}" for name, s in stacks)
            raise UserInputError(
                f"the stacks have different numbers of planes ({detail}): depth classes need the same "
                "planes in every specimen. Crop them to the same z range, or use --depth-classes K."
            )
        n_planes = zs.pop()
        bins = depth_bins(n_planes, depth_classes)
        raw, classes, spec = [], [], []
        for i, (_, s) in enumerate(stacks):
            t = torch.from_numpy(model_space(s, norm))
            raw.append(t)  # (Z, Y, X), kept whole so training can choose a crop offset
            classes.extend(bins)
            spec.extend([i] * n_planes)
        side = int(np.median([min(s.shape[1:]) for _, s in stacks]))
        return cls(torch.tensor(classes), torch.tensor(spec), max(bins) + 1, n_planes,
                   [str(f) for f in files], raw, [name for name, _ in stacks], pixel, side, notices)

    def __len__(self) -> int:
        return len(self.classes)

    def shard(self, rank: int, world: int) -> torch.Tensor:
        """Indices of the planes this rank trains on (all of them if there are too few to split)."""
        idx = torch.arange(len(self))
        n_spec = int(self.specimen.max()) + 1
        if world <= 1 or n_spec < world:
            return idx
        return idx[(self.specimen % world) == rank]


__all__ = ["DepthDataset", "read_stacks"]
