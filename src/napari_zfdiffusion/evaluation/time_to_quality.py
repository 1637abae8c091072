"""Time to quality of the depth cascade's base stage on your own multi-depth stacks.

    python -m napari_zfdiffusion.evaluation.time_to_quality --data my_stacks/ --out ttq/my_small \\
        --depth-classes 6 --minutes 60 --every 10
    python -m napari_zfdiffusion.evaluation.time_to_quality --plot ttq/* --to docs/images/time_to_quality.png

It trains the base stage (64x64) the way a user does, ``zfdiffusion train cascade --stage base``, in
increments (``--steps S --resume``, exact: the same weights as one run of S steps), and after each
increment, while training is stopped, measures the exported model:

* **depth accuracy**: a small CNN (``evaluation/cascade.py``'s DepthNet) trained on real planes names
  the depth class of generated 64x64 planes (``--n-per-class`` per class, guidance ``--guidance``),
  against its accuracy on held-out real planes ("real held-out accuracy"); the ratio of the two is
  the quality figure (1 = generated planes show their depth as clearly as real ones);
* **nearest-neighbour distance**: the median RMS distance of generated planes to their nearest view
  (any crop offset, flip or rotation) of the training planes, over the same for held-out real planes
  (1 = as far from the training set as unseen real planes; far above 1 = not like real planes).

The x axis is *training* minutes: the ``train_seconds`` the stage records (the optimiser's loop,
checkpoints included; not the start-up, nor this tool's evaluations). Increments are sized from the
measured seconds per step so that a checkpoint lands about every ``--every`` minutes up to
``--minutes``.

Held-out real data, never shown to the diffusion model (nor to the classifier's training):

* ``--holdout xy`` (default): the bottom-right quarter (quadrant) of every plane of every stack. The
  other three quadrants are written as three training stacks into ``OUT/train_data`` (OME-TIFF, with
  the pixel sizes and z-step), so that the model's views and the held-out views show fields of the
  same size at the same pixel size (the base stage cuts each plane to a square and resizes it to 64).
* ``--holdout time``: the last fifth of the specimens (the time points of a (T, Z, Y, X) file, or the
  stacks in file-name order), each written as one (Z, Y, X) stack.

The classifier trains on 64x64 views of the training stacks made as the base stage makes them (the
plane resized to a short side of 64, a square cut at several offsets), is selected on the last fifth
of the training stacks, and is tested on the held-out stacks.

Writes ``OUT/time_to_quality.json`` (settings, machine, threads, one record per checkpoint) and
``OUT/time_to_quality.png`` after every checkpoint, so a killed run keeps what it measured (continue
it with ``--resume``). ``--plot OUT1 OUT2 ... --to FILE.png`` draws finished runs together. Needs the
``eval`` extra (matplotlib).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ..core.cascade.data import DepthDataset, read_stacks
from ..core.choices import CASCADE_PRESETS
from ..core.errors import UserInputError
from ..core.images import Normalisation, square
from ..core.io import atomic_write, list_images
from ..core.metrics import nearest_neighbour_rms_dihedral
from ._common import PROG, command, git_commit, log, plt, rounded, run, save_figure, set_threads, shown_path
from .cascade import (
    CLASSIFIER_ARCHITECTURE,
    all_dihedral,
    confusion,
    fit_depth_classifier,
    per_class_acc,
    predict,
)

RES = 64  # the base stage's resolution
RESULT = "time_to_quality.json"
FIGURE = "time_to_quality.png"
TARGET = 0.8  # the target: generated accuracy >= 80% of the real held-out accuracy
CLF_OFFSETS = np.linspace(0, 1, 17)  # square offsets of the classifier's training views
REF_OFFSETS = np.linspace(0, 1, 11)  # ... of the nearest-neighbour reference (times 8 flips/rotations)
TEST_OFFSETS = (0.0, 0.5, 1.0)  # ... of validation and held-out views
QUADRANTS = ("tl", "tr", "bl", "br")  # top-left, top-right, bottom-left (training), bottom-right (held out)


# ------------------------------------------------------------------------------------ the split
def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_") or "stack"


def _write_stack(path: Path, arr: np.ndarray, px: dict) -> None:
    """A (Z, Y, X) OME-TIFF with the pixel sizes and z-step that are known (the reader reads them back)."""
    import tifffile

    meta = {"axes": "ZYX"}
    for axis in "ZYX":
        if px.get(axis):
            meta[f"PhysicalSize{axis}"] = float(px[axis])
            meta[f"PhysicalSize{axis}Unit"] = "µm"
    atomic_write(path, lambda tmp: tifffile.imwrite(tmp, np.ascontiguousarray(arr), ome=True, metadata=meta),
                 arr.nbytes)


def read_inputs(data, *, channel=None, axes=None, z_step_um=None, depth_classes=None) -> list[dict]:
    """Every specimen of the inputs as {name, file, lazy, px}, checked: at least 2 planes (depth needs
    several), at least ``depth_classes`` planes, and the same planes in all unless depth is binned."""
    specimens = []
    for f in list_images(data):
        stacks, px = read_stacks(f, channel, axes)
        px = dict(px)
        if not px.get("Z") and z_step_um:
            px["Z"] = float(z_step_um)
        for name, lazy in stacks:
            if lazy.shape[0] < 2:
                raise UserInputError(f"{name} has {lazy.shape[0]} plane: depth classes need a (Z, Y, X) stack "
                                     "of at least 2 planes.")
            if depth_classes is not None and lazy.shape[0] < depth_classes:
                raise UserInputError(f"{name} has {lazy.shape[0]} planes, fewer than --depth-classes "
                                     f"{depth_classes}: use at most {lazy.shape[0]} depth classes.")
            specimens.append({"name": name, "file": str(f), "lazy": lazy, "px": px})
    if depth_classes is not None and depth_classes < 2:
        raise UserInputError(f"--depth-classes must be at least 2 (depth is what is measured), got {depth_classes}.")
    return specimens


def split_holdout(specimens: list[dict], out: Path, holdout: str = "xy") -> dict:
    """Write the training copy into ``out/train_data`` and the held-out part into ``out/heldout_data``
    (see the module docstring); returns what was done. Old copies there are replaced."""
    train_dir, held_dir = out / "train_data", out / "heldout_data"
    for d in (train_dir, held_dir):
        d.mkdir(parents=True, exist_ok=True)
        for old in d.glob("*.tif"):
            old.unlink()
    n = len(specimens)
    if holdout == "time":
        if n < 2:
            raise UserInputError(f"--holdout time needs at least 2 specimens (time points or stacks), the inputs "
                                 f"hold {n}: use --holdout xy, or give a (T, Z, Y, X) file (--axes TZYX).")
        n_held = max(1, round(n / 5))
        held = set(range(n - n_held, n))
        for i, s in enumerate(specimens):
            arr = np.asarray(s["lazy"][:])
            s["lazy"].release()
            folder = held_dir if i in held else train_dir
            _write_stack(folder / f"{i:04d}_{_safe(s['name'])}.ome.tif", arr, s["px"])
        return {"holdout": "time", "description": f"the last {n_held} of {n} specimens (time points or stacks "
                                                   "in file order) held out",
                "train_specimens": [s["name"] for i, s in enumerate(specimens) if i not in held],
                "heldout_specimens": [s["name"] for i, s in enumerate(specimens) if i in held],
                "train_dir": str(train_dir), "heldout_dir": str(held_dir)}
    if holdout != "xy":
        raise UserInputError(f"unknown --holdout '{holdout}': choose xy or time.")
    shapes = []
    for i, s in enumerate(specimens):
        z, h, w = s["lazy"].shape
        h2, w2 = h // 2, w // 2
        if min(h2, w2) < 16:
            raise UserInputError(f"{s['name']}: planes of {h}x{w} pixels are too small to hold out a quarter "
                                 "(each quarter needs at least 16x16): use --holdout time.")
        arr = np.asarray(s["lazy"][:])
        s["lazy"].release()
        tiles = {"tl": arr[:, :h2, :w2], "tr": arr[:, :h2, w2:2 * w2], "bl": arr[:, h2:2 * h2, :w2],
                 "br": arr[:, h2:2 * h2, w2:2 * w2]}
        for q, tile in tiles.items():
            folder = held_dir if q == "br" else train_dir
            _write_stack(folder / f"{i:04d}_{_safe(s['name'])}_{q}.ome.tif", tile, s["px"])
        shapes.append((h, w, h2, w2))
    return {"holdout": "xy", "description": "the bottom-right quarter (quadrant) of every plane held out; the "
                                            "other three quadrants are three training stacks each",
            "plane_shapes": sorted({f"{h}x{w}" for h, w, _, _ in shapes}),
            "quadrant_shapes": sorted({f"{h2}x{w2}" for _, _, h2, w2 in shapes}),
            "train_specimens": [f"{s['name']}:{q}" for s in specimens for q in QUADRANTS[:3]],
            "heldout_specimens": [f"{s['name']}:br" for s in specimens],
            "train_dir": str(train_dir), "heldout_dir": str(held_dir)}


# ----------------------------------------------------------------------------------- real views
def load_split(folder: Path, a) -> DepthDataset:
    """The stacks of ``folder`` read as ``train cascade`` reads them, with the base stage's 64 px cache."""
    return DepthDataset.from_paths(folder, depth_classes=a.depth_classes, norm=Normalisation(), cache_res=RES,
                                   depth_bin_um=a.depth_bin_um, z_step_um=a.z_step_um)


def plane_views(ds: DepthDataset, specs, offsets) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 64, 64) views of every plane of the specimens ``specs``, made as the base stage makes its
    training images (the plane at a short side of 64, a square cut at each offset; offsets that give
    the same square are taken once), and their depth classes."""
    cls = {(int(s), int(z)): int(c) for s, z, c in zip(ds.specimen, ds.zindex, ds.classes)}
    xs, ys = [], []
    for spec in specs:
        planes = ds.small[spec]
        h, w = planes.shape[-2:]
        side = min(h, w)
        seen, offs = set(), []
        for off in offsets:
            key = (round((h - side) * off), round((w - side) * off))
            if key not in seen:
                seen.add(key)
                offs.append(float(off))
        for z in range(len(planes)):
            for off in offs:
                xs.append(square(planes[z], off))
                ys.append(cls[(spec, z)])
    return torch.stack(xs), torch.tensor(ys)


def nn_rms(queries: torch.Tensor, reference: torch.Tensor) -> np.ndarray:
    """Each (64, 64) query's RMS distance ([-1, 1] scale) to its nearest reference view, over the 8
    flips/rotations of the query (the same as comparing with every flip/rotation of the references)."""
    return nearest_neighbour_rms_dihedral(queries.numpy(), reference.numpy())[0]


class RealViews:
    """The real side of the measurement: the classifier, its held-out accuracy, and the
    nearest-neighbour distances of held-out real planes to the training planes."""

    def __init__(self, train: DepthDataset, held: DepthDataset, *, clf_iters: int, seed: int):
        if train.n_classes != held.n_classes:
            raise UserInputError(f"the held-out stacks give {held.n_classes} depth classes and the training stacks "
                                 f"{train.n_classes}: use --depth-classes or --depth-bin-um so that both hold "
                                 "every class.")
        self.n_classes = nd = train.n_classes
        n = len(train.stacks)
        n_val = max(1, round(n / 5))
        if n < 2:
            raise UserInputError("the classifier needs at least 2 training stacks (one to select it on).")
        self.clf_train, self.clf_val = list(range(n - n_val)), list(range(n - n_val, n))
        xtr, ytr = plane_views(train, self.clf_train, CLF_OFFSETS)
        xva, yva = plane_views(train, self.clf_val, TEST_OFFSETS)
        missing = sorted(set(range(nd)) - set(ytr.tolist()))
        if missing:
            raise UserInputError(f"depth classes {missing} have no training plane for the classifier.")
        t0 = time.perf_counter()
        self.clf, fit = fit_depth_classifier(xtr, ytr, all_dihedral(xva), yva.repeat(8), nd, iters=clf_iters,
                                             seed=seed)
        self.clf_info = {"architecture": CLASSIFIER_ARCHITECTURE,
                         "train_stacks": len(self.clf_train), "val_stacks": len(self.clf_val),
                         "train_views": f"{len(xtr)} (square offsets per plane: up to {len(CLF_OFFSETS)}, "
                                        "duplicates dropped) x random flip/rot90 per batch",
                         "val_views": f"{len(xva)} x 8 flips/rotations", **fit}
        self.clf_info.pop("history")
        # held-out accuracy: every held-out plane, 3 offsets x 8 flips/rotations
        xho, yho = plane_views(held, range(len(held.stacks)), TEST_OFFSETS)
        pred, _ = predict(self.clf, all_dihedral(xho))
        m = confusion(yho.repeat(8).numpy(), pred, nd)
        per = per_class_acc(m)
        self.real = {"accuracy": float(np.nanmean(per)), "per_depth": per,
                     "accuracy_all_views": float(np.trace(m) / m.sum()),
                     "n_planes": int(sum(len(s) for s in held.stacks)), "n_views": int(m.sum()),
                     "confusion": m.tolist(), "classifier_seconds": round(time.perf_counter() - t0, 1)}
        # nearest-neighbour reference: every training plane (the diffusion model saw them all)
        t0 = time.perf_counter()
        self.ref, self.ref_y = plane_views(train, range(n), REF_OFFSETS)
        d = nn_rms(xho, self.ref)
        self.real_nn = d
        self.real["nn_median"] = float(np.median(d))
        self.real["nn_median_per_depth"] = [float(np.median(d[yho.numpy() == c])) if (yho == c).any() else None
                                            for c in range(nd)]
        self.real["nn_queries"] = int(len(d))
        self.real["nn_seconds"] = round(time.perf_counter() - t0, 1)
        self.nn_reference = (f"{len(self.ref)} views of the {n} training stacks' planes (square offsets: up to "
                             f"{len(REF_OFFSETS)}, duplicates dropped), compared over 8 flips/rotations; RMS per "
                             "pixel on the [-1, 1] scale")


# ---------------------------------------------------------------------------------- a checkpoint
def evaluate(model_dir: Path, real: RealViews, a) -> dict:
    """Generate ``a.n_per_class`` 64x64 planes per depth class with the base stage alone and measure them."""
    from ..core.cascade import Cascade

    t0 = time.perf_counter()
    cas = Cascade.load(model_dir, device=a.device)
    nd = real.n_classes
    if cas.n_classes != nd:
        raise UserInputError(f"the model has {cas.n_classes} depth classes, the real data {nd}.")
    gen, ys = [], []
    for d in range(nd):
        for s in range(0, a.n_per_class, a.gen_batch):
            k = min(a.gen_batch, a.n_per_class - s)
            r = cas.generate(d, guidance=a.guidance, resolution=RES, n=k, seed=a.seed + 1000 * d + s,
                             sampler=a.sampler, steps=a.sample_steps)
            gen.append(torch.from_numpy(r.images * 2 - 1))
            ys += [d] * k
    gen_t, y = torch.cat(gen), np.array(ys)
    gen_s = time.perf_counter() - t0
    pred, _ = predict(real.clf, gen_t)
    m = confusion(y, pred, nd)
    per = per_class_acc(m)
    acc = float(np.nanmean(per))
    d = nn_rms(gen_t, real.ref)
    nn = float(np.median(d))
    return {"accuracy": acc, "accuracy_ratio": acc / real.real["accuracy"] if real.real["accuracy"] else None,
            "accuracy_per_depth": per, "confusion": m.tolist(),
            "nn_median": nn, "nn_ratio": nn / real.real["nn_median"] if real.real["nn_median"] else None,
            "nn_median_per_depth": [float(np.median(d[y == c])) for c in range(nd)],
            "mean_intensity_per_depth": [float(((gen_t[y == c] + 1) / 2).mean()) for c in range(nd)],
            "generate_seconds": round(gen_s, 1), "eval_seconds": round(time.perf_counter() - t0, 1)}


# ------------------------------------------------------------------------------------- training
def train_command(a, steps: int) -> list[str]:
    """The ``zfdiffusion train cascade --stage base`` command that takes the run to ``steps`` steps."""
    cmd = [sys.executable, "-m", "napari_zfdiffusion.cli", "-q", "train", "cascade", "--stage", "base",
           "--data", str(a.out / "train_data"), "--out", str(a.out / "run"), "--steps", str(steps), "--resume",
           "--device", a.device]
    for opt in ("preset", "size", "lr", "batch_size", "depth_classes", "depth_bin_um", "warmup", "ema_decay"):
        v = getattr(a, opt, None)
        if v is not None:
            cmd += [f"--{opt.replace('_', '-')}", str(v)]
    if getattr(a, "preset", None) is not None:  # the steps end each increment, not the preset's time limit
        cmd += ["--max-minutes", "1e9"]
    return cmd + shlex.split(a.train_args)


def train_env(a) -> dict:
    env = dict(os.environ)
    if a.threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(a.threads)
    return env


def train_to(a, steps: int) -> dict:
    """Run the training command to ``steps`` steps; returns the exported stage's ``training`` record."""
    cmd = train_command(a, steps)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=train_env(a), capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
        raise UserInputError(f"training failed (exit {proc.returncode}): {shlex.join(cmd[1:])}\n" + "\n".join(tail))
    info = stage_training(a.out / "run")
    if info is None or int(info.get("steps_done", -1)) != steps:
        raise UserInputError(f"training to {steps} steps exported no checkpoint of that step in {a.out / 'run'}.")
    return {**info, "wall_seconds": round(wall, 1)}


def stage_training(run_dir: Path) -> dict | None:
    p = run_dir / "base" / "stage.json"
    if not p.is_file():
        return None
    return json.loads(p.read_text()).get("training")


def training_settings(info: dict) -> dict:
    """The stage's training record without what changes from one checkpoint to the next."""
    return {k: v for k, v in info.items()
            if k not in ("steps", "steps_done", "final_loss_ema", "train_seconds", "wall_seconds")}


def next_steps(steps: int, seconds: float, rate: float, a) -> int | None:
    """The step count of the next checkpoint: at the next multiple of ``--every`` minutes that is at
    least half an interval away (at most ``--minutes``), at ``rate`` seconds per step; None when done."""
    every, total = a.every * 60, a.minutes * 60
    if seconds >= total - 0.1 * every:
        return None
    target = min(total, math.ceil((seconds + 0.5 * every) / every) * every)
    n = steps + max(1, round((target - seconds) / rate))
    return min(n, a.max_steps) if a.max_steps else n


# ---------------------------------------------------------------------------------------- output
def machine() -> dict:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "usable_cpus": usable, "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__}


def run_label(r: dict) -> str:
    if r.get("label"):
        return r["label"]
    t = r.get("settings", {}).get("training", {})
    data = Path(r.get("data", {}).get("inputs", ["?"])[0]).name
    return f"{data}: {t.get('size')}, lr {t.get('lr'):g}, batch {t.get('batch_size')}" if t else data


def _num(v) -> float:
    return float("nan") if v is None else float(v)


def plot_runs(results: list[dict], to: Path) -> Path:
    """Accuracy ratio and nearest-neighbour ratio against training minutes, one line per run."""
    p = plt()
    fig, axes = p.subplots(1, 2, figsize=(11, 4.2))
    for r in results:
        cps = r.get("checkpoints", [])
        if not cps:
            continue
        mins = [c["minutes"] for c in cps]
        lab = f"{run_label(r)} (real acc {r['real_heldout']['accuracy']:.2f})"
        axes[0].plot(mins, [_num(c["accuracy_ratio"]) for c in cps], "o-", ms=3, label=lab)
        axes[1].plot(mins, [_num(c["nn_ratio"]) for c in cps], "o-", ms=3, label=run_label(r))
    axes[0].axhline(TARGET, color="k", ls="--", lw=0.8, label=f"target {TARGET:g}")
    axes[0].axhline(1.0, color="0.6", ls=":", lw=0.8)
    axes[1].axhline(1.0, color="0.6", ls=":", lw=0.8, label="held-out real planes")
    axes[0].set_ylabel("depth accuracy, generated / real held-out")
    axes[1].set_ylabel("NN distance to training, generated / held-out real")
    axes[0].set_title("Depth recognised in generated 64x64 planes", fontsize=10)
    axes[1].set_title("Distance to the nearest training plane (median)", fontsize=10)
    for ax in axes:
        ax.set_xlabel("training minutes (base stage)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylim(bottom=0)
    axes[1].set_ylim(bottom=0)
    fig.tight_layout()
    to = Path(to)
    to.parent.mkdir(parents=True, exist_ok=True)
    save_figure(fig, to, dpi=110)
    p.close(fig)
    return to


def write_result(a, result: dict) -> None:
    path = a.out / RESULT
    text = json.dumps(rounded(result), indent=2) + "\n"
    atomic_write(path, lambda tmp: tmp.write_text(text))
    plot_runs([result], a.out / FIGURE)


def summary(result: dict) -> dict:
    cps = result["checkpoints"]
    hit = next((c for c in cps if (c["accuracy_ratio"] or 0) >= TARGET), None)
    best = max(cps, key=lambda c: c["accuracy_ratio"] or 0) if cps else None
    return {"target_accuracy_ratio": TARGET,
            "first_minutes_at_target": hit["minutes"] if hit else None,
            "best_accuracy_ratio": best["accuracy_ratio"] if best else None,
            "best_at_minutes": best["minutes"] if best else None,
            "last": {k: cps[-1][k] for k in ("minutes", "steps", "accuracy_ratio", "nn_ratio")} if cps else None}


# ------------------------------------------------------------------------------------------ main
def evaluation_settings(a) -> dict:
    return {"n_per_class": a.n_per_class, "guidance": a.guidance, "sample_steps": a.sample_steps,
            "sampler": a.sampler, "seed": a.seed, "resolution": RES, "device": a.device, "clf_iters": a.clf_iters}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG + "time_to_quality", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", nargs="+", default=None,
                   help="folder(s) or files of (Z, Y, X) stacks, as for `train cascade --data`")
    p.add_argument("--out", type=Path, default=None,
                   help="run folder: train_data/, heldout_data/, run/ (the model), time_to_quality.{json,png}")
    p.add_argument("--label", default=None, help="name of this run in plots (default: data, size, lr, batch)")
    p.add_argument("--holdout", default="xy", choices=("xy", "time"),
                   help="xy: the bottom-right quarter of every plane; time: the last fifth of the specimens")
    p.add_argument("--channel", type=int, default=None, help="channel of multichannel files")
    p.add_argument("--axes", default=None, help="the files' axes when they do not say (e.g. TZYX)")
    p.add_argument("--z-step-um", type=float, default=None, help="z-step for files that carry none")
    # the settings measured (left out: train cascade's own defaults, as a new user gets them)
    t = p.add_argument_group("training settings (default: those of `zfdiffusion train cascade`)")
    t.add_argument("--preset", default=None, choices=tuple(CASCADE_PRESETS),
                   help="train cascade's preset (its time limit aside: this tool sets the length of training)")
    t.add_argument("--size", default=None, choices=("tiny", "small", "base"))
    t.add_argument("--lr", type=float, default=None)
    t.add_argument("--batch-size", type=int, default=None)
    t.add_argument("--depth-classes", type=int, default=None)
    t.add_argument("--depth-bin-um", type=float, default=None)
    t.add_argument("--warmup", type=int, default=None)
    t.add_argument("--ema-decay", type=float, default=None)
    t.add_argument("--train-args", default="", help="more options for `train cascade`, quoted, e.g. '--seed 1'")
    s = p.add_argument_group("schedule")
    s.add_argument("--minutes", type=float, default=60.0, help="training minutes to reach")
    s.add_argument("--every", type=float, default=10.0, help="minutes of training between checkpoints")
    s.add_argument("--first-steps", type=int, default=50,
                   help="steps of the first increment (its seconds per step size the next ones)")
    s.add_argument("--at-steps", default=None,
                   help="checkpoints at these step counts instead (comma-separated), e.g. 100,200,400")
    s.add_argument("--max-steps", type=int, default=None, help="never train beyond this many steps")
    s.add_argument("--resume", action="store_true", help="continue a run of this tool in --out")
    e = p.add_argument_group("evaluation")
    e.add_argument("--n-per-class", type=int, default=20, help="generated planes per depth class")
    e.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance of the generated planes")
    e.add_argument("--sample-steps", type=int, default=20, help="sampling steps")
    e.add_argument("--sampler", default="dpmsolver++")
    e.add_argument("--gen-batch", type=int, default=32, help="planes generated per call")
    e.add_argument("--clf-iters", type=int, default=1000, help="depth-classifier training iterations")
    e.add_argument("--seed", type=int, default=0, help="classifier and sampling seed (plane i of class d: "
                                                       "seed + 1000 d + i)")
    e.add_argument("--device", default="cpu", help="device for training and evaluation")
    e.add_argument("--threads", type=int, default=None,
                   help="CPU threads for training and evaluation (default: torch's own, OMP_NUM_THREADS or all)")
    g = p.add_argument_group("plotting finished runs")
    g.add_argument("--plot", nargs="+", type=Path, default=None, metavar="OUT",
                   help="draw these runs' curves together (their time_to_quality.json) instead of running")
    g.add_argument("--to", type=Path, default=None, help="with --plot: the PNG to write")
    a = p.parse_args(argv)
    if a.plot:
        if a.to is None:
            p.error("--plot needs --to FILE.png")
        return a
    if not a.data or a.out is None:
        p.error("give --data and --out (or --plot OUT... --to FILE.png)")
    if a.at_steps:
        try:
            a.at_steps = [int(v) for v in a.at_steps.split(",") if v.strip()]
        except ValueError:
            p.error(f"--at-steps takes whole numbers, got '{a.at_steps}'")
        if not a.at_steps or any(x < 1 for x in a.at_steps) or a.at_steps != sorted(set(a.at_steps)):
            p.error("--at-steps must be increasing step counts of at least 1")
    if not (a.minutes > 0 and a.every > 0) or a.first_steps < 1:
        p.error("--minutes and --every must be more than 0, --first-steps at least 1")
    if a.n_per_class < 1 or a.gen_batch < 1 or a.clf_iters < 1 or a.sample_steps < 1:
        p.error("--n-per-class, --gen-batch, --clf-iters and --sample-steps must be at least 1")
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    plt()  # matplotlib is there (now, not after an hour of training)
    if a.plot:
        results = []
        for folder in a.plot:
            f = folder / RESULT if folder.is_dir() else folder
            if not f.is_file():
                raise UserInputError(f"'{f}' does not exist: give run folders of this tool (with {RESULT}).")
            results.append(json.loads(f.read_text()))
        log(f"wrote {shown_path(plot_runs(results, a.to))} ({len(results)} runs)")
        return 0
    set_threads(a.threads)
    a.out = Path(a.out)
    t_start = time.perf_counter()
    state = a.out / "run" / "training" / "base" / "state.pt"
    old = a.out / RESULT
    if state.exists() and not a.resume:
        raise UserInputError(f"'{a.out}' holds a run already: pass --resume to continue it, or choose another --out.")
    previous = json.loads(old.read_text()) if a.resume and old.is_file() else None
    train_cmd = shlex.join(["python", *train_command(a, 0)[1:]]).replace("--steps 0", "--steps S")
    if previous is not None:
        if previous["settings"].get("train_command") != train_cmd:
            raise UserInputError(f"--resume with other training settings than the run in '{a.out}' "
                                 f"({previous['settings'].get('train_command')}): use the same ones, or another "
                                 "--out (--minutes, --every and --at-steps may change).")
        if previous["data"].get("inputs") != [str(d) for d in a.data] or previous["data"].get("holdout") != a.holdout:
            raise UserInputError(f"--resume with other --data or --holdout than the run in '{a.out}'.")
        if previous["settings"].get("evaluation") != rounded(evaluation_settings(a)):
            raise UserInputError(f"--resume with other evaluation options than the run in '{a.out}' "
                                 f"({previous['settings'].get('evaluation')}): its checkpoints would not compare.")

    specimens = read_inputs(a.data, channel=a.channel, axes=a.axes, z_step_um=a.z_step_um,
                            depth_classes=a.depth_classes)
    a.out.mkdir(parents=True, exist_ok=True)
    split = split_holdout(specimens, a.out, a.holdout)
    log(f"{split['description']}: {len(split['train_specimens'])} training stacks in "
        f"{shown_path(a.out / 'train_data')}, "
        f"{len(split['heldout_specimens'])} held out")
    train_ds, held_ds = load_split(a.out / "train_data", a), load_split(a.out / "heldout_data", a)
    real = RealViews(train_ds, held_ds, clf_iters=a.clf_iters, seed=a.seed)
    log(f"depth classifier: val acc {real.clf_info['val_acc']:.3f}; real held-out accuracy "
        f"{real.real['accuracy']:.3f} (chance {1 / real.n_classes:.3f}); held-out NN median "
        f"{real.real['nn_median']:.4f} ({real.real['classifier_seconds'] + real.real['nn_seconds']:.0f} s)")

    result = {
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command("time_to_quality", argv),
        "git_commit": git_commit(),
        "label": a.label,
        "data": {"inputs": [str(d) for d in a.data], "specimens": len(specimens),
                 "planes_per_stack": sorted({int(s["lazy"].shape[0]) for s in specimens}),
                 "depth_classes": real.n_classes, "chance": 1 / real.n_classes,
                 **{k: v for k, v in split.items() if not k.endswith("_specimens")},
                 "train_stacks": len(split["train_specimens"]), "heldout_stacks": len(split["heldout_specimens"])},
        "settings": {
            "training": None,  # the stage's own record, filled in after the first increment
            "train_command": train_cmd,
            "schedule": ({"at_steps": a.at_steps} if a.at_steps else
                         {"minutes": a.minutes, "every": a.every, "first_steps": a.first_steps,
                          "max_steps": a.max_steps}),
            "evaluation": evaluation_settings(a),
        },
        "machine": {**machine(), "torch_threads": torch.get_num_threads(),
                    "train_threads": a.threads or os.environ.get("OMP_NUM_THREADS") or "torch default"},
        "classifier": real.clf_info,
        "real_heldout": real.real,
        "nn_reference": real.nn_reference,
        "metrics": {"accuracy": "mean over depth classes of the classifier's accuracy (generated planes: "
                                "n_per_class per class; real held-out: every plane, 3 offsets x 8 flips/rotations)",
                    "accuracy_ratio": "generated accuracy / real held-out accuracy",
                    "nn_ratio": "median NN distance of generated planes / that of held-out real planes",
                    "minutes": "the stage's train_seconds / 60 (the training loop; not start-up or evaluation)"},
        "checkpoints": [],
    }
    chance = 1 / real.n_classes
    if real.real["accuracy"] < chance + 0.1:
        result["notes"] = [f"the classifier barely tells the held-out real planes' depths apart (accuracy "
                           f"{real.real['accuracy']:.2f}, chance {chance:.2f}): the accuracy ratio says little. "
                           "Fewer --depth-classes, or more --clf-iters, may help."]
        log(f"note: {result['notes'][0]}")
    if previous is not None:
        result["checkpoints"] = previous.get("checkpoints", [])
        result["created"] = previous.get("created", result["created"])

    def record(info: dict) -> dict:
        ev = evaluate(a.out / "run", real, a)
        rec = {"steps": int(info["steps_done"]), "minutes": info["train_seconds"] / 60,
               "train_seconds": info["train_seconds"], "train_wall_seconds": info.get("wall_seconds"),
               "final_loss_ema": info.get("final_loss_ema"), "real_heldout_accuracy": real.real["accuracy"], **ev}
        result["checkpoints"].append(rec)
        result["summary"] = summary(result)
        write_result(a, result)
        log(f"step {rec['steps']} at {rec['minutes']:.1f} training min: accuracy {rec['accuracy']:.3f} "
            f"(/ real {_num(rec['accuracy_ratio']):.2f}), NN ratio {_num(rec['nn_ratio']):.2f}, loss "
            f"{rec['final_loss_ema'] or float('nan'):.4f} (evaluated in {rec['eval_seconds']:.0f} s)")
        return rec

    info = stage_training(a.out / "run") if a.resume else None
    done = {c["steps"] for c in result["checkpoints"]}
    if info is not None:
        result["settings"]["training"] = training_settings(info)
        if int(info["steps_done"]) not in done:  # killed between training and its evaluation
            record(info)
    steps = int(info["steps_done"]) if info else 0
    seconds = float(info["train_seconds"]) if info else 0.0
    rate = None
    cps = result["checkpoints"]
    if len(cps) >= 2 and cps[-1]["steps"] > cps[-2]["steps"]:
        rate = (cps[-1]["train_seconds"] - cps[-2]["train_seconds"]) / (cps[-1]["steps"] - cps[-2]["steps"])
    elif cps:
        rate = cps[-1]["train_seconds"] / max(cps[-1]["steps"], 1)
    while True:
        if a.at_steps:
            todo = [s for s in a.at_steps if s > steps]
            target = todo[0] if todo else None
        elif steps == 0:
            target = min(a.first_steps, a.max_steps or a.first_steps)
        else:
            target = next_steps(steps, seconds, max(rate or 1e-3, 1e-3), a)
        if target is None or target <= steps:
            break
        log(f"training to step {target} ...")
        info = train_to(a, target)
        if result["settings"]["training"] is None:
            result["settings"]["training"] = training_settings(info)
        new_seconds = float(info["train_seconds"])
        if target > steps and new_seconds > seconds:
            rate = (new_seconds - seconds) / (target - steps)
        steps, seconds = target, new_seconds
        record(info)
        if a.max_steps and steps >= a.max_steps:
            break
    earlier = float((previous or {}).get("total_wall_seconds") or 0)  # a finished run taken further
    result["total_wall_seconds"] = round(earlier + time.perf_counter() - t_start, 1)
    result["summary"] = summary(result) if result["checkpoints"] else None
    write_result(a, result)
    s = result["summary"]
    if s:
        log(f"done: {len(result['checkpoints'])} checkpoints up to {s['last']['minutes']:.1f} training minutes; "
            f"accuracy ratio {_num(s['last']['accuracy_ratio']):.2f} at the end (target {TARGET:g} first reached at "
            f"{'%.1f min' % s['first_minutes_at_target'] if s['first_minutes_at_target'] is not None else 'never'}); "
            f"wrote {shown_path(a.out / RESULT)} and {shown_path(a.out / FIGURE)}")
    return 0


if __name__ == "__main__":
    run(main)
