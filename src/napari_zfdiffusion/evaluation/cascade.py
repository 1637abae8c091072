"""Evaluate a depth cascade: depth-classifier accuracy, a memorisation check, and figures.

    python -m napari_zfdiffusion.evaluation.cascade --model zf-cascade-demo --threads 2 --out docs

Writes, under ``--out`` (``--tag`` is appended to every name):

* ``results/cascade_eval.json``  every number, with the settings, seeds and model steps behind it
* ``results/cascade_eval.md``    the same as markdown tables
* ``images/cascade_grid_depth_guidance.png``  64x64 samples, guidance (rows) x depth (columns)
* ``images/cascade_confusion.png``            depth confusion: held-out real planes | generated
* ``images/cascade_nn_hist.png``              nearest-training-neighbour distances
* ``images/cascade_nn_pairs.png``             generated samples beside their nearest training view
* ``images/cascade_stages.jpg``               one sample per depth through 64 -> 128 -> 256 -> 512

Honest splits (the CHO movie: 20 time points x 5 z planes; the diffusion model saw time points 0-15):

* the depth classifier trains on time points 0-11, is selected on 12-15, and is tested on the
  held-out time points 16-19 ("real accuracy", never seen by the diffusion model or the classifier);
* "generated accuracy" is the same classifier on generated planes of each depth x guidance cell;
* memorisation: the distance of each generated plane to its nearest view (any crop offset, flip or
  rotation the training saw) of the diffusion training set (time points 0-15), against the same for
  held-out real planes (16-19). Copies would sit much closer than held-out real planes do.

Everything is seeded; the same command gives the same numbers (up to float summation order when
the number of threads changes). Run ``python -m napari_zfdiffusion.evaluation.cascade --help`` for
the options. Needs the ``eval`` extra (matplotlib).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import re
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..core.cascade import Cascade
from ..core.cascade.data import DepthDataset
from ..core.images import dihedral, resize, square
from ..core.io import list_images
from ..core.metrics import DIHEDRAL_VIEWS, nearest_neighbours
from ..core.store import resolve_model
from ._common import (
    PROG,
    add_compute,
    begin,
    command,
    figure_suffix,
    floats,
    git_commit,
    log,
    quartiles,
    rounded,
    run,
    save_figure,
    shown_path,
)
from ._common import plt as _plt

RUN_MODEL = Path("runs") / "zf-cascade-demo"  # a freshly trained demo cascade, if run from the repository
BUNDLED_MODEL = "zf-cascade-demo"
RES = 64  # the base stage's resolution: classifier and memorisation work here

CLF_TRAIN_TPS = range(0, 12)
CLF_VAL_TPS = range(12, 16)
TEST_TPS = range(16, 20)


# --------------------------------------------------------------------------------------- helpers
def default_model() -> str:
    if (RUN_MODEL / "base" / "stage.json").is_file():
        return str(RUN_MODEL)
    return BUNDLED_MODEL


def time_point(path: str | Path) -> int:
    m = re.search(r"t(\d+)", Path(path).stem)
    if not m:
        raise SystemExit(f"cannot read a time point from the file name '{path}' (expected e.g. cho_t07.tif)")
    return int(m.group(1))


def cell_seed(seed: int, depth: int) -> int:
    """Sample i of depth d uses seed + 1000 d + i, the same for every guidance: rows of the grid differ only
    in guidance, and different depths get different noise (else guidance 0 would repeat one image set)."""
    return seed + 1000 * depth


def brightest_window(img: np.ndarray, size: int) -> tuple[int, int]:
    """Top-left corner of the ``size`` x ``size`` window (stride size/4) with the highest mean."""
    t = torch.from_numpy(np.ascontiguousarray(img))[None, None].float()
    m = F.avg_pool2d(t, size, stride=max(1, size // 4))[0, 0]
    i = int(m.argmax())
    step = max(1, size // 4)
    return (i // m.shape[1]) * step, (i % m.shape[1]) * step


def views(plane: torch.Tensor, offsets, size: int = RES) -> torch.Tensor:
    """(len(offsets), size, size) square crops of a (Y, X) plane, made as the base stage's training does."""
    return torch.cat([resize(square(plane, off)[None, None], size)[0] for off in offsets])


def all_dihedral(x: torch.Tensor) -> torch.Tensor:
    """The 8 flips/rotations of each (H, W) image of (N, H, W): (8N, H, W)."""
    return torch.cat([dihedral(x, k, f) for k, f in DIHEDRAL_VIEWS])


# ------------------------------------------------------------------------------------------ data
def cho_dirs(data: Path | None) -> tuple[Path, Path]:
    """The train/ and test/ folders of CHO stacks: ``data``'s, or the fetched data set (fetched if missing)."""
    if data is None:
        from ..core.fetch import prepare_cho

        train_dir, test_dir = prepare_cho(quiet=True)
    else:
        train_dir, test_dir = Path(data) / "train", Path(data) / "test"
    list_images(train_dir), list_images(test_dir)
    return train_dir, test_dir


class RealData:
    """Every CHO plane, percentile-normalised per stack with the cascade's normalisation, in [-1, 1]."""

    def __init__(self, train_dir: Path, test_dir: Path, cascade: Cascade):
        self.stacks: dict[int, torch.Tensor] = {}  # time point -> (Z, Y, X)
        self.files: dict[int, str] = {}
        for folder in (train_dir, test_dir):
            ds = DepthDataset.from_paths(folder, norm=cascade.normalisation)
            if ds.n_classes != cascade.n_classes:
                raise SystemExit(f"{folder}: {ds.n_classes} planes per stack, the model has {cascade.n_classes} depths")
            for k, f in enumerate(ds.files):  # one stack per file (a CHO time point)
                raw = ds.stack(k)
                tp = time_point(f)
                if tp in self.stacks:
                    raise SystemExit(f"time point {tp} appears twice ({self.files[tp]}, {f})")
                self.stacks[tp], self.files[tp] = raw, Path(f).name
        self.n_depths = cascade.n_classes
        trained_on = set(cascade.card.get("training_data", {}).get("files", []))
        self.diffusion_tps = sorted(tp for tp, f in self.files.items() if f in trained_on) or \
            sorted(tp for tp in self.files if tp not in TEST_TPS)
        leak = [self.files[tp] for tp in TEST_TPS if self.files.get(tp) in trained_on]
        if leak:
            raise SystemExit(f"the model card lists held-out files as training data: {leak}")
        missing = [tp for tp in (*CLF_TRAIN_TPS, *CLF_VAL_TPS, *TEST_TPS) if tp not in self.stacks]
        if missing:
            raise SystemExit(f"time points {missing} are missing from {train_dir} / {test_dir}")

    def planes(self, tps, offsets) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Views (N, 64, 64), their depth classes and time points, for every plane of ``tps``."""
        xs, ys, ts = [], [], []
        for tp in tps:
            for z in range(self.n_depths):
                v = views(self.stacks[tp][z], offsets)
                xs.append(v)
                ys += [z] * len(v)
                ts += [tp] * len(v)
        return torch.cat(xs), torch.tensor(ys), torch.tensor(ts)


def intensity_by_group(real: RealData) -> dict:
    """Mean normalised intensity ([0, 1]) of each depth, averaged over the time points of each split."""
    out = {}
    for name, tps in (("t00-11 classifier train", CLF_TRAIN_TPS), ("t12-15 classifier val", CLF_VAL_TPS),
                      ("t16-19 held out", TEST_TPS)):
        out[name] = [float(np.mean([(real.stacks[tp][z].mean().item() + 1) / 2 for tp in tps]))
                     for z in range(real.n_depths)]
    return out


# ------------------------------------------------------------------------------------ classifier
class DepthNet(nn.Module):
    """A small CNN: four conv-BN-ReLU-pool blocks, global average pooling, a linear head."""

    def __init__(self, n_classes: int, widths=(8, 16, 32, 64)):
        super().__init__()
        layers, c = [], 1
        for w in widths:
            layers += [nn.Conv2d(c, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True),
                       nn.MaxPool2d(2)]
            c = w
        self.body = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Dropout(0.2), nn.Linear(c, n_classes))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x[:, None] if x.ndim == 3 else x).mean(dim=(-2, -1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


CLASSIFIER_ARCHITECTURE = "4 x (conv3x3-BN-ReLU-maxpool) widths 8,16,32,64, global average pool, linear"


@torch.no_grad()
def predict(net: DepthNet, x: torch.Tensor, batch: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Predicted classes and L2-normalised features of (N, 64, 64) images."""
    net.eval()
    preds, feats = [], []
    for i in range(0, len(x), batch):
        f = net.features(x[i:i + batch])
        preds.append(net.head(f).argmax(1))
        feats.append(F.normalize(f, dim=1))
    return torch.cat(preds).numpy(), torch.cat(feats).numpy()


def fit_depth_classifier(xtr: torch.Tensor, ytr: torch.Tensor, xva: torch.Tensor, yva: torch.Tensor,
                         n_classes: int, *, iters: int, seed: int, batch: int = 64) -> tuple[DepthNet, dict]:
    """Train a :class:`DepthNet` on (N, 64, 64) views ``xtr`` with depth classes ``ytr`` (a random flip /
    rot90 of each view per batch), checking it on ``xva`` / ``yva`` every 50 iterations and at the end;
    returns the net at its best check (validation accuracy, then loss) and what happened."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    net = DepthNet(n_classes)
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, iters)
    best = (-1.0, 0.0, None, 0)  # val acc, -val loss, state, iteration
    history = []
    t0 = time.perf_counter()
    for it in range(1, iters + 1):
        net.train()
        idx = torch.randint(0, len(xtr), (batch,), generator=g)
        k = torch.randint(0, 4, (batch,), generator=g)
        flip = torch.rand(batch, generator=g) < 0.5
        xb = torch.stack([dihedral(xtr[i], int(kk), bool(ff)) for i, kk, ff in zip(idx, k, flip)])
        loss = F.cross_entropy(net(xb), ytr[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if it % 50 == 0 or it == iters:
            net.eval()
            with torch.no_grad():
                logits = net(xva)
                vloss = float(F.cross_entropy(logits, yva))
                vacc = float((logits.argmax(1) == yva).float().mean())
            history.append({"iter": it, "train_loss": float(loss.detach()), "val_loss": vloss, "val_acc": vacc})
            if (vacc, -vloss) > best[:2]:
                best = (vacc, -vloss, {k_: v.clone() for k_, v in net.state_dict().items()}, it)
    net.load_state_dict(best[2])
    net.eval()
    info = {"iterations": iters, "batch": batch, "selected_iteration": best[3], "val_acc": best[0],
            "val_loss": -best[1], "seconds": round(time.perf_counter() - t0, 1), "history": history}
    return net, info


def train_classifier(real: RealData, *, iters: int, seed: int, batch: int = 64) -> tuple[DepthNet, dict]:
    # Random square offsets are drawn from a dense grid (precomputed); flips/rotations on the fly.
    xtr, ytr, _ = real.planes(CLF_TRAIN_TPS, np.linspace(0, 1, 17))
    xva, yva, _ = real.planes(CLF_VAL_TPS, (0.0, 0.5, 1.0))
    xva, yva = all_dihedral(xva), yva.repeat(8)
    net, fit = fit_depth_classifier(xtr, ytr, xva, yva, real.n_depths, iters=iters, seed=seed, batch=batch)
    info = {
        "architecture": CLASSIFIER_ARCHITECTURE,
        "train_time_points": list(CLF_TRAIN_TPS), "val_time_points": list(CLF_VAL_TPS),
        "test_time_points": list(TEST_TPS),
        "train_views": f"{len(xtr)} (17 square offsets per plane) x random flip/rot90 per batch",
        **fit,
    }
    return net, info


def confusion(y_true: np.ndarray, y_pred: np.ndarray, n: int) -> np.ndarray:
    m = np.zeros((n, n), dtype=np.int64)
    np.add.at(m, (y_true, y_pred), 1)
    return m


def per_class_acc(m: np.ndarray) -> list[float]:
    return [float(m[i, i] / m[i].sum()) if m[i].sum() else float("nan") for i in range(len(m))]


# ------------------------------------------------------------------------------------- figures
def unit(x) -> np.ndarray:
    x = x.numpy() if torch.is_tensor(x) else np.asarray(x)
    return np.clip((x + 1) / 2, 0, 1)


def tile(imgs: np.ndarray, gap: int = 2) -> np.ndarray:
    """Images (k, H, W) in [0, 1] side by side with white gaps."""
    k, h, w = imgs.shape
    out = np.ones((h, k * w + (k - 1) * gap), dtype=np.float32)
    for i in range(k):
        out[:, i * (w + gap):i * (w + gap) + w] = imgs[i]
    return out


def fig_grid(path: Path, gen: np.ndarray, guidances, real_row: np.ndarray, labels, k: int) -> None:
    plt = _plt()
    ng, nd = gen.shape[:2]
    k = min(k, gen.shape[2])
    fig, axes = plt.subplots(ng + 1, nd, figsize=(1.25 * k * nd + 0.8, 1.3 * (ng + 1) + 0.6), squeeze=False)
    for r in range(ng + 1):
        for d in range(nd):
            ax = axes[r, d]
            img = tile(unit(gen[r, d, :k])) if r < ng else tile(unit(real_row[d][:k]))
            ax.imshow(img, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(labels[d], fontsize=9)
            if d == 0:
                ax.set_ylabel(f"guidance {guidances[r]:g}" if r < ng else "real\n(held out)", fontsize=9)
    fig.suptitle("Generated 64x64 planes: depth (columns) x classifier-free guidance (rows); the same seeds "
                 f"down each column; bottom row: held-out real planes (time points {TEST_TPS[0]}-"
                 f"{TEST_TPS[0] + min(k, len(real_row[0])) - 1})", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)


def fig_confusion(path: Path, real_m: np.ndarray, gen_m: np.ndarray, g_best: float) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(9, 4.2))
    for ax, m, title in ((axes[0], real_m, "real, held-out time points 16-19"),
                         (axes[1], gen_m, f"generated, guidance {g_best:g}")):
        frac = m / np.maximum(m.sum(1, keepdims=True), 1)
        ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
        for i in range(len(m)):
            for j in range(len(m)):
                ax.text(j, i, f"{frac[i, j]:.2f}", ha="center", va="center", fontsize=8,
                        color="white" if frac[i, j] > 0.6 else "black")
        ax.set_xticks(range(len(m)))
        ax.set_yticks(range(len(m)))
        ax.set_xlabel("predicted depth class")
        ax.set_ylabel("true / requested depth class")
        acc = np.trace(m) / m.sum()
        ax.set_title(f"{title}\naccuracy {acc:.2f} (chance {1 / len(m):.2f})", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)


def fig_hist(path: Path, series: dict[str, np.ndarray], xlabel: str, series_f: dict[str, np.ndarray],
             xlabel_f: str) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, ser, xl in ((axes[0], series, xlabel), (axes[1], series_f, xlabel_f)):
        allv = np.concatenate(list(ser.values()))
        bins = np.linspace(0, allv.max() * 1.05 + 1e-9, 40)
        for name, d in ser.items():
            real = name.startswith("real") or name.startswith("train")
            ax.hist(d, bins=bins, density=True, histtype="step" if not real else "stepfilled",
                    alpha=0.35 if real else 1.0, lw=1.5, label=f"{name} (median {np.median(d):.3f})")
        ax.set_xlabel(xl)
        ax.set_ylabel("density")
        ax.legend(fontsize=7)
    axes[0].set_title("Distance to the nearest training view (pixels)", fontsize=10)
    axes[1].set_title("Distance to the nearest training view (classifier features)", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)


def fig_pairs(path: Path, groups: list[tuple[str, np.ndarray, np.ndarray, np.ndarray, list[str]]]) -> None:
    """groups: (title, queries (k,64,64), neighbours (k,64,64), distances (k,), neighbour labels)."""
    plt = _plt()
    ncol = sum(len(g[1]) for g in groups)
    fig, axes = plt.subplots(2, ncol, figsize=(1.45 * ncol, 3.6), squeeze=False)
    c = 0
    for title, q, nb, d, names in groups:
        for i in range(len(q)):
            for r, img in enumerate((q[i], nb[i])):
                ax = axes[r, c]
                ax.imshow(unit(img), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
            axes[0, c].set_title(f"{title if i == 0 else ''}\nd={d[i]:.3f}", fontsize=7, loc="left")
            axes[1, c].set_xlabel(names[i], fontsize=6)
            c += 1
    axes[0, 0].set_ylabel("query", fontsize=8)
    axes[1, 0].set_ylabel("nearest\ntraining view", fontsize=8)
    fig.suptitle("Nearest training neighbour (RMS pixel distance d, [-1, 1] scale): the closest generated "
                 "samples, random ones, and held-out real planes for scale", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)


def fig_stages(path: Path, rows: list[dict], labels) -> None:
    plt = _plt()
    cols = list(rows[0]["panels"].keys())
    fig, axes = plt.subplots(len(rows), len(cols), figsize=(2.1 * len(cols), 2.25 * len(rows) + 0.4),
                             squeeze=False)
    for r, row in enumerate(rows):
        for c, name in enumerate(cols):
            ax = axes[r, c]
            ax.imshow(row["panels"][name], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(name, fontsize=8)
            if c == 0:
                ax.set_ylabel(labels[row["depth"]], fontsize=8)
    fig.suptitle("One sample per depth through the cascade, beside a held-out real plane of the same depth "
                 "(real: 443x443 centre square resized to 512)", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG + "cascade", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=default_model(),
                   help="cascade folder or bundled model name (default: runs/zf-cascade-demo if trained, else "
                        "the bundled zf-cascade-demo)")
    p.add_argument("--out", type=Path, required=True,
                   help="writes OUT/images/cascade_*.{png,jpg} and OUT/results/cascade_eval.{json,md} (docs: the "
                        "documentation's own)")
    p.add_argument("--tag", default="", help="suffix for the result and figure names, e.g. _volume_model")
    p.add_argument("--data", type=Path, default=None,
                   help="folder with train/ (cho_t00..t15.tif) and test/ (cho_t16..t19.tif); default: the "
                        "fetched CHO data (fetched with pip if missing)")
    p.add_argument("--n-per-cell", type=int, default=20, help="generated planes per depth x guidance cell")
    p.add_argument("--guidance", type=floats, default=floats("0,1,2,3,5"), help="comma-separated guidance scales")
    p.add_argument("--steps", type=int, default=20, help="sampling steps of the 64x64 base stage")
    p.add_argument("--sr-steps", type=int, default=15, help="sampling steps of each super-resolution stage")
    p.add_argument("--sampler", default="dpmsolver++")
    p.add_argument("--seed", type=int, default=0, help="sample i of every cell uses seed + i")
    p.add_argument("--batch", type=int, default=20, help="samples generated per call")
    p.add_argument("--clf-iters", type=int, default=1000, help="depth-classifier training iterations")
    p.add_argument("--grid-k", type=int, default=3, help="samples shown per cell of the grid figure")
    p.add_argument("--stage-guidance", default="best",
                   help="guidance for the cascade-stages figure: a number, or 'best' (highest generated accuracy)")
    p.add_argument("--stage-samples", type=int, default=1, help="samples per depth taken to full resolution")
    p.add_argument("--no-stages", action="store_true", help="skip the (slow) cascade-to-512 figure")
    add_compute(p)
    a = p.parse_args(argv)
    if a.n_per_cell < 1 or a.batch < 1:
        p.error("--n-per-cell and --batch must be at least 1")
    if not a.guidance:
        p.error("--guidance needs at least one value")
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    img_dir, res_dir = begin(a)
    t_start = time.perf_counter()
    written: list[Path] = []

    def fig_path(what: str, photo: bool = False) -> Path:
        written.append(img_dir / f"cascade_{what}{a.tag}{figure_suffix(photo)}")
        return written[-1]

    cas = Cascade.load(a.model, device=a.device)
    model_path = resolve_model(a.model)
    nd = cas.n_classes
    labels = [f"depth {d}\n{cas.depth_label(d).split(' (')[0]}" for d in range(nd)]
    stage_steps = {name: st.info.get("training", {}).get("steps_done") for name, st in cas.stages.items()}
    log(f"model {model_path} (stages {stage_steps}), device {cas.device}, torch threads {torch.get_num_threads()}")

    train_dir, test_dir = cho_dirs(a.data)
    real = RealData(train_dir, test_dir, cas)
    timings = {}

    # ---- 1. depth classifier on real planes --------------------------------------------------
    t0 = time.perf_counter()
    clf, clf_info = train_classifier(real, iters=a.clf_iters, seed=a.seed)
    timings["classifier_train_s"] = time.perf_counter() - t0
    xte, yte, tte = real.planes(TEST_TPS, (0.0, 0.5, 1.0))
    xte_all, yte_all = all_dihedral(xte), yte.repeat(8).numpy()
    pred_te, _ = predict(clf, xte_all)
    real_m = confusion(yte_all, pred_te, nd)
    xcentre, ycentre, _ = real.planes(TEST_TPS, (None,))
    pred_c, _ = predict(clf, xcentre)
    real_centre_acc = float((pred_c == ycentre.numpy()).mean())
    real_row = {"per_depth": per_class_acc(real_m), "mean": float(np.trace(real_m) / real_m.sum()),
                "n_views": int(real_m.sum()), "n_planes": len(TEST_TPS) * nd,
                "centre_crop_plane_acc": real_centre_acc, "confusion": real_m.tolist()}
    pred_va, _ = predict(clf, all_dihedral(real.planes(CLF_VAL_TPS, (0.0, 0.5, 1.0))[0]))
    val_m = confusion(real.planes(CLF_VAL_TPS, (0.0, 0.5, 1.0))[1].repeat(8).numpy(), pred_va, nd)
    val_row = {"per_depth": per_class_acc(val_m), "mean": float(np.trace(val_m) / val_m.sum()),
               "n_views": int(val_m.sum()), "n_planes": len(CLF_VAL_TPS) * nd, "confusion": val_m.tolist()}
    log(f"classifier: val acc {clf_info['val_acc']:.3f} (iter {clf_info['selected_iteration']}), "
        f"held-out real acc {real_row['mean']:.3f} ({timings['classifier_train_s']:.0f} s)")

    # ---- 2. generate 64x64 planes for every guidance x depth cell ----------------------------
    G = a.guidance
    gen = np.zeros((len(G), nd, a.n_per_cell, RES, RES), dtype=np.float32)  # model space [-1, 1]
    base_res = cas.resolutions[0]
    t0 = time.perf_counter()
    cell_s = {}
    for gi, g in enumerate(G):
        for d in range(nd):
            tc = time.perf_counter()
            for s in range(0, a.n_per_cell, a.batch):
                n = min(a.batch, a.n_per_cell - s)
                r = cas.generate(d, guidance=g, resolution=base_res, n=n, seed=cell_seed(a.seed, d) + s,
                                 sampler=a.sampler, steps=a.steps)
                x = torch.from_numpy(r.images * 2 - 1)[:, None]
                gen[gi, d, s:s + n] = resize(x, RES)[:, 0].numpy()
            cell_s[f"{g:g}/{d}"] = time.perf_counter() - tc
        log(f"generated guidance {g:g}: {sum(v for k, v in cell_s.items() if k.startswith(f'{g:g}/')):.0f} s")
    timings["generate_64_s"] = time.perf_counter() - t0
    n_gen = len(G) * nd * a.n_per_cell
    timings["generate_64_s_per_sample"] = timings["generate_64_s"] / n_gen

    # ---- 3. generated accuracy -----------------------------------------------------------------
    gen_t = torch.from_numpy(gen)
    gen_rows, gen_feats = {}, {}
    for gi, g in enumerate(G):
        x = gen_t[gi].reshape(-1, RES, RES)
        y = np.repeat(np.arange(nd), a.n_per_cell)
        pred, feat = predict(clf, x)
        m = confusion(y, pred, nd)
        gen_feats[gi] = feat
        gen_rows[g] = {"per_depth": per_class_acc(m), "mean": float(np.trace(m) / m.sum()), "n": int(m.sum()),
                       "confusion": m.tolist(),
                       "mean_intensity_per_depth": [float(unit(gen[gi, d]).mean()) for d in range(nd)]}
    g_best = max(G, key=lambda g: (gen_rows[g]["mean"], -g))
    log("generated accuracy: " + ", ".join(f"g={g:g}: {gen_rows[g]['mean']:.3f}" for g in G) + f"; best {g_best:g}")
    real_intensity = [float(unit(real.planes(TEST_TPS, (None,))[0][ycentre.numpy() == d]).mean()) for d in range(nd)]

    # ---- 4. memorisation: nearest training views -------------------------------------------------
    t0 = time.perf_counter()
    offs = np.linspace(0, 1, 11)
    ref, ref_y, ref_t = real.planes(real.diffusion_tps, offs)
    n_off = len(offs)
    ref = all_dihedral(ref)
    ref_y, ref_t = ref_y.repeat(8).numpy(), ref_t.repeat(8).numpy()
    ref_flat = ref.reshape(len(ref), -1).numpy()
    _, ref_feat = predict(clf, ref)
    scale = 1 / np.sqrt(RES * RES)  # RMS per pixel
    q_test, q_test_y, q_test_t = real.planes(TEST_TPS, (0.0, 0.5, 1.0))
    d_test, i_test = nearest_neighbours(q_test.reshape(len(q_test), -1).numpy(), ref_flat)
    d_test *= scale
    _, f_test = predict(clf, q_test)
    df_test, _ = nearest_neighbours(f_test, ref_feat)
    q_loo, _, q_loo_t = real.planes(real.diffusion_tps, (None,))
    d_loo, _ = nearest_neighbours(q_loo.reshape(len(q_loo), -1).numpy(), ref_flat, reference_groups=ref_t,
                                  query_groups=q_loo_t.numpy())
    d_loo *= scale
    _, f_loo = predict(clf, q_loo)
    df_loo, _ = nearest_neighbours(f_loo, ref_feat, reference_groups=ref_t, query_groups=q_loo_t.numpy())
    mem = {
        "reference": f"diffusion training time points {real.diffusion_tps[0]}-{real.diffusion_tps[-1]}: "
                     f"{len(real.diffusion_tps) * nd} planes x {n_off} square offsets x 8 flips/rotations "
                     f"= {len(ref)} views at 64x64",
        "pixel_metric": "RMS difference per pixel on [-1, 1] images (L2 / 64)",
        "feature_metric": "L2 between L2-normalised classifier features (64-d)",
        "real_heldout": {"pixel": quartiles(d_test), "feature": quartiles(df_test),
                         "queries": f"time points 16-19, all planes, 3 offsets ({len(d_test)})"},
        "train_leave_one_timepoint_out": {"pixel": quartiles(d_loo), "feature": quartiles(df_loo),
                                          "queries": "training planes (centre crop) vs the training views "
                                                     "of the other time points"},
        "generated": {},
    }
    ho_med = np.array([np.median(d_test[q_test_y.numpy() == d]) for d in range(nd)])
    mem["relative_metric"] = ("pixel distance / median held-out distance at the same depth (depths differ in "
                              "brightness, so raw distances do too); held-out real planes have 1 by definition")
    d_gen, i_gen, rel_gen = {}, {}, {}
    for gi, g in enumerate(G):
        q = gen[gi].reshape(-1, RES * RES)
        d_gen[gi], i_gen[gi] = nearest_neighbours(q, ref_flat)
        d_gen[gi] *= scale
        dfg, _ = nearest_neighbours(gen_feats[gi], ref_feat)
        y = np.repeat(np.arange(nd), a.n_per_cell)
        rel_gen[gi] = d_gen[gi] / ho_med[y]
        rel_test_min = float((d_test / ho_med[q_test_y.numpy()]).min())
        mem["generated"][f"{g:g}"] = {
            "relative": quartiles(rel_gen[gi]),
            "frac_relative_below_heldout_min": float((rel_gen[gi] < rel_test_min).mean()),
            "pixel": quartiles(d_gen[gi]), "feature": quartiles(dfg),
            "pixel_median_per_depth": [float(np.median(d_gen[gi][y == d])) for d in range(nd)],
            "frac_below_heldout_min": float((d_gen[gi] < d_test.min()).mean()),
            "frac_below_heldout_p05": float((d_gen[gi] < np.percentile(d_test, 5)).mean()),
            "nn_same_depth_frac": float((ref_y[i_gen[gi]] == y).mean()),
        }
        if gi == G.index(g_best):
            dfg_best = dfg
    mem["real_heldout"]["pixel_median_per_depth"] = ho_med.tolist()
    mem["real_heldout"]["relative"] = quartiles(d_test / ho_med[q_test_y.numpy()])
    timings["memorisation_s"] = time.perf_counter() - t0
    gb = G.index(g_best)
    log(f"NN pixel distance: held-out real median {np.median(d_test):.4f}, generated (g={g_best:g}) median "
        f"{np.median(d_gen[gb]):.4f}, min {d_gen[gb].min():.4f} vs held-out min {d_test.min():.4f}")

    # ---- 5. figures at 64 ------------------------------------------------------------------------
    real_grid = [real.planes(TEST_TPS, (None,))[0][ycentre.numpy() == d].numpy() for d in range(nd)]
    fig_grid(fig_path("grid_depth_guidance"), gen, G, real_grid, labels, a.grid_k)
    fig_confusion(fig_path("confusion"), real_m, np.array(gen_rows[g_best]["confusion"]), g_best)
    ser = {"real held-out (t16-19)": d_test, "train, other time points": d_loo}
    ser_f = {"real held-out (t16-19)": df_test, "train, other time points": df_loo}
    for gi, g in enumerate(G):
        ser[f"generated g={g:g}"] = d_gen[gi]
    ser_f[f"generated g={g_best:g}"] = dfg_best
    fig_hist(fig_path("nn_hist"), ser, "RMS pixel distance to nearest training view ([-1, 1] scale)",
             ser_f, "feature distance to nearest training view")
    rng = np.random.default_rng(a.seed)
    gbest_flat = gen[gb].reshape(-1, RES, RES)
    order = np.argsort(rel_gen[gb])  # most suspicious first: closest relative to real planes of that depth
    closest = order[:5]
    rand = rng.choice(np.setdiff1d(np.arange(len(order)), closest), size=min(5, len(order) - len(closest)),
                      replace=False) if len(order) > 5 else np.array([], dtype=int)
    held = rng.choice(len(d_test), size=3, replace=False)

    def nb_name(j):
        return f"t{ref_t[j]:02d} z{ref_y[j]}"

    def gname(i):
        return f"gen z{i // a.n_per_cell}"

    groups = [("closest generated (relative)", gbest_flat[closest], ref[i_gen[gb][closest]].numpy(), d_gen[gb][closest],
               [f"{gname(i)} / {nb_name(i_gen[gb][i])}" for i in closest])]
    if len(rand):
        groups.append(("random generated", gbest_flat[rand], ref[i_gen[gb][rand]].numpy(), d_gen[gb][rand],
                       [f"{gname(i)} / {nb_name(i_gen[gb][i])}" for i in rand]))
    groups.append(("held-out real", q_test[held].numpy(), ref[i_test[held]].numpy(), d_test[held],
                   [f"t{int(q_test_t[i]):02d} z{int(q_test_y[i])} / {nb_name(i_test[i])}" for i in held]))
    fig_pairs(fig_path("nn_pairs"), groups)

    # ---- 6. one sample per depth through the cascade -------------------------------------------
    stages_info = None
    if not a.no_stages and len(cas.stages) > 1:
        g_stage = g_best if a.stage_guidance == "best" else float(a.stage_guidance)
        t0 = time.perf_counter()
        rows = []
        top = cas.resolutions[-1]
        for d in range(nd):
            r = cas.generate(d, guidance=g_stage, resolution=top, n=a.stage_samples, seed=cell_seed(a.seed, d),
                             sampler=a.sampler,
                             steps=a.steps, sr_steps=a.sr_steps, keep_intermediates=True)
            real_top = unit(resize(square(real.stacks[TEST_TPS[0]][d])[None, None], top)[0, 0])
            for s in range(a.stage_samples):
                panels = {f"{res}x{res}": r.intermediates[res][s] for res in sorted(r.intermediates)}
                c = top // 4
                y, x = brightest_window(r.images[s], c)
                panels[f"{top} zoom (brightest {c}x{c})"] = r.images[s][y:y + c, x:x + c]
                panels[f"real (held-out t{TEST_TPS[0]}) at {top}"] = real_top
                y, x = brightest_window(real_top, c)
                panels[f"real zoom (brightest {c}x{c})"] = real_top[y:y + c, x:x + c]
                rows.append({"depth": d, "panels": panels})
            log(f"cascade to {top} for depth {d}: {time.perf_counter() - t0:.0f} s so far")
        timings["cascade_full_s"] = time.perf_counter() - t0
        timings["cascade_full_s_per_sample"] = timings["cascade_full_s"] / (nd * a.stage_samples)
        fig_stages(fig_path("stages", photo=True), rows, labels)
        stages_info = {"guidance": g_stage, "sr_guidance": 1.0, "steps": a.steps, "sr_steps": a.sr_steps,
                       "resolution": top, "samples_per_depth": a.stage_samples, "seed": a.seed,
                       "noise_aug": "cascade default"}
    timings["total_s"] = time.perf_counter() - t_start

    # ---- 7. results ---------------------------------------------------------------------------
    result = {
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command("cascade", argv),
        "git_commit": git_commit(),
        "model": {"path": str(model_path), "name": cas.name, "stages_steps_done": stage_steps,
                  "depth_labels": [cas.depth_label(d) for d in range(nd)]},
        "settings": {"n_per_cell": a.n_per_cell, "guidance": G, "steps": a.steps, "sr_steps": a.sr_steps,
                     "sampler": a.sampler, "seed": a.seed,
                     "seeds": "sample i of depth d: seed + 1000 d + i (the same for every guidance)",
                     "device": str(cas.device), "resolution": RES,
                     "clf_iters": a.clf_iters},
        "environment": {"torch": torch.__version__, "threads": torch.get_num_threads(), "python": platform.python_version(),
                        "machine": platform.machine()},
        "data": {"train_dir": str(train_dir), "test_dir": str(test_dir), "files": real.files,
                 "diffusion_training_time_points": real.diffusion_tps,
                 "mean_intensity_per_depth": intensity_by_group(real)},
        "classifier": clf_info,
        "accuracy": {"chance": 1 / nd, "real_heldout": real_row, "real_val_selection": val_row, "generated": {f"{g:g}": gen_rows[g] for g in G},
                     "best_guidance": g_best,
                     "real_heldout_mean_intensity_per_depth": real_intensity},
        "memorisation": mem,
        "stages_figure": stages_info,
        "timings_s": timings,
        "figures": sorted(str(p.relative_to(a.out)) for p in written),
    }
    result = rounded(result)
    out_json, out_md = res_dir / f"cascade_eval{a.tag}.json", res_dir / f"cascade_eval{a.tag}.md"
    out_json.write_text(json.dumps(result, indent=2) + "\n")
    md = markdown(result, nd)
    out_md.write_text(md)
    print(md)
    log(f"wrote {shown_path(out_json)}, {shown_path(out_md)} and {len(result['figures'])} "
        f"figures into {shown_path(img_dir)} in {timings['total_s']:.0f} s")
    return 0


def markdown(r: dict, nd: int) -> str:
    acc = r["accuracy"]
    s = r["settings"]
    L = [
        "# Depth cascade evaluation",
        "",
        f"Model `{r['model']['name']}` (training steps per stage: "
        + ", ".join(f"{k} {v}" for k, v in r["model"]["stages_steps_done"].items())
        + f"); {s['n_per_cell']} samples per cell, {s['sampler']} {s['steps']} steps, seed {s['seed']}, "
        f"{s['device']}, torch {r['environment']['torch']} ({r['environment']['threads']} threads). "
        f"Made by `{r['command']}` at commit {r['git_commit']}.",
        "",
        "## Depth accuracy",
        "",
        "A small CNN trained on real 64x64 planes of time points 0-11 (selected on 12-15) names the depth "
        "class of each plane. *Real* is its accuracy on the held-out time points 16-19 (never seen by the "
        f"diffusion model or the classifier; {acc['real_heldout']['n_planes']} planes x 3 crop offsets x 8 "
        f"flips/rotations); *generated* is its accuracy on generated planes of each requested depth. Chance = "
        f"{acc['chance']:.2f}.",
        "",
        "| | " + " | ".join(f"depth {d}" for d in range(nd)) + " | mean |",
        "|---" * (nd + 2) + "|",
    ]
    rr = acc["real_heldout"]
    rv = acc["real_val_selection"]
    L.append("| real, held out (t16-19) | " + " | ".join(f"{v:.2f}" for v in rr["per_depth"])
             + f" | **{rr['mean']:.2f}** |")
    L.append("| real, classifier selection (t12-15) | " + " | ".join(f"{v:.2f}" for v in rv["per_depth"])
             + f" | {rv['mean']:.2f} |")
    for g, row in acc["generated"].items():
        L.append(f"| guidance {g} | " + " | ".join(f"{v:.2f}" for v in row["per_depth"]) + f" | **{row['mean']:.2f}** |")
    L += ["",
          f"Classifier: validation accuracy {r['classifier']['val_acc']:.2f} (time points 12-15, iteration "
          f"{r['classifier']['selected_iteration']}); centre-crop accuracy on the {rr['n_planes']} held-out "
          f"planes {rr['centre_crop_plane_acc']:.2f}. Best guidance by generated accuracy: "
          f"{acc['best_guidance']:g} (chosen on these numbers).",
          "",
          "The held-out time points are not like the training ones in one respect: the cells drift in z, "
          "so at t17-19 the deeper planes are brighter than the same planes at t0-15 (mean normalised "
          "intensity per depth, averaged over each split: "
          + "; ".join(f"{k}: " + ", ".join(f"{v:.3f}" for v in vals)
                      for k, vals in r["data"]["mean_intensity_per_depth"].items())
          + "). That limits the real held-out accuracy; the selection split (t12-15) shows what the classifier "
          "does on planes like the diffusion model's training data (optimistic: it was chosen on them).",
          "",
          "Mean intensity per depth (normalised [0, 1]): real held-out "
          + ", ".join(f"{v:.3f}" for v in acc["real_heldout_mean_intensity_per_depth"])
          + f"; generated at guidance {acc['best_guidance']:g} "
          + ", ".join(f"{v:.3f}" for v in acc["generated"][f"{acc['best_guidance']:g}"]["mean_intensity_per_depth"])
          + ".",
          "",
          "## Memorisation check",
          "",
          f"Distance of each plane to its nearest view of the diffusion training set ({r['memorisation']['reference']}). "
          "Pixel: " + r["memorisation"]["pixel_metric"] + "; feature: " + r["memorisation"]["feature_metric"]
          + ". Relative: " + r["memorisation"]["relative_metric"] + ". Generated copies of training planes "
          "would sit well below the held-out real planes (relative distance near 0).",
          "",
          "| queries | n | pixel median | pixel q25-q75 | pixel min | feature median | relative median (min) "
          "| relative below held-out min |",
          "|---|---|---|---|---|---|---|---|"]
    mem = r["memorisation"]

    def row(name, m, below="-"):
        p, f, rel = m["pixel"], m["feature"], m.get("relative")
        rs = f"{rel['median']:.2f} ({rel['min']:.2f})" if rel else "-"
        return (f"| {name} | {p['n']} | {p['median']:.4f} | {p['q25']:.4f}-{p['q75']:.4f} | {p['min']:.4f} | "
                f"{f['median']:.4f} | {rs} | {below} |")

    L.append(row("real held-out (t16-19)", mem["real_heldout"]))
    L.append(row("real training, other time points", mem["train_leave_one_timepoint_out"]))
    for g, m in mem["generated"].items():
        L.append(row(f"generated, guidance {g}", m, f"{m['frac_relative_below_heldout_min']:.1%}"))
    L += ["",
          "Deeper planes are dimmer (mostly background after the per-stack normalisation), so their distances "
          "are smaller for real and generated planes alike; the median pixel distance per depth:",
          "",
          "| queries | " + " | ".join(f"depth {d}" for d in range(nd)) + " |",
          "|---" * (nd + 1) + "|",
          "| real held-out | " + " | ".join(f"{v:.4f}" for v in mem["real_heldout"]["pixel_median_per_depth"]) + " |"]
    for g, m in mem["generated"].items():
        L.append(f"| generated, guidance {g} | " + " | ".join(f"{v:.4f}" for v in m["pixel_median_per_depth"]) + " |")
    t = r["timings_s"]
    L += ["",
          f"Timings: classifier {t['classifier_train_s']:.0f} s, generation at 64 {t['generate_64_s']:.0f} s "
          f"({t['generate_64_s_per_sample']:.2f} s/sample, batched), memorisation {t['memorisation_s']:.0f} s"
          + (f", cascade to full resolution {t['cascade_full_s_per_sample']:.0f} s/sample"
             if "cascade_full_s" in t else "")
          + f"; total {t['total_s'] / 60:.1f} min.",
          "",
          "Figures: " + ", ".join(f"`{f}`" for f in r["figures"]),
          ""]
    return "\n".join(L)


if __name__ == "__main__":
    run(main)
