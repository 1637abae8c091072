"""A lab's (Z, Y, X) stacks as cascade training data: one stack per specimen, one depth class per
plane (or per bin of planes, :mod:`.depths`).

Training data for the cascade is a folder (or list) of files (TIFF, OME-TIFF, OME-Zarr; see
:mod:`..reader`), each one or more (Z, Y, X) stacks of any dtype. Every plane is cut to a square
(centre crop; a random offset while training), scaled to [-1, 1] after percentile normalisation
with its stack's percentiles, and resized to the stage's resolution.

**Memory follows the work, not the data set.** The stacks stay on disk in their own dtype (memory
maps or chunked Zarr) and a plane is read when a batch needs it. Each stack's percentiles are
computed once, in one pass that reads a plane at a time (exact for 8- and 16-bit data). The base
stage's planes are small at 64 px, so they are cached once, already normalised. Under torchrun each
rank touches only its own specimens' files.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import UserInputError
import torch.nn.functional as F

from ..images import Normalisation, resize, square, stack_percentiles, unit_to_model
from ..io import list_images
from ..reader import open_image
from .depths import depth_bins, depth_bins_um


def read_stacks(path: str | Path, channel: int | None = None, axes: str | None = None) -> tuple[list[tuple], dict]:
    """The (Z, Y, X) stacks of one file, one lazy view per specimen (time points and other axes
    besides Z, Y, X become specimens; see :mod:`..reader`), with the file's pixel sizes in
    micrometres. 2D and RGB files, several channels without ``channel`` and tiny planes are refused
    with the reason; nothing is read but the metadata."""
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
    stacks = src.stacks(channel)
    for stack_name, lazy in stacks:
        if min(lazy.shape[1:]) < 16:
            raise UserInputError(f"{name}: planes of {lazy.shape[1:]} pixels are too small (need at least 16x16).")
        label = stack_name[len(src.path.stem) + 1:]  # e.g. "t3" for a time point
        out.append((name if len(stacks) == 1 else f"{name}[{label}]", lazy))
    return out, dict(src.pixel_um)


def _physical_classes(stacks, steps, counts, bin_um: float, depth_classes) -> list[list[int]]:
    """Each stack's planes' depth classes in bins of ``bin_um`` micrometres (see ``from_paths``)."""
    if depth_classes is not None:
        raise UserInputError("give depth classes either as bins of planes (--depth-classes) or of micrometres "
                             "(--depth-bin-um), not both.")
    if not bin_um > 0:
        raise UserInputError(f"--depth-bin-um must be more than 0, got {bin_um}.")
    missing = [name for (name, _), step in zip(stacks, steps) if not step]
    if missing:
        raise UserInputError(f"depth in micrometres needs each file's z-step: {', '.join(missing[:3])} carry none. "
                             "Give --z-step-um for them (or save them as OME-TIFF with PhysicalSizeZ).")
    per_stack = [depth_bins_um(k, float(step), bin_um) for k, step in zip(counts, steps)]
    used = {c for bins in per_stack for c in bins}
    empty = sorted(set(range(max(used) + 1)) - used)
    if empty:
        raise UserInputError(f"with --depth-bin-um {bin_um:g}, depth classes {empty[:5]} hold no plane (z-steps "
                             f"{sorted({float(s) for s in steps})} um): use bins at least as deep as the z-step.")
    return per_stack


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
    """The training stacks, read lazily (see the module docstring).

    ``stacks``: one lazy (Z, Y, X) view per specimen in its source dtype; ``classes``, ``specimen``
    and ``zindex``: (N,) depth class, specimen and plane index of every plane; ``mine``: the
    specimens this process trains on (all, or its torchrun shard).
    """

    classes: torch.Tensor
    specimen: torch.Tensor
    zindex: torch.Tensor
    n_classes: int
    n_planes: int
    files: list[str]
    stacks: list
    norm: Normalisation
    names: list[str] = field(default_factory=list)  # one per specimen (file, time point, ...)
    pixel_um: dict = field(default_factory=dict)  # Z / Y / X in micrometres, where the files say
    side_px: int = 0  # the median side of the square cut from each plane (the field generated slices show)
    notices: list[str] = field(default_factory=list)
    mine: list[int] = field(default_factory=list)
    stats: dict = field(default_factory=dict)  # specimen -> (low, high) percentile values
    small: dict = field(default_factory=dict)  # specimen -> (Z, h, w) planes in model space, short side ``small_res``
    small_res: int | None = None
    depth_bin_um: float | None = None  # depth classes are bins of this many micrometres (else of planes)

    @classmethod
    def from_paths(cls, paths, *, depth_classes: int | None = None, norm: Normalisation = Normalisation(),
                   channel: int | None = None, axes: str | None = None, rank: int = 0, world: int = 1,
                   cache_res: int | None = None, depth_bin_um: float | None = None,
                   z_step_um: float | None = None) -> DepthDataset:
        """Open the stacks (metadata only), check them, compute this process's stacks' percentiles in
        one pass and, with ``cache_res``, cache their planes at that resolution (short side).

        Depth classes: one per plane (all stacks with the same number of planes), ``depth_classes``
        bins of planes, or, with ``depth_bin_um``, bins of physical depth from the top plane, so that
        stacks with other numbers of planes or z-steps train together (each file's z-step from its
        metadata, or ``z_step_um`` for files that carry none)."""
        files = list_images(paths)
        read = [read_stacks(f, channel, axes) for f in files]
        stacks = [(name, lazy) for per_file, _ in read for name, lazy in per_file]
        steps = [px.get("Z") or z_step_um for per_file, px in read for _ in per_file]
        notices: list[str] = []
        pixel = {a: _agreed([px.get(a) for _, px in read], f"{a.lower()} pixel size", notices) for a in "ZYX"}
        if pixel["Z"] is None and z_step_um:
            pixel["Z"] = float(z_step_um)
        counts = [s.shape[0] for _, s in stacks]
        if depth_bin_um is not None:
            per_stack = _physical_classes(stacks, steps, counts, depth_bin_um, depth_classes)
        else:
            if len(set(counts)) != 1:
                detail = ", ".join(f"{name}: {s.shape[0]}" for name, s in stacks)
                raise UserInputError(
                    f"the stacks have different numbers of planes ({detail}): depth classes need the same "
                    "planes in every specimen. Crop them to the same z range, use --depth-classes K, or give "
                    "depth classes in micrometres with --depth-bin-um (and --z-step-um for files without one).")
            per_stack = [depth_bins(counts[0], depth_classes)] * len(stacks)
        n = len(stacks)
        classes = torch.tensor([c for bins in per_stack for c in bins])
        specimen = torch.cat([torch.full((k,), i) for i, k in enumerate(counts)])
        zindex = torch.cat([torch.arange(k) for k in counts])
        side = int(np.median([min(s.shape[1:]) for _, s in stacks]))
        mine = list(range(n)) if world <= 1 or n < world else [i for i in range(n) if i % world == rank]
        ds = cls(classes, specimen, zindex, int(classes.max()) + 1, max(counts), [str(f) for f in files],
                 [lazy for _, lazy in stacks], norm, [name for name, _ in stacks], pixel, side, notices, mine)
        ds.depth_bin_um = depth_bin_um
        for i in mine:
            ds.stats[i] = ds._percentiles(i)
        if cache_res:
            ds.cache(cache_res)
        return ds

    def _percentiles(self, spec: int) -> tuple[float, float]:
        """The stack's percentiles, in one pass that also refuses NaN or infinite values."""
        stack = self.stacks[spec]
        try:
            return stack_percentiles(stack, self.norm.low, self.norm.high, name=self.names[spec])
        finally:
            stack.release()

    def __len__(self) -> int:
        return len(self.classes)

    def normalisation_stats(self) -> dict[str, list[float]]:
        """Each of this process's stacks' low and high percentile values, by name (for the card)."""
        return {self.names[i]: [float(lo), float(hi)] for i, (lo, hi) in sorted(self.stats.items())}

    def shard(self, rank: int, world: int) -> torch.Tensor:
        """Indices of the planes this rank trains on (all of them if there are too few to split)."""
        idx = torch.arange(len(self))
        n_spec = len(self.stacks)
        if world <= 1 or n_spec < world:
            return idx
        return idx[(self.specimen % world) == rank]

    # ------------------------------------------------------------------ reading planes
    def plane(self, spec: int, z: int) -> torch.Tensor:
        """Plane ``z`` of specimen ``spec`` in model space [-1, 1], (Y, X) float32: read from disk now."""
        if spec not in self.stats:
            self.stats[spec] = self._percentiles(spec)
        unit = self.norm.scale(self.stacks[spec][z], *self.stats[spec])
        self.stacks[spec].release()  # the copy is made: the file's pages need not count in our memory
        return torch.from_numpy(unit_to_model(unit))

    def stack(self, spec: int) -> torch.Tensor:
        """A whole specimen in model space, (Z, Y, X) float32 (for evaluation; training reads planes)."""
        return torch.stack([self.plane(spec, z) for z in range(len(self.stacks[spec]))])

    def square(self, spec: int, z: int, offset: float | None, res: int) -> torch.Tensor:
        """The square cut from plane ``z`` at ``offset`` (None: centre), resized to ``res`` x ``res``:
        (1, 1, res, res). From the cache when it holds planes at ``res``, else read from disk."""
        if res == self.small_res and spec in self.small:
            return square(self.small[spec][z], offset)[None, None]
        return resize(square(self.plane(spec, z), offset)[None, None], res)

    def source_square(self, spec: int, z: int, offset: float | None) -> torch.Tensor:
        """The square cut from plane ``z`` at ``offset``, at the source resolution: (1, 1, S, S)."""
        return square(self.plane(spec, z), offset)[None, None]

    def cache(self, res: int) -> None:
        """Keep this process's planes at short side ``res``, normalised (a 64 px base stage: tens of MB
        for a lab's data set)."""
        self.small_res = res
        for spec in self.mine:
            planes = []
            for z in range(len(self.stacks[spec])):
                p = self.plane(spec, z)
                h, w = p.shape
                s = min(h, w)
                size = (max(res, round(h * res / s)), max(res, round(w * res / s)))
                planes.append(F.interpolate(p[None, None], size=size, mode="bilinear", align_corners=False,
                                            antialias=size[0] < h)[0, 0])
            self.small[spec] = torch.stack(planes)

    def held_bytes(self) -> int:
        """Bytes of pixel data this data set holds in memory (the cache; the stacks stay on disk)."""
        return sum(t.numel() * t.element_size() for t in self.small.values())


__all__ = ["DepthDataset", "read_stacks"]
