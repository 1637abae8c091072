"""Training the patch models: the KL autoencoder (``train vae``) and the latent UNet (``train ldm``).

Both run in the one training loop (:mod:`..training.loop`: EMA, atomic checkpoints, exact resume,
DistributedDataParallel under ``torchrun``). The data are random crops of 2D images, with flips and
rotations (:class:`..training.patches.PatchData`: read from disk crop by crop, each torchrun rank from
its own share of the images); with ``masks`` the mask is a second channel, so the
autoencoder and the diffusion model learn image and mask together and every generated patch comes
with an aligned mask.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..diffusion.objective import noised_batch, schedule_for, training_scheduler
from ..diffusion.unet import SIZES, ZfUNet, build_model
from ..errors import UserInputError
from ..images import Normalisation, to_unit
from ..io import write_json
from ..metrics import dice, edge_profile, psnr, spectrum_ratio, ssim
from ..progress import ProgressCallback
from ..provenance import made_by
from ..store import CARD_FILE, WEIGHTS_FILE, read_card, resolve_model, save_model, weights_sha256
from ..training import loop
from ..training.patches import PatchData
from .autoencoder import PADDINGS, VAE_SIZES, KLAutoencoder, build_autoencoder, downsampling, load_vae
from .losses import PatchDiscriminator, adaptive_weight, hinge_d_loss, log_spectrum_loss


@dataclass
class VaeConfig(loop.TrainOptions):
    batch_size: int = 8
    size: str = "small"
    beta: float = 1e-4
    latent_channels: int = 4
    patch_size: int = 256
    crop: int | None = None
    norm_low: float = 1.0
    norm_high: float = 99.8
    # The recipe beyond MSE + beta * KL (see .losses): a log-spectrum term, a patch discriminator from
    # disc_start (default: a quarter of the steps) on, replicate padding. 0 switches a term off.
    spectrum_weight: float = 0.1
    disc_weight: float = 0.5
    disc_start: int | None = None
    conv_padding: str = "replicate"

    @property
    def disc_from(self) -> int:
        return self.steps // 4 if self.disc_start is None else self.disc_start

    def validate(self) -> None:
        if self.size not in VAE_SIZES:
            raise UserInputError(f"unknown autoencoder size '{self.size}': choose one of {', '.join(VAE_SIZES)}.")
        _common_checks(self)
        if self.beta < 0:
            raise UserInputError(f"--beta must be 0 or more, got {self.beta}.")
        if self.spectrum_weight < 0 or self.disc_weight < 0:
            raise UserInputError("--spectrum-weight and --disc-weight must be 0 or more.")
        if self.disc_start is not None and self.disc_start < 0:
            raise UserInputError(f"--disc-start must be 0 or more, got {self.disc_start}.")
        if self.conv_padding not in PADDINGS:
            raise UserInputError(f"unknown --padding '{self.conv_padding}': choose one of {', '.join(PADDINGS)}.")
        if self.latent_channels < 1:
            raise UserInputError(f"--latent-channels must be at least 1, got {self.latent_channels}.")


@dataclass
class LdmConfig(loop.TrainOptions):
    size: str = "small"
    loss: str = "v"
    bank: int = 4096

    @property
    def crop(self) -> None:
        return None

    def validate(self) -> None:
        if self.size not in SIZES:
            raise UserInputError(f"unknown model size '{self.size}': choose one of {', '.join(SIZES)}.")
        if self.loss not in ("v", "l2"):
            raise UserInputError(f"unknown loss '{self.loss}': choose v or l2.")
        if self.bank < 1:
            raise UserInputError("--bank must be at least 1.")
        _common_checks(self)


def _common_checks(cfg) -> None:
    cfg.check_common()
    crop = getattr(cfg, "crop", None)
    patch = getattr(cfg, "patch_size", None)
    if patch is not None and patch < 16:
        raise UserInputError(f"--patch-size must be at least 16, got {patch}.")
    if crop is not None and (crop < 16 or (patch and crop > patch)):
        raise UserInputError(f"--crop must be between 16 and the patch size, got {crop}.")


def _data_card(data: PatchData, cfg, stats: dict | None = None) -> dict:
    return {**data.describe(), "credit": cfg.data_credit, "licence": cfg.data_licence,
            "normalisation_stats": stats}


# ----------------------------------------------------------------------------- autoencoder
@torch.no_grad()
def measure_scaling(vae, data: PatchData, patch: int, n: int = 64, seed: int = 0) -> float:
    """1 / std of the (sampled) latents of ``n`` training crops (this process's share of the images
    under torchrun): the latent scale factor."""
    g = torch.Generator().manual_seed(seed)
    x = data.random_crops(n, min(patch, min(min(s[1:]) for s in data.train.shapes)), g, augment=False)
    dev = next(vae.parameters()).device
    zs = [vae.encode(x[i:i + 8].to(dev)).latent_dist.sample(g) for i in range(0, len(x), 8)]
    return float(1.0 / torch.cat(zs).float().std())


EDGE_TOLERANCE = 0.005  # |edge band minus centre| of reconstructions vs the real crops': no visible frame
MARGINS = (0, 1, 2, 3, 4)  # latent pixels of decoding context tried (see Autoencoder.decode)


def _decode(vae, z: torch.Tensor, margin: int) -> torch.Tensor:
    f = downsampling(vae)
    if margin:
        z = F.pad(z, (margin,) * 4, mode="replicate")
    x = vae.decode(z).sample.float().cpu()
    return x[..., margin * f:x.shape[-2] - margin * f, margin * f:x.shape[-1] - margin * f] if margin else x


def choose_margin(shifts: dict[int, float], tolerance: float = EDGE_TOLERANCE) -> int:
    """The smallest decoding margin whose edge-band shift is within ``tolerance``, else the one closest to 0."""
    ok = [m for m in sorted(shifts) if abs(shifts[m]) <= tolerance]
    return ok[0] if ok else min(shifts, key=lambda m: abs(shifts[m]))


@torch.no_grad()
def validate_vae(vae, data: PatchData, patch: int) -> dict:
    """Reconstruction MSE, PSNR and SSIM of the image channel on the held-out crops (and mask Dice), the
    power spectrum ratio, and the decoding margin: the edge band's shift (reconstruction minus real) for
    each margin of :data:`MARGINS`, and the smallest that brings it within :data:`EDGE_TOLERANCE`
    (``decode_margin``, which the card stores and decoding uses). The other figures are for that margin."""
    x = data.val_crops(patch)
    if x is None:
        return {}
    dev = next(vae.parameters()).device
    z = torch.cat([vae.encode(x[i:i + 8].to(dev)).latent_dist.mode() for i in range(0, len(x), 8)])
    a = to_unit(x[:, 0])
    real_edge = edge_profile(a)["edge_minus_centre"]
    recs, shifts = {}, {}
    for m in MARGINS:
        recs[m] = torch.cat([_decode(vae, z[i:i + 8], m) for i in range(0, len(z), 8)])
        shifts[m] = edge_profile(to_unit(recs[m][:, 0]))["edge_minus_centre"] - real_edge
    margin = choose_margin(shifts)
    rec = recs[margin]
    b = to_unit(rec[:, 0])
    out = {"crops": len(x), "mse": float(np.mean((a - b) ** 2)),
           "psnr": float(np.mean([psnr(p, q) for p, q in zip(a, b)])), "ssim": ssim(a, b)}
    out.update(spectrum_ratio(a, b))
    out["edge_minus_centre_shift"] = shifts[margin]
    out["edge_shift_by_margin"] = {str(m): v for m, v in shifts.items()}
    out["decode_margin"] = margin
    if x.shape[1] > 1:
        out["mask_dice"] = dice(to_unit(rec[:, 1]) >= 0.5, to_unit(x[:, 1]) >= 0.5)
    return out


def train_vae(images, out: str | Path, cfg: VaeConfig, *, masks=None, device: str = "auto", resume: bool = False,
              show_progress: bool = True, callback: ProgressCallback | None = None) -> dict:
    """Train (or resume) a KL autoencoder on crops of ``images`` (and ``masks``) into the folder ``out``."""
    cfg.validate()
    return loop.launch(_train_vae, device, images, Path(out), cfg, masks, resume, show_progress, callback)


def _train_vae(dev, di, images, out: Path, cfg: VaeConfig, masks, resume, show_progress, callback) -> dict:
    data = PatchData.from_paths(images, masks, patch=cfg.patch_size, channel=cfg.channel, axes=cfg.axes,
                                norm=Normalisation(cfg.norm_low, cfg.norm_high, per="image"), rank=di.rank,
                                world=di.world)
    if di.main:
        for note in data.notices:
            print(f"note: {note}")
    stats = loop.gather_dict(data.normalisation_stats(), di)
    state_path = loop.prepare_state_dir(out / "training" / "vae", out, resume, di)
    if di.world > 1:
        dist.barrier()
    saved = loop.load_state(state_path, resume, di)
    if saved is not None:
        vae = KLAutoencoder.from_config(loop.model_config(saved))
        if vae.config.in_channels != data.n_channels:
            raise UserInputError(
                f"the saved training state is for {vae.config.in_channels} channel(s), but this data has "
                f"{data.n_channels} ({', '.join(data.channels)}): resume with the same --masks, or use another --out.")
    else:
        torch.manual_seed(cfg.seed)
        vae = build_autoencoder(data.n_channels, cfg.size, cfg.latent_channels, cfg.conv_padding)
    crop = cfg.crop or cfg.patch_size
    f = downsampling(vae)
    if crop % f:
        raise UserInputError(f"--crop must be a multiple of {f} (the autoencoder's downsampling), got {crop}.")
    latent_numel = vae.config.latent_channels * (crop // f) ** 2
    disc = disc_opt = None
    if cfg.disc_weight > 0:
        torch.manual_seed(cfg.seed + 1)
        disc = PatchDiscriminator(data.n_channels).to(dev).train()
        disc_opt = torch.optim.AdamW(disc.parameters(), lr=cfg.lr, betas=(0.5, 0.9), weight_decay=0.0)
    disc_net = disc
    if disc is not None and di.world > 1:
        disc_net = torch.nn.parallel.DistributedDataParallel(disc, device_ids=[dev.index] if dev.type == "cuda" else None)
    last_layer = vae.decoder.conv_out.weight
    pending: dict = {}  # this step's crops and reconstructions, for the discriminator's update
    # The step the discriminator starts from is fixed by the first run (its default follows --steps, which
    # a resumed run usually raises) and kept in the training state.
    disc_from = [cfg.disc_from]

    def loss_fn(net, step, g):
        x = data.random_crops(cfg.batch_size, crop, g).to(dev)
        rec, kl = net(x, generator=g)
        rec = rec.float()
        rec_loss = F.mse_loss(rec, x)
        if cfg.spectrum_weight > 0:
            rec_loss = rec_loss + cfg.spectrum_weight * log_spectrum_loss(rec, x)
        loss = rec_loss + cfg.beta * kl.float().mean() / latent_numel
        if disc is not None and step > disc_from[0]:
            disc.requires_grad_(False)
            g_loss = -disc_net(rec).mean()
            disc.requires_grad_(True)
            loss = loss + cfg.disc_weight * adaptive_weight(rec_loss, g_loss, last_layer) * g_loss
            pending.update(x=x, rec=rec.detach())
        return loss

    def disc_step(step, g):
        if not pending:
            return
        x, rec = pending.pop("x"), pending.pop("rec")
        d_loss = hinge_d_loss(disc_net(x), disc_net(rec))
        disc_opt.zero_grad(set_to_none=True)
        d_loss.backward()
        disc_opt.step()

    def get_disc() -> dict:
        return {"disc": disc.state_dict(), "disc_optimizer": disc_opt.state_dict(),
                "disc_from": torch.tensor(disc_from[0])}

    def set_disc(state: dict) -> None:
        disc.load_state_dict(state["disc"])
        disc_opt.load_state_dict(state["disc_optimizer"])
        if "disc_from" in state:
            disc_from[0] = int(state["disc_from"])

    last_val: dict = {}

    def validate(ema, step):
        last_val.clear()
        last_val.update(validate_vae(ema, data, cfg.patch_size))
        return dict(last_val)

    def export(ema, step, losses, secs, world):
        scale = measure_scaling(ema, data, cfg.patch_size, seed=cfg.seed)
        save_model(ema, out / "vae", {"kind": "vae", **loop.training_info(cfg, step, losses, secs, world)})
        write_json(out / CARD_FILE, {
            "kind": "vae", "format_version": 1, "name": out.name,
            "description": f"KL autoencoder for {'image + mask' if data.n_channels > 1 else 'image'} patches",
            "channels": data.channels, "mask_encoding": data.mask_encoding,
            "normalisation": data.normalisation.to_dict(),
            "intensity": "images in [0, 1] after percentile normalisation; the models see (x - 0.5) / 0.5",
            "scaling_factor": scale, "downsampling": f, "latent_channels": cfg.latent_channels,
            "decode_margin": int(last_val.get("decode_margin", 0)),
            "patch_size": cfg.patch_size, "beta": cfg.beta, "loss": _loss_words(cfg, disc_from[0]),
            "loss_weights": {"mse": 1.0, "kl_beta": cfg.beta, "log_spectrum": cfg.spectrum_weight,
                             "adversarial": cfg.disc_weight, "adversarial_from_step": disc_from[0] if cfg.disc_weight else None},
            "conv_padding": vae.config.get("conv_padding", "zeros"), "crop": crop,
            "steps": step, "validation": dict(last_val) or None,
            "training_data": _data_card(data, cfg, stats), **made_by(),
        })

    summary = loop.run(vae, loss_fn=loss_fn, export=export, cfg=cfg.loop_config("train vae"), dev=dev, di=di,
                       state_path=state_path, saved=saved, show_progress=show_progress, callback=callback,
                       validate=validate, after_step=disc_step if disc is not None else None,
                       extra_state=(get_disc, set_disc) if disc is not None else None)
    return {"what": "vae", **summary, "model": str(out), "validation": dict(last_val)}


def _loss_words(cfg: VaeConfig, disc_from: int) -> str:
    words = "MSE"
    if cfg.spectrum_weight > 0:
        words += f" + {cfg.spectrum_weight:g} * log-spectrum L1"
    words += " + beta * KL (KL per latent element)"
    if cfg.disc_weight > 0:
        words += (f" + {cfg.disc_weight:g} * adaptive weight * patch-discriminator hinge loss "
                  f"(from step {disc_from})")
    return words


# ----------------------------------------------------------------------------- latent diffusion
@torch.no_grad()
def encode_bank(vae, scale: float, data: PatchData, n: int, patch: int, g: torch.Generator, dev,
                show_progress: bool = False) -> torch.Tensor:
    """``n`` scaled latents of random augmented training crops (the LDM trains on these)."""
    out = []
    bar = None
    if show_progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n, desc="encode crops", unit="crop", dynamic_ncols=True)
    for i in range(0, n, 16):
        x = data.random_crops(min(16, n - i), patch, g).to(dev)
        out.append((vae.encode(x).latent_dist.sample(g) * scale).float().cpu())
        if bar is not None:
            bar.update(len(x))
    if bar is not None:
        bar.close()
    return torch.cat(out)


def train_ldm(vae_dir, images, out: str | Path, cfg: LdmConfig, *, masks=None, device: str = "auto",
              resume: bool = False, show_progress: bool = True, callback: ProgressCallback | None = None) -> dict:
    """Train (or resume) a latent diffusion UNet in the space of the autoencoder ``vae_dir``."""
    cfg.validate()
    return loop.launch(_train_ldm, device, Path(vae_dir), images, Path(out), cfg, masks, resume, show_progress, callback)


def _train_ldm(dev, di, vae_dir: Path, images, out: Path, cfg: LdmConfig, masks, resume, show_progress,
               callback) -> dict:
    vae_dir = resolve_model(vae_dir)
    vcard = read_card(vae_dir, ("vae", "latent"))
    paired = len(vcard.get("channels", ["image"])) > 1
    if paired and masks is None:
        raise UserInputError(f"the autoencoder '{vae_dir}' was trained on images with masks: pass --masks too.")
    if not paired and masks is not None:
        raise UserInputError(
            f"the autoencoder '{vae_dir}' was trained on images only: train one on images with masks "
            "(`zfdiffusion train vae --images ... --masks ...`) to generate masks.")
    vae = load_vae(vae_dir / "vae").to(dev)
    patch = int(vcard["patch_size"])
    data = PatchData.from_paths(images, masks, patch=patch, norm=Normalisation.from_dict(vcard["normalisation"]),
                                channel=cfg.channel, axes=cfg.axes, rank=di.rank, world=di.world)
    if data.mask_encoding and vcard.get("mask_encoding") and data.mask_encoding != vcard["mask_encoding"]:
        raise UserInputError(
            f"these masks are {data.mask_encoding} but the autoencoder learned {vcard['mask_encoding']} masks: "
            "use the same kind of masks (label images or binary) for both.")
    stats = loop.gather_dict(data.normalisation_stats(), di)
    state_path = loop.prepare_state_dir(out / "training" / "unet", out, resume, di)
    if di.main:
        for note in data.notices:
            print(f"note: {note}")
        vae_out = out / "vae"
        if (vae_out / WEIGHTS_FILE).is_file():
            if weights_sha256(vae_out) != weights_sha256(vae_dir / "vae"):
                raise UserInputError(
                    f"'{out}' already holds a different autoencoder: use the same --vae, or another --out.")
        elif vae_out.resolve() != (vae_dir / "vae").resolve():
            shutil.copytree(vae_dir / "vae", vae_out, dirs_exist_ok=True)
    if di.world > 1:
        dist.barrier()
    scale = float(vcard["scaling_factor"])
    f = downsampling(vae)
    shape = [vae.config.latent_channels, patch // f, patch // f]
    bank = encode_bank(vae, scale, data, cfg.bank, patch, loop.step_generator(cfg.seed, di.rank, 0), dev,
                       show_progress=show_progress and di.main)
    vae.cpu()
    schedule = schedule_for(cfg.loss)
    noise_sched = training_scheduler(schedule)
    saved = loop.load_state(state_path, resume, di)
    if saved is not None:
        model = ZfUNet.from_config(loop.model_config(saved))
    else:
        torch.manual_seed(cfg.seed)
        model = build_model("latent", cfg.size, resolution=shape[1], num_classes=0, channels=shape[0])
    if model.config.in_channels != shape[0] or model.config.sample_size != shape[1]:
        raise UserInputError("the saved training state is for another latent shape: use the same --vae, or another --out.")
    amp = dev.type == "cuda"
    vsha = weights_sha256(vae_dir / "vae")

    def loss_fn(net, step, g):
        x0 = bank[torch.randint(0, len(bank), (cfg.batch_size,), generator=g)]
        xt, t, target = noised_batch(x0, noise_sched, g)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            pred = net(xt.to(dev), t.to(dev))
        return F.mse_loss(pred.float(), target.to(dev))

    def export(ema, step, losses, secs, world):
        save_model(ema, out / "unet", {"kind": "latent-unet", "resolution": shape[1], "schedule": schedule,
                                       **loop.training_info(cfg, step, losses, secs, world)})
        write_json(out / CARD_FILE, {
            **{k: v for k, v in vcard.items() if k not in ("name", "description", "steps", "training_data")},
            "kind": "latent", "name": out.name,
            "description": ("latent diffusion for image + mask patches" if paired else "latent diffusion for patches"),
            "latent_shape": shape, "vae_sha256": vsha, "vae_steps": vcard.get("steps"),
            "vae_training_data": vcard.get("training_data"), "unet_steps": step,
            "training_data": _data_card(data, cfg, stats), **made_by(),
        })

    summary = loop.run(model, loss_fn=loss_fn, export=export, cfg=cfg.loop_config("train ldm"), dev=dev, di=di,
                       state_path=state_path, saved=saved, show_progress=show_progress, callback=callback)
    return {"what": "ldm", **summary, "model": str(out)}
