"""The one training loop behind every ``zfdiffusion train ...`` command (cascade stages, autoencoder,
latent diffusion): optimiser with warm-up, gradient clipping, EMA, logging, progress, atomic
checkpoints, exact resume, and DistributedDataParallel under ``torchrun``.

What differs between models is passed in: a ``loss_fn(net, step, generator)`` that draws its batch
from the generator and returns the loss, and an ``export(ema, step, losses, seconds, world)`` that
writes the model folder. Every random draw of step ``k`` on rank ``r`` comes from a generator seeded
with (seed, r, k), so a resumed run continues exactly as an uninterrupted one would.

The training state (``state.pt``) holds tensors and a JSON string only and is loaded with
``weights_only=True``: it is never unpickled.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from ..errors import UserInputError
from ..io import atomic_write, current_umask, fsync_dir, fsync_file, lock_folder, refused, temp_path, writing
from ..progress import Progress, ProgressCallback
from ..provenance import made_by


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


def setup(device: torch.device) -> tuple[torch.device, DistInfo]:
    """The process group (under torchrun) and this rank's device."""
    di = init_distributed(device)
    if device.type == "cuda" and di.world > 1:
        device = torch.device("cuda", di.local_rank)
        torch.cuda.set_device(device)
    return device, di


def teardown(di: DistInfo) -> None:
    if di.initialised_here:
        dist.destroy_process_group()


def launch(fn, device, *args):
    """``fn(dev, di, *args)`` inside the process group (under torchrun) on this rank's device."""
    from ..device import resolve_device

    dev, di = setup(resolve_device(device))
    try:
        return fn(dev, di, *args)
    finally:
        while _HELD_LOCKS:
            _HELD_LOCKS.pop().release()
        teardown(di)


def gather_dict(d: dict, di: DistInfo) -> dict:
    """``d`` merged over every torchrun rank (each rank's share of something, e.g. the normalisation
    statistics of the files it read); ``d`` itself in a single process."""
    if di.world <= 1:
        return dict(d)
    parts: list = [None] * di.world
    dist.all_gather_object(parts, d)
    return {k: v for part in parts for k, v in part.items()}


def step_generator(seed: int, rank: int, step: int) -> torch.Generator:
    return torch.Generator("cpu").manual_seed((seed * 1_000_003 + rank * 7_919 + step) % (2**63 - 1))


@dataclass
class TrainOptions:
    """The options every training command shares (each command's config adds its own and may
    change these defaults)."""

    steps: int = 20000
    batch_size: int = 16
    lr: float = 2e-4
    warmup: int = 200
    ema_decay: float = 0.999
    checkpoint_every: int = 500
    log_every: int = 50
    seed: int = 0
    # stop (with a checkpoint and the exported model) once training has run this long in all, counting
    # earlier runs of a resumed one; None: run to ``steps``
    max_minutes: float | None = None
    data_credit: str = ""
    data_licence: str = ""
    channel: int | None = None  # the channel of multichannel training images (see core.reader)
    axes: str | None = None  # what the images' dimensions are, for files that do not say (e.g. "TZYX")

    def loop_config(self, desc: str) -> LoopConfig:
        return LoopConfig(steps=self.steps, lr=self.lr, warmup=self.warmup, ema_decay=self.ema_decay,
                          checkpoint_every=self.checkpoint_every, log_every=self.log_every, seed=self.seed,
                          desc=desc, max_seconds=None if self.max_minutes is None else 60.0 * self.max_minutes)

    def check_common(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise UserInputError("--steps and --batch-size must be at least 1.")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise UserInputError(f"--max-minutes must be above 0, got {self.max_minutes:g}.")


def training_info(cfg, step: int, losses: list[float], seconds: float, world: int, **extra) -> dict:
    """What a saved network records about its training: the command's options, steps done, time,
    last smoothed loss, processes and versions (``stage.json``'s ``training``, beside the plugin version)."""
    return {"training": {**asdict(cfg), "steps_done": step, **extra, "final_loss_ema": losses[-1] if losses else None,
                         "train_seconds": round(seconds, 1), "world_size": world, "torch": torch.__version__},
            **made_by()}


@dataclass
class LoopConfig:
    steps: int
    lr: float
    warmup: int
    ema_decay: float
    checkpoint_every: int
    log_every: int
    seed: int
    desc: str = "train"
    max_seconds: float | None = None  # training time (all runs of a resumed one) after which to stop


_HELD_LOCKS: list = []  # the output folders this process trains into (released by launch())


def prepare_state_dir(state_dir: Path, out: Path, resume: bool, di: DistInfo) -> Path:
    """Create the state folder (rank 0), take its lock (one training run per folder) and refuse to
    overwrite a run that was not asked to resume."""
    state_path = state_dir / "state.pt"
    if di.main:
        try:
            state_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserInputError(
                f"cannot create the model folder '{out}': {e.strerror}. Choose another --out.") from None
        _HELD_LOCKS.append(lock_folder(state_dir, "training run"))
        if state_path.exists() and not resume:
            raise UserInputError(
                f"'{state_path}' exists: pass --resume to continue that run, or choose another --out.")
    return state_path


def load_state(state_path: Path, resume: bool, di: DistInfo) -> dict | None:
    """The saved training state, or None (with a notice) when there is nothing to resume."""
    if not (resume and state_path.exists()):
        if resume and di.main:
            print(f"no state to resume in {state_path.parent}: starting from scratch")
        return None
    try:
        return torch.load(state_path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure to read it means a corrupted file
        raise UserInputError(
            f"the training state '{state_path}' could not be read ({type(e).__name__}): it is corrupted. "
            "Delete it to start again, or restore a copy."
        ) from None


def model_config(saved: dict) -> dict:
    return json.loads(saved["model_config"])


def _expected_last_step(step: int, start: int, run_seconds: float, elapsed: float, cfg: LoopConfig) -> int:
    """The step at which a run with a time limit will stop, at this run's pace so far (at most ``cfg.steps``)."""
    rate = run_seconds / (step - start)
    left = max(cfg.max_seconds - elapsed - run_seconds, 0.0)
    return int(min(cfg.steps, step + max(1, round(left / rate))))


def _out_of_time(seconds: float, limit: float, step: int, every: int, di: DistInfo) -> bool:
    """Whether training has used its time. Under torchrun every process must stop at the same step: they
    decide together (on rank 0's clock) every ``every`` steps; alone, at every step."""
    if di.world == 1:
        return seconds >= limit
    if step % every:
        return False
    flag = torch.tensor([float(seconds >= limit)], device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.broadcast(flag, src=0)
    return bool(flag.item())


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1.0 - decay)
    for b_ema, b in zip(ema.buffers(), model.buffers()):  # batch-norm statistics, averaged like the weights
        if b.is_floating_point():
            b_ema.lerp_(b, 1.0 - decay)
        else:
            b_ema.copy_(b)


def atomic_torch_save(obj, path: Path) -> None:
    """Save the training state under a temporary name, push it to the disk and rename it into place:
    a kill or a full disk leaves the previous checkpoint, never a truncated one."""
    tmp = temp_path(path)
    try:
        torch.save(obj, tmp)
        os.chmod(tmp, 0o666 & ~current_umask())  # the umask's permissions, as every output
        fsync_file(tmp)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except Exception as e:  # noqa: BLE001 - torch.save says a full disk with a RuntimeError
        tmp.unlink(missing_ok=True)
        raise refused(e, path, _state_bytes(obj)) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _state_bytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_state_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_state_bytes(v) for v in obj)
    return 0


def append_log(path: Path, record: dict) -> None:
    """One line of the training log (JSON lines)."""
    with writing(path), open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def trim_log(path: Path, step: int, keep_last_validation: bool = True) -> None:
    """On resume, keep the log's records up to ``step`` (the checkpoint resumed from): the lines a
    killed run wrote after its last checkpoint are written again, and a line cut by the kill goes."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if not isinstance(rec, dict) or int(rec.get("step", 0)) > step:
            continue
        if not keep_last_validation and "validation" in rec and int(rec["step"]) == step:
            continue
        kept.append(line + "\n")
    atomic_write(path, lambda tmp: tmp.write_text("".join(kept)))


def run(
    model: torch.nn.Module,
    *,
    loss_fn: Callable[[torch.nn.Module, int, torch.Generator], torch.Tensor],
    export: Callable[[torch.nn.Module, int, list[float], float, int], None],
    cfg: LoopConfig,
    dev: torch.device,
    di: DistInfo,
    state_path: Path,
    saved: dict | None,
    show_progress: bool = True,
    callback: ProgressCallback | None = None,
    validate: Callable[[torch.nn.Module, int], dict] | None = None,
    after_step: Callable[[int, torch.Generator], None] | None = None,
    extra_state: tuple[Callable[[], dict], Callable[[dict], None]] | None = None,
) -> dict:
    """Train ``model`` (already built, or rebuilt from ``saved``) for ``cfg.steps`` steps in total.

    ``validate(ema, step)`` (optional) runs at every checkpoint on rank 0, before ``export``; its dict
    goes in the log. ``after_step(step, generator)`` (optional) runs after each optimiser step (e.g. a
    discriminator's own update), and ``extra_state = (get, set)`` saves and restores what it trains
    (a dict of state dicts, tensors and numbers only) with the checkpoint.
    Returns a summary: steps, last smoothed loss, seconds, rank and world size.
    """
    log_path = state_path.parent / "log.jsonl"
    start, losses, elapsed = 0, [], 0.0
    if saved is not None:
        model.load_state_dict(saved["model"])
        start = int(saved["step"])
        losses = [float(v) for v in saved["losses"].tolist()]
        elapsed = float(saved["elapsed"])
        if extra_state is not None and "extra" in saved:
            extra_state[1](saved["extra"])
        if di.main:  # a finished run asked again checkpoints (and validates) its last step again
            trim_log(log_path, start, keep_last_validation=start < cfg.steps)
    elif di.main:
        log_path.unlink(missing_ok=True)  # a run killed before its first checkpoint: start the log again
    model.to(dev).train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    if saved is not None:
        ema.load_state_dict(saved["ema"])
        opt.load_state_dict(saved["optimizer"])
    net = model
    if di.world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[dev.index] if dev.type == "cuda" else None)
    bar = None
    if show_progress and di.main:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, initial=start, desc=cfg.desc, unit="step", dynamic_ncols=True)
    t0 = time.perf_counter()
    run_losses: list[float] = []  # the losses since the last log line (saved too, for an exact resume)
    if saved is not None and "run_losses" in saved:
        run_losses = [float(v) for v in saved["run_losses"].tolist()]
    ema_loss = losses[-1] if losses else None
    if saved is not None and "loss_smooth" in saved:  # states from before it was saved: the last logged value
        ema_loss = float(saved["loss_smooth"]) if torch.isfinite(saved["loss_smooth"]) else None

    def checkpoint(step: int) -> None:
        if not di.main:
            return
        secs = elapsed + time.perf_counter() - t0
        if validate is not None:  # before export, so the exported card can carry the figures
            append_log(log_path, {"step": step, "validation": validate(ema, step)})
        export(ema, step, losses, secs, di.world)
        # The state last: a checkpoint is complete once it is saved, and a run killed before that
        # resumes from the previous one and makes the same validation and export again.
        atomic_torch_save({
            "model": model.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(),
            "step": torch.tensor(step), "losses": torch.tensor(losses, dtype=torch.float64),
            "loss_smooth": torch.tensor(float("nan") if ema_loss is None else ema_loss, dtype=torch.float64),
            "run_losses": torch.tensor(run_losses, dtype=torch.float64),
            **({"extra": extra_state[0]()} if extra_state is not None else {}),
            "elapsed": torch.tensor(secs), "model_config": json.dumps(
                {k: v for k, v in model.config.items() if not k.startswith("_")}, default=list),  # no bookkeeping
        }, state_path)

    if cfg.max_seconds is not None and start < cfg.steps and elapsed >= cfg.max_seconds:
        raise UserInputError(f"this run has trained {elapsed / 60:.1f} minutes already (step {start}), as long as "
                             f"--max-minutes {cfg.max_seconds / 60:g} allows: raise --max-minutes to go on.")
    step = start
    total = cfg.steps  # the step it will end at: with a time limit, re-estimated as it goes (progress, time left)
    for step in range(start + 1, cfg.steps + 1):
        g = step_generator(cfg.seed, di.rank, step)
        loss = loss_fn(net, step, g)
        if not torch.isfinite(loss):
            raise RuntimeError(f"the loss became {loss.item()} at step {step}: lower --lr and --resume.")
        for group in opt.param_groups:
            group["lr"] = cfg.lr * min(1.0, step / max(cfg.warmup, 1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema_update(ema, model, min(cfg.ema_decay, (1 + step) / (10 + step)))
        if after_step is not None:
            after_step(step, g)
        lv = float(loss.detach())
        run_losses.append(lv)
        ema_loss = lv if ema_loss is None else 0.98 * ema_loss + 0.02 * lv
        if step % cfg.log_every == 0 or step == cfg.steps:
            losses.append(ema_loss)
            if di.main:
                rec = {"step": step, "loss": sum(run_losses) / len(run_losses), "loss_smooth": ema_loss,
                       "lr": opt.param_groups[0]["lr"], "seconds": round(elapsed + time.perf_counter() - t0, 2)}
                append_log(log_path, rec)
            run_losses = []
        if cfg.max_seconds is not None and step - start >= 5:
            total = _expected_last_step(step, start, time.perf_counter() - t0, elapsed, cfg)
        if bar is not None:
            if bar.total != total:
                bar.total = total
            bar.update(1)
            bar.set_postfix(loss=f"{ema_loss:.4f}")
        if callback is not None:
            callback(Progress(cfg.desc, step, total))
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            checkpoint(step)
        elif cfg.max_seconds is not None and _out_of_time(elapsed + time.perf_counter() - t0, cfg.max_seconds,
                                                          step, cfg.log_every, di):
            checkpoint(step)  # the time is up: this step is the run's last
            if di.main:
                print(f"{cfg.desc}: stopped at step {step} of {cfg.steps}, after --max-minutes "
                      f"{cfg.max_seconds / 60:g} of training (continue with --resume and a larger --max-minutes)")
            break
    if start >= cfg.steps and di.main:
        checkpoint(start)
    if bar is not None:
        bar.close()
    if di.world > 1:
        dist.barrier()
    return {
        "steps": max(step, start),
        "loss": ema_loss if ema_loss is not None else math.nan,
        "seconds": round(elapsed + time.perf_counter() - t0, 1),
        "rank": di.rank,
        "world": di.world,
    }
