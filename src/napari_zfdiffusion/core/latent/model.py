"""Latent diffusion for 2D patches (EM cells; image + mask pairs): a KL autoencoder and a diffusion
UNet in its latent space, sampled by the one sampling loop (:func:`..diffusion.sampling.denoise`).

Folders::

    VAE/                     made by `zfdiffusion train vae`
      model.json             kind "vae": channels, mask encoding, normalisation, scaling factor,
                             downsampling, validation MSE / PSNR / SSIM, training data
      vae/                   config.json + diffusion_pytorch_model.safetensors + stage.json

    LDM/                     made by `zfdiffusion train ldm`
      model.json             kind "latent": the above plus the UNet's latent shape and the
                             sha256 of the autoencoder weights it was trained with
      vae/                   a copy of the autoencoder, so the folder stands alone
      unet/                  the latent UNet (a ZfUNet)

Channel 0 is the image; channel 1, in a paired model, is the mask (see :mod:`...masks`). Images are
in [-1, 1] (mean 0.5, std 0.5 of the [0, 1] normalised image, as in the original work). Latents are
multiplied by ``scaling_factor`` = 1 / (their standard deviation on the training crops) before
diffusion, so the UNet sees unit variance.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..diffusion.sampling import DEFAULT_SAMPLER, check_steps, denoise, generators
from ..device import maybe_compile
from ..diffusion.unet import ZfUNet
from ..errors import UserInputError
from ..images import to_unit
from ..masks import labels_from_mask
from ..progress import ProgressCallback, rescaled
from ..provenance import stamp
from ..store import STAGE_FILE, WEIGHTS_FILE, load_model, read_card, read_json, resolve_model, weights_sha256
from .autoencoder import Autoencoder, KLAutoencoder


@dataclass
class PatchResult:
    """Generated patches: ``images`` (N, H, W) float32 in [0, 1]; for a paired model also ``masks``
    (foreground probability, N, H, W, float32 in [0, 1]) and ``labels`` (N, H, W, int32)."""

    images: np.ndarray
    masks: np.ndarray | None
    labels: np.ndarray | None
    provenance: dict


class LatentModel(Autoencoder):
    """A latent diffusion model: autoencoder + latent UNet. :meth:`generate` gives patches (and masks)."""

    def __init__(self, path: Path, card: dict, vae: KLAutoencoder, unet, stage: dict, device: torch.device):
        super().__init__(path, card, vae, device)
        self.unet = unet.to(device)
        self.stage = stage

    @classmethod
    def load(cls, model: str | Path, device: str | torch.device = "auto") -> LatentModel:
        path = resolve_model(model)
        card = read_card(path, ("latent",))
        if not (path / "unet" / STAGE_FILE).is_file():
            raise UserInputError(f"'{path}' has no trained latent UNet (unet/{STAGE_FILE} is missing).")
        want = card.get("vae_sha256")
        if want and (path / "vae" / WEIGHTS_FILE).is_file() and weights_sha256(path / "vae") != want:
            raise UserInputError(
                f"the autoencoder in '{path / 'vae'}' is not the one this diffusion model was trained with "
                "(its weights differ): copy the whole model folder again, or retrain with `zfdiffusion train ldm`."
            )
        base = Autoencoder.load(path, device)
        unet = maybe_compile(load_model(path / "unet", ZfUNet), base.device)  # ZFDIFFUSION_COMPILE=1, CUDA
        z = card["latent_shape"]
        if unet.config.in_channels != z[0] or base.vae.config.latent_channels != z[0]:
            raise UserInputError(f"'{path}': the UNet and the autoencoder disagree on the latent channels.")
        return cls(path, card, base.vae, unet, read_json(path / "unet" / STAGE_FILE), base.device)

    @property
    def patch_size(self) -> int:
        return int(self.card["patch_size"])

    def generate(self, n: int = 1, *, seed: int = 0, sampler: str = DEFAULT_SAMPLER, steps: int = 50,
                 batch: int = 8, threshold: float = 0.5, min_size: int = 16,
                 callback: ProgressCallback | None = None) -> PatchResult:
        """``n`` patches (and, for a paired model, their masks and labels). Sample ``i`` equals a run with
        seed ``seed + i`` whatever the batch size."""
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise UserInputError(f"the number of patches must be at least 1, got {n!r}.")
        if n > 10000:
            raise UserInputError(f"at most 10000 patches per call, got {n}: split the job (e.g. by seed).")
        steps = check_steps(steps)
        if not 0.0 < threshold < 1.0:
            raise UserInputError(f"the mask threshold must be between 0 and 1, got {threshold!r}.")
        gens = generators(seed, n)
        shape = self.card["latent_shape"]
        zs = []
        n_batches = -(-n // batch)

        for k, i in enumerate(range(0, n, batch)):  # one progress stream over all batches: sample, then decode
            g = gens[i:i + batch]
            zs.append(denoise(self.unet, (len(g), *shape), conditions=[{}], guidance=[], sampler=sampler,
                              steps=steps, schedule=self.stage["schedule"], gens=g, device=self.device,
                              dtype=self.dtype, stage="sample", clip=False,
                              callback=rescaled(callback, k, 1, n_batches, stage_index=0, n_stages=2)).cpu())
        x = self.decode(torch.cat(zs), batch=batch, callback=callback, stage_index=1, n_stages=2)
        images = to_unit(x[:, 0])
        masks = labels = None
        if self.paired:
            masks = to_unit(x[:, 1])
            labels = labels_from_mask(masks, encoding=self.card.get("mask_encoding") or "binary",
                                      threshold=threshold, min_size=min_size)
        prov = stamp("zfdiffusion.latent", model=self, device=self.device, seed=seed,
                     seeds=[seed + i for i in range(n)], sampler=sampler, steps=steps, patch_size=self.patch_size,
                     paired=self.paired)
        if self.paired:
            prov.update(mask_threshold=threshold, min_size=min_size, mask_encoding=self.card.get("mask_encoding"))
        return PatchResult(images, masks, labels, prov)


def describe(model: Autoencoder) -> str:
    c = model.card
    parts = [f"{model.name}: {c.get('description', '')}".strip()]
    if isinstance(model, LatentModel):
        parts.append(f"{model.patch_size}x{model.patch_size} patches" + (" with masks" if model.paired else ""))
    v = c.get("validation") or {}
    if v.get("psnr") is not None:
        parts.append(f"autoencoder PSNR {v['psnr']:.1f} dB, SSIM {v['ssim']:.2f} on held-out crops")
    return "; ".join(parts)


__all__ = ["LatentModel", "PatchResult", "describe"]
