"""The autoencoder's extra losses, for a recipe that keeps microscopy texture without downloaded weights.

An autoencoder trained on MSE alone averages away what it cannot place exactly: fine membranes,
granules and noise, everything above about 0.1 cycles/pixel of an EM image. Latent diffusion's KL-f8
recipe adds a perceptual loss (a network trained on photographs, downloaded) and a patch
discriminator. Here the perceptual loss is replaced by a **log-spectrum term** (the L1 distance between
the log Fourier amplitudes of the reconstruction and of the crop: it says "put back that much power at
this frequency" without asking for the exact phase), and the **patch discriminator** is a small
convolutional network trained from scratch alongside the autoencoder, with the hinge loss and the
adaptive weight of the latent diffusion recipe (the adversarial gradient scaled to the reconstruction
gradient at the decoder's last layer), switched on after ``disc_start`` steps.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PatchDiscriminator(nn.Module):
    """A PatchGAN-style discriminator: strided 4x4 convolutions to one logit per overlapping patch
    (receptive field 70 px with the default three layers), group norm and leaky ReLU."""

    def __init__(self, channels: int, width: int = 16, layers: int = 3):
        super().__init__()
        mods: list[nn.Module] = [nn.Conv2d(channels, width, 4, 2, 1), nn.LeakyReLU(0.2)]
        c = width
        for i in range(1, layers + 1):
            nc = width * min(2 ** i, 8)
            stride = 2 if i < layers else 1
            mods += [nn.Conv2d(c, nc, 4, stride, 1, bias=False), nn.GroupNorm(8, nc), nn.LeakyReLU(0.2)]
            c = nc
        mods.append(nn.Conv2d(c, 1, 4, 1, 1))
        self.net = nn.Sequential(*mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def log_spectrum_loss(rec: torch.Tensor, x: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """Mean |log(|F(rec)| + eps) - log(|F(x)| + eps)| over every frequency of every image channel
    (orthonormal 2D FFT, the mean of each crop removed)."""
    def amp(t: torch.Tensor) -> torch.Tensor:
        t = t.float()
        return torch.fft.rfft2(t - t.mean(dim=(-2, -1), keepdim=True), norm="ortho").abs()

    return (torch.log(amp(rec) + eps) - torch.log(amp(x) + eps)).abs().mean()


def hinge_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean())


def adaptive_weight(rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor,
                    cap: float = 1e4) -> torch.Tensor:
    """||d rec_loss / d W|| / ||d g_loss / d W|| at the decoder's last layer ``W`` (detached): the
    adversarial term then pulls about as hard as the reconstruction terms, whatever their scales."""
    r = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return (r.norm() / (g.norm() + 1e-4)).clamp(0.0, cap).detach()


__all__ = ["PatchDiscriminator", "adaptive_weight", "hinge_d_loss", "log_spectrum_loss"]
