"""2D training images (and masks) for the patch models: the autoencoder, latent diffusion and the
segmentation U-Net.

Images of any size, TIFF or PNG, 8 or 16 bit (or float); a file may hold one image or a stack of
2D images (N, Y, X). Each is percentile-normalised to [0, 1] and stored as [-1, 1] (the original
work's mean 0.5 / std 0.5). Masks are matched to images by sorted order and must have the same
shapes; they may be binary masks or label images:

* **binary** (two values, or floats in [0, 1]): the foreground;
* **labels** (more than two integer values): the *interior* of each object, i.e. the foreground
  without the one-pixel rim where objects touch, so that connected components of a generated mask
  give separate objects again (see :mod:`..masks`).

Validation: with 5 or more images the last fifth of them are held out; with fewer, the bottom
``patch`` rows of each image tall enough (at least twice the patch) are held out, so training and
validation crops never overlap.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import UserInputError
from ..images import Normalisation, check_finite, model_space, random_dihedral, to_gray
from ..io import list_images
from ..reader import open_image
from ..masks import encode_mask, mask_encoding, targets_from_mask


def read_images_2d(paths, *, min_size: int, notices: list[str], channel: int | None = None,
                   axes: str | None = None) -> tuple[list[np.ndarray], list[str]]:
    """All 2D images in ``paths`` (files or folders; every plane of a stack, time series or OME file,
    ``channel`` of a multichannel one), as float32 arrays, with a name for each."""
    out, names = [], []
    for f in list_images(paths):
        planes = open_image(f, channel=channel, axes=axes).planes()
        n = len(planes)
        for i in range(n):
            p = to_gray(np.asarray(planes[i]), f.name, notices if i == 0 else [])
            check_finite(p, f.name)
            if min(p.shape) < min_size:
                raise UserInputError(
                    f"{f.name}{f' plane {i}' if n > 1 else ''} is {p.shape[0]}x{p.shape[1]} pixels: "
                    f"smaller than the {min_size}x{min_size} patches. Use larger images, or a smaller --patch-size."
                )
            out.append(p.astype(np.float32))
            names.append(f"{f.name}[{i}]" if n > 1 else f.name)
    return out, names


@dataclass
class PatchData:
    """Training and validation images as (C, H, W) tensors in [-1, 1]; channel 1 is the mask if any."""

    train: list[torch.Tensor]
    val: list[torch.Tensor]
    names: list[str]
    channels: list[str]
    mask_encoding: str | None
    normalisation: Normalisation
    split: str
    notices: list[str] = field(default_factory=list)
    mask_names: list[str] = field(default_factory=list)

    @property
    def n_channels(self) -> int:
        return len(self.channels)

    @classmethod
    def from_paths(cls, images, masks=None, *, patch: int = 256, norm: Normalisation | None = None,
                   val_fraction: float = 0.2, segmentation: bool = False, channel: int | None = None,
                   axes: str | None = None) -> PatchData:
        """Read ``images`` (and ``masks``) and split off validation images (none if ``val_fraction`` is 0).

        ``segmentation``: the masks become two target channels, foreground and interior (see
        :func:`..masks.targets_from_mask`), instead of the one mask channel of the patch generators.
        """
        norm = norm or Normalisation(per="image")
        notices: list[str] = []
        imgs, names = read_images_2d(images, min_size=patch, notices=notices, channel=channel, axes=axes)
        chans = [torch.from_numpy(model_space(i, norm))[None] for i in imgs]
        encoding = None
        if masks is not None:
            mks, mnames = read_images_2d(masks, min_size=patch, notices=notices)
            if len(mks) != len(imgs):
                raise UserInputError(
                    f"{len(imgs)} image(s) but {len(mks)} mask(s): give one mask per image (matched by sorted "
                    "file name; a stack counts one per plane)."
                )
            for i, (a, b, na, nb) in enumerate(zip(imgs, mks, names, mnames)):
                if a.shape != b.shape:
                    raise UserInputError(
                        f"mask {nb} is {b.shape[0]}x{b.shape[1]} but its image {na} is {a.shape[0]}x{a.shape[1]}: "
                        "each mask must have its image's shape."
                    )
            encoding = mask_encoding(mks)
            empty = [nb for m, nb in zip(mks, mnames) if not np.any(encode_mask(m, "binary") >= 0.5)]
            if segmentation and len(empty) == len(mks):
                raise UserInputError(
                    "every mask is empty (no foreground pixels): check that the masks are the right files, "
                    "and that objects are non-zero (binary masks: two values; label images: 1, 2, 3, ...).")
            if empty:
                notices.append(f"{len(empty)} of {len(mks)} mask(s) are empty ({', '.join(empty[:3])}"
                               f"{', ...' if len(empty) > 3 else ''}): those images teach background only")
            if segmentation:
                chans = [torch.cat([c, torch.from_numpy(targets_from_mask(m) * 2.0 - 1.0)])
                         for c, m in zip(chans, mks)]
            if encoding == "interior":
                notices.append("masks are label images: the model learns each object's interior, so touching "
                               "objects stay separate")
            if not segmentation:
                chans = [torch.cat([c, torch.from_numpy(encode_mask(m, encoding) * 2.0 - 1.0)[None]])
                         for c, m in zip(chans, mks)]
        n = len(chans)
        if val_fraction <= 0:
            train, val, split = chans, [], "no validation split"
        elif n >= 5:
            k = max(1, round(n * val_fraction))
            train, val = chans[: n - k], chans[n - k:]
            split = f"last {k} of {n} images held out"
        else:
            train, val = [], []
            for c in chans:
                h = c.shape[1]
                if h >= 2 * patch:
                    cut = h - max(patch, round(h * val_fraction))
                    train.append(c[:, :cut])
                    val.append(c[:, cut:])
                else:
                    train.append(c)
            split = f"bottom rows of {len(val)} of {n} images held out" if val else "no validation (images too small)"
            if not val:
                notices.append(f"no validation split: images need at least {2 * patch} rows, or give 5 or more images")
        names_ch = ["image"] if masks is None else (["image", "foreground", "interior"] if segmentation
                                                     else ["image", "mask"])
        return cls(train, val, names, names_ch, encoding, norm, split,
                   notices, mnames if masks is not None else [])

    def random_crops(self, n: int, crop: int, gen: torch.Generator, *, augment: bool = True) -> torch.Tensor:
        """``n`` random crops (n, C, crop, crop) from the training images, each picked in proportion to
        its area, with a random flip and 90-degree rotation."""
        areas = torch.tensor([max(1, (t.shape[1] - crop + 1) * (t.shape[2] - crop + 1)) for t in self.train],
                             dtype=torch.float64)
        which = torch.multinomial(areas, n, replacement=True, generator=gen)
        out = []
        for i in which.tolist():
            t = self.train[i]
            y = int(torch.randint(0, t.shape[1] - crop + 1, (1,), generator=gen))
            x = int(torch.randint(0, t.shape[2] - crop + 1, (1,), generator=gen))
            c = t[:, y:y + crop, x:x + crop]
            if augment:
                c = random_dihedral(c, gen)
            out.append(c)
        return torch.stack(out)

    def val_crops(self, crop: int, limit: int = 64) -> torch.Tensor | None:
        """Non-overlapping crops tiling the validation images (at most ``limit``), or None."""
        out = []
        for t in self.val:
            for y in range(0, t.shape[1] - crop + 1, crop):
                for x in range(0, t.shape[2] - crop + 1, crop):
                    out.append(t[:, y:y + crop, x:x + crop])
        if not out:
            return None
        idx = np.linspace(0, len(out) - 1, min(limit, len(out))).round().astype(int)
        return torch.stack([out[i] for i in sorted(set(idx.tolist()))])

    def describe(self) -> dict:
        return {
            "images": len(self.names),
            "files": sorted({n.split("[")[0] for n in self.names}),
            "mask_files": sorted({n.split("[")[0] for n in self.mask_names}),
            "channels": self.channels,
            "mask_encoding": self.mask_encoding,
            "validation": self.split,
        }
