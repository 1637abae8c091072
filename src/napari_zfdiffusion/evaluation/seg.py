"""Evaluate segmentation U-Nets against a classical baseline, and the generated-to-real experiment.

    python -m napari_zfdiffusion.evaluation.seg --run runs/seg --threads 2 --out docs

``--run`` is the folder written by ``scripts/train_demo_unet.sh``: ``real/`` (U-Net on real HeLa frames
0-15), ``synth/`` (on generated pairs only), ``mixed/`` (both) and ``gen/`` (the generated pairs).
Test data, never seen in training:

* **HeLa frames 16-19** (Fluo-N2DL-HeLa, Cell Tracking Challenge) against the challenge's automatic
  segmentation ERR_SEG (the same kind of masks the models trained on);
* **DSB 2018 nuclei** (stardist's img2d.tif, 512x512) against its *manual* instance masks: another
  microscope and lab, so an out-of-domain check with human ground truth.

Methods: the Otsu + distance-watershed baseline (``core.masks.otsu_watershed``; its smoothing and
peak distance tuned for the best object F1 on the *training* frames 0-15, as the U-Net saw them) and
each U-Net, with labels from the interior watershed and, as an ablation of the interior output, by
connected components of the foreground alone. Every method uses minimum object size 16 px.

Also: tiled prediction (tile 256, overlap 32 and 64) against one whole-image pass on HeLa frame 17.
``--tag _no_intensity_aug`` with a run trained by ``UNET_EXTRA=--no-intensity-aug
scripts/train_demo_unet.sh`` reproduces the first, failed models.

Figures (pooled over the test images of a set): foreground IoU and Dice; objects matched at IoU > 0.5
give precision, recall and F1 (and the mean IoU of the matched pairs). Writes
``OUT/results/seg_eval.json``, ``OUT/results/seg_eval.md`` and figures ``OUT/images/seg_*.png``
(``--tag`` appended to each name). The test data are the fetched data sets (``--data``: a folder laid
out like the fetched-data folder instead). Needs the ``eval`` extra (matplotlib).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from ._common import PROG, git_commit, output_dirs, plt, run, save_figure, set_threads, shown_path

MIN_SIZE = 16
# The fetched test data, as paths inside the fetched-data folder (or --data).
HELA_IMAGES, HELA_MASKS = "hela/Fluo_Hela_02_img.tif", "hela/Fluo_Hela_02_ERR_SEG.tif"
DSB_IMAGE, DSB_MASK = "nuclei2d/img2d.tif", "nuclei2d/mask2d.tif"


def pooled(pairs, labels_fn) -> dict:
    """Foreground IoU/Dice and object P/R/F1 pooled over (image, truth) pairs; labels_fn(image) -> labels."""
    from ..core.metrics import match_objects

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


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog=PROG + "seg", description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, default=Path("runs") / "seg",
                    help="folder of real/, synth/, mixed/ (U-Nets) and gen/ (generated pairs), as written by "
                         "scripts/train_demo_unet.sh (default: runs/seg)")
    ap.add_argument("--models", nargs="+", default=["real", "synth", "mixed"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, required=True,
                    help="writes OUT/results/seg_eval.{json,md} and OUT/images/seg_*.png")
    ap.add_argument("--tag", default="", help="suffix for the result and figure names, e.g. _no_intensity_aug")
    ap.add_argument("--data", type=Path, default=None,
                    help=f"folder with {HELA_IMAGES}, {HELA_MASKS} (20 frames: 0-15 tune the baseline, 16-19 "
                         f"test), {DSB_IMAGE} and {DSB_MASK}; default: the fetched data (fetched if missing)")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    plt()  # the figures need matplotlib: say so now
    img_dir, res_dir = output_dirs(a.out)
    out_json = res_dir / f"seg_eval{a.tag}.json"

    import tifffile

    from ..core.fetch import data_dir, fetch
    from ..core.masks import otsu_watershed
    from ..core.segment import Segmenter

    set_threads(a.threads)
    if a.data is None:
        fetch("hela", quiet=True)
        fetch("nuclei2d", quiet=True)
    d = data_dir() if a.data is None else a.data
    hela = tifffile.imread(d / HELA_IMAGES)
    hela_gt = tifffile.imread(d / HELA_MASKS)
    sets = {
        "hela_test": list(zip(hela[16:], hela_gt[16:])),
        "dsb_manual": [(tifffile.imread(d / DSB_IMAGE), tifffile.imread(d / DSB_MASK))],
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
    out_json.write_text(json.dumps(result, indent=2, default=float) + "\n")
    write_markdown(result, out_json.with_suffix(".md"))
    figures(sets, methods, segs, a, img_dir)
    print(f"wrote {shown_path(out_json)}, {shown_path(out_json.with_suffix('.md'))} and figures in "
          f"{shown_path(img_dir)}")
    return 0


def tiling_check(seg, image, overlaps=(32, 64)) -> dict:
    """Tiled prediction (tile 256, as in use) against one whole-image pass of the same network."""
    import torch

    from ..core.tiling import predict_tiled

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


def crop_window(shape, y: int, x: int, s: int) -> tuple[slice, slice]:
    """The s x s window at (y, x), moved inside an image too small for it (smaller images: all of it)."""
    y, x = min(y, max(0, shape[0] - s)), min(x, max(0, shape[1] - s))
    return slice(y, y + s), slice(x, x + s)


def figures(sets, methods, segs, a, img_dir: Path) -> None:
    pyplot = plt()
    from ..core.images import Normalisation

    norm = Normalisation(1, 99.8)
    show = ["Otsu + watershed"] + [f"U-Net {n}" for n in segs]
    for set_name, (y, x, s) in (("hela_test", (200, 380, 300)), ("dsb_manual", (0, 0, 512))):
        img, truth = sets[set_name][0]
        fig, axes = pyplot.subplots(1, len(show) + 1, figsize=(3.2 * (len(show) + 1), 3.4))
        crop = crop_window(img.shape, y, x, s)
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
        save_figure(fig, img_dir / f"seg_{set_name}{a.tag}.png", dpi=110)
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
        save_figure(fig, img_dir / f"seg_generated_pairs{a.tag}.png", dpi=100)
        pyplot.close(fig)


if __name__ == "__main__":
    run(main)
