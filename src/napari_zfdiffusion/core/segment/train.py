"""Training the segmentation U-Net (``zfdiffusion train unet``) on real images with masks, on
generated pairs (``zfdiffusion em generate --masks-out``), or on a mix of both.

Runs in the one training loop (:mod:`..training.loop`: EMA, atomic checkpoints, exact resume,
DistributedDataParallel under ``torchrun``). Data are random crops with flips and rotations
(:class:`..training.patches.PatchData` with segmentation targets: foreground and interior; read from
disk crop by crop, each torchrun rank from its own share of the images) and random
intensity changes (background offset, contrast, gamma, noise; :func:`augment_intensity`). With
``extra_images`` (e.g. generated pairs) a fixed fraction of every batch comes from them. At every
checkpoint the EMA model segments the whole held-out images, tile by tile as in use, and foreground
IoU, Dice and per-object F1 at IoU 0.5 go in the log and the card.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..errors import UserInputError
from ..images import Normalisation
from ..io import write_json
from ..masks import INNER_TARGETS, instances
from ..metrics import match_objects
from ..progress import ProgressCallback
from ..provenance import made_by
from ..store import CARD_FILE, save_model
from ..tiling import predict_tiled
from ..training import loop
from ..training.patches import PatchData
from .net import SEG_SIZES, ResUNet, build_segmenter
from .segmenter import KIND


@dataclass
class UnetConfig(loop.TrainOptions):
    steps: int = 4000
    batch_size: int = 8
    lr: float = 1e-3
    warmup: int = 100
    ema_decay: float = 0.99
    size: str = "small"
    crop: int = 128
    interior: bool = True
    inner: str = "center"  # what the second output learns: "center" (normalised distance) or "interior"
    renorm_aug: float = 0.25  # share of crops percentile-normalised on their own (a user's crop, empty or not)
    init_from: str | None = None  # fine-tune: start from this segmentation model (name or folder)
    extra_fraction: float = 0.5
    val_fraction: float = 0.2
    norm_low: float = 1.0
    norm_high: float = 99.8
    tile: int = 256
    overlap: int = 32
    intensity_aug: bool = True
    zoom_aug: tuple[float, float] = (0.5, 2.0)  # random zoom of each crop, log-uniform (1, 1: none)
    blur_aug: float = 1.5  # Gaussian blur of sigma up to this, on a third of the crops (0: none)

    def validate(self) -> None:
        if self.size not in SEG_SIZES:
            raise UserInputError(f"unknown model size '{self.size}': choose one of {', '.join(SEG_SIZES)}.")
        self.check_common()
        if self.crop < 32 or self.crop % 16:
            raise UserInputError(f"--crop must be a multiple of 16 and at least 32, got {self.crop}.")
        if not 0.0 <= self.extra_fraction <= 1.0:
            raise UserInputError(f"--extra-fraction must be between 0 and 1, got {self.extra_fraction}.")
        if not 0.0 <= self.val_fraction < 1.0:
            raise UserInputError(f"--val-fraction must be between 0 and 1, got {self.val_fraction}.")
        lo, hi = self.zoom_aug
        if not 0.1 <= lo <= hi <= 10:
            raise UserInputError(f"--zoom-aug must be two factors 0.1 <= LOW <= HIGH <= 10, got {lo} {hi}.")
        if not 0.0 <= self.blur_aug <= 10:
            raise UserInputError(f"--blur-aug must be a sigma between 0 and 10 pixels, got {self.blur_aug}.")
        if self.inner not in INNER_TARGETS:
            raise UserInputError(f"--inner must be one of {', '.join(INNER_TARGETS)}, got '{self.inner}'.")
        if not 0.0 <= self.renorm_aug <= 1.0:
            raise UserInputError(f"--renorm-aug must be a share between 0 and 1, got {self.renorm_aug}.")
        if not 0.0 <= self.ema_decay < 1.0:
            raise UserInputError(f"--ema-decay must be in [0, 1) (0: no EMA), got {self.ema_decay}.")


def augment_intensity(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random intensity changes of a batch of images in [-1, 1] (B, 1, H, W), one draw per image:
    background offset, contrast, gamma and Gaussian noise, so that the model does not learn one
    microscope's background level (percentile normalisation maps it differently per image)."""
    b = x.shape[0]
    u = (x + 1) / 2
    offset = torch.empty(b, 1, 1, 1).uniform_(-0.05, 0.2, generator=g)
    scale = torch.empty(b, 1, 1, 1).uniform_(0.6, 1.3, generator=g)
    gamma = torch.exp(torch.empty(b, 1, 1, 1).uniform_(-0.4, 0.4, generator=g))
    sigma = torch.empty(b, 1, 1, 1).uniform_(0.0, 0.04, generator=g)
    noise = torch.randn(x.shape, generator=g)
    u = u.clamp(0, 1) ** gamma * scale + offset + sigma * noise
    return (u.clamp(0, 1) * 2 - 1).to(x.dtype)


def zoomed_crops(data: PatchData, n: int, crop: int, g: torch.Generator, zoom: tuple[float, float]) -> torch.Tensor:
    """``n`` random (C, crop, crop) crops, each seen at a random zoom (log-uniform in ``zoom``): a
    window of side crop/zoom resized to crop (the image with antialiasing when it shrinks, the targets
    bilinearly: soft at the objects' edges). Objects of other sizes than the training data's, as
    other microscopes and magnifications give them."""
    lo, hi = zoom
    if lo == hi == 1.0:
        return data.random_crops(n, crop, g)
    largest = data.smallest_side()
    out = []
    for _ in range(n):
        z = math.exp(float(torch.empty(()).uniform_(math.log(lo), math.log(hi), generator=g)))
        side = int(min(largest, max(16, round(crop / z))))
        c = data.random_crops(1, side, g)
        if side != crop:
            c = torch.cat([F.interpolate(c[:, :1], size=(crop, crop), mode="bilinear", align_corners=False,
                                         antialias=side > crop),
                           F.interpolate(c[:, 1:], size=(crop, crop), mode="bilinear", align_corners=False)], 1)
        out.append(c)
    return torch.cat(out)


def augment_renorm(x: torch.Tensor, g: torch.Generator, share: float, low: float = 1.0,
                   high: float = 99.8) -> torch.Tensor:
    """About ``share`` of the images of a batch (B, 1, H, W) in [-1, 1] percentile-normalised on their
    own, as a user's image is when it holds only this window: an empty field's noise is stretched
    to the full range, and the model learns that stretched noise holds no objects."""
    if share <= 0:
        return x
    out = x.clone()
    for i in range(x.shape[0]):
        if float(torch.rand((), generator=g)) >= share:
            continue
        lo, hi = torch.quantile(x[i].flatten().float(), torch.tensor([low / 100, high / 100])).tolist()
        if hi > lo:
            out[i] = ((x[i] - lo) / (hi - lo)).clamp(0, 1) * 2 - 1
    return out


def augment_blur(x: torch.Tensor, g: torch.Generator, max_sigma: float) -> torch.Tensor:
    """A Gaussian blur (sigma uniform in [0.3, max_sigma]) of about a third of the images of a batch
    (B, 1, H, W): out-of-focus light and other optics."""
    if max_sigma <= 0:
        return x
    out = x.clone()
    for i in range(x.shape[0]):
        if float(torch.rand((), generator=g)) >= 1 / 3:
            continue
        sigma = float(torch.empty(()).uniform_(0.3, max(0.3, max_sigma), generator=g))
        r = max(1, int(math.ceil(3 * sigma)))
        k = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=x.dtype) / sigma) ** 2)
        k = k / k.sum()
        img = F.pad(x[i:i + 1], (r, r, r, r), mode="reflect")
        img = F.conv2d(img, k.view(1, 1, 1, -1))
        img = F.conv2d(img, k.view(1, 1, -1, 1))
        out[i:i + 1] = img
    return out


def seg_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy on every output, plus soft Dice on the foreground. ``target`` in [0, 1]."""
    bce = F.binary_cross_entropy_with_logits(logits, target)
    p = torch.sigmoid(logits[:, 0])
    t = target[:, 0]
    inter = (p * t).sum((1, 2))
    soft_dice = (2 * inter + 1.0) / (p.sum((1, 2)) + t.sum((1, 2)) + 1.0)
    return bce + (1.0 - soft_dice).mean()


@torch.no_grad()
def evaluate(net: torch.nn.Module, images: list[torch.Tensor], *, tile: int = 256, overlap: int = 32,
             threshold: float = 0.5, min_size: int = 16) -> dict:
    """Foreground IoU and Dice, and object F1 at IoU 0.5, of ``net`` on whole (C, H, W) images in
    [-1, 1] (channel 0 the image, then the foreground and interior targets), pooled over images."""
    if not images:
        return {}
    dev = next(net.parameters()).device
    was_training = net.training
    net.eval()
    c = net.config.out_channels if hasattr(net, "config") else net.module.config.out_channels

    def fn(x):
        return torch.sigmoid(net(x.to(dev)).float())

    inter = union = psum = tsum = 0
    tp = fp = fn_ = 0
    for img in images:
        prob = predict_tiled(fn, img[0].numpy(), tile=tile, overlap=overlap, out_channels=c)
        prob = prob if c > 1 else prob[None]
        truth_fg = img[1].numpy() > 0
        truth = instances((img[1].numpy() + 1) / 2, (img[2].numpy() + 1) / 2, min_size=0)
        pred_fg = prob[0] >= threshold
        pred = instances(prob[0], prob[1] if c > 1 else None, threshold=threshold, min_size=min_size)
        inter += int((pred_fg & truth_fg).sum())
        union += int((pred_fg | truth_fg).sum())
        psum += int(pred_fg.sum())
        tsum += int(truth_fg.sum())
        m = match_objects(truth, pred)
        tp, fp, fn_ = tp + m["tp"], fp + m["fp"], fn_ + m["fn"]
    net.train(was_training)
    return {"images": len(images), "iou": inter / union if union else 1.0,
            "dice": 2 * inter / (psum + tsum) if psum + tsum else 1.0,
            "f1": 2 * tp / (2 * tp + fp + fn_) if tp + fp + fn_ else 1.0, "tp": tp, "fp": fp, "fn": fn_}


def match_parent(cfg: UnetConfig) -> dict | None:
    """With ``cfg.init_from``: the parent model's card (name, folder, outputs, steps, for the new card),
    and ``cfg.interior`` / ``cfg.inner`` set to its outputs, so that a fine-tuned model means what its
    parent meant. Reads the card only (weights: :func:`init_segmenter`)."""
    if not cfg.init_from:
        return None
    from ..store import read_card, resolve_model

    path = resolve_model(cfg.init_from)
    card = read_card(path, (KIND,))
    outputs = list(card.get("outputs", ["foreground", "interior"]))
    cfg.interior = len(outputs) > 1
    if cfg.interior:
        cfg.inner = outputs[1] if outputs[1] in INNER_TARGETS else "interior"
    return {"name": card.get("name", path.name), "path": str(path), "outputs": outputs, "steps": card.get("steps"),
            "seed_threshold": card.get("seed_threshold"), "join_threshold": card.get("join_threshold")}


def init_segmenter(parent: dict) -> ResUNet:
    """The network of the model to fine-tune (:func:`match_parent`), in training mode."""
    from ..store import load_model

    net = load_model(Path(parent["path"]) / "unet", ResUNet).train().requires_grad_(True)
    if net.config.out_channels != len(parent["outputs"]):
        raise UserInputError(f"--init-from '{parent['name']}': its card names {len(parent['outputs'])} outputs but "
                             f"its network has {net.config.out_channels}: the model folder is inconsistent.")
    return net


def training_diameter(masks, limit: int = 64) -> float | None:
    """The median object diameter (pixels) of the training masks (at most ``limit`` mask planes, spread
    over the files): the scale that `segment --diameter` rescales images to."""
    from ..io import list_images, read_image_lazy
    from ..masks import object_diameters

    files = list_images(masks)
    planes = []
    for f in files:
        arr = read_image_lazy(f)
        planes += [arr] if arr.ndim == 2 else [arr[i] for i in range(arr.shape[0])] if arr.ndim == 3 else []
    if not planes:
        return None
    pick = np.linspace(0, len(planes) - 1, min(limit, len(planes))).round().astype(int)
    d = np.concatenate([object_diameters(np.asarray(planes[i])) for i in sorted(set(pick.tolist()))])
    return round(float(np.median(d)), 2) if d.size else None


def train_unet(images, masks, out: str | Path, cfg: UnetConfig, *, extra_images=None, extra_masks=None,
               val_images=None, val_masks=None, device: str = "auto", resume: bool = False,
               show_progress: bool = True, callback: ProgressCallback | None = None) -> dict:
    """Train (or resume) a segmentation U-Net into the folder ``out``.

    ``images``/``masks``: the main training data (a validation split is held out of it unless
    ``val_images``/``val_masks`` are given). ``extra_images``/``extra_masks``: more pairs (e.g.
    generated), used for training only, ``cfg.extra_fraction`` of every batch.
    """
    cfg.validate()
    if masks is None:
        raise UserInputError("--masks is needed: one mask or label image per training image.")
    parent = match_parent(cfg)
    if (extra_images is None) != (extra_masks is None):
        raise UserInputError("give --extra-images and --extra-masks together.")
    if (val_images is None) != (val_masks is None):
        raise UserInputError("give --val-images and --val-masks together.")
    return loop.launch(_train_unet, device, images, masks, Path(out), cfg, extra_images, extra_masks, val_images,
                       val_masks, resume, show_progress, callback, parent)


def _train_unet(dev, di, images, masks, out: Path, cfg: UnetConfig, extra_images, extra_masks, val_images,
                val_masks, resume, show_progress, callback, parent=None) -> dict:
    norm = Normalisation(cfg.norm_low, cfg.norm_high, per="image")
    explicit_val = val_images is not None
    seg_targets = cfg.inner if cfg.interior else "interior"
    data = PatchData.from_paths(images, masks, patch=cfg.crop, norm=norm, segmentation=seg_targets, channel=cfg.channel,
                                axes=cfg.axes, val_fraction=0.0 if explicit_val else cfg.val_fraction,
                                rank=di.rank, world=di.world)
    extra = (PatchData.from_paths(extra_images, extra_masks, patch=cfg.crop, norm=norm, segmentation=seg_targets,
                                  val_fraction=0.0, rank=di.rank, world=di.world)
             if extra_images is not None else None)
    val = data.val  # whole held-out images, read when validation runs (on rank 0)
    val_card = data.split
    if explicit_val:  # validation runs on rank 0 only: the other ranks do not open these files
        vdata = (PatchData.from_paths(val_images, val_masks, patch=32, norm=norm, segmentation=seg_targets,
                                      val_fraction=0.0, channel=cfg.channel, axes=cfg.axes) if di.main else None)
        val = vdata.train if vdata is not None else []
        val_card = f"{len(val)} separate validation image(s)"
    if di.main:
        for note in data.notices + (extra.notices if extra else []):
            print(f"note: {note}")
    stats = loop.gather_dict(data.normalisation_stats(), di)
    diameter = training_diameter(masks) if di.main else None  # the objects' size the model learned (card)
    state_path = loop.prepare_state_dir(out / "training" / "unet", out, resume, di)
    if di.world > 1:
        dist.barrier()
    saved = loop.load_state(state_path, resume, di)
    n_out = 2 if cfg.interior else 1
    if saved is not None:
        net = ResUNet.from_config(loop.model_config(saved))
        if net.config.out_channels != n_out:
            raise UserInputError("the saved training state has another number of outputs: resume with the same "
                                 "--interior/--no-interior, or use another --out.")
    elif parent is not None:
        net = init_segmenter(parent)
    else:
        torch.manual_seed(cfg.seed)
        net = build_segmenter(cfg.size, n_out)
    n_extra = round(cfg.batch_size * cfg.extra_fraction) if extra is not None else 0
    amp = dev.type == "cuda"

    def loss_fn(model, step, g):
        parts = []
        if cfg.batch_size - n_extra:
            parts.append(zoomed_crops(data, cfg.batch_size - n_extra, cfg.crop, g, tuple(cfg.zoom_aug)))
        if n_extra:
            parts.append(zoomed_crops(extra, n_extra, cfg.crop, g, tuple(cfg.zoom_aug)))
        x = torch.cat(parts)
        image = augment_blur(x[:, :1], g, cfg.blur_aug)
        image = augment_renorm(image, g, cfg.renorm_aug)
        image = augment_intensity(image, g) if cfg.intensity_aug else image
        target = (x[:, 1:1 + n_out] + 1).to(dev) / 2
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(image.to(dev))
        return seg_loss(logits.float(), target)

    last_val: dict = {}

    def validate(ema, step):
        last_val.clear()
        last_val.update(evaluate(ema, val, tile=cfg.tile, overlap=cfg.overlap))
        return dict(last_val)

    def export(ema, step, losses, secs, world):
        save_model(ema, out / "unet", {"kind": "segmentation-unet", **loop.training_info(cfg, step, losses, secs,
                                                                                         world)})
        td = {**data.describe(), "validation": val_card, "credit": cfg.data_credit, "licence": cfg.data_licence,
              "normalisation_stats": stats}
        write_json(out / CARD_FILE, {
            "kind": KIND, "format_version": 1, "name": out.name,
            "description": "U-Net segmentation: foreground probability" + (
                (" and object centres" if cfg.inner == "center" else " and object interiors") if n_out > 1 else ""),
            "outputs": ["foreground", cfg.inner][:n_out], "normalisation": norm.to_dict(),
            "intensity": "each plane percentile-normalised to [0, 1], then (x - 0.5) / 0.5",
            "tile": cfg.tile, "overlap": cfg.overlap, "threshold": 0.5, "min_size": 16, "crop": cfg.crop,
            "object_diameter_px": diameter,
            **({"fine_tuned_from": {k: v for k, v in parent.items() if k not in ("seed_threshold", "join_threshold")}}
               if parent else {}),
            # a fine-tuned model keeps the seed and join thresholds its parent was tuned to (the outputs mean the same)
            **({k: parent[k] for k in ("seed_threshold", "join_threshold") if parent and parent.get(k)}),
            "steps": step, "validation": dict(last_val) or None,
            "training_data": td,
            "extra_training_data": ({**extra.describe(), "fraction_of_batch": n_extra / cfg.batch_size}
                                    if extra is not None else None),
            **made_by(),
        })

    summary = loop.run(net, loss_fn=loss_fn, export=export, cfg=cfg.loop_config("train unet"), dev=dev, di=di,
                       state_path=state_path, saved=saved, show_progress=show_progress, callback=callback,
                       validate=validate)
    return {"what": "unet", **summary, "model": str(out), "validation": dict(last_val)}


__all__ = ["UnetConfig", "augment_renorm", "evaluate", "init_segmenter", "match_parent", "seg_loss", "train_unet"]
