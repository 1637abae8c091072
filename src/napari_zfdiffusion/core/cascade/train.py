"""Training the cascade stages: one loop for every stage, unchanged under ``torchrun``.

The loop itself (EMA, checkpoints, exact resume, DDP) is :mod:`..training.loop`; this module supplies
the cascade's batches, losses and model cards.
* Losses: ``l1`` on epsilon (as in the original work), ``l2`` on epsilon, ``v`` (v-prediction, MSE).
* ``continuity``: volume models. Each training plane also gets the plane above it (same specimen,
  same crop and flips), lightly noised, or none at all with probability ``p_noprev`` (and always
  for the top plane), so a sampler can weigh depth and continuity guidance separately.
* ``init_from``: start from another cascade's stage (e.g. the bundled slice model) instead of
  random weights; a slice model is extended with a zero-initialised previous-plane input.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..diffusion.objective import noise_to_level, noised_batch, schedule_for, training_scheduler
from ..diffusion.unet import SIZES, ZfUNet, add_prev_channel, build_model
from ..errors import UserInputError
from ..images import Normalisation, augment, random_crop, resize
from ..io import write_json
from ..progress import ProgressCallback
from ..provenance import made_by
from ..store import CASCADE_FILE, STAGE_FILE, load_model, read_json, resolve_model, save_model
from ..training import loop
from .data import DepthDataset
from .depths import depth_class_cards, depth_class_cards_um

STAGES = {"base": (64, None), "sr128": (128, 64), "sr256": (256, 128), "sr512": (512, 256)}
DEFAULT_CROP = {"sr128": 64, "sr256": 96, "sr512": 128}
LOSSES = ("l1", "l2", "v")


@dataclass
class TrainConfig(loop.TrainOptions):
    stage: str = "base"
    size: str = "small"
    loss: str = "v"
    p_uncond: float = 0.15
    crop: int | None = None
    noise_aug_max: float = 0.3
    depth_classes: int | None = None
    z_step_um: float | None = None
    depth_bin_um: float | None = None
    augment: bool = True
    norm_low: float = 1.0
    norm_high: float = 99.8
    continuity: bool = False
    p_noprev: float = 0.2
    prev_noise_max: float = 0.1
    init_from: str | None = None
    retarget: bool = False
    preset: str | None = None  # `train cascade --preset` (core.choices.CASCADE_PRESETS), for the card

    def validate(self) -> None:
        if self.stage not in STAGES:
            raise UserInputError(f"unknown stage '{self.stage}': choose one of {', '.join(STAGES)}.")
        if self.loss not in LOSSES:
            raise UserInputError(f"unknown loss '{self.loss}': choose one of {', '.join(LOSSES)}.")
        if self.size not in SIZES:
            raise UserInputError(f"unknown model size '{self.size}': choose one of {', '.join(SIZES)}.")
        self.check_common()
        if not 0 <= self.p_uncond < 1:
            raise UserInputError("--p-uncond must be in [0, 1).")
        if not 0 <= self.p_noprev < 1:
            raise UserInputError("--p-noprev must be in [0, 1).")
        if not 0 <= self.prev_noise_max <= 1:
            raise UserInputError("--prev-noise-max must be in [0, 1].")


def _update_cascade_card(out: Path, ds: DepthDataset, cfg: TrainConfig, stats: dict | None = None) -> dict:
    """Create ``cascade.json``, or check that this stage's data agrees with the stages already there."""
    card_path = out / CASCADE_FILE
    z_step = cfg.z_step_um or ds.pixel_um.get("Z")
    classes = (depth_class_cards_um(ds.n_classes, cfg.depth_bin_um) if cfg.depth_bin_um
               else depth_class_cards(ds.n_planes, ds.n_classes, z_step))
    norm = Normalisation(cfg.norm_low, cfg.norm_high).to_dict()
    if card_path.is_file():
        card = read_json(card_path)
        if len(card.get("depth_classes", [])) != ds.n_classes:
            raise UserInputError(
                f"'{out}' already holds stages trained with {len(card.get('depth_classes', []))} depth classes, "
                f"but this data gives {ds.n_classes}. Use the same data and --depth-classes, or another --out."
            )
        return card
    card = {
        "kind": "cascade",
        "format_version": 1,
        "name": out.name,
        "description": f"depth cascade trained on {len(ds.names)} stack(s)",
        "depth_classes": classes,
        "n_planes": ds.n_planes,
        "depth_bin_um": cfg.depth_bin_um,  # depth classes are bins of physical depth (None: of planes)
        "z_step_um": z_step,
        # the training planes' pixel size, and the side of the square field each generated slice shows
        "pixel_size_um": {a.lower(): ds.pixel_um.get(a) for a in ("Y", "X")},
        "field_um": ds.side_px * ds.pixel_um["X"] if ds.pixel_um.get("X") else None,
        "normalisation": norm,
        "normalisation_stats": stats,  # each stack's percentile values (computed once, exactly)
        "intensity": "outputs are normalised intensities in [0, 1] (percentile low -> 0, high -> 1)",
        "training_data": {"files": [Path(f).name for f in ds.files], "specimens": len(ds.names),
                          "channel": cfg.channel, "credit": cfg.data_credit,
                          "licence": cfg.data_licence},
        **made_by(),
    }
    write_json(card_path, card)
    return card


def _batch(ds: DepthDataset, idx: torch.Tensor, cfg: TrainConfig, g: torch.Generator):
    """Targets (B, 1, res, res), the upsampled low-res input (or None) and, for continuity models,
    the previous plane (zeros where there is none) with its (B,) presence flag."""
    res, lres = STAGES[cfg.stage]
    offsets = torch.rand(len(idx), generator=g)
    hr, lr, prev, has_prev = [], [], [], []
    for j, i in enumerate(idx.tolist()):
        spec, z = int(ds.specimen[i]), int(ds.zindex[i])
        off = float(offsets[j]) if cfg.augment else None
        if lres:  # the low-res input is made from the same source square, as in sampling
            sq = ds.source_square(spec, z, off)
            hr.append(resize(sq, res)[0])
            lr.append(resize(resize(sq, lres), res)[0])
        else:
            hr.append(ds.square(spec, z, off, res)[0])
        if cfg.continuity:
            has_prev.append(z > 0)
            prev.append(ds.square(spec, z - 1, off, res)[0] if z > 0 else torch.zeros_like(hr[-1]))
    parts = [torch.stack(hr)] + ([torch.stack(lr)] if lres else []) + ([torch.stack(prev)] if prev else [])
    both = torch.cat(parts, dim=1)
    if cfg.augment:  # the same flips for the target and its conditions
        both = augment(both, g)
    if lres:
        crop = cfg.crop or DEFAULT_CROP[cfg.stage]
        both = random_crop(both, crop, g)
    x, rest = both[:, :1], both[:, 1:]
    cond = rest[:, :1] if lres else None
    p = rest[:, -1:] if cfg.continuity else None
    return x, cond, p, (torch.tensor(has_prev, dtype=torch.long) if cfg.continuity else None)


def _export(out: Path, ema, cfg: TrainConfig, step: int, losses: list[float], ds: DepthDataset,
            seconds: float, world: int) -> None:
    res, lres = STAGES[cfg.stage]
    info = {
        "stage": cfg.stage,
        "resolution": res,
        "input_resolution": lres,
        "schedule": schedule_for(cfg.loss),
        "default_noise_aug": 0.1 if lres else None,
        "prev_channels": 1 if cfg.continuity else 0,
        **loop.training_info(cfg, step, losses, seconds, world, images=len(ds), specimens=len(ds.names)),
    }
    save_model(ema, out / cfg.stage, info)


def _init_model(cfg: TrainConfig):
    """The stage ``cfg.stage`` of the cascade ``cfg.init_from``, extended to take the previous plane."""
    folder = resolve_model(cfg.init_from) / cfg.stage
    if not (folder / STAGE_FILE).is_file():
        raise UserInputError(f"--init-from '{cfg.init_from}' has no {cfg.stage} stage to start from.")
    parent = read_json(folder / STAGE_FILE).get("schedule", {}).get("prediction_type", "epsilon")
    mine = schedule_for(cfg.loss)["prediction_type"]
    if parent != mine and not cfg.retarget:
        raise UserInputError(f"--init-from '{cfg.init_from}' {cfg.stage} predicts {parent}, but --loss {cfg.loss} "
                             f"trains {mine}: use --loss {'v' if parent == 'v_prediction' else 'l1 or l2'}, or "
                             "--retarget to fine-tune it to the new target (it needs about 1000 steps to adapt).")
    model = load_model(folder, ZfUNet).train()
    return add_prev_channel(model) if cfg.continuity else model


def train_stage(data, out: str | Path, cfg: TrainConfig, *, device: str = "auto", resume: bool = False,
                show_progress: bool = True, callback: ProgressCallback | None = None) -> dict:
    """Train (or resume) one cascade stage on the stacks in ``data`` and export it into ``out``.

    Returns a summary: steps done, last loss, seconds, and where the model was written.
    """
    cfg.validate()
    out = Path(out)
    return loop.launch(_train, device, data, out, cfg, resume, show_progress, callback)


def _train(dev: torch.device, di: loop.DistInfo, data, out: Path, cfg: TrainConfig, resume: bool,
           show_progress: bool, callback) -> dict:
    norm = Normalisation(cfg.norm_low, cfg.norm_high)
    ds = DepthDataset.from_paths(data, depth_classes=cfg.depth_classes, norm=norm, channel=cfg.channel,
                                 axes=cfg.axes, rank=di.rank, world=di.world,
                                 cache_res=STAGES[cfg.stage][0] if cfg.stage == "base" else None,
                                 depth_bin_um=cfg.depth_bin_um, z_step_um=cfg.z_step_um)
    if di.main:
        for note in ds.notices:
            print(f"note: {note}")
    res = STAGES[cfg.stage][0]
    state_path = loop.prepare_state_dir(out / "training" / cfg.stage, out, resume, di)
    stats = loop.gather_dict(ds.normalisation_stats(), di)
    if di.main:
        _update_cascade_card(out, ds, cfg, stats)
    if di.world > 1:
        dist.barrier()

    noise_sched = training_scheduler(schedule_for(cfg.loss))
    alphas_cumprod = noise_sched.alphas_cumprod
    saved = loop.load_state(state_path, resume, di)
    if saved is not None:
        model = ZfUNet.from_config(loop.model_config(saved))
    elif cfg.init_from:
        model = _init_model(cfg)
    else:
        torch.manual_seed(cfg.seed)  # the same initial weights with or without --resume
        model = build_model("base" if cfg.stage == "base" else "sr", cfg.size, resolution=res,
                            num_classes=ds.n_classes, prev_channels=1 if cfg.continuity else 0)
    if model.config.num_classes != ds.n_classes:
        what = f"'{cfg.init_from}' ({cfg.stage})" if cfg.init_from and saved is None else "the saved training state"
        raise UserInputError(f"{what} has {model.config.num_classes} depth classes, but this data gives "
                             f"{ds.n_classes}: train on the same planes (or --depth-classes).")
    if bool(model.config.prev_channels) != cfg.continuity:
        raise UserInputError("the saved training state was made with" + ("out" if cfg.continuity else "")
                             + " --continuity: resume with the same setting, or use another --out.")
    shard = ds.shard(di.rank, di.world)
    amp = dev.type == "cuda"

    def loss_fn(net, step: int, g: torch.Generator) -> torch.Tensor:
        idx = shard[torch.randint(0, len(shard), (cfg.batch_size,), generator=g)]
        x0, lowres, prev, has_prev = _batch(ds, idx, cfg, g)
        labels = ds.classes[idx].clone()
        drop = torch.rand(len(idx), generator=g) < cfg.p_uncond
        labels[drop] = ds.n_classes
        xt, t, target = noised_batch(x0, noise_sched, g)
        kwargs = {"class_labels": labels.to(dev)}
        if lowres is not None:
            level = torch.rand(len(idx), generator=g) * cfg.noise_aug_max
            lowres = noise_to_level(lowres, level, alphas_cumprod, torch.randn(lowres.shape, generator=g))
            kwargs.update(cond=lowres.to(dev), noise_level=level.to(dev))
        if prev is not None:
            keep = has_prev.bool() & (torch.rand(len(idx), generator=g) >= cfg.p_noprev)
            level = torch.rand(len(idx), generator=g) * cfg.prev_noise_max
            prev = noise_to_level(prev, level, alphas_cumprod, torch.randn(prev.shape, generator=g))
            prev = prev * keep.view(-1, 1, 1, 1)
            kwargs.update(prev=prev.to(dev), has_prev=keep.long().to(dev))
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            pred = net(xt.to(dev), t.to(dev), **kwargs)
        pred = pred.float()
        target = target.to(dev)
        return F.l1_loss(pred, target) if cfg.loss == "l1" else F.mse_loss(pred, target)

    def export(ema, step, losses, secs, world):
        _export(out, ema, cfg, step, losses, ds, secs, world)

    lc = cfg.loop_config(f"train {cfg.stage}")
    summary = loop.run(model, loss_fn=loss_fn, export=export, cfg=lc, dev=dev, di=di, state_path=state_path,
                       saved=saved, show_progress=show_progress, callback=callback)
    return {"stage": cfg.stage, **summary, "model": str(out / cfg.stage)}


__all__ = ["STAGES", "STAGE_FILE", "TrainConfig", "train_stage"]
