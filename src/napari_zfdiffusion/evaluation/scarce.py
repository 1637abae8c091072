"""The scarce-data experiment (issue 14): with 1, 2 or 4 real annotated frames, does a paired generator
trained on those frames alone, and the image + mask pairs it makes, help a U-Net trained on them?

    scripts/scarce_data.sh runs/scarce                                       # prepare, train, generate
    python -m napari_zfdiffusion.evaluation.scarce --run runs/scarce --out docs   # score and report

**Prepare** (``--prepare --run RUN --ks 1 2 4``): for each K, K real frames evenly spaced in the HeLa
frames 0-15 (K=1: frame 0; K=2: 0, 8; K=4: 0, 4, 8, 12; frames 16-19 are never used) are written,
with their masks, into ``RUN/kK/real/images`` and ``RUN/kK/real/masks`` (one TIFF per frame), and
``RUN/kK/frames.json`` says which.

The script then trains, for each K, on those frames only: a paired autoencoder and latent diffusion
UNet (``RUN/kK/vae``, ``RUN/kK/ldm``), and generates N image + mask pairs (``RUN/kK/gen/images.tif``,
``labels.tif``); and for each seed S, two U-Nets that differ only in their data: **real**
(``RUN/kK/real_sS``: the K frames) and **mixed** (``RUN/kK/mixed_sS``: the same, with the generated
pairs as half of every batch); with ``RELABEL=1``, a third, **relabelled** (``RUN/kK/relabelled_sS``):
as mixed, but with the generated images' masks remade by the K-frame U-Net of seed 0 (``--relabel``, its
thresholds tuned on the K frames), for when the generator's own masks miss nuclei.

**Score** (``--run RUN --out OUT``): every U-Net on

* **HeLa frames 16-19** (held out: same microscope, same annotation: the Cell Tracking Challenge's
  automatic ERR_SEG masks), and
* **the DSB 2018 image** (an unseen source, manual masks),

by foreground IoU, Dice, object F1 at IoU 0.5 (pooled over the images) and the mean signed boundary
offset. Per K and arm: the mean, standard deviation and range over the seeds; per K: the difference
mixed - real for each seed (the two share the seed: the same crops of the real frames), its mean, and
how many seeds it is positive for. Beside them, Otsu + watershed tuned on the K frames, the baseline a
user with K frames has.

**Why** (the generated pairs themselves): the bundled segmentation U-Net (trained on HeLa frames
0-14; ``--judge``) segments the generated images; the share of its objects that the generated mask
covers (recall) and the share of the generated masks' objects it finds (precision), the objects per
patch against the real frames', and how far each generated image is from its nearest real crop
(median RMS, 4x4 pooled, a measure of diversity: near 0 means the generator repeats its K frames).

Writes ``OUT/results/scarce_data.json`` and ``.md`` and ``OUT/images/scarce_data.png``. Needs the
``eval`` extra (matplotlib).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from ..core.errors import UserInputError
from ._common import PROG, begin, git_commit, log, plt, rounded, run, save_figure, shown_path
from .generalist import COMBOS, Cache, choose_combo, combo_name, model_key, score, seed_scores
from .seg import DSB_IMAGE, DSB_MASK, HELA_IMAGES, HELA_MASKS, MIN_SIZE

TRAIN_FRAMES = 16  # HeLa frames 0-15 may train; 16-19 are the held-out test
TEST_FRAMES = slice(16, 20)
METRICS = ("iou", "dice", "f1", "boundary_offset_px")
ARMS = ("real", "mixed", "relabelled")  # relabelled: mixed, with the generated masks remade by the K-frame U-Net


def frames_for(k: int, n: int = TRAIN_FRAMES) -> list[int]:
    """K frames evenly spaced in 0..n-1, starting at 0 (K=1: [0]; K=2: [0, 8]; K=4: [0, 4, 8, 12])."""
    if not 1 <= k <= n:
        raise UserInputError(f"K must be between 1 and {n} (the HeLa training frames), got {k}.")
    return [int(i * n // k) for i in range(k)]


def _data(data: Path | None) -> Path:
    from ..core.fetch import data_dir, fetch

    if data is None:
        fetch("hela", quiet=True)
        fetch("nuclei2d", quiet=True)
        return data_dir()
    return Path(data)


def relabel(run_dir: Path, ks, seed: int = 0) -> dict:
    """For each K: segment the generated images (``kK/gen/images.tif``) with the K-frame U-Net
    ``kK/real_s{seed}``, its seed and join thresholds tuned on its K frames, and write the labels as
    ``kK/gen/labels_relabelled.tif`` (the masks a lab would get by labelling the generated images with
    what it has). Returns {K: (objects per image, chosen thresholds)}."""
    import tifffile

    from ..core.io import atomic_write
    from ..core.masks import drop_small
    from ..core.segment import Segmenter

    done = {}
    for k in ks:
        kdir = Path(run_dir) / f"k{k}"
        seg = Segmenter.load(kdir / f"real_s{seed}", "cpu")
        st, jt = tuned_on_k_frames(seg, k_frames(kdir))
        images = tifffile.imread(kdir / "gen" / "images.tif")
        labels = seg.segment(images, min_size=MIN_SIZE, probability=False, stack="planes", seed_threshold=st,
                             join_threshold=st if jt is None else jt).labels
        # one label image per generated image, numbered from 1 in each
        out = np.stack([drop_small(lab, 0) for lab in labels]).astype(np.uint16)
        atomic_write(kdir / "gen" / "labels_relabelled.tif", lambda tmp: tifffile.imwrite(tmp, out))
        done[int(k)] = (float(np.mean([len(np.unique(o)) - 1 for o in out])), [st, jt])
        log(f"K={k}: generated images relabelled by real_s{seed} (seeds {st:g}, joins {jt}): "
            f"{done[int(k)][0]:.1f} objects per image -> {shown_path(kdir / 'gen' / 'labels_relabelled.tif')}")
    return done


def k_frames(kdir: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    """The K real frames of ``kdir`` with their masks (as :func:`prepare` wrote them)."""
    import tifffile

    return [(tifffile.imread(p), tifffile.imread(kdir / "real" / "masks" / p.name))
            for p in sorted((kdir / "real" / "images").glob("*.tif"))]


def tuned_on_k_frames(seg, pairs, f1: dict | None = None) -> tuple[float, float | None]:
    """The (seed, join) thresholds of best object F1 on ``pairs`` (the K frames) over :data:`COMBOS`;
    ``f1``: those figures by :func:`combo_name` if already measured."""
    threshold = float(seg.card.get("threshold", 0.5))
    if f1 is None:
        f1 = {combo_name(c): v["f1"] for c, v in seed_scores(seg, pairs, COMBOS, threshold=threshold).items()}
    return choose_combo({c: f1[combo_name(c)] for c in COMBOS}, threshold)


def prepare(run_dir: Path, ks, data: Path | None = None) -> dict:
    """Write the K real frames of each K (see the module docstring); returns {K: frames}."""
    import tifffile

    d = _data(data)
    images, masks = tifffile.imread(d / HELA_IMAGES), tifffile.imread(d / HELA_MASKS)
    done = {}
    for k in ks:
        frames = frames_for(int(k))
        root = Path(run_dir) / f"k{k}"
        for sub in ("images", "masks"):
            folder = root / "real" / sub
            folder.mkdir(parents=True, exist_ok=True)
            for old in folder.glob("*.tif"):
                old.unlink()
        for f in frames:
            tifffile.imwrite(root / "real" / "images" / f"frame{f:02d}.tif", images[f])
            tifffile.imwrite(root / "real" / "masks" / f"frame{f:02d}.tif", masks[f])
        (root / "frames.json").write_text(json.dumps({"k": int(k), "frames": frames, "source": HELA_IMAGES,
                                                      "objects": int(sum(len(np.unique(masks[f])) - 1
                                                                         for f in frames))}, indent=1) + "\n")
        done[int(k)] = frames
        log(f"K={k}: frames {frames} -> {shown_path(root / 'real')}")
    return done


# ------------------------------------------------------------------------------------- scoring
def summary(values: list[float]) -> dict:
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=float)
    if not len(v):
        return {"n": 0}
    return {"n": int(len(v)), "mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
            "min": float(v.min()), "max": float(v.max())}


def paired_difference(real: dict, mixed: dict, metric: str) -> dict:
    """mixed - real for each seed that has both (same seed: same real crops), their mean and sign count."""
    seeds = sorted(set(real) & set(mixed))
    diffs = [mixed[s][metric] - real[s][metric] for s in seeds]
    out = {"seeds": seeds, "differences": diffs, **summary(diffs)}
    out["positive"] = int(sum(d > 0 for d in diffs))
    return out


def tune_otsu(pairs) -> tuple[float, int]:
    """Otsu + watershed's smoothing and peak distance, tuned for object F1 on ``pairs`` (the K frames)."""
    from ..core.masks import otsu_watershed
    from .seg import pooled

    best = None
    for sigma in (1.0, 2.0, 3.0):
        for md in (5, 9, 13):
            f1 = pooled(pairs, lambda im: otsu_watershed(im, sigma=sigma, min_distance=md, min_size=MIN_SIZE))["f1"]
            if best is None or f1 > best[0]:
                best = (f1, sigma, md)
    return best[1], best[2]


def generated_quality(gen_dir: Path, real_pairs, judge, *, n_max: int = 64) -> dict:
    """The generated pairs against what the judge U-Net finds in the generated images, object counts
    against the real frames', and the generated images' distance to their nearest real crop."""
    import tifffile

    from ..core.metrics import match_objects
    from .em import mask_recall

    images = tifffile.imread(gen_dir / "images.tif")[:n_max]
    labels = tifffile.imread(gen_dir / "labels.tif")[:n_max]
    found = judge.segment(images, min_size=MIN_SIZE, probability=False).labels
    recall = mask_recall(found, labels)
    precision = mask_recall(labels, found)  # of the generated masks' objects, those the judge finds
    f1 = [match_objects(m, f)["f1"] for m, f in zip(labels, found)]
    side = images.shape[-1]
    area = side * side
    real_density = [(len(np.unique(m)) - 1) / m.size * area for _, m in real_pairs]
    gen_counts = [len(np.unique(m)) - 1 for m in labels]
    return {"pairs": int(len(images)), "patch": int(side),
            "judge_recall_by_mask": recall["recall"], "mask_precision_by_judge": precision["recall"],
            "object_f1_mask_vs_judge": float(np.mean(f1)) if f1 else None,
            "objects_per_patch": float(np.mean(gen_counts)), "real_objects_per_patch_area": float(np.mean(real_density)),
            "nearest_real_rms_median": nearest_real(images, [im for im, _ in real_pairs]),
            **border_band(images, [im for im, _ in real_pairs])}


def border_band(images: np.ndarray, real: list[np.ndarray], stride: int = 64) -> dict:
    """Mean edge-minus-centre intensity ([0, 1] scale, 16 px frame against the central half; see
    :func:`..core.metrics.edge_profile`) of the generated images and of same-size windows of the real
    frames: a dark or bright frame along the patch border shows as a gap between the two."""
    from ..core.metrics import edge_profile

    side = images.shape[-1]
    windows = [_unit(fr)[y:y + side, x:x + side] for fr in real
               for y in range(0, fr.shape[0] - side + 1, stride) for x in range(0, fr.shape[1] - side + 1, stride)]
    gen = float(np.mean([edge_profile(_unit(g))["edge_minus_centre"] for g in images]))
    ref = float(np.mean([edge_profile(w)["edge_minus_centre"] for w in windows])) if windows else None
    return {"edge_minus_centre": gen, "real_edge_minus_centre": ref}


def _unit(a: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(a, (1, 99.8))
    return np.clip((a.astype(np.float32) - lo) / max(hi - lo, 1e-6), 0, 1)


def nearest_real(images: np.ndarray, real: list[np.ndarray], stride: int = 32, pool: int = 4) -> float:
    """Median over the generated images of the RMS distance ([0, 1] scale, after 4x4 pooling) to the
    nearest window of the real frames (windows every ``stride`` pixels, 8 flips/rotations): how far
    the generator strays from the frames it learned from (near 0: it repeats them)."""
    side = images.shape[-1]

    def pooled(x):
        h, w = x.shape[-2] // pool * pool, x.shape[-1] // pool * pool
        return x[..., :h, :w].reshape(*x.shape[:-2], h // pool, pool, w // pool, pool).mean(axis=(-3, -1))

    windows = []
    for fr in real:
        u = _unit(fr)
        for y in range(0, u.shape[0] - side + 1, stride):
            for x in range(0, u.shape[1] - side + 1, stride):
                w = u[y:y + side, x:x + side]
                for r in range(4):
                    windows += [np.rot90(w, r), np.rot90(w[::-1], r)]
    ref = pooled(np.stack(windows)).reshape(len(windows), -1)
    gen = pooled(np.stack([_unit(g) for g in images])).reshape(len(images), -1)
    d2 = (gen ** 2).sum(1)[:, None] + (ref ** 2).sum(1)[None, :] - 2 * gen @ ref.T
    return float(np.median(np.sqrt(np.maximum(d2.min(1), 0) / gen.shape[1])))


def find_models(run_dir: Path) -> dict:
    """{K: {arm: {seed: folder}}} of the U-Nets under ``run_dir`` (kK/real_sS, kK/mixed_sS)."""
    out: dict = {}
    for kdir in sorted(Path(run_dir).glob("k*")):
        if not kdir.name[1:].isdigit():
            continue
        k = int(kdir.name[1:])
        for arm in ARMS:
            for m in sorted(kdir.glob(f"{arm}_s*")):
                if (m / "model.json").is_file() and m.name.split("_s")[-1].isdigit():
                    out.setdefault(k, {}).setdefault(arm, {})[int(m.name.split("_s")[-1])] = m
    return out


def evaluate(a) -> dict:
    import tifffile

    from ..core.masks import otsu_watershed
    from ..core.segment import Segmenter

    d = _data(a.data)
    hela, hela_gt = tifffile.imread(d / HELA_IMAGES), tifffile.imread(d / HELA_MASKS)
    tests = {"hela_heldout": list(zip(hela[TEST_FRAMES], hela_gt[TEST_FRAMES])),
             "dsb_unseen": [(tifffile.imread(d / DSB_IMAGE), tifffile.imread(d / DSB_MASK))]}
    models = find_models(a.run)
    if not models:
        raise UserInputError(f"no U-Nets in '{a.run}' (kK/real_sS, kK/mixed_sS): run scripts/scarce_data.sh first.")
    judge = Segmenter.load(a.judge, "cpu") if a.judge != "none" else None
    cache = Cache(Path(a.run) / "eval_cache.json")  # figures of the U-Nets already scored (by weights hash)
    result: dict = {"commit": git_commit(), "run": str(a.run), "judge": a.judge, "min_size": MIN_SIZE,
                    "tune_seeds": bool(a.tune_seeds),
                    "tests": {n: {"images": len(p), "objects": int(sum(len(np.unique(m)) - 1 for _, m in p))}
                              for n, p in tests.items()}, "k": {}}
    for k in sorted(models):
        kdir = Path(a.run) / f"k{k}"
        info = json.loads((kdir / "frames.json").read_text()) if (kdir / "frames.json").is_file() else {"k": k}
        real_pairs = k_frames(kdir)
        kr: dict = {"frames": info.get("frames"), "objects": info.get("objects"), "arms": {}, "models": {},
                    "generator": generator_recipe(kdir)}
        sigma, md = tune_otsu(real_pairs)
        kr["otsu"] = {"sigma": sigma, "min_distance": md,
                      **{t: score(p, lambda im: otsu_watershed(im, sigma=sigma, min_distance=md, min_size=MIN_SIZE))
                         for t, p in tests.items()}}
        for arm, seeds in models[k].items():
            per_seed, untuned, chosen = {}, {}, {}
            for s, folder in seeds.items():
                t0 = time.perf_counter()
                seg = Segmenter.load(folder, "cpu")
                key = model_key(folder)

                def scores(g=seg, **kw):
                    return {t: score(p, lambda im: g.segment(im, min_size=MIN_SIZE, probability=False, **kw).labels)
                            for t, p in tests.items()}

                untuned[s] = cache.get(f"{key}|tests", scores)
                if a.tune_seeds and seg.has_interior:  # the seed and join thresholds a lab would tune on its K frames
                    f1 = cache.get(f"{key}|tune on K frames", lambda g=seg: {combo_name(c): v["f1"] for c, v in seed_scores(
                        g, real_pairs, COMBOS, threshold=float(g.card.get("threshold", 0.5))).items()})
                    st, jt = tuned_on_k_frames(seg, real_pairs, f1)
                    chosen[s] = [st, jt]
                    per_seed[s] = cache.get(f"{key}|tests {combo_name((st, jt))}", lambda: scores(
                        seed_threshold=st, join_threshold=st if jt is None else jt))
                else:
                    per_seed[s] = untuned[s]
                tr = json.loads((folder / "unet" / "stage.json").read_text())["training"]
                kr["models"][folder.name] = {"steps": tr.get("steps_done"), "train_seconds": tr.get("train_seconds"),
                                             "extra_fraction": tr.get("extra_fraction")}
                log(f"K={k} {arm} seed {s}: " + ", ".join(
                    f"{t} IoU {r['iou']:.3f} F1 {r['f1']:.3f}" for t, r in per_seed[s].items())
                    + f" ({time.perf_counter() - t0:.0f} s)")
            kr["arms"][arm] = {"per_seed": {str(s): v for s, v in per_seed.items()},
                               "seeds_joins_tuned_on_k_frames": {str(s): v for s, v in chosen.items()},
                               "f1_seeds_at_threshold": {str(s): {t: v[t]["f1"] for t in v} for s, v in untuned.items()},
                               **{t: {m: summary([per_seed[s][t][m] for s in per_seed]) for m in METRICS}
                                  for t in tests}}
        for other in ARMS[1:]:
            if "real" in models[k] and other in models[k]:
                kr[f"{other}_minus_real"] = {t: {m: paired_difference(
                    {s: v[t] for s, v in _seeds(kr, "real").items()}, {s: v[t] for s, v in _seeds(kr, other).items()}, m)
                    for m in METRICS} for t in tests}
        gen = kdir / "gen"
        if judge is not None and (gen / "labels.tif").is_file():
            kr["generated"] = generated_quality(gen, real_pairs, judge)
            g = kr["generated"]
            log(f"K={k} generated pairs: judge's objects covered by the mask {g['judge_recall_by_mask'] or 0:.3f}, "
                f"mask objects the judge finds {g['mask_precision_by_judge'] or 0:.3f}, objects/patch "
                f"{g['objects_per_patch']:.1f} (real {g['real_objects_per_patch_area']:.1f}), nearest real RMS "
                f"{g['nearest_real_rms_median']:.3f}")
        result["k"][str(k)] = kr
    return result


def generator_recipe(kdir: Path) -> dict:
    """What the K frames' generator was trained with (from its cards): steps and held-out figures of the
    autoencoder, steps and size of the latent UNet, and the number of pairs generated."""
    import tifffile

    def card(sub):
        f = kdir / sub / "model.json"
        return json.loads(f.read_text()) if f.is_file() else {}

    vae, ldm = card("vae"), card("ldm")
    v = vae.get("validation") or {}
    out = {"vae_steps": vae.get("steps"), "vae_psnr": v.get("psnr"), "vae_ssim": v.get("ssim"),
           "vae_mask_dice": v.get("mask_dice"), "vae_edge_minus_centre": v.get("edge_minus_centre_shift")}
    stage = kdir / "ldm" / "unet" / "stage.json"
    tr = json.loads(stage.read_text()).get("training", {}) if stage.is_file() else {}
    out.update(ldm_steps=tr.get("steps_done", ldm.get("steps")), ldm_size=tr.get("size"),
               ldm_seconds=tr.get("train_seconds"))
    labels = kdir / "gen" / "labels.tif"
    if labels.is_file():
        with tifffile.TiffFile(labels) as t:
            shape = t.series[0].shape
        out["pairs"] = int(shape[0]) if len(shape) == 3 else 1
    return out


def _seeds(kr: dict, arm: str) -> dict:
    return {int(s): v for s, v in kr["arms"][arm]["per_seed"].items()}


# ------------------------------------------------------------------------------------- report
def _ms(d: dict, nd: int = 3) -> str:
    if not d.get("n"):
        return "n/a"
    return f"{d['mean']:.{nd}f} ± {d['std']:.{nd}f}" if d["n"] > 1 else f"{d['mean']:.{nd}f}"


def write_markdown(result: dict, path: Path) -> None:
    lines = ["# The scarce-data experiment", "",
             f"U-Nets trained on K real HeLa frames (real) and on the same with generated pairs as half of every "
             f"batch (mixed); mean ± standard deviation over the seeds"
             + ("; each U-Net's seed and join thresholds tuned on its own K frames" if result.get("tune_seeds") else "")
             + f". Commit {result.get('commit')}.", ""]
    for test in result["tests"]:
        t = result["tests"][test]
        lines += [f"## {test} ({t['images']} image(s), {t['objects']} objects)", "",
                  "| K | arm | seeds | foreground IoU | Dice | object F1 (IoU 0.5) | boundary offset (px) |",
                  "|---|---|---|---|---|---|---|"]
        for k, kr in result["k"].items():
            o = kr["otsu"][test]
            lines.append(f"| {k} | Otsu + watershed (tuned on the K frames) | - | {o['iou']:.3f} | {o['dice']:.3f} | "
                         f"{o['f1']:.3f} | {o['boundary_offset_px']:+.2f} |")
            for arm in ARMS:
                if arm not in kr["arms"]:
                    continue
                r = kr["arms"][arm][test]
                lines.append(f"| {k} | {arm} | {r['f1'].get('n', 0)} | {_ms(r['iou'])} | {_ms(r['dice'])} | "
                             f"{_ms(r['f1'])} | {_ms(r['boundary_offset_px'], 2)} |")
            for other in ARMS[1:]:
                diff = (kr.get(f"{other}_minus_real") or {}).get(test)
                if diff:
                    f1, iou = diff["f1"], diff["iou"]
                    lines.append(f"| {k} | {other} - real (paired by seed) | {f1.get('n', 0)} | {_ms(iou)} "
                                 f"({iou['positive']}/{iou.get('n', 0)} > 0) | | {_ms(f1)} "
                                 f"({f1['positive']}/{f1.get('n', 0)} > 0) | |")
        lines.append("")
    recipes = {k: kr["generator"] for k, kr in result["k"].items() if kr.get("generator", {}).get("vae_steps")}
    if recipes:
        lines += ["## The generators (trained on the K frames only)", "",
                  "| K | frames | autoencoder steps | held-out PSNR / SSIM / mask Dice | edge - centre (reconstructed) "
                  "| latent UNet steps (size) | pairs |", "|---|---|---|---|---|---|---|"]
        for k, g in recipes.items():
            fig = " / ".join(f"{g[x]:.3f}" if isinstance(g.get(x), (int, float)) else "n/a"
                             for x in ("vae_psnr", "vae_ssim", "vae_mask_dice"))
            edge = g.get("vae_edge_minus_centre")
            lines.append(f"| {k} | {result['k'][k].get('frames')} | {g['vae_steps']} | {fig} | "
                         f"{'n/a' if edge is None else f'{edge:+.3f}'} | {g.get('ldm_steps')} ({g.get('ldm_size')}) | "
                         f"{g.get('pairs', 'n/a')} |")
        lines.append("")
    gens = {k: kr["generated"] for k, kr in result["k"].items() if kr.get("generated")}
    if gens:
        lines += ["## The generated pairs", "",
                  f"Judged by `{result['judge']}` (its HeLa training frames are 0-14; frames 16-19 are the test).", "",
                  "| K | pairs | judge's objects the mask covers | mask objects the judge finds | objects per patch "
                  "(real, same area) | nearest real window, median RMS | edge - centre (real windows) |",
                  "|---|---|---|---|---|---|---|"]
        for k, g in gens.items():
            lines.append(f"| {k} | {g['pairs']} | {g['judge_recall_by_mask'] or 0:.3f} | "
                         f"{g['mask_precision_by_judge'] or 0:.3f} | {g['objects_per_patch']:.1f} "
                         f"({g['real_objects_per_patch_area']:.1f}) | {g['nearest_real_rms_median']:.3f} | "
                         + (f"{g['edge_minus_centre']:+.3f} ({g['real_edge_minus_centre']:+.3f})"
                            if g.get("real_edge_minus_centre") is not None else "n/a") + " |")
        lines.append("")
    path.write_text("\n".join(lines) + "\n")


def figure(result: dict, path: Path) -> None:
    p = plt()
    tests = list(result["tests"])
    fig, axes = p.subplots(1, len(tests), figsize=(5.2 * len(tests), 3.8), squeeze=False)
    ks = sorted(int(k) for k in result["k"])
    for ax, test in zip(axes[0], tests):
        for arm, colour, dx in (("real", "tab:blue", -0.06), ("mixed", "tab:orange", 0.06),
                                ("relabelled", "tab:green", 0.12)):
            for k in ks:
                ps = (result["k"][str(k)]["arms"].get(arm) or {}).get("per_seed") or {}
                ys = [v[test]["f1"] for v in ps.values()]
                ax.scatter([np.log2(k) + dx] * len(ys), ys, color=colour, s=14, alpha=0.6)
            means = [(result["k"][str(k)]["arms"].get(arm) or {}).get(test, {}).get("f1", {}).get("mean")
                     for k in ks]
            ax.plot([np.log2(k) + dx for k, m in zip(ks, means) if m is not None], [m for m in means if m is not None],
                    "o-", color=colour, label=arm)
        ax.plot(np.log2(ks), [result["k"][str(k)]["otsu"][test]["f1"] for k in ks], "s--", color="grey",
                label="Otsu + watershed")
        ax.set_xticks(np.log2(ks), [str(k) for k in ks])
        ax.set_xlabel("real annotated frames (K)")
        ax.set_ylabel("object F1 (IoU 0.5)")
        ax.set_title(test)
        ax.set_ylim(0, 1)
        ax.legend(fontsize=8)
    fig.suptitle("Scarce data: U-Nets on K real frames, without and with generated pairs (dots: seeds)")
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    p.close(fig)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog=PROG + "scarce", description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, required=True, help="the experiment's folder (see scripts/scarce_data.sh)")
    ap.add_argument("--prepare", action="store_true", help="write the K real frames of each K into --run, and stop")
    ap.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4], help="numbers of real frames (with --prepare "
                                                                         "or --relabel)")
    ap.add_argument("--relabel", action="store_true",
                    help="segment each K's generated images with its real_s0 U-Net (thresholds tuned on the K frames) "
                         "into kK/gen/labels_relabelled.tif, and stop (for the 'relabelled' arm)")
    ap.add_argument("--out", type=Path, default=None, help="writes OUT/results/scarce_data.{json,md} and "
                                                           "OUT/images/scarce_data.png")
    ap.add_argument("--judge", default="nuclei-unet-demo",
                    help="segmentation model that judges the generated pairs ('none': skip)")
    ap.add_argument("--data", type=Path, default=None, help=f"folder with {HELA_IMAGES}, {HELA_MASKS}, {DSB_IMAGE}, "
                                                            f"{DSB_MASK} (default: the fetched data)")
    ap.add_argument("--no-tune-seeds", dest="tune_seeds", action="store_false",
                    help="score each U-Net with its seeds at the foreground threshold, instead of with the seed and "
                         "join thresholds tuned on its own K frames")
    ap.add_argument("--threads", type=int, default=None)
    return ap.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.prepare:
        prepare(a.run, a.ks, a.data)
        return 0
    if a.relabel:
        relabel(a.run, a.ks)
        return 0
    if a.out is None:
        raise UserInputError("give --out (where the results go), or --prepare.")
    img_dir, res_dir = begin(a)
    result = evaluate(a)
    out = res_dir / "scarce_data.json"
    out.write_text(json.dumps(rounded(result), indent=1, default=float) + "\n")
    write_markdown(result, out.with_suffix(".md"))
    figure(result, img_dir / "scarce_data.png")
    log(f"wrote {shown_path(out)}, {shown_path(out.with_suffix('.md'))} and {shown_path(img_dir / 'scarce_data.png')}")
    return 0


if __name__ == "__main__":
    run(main)
