"""``zfdiffusion em generate | train vae | train ldm``: patches (and masks) by latent diffusion."""

from __future__ import annotations

import argparse
from pathlib import Path

from ._common import (TqdmProgress, add_device, add_patch_training, add_sampler, batch_choice,
                      training_options)


def print_summary(summary: dict, what: str) -> None:
    if summary["rank"] == 0:
        extra = ""
        v = summary.get("validation") or {}
        if v:
            extra = f", held-out PSNR {v['psnr']:.2f} dB, SSIM {v['ssim']:.3f}"
        print(f"trained {what}: {summary['steps']} steps, loss {summary['loss']:.4f}, {summary['seconds']} s{extra} "
              f"-> {summary['model']}")


def cmd_train_vae(a) -> int:
    from ..core.latent.train import VaeConfig, train_vae

    cfg = VaeConfig(size=a.size, beta=a.beta, latent_channels=a.latent_channels, patch_size=a.patch_size,
                    crop=a.crop, spectrum_weight=a.spectrum_weight, disc_weight=a.disc_weight,
                    disc_start=a.disc_start, conv_padding=a.padding, **training_options(a))
    print_summary(train_vae(a.images, a.out, cfg, masks=a.masks, device=a.device, resume=a.resume,
                            show_progress=not a.quiet), "autoencoder")
    return 0


def cmd_train_ldm(a) -> int:
    from ..core.latent.train import LdmConfig, train_ldm

    cfg = LdmConfig(size=a.size, loss=a.loss, bank=a.bank, **training_options(a))
    print_summary(train_ldm(a.vae, a.images, a.out, cfg, masks=a.masks, device=a.device, resume=a.resume,
                            show_progress=not a.quiet), "latent diffusion")
    return 0


def cmd_em_generate(a) -> int:
    from ..core.errors import UserInputError
    from ..core.io import check_writable, write_png_preview, write_tiff
    from ..core.latent import LatentModel

    out = check_writable(a.out)
    for extra in (a.masks_out, a.prob_out, a.preview):
        if extra:
            check_writable(extra)
    model = LatentModel.load(a.model, a.device)
    if (a.masks_out or a.prob_out) and not model.paired:
        raise UserInputError(f"'{model.name}' generates images only: --masks-out/--prob-out need a paired "
                             "model (trained with --masks).")
    res = model.generate(a.n, seed=a.seed, sampler=a.sampler, steps=a.steps, batch=_em_batch(a, model),
                         threshold=a.threshold, min_size=a.min_size, callback=TqdmProgress(a.quiet))
    write_tiff(out, res.images, res.provenance)
    print(f"wrote {out} {res.images.shape} float32 in [0, 1]")
    if a.masks_out:
        write_tiff(a.masks_out, res.labels, {**res.provenance, "content": "instance labels", "image": str(out)})
        print(f"wrote {a.masks_out} {res.labels.shape} int32 instance labels "
              f"({int(sum(len(set(x.ravel().tolist())) - 1 for x in res.labels))} objects)")
    if a.prob_out:
        write_tiff(a.prob_out, res.masks, {**res.provenance, "content": "foreground probability", "image": str(out)})
        print(f"wrote {a.prob_out} {res.masks.shape} float32 foreground probability")
    if a.preview:
        print(f"wrote preview {write_png_preview(a.preview, res.images[:8])}")
    return 0


def _em_batch(a, model) -> int:
    """``--batch`` as a number of patches. 'auto': 8 on a CPU or MPS (as always), and on a CUDA GPU as many
    patches as fit in half its free memory (less 1 GiB), at most 64 and at most --n. A patch is costed by
    :func:`..core.device.pyramid_bytes` (8 float32 copies of the feature maps at every level) for the larger
    of the two passes it goes through: the latent UNet at the latent side, and the autoencoder's decoder at
    the patch side, whose level at side/2**l carries the widths of level l + 1 (each up block upsamples
    before it narrows). About 111 MB a 256 px patch for the demo model (decoder widths 16-64), twice what
    bf16/fp16 autocast needs."""
    if a.batch != "auto":
        return a.batch
    from ..core.device import auto_batch, pyramid_bytes

    unet = pyramid_bytes(model.unet.config.block_out_channels, model.card["latent_shape"][-1])
    widths = list(model.vae.config.block_out_channels)
    decoder = pyramid_bytes(widths[1:] + widths[-1:], model.patch_size)
    return auto_batch(model.device, max(unet, decoder), default=8, cap=max(1, min(64, a.n)))


def add_commands(sub, train: argparse._SubParsersAction) -> None:
    """``em generate``, ``train vae`` and ``train ldm``."""
    v = train.add_parser("vae", help="train a KL autoencoder (MSE + log-spectrum + beta*KL, then a patch "
                                     "discriminator) on random crops of 2D images")
    add_patch_training(v, 20000, 8)
    v.add_argument("--size", default="small", choices=("tiny", "small", "small-f4", "base"),
                   help="tiny (tests; downsamples by 2), small (CPU; by 8), small-f4 (CPU; by 4, keeps finer "
                        "texture, a 4x larger latent), base (GPU; by 8, wider)")
    v.add_argument("--beta", type=float, default=1e-4, help="weight of the KL term (per latent element)")
    v.add_argument("--latent-channels", type=int, default=4,
                   help="channels of the latent (8 with downsampling by 8 keeps more detail)")
    v.add_argument("--spectrum-weight", type=float, default=0.1,
                   help="weight of the log Fourier amplitude L1 term (0: off)")
    v.add_argument("--disc-weight", type=float, default=0.5,
                   help="weight of the patch discriminator (adaptive, as in latent diffusion; 0: off)")
    v.add_argument("--disc-start", type=int, default=None,
                   help="step from which the discriminator trains and counts (default: a quarter of --steps)")
    v.add_argument("--padding", default="replicate", choices=("zeros", "replicate", "reflect"),
                   help="convolution padding: replicate (default) leaves no dark or bright frame at the edges")
    v.add_argument("--patch-size", type=int, default=256, help="side of the patches the models generate")
    v.add_argument("--crop", type=int, default=None, help="train on smaller crops (default: the patch size)")
    v.set_defaults(func=cmd_train_vae)

    ld = train.add_parser("ldm", help="train a latent diffusion UNet in an autoencoder's latent space")
    add_patch_training(ld, 20000, 16)
    ld.add_argument("--vae", required=True, help="autoencoder folder made by `train vae`")
    ld.add_argument("--size", default="small", choices=("tiny", "compact", "small", "base"),
                    help="the latent UNet: tiny (tests), compact (CPU, a third of small's weights), small (CPU), "
                         "base (GPU)")
    ld.add_argument("--loss", default="v", choices=("v", "l2"), help="v-prediction (default) or MSE on the noise")
    ld.add_argument("--bank", type=int, default=4096, help="number of encoded random crops to train on")
    ld.set_defaults(func=cmd_train_ldm)

    em = sub.add_parser("em", help="EM patches (and masks) by latent diffusion")
    esub = em.add_subparsers(dest="what", required=True)
    eg = esub.add_parser("generate", help="generate (N, 256, 256) patches into a TIFF")
    eg.add_argument("--model", default="em-ldm-demo", help="bundled model name or model folder")
    eg.add_argument("--n", type=int, default=4, help="number of patches")
    add_sampler(eg, 50)
    eg.add_argument("--seed", type=int, default=0, help="patch i uses seed + i")
    eg.add_argument("--batch", type=batch_choice, default="auto",
                    help="patches per forward pass: a number, or auto = 8 on a CPU, on a GPU as many as fit in "
                         "half its free memory (at most 64)")
    add_device(eg)
    eg.add_argument("--out", type=Path, required=True, help="output TIFF of images")
    eg.add_argument("--masks-out", type=Path, default=None, help="paired model: instance labels TIFF")
    eg.add_argument("--prob-out", type=Path, default=None, help="paired model: foreground probability TIFF")
    eg.add_argument("--threshold", type=float, default=0.5, help="paired model: mask threshold")
    eg.add_argument("--min-size", type=int, default=16, help="paired model: smallest object in pixels")
    eg.add_argument("--preview", type=Path, default=None, help="also write a PNG preview (first 8)")
    eg.set_defaults(func=cmd_em_generate)
