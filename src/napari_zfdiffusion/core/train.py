"""Training the cascade stages: one loop for every stage, unchanged under ``torchrun``.

* Every random draw of step ``k`` on rank ``r`` comes from a generator seeded with (seed, r, k):
  a resumed run continues exactly as an uninterrupted one would.
* Rank 0 writes: the training state (``state.pt``: tensors only, loaded with
  ``weights_only=True``) and the exported EMA model folder, both atomically.
* Losses: ``l1`` on epsilon (as in the original work), ``l2`` on epsilon, ``v`` (v-prediction, MSE).
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .. import __version__
from .data import DepthDataset, Normalisation, augment, depth_bins, random_crop_pair, resize, square
from .device import resolve_device
from .errors import UserInputError
from .models import SIZES, build_model
from .sampling import DEFAULT_SCHEDULE, Progress, ProgressCallback, make_scheduler
from .store import CASCADE_FILE, STAGE_FILE, read_json, save_unet

STAGES = {"base": (64, None), "sr128": (128, 64), "sr256": (256, 128), "sr512": (512, 256)}
DEFAULT_CROP = {"sr128": 64, "sr256": 96, "sr512": 128}
LOSSES = ("l1", "l2", "v")


@dataclass
class TrainConfig:
    stage: str = "base"
    size: str = "small"
    steps: int = 20000
    batch_size: int = 16
    lr: float = 2e-4
    warmup: int = 200
    loss: str = "v"
    p_uncond: float = 0.15
    ema_decay: float = 0.999
    checkpoint_every: int = 500
    log_every: int = 50
    crop: int | None = None
    noise_aug_max: float = 0.3
    seed: int = 0
    depth_classes: int | None = None
    z_step_um: float | None = None
    augment: bool = True
    norm_low: float = 1.0
    norm_high: float = 99.8
    data_credit: str = ""
    data_licence: str = ""

    def validate(self) -> None:
        if self.stage not in STAGES:
            raise UserInputError(f"unknown stage '{self.stage}': choose one of {', '.join(STAGES)}.")
        if self.loss not in LOSSES:
            raise UserInputError(f"unknown loss '{self.loss}': choose one of {', '.join(LOSSES)}.")
        if self.size not in SIZES:
            raise UserInputError(f"unknown model size '{self.size}': choose one of {', '.join(SIZES)}.")
        if self.steps < 1 or self.batch_size < 1:
            raise UserInputError("--steps and --batch-size must be at least 1.")
        if not 0 <= self.p_uncond < 1:
            raise UserInputError("--p-uncond must be in [0, 1).")


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    initialised_here: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> DistInfo:
    """Join the process group when started by ``torchrun`` (WORLD_SIZE > 1); else a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank = int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    here = False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        here = True
    return DistInfo(rank, world, local, here)


def step_generator(seed: int, rank: int, step: int) -> torch.Generator:
    return torch.Generator("cpu").manual_seed((seed * 1_000_003 + rank * 7_919 + step) % (2**63 - 1))


def depth_class_cards(n_planes: int, n_classes: int, z_step_um: float | None) -> list[dict]:
    bins = depth_bins(n_planes, n_classes if n_classes != n_planes else None)
    out = []
    for c in range(n_classes):
        planes = [z for z, b in enumerate(bins) if b == c]
        where = "top" if c == 0 else "bottom" if c == n_classes - 1 else "middle"
        label = f"planes {planes[0]}-{planes[-1]}" if len(planes) > 1 else f"plane {planes[0]}"
        if z_step_um:
            label += f", z = {planes[0] * z_step_um:g}-{planes[-1] * z_step_um:g} um" if len(planes) > 1 \
                else f", z = {planes[0] * z_step_um:g} um"
        out.append({"index": c, "planes": planes, "label": f"{label} ({where})"})
    return out


def _update_cascade_card(out: Path, ds: DepthDataset, cfg: TrainConfig) -> dict:
    """Create ``cascade.json``, or check that this stage's data agrees with the stages already there."""
    card_path = out / CASCADE_FILE
    classes = depth_class_cards(ds.n_planes, ds.n_classes, cfg.z_step_um)
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
        "description": f"depth cascade trained on {len(ds.files)} stack(s)",
        "depth_classes": classes,
        "n_planes": ds.n_planes,
        "z_step_um": cfg.z_step_um,
        "normalisation": norm,
        "intensity": "outputs are normalised intensities in [0, 1] (percentile low -> 0, high -> 1)",
        "training_data": {"files": [Path(f).name for f in ds.files], "credit": cfg.data_credit,
                          "licence": cfg.data_licence},
        "plugin_version": __version__,
    }
    from .io import write_json

    write_json(card_path, card)
    return card


def _batch(ds: DepthDataset, idx: torch.Tensor, cfg: TrainConfig, g: torch.Generator):
    res, lres = STAGES[cfg.stage]
    offsets = torch.rand(len(idx), generator=g)
    hr, lr = [], []
    for j, i in enumerate(idx.tolist()):
        spec, z = int(ds.specimen[i]), i % ds.n_planes
        sq = square(ds.raw[spec][z], float(offsets[j]) if cfg.augment else None)[None, None]
        hr.append(resize(sq, res)[0])
        if lres:
            lr.append(resize(resize(sq, lres), res)[0])
    x = torch.stack(hr)
    cond = torch.stack(lr) if lres else None
    if cfg.augment:
        both = x if cond is None else torch.cat([x, cond], dim=1)
        both = augment(both, g)
        x, cond = (both, None) if cond is None else (both[:, :1], both[:, 1:])
    if cond is not None:
        crop = cfg.crop or DEFAULT_CROP[cfg.stage]
        x, cond = random_crop_pair(x, cond, crop, g)
    return x, cond


@torch.no_grad()
def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    e = list(ema.parameters())
    m = list(model.parameters())
    torch._foreach_lerp_(e, m, 1.0 - decay)


def _atomic_torch_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _export(out: Path, ema, cfg: TrainConfig, step: int, losses: list[float], ds: DepthDataset,
            seconds: float, world: int) -> None:
    res, lres = STAGES[cfg.stage]
    info = {
        "stage": cfg.stage,
        "resolution": res,
        "input_resolution": lres,
        "schedule": {**DEFAULT_SCHEDULE, "prediction_type": "v_prediction" if cfg.loss == "v" else "epsilon"},
        "default_noise_aug": 0.1 if lres else None,
        "training": {
            **asdict(cfg),
            "steps_done": step,
            "final_loss_ema": losses[-1] if losses else None,
            "images": len(ds),
            "specimens": len(ds.files),
            "train_seconds": round(seconds, 1),
            "world_size": world,
            "torch": torch.__version__,
        },
        "plugin_version": __version__,
    }
    save_unet(ema, out / cfg.stage, info)


def train_stage(data, out: str | Path, cfg: TrainConfig, *, device: str = "auto", resume: bool = False,
                show_progress: bool = True, callback: ProgressCallback | None = None) -> dict:
    """Train (or resume) one cascade stage on the stacks in ``data`` and export it into ``out``.

    Returns a summary: steps done, last loss, seconds, and where the model was written.
    """
    cfg.validate()
    out = Path(out)
    dev = resolve_device(device)
    di = init_distributed(dev)
    if dev.type == "cuda" and di.world > 1:
        dev = torch.device("cuda", di.local_rank)
        torch.cuda.set_device(dev)
    try:
        return _train(data, out, cfg, dev, di, resume, show_progress, callback)
    finally:
        if di.initialised_here:
            dist.destroy_process_group()


def _train(data, out: Path, cfg: TrainConfig, dev: torch.device, di: DistInfo, resume: bool,
           show_progress: bool, callback) -> dict:
    norm = Normalisation(cfg.norm_low, cfg.norm_high)
    ds = DepthDataset.from_paths(data, depth_classes=cfg.depth_classes, norm=norm)
    res, lres = STAGES[cfg.stage]
    state_dir = out / "training" / cfg.stage
    state_path = state_dir / "state.pt"
    log_path = state_dir / "log.jsonl"
    if di.main:
        try:
            state_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserInputError(
                f"cannot create the model folder '{out}': {e.strerror}. Choose another --out.") from None
        _update_cascade_card(out, ds, cfg)
        if state_path.exists() and not resume:
            raise UserInputError(
                f"'{state_path}' exists: pass --resume to continue that run, or choose another --out."
            )
    if di.world > 1:
        dist.barrier()

    schedule = dict(DEFAULT_SCHEDULE, prediction_type="v_prediction" if cfg.loss == "v" else "epsilon")
    noise_sched = make_scheduler("ddpm", schedule)
    alphas = noise_sched.alphas_cumprod
    start = 0
    losses: list[float] = []
    elapsed = 0.0
    saved = None
    if resume and state_path.exists():
        saved = torch.load(state_path, map_location="cpu", weights_only=True)
        model_cfg = json.loads(saved["model_config"])
        from .models import ZfUNet

        model = ZfUNet.from_config(model_cfg)
        model.load_state_dict(saved["model"])
        start = int(saved["step"])
        losses = [float(v) for v in saved["losses"].tolist()]
        elapsed = float(saved["elapsed"])
    else:
        if resume and di.main:
            print(f"no state to resume in {state_dir}: starting from scratch")
        torch.manual_seed(cfg.seed)  # the same initial weights with or without --resume
        model = build_model("base" if cfg.stage == "base" else "sr", cfg.size, resolution=res,
                            num_classes=ds.n_classes)
    if model.config.num_classes != ds.n_classes:
        raise UserInputError("the saved training state has a different number of depth classes than this data.")
    model.to(dev).train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    if saved is not None:
        ema.load_state_dict(saved["ema"])
        opt.load_state_dict(saved["optimizer"])
    net = model
    if di.world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[dev.index] if dev.type == "cuda" else None)
    shard = ds.shard(di.rank, di.world)
    amp = dev.type == "cuda"
    bar = None
    if show_progress and di.main:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, initial=start, desc=f"train {cfg.stage}", unit="step", dynamic_ncols=True)
    t0 = time.perf_counter()
    run_losses: list[float] = []
    ema_loss = losses[-1] if losses else None

    def checkpoint(step: int) -> None:
        if not di.main:
            return
        secs = elapsed + time.perf_counter() - t0
        _atomic_torch_save({
            "model": model.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(),
            "step": torch.tensor(step), "losses": torch.tensor(losses, dtype=torch.float64),
            "elapsed": torch.tensor(secs), "model_config": json.dumps(dict(model.config)),
        }, state_path)
        _export(out, ema, cfg, step, losses, ds, secs, di.world)

    step = start
    for step in range(start + 1, cfg.steps + 1):
        g = step_generator(cfg.seed, di.rank, step)
        idx = shard[torch.randint(0, len(shard), (cfg.batch_size,), generator=g)]
        x0, lowres = _batch(ds, idx, cfg, g)
        labels = ds.classes[idx].clone()
        drop = torch.rand(len(idx), generator=g) < cfg.p_uncond
        labels[drop] = ds.n_classes
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (len(idx),), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        xt = noise_sched.add_noise(x0, noise, t)
        kwargs = {"class_labels": labels.to(dev)}
        if lowres is not None:
            level = torch.rand(len(idx), generator=g) * cfg.noise_aug_max
            a = alphas[(level * (len(alphas) - 1)).round().long()].view(-1, 1, 1, 1)
            lowres = a.sqrt() * lowres + (1 - a).sqrt() * torch.randn(lowres.shape, generator=g)
            kwargs.update(cond=lowres.to(dev), noise_level=level.to(dev))
        target = noise_sched.get_velocity(x0, noise, t) if cfg.loss == "v" else noise
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            pred = net(xt.to(dev), t.to(dev), **kwargs)
        pred = pred.float()
        target = target.to(dev)
        loss = F.l1_loss(pred, target) if cfg.loss == "l1" else F.mse_loss(pred, target)
        if not torch.isfinite(loss):
            raise RuntimeError(f"the loss became {loss.item()} at step {step}: lower --lr and --resume.")
        for group in opt.param_groups:
            group["lr"] = cfg.lr * min(1.0, step / max(cfg.warmup, 1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        _ema_update(ema, model, min(cfg.ema_decay, (1 + step) / (10 + step)))
        lv = float(loss.detach())
        run_losses.append(lv)
        ema_loss = lv if ema_loss is None else 0.98 * ema_loss + 0.02 * lv
        if step % cfg.log_every == 0 or step == cfg.steps:
            losses.append(ema_loss)
            if di.main:
                rec = {"step": step, "loss": sum(run_losses) / len(run_losses), "loss_smooth": ema_loss,
                       "lr": opt.param_groups[0]["lr"], "seconds": round(elapsed + time.perf_counter() - t0, 2)}
                with open(log_path, "a") as f:
                    f.write(json.dumps(rec) + "\n")
            run_losses = []
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{ema_loss:.4f}")
        if callback is not None:
            callback(Progress(f"train {cfg.stage}", step, cfg.steps))
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            checkpoint(step)
    if start >= cfg.steps and di.main:
        checkpoint(start)
    if bar is not None:
        bar.close()
    if di.world > 1:
        dist.barrier()
    return {
        "stage": cfg.stage,
        "steps": max(step, start),
        "loss": ema_loss if ema_loss is not None else math.nan,
        "seconds": round(elapsed + time.perf_counter() - t0, 1),
        "model": str(out / cfg.stage),
        "rank": di.rank,
        "world": di.world,
    }


__all__ = ["TrainConfig", "train_stage", "STAGES", "STAGE_FILE"]
