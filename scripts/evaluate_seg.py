#!/usr/bin/env python
"""Evaluate segmentation U-Nets against a classical baseline, and the generated-to-real experiment.

    .venv/bin/python scripts/evaluate_seg.py --run runs/seg --threads 2

``--run`` is the folder written by ``scripts/train_demo_unet.sh``: ``real/`` (U-Net on real HeLa frames
0-15), ``synth/`` (on generated pairs only), ``mixed/`` (both) and ``gen/`` (the generated pairs).
Test data, never seen in training:

* **HeLa frames 16-19** (Fluo-N2DL-HeLa, Cell Tracking Challenge) against the challenge's automatic
  segmentation ERR_SEG (the same kind of masks the models trained on);
* **DSB 2018 nuclei** (stardist's img2d.tif, 512x512) against its *manual* instance masks: another
  microscope and lab, so an out-of-domain check with human ground truth.

Methods: the Otsu + distance-watershed baseline (``core.segment.otsu_watershed``; its smoothing and
peak distance tuned for the best object F1 on the *training* frames 0-15, as the U-Net saw them) and
each U-Net, with labels from the interior watershed and, as an ablation of the interior output, by
connected components of the foreground alone. Every method uses minimum object size 16 px.

Also: tiled prediction (tile 256, overlap 32 and 64) against one whole-image pass on HeLa frame 17.
``--tag _no_intensity_aug`` with a run trained by ``UNET_EXTRA=--no-intensity-aug
scripts/train_demo_unet.sh`` reproduces the first, failed models.

Figures (pooled over the test images of a set): foreground IoU and Dice; objects matched at IoU > 0.5
give precision, recall and F1 (and the mean IoU of the matched pairs). Writes
``docs/results/seg_eval.json``, ``docs/results/seg_eval.md`` and figures ``docs/images/seg_*.png``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _evalutil import ROOT, git_commit, plt  # noqa: E402

MIN_SIZE = 16


def pooled(pairs, labels_fn) -> dict:
    """Foreground IoU/Dice and object P/R/F1 pooled over (image, truth) pairs; labels_fn(image) -> labels."""
    from napari_zfdiffusion.core.metrics import match_objects

    inter = union = ps = ts = tp = fp = fn = 0
    matched, per_image, secs = [], [], 0.0
    for img, truth in pairs:
        t0 = time.perf_counter()
        pred = labels_fn(img)
        secs += time.perf_counter() - t0
        p, t = pred > 0, truth > 0
        inter += int((p & t).sum())
        union += int((p | t).sum())
        ps, ts = ps + int(p.sum()), ts + int(t.sum())
        m = match_objects(truth, pred)
        tp, fp, fn = tp + m["tp"], fp + m["fp"], fn + m["fn"]
        if m["tp"]:
            matched.append((m["matched_iou"], m["tp"]))
        per_image.append(m["f1"])
    return {
        "iou": inter / union, "dice": 2 * inter / (ps + ts), "precision": tp / max(tp + fp, 1),
        "recall": tp / max(tp + fn, 1), "f1": 2 * tp / max(2 * tp + fp + fn, 1), "tp": tp, "fp": fp, "fn": fn,
        "matched_iou": sum(a * b for a, b in matched) / max(sum(b for _, b in matched), 1),
        "f1_per_image": per_image, "seconds": round(secs, 2),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, default=ROOT / "runs" / "seg")
    ap.add_argument("--models", nargs="+", default=["real", "synth", "mixed"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out-json", type=Path, default=ROOT / "docs" / "results" / "seg_eval.json")
    ap.add_argument("--figures", type=Path, default=ROOT / "docs" / "images")
    ap.add_argument("--tag", default="", help="suffix for the result and figure names, e.g. _no_intensity_aug")
    a = ap.parse_args()
    if a.tag:
        a.out_json = a.out_json.with_name(f"{a.out_json.stem}{a.tag}.json")

    import tifffile
    import torch

    from napari_zfdiffusion.core.fetch import data_dir, fetch
    from napari_zfdiffusion.core.segment import Segmenter, otsu_watershed

    torch.set_num_threads(a.threads)
    fetch("hela", quiet=True)
    fetch("nuclei2d", quiet=True)
    d = data_dir()
    hela = tifffile.imread(d / "hela" / "Fluo_Hela_02_img.tif")
    hela_gt = tifffile.imread(d / "hela" / "Fluo_Hela_02_ERR_SEG.tif")
    sets = {
        "hela_test": list(zip(hela[16:], hela_gt[16:])),
        "dsb_manual": [(tifffile.imread(d / "nuclei2d" / "img2d.tif"), tifffile.imread(d / "nuclei2d" / "mask2d.tif"))],
    }
    train_pairs = list(zip(hela[:16], hela_gt[:16]))
    result: dict = {"commit": git_commit(), "threads": a.threads, "min_size": MIN_SIZE, "sets": {}, "models": {},
                    "data": {
                        "real_training": {"frames": 16, "shape": list(hela.shape[1:]),
                                          "objects": int(sum(len(np.unique(m)) - 1 for m in hela_gt[:16]))},
                        "hela_test": {"frames": 4, "objects": int(sum(len(np.unique(m)) - 1 for m in hela_gt[16:]))},
                        "dsb_manual": {"images": 1, "objects": int(len(np.unique(sets["dsb_manual"][0][1])) - 1)},
                    }}
    gen_labels = a.run / "gen" / "labels.tif"
    if gen_labels.is_file():
        gl = tifffile.imread(gen_labels)
        result["data"]["generated"] = {"pairs": len(gl), "shape": list(gl.shape[1:]),
                                       "objects": int(sum(len(np.unique(m)) - 1 for m in gl))}

    # the baseline, tuned on the training frames
    best = None
    for sigma in (1.0, 2.0, 3.0):
        for md in (5, 9, 13):
            f1 = pooled(train_pairs[::4], lambda im: otsu_watershed(im, sigma=sigma, min_distance=md,
                                                                    min_size=MIN_SIZE))["f1"]
            if best is None or f1 > best[0]:
                best = (f1, sigma, md)
    _, sigma, md = best
    result["baseline"] = {"sigma": sigma, "min_distance": md, "train_f1": best[0]}
    print(f"baseline tuned on training frames: sigma {sigma}, min_distance {md} (F1 {best[0]:.3f})")

    methods = {"Otsu + watershed": lambda im: otsu_watershed(im, sigma=sigma, min_distance=md, min_size=MIN_SIZE)}
    segs = {}
    for name in a.models:
        folder = a.run / name
        if not (folder / "model.json").is_file():
            print(f"skipping {name}: no model in {folder}")
            continue
        seg = segs[name] = Segmenter.load(folder, "cpu")
        result["models"][name] = {"card": json.loads((folder / "model.json").read_text()),
                                  "train_seconds": json.loads((folder / "unet" / "stage.json").read_text())
                                  ["training"]["train_seconds"]}
        methods[f"U-Net {name}"] = lambda im, s=seg: s.segment(im, min_size=MIN_SIZE).labels
        methods[f"U-Net {name}, no interior"] = lambda im, s=seg: s.segment(im, min_size=MIN_SIZE,
                                                                           use_interior=False).labels
    for set_name, pairs in sets.items():
        result["sets"][set_name] = {}
        for mname, fn in methods.items():
            r = pooled(pairs, fn)
            result["sets"][set_name][mname] = r
            print(f"{set_name:10s} {mname:30s} IoU {r['iou']:.3f} Dice {r['dice']:.3f} P {r['precision']:.3f} "
                  f"R {r['recall']:.3f} F1 {r['f1']:.3f} ({r['seconds']} s)")
    if gen_labels.is_file() and "real" in segs:
        # a generated stack, segmented by the U-Net trained on real data, against the generator's own
        # masks: how well do generated masks fit generated images, by the judgement of a real-trained model?
        gi = tifffile.imread(a.run / "gen" / "images.tif")[-64:]  # the last 64 of the pairs
        gpairs = list(zip(gi, tifffile.imread(gen_labels)[-64:]))
        result["generated_vs_own_masks"] = {m: pooled(gpairs, methods[m]) for m in ("Otsu + watershed", "U-Net real")}
        for m, r in result["generated_vs_own_masks"].items():
            print(f"generated  {m:30s} IoU {r['iou']:.3f} Dice {r['dice']:.3f} F1 {r['f1']:.3f} (vs the generator's masks)")
    if "real" in segs:
        result["tiling_vs_whole"] = tiling_check(segs["real"], hela[17])
        for ov, r in result["tiling_vs_whole"].items():
            print(f"tiled (overlap {ov}) vs whole pass on HeLa frame 17: mean |diff| {r['mean_abs']:.1e}, "
                  f"max {r['max_abs']:.3f}, mask pixels flipped {r['flipped_percent']:.4f} %")
    a.out_json.parent.mkdir(parents=True, exist_ok=True)
    a.out_json.write_text(json.dumps(result, indent=2, default=float) + "\n")
    write_markdown(result, a.out_json.with_suffix(".md"))
    figures(sets, methods, segs, a)
    print(f"wrote {a.out_json}, {a.out_json.with_suffix('.md')} and figures in {a.figures}")
    return 0


def tiling_check(seg, image, overlaps=(32, 64)) -> dict:
    """Tiled prediction (tile 256, as in use) against one whole-image pass of the same network."""
    import torch

    from napari_zfdiffusion.core.tiling import predict_tiled

    plane, _ = seg.normalise(image)
    with torch.no_grad():
        whole = seg._fn(torch.from_numpy(plane)[None, None]).numpy()[0]
    out = {}
    for ov in overlaps:
        tiled = predict_tiled(seg._fn, plane, tile=256, overlap=ov, out_channels=whole.shape[0],
                              align=seg.net.multiple)
        d = np.abs(tiled - whole)
        out[ov] = {"mean_abs": float(d.mean()), "max_abs": float(d.max()),
                   "flipped_percent": float(((tiled[0] >= 0.5) != (whole[0] >= 0.5)).mean() * 100)}
    return out


def write_markdown(result: dict, path: Path) -> None:
    lines = []
    for set_name, rows in result["sets"].items():
        lines += [f"### {set_name}", "", "| method | foreground IoU | Dice | precision | recall | object F1 (IoU 0.5) "
                  "| matched IoU | seconds |", "|---|---|---|---|---|---|---|---|"]
        for m, r in rows.items():
            lines.append(f"| {m} | {r['iou']:.3f} | {r['dice']:.3f} | {r['precision']:.3f} | {r['recall']:.3f} | "
                         f"{r['f1']:.3f} | {r['matched_iou']:.3f} | {r['seconds']} |")
        lines.append("")
    path.write_text("\n".join(lines))


def outlines(ax, labels, color):
    from skimage.segmentation import find_boundaries

    b = find_boundaries(labels, mode="inner")
    rgba = np.zeros((*labels.shape, 4))
    rgba[b] = color
    ax.imshow(rgba, interpolation="nearest")


def figures(sets, methods, segs, a) -> None:
    pyplot = plt()
    from napari_zfdiffusion.core.data import Normalisation

    norm = Normalisation(1, 99.8)
    show = ["Otsu + watershed"] + [f"U-Net {n}" for n in segs]
    for set_name, (y, x, s) in (("hela_test", (200, 380, 300)), ("dsb_manual", (0, 0, 512))):
        img, truth = sets[set_name][0]
        fig, axes = pyplot.subplots(1, len(show) + 1, figsize=(3.2 * (len(show) + 1), 3.4))
        crop = (slice(y, y + s), slice(x, x + s))
        view = norm.apply(img)[crop]
        axes[0].imshow(view, cmap="gray")
        outlines(axes[0], truth[crop], (1, 1, 0, 1))
        axes[0].set_title("ground truth")
        for ax, m in zip(axes[1:], show):
            lab = methods[m](img)
            ax.imshow(view, cmap="gray")
            outlines(ax, lab[crop], (0, 1, 1, 1))
            ax.set_title(m, fontsize=9)
        for ax in axes:
            ax.axis("off")
        fig.tight_layout()
        fig.savefig(a.figures / f"seg_{set_name}{a.tag}.png", dpi=110)
        pyplot.close(fig)
    gen = a.run / "gen"
    if (gen / "labels.tif").is_file():
        import tifffile

        ims, labs = tifffile.imread(gen / "images.tif")[-6:], tifffile.imread(gen / "labels.tif")[-6:]
        real = segs.get("real")
        fig, axes = pyplot.subplots(2 if real else 1, 6, figsize=(16, 6.2 if real else 3), squeeze=False)
        for i, (im, lab) in enumerate(zip(ims, labs)):
            axes[0, i].imshow(im, cmap="gray", vmin=0, vmax=1)
            outlines(axes[0, i], lab, (0, 1, 1, 1))
            if real:
                axes[1, i].imshow(im, cmap="gray", vmin=0, vmax=1)
                outlines(axes[1, i], real.segment(im, min_size=MIN_SIZE).labels, (1, 0.3, 1, 1))
        for ax in axes.ravel():
            ax.axis("off")
        fig.suptitle("generated pairs (nuclei-ldm-demo). Top: the generator's own masks (cyan). "
                     "Bottom: the U-Net trained on real frames, on the same generated images (magenta)")
        fig.tight_layout()
        fig.savefig(a.figures / f"seg_generated_pairs{a.tag}.png", dpi=100)
        pyplot.close(fig)


if __name__ == "__main__":
    sys.exit(main())
