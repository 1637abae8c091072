"""Leave-one-source-out evaluation of the generalist segmentation U-Net, with 3D instances (issue 14).

    python -m napari_zfdiffusion.evaluation.generalist --run runs/seggen --threads 2 --out docs

``--run`` is the folder of ``scripts/train_seg_generalist.sh``: ``all/`` (trained on the training
planes of every annotated nuclei source) and ``without_NAME/`` (the same without source NAME). The
sources are those of ``zfdiffusion fetch-data --dataset seg`` (HeLa, CHO, cells3d nuclei, DSB 2018;
time series split by time, cells3d's stack and DSB's image by columns: a test plane never
neighbours a training plane).

For each source NAME:

* **held out**, on up to ``--held-out-planes`` (20) whole planes of NAME, evenly spaced (its training and
  test parts together: the model never saw either; column splits joined back into whole planes):
  ``without_NAME`` against Otsu + distance watershed tuned
  (smoothing, peak distance) for object F1 on the *other* sources' training planes: the baseline a
  user would tune on what they have; and ``without_NAME`` with its seed and join thresholds tuned as
  ``--tune-seed-threshold`` tunes them, on its *own* training planes (``--tune-planes`` per source);
* **in domain**, on NAME's test planes: ``all`` and, with ``--before MODEL``, a previous model, with
  the image as it is and with ``diameter="auto"``;
* and the bacteria (phase contrast, another shape class: not in any training set) as a check of
  what the model is not for.

Figures: foreground IoU and Dice, object F1 at IoU 0.5 (pooled over the test planes), and the mean
signed boundary offset (pixels; + when the predicted outline lies outside the annotated one, measured
on predicted outline pixels within 10 px of an annotated object). 3D: the cells3d test part (its
right quarter, all 60 planes) and CHO's test time points, segmented as volumes (planes linked) and as planes, scored by
3D object F1 at IoU 0.5 against the 3D labels. Writes ``OUT/results/seg_generalist.json`` and
``.md`` and ``OUT/images/seg_generalist_sources.jpg``. Needs the ``eval`` extra (matplotlib).

**The seed and join thresholds** (where the watershed's seeds begin in the centre output, separate
from the foreground threshold; and above which the cores of one object join into one seed)::

    python -m napari_zfdiffusion.evaluation.generalist --tune-seed-threshold nuclei-unet-demo --threads 1 --out docs

tunes them on the *training* planes of the model's training sources (those its card lists; ``--planes
N``: N evenly spaced planes per source instead of all): the probabilities of each plane once, then
object F1 at IoU 0.5 (pooled per source) for every seed threshold of 0.2, 0.25, ..., 0.6, alone and
with each join threshold of 0.15, ..., 0.5 below it (:data:`COMBOS`); the pair with the best mean F1
over the sources is chosen (ties: no joining, then the seed threshold nearest the foreground
threshold). Only then are the test planes of each source (and the bacteria) scored: seeds at the
foreground threshold (as before), the best seed threshold alone, and the chosen pair. Writes
``OUT/results/seg_seed_threshold.json`` and ``.md``; ``--write-card`` also stores the chosen values as
``seed_threshold`` and ``join_threshold`` in the model's model.json (which
:meth:`..core.segment.Segmenter.segment` then uses by default).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from ._common import PROG, figure_suffix, git_commit, output_dirs, plt, run, save_figure, set_threads, shown_path
from .seg import MIN_SIZE, crop_window, outlines, pooled

SOURCES = ("hela", "cho", "nuclei3d", "dsb")
OTHER = ("bacteria",)
NUCLEI3D_TEST_X = 192  # the right quarter of nuclei.tif (every plane) is cells3d's test part
GRID = [(s, d) for s in (1.0, 2.0, 3.0) for d in (5, 9, 13)]
SEED_GRID = tuple(round(0.2 + 0.05 * i, 2) for i in range(9))  # seed thresholds tried: 0.2, 0.25, ..., 0.6
JOIN_GRID = (0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5)  # join thresholds tried below each seed threshold
#: (seed threshold, join threshold or None) pairs the tuning tries
COMBOS = tuple([(st, None) for st in SEED_GRID] + [(st, jt) for st in SEED_GRID for jt in JOIN_GRID if jt < st])


def combo_name(combo) -> str:
    """``0.45`` (seeds only) or ``0.45 j0.3`` (cores joined above 0.3): the key of a tuning result."""
    st, jt = combo if isinstance(combo, tuple) else (combo, None)
    return f"{st:g}" if jt is None else f"{st:g} j{jt:g}"


def combo_text(combo) -> str:
    st, jt = combo if isinstance(combo, tuple) else (combo, None)
    return f"seeds {st:g}" + ("" if jt is None else f", joined above {jt:g}")


def read_pairs(folder: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    return read_pairs_of(sorted(Path(folder).glob("*.tif")))


def boundary_offset(pred: np.ndarray, truth: np.ndarray, reach: float = 10.0) -> tuple[float, int]:
    """Mean signed distance (pixels) from the predicted outline to the annotated one: + outside the
    annotated objects, - inside, 0 when the outlines coincide (both the objects' own outer pixels);
    over predicted outline pixels within ``reach`` of an annotated outline. Returns (sum, count)."""
    from scipy import ndimage as ndi
    from skimage.segmentation import find_boundaries

    t = truth > 0
    if not t.any() or not (pred > 0).any():
        return 0.0, 0
    outside = ndi.distance_transform_edt(~t)  # >= 1 outside the objects
    inside = ndi.distance_transform_edt(t)  # 1 on the objects' own outer pixels
    signed = np.where(t, -(inside - 1), outside)
    b = find_boundaries(pred, mode="inner") & (np.abs(signed) <= reach)
    return float(signed[b].sum()), int(b.sum())


def score(pairs, fn) -> dict:
    """:func:`.seg.pooled` figures of ``fn`` (image -> labels) plus the mean signed boundary offset."""
    labelled = [(fn(img), truth) for img, truth in pairs]
    offsets = [boundary_offset(lab, truth) for lab, truth in labelled]
    n = sum(c for _, c in offsets)
    out = pooled(labelled, lambda lab: lab)
    out.pop("seconds", None)
    out["boundary_offset_px"] = sum(v for v, _ in offsets) / n if n else float("nan")
    return out


def empty_windows(pairs, side: int = 128, per_plane: int = 2) -> list[np.ndarray]:
    """Windows of ``side`` px that hold no annotated object (and none within 8 px), up to ``per_plane``
    per test plane: background-only images, as a user's crop of an empty field is."""
    from scipy import ndimage as ndi

    out = []
    for img, truth in pairs:
        near = ndi.binary_dilation(truth > 0, iterations=8)
        found = 0
        for y in range(0, img.shape[0] - side + 1, side // 2):
            for x in range(0, img.shape[1] - side + 1, side // 2):
                if found < per_plane and not near[y:y + side, x:x + side].any():
                    out.append(img[y:y + side, x:x + side])
                    found += 1
    return out


def background_objects(windows, fn) -> dict:
    """How many objects ``fn`` finds on background-only windows (each segmented on its own)."""
    counts = [int(fn(w).max()) for w in windows]
    return {"windows": len(counts), "with_objects": int(sum(c > 0 for c in counts)), "objects": int(sum(counts))}


def tune_baseline(train_pairs) -> tuple[float, int, float]:
    from ..core.masks import otsu_watershed

    best = None
    for sigma, md in GRID:
        f1 = pooled(train_pairs, lambda im: otsu_watershed(im, sigma=sigma, min_distance=md, min_size=MIN_SIZE))["f1"]
        if best is None or f1 > best[2]:
            best = (sigma, md, f1)
    return best


def whole_planes(seg_root: Path, source: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """Every annotated plane of ``source``: its training and test parts together, the column splits
    (``NAME_left.tif`` | ``NAME_right.tif``) joined back into whole planes, then the time points."""
    train = {p.stem: p for p in sorted((seg_root / source / "train" / "images").glob("*.tif"))}
    test = {p.stem: p for p in sorted((seg_root / source / "test" / "images").glob("*.tif"))}
    pairs = []
    for stem, p in list(train.items()):
        right = test.pop(stem[:-len("_left")] + "_right", None) if stem.endswith("_left") else None
        (im, m), = read_pairs_of([p])
        if right is not None:
            (im2, m2), = read_pairs_of([right])
            im, m = np.hstack([im, im2]), np.hstack([m, m2])
        pairs.append((im, m))
    return pairs + read_pairs_of(list(test.values()))


def read_pairs_of(paths) -> list[tuple[np.ndarray, np.ndarray]]:
    import tifffile

    return [(tifffile.imread(p), tifffile.imread(p.parent.parent / "masks" / p.name)) for p in paths]


def subsample(pairs, k: int = 6):
    idx = np.linspace(0, len(pairs) - 1, min(k, len(pairs))).round().astype(int)
    return [pairs[i] for i in sorted(set(idx.tolist()))]


def volumes(seg_root: Path, data: Path, part: str = "test") -> dict:
    """The 3D volumes with their 3D labels: name -> list of (Z, Y, X) image, labels. ``part`` "test":
    the test parts (cells3d's right quarter, CHO's time points 15-19); "train": the training parts
    (cells3d's other columns, every other one of CHO's time points 0-14)."""
    import tifffile

    x = NUCLEI3D_TEST_X
    img = tifffile.imread(data / "nuclei3d" / "nuclei.tif")
    lab = tifffile.imread(data / "nuclei3d" / "nuclei_label.tif")
    cho = tifffile.imread(data / "cho-seg" / "Fluo-N3DH-CHO_02_img.tif")
    cho_lab = tifffile.imread(data / "cho-seg" / "Fluo-N3DH-CHO_02_ERR_SEG.tif")
    if part == "train":
        return {f"cells3d nuclei, x < {x}": [(img[:, :, :x], lab[:, :, :x])],
                "cho t 0-14, every other": [(cho[t], cho_lab[t]) for t in range(0, 15, 2)]}
    return {f"cells3d nuclei, x >= {x}": [(img[:, :, x:], lab[:, :, x:])],
            "cho t 15-19": [(cho[t], cho_lab[t]) for t in range(15, 20)]}


VOLUME_FRACTIONS = (0.0, 0.02, 0.05, 0.1, 0.2, 0.3)


def volume_scores(seg, vols, fractions=VOLUME_FRACTIONS, stack: str = "volume") -> dict:
    """3D object F1 at IoU 0.5 of ``seg`` on ``vols`` (pooled), for each minimum volume fraction:
    each volume segmented once with every object kept, then :func:`..core.masks.drop_small_volumes`
    (what ``segment(..., min_volume_fraction=f)`` does after linking). ``stack`` "planes": plane by plane,
    as one fraction (0)."""
    from ..core.masks import drop_small_volumes
    from ..core.metrics import match_objects

    if stack == "planes":
        fractions = (0.0,)
    counts = {f: [0, 0, 0] for f in fractions}
    for img, lab in vols:
        pred = seg.segment(img, min_size=MIN_SIZE, stack=stack, probability=False,
                           **({"min_volume_fraction": 0.0} if stack == "volume" else {})).labels
        for f in fractions:
            kept = pred.copy()
            if f:
                drop_small_volumes(kept, f)
            m = match_objects(lab, kept)
            for i, k in enumerate(("tp", "fp", "fn")):
                counts[f][i] += m[k]
    return {f"{f:g}": {"f1": 2 * tp / max(2 * tp + fp + fn, 1), "tp": tp, "fp": fp, "fn": fn}
            for f, (tp, fp, fn) in counts.items()}


class Cache:
    """Figures already measured, kept in ``RUN/eval_cache.json`` by key (model folder's weights
    hash, method, data set): a rerun after more models finished measures only what is new."""

    def __init__(self, path: Path):
        self.path = path
        self.data = json.loads(path.read_text()) if path.is_file() else {}

    def get(self, key: str, compute):
        if key not in self.data:
            self.data[key] = compute()
            from ..core.io import write_json

            write_json(self.path, self.data)
        return self.data[key]


def model_key(folder: Path) -> str:
    """The weights' hash, and the card's seed threshold where it has one (it changes the labels)."""
    from ..core.store import weights_sha256

    card = json.loads((folder / "model.json").read_text())
    seeds, joins = card.get("seed_threshold"), card.get("join_threshold")
    return (f"{folder.name}:{weights_sha256(folder / 'unet')[:12]}" + (f" seeds {seeds:g}" if seeds is not None else "")
            + (f" joins {joins:g}" if joins is not None else ""))


# ----------------------------------------------------------------------------- the seed threshold
def _counts_f1(c: dict) -> dict:
    tp, fp, fn = c["tp"], c["fp"], c["fn"]
    return {"f1": 2 * tp / max(2 * tp + fp + fn, 1), "precision": tp / max(tp + fp, 1),
            "recall": tp / max(tp + fn, 1), "tp": tp, "fp": fp, "fn": fn}


def seed_scores(seg, pairs, seeds, *, threshold: float, min_size: int = MIN_SIZE, tile: int = 256,
                overlap: int = 32) -> dict:
    """Object F1 at IoU 0.5 (pooled over ``pairs``, with precision, recall and the counts) of
    ``seg``'s labels for each seed threshold of ``seeds``: seed threshold -> figures. Each plane's
    probabilities are computed once (:meth:`..core.segment.Segmenter.predict`, as ``segment`` does
    for a plane of its size) and labelled with :func:`..core.masks.instances` per seed threshold,
    which is ``seg.segment(image, threshold=..., seed_threshold=s, min_size=...)`` without predicting
    again. ``pairs``: (image, truth) pairs, or a callable giving them one at a time. An item of
    ``seeds`` may be a (seed threshold, join threshold or None) pair (:data:`COMBOS`)."""
    from ..core.masks import instances
    from ..core.metrics import match_objects

    counts = {s: {"tp": 0, "fp": 0, "fn": 0} for s in seeds}
    for img, truth in (pairs() if callable(pairs) else pairs):
        p = seg.predict(img, tile=tile, overlap=overlap)[0]
        for s in seeds:
            st, jt = s if isinstance(s, tuple) else (s, None)
            m = match_objects(truth, instances(p[0], p[1], threshold=threshold, min_size=min_size, seed_threshold=st,
                                               join_threshold=jt))
            for k in ("tp", "fp", "fn"):
                counts[s][k] += m[k]
    return {s: _counts_f1(c) for s, c in counts.items()}


def choose_seed(mean_f1: dict, threshold: float) -> float:
    """The seed threshold of the best mean F1 (to 1e-6); ties: the one nearest ``threshold``, then the lower."""
    return max(mean_f1, key=lambda s: (round(mean_f1[s], 6), -abs(s - threshold), -s))


def choose_combo(mean_f1: dict, threshold: float) -> tuple[float, float | None]:
    """The (seed, join) pair of the best mean F1 (to 1e-6); ties: no joining, then the seed threshold
    nearest ``threshold`` (then the lower), then the higher join threshold (the least joining)."""
    return max(mean_f1, key=lambda c: (round(mean_f1[c], 6), c[1] is None, -abs(c[0] - threshold), -c[0],
                                       c[1] or 0.0))


def tune_on_training_planes(seg, seg_root: Path, per_source: int = 0, log=print) -> dict:
    """Tune ``seg``'s (seed, join) thresholds on the training planes its card lists (:data:`COMBOS`,
    object F1 pooled per source, the best mean over the sources): ``{"chosen": (st, jt), "best_seeds_only":
    st, "train": {source: {"planes": [...], "by_combo": {name: figures}}}, "mean_f1": {name: f1}}``."""
    threshold = float(seg.card.get("threshold", 0.5))
    planes = training_planes(seg.card, seg_root, per_source)
    train = {}
    for s, paths in planes.items():
        log(f"train {s}: {len(paths)} planes")
        scores = seed_scores(seg, _lazy_pairs(paths), COMBOS, threshold=threshold)
        train[s] = {"planes": [q.name for q in paths], "by_combo": {combo_name(c): v for c, v in scores.items()}}
    mean = {c: float(np.mean([train[s]["by_combo"][combo_name(c)]["f1"] for s in planes])) for c in COMBOS}
    chosen = choose_combo(mean, threshold)
    plain = choose_seed({c[0]: f for c, f in mean.items() if c[1] is None}, threshold)
    log(f"{seg.name}: best on its training planes {combo_text(chosen)} (mean F1 {mean[chosen]:.3f}); seeds only: "
        f"{plain:g} ({mean[(plain, None)]:.3f})")
    return {"chosen": chosen, "best_seeds_only": plain, "train": train,
            "mean_f1": {combo_name(c): v for c, v in mean.items()}}


def training_planes(card: dict, seg_root: Path, per_source: int = 0) -> dict[str, list[Path]]:
    """The training planes the card lists (``training_data.files``), by source (the file name's
    prefix, one of SOURCES), found in the fetched ``SEG/SOURCE/train/images``; ``per_source`` > 0:
    that many evenly spaced planes of each source instead of all."""
    from ..core.errors import UserInputError

    files = sorted(set((card.get("training_data") or {}).get("files") or []))
    out: dict[str, list[Path]] = {}
    for name in files:
        src = name.split("_", 1)[0]
        if src in SOURCES:
            out.setdefault(src, []).append(seg_root / src / "train" / "images" / name)
    if not out:
        raise UserInputError(f"the model card lists no training planes of {', '.join(SOURCES)} "
                             "(training_data.files): nothing to tune the seed threshold on.")
    missing = [str(q) for paths in out.values() for q in paths if not q.is_file()]
    if missing:
        raise UserInputError(f"{len(missing)} training plane(s) of the card are not in the fetched data, e.g. "
                             f"{missing[0]}: run `zfdiffusion fetch-data --dataset seg`.")
    return {s: subsample(paths, per_source) if per_source > 0 else paths for s, paths in out.items()}


def _lazy_pairs(paths):
    import tifffile

    def gen():
        for q in paths:
            yield tifffile.imread(q), tifffile.imread(q.parent.parent / "masks" / q.name)

    return gen


def tune_seed_threshold(a) -> int:
    """``--tune-seed-threshold MODEL``: see the module's docstring."""
    import time

    from ..core.fetch import prepare_segmentation
    from ..core.segment import Segmenter
    from ._common import command, log, rounded

    set_threads(a.threads)
    _, res_dir = output_dirs(a.out)
    seg = Segmenter.load(a.tune_seed_threshold, "cpu")
    if not seg.has_interior:
        from ..core.errors import UserInputError

        raise UserInputError(f"'{seg.name}' has no centre or interior output: its labels have no seeds to tune.")
    threshold = float(seg.card.get("threshold", 0.5))
    seg_root = prepare_segmentation(quiet=True)
    result: dict = {"model": seg.name, "model_key": model_key(seg.path), "commit": git_commit(),
                    "command": command("generalist", a.argv), "threads": a.threads, "threshold": threshold,
                    "min_size": MIN_SIZE, "iou": 0.5, "seeds": list(SEED_GRID), "joins": list(JOIN_GRID),
                    "card_seed_threshold_before": seg.card.get("seed_threshold"),
                    "card_join_threshold_before": seg.card.get("join_threshold"), "test": {}}
    t0 = time.perf_counter()
    tuned = tune_on_training_planes(seg, seg_root, a.planes, log=log)
    chosen, plain = tuned["chosen"], tuned["best_seeds_only"]
    result.update(train=tuned["train"], mean_f1=tuned["mean_f1"], chosen=list(chosen), chosen_name=combo_name(chosen),
                  best_seeds_only=plain, seconds_train=round(time.perf_counter() - t0, 1))
    # only now the test planes: the foreground threshold's seeds (as before), the best seeds alone, the choice
    t0 = time.perf_counter()
    compared = {"old": (threshold, None), "seeds_only": (plain, None), "tuned": chosen}
    for s in SOURCES + OTHER:
        paths = sorted((seg_root / s / "test" / "images").glob("*.tif"))
        if not paths:
            continue
        scores = seed_scores(seg, _lazy_pairs(paths), sorted(set(compared.values()), key=combo_name),
                             threshold=threshold)
        result["test"][s] = {"planes": len(paths), "in_training": s in tuned["train"],
                             **{k: scores[c] for k, c in compared.items()}}
        log(f"test {s}: F1 {scores[compared['old']]['f1']:.3f} (seeds {threshold:g}) -> "
            f"{scores[plain, None]['f1']:.3f} (seeds {plain:g}) -> {scores[chosen]['f1']:.3f} ({combo_text(chosen)})")
    result["seconds_test"] = round(time.perf_counter() - t0, 1)
    out_json = res_dir / "seg_seed_threshold.json"
    from ..core.io import atomic_write, write_json

    write_json(out_json, rounded(result, 4))
    md = out_json.with_suffix(".md")
    text = "\n".join(seed_markdown(result)) + "\n"
    atomic_write(md, lambda tmp: tmp.write_text(text))
    if a.write_card:
        card_path = seg.path / "model.json"
        card = json.loads(card_path.read_text())
        card = {k: v for k, v in card.items() if k not in ("seed_threshold", "join_threshold")}
        at = list(card).index("threshold") + 1 if "threshold" in card else len(card)
        items = list(card.items())
        new = [("seed_threshold", chosen[0])] + ([("join_threshold", chosen[1])] if chosen[1] is not None else [])
        write_json(card_path, dict(items[:at] + new + items[at:]))
        print(f"wrote {combo_text(chosen)} (seed_threshold, join_threshold) into {shown_path(card_path)}")
    print(f"wrote {shown_path(out_json)}, {shown_path(md)}")
    return 0


def _planes(n: int) -> str:
    return f"{n} plane{'' if n == 1 else 's'}"


def seed_markdown(result: dict) -> list[str]:
    """The tables of :func:`tune_seed_threshold`'s results, as markdown lines."""
    srcs = list(result["train"])
    chosen = result["chosen_name"]
    lines = [f"Seed and join thresholds tuned for `{result['model']}` on the training planes of its training "
             f"sources: mean over the sources of object F1 at IoU 0.5, pooled per source (foreground threshold "
             f"{result['threshold']:g}, min size {result['min_size']}; "
             + ", ".join(f"{s} {_planes(len(result['train'][s]['planes']))}" for s in srcs)
             + f"). Chosen: **{combo_text(tuple(result['chosen']))}**.", "",
             "| seed threshold | no joining | " + " | ".join(f"join {j:g}" for j in result["joins"]) + " |",
             "|---" * (len(result["joins"]) + 2) + "|"]
    for st in result["seeds"]:
        cells = []
        for jt in [None, *result["joins"]]:
            name = combo_name((st, jt))
            f = result["mean_f1"].get(name)
            cells.append("" if f is None else (f"**{f:.3f}**" if name == chosen else f"{f:.3f}"))
        lines.append(f"| {st:g} | " + " | ".join(cells) + " |")
    old, plain = f"{result['threshold']:g}", f"{result['best_seeds_only']:g}"
    lines += ["", "Per source on those training planes (object F1): " + "; ".join(
        f"{s} {result['train'][s]['by_combo'][old]['f1']:.3f} (seeds {old}) -> "
        f"{result['train'][s]['by_combo'][chosen]['f1']:.3f}" for s in srcs) + ".",
        "", f"Test planes (in domain: these sources were in training, but not these planes; bacteria: outside "
            f"every training set): seeds at {old} (as before the seed threshold), the best seed threshold alone "
            f"({plain}), and the choice ({combo_text(tuple(result['chosen']))}):", "",
        f"| test planes | planes | F1, seeds {old} | F1, seeds {plain} | F1, chosen | precision | recall |",
        "|---|---|---|---|---|---|---|"]
    for s, r in result["test"].items():
        o, p, t = r["old"], r["seeds_only"], r["tuned"]
        lines.append(f"| {s}{'' if r['in_training'] else ' (not in training)'} | {r['planes']} | {o['f1']:.3f} | "
                     f"{p['f1']:.3f} | {t['f1']:.3f} | {o['precision']:.3f} -> {t['precision']:.3f} | "
                     f"{o['recall']:.3f} -> {t['recall']:.3f} |")
    return lines


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog=PROG + "generalist", description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, default=Path("runs") / "seggen",
                    help="folder of all/ and without_NAME/ (scripts/train_seg_generalist.sh)")
    ap.add_argument("--before", default="none", help="the previous model, for comparison (none: no such row)")
    ap.add_argument("--tune-planes", type=int, default=12,
                    help="evenly spaced training planes per source on which each held-out model's seed and join "
                         "thresholds are tuned (0: all)")
    ap.add_argument("--held-out-planes", type=int, default=20,
                    help="evenly spaced whole planes (training and test parts together) on which each held-out "
                         "model and its baseline are scored (0: the test part only, as in the in-domain rows)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("docs"))
    ap.add_argument("--tune-seed-threshold", default=None, metavar="MODEL",
                    help="instead: tune MODEL's seed and join thresholds on the training planes of its training "
                         "sources and score the test planes with them (OUT/results/seg_seed_threshold.json)")
    ap.add_argument("--planes", type=int, default=0,
                    help="with --tune-seed-threshold: evenly spaced training planes per source (0: all)")
    ap.add_argument("--write-card", action="store_true",
                    help="with --tune-seed-threshold: store the chosen values as seed_threshold and join_threshold "
                         "in MODEL's model.json")
    a = ap.parse_args(argv)
    a.argv = argv
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.tune_seed_threshold:
        return tune_seed_threshold(a)
    plt()
    img_dir, res_dir = output_dirs(a.out)
    from ..core.fetch import data_dir, prepare_segmentation
    from ..core.masks import otsu_watershed
    from ..core.segment import Segmenter

    set_threads(a.threads)
    seg_root = prepare_segmentation(quiet=True)
    test = {s: read_pairs(seg_root / s / "test" / "images") for s in SOURCES + OTHER}
    train = {s: read_pairs(seg_root / s / "train" / "images") for s in SOURCES}
    result: dict = {"commit": git_commit(), "threads": a.threads, "min_size": MIN_SIZE, "run": str(a.run),
                    "data": {s: {"test_planes": len(test[s]), "test_objects": int(sum(len(np.unique(m)) - 1
                                                                                   for _, m in test[s]))}
                             for s in test},
                    "held_out": {}, "in_domain": {}, "3d": {}}
    models, keys = {}, {}
    for name in ["all", *[f"without_{s}" for s in SOURCES]]:
        if (a.run / name / "model.json").is_file():
            models[name] = Segmenter.load(a.run / name, "cpu")
            keys[name] = model_key(a.run / name)
    before = None if a.before == "none" else Segmenter.load(a.before, "cpu")
    if before is not None:
        keys["before"] = model_key(before.path)
    cache = Cache(a.run / "eval_cache.json")

    def unet(seg, **kw):
        return lambda im: seg.segment(im, min_size=MIN_SIZE, **kw).labels

    # ---- leave one source out
    for s in SOURCES:
        others = [p for o in SOURCES if o != s for p in subsample(train[o])]
        sigma, md, f1 = cache.get(f"tune without {s}", lambda: tune_baseline(others))
        # the held-out model saw no plane of s: score it on whole planes of both parts (more objects than
        # the test part alone; DSB's test part is one 512 x 128 crop with 30 nuclei)
        if a.held_out_planes:
            held = subsample(whole_planes(seg_root, s), a.held_out_planes)
            where = f"{s} whole {a.held_out_planes}"
        else:
            held, where = test[s], s
        result["data"][s]["held_out_planes"] = len(held)
        result["data"][s]["held_out_objects"] = int(sum(len(np.unique(m)) - 1 for _, m in held))
        row = {"baseline": {"sigma": sigma, "min_distance": md, "train_f1": f1, **cache.get(
            f"otsu {sigma} {md}|{where}", lambda: score(held, lambda im: otsu_watershed(
                im, sigma=sigma, min_distance=md, min_size=MIN_SIZE)))}}
        m = f"without_{s}"
        if m in models:
            row["U-Net without it"] = cache.get(f"{keys[m]}|{where}", lambda: score(held, unet(models[m])))
            row["U-Net without it, diameter auto"] = cache.get(
                f"{keys[m]} auto|{where}", lambda: score(held, unet(models[m], diameter="auto")))
            # the seed and join thresholds tuned on the model's own training planes (never on the held-out source)
            tuned = cache.get(f"{keys[m]} tuned seeds {a.tune_planes}", lambda: _tuned(models[m], seg_root, a.tune_planes))
            st, jt = tuned["chosen"]
            row[f"U-Net without it, {combo_text((st, jt))} (tuned on its training planes)"] = {
                "seed_threshold": st, "join_threshold": jt, **cache.get(
                    f"{keys[m]} {combo_name((st, jt))}|{where}", lambda: score(held, unet(
                        models[m], seed_threshold=st, join_threshold=st if jt is None else jt)))}
            row[f"U-Net without it, diameter auto, {combo_text((st, jt))} (tuned on its training planes)"] = {
                "seed_threshold": st, "join_threshold": jt, **cache.get(
                    f"{keys[m]} auto {combo_name((st, jt))}|{where}", lambda: score(held, unet(
                        models[m], diameter="auto", seed_threshold=st, join_threshold=st if jt is None else jt)))}
        result["held_out"][s] = row
        print(f"held out {s}: " + "; ".join(f"{k} F1 {v['f1']:.3f} IoU {v['iou']:.3f} off {v['boundary_offset_px']:+.2f}"
                                             for k, v in row.items()))
    # ---- in domain (and the bacteria: outside every training set)
    all_train = [p for o in SOURCES for p in subsample(train[o])]
    sigma, md, f1 = cache.get("tune all", lambda: tune_baseline(all_train))
    result["baseline_all"] = {"sigma": sigma, "min_distance": md, "train_f1": f1}
    for s in SOURCES + OTHER:
        row = {"baseline": cache.get(f"otsu {sigma} {md}|{s}", lambda: score(
                   test[s], lambda im: otsu_watershed(im, sigma=sigma, min_distance=md, min_size=MIN_SIZE)))}
        if before is not None:
            row[f"before ({a.before})"] = cache.get(f"{keys['before']}|{s}", lambda: score(test[s], unet(before)))
        if "all" in models:
            row["generalist"] = cache.get(f"{keys['all']}|{s}", lambda: score(test[s], unet(models["all"])))
            row["generalist, diameter auto"] = cache.get(
                f"{keys['all']} auto|{s}", lambda: score(test[s], unet(models["all"], diameter="auto")))
        result["in_domain"][s] = row
        print(f"in domain {s}: " + "; ".join(f"{k} F1 {v['f1']:.3f} IoU {v['iou']:.3f}" for k, v in row.items()))
    # ---- background-only windows: no objects expected
    result["background"] = {}
    for s in SOURCES:
        wins = empty_windows(test[s])
        if not wins:
            continue
        row = {"baseline": cache.get(f"otsu {sigma} {md} background|{s}", lambda: background_objects(
                   wins, lambda im: otsu_watershed(im, sigma=sigma, min_distance=md, min_size=MIN_SIZE)))}
        if before is not None:
            row[f"before ({a.before})"] = cache.get(f"{keys['before']} background|{s}",
                                                    lambda: background_objects(wins, unet(before)))
        if "all" in models:
            row["generalist"] = cache.get(f"{keys['all']} background|{s}",
                                          lambda: background_objects(wins, unet(models["all"])))
        result["background"][s] = row
        print(f"background {s}: " + "; ".join(f"{k} {v['with_objects']}/{v['windows']}" for k, v in row.items()))
    # ---- 3D instances
    if "all" in models:
        from ..core.segment.segmenter import MIN_VOLUME_FRACTION

        # the minimum volume fraction: measured on the training volumes, the default then scored on the test ones
        result["3d_fractions_train"] = {
            vname: cache.get(f"{keys['all']} 3d fractions|{vname}", lambda vols=vols: volume_scores(models["all"], vols))
            for vname, vols in volumes(seg_root, data_dir(), "train").items()}
        for vname, vols in volumes(seg_root, data_dir()).items():
            fr = cache.get(f"{keys['all']} 3d fractions|{vname}", lambda vols=vols: volume_scores(models["all"], vols))
            row = {"volume": {"min_volume_fraction": MIN_VOLUME_FRACTION, **fr[f"{MIN_VOLUME_FRACTION:g}"]},
                   "volume, every object": fr["0"],
                   "planes": cache.get(f"{keys['all']} 3d planes|{vname}",
                                       lambda vols=vols: volume_scores(models["all"], vols, stack="planes")["0"])}
            result["3d"][vname] = row
            print(f"3D {vname}: " + "; ".join(f"{k} F1 {v['f1']:.3f}" for k, v in row.items()))
        print("3D, training volumes, F1 by minimum volume fraction: " + "; ".join(
            f"{v}: " + ", ".join(f"{f} {r['f1']:.3f}" for f, r in fr.items())
            for v, fr in result["3d_fractions_train"].items()))
    out_json = res_dir / "seg_generalist.json"
    out_json.write_text(json.dumps(result, indent=2, default=float) + "\n")
    write_markdown(result, out_json.with_suffix(".md"))
    if "all" in models:
        tuned_seeds = {s: (v["seed_threshold"], v["join_threshold"])
                       for s, row in result["held_out"].items() for name, v in row.items()
                       if name.startswith("U-Net without it, seeds")}
        figure(test, models, sigma, md, img_dir, tuned_seeds)
    print(f"wrote {shown_path(out_json)}, {shown_path(out_json.with_suffix('.md'))}")
    return 0


def _tuned(seg, seg_root: Path, per_source: int) -> dict:
    """:func:`tune_on_training_planes`, kept to what the cache stores (JSON)."""
    from ._common import log

    t = tune_on_training_planes(seg, seg_root, per_source, log=log)
    return {"chosen": list(t["chosen"]), "best_seeds_only": t["best_seeds_only"], "mean_f1": t["mean_f1"],
            "planes": {s: len(v["planes"]) for s, v in t["train"].items()}}


def _row(name, r) -> str:
    return (f"| {name} | {r['iou']:.3f} | {r['dice']:.3f} | {r['f1']:.3f} | {r['precision']:.3f} | "
            f"{r['recall']:.3f} | {r['boundary_offset_px']:+.2f} |")


HEADER = ["| method | foreground IoU | Dice | object F1 (IoU 0.5) | precision | recall | boundary offset (px) |",
          "|---|---|---|---|---|---|---|"]


def write_markdown(result: dict, path: Path) -> None:
    lines = ["## Leave one source out", ""]
    for s, row in result["held_out"].items():
        b = row["baseline"]
        d = result.get("data", {}).get(s, {})
        where = (f": {d['held_out_planes']} whole planes, {d['held_out_objects']} objects"
                 if "held_out_planes" in d else "")
        lines += [f"### {s} (held out{where})", "", *HEADER,
                  _row(f"Otsu + watershed (sigma {b['sigma']:g}, min distance {b['min_distance']}, tuned on the "
                       "other sources)", b)]
        lines += [_row(k, v) for k, v in row.items() if k != "baseline"]
        lines.append("")
    lines += ["## In domain (test planes of the training sources) and outside it (bacteria)", ""]
    for s, row in result["in_domain"].items():
        lines += [f"### {s}", "", *HEADER] + [_row("Otsu + watershed" if k == "baseline" else k, v)
                                              for k, v in row.items()] + [""]
    if result.get("background"):
        names = list(next(iter(result["background"].values())))
        lines += ["## Background-only windows (128 px, no annotated object within 8 px): windows with any object",
                  "", "| source | " + " | ".join("Otsu + watershed" if n == "baseline" else n for n in names) + " |",
                  "|---" * (len(names) + 1) + "|"]
        for src, row in result["background"].items():
            lines.append(f"| {src} | " + " | ".join(
                f"{row[n]['with_objects']}/{row[n]['windows']} ({row[n]['objects']} objects)" if n in row else ""
                for n in names) + " |")
        lines.append("")
    if result["3d"]:
        lines += ["## 3D instances (object F1 at IoU 0.5 against the 3D labels)", "",
                  "| volume | as a volume (planes linked, small pieces dropped) | as a volume, every object | "
                  "plane by plane |", "|---|---|---|---|"]
        for v, row in result["3d"].items():
            every = row.get("volume, every object", {}).get("f1")
            lines.append(f"| {v} | {row['volume']['f1']:.3f} | {'' if every is None else f'{every:.3f}'} | "
                         f"{row['planes']['f1']:.3f} |")
        train = result.get("3d_fractions_train") or {}
        if train:
            fr = list(next(iter(train.values())))
            lines += ["", "Training volumes: 3D object F1 by the minimum volume fraction (objects under it times "
                      "the typical object's voxels dropped):", "",
                      "| volume | " + " | ".join(fr) + " |", "|---" * (len(fr) + 1) + "|"]
            for v, r in train.items():
                lines.append(f"| {v} | " + " | ".join(f"{r[f]['f1']:.3f}" for f in fr) + " |")
    path.write_text("\n".join(lines) + "\n")


def figure(test, models, sigma, md, img_dir: Path, seeds: dict | None = None) -> None:
    """Per source, its test plane with the most objects: the annotation, Otsu + watershed and the
    U-Net that never saw the source (``seeds``: source -> (seed, join) thresholds tuned for that
    model on its training planes; the generalist for a source every model saw)."""
    pyplot = plt()
    from ..core.images import Normalisation
    from ..core.masks import otsu_watershed

    norm = Normalisation(1, 99.8)
    names = list(SOURCES + OTHER)
    fig, axes = pyplot.subplots(len(names), 3, figsize=(9.6, 3.3 * len(names)))
    for i, s in enumerate(names):
        img, truth = max(test[s], key=lambda pair: len(np.unique(pair[1])))  # the test plane with most objects
        ys, xs = np.nonzero(truth)
        cy, cx = (int(ys.mean()), int(xs.mean())) if ys.size else (0, 0)
        crop = crop_window(img.shape, max(0, cy - 128), max(0, cx - 128), 256)
        view = norm.apply(img)[crop]
        held = models.get(f"without_{s}", models["all"])
        st, jt = (seeds or {}).get(s, (None, None))
        kw = {} if st is None else {"seed_threshold": st, "join_threshold": st if jt is None else jt}
        for ax, (title, lab) in zip(axes[i], (
                ("annotation", truth),
                ("Otsu + watershed", otsu_watershed(img, sigma=sigma, min_distance=md, min_size=MIN_SIZE)),
                ("U-Net without this source" if f"without_{s}" in models else "generalist U-Net",
                 held.segment(img, min_size=MIN_SIZE, **kw).labels))):
            ax.imshow(view, cmap="gray")
            outlines(ax, lab[crop], (1, 1, 0, 1) if title == "annotation" else (0, 1, 1, 1))
            ax.set_title(f"{s}: {title}", fontsize=9)
            ax.axis("off")
    fig.tight_layout()
    save_figure(fig, img_dir / f"seg_generalist_sources{figure_suffix(photo=True)}", dpi=80)
    pyplot.close(fig)


if __name__ == "__main__":
    run(main)
