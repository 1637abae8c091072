"""Evaluate volume generation: do the planes of one generated volume agree, as real ones do?

    python -m napari_zfdiffusion.evaluation.volume --model runs/zf-volume-v --threads 1 --n-volumes 8 \
        --resolution 128 --out docs

Compares, at one resolution (default 128):

* **real** volumes: the CHO stacks the diffusion model never saw (time points 16-19), and the
  training stacks (0-15) for a larger reference; each plane cut and resized as in training;
* **volumes**: ``Cascade.generate_volume`` with continuity guidance C (each plane conditioned on the
  plane above), for each C of ``--continuity``;
* **baseline**: the same model and settings with continuity guidance 0, i.e. every plane generated
  independently for its depth (what slices per depth give).

Measures, per set: Pearson correlation and SSIM between each plane and the next (and between the
first and last plane), the depth classifier's accuracy on the volumes' planes (the classifier of
:mod:`.cascade`, trained on real time points 0-11 and selected on 12-15), and the mean
intensity per depth. Writes ``results/volume_eval.{json,md}`` and the figures
``images/volume_xz.png`` (orthogonal XZ views) and ``images/volume_planes.jpg`` under ``--out``
(``--tag`` appended to each name).

Seeded: volume i of every set uses seed + i, so the sets differ only in continuity guidance.
Needs the ``eval`` extra (matplotlib).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from ..core.cascade import Cascade
from ..core.images import resize, square, to_unit
from ..core.metrics import neighbour_agreement
from ..core.store import resolve_model
from ._common import begin, PROG, command, figure_suffix, git_commit, log, rounded, run, save_figure
from ._common import plt as _plt
from .cascade import TEST_TPS, RealData, cho_dirs, predict, train_classifier

RUN_MODEL = Path("runs") / "zf-volume"  # a freshly trained volume model, if run from the repository
TRAIN_TPS = range(0, 16)


def real_volumes(real: RealData, tps, res: int) -> np.ndarray:
    """(N, Z, res, res) centre-square views in [0, 1] of the stacks of time points ``tps``."""
    out = []
    for tp in tps:
        st = real.stacks[tp]
        out.append(np.stack([to_unit(resize(square(st[z])[None, None], res))[0, 0] for z in range(st.shape[0])]))
    return np.stack(out)


def agreement(vols: np.ndarray) -> dict:
    """Neighbour agreement of every volume, summarised: mean and sd over volumes, per gap, first-last."""
    per = [neighbour_agreement(v) for v in vols]
    corr = np.array([p["correlation"] for p in per])  # (N, Z-1)
    ssim = np.array([p["ssim"] for p in per])
    far = [neighbour_agreement(v[[0, -1]])["correlation"][0] for v in vols]
    return {"n_volumes": len(vols),
            "neighbour_correlation": {"mean": float(corr.mean()), "sd_over_volumes": float(corr.mean(1).std()),
                                      "per_gap": corr.mean(0).tolist()},
            "neighbour_ssim": {"mean": float(ssim.mean()), "sd_over_volumes": float(ssim.mean(1).std()),
                               "per_gap": ssim.mean(0).tolist()},
            "first_last_correlation": float(np.mean(far)),
            "mean_intensity_per_depth": vols.mean(axis=(0, 2, 3)).tolist()}


def depth_accuracy(clf, vols: np.ndarray, depths: list[int]) -> dict:
    """The depth classifier (64x64 input, [-1, 1]) on every plane; accuracy overall and per depth."""
    x = torch.from_numpy(vols.reshape(-1, *vols.shape[2:]) * 2 - 1)[:, None]
    x = resize(x, 64)[:, 0]
    pred, _ = predict(clf, x)
    y = np.tile(np.array(depths), len(vols))
    per = [float((pred[y == d] == d).mean()) for d in depths]
    return {"accuracy": float((pred == y).mean()), "per_depth": per}


def fig_xz(path: Path, rows: list[tuple[str, np.ndarray]], stretch: int) -> None:
    """For each set: the middle plane (XY) with the cut marked, and the XZ view through that row (the
    row with the most signal over the volume, so that the cut crosses nuclei)."""
    plt = _plt()
    n = len(rows)
    fig, axes = plt.subplots(n, 2, figsize=(9, 2.3 * n + 0.4), gridspec_kw={"width_ratios": [1, 1.6]})
    for i, (name, vol) in enumerate(rows):
        z, h, w = vol.shape
        profile = vol.mean(axis=(0, 2))
        y = int(np.argmax(np.convolve(profile, np.ones(3) / 3, mode="same")))
        ax = axes[i, 0]
        ax.imshow(vol[z // 2], cmap="gray", vmin=0, vmax=1)
        ax.axhline(y, color="tab:orange", lw=0.8)
        ax.set_title(f"{name}: plane {z // 2} (XY)", fontsize=8)
        ax.axis("off")
        ax = axes[i, 1]
        ax.imshow(np.repeat(vol[:, y, :], stretch, axis=0), cmap="gray", vmin=0, vmax=1)
        ax.set_title(f"XZ through the orange row (z down; each of the {z} planes drawn {stretch} px tall)",
                     fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([(k + 0.5) * stretch for k in range(z)], [str(k) for k in range(z)], fontsize=6)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)


def fig_planes(path: Path, rows: list[tuple[str, np.ndarray]]) -> None:
    plt = _plt()
    n, z = len(rows), rows[0][1].shape[0]
    fig, axes = plt.subplots(n, z, figsize=(1.7 * z, 1.8 * n + 0.3))
    for i, (name, vol) in enumerate(rows):
        for k in range(z):
            ax = axes[i, k]
            ax.imshow(vol[k], cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if k == 0:
                ax.set_ylabel(name, fontsize=7)
            if i == 0:
                ax.set_title(f"depth {k}", fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)


def markdown(r: dict) -> str:
    lines = [f"# Volume agreement ({r['settings']['resolution']} px)", "",
             f"Model `{r['model']}`; {r['settings']['n_volumes']} generated volumes per row, depths "
             f"{r['settings']['depths']}, depth guidance {r['settings']['guidance']}, steps {r['settings']['steps']}"
             f"/{r['settings']['sr_steps']}. Made by `{r['command']}`.", "",
             "| volumes | n | neighbour correlation | neighbour SSIM | first-last correlation | depth accuracy |",
             "|---|---|---|---|---|---|"]
    for name, s in r["sets"].items():
        acc = s.get("depth", {}).get("accuracy")
        lines.append(f"| {name} | {s['n_volumes']} | {s['neighbour_correlation']['mean']:.3f} "
                     f"(sd {s['neighbour_correlation']['sd_over_volumes']:.3f}) | {s['neighbour_ssim']['mean']:.3f} "
                     f"(sd {s['neighbour_ssim']['sd_over_volumes']:.3f}) | {s['first_last_correlation']:.3f} | "
                     f"{'-' if acc is None else f'{acc:.2f}'} |")
    lines += ["", f"Chance depth accuracy {1 / len(r['settings']['depths']):.2f}. Per gap (z -> z+1) correlation:", "",
              "| volumes | " + " | ".join(f"{a}->{a + 1}" for a in r["settings"]["depths"][:-1]) + " |",
              "|---|" + "---|" * (len(r["settings"]["depths"]) - 1)]
    for name, s in r["sets"].items():
        lines.append(f"| {name} | " + " | ".join(f"{v:.3f}" for v in s["neighbour_correlation"]["per_gap"]) + " |")
    lines += ["", "Mean intensity per depth ([0, 1]):", "",
              "| volumes | " + " | ".join(f"depth {d}" for d in r["settings"]["depths"]) + " |",
              "|---|" + "---|" * len(r["settings"]["depths"])]
    for name, s in r["sets"].items():
        lines.append(f"| {name} | " + " | ".join(f"{v:.3f}" for v in s["mean_intensity_per_depth"]) + " |")
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG + "volume", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=str(RUN_MODEL) if (RUN_MODEL / "base" / "stage.json").is_file()
                   else "zf-cascade-demo", help="cascade folder or model name (default: runs/zf-volume if "
                                                "trained, else the bundled zf-cascade-demo)")
    p.add_argument("--out", type=Path, required=True,
                   help="writes OUT/images/volume_*.{png,jpg} and OUT/results/volume_eval.{json,md}")
    p.add_argument("--tag", default="", help="suffix for the result and figure names")
    p.add_argument("--data", type=Path, default=None,
                   help="folder with train/ (cho_t00..t15.tif) and test/ (cho_t16..t19.tif); default: the "
                        "fetched CHO data (fetched with pip if missing)")
    p.add_argument("--resolution", type=int, default=128)
    p.add_argument("--n-volumes", type=int, default=8)
    p.add_argument("--continuity", default="1,2", help="comma-separated continuity guidance values (besides 0)")
    p.add_argument("--guidance", type=float, default=3.0, help="depth guidance")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--sr-steps", type=int, default=15)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--clf-iters", type=int, default=1000)
    p.add_argument("--threads", type=int, default=None)
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    img_dir, res_dir = begin(a)
    t0 = time.perf_counter()
    cas = Cascade.load(a.model, "cpu")
    cas.check_resolution(a.resolution)
    depths = list(range(cas.n_classes))
    train_dir, test_dir = cho_dirs(a.data)
    real = RealData(train_dir, test_dir, cas)
    log(f"model {resolve_model(a.model)}, threads {torch.get_num_threads()}; training the depth classifier")
    clf, clf_info = train_classifier(real, iters=a.clf_iters, seed=a.seed)

    sets: dict[str, dict] = {}
    shown: list[tuple[str, np.ndarray]] = []
    for name, tps in ((f"real, held out (t{TEST_TPS[0]}-{TEST_TPS[-1]})", TEST_TPS),
                      (f"real, training stacks (t{TRAIN_TPS[0]}-{TRAIN_TPS[-1]})", TRAIN_TPS)):
        vols = real_volumes(real, tps, a.resolution)
        sets[name] = {**agreement(vols), "depth": depth_accuracy(clf, vols, depths)}
        if "held out" in name:
            shown.append(("real (held out)", vols[0]))
    timings = {}
    for c in [0.0, *(float(v) for v in a.continuity.split(",") if v.strip())]:
        name = "baseline: independent planes (continuity 0)" if c == 0 else f"generated volume, continuity {c:g}"
        t1 = time.perf_counter()
        vols = np.stack([cas.generate_volume(depths, guidance=a.guidance, continuity_guidance=c,
                                             resolution=a.resolution, seed=a.seed + i, steps=a.steps,
                                             sr_steps=a.sr_steps).images for i in range(a.n_volumes)])
        timings[name] = round((time.perf_counter() - t1) / a.n_volumes, 2)
        sets[name] = {**agreement(vols), "depth": depth_accuracy(clf, vols, depths),
                      "seconds_per_volume": timings[name]}
        shown.append((("baseline (c = 0)" if c == 0 else f"volume (c = {c:g})"), vols[0]))
        log(f"{name}: corr {sets[name]['neighbour_correlation']['mean']:.3f}, "
            f"ssim {sets[name]['neighbour_ssim']['mean']:.3f}, depth acc {sets[name]['depth']['accuracy']:.2f}, "
            f"{timings[name]} s/volume")
    order = [shown[0], *shown[2:], shown[1]]  # real, volumes, baseline last
    fig_xz(img_dir / f"volume_xz{a.tag}.png", order, stretch=max(4, a.resolution // 16))
    fig_planes(img_dir / f"volume_planes{a.tag}{figure_suffix(photo=True)}", order)
    r = {"model": str(resolve_model(a.model)), "command": command("volume", argv), "git_commit": git_commit(),
         "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
         "machine": {"python": platform.python_version(), "torch": torch.__version__,
                     "threads": torch.get_num_threads()},
         "settings": {"resolution": a.resolution, "n_volumes": a.n_volumes, "depths": depths,
                      "guidance": a.guidance, "steps": a.steps, "sr_steps": a.sr_steps, "seed": a.seed,
                      "model_steps": {n: s.info.get("training", {}).get("steps_done") for n, s in cas.stages.items()}},
         "classifier": {k: v for k, v in clf_info.items() if k != "history"},
         "sets": sets, "seconds": round(time.perf_counter() - t0, 1)}
    r = rounded(r)
    (res_dir / f"volume_eval{a.tag}.json").write_text(json.dumps(r, indent=2) + "\n")
    (res_dir / f"volume_eval{a.tag}.md").write_text(markdown(r))
    print(markdown(r))
    return 0


if __name__ == "__main__":
    run(main)
