"""The KL autoencoder of the patch models (MSE + beta * KL, diffusers' ``AutoencoderKL``), built for
training and loaded with its card for encoding and decoding (:class:`Autoencoder`).

Latents are multiplied by the card's ``scaling_factor`` = 1 / (their standard deviation on the
training crops), so the diffusion model in :mod:`.model` sees unit variance. A paired model has two
channels, the image and its mask (see :mod:`...masks`).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL

from ..device import autocast_dtype, maybe_compile, resolve_device
from ..errors import UserInputError
from ..images import Normalisation, to_model, to_unit
from ..metrics import psnr, ssim
from ..progress import Progress, ProgressCallback
from ..store import load_model, read_card, resolve_model

# Autoencoder sizes: ``tiny`` for tests (downsamples by 2); ``small`` trains on a CPU (by 8: a
# 256x256 patch becomes 4x32x32); ``base`` for a GPU (by 8, wider, two ResNet blocks per level).
# ``small-f4`` (CPU; by 4: a 256x256 patch becomes C x 64 x 64) keeps the finer texture of EM images.
VAE_SIZES: dict[str, dict] = {
    "tiny": {"block_out_channels": (8, 16), "layers_per_block": 1, "norm_num_groups": 4},
    "small": {"block_out_channels": (16, 32, 64, 64), "layers_per_block": 1, "norm_num_groups": 16},
    "small-f4": {"block_out_channels": (32, 64, 64), "layers_per_block": 1, "norm_num_groups": 16},
    "base": {"block_out_channels": (64, 128, 256, 256), "layers_per_block": 2, "norm_num_groups": 32},
}
PADDINGS = ("zeros", "replicate", "reflect")


def set_conv_padding(model: torch.nn.Module, mode: str) -> None:
    """Pad every padded convolution of ``model`` with ``mode`` instead of zeros. With zeros a network
    learns where the border is, and one trained on crops smaller than the patches it makes shades
    a frame along their edges; replicate padding gives the border nothing to learn."""
    if mode not in PADDINGS:
        raise UserInputError(f"unknown convolution padding '{mode}': choose one of {', '.join(PADDINGS)}.")
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d) and any(p > 0 for p in m.padding):
            m.padding_mode = mode


class KLAutoencoder(AutoencoderKL):
    """diffusers' ``AutoencoderKL`` whose forward also returns the KL term, so that one call (the
    one DistributedDataParallel hooks) gives everything the loss needs."""

    def forward(self, sample: torch.Tensor, sample_posterior: bool = True, return_dict: bool = True,
                generator: torch.Generator | None = None):
        post = self.encode(sample).latent_dist
        z = post.sample(generator) if sample_posterior else post.mode()
        return self.decode(z).sample, post.kl()

    @classmethod
    def from_config(cls, config=None, return_unused_kwargs=False, **kwargs):
        """diffusers' ``from_config`` (also behind ``from_pretrained``), plus the ``conv_padding`` that
        this class adds to config.json (zeros for folders written before it existed)."""
        config = dict(config or {})
        mode = config.pop("conv_padding", "zeros")
        out = super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)
        model = out[0] if isinstance(out, tuple) else out
        set_conv_padding(model, mode)
        model.register_to_config(conv_padding=mode)
        return out


def build_autoencoder(channels: int, size: str = "small", latent_channels: int = 4,
                      conv_padding: str = "zeros") -> KLAutoencoder:
    if size not in VAE_SIZES:
        raise UserInputError(f"unknown autoencoder size '{size}': choose one of {', '.join(VAE_SIZES)}.")
    s = VAE_SIZES[size]
    n = len(s["block_out_channels"])
    vae = KLAutoencoder(
        in_channels=channels, out_channels=channels, latent_channels=latent_channels,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        mid_block_add_attention=False,  # fully convolutional: trains on crops, runs on any size
        sample_size=256, **s,
    )
    set_conv_padding(vae, conv_padding)
    vae.register_to_config(conv_padding=conv_padding)
    return vae


def downsampling(vae: AutoencoderKL) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


def load_vae(folder: Path) -> KLAutoencoder:
    """The autoencoder in ``folder`` (safetensors only), with clear errors when it is broken."""
    return load_model(folder, KLAutoencoder, "autoencoder folder").requires_grad_(False)


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
        dev = resolve_device(device)
        maybe_compile(vae.decoder, dev)  # ZFDIFFUSION_COMPILE=1 on CUDA: the decoder, in place
        return cls(path, card, vae, dev)

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

    @property
    def decode_margin(self) -> int:
        """Latent pixels of context added around a latent before decoding (the card's ``decode_margin``;
        0 for older models): see :meth:`decode`."""
        return int(self.card.get("decode_margin", 0))

    @torch.no_grad()
    def decode(self, z: torch.Tensor, batch: int = 8, callback: ProgressCallback | None = None,
               stage_index: int = 0, n_stages: int = 1, margin: int | None = None) -> torch.Tensor:
        """Scaled latents -> (B, C, H, W) in [-1, 1], ``batch`` at a time, float32 on the CPU.

        ``margin`` (default: :attr:`decode_margin`): the latent is first extended by that many latent
        pixels on every side (edge values repeated), and the decoded margin cut off again. A decoder
        that shades a frame along the edges of what it decodes (one trained on crops smaller than the
        patches) then shades the part that is cut off."""
        m = self.decode_margin if margin is None else int(margin)
        f = self.factor
        out = []
        amp = torch.autocast(self.device.type, dtype=self.dtype) if self.dtype else contextlib.nullcontext()
        for i in range(0, len(z), batch):
            zb = z[i:i + batch].to(self.device) / self.scaling_factor
            if m > 0:
                zb = F.pad(zb, (m, m, m, m), mode="replicate")
            with amp:
                x = self.vae.decode(zb).sample.float().cpu()
            if m > 0:
                x = x[..., m * f:x.shape[-2] - m * f, m * f:x.shape[-1] - m * f]
            out.append(x)
            if callback is not None:
                callback(Progress("decode", min(i + batch, len(z)), len(z), stage_index, n_stages))
        return torch.cat(out).clamp(-1, 1)

    def roundtrip(self, image: np.ndarray, *, normalise: bool = True) -> tuple[np.ndarray, dict]:
        """Encode and decode a 2D image (any size; padded to a multiple of the downsampling) to see what the
        autoencoder keeps. Returns the reconstruction in [0, 1] and figures: MSE, PSNR, SSIM, latent shape."""
        x = to_model(image, self.normalisation, normalise=normalise)
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
        figures = {"mse": float(np.mean((a - b) ** 2)), "psnr": psnr(a, b), "ssim": ssim(a, b),
                   "latent_shape": list(z.shape[1:])}
        return b, figures


__all__ = ["PADDINGS", "VAE_SIZES", "Autoencoder", "KLAutoencoder", "build_autoencoder", "downsampling", "load_vae",
           "set_conv_padding"]
