"""Fine-tuning a segmentation model on a user's corrected labels (human in the loop, as cellpose 2.0
and micro-sam do it): segment, correct the labels, fine-tune, segment again.

* :func:`plane_checksums` / :func:`edited_planes`: which planes of a label stack a person changed
  (the dock keeps the checksums of the labels as it made them, not a copy of the labels);
* :func:`fine_tune`: the model trained further on those planes (``train unet --init-from``, the
  same training loop, augmentation and card), into a new model folder; the parent is not touched;
* :func:`finetuned_folder`: where the new model goes by default (the user models folder, so that it
  is listed with the others and can be chosen by name).

GUI-free: the Segment dock calls these in a worker; ``zfdiffusion train unet --init-from`` is the
same on the command line (the dock's "Copy CLI command" gives it).
"""

from __future__ import annotations

import tempfile
import time
import zlib
from pathlib import Path

import numpy as np

from ..errors import UserInputError
from ..progress import ProgressCallback

#: a few hundred steps adapt a model to a new domain without forgetting the old one (docs/evaluation.md)
FINE_TUNE_STEPS = 200
FINE_TUNE_LR = 3e-4


def plane_checksums(labels: np.ndarray) -> list[int]:
    """A CRC-32 of each plane of a 2D label image or a (N, Y, X) stack, as int32 bytes."""
    lab = np.asarray(labels)
    planes = lab[None] if lab.ndim == 2 else lab
    return [zlib.crc32(np.ascontiguousarray(p, dtype=np.int32).tobytes()) for p in planes]


def edited_planes(labels: np.ndarray, checksums: list[int] | None) -> list[int]:
    """The planes of ``labels`` whose checksum differs from ``checksums`` (those of the labels as the
    model made them): the planes a person corrected. Without checksums (labels drawn from scratch, or
    opened from a file), every plane that holds an object."""
    lab = np.asarray(labels)
    planes = lab[None] if lab.ndim == 2 else lab
    if checksums is None or len(checksums) != len(planes):
        return [k for k in range(len(planes)) if planes[k].any()]
    now = plane_checksums(planes)
    return [k for k, (a, b) in enumerate(zip(now, checksums)) if a != b]


def finetuned_folder(parent: str | Path) -> Path:
    """A new folder in the user models folder, named after the parent model and the time."""
    from ..store import user_models_dir

    stem = Path(str(parent)).name or "unet"
    base = user_models_dir() / f"{stem}-ft-{time.strftime('%Y%m%d-%H%M%S')}"
    out, k = base, 1
    while out.exists():
        k += 1
        out = base.with_name(f"{base.name}-{k}")
    return out


def _crop_for(planes: list[np.ndarray]) -> int:
    side = min(min(p.shape[-2:]) for p in planes)
    if side < 32:
        raise UserInputError(f"the corrected planes are {side} pixels on their short side: fine-tuning needs planes "
                             "of at least 32x32 pixels.")
    return int(min(128, side // 16 * 16))


def fine_tune(model: str | Path, images: list[np.ndarray], labels: list[np.ndarray], out: str | Path, *,
              steps: int = FINE_TUNE_STEPS, lr: float = FINE_TUNE_LR, batch_size: int = 4,
              extra_images=None, extra_masks=None, extra_fraction: float = 0.25, device: str = "auto",
              seed: int = 0, callback: ProgressCallback | None = None, credit: str = "") -> dict:
    """Fine-tune the segmentation ``model`` on 2D ``images`` with their corrected ``labels`` (label
    images: 0 background, 1, 2, ... objects) into the new model folder ``out``.

    ``extra_images`` / ``extra_masks``: more pairs (e.g. generated ones), ``extra_fraction`` of each
    batch. Returns the training summary (``train_unet``'s). The planes go to a temporary folder as
    TIFFs (removed at the end), so the training is exactly the command line's.
    """
    import tifffile

    from .train import UnetConfig, train_unet

    if len(images) != len(labels) or not images:
        raise UserInputError("fine-tuning needs at least one corrected plane, with its image.")
    imgs, labs = [], []
    for k, (img, lab) in enumerate(zip(images, labels)):
        img, lab = np.asarray(img), np.asarray(lab)
        if img.ndim != 2 or lab.shape != img.shape:
            raise UserInputError(f"corrected plane {k}: the image is {img.shape} and the labels {lab.shape}; give 2D "
                                 "planes of the same shape.")
        if not np.issubdtype(lab.dtype, np.integer):
            raise UserInputError(f"corrected plane {k}: labels must be integers (0 background, 1, 2, ... objects).")
        imgs.append(img)
        labs.append(lab.astype(np.int32, copy=False))
    if not any(lab.any() for lab in labs):
        raise UserInputError("the corrected planes hold no objects: paint or keep at least one object to learn from.")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise UserInputError(f"'{out}' already holds files: fine-tuning writes a new model folder, choose another.")
    cfg = UnetConfig(steps=steps, lr=lr, batch_size=batch_size, crop=_crop_for(imgs), warmup=min(20, steps // 5),
                     checkpoint_every=steps, val_fraction=0.0, init_from=str(model), seed=seed,
                     extra_fraction=extra_fraction, data_credit=credit or "corrected labels (fine-tuning)")
    with tempfile.TemporaryDirectory(prefix="zfdiffusion-finetune-") as tmp:
        tmp = Path(tmp)
        (tmp / "images").mkdir()
        (tmp / "masks").mkdir()
        for k, (img, lab) in enumerate(zip(imgs, labs)):
            tifffile.imwrite(tmp / "images" / f"plane_{k:04d}.tif", img)
            tifffile.imwrite(tmp / "masks" / f"plane_{k:04d}.tif", lab)
        return train_unet([tmp / "images"], [tmp / "masks"], out, cfg, extra_images=extra_images,
                          extra_masks=extra_masks, device=device, show_progress=False, callback=callback)


__all__ = ["FINE_TUNE_LR", "FINE_TUNE_STEPS", "edited_planes", "fine_tune", "finetuned_folder", "plane_checksums"]
