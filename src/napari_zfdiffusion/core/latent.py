"""Latent diffusion for 2D patches (EM cells; image + mask pairs): a KL autoencoder and a diffusion
UNet in its latent space, sampled by the one sampling loop (:func:`.sampling.denoise`).

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

Channel 0 is the image; channel 1, in a paired model, is the mask (see :mod:`.patches`). Images are
in [-1, 1] (mean 0.5, std 0.5 of the [0, 1] normalised image, as in the original work). Latents are
multiplied by ``scaling_factor`` = 1 / (their standard deviation on the training crops) before
diffusion, so the UNet sees unit variance.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL

from .. import __version__
from .data import Normalisation, check_finite, looks_rgb, to_unit
from .device import autocast_dtype, resolve_device
from .errors import UserInputError
from .patches import labels_from_mask
from .sampling import DEFAULT_SAMPLER, ProgressCallback, check_steps, denoise, generators
from .store import STAGE_FILE, WEIGHTS_FILE, load_unet, read_json, resolve_model

CARD_FILE = "model.json"

# Autoencoder sizes: ``tiny`` for tests (downsamples by 2); ``small`` trains on a CPU (by 8: a
# 256x256 patch becomes 4x32x32); ``base`` for a GPU (by 8, wider, two ResNet blocks per level).
VAE_SIZES: dict[str, dict] = {
    "tiny": {"block_out_channels": (8, 16), "layers_per_block": 1, "norm_num_groups": 4},
    "small": {"block_out_channels": (16, 32, 64, 64), "layers_per_block": 1, "norm_num_groups": 16},
    "base": {"block_out_channels": (64, 128, 256, 256), "layers_per_block": 2, "norm_num_groups": 32},
}


class KLAutoencoder(AutoencoderKL):
    """diffusers' ``AutoencoderKL`` whose forward also returns the KL term, so that one call (the
    one DistributedDataParallel hooks) gives everything the loss needs."""

    def forward(self, sample: torch.Tensor, sample_posterior: bool = True, return_dict: bool = True,
                generator: torch.Generator | None = None):
        post = self.encode(sample).latent_dist
        z = post.sample(generator) if sample_posterior else post.mode()
        return self.decode(z).sample, post.kl()


def build_autoencoder(channels: int, size: str = "small", latent_channels: int = 4) -> KLAutoencoder:
    if size not in VAE_SIZES:
        raise UserInputError(f"unknown autoencoder size '{size}': choose one of {', '.join(VAE_SIZES)}.")
    s = VAE_SIZES[size]
    n = len(s["block_out_channels"])
    return KLAutoencoder(
        in_channels=channels, out_channels=channels, latent_channels=latent_channels,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        mid_block_add_attention=False,  # fully convolutional: trains on crops, runs on any size
        sample_size=256, **s,
    )


def downsampling(vae: AutoencoderKL) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


def weights_sha256(folder: Path) -> str:
    h = hashlib.sha256()
    with open(Path(folder) / WEIGHTS_FILE, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_card(path: Path, kinds: tuple[str, ...]) -> dict:
    if not (path / CARD_FILE).is_file():
        if (path / "cascade.json").is_file():
            raise UserInputError(f"'{path}' is a depth cascade, not a patch model: use it with `zfdiffusion generate` "
                                 "or the Generate slices widget.")
        raise UserInputError(
            f"'{path}' is not a patch model folder (no {CARD_FILE}). Give a folder made by "
            "`zfdiffusion train vae` or `zfdiffusion train ldm`."
        )
    card = read_json(path / CARD_FILE)
    if card.get("kind") not in kinds:
        want = " or ".join(kinds)
        raise UserInputError(f"'{path}' holds a '{card.get('kind')}' model, but a {want} model is needed here.")
    return card


def load_vae(folder: Path) -> KLAutoencoder:
    """The autoencoder in ``folder`` (safetensors only), with clear errors when it is broken."""
    folder = Path(folder)
    for name in ("config.json", WEIGHTS_FILE):
        if not (folder / name).is_file():
            raise UserInputError(f"autoencoder folder '{folder}' is missing {name}: copy the whole model again.")
    try:
        vae = KLAutoencoder.from_pretrained(folder, use_safetensors=True, low_cpu_mem_usage=False)
    except Exception as e:  # noqa: BLE001 - any failure here means broken or mismatched weights
        raise UserInputError(
            f"the autoencoder in '{folder}' could not be loaded ({type(e).__name__}: {str(e)[:300]}). "
            "Its weights are corrupted or do not match its config.json."
        ) from None
    return vae.eval().requires_grad_(False)


def prepare_image(image: np.ndarray, norm: Normalisation) -> torch.Tensor:
    """A user's 2D image (any dtype; RGB is refused) as a (1, 1, H, W) tensor in [-1, 1]."""
    img = np.asarray(image)
    if looks_rgb(img):
        raise UserInputError(f"the image looks like RGB(A), shape {img.shape}: give one grayscale channel.")
    if img.ndim != 2:
        raise UserInputError(f"give a 2D image (Y, X); this one has shape {img.shape}.")
    check_finite(img, "the image")
    return torch.from_numpy(norm.apply(img) * 2.0 - 1.0)[None, None]


@dataclass
class PatchResult:
    """Generated patches: ``images`` (N, H, W) float32 in [0, 1]; for a paired model also ``masks``
    (foreground probability, N, H, W, float32 in [0, 1]) and ``labels`` (N, H, W, int32)."""

    images: np.ndarray
    masks: np.ndarray | None
    labels: np.ndarray | None
    provenance: dict


class Autoencoder:
    """A loaded autoencoder (from a ``vae`` or a ``latent`` model folder) with its card."""

    def __init__(self, path: Path, card: dict, vae: KLAutoencoder, device: torch.device):
        self.path, self.card, self.vae, self.device = path, card, vae.to(device), device
        self.dtype = autocast_dtype(device)

    @classmethod
    def load(cls, model: str | Path, device: str | torch.device = "auto") -> Autoencoder:
        path = resolve_model(model)
        card = read_card(path, ("vae", "latent"))
        vae = load_vae(path / "vae")
        if vae.config.in_channels != len(card.get("channels", ["image"])):
            raise UserInputError(
                f"the autoencoder in '{path}' takes {vae.config.in_channels} channel(s) but its card lists "
                f"{card.get('channels')}: the folder is mismatched. Copy the whole model folder again.")
        return cls(path, card, vae, resolve_device(device))

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def paired(self) -> bool:
        return len(self.card.get("channels", ["image"])) > 1

    @property
    def scaling_factor(self) -> float:
        return float(self.card["scaling_factor"])

    @property
    def normalisation(self) -> Normalisation:
        return Normalisation.from_dict(self.card.get("normalisation"))

    @property
    def factor(self) -> int:
        return downsampling(self.vae)

    @torch.no_grad()
    def encode(self, x: torch.Tensor, *, sample: bool = False, gen: torch.Generator | None = None) -> torch.Tensor:
        """(B, C, H, W) in [-1, 1] -> scaled latents (B, 4, H/f, W/f)."""
        post = self.vae.encode(x.to(self.device)).latent_dist
        z = post.sample(gen) if sample else post.mode()
        return z * self.scaling_factor

    @torch.no_grad()
    def decode(self, z: torch.Tensor, batch: int = 8, callback: ProgressCallback | None = None,
               stage_index: int = 0, n_stages: int = 1) -> torch.Tensor:
        """Scaled latents -> (B, C, H, W) in [-1, 1], ``batch`` at a time, float32 on the CPU."""
        import contextlib

        from .sampling import Progress

        out = []
        amp = torch.autocast(self.device.type, dtype=self.dtype) if self.dtype else contextlib.nullcontext()
        for i in range(0, len(z), batch):
            with amp:
                out.append(self.vae.decode(z[i:i + batch].to(self.device) / self.scaling_factor).sample.float().cpu())
            if callback is not None:
                callback(Progress("decode", min(i + batch, len(z)), len(z), stage_index, n_stages))
        return torch.cat(out).clamp(-1, 1)

    def roundtrip(self, image: np.ndarray, *, normalise: bool = True) -> tuple[np.ndarray, dict]:
        """Encode and decode a 2D image (any size; padded to a multiple of the downsampling) to see what the
        autoencoder keeps. Returns the reconstruction in [0, 1] and figures: MSE, PSNR, SSIM, latent shape."""
        if normalise:
            x = prepare_image(image, self.normalisation)
        else:
            img = np.asarray(image, dtype=np.float32)
            if img.ndim != 2:
                raise UserInputError(f"give a 2D image (Y, X); this one has shape {img.shape}.")
            x = torch.from_numpy(np.clip(img, 0, 1) * 2.0 - 1.0)[None, None]
        h, w = x.shape[-2:]
        if h * w > 4096 * 4096:
            raise UserInputError(f"the image is {h}x{w}: encode a region of at most 4096x4096 pixels.")
        f = self.factor
        ph, pw = (-h) % f, (-w) % f
        xp = F.pad(x, (0, pw, 0, ph), mode="reflect") if (ph or pw) else x
        if self.paired:  # no mask for a user's image: encode an empty mask channel
            xp = torch.cat([xp, -torch.ones_like(xp)], dim=1)
        z = self.encode(xp)
        rec = self.decode(z)[:, :1, :h, :w]
        a, b = to_unit(x[0, 0]), to_unit(rec[0, 0])
        from .metrics import psnr, ssim

        figures = {"mse": float(np.mean((a - b) ** 2)), "psnr": psnr(a, b), "ssim": ssim(a, b),
                   "latent_shape": list(z.shape[1:])}
        return b, figures


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
        unet = load_unet(path / "unet")
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

        def cb_for(k: int):
            if callback is None:
                return None
            from .sampling import Progress

            # one progress stream over all batches: "sample" then "decode"
            def cb(p):
                callback(Progress("sample", k * p.total + p.step, n_batches * p.total, 0, 2))
            return cb

        for k, i in enumerate(range(0, n, batch)):
            g = gens[i:i + batch]
            zs.append(denoise(self.unet, (len(g), *shape), conditions=[{}], guidance=[], sampler=sampler,
                              steps=steps, schedule=self.stage["schedule"], gens=g, device=self.device,
                              dtype=self.dtype, callback=cb_for(k), stage="sample", clip=False).cpu())
        x = self.decode(torch.cat(zs), batch=batch, callback=callback, stage_index=1, n_stages=2)
        images = to_unit(x[:, 0])
        masks = labels = None
        if self.paired:
            masks = to_unit(x[:, 1])
            labels = labels_from_mask(masks, encoding=self.card.get("mask_encoding") or "binary",
                                      threshold=threshold, min_size=min_size)
        prov = {
            "kind": "zfdiffusion.latent",
            "model": self.name,
            "model_path": str(self.path),
            "plugin_version": __version__,
            "device": str(self.device),
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "seed": seed, "seeds": [seed + i for i in range(n)], "sampler": sampler, "steps": steps,
            "patch_size": self.patch_size, "paired": self.paired,
        }
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


__all__ = ["Autoencoder", "KLAutoencoder", "LatentModel", "PatchResult", "build_autoencoder", "load_vae"]
