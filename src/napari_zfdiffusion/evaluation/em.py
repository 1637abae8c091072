"""Evaluate a latent diffusion model for 2D patches (EM images, or image + mask pairs): autoencoder
reconstruction, a memorisation check, intensity and power-spectrum statistics, masks, timings.

    python -m napari_zfdiffusion.evaluation.em --model em-ldm-demo --threads 2 --out docs

Writes ``OUT/results/em_eval_<model>.json`` and figures ``OUT/images/em_<model>_<what>.{png,jpg}`` (JPEG:
the figures of samples):

* ``samples.jpg``   held-out real crops | their autoencoder reconstructions | generated patches (3 x 6)
* ``nn_hist.png``   distance of each patch to its nearest training crop: generated vs held-out real
* ``nn_pairs.jpg``  the generated patches closest to a training crop or window, beside it
* ``stats.png``     intensity histogram (generated vs real) and radially averaged power spectrum
                    (generated vs real vs reconstructions, log-log)
* ``masks.jpg``     paired models: mask contours on generated patches and on real held-out crops

Data: by default the files named in the model card's ``training_data`` are looked up in the
fetched-data folder (``zfdiffusion fetch-data``); pass ``--images`` (and ``--masks``) to use others.
They must be the files the model was trained on, given the same way, so that :class:`PatchData`
makes the same training / held-out split (the last fifth of 5 or more images, else the bottom rows
of each image).

What is measured:

* reconstruction: MSE, PSNR (mean over crops) and SSIM of the image channel, and for a paired model
  the Dice of the reconstructed mask (threshold 0.5), on the non-overlapping held-out crops
  (``PatchData.val_crops``, at most ``--val-limit``), the same way training validates;
* memorisation: the RMS distance ([0, 1] intensities) of each generated patch to its nearest crop in
  ``--nn-ref`` random training crops (no augmentation), minimised over the 8 flips / rotations of the
  patch (the diffusion model trained on flipped and rotated crops). Held-out real crops (tiles with
  stride patch/2) get the same treatment: they are the scale of "a different patch of the same kind
  of image". Copies would sit well below them. Random crops sample the training offsets sparsely, so
  this finds copies of whole crops only; and a smooth patch is closer to everything in RMS than a
  noisy real one, so the held-out tiles passed through the autoencoder (as smooth as generated
  patches) are the fair reference here;
* an exhaustive copy search: the highest normalised cross-correlation (Pearson r) of each patch with
  any window of the training images, at every offset and over the 8 flips / rotations (FFT, after
  ``--ncc-downsample`` mean pooling), against the same for held-out tiles. A copy of any training
  region scores near 1, wherever it was; brightness and contrast do not matter;
* intensity histograms and radially averaged power spectra (``core.metrics``), with two summary
  numbers: the 1-Wasserstein distance between intensity distributions and the mean |log10| ratio of
  the spectra, for generated vs real and vs reconstructed held-out tiles (the latter isolates the
  diffusion model from the autoencoder); and the mean intensity of a 16-pixel frame at the patch
  edges minus that of the centre (decoder padding artefacts);
* paired models: objects per patch, object area and foreground fraction (labels from
  ``core.masks.labels_from_mask`` with the same threshold and minimum size for generated masks and
  for the real held-out masks), and the mean image intensity inside vs outside the mask (alignment);
* timings: seconds per patch for sampling and for decoding (``LatentModel.generate``, batched).

Everything is seeded: the same command gives the same numbers (up to float summation order when
the number of threads changes). Run ``python -m napari_zfdiffusion.evaluation.em --help`` for the
options. Needs the ``eval`` extra (matplotlib).
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

from ..core.diffusion.sampling import DEFAULT_SAMPLER, SAMPLERS
from ..core.errors import UserInputError
from ..core.images import dihedral, to_unit
from ..core.latent import LatentModel
from ..core.masks import labels_from_mask
from ..core.metrics import (
    DIHEDRAL_VIEWS,
    dice,
    nearest_neighbour_rms_dihedral,
    nearest_neighbours,
    psnr,
    edge_profile,
    radial_power_spectrum,
    spectrum_ratio,
    ssim,
)
from ..core.training.patches import PatchData
from ._common import (
    PROG,
    add_compute,
    begin,
    command,
    figure_suffix,
    git_commit,
    log,
    quartiles,
    rounded,
    run,
    save_figure,
    shown_path,
)
from ._common import plt as _plt

RUN_MODEL = Path("runs") / "patches" / "em-ldm-demo"  # a freshly trained model, if run from the repository
BUNDLED_MODEL = "em-ldm-demo"
# Masks of the fetched paired data sets, by image file (the model card names only the image files).
KNOWN_MASKS = {"Fluo_Hela_02_img.tif": "Fluo_Hela_02_ERR_SEG.tif"}


# --------------------------------------------------------------------------------------- helpers
def find_training_files(card: dict, paired: bool) -> tuple[list[Path], list[Path] | None]:
    """The image (and mask) files named in the card's training data, found in the fetched-data folder."""
    from napari_zfdiffusion.core.fetch import data_dir

    td = card.get("training_data") or {}
    names = td.get("files") or []
    if not names:
        raise UserInputError("the model card names no training files: pass --images (and --masks).")
    root = data_dir()

    def find(wanted: list[str]) -> list[Path]:
        """The files, from one folder that holds them all if there is one (e.g. em/train, not em-islet)."""
        hits = {n: sorted(root.rglob(n)) if root.is_dir() else [] for n in wanted}
        missing = [n for n, h in hits.items() if not h]
        if missing:
            raise UserInputError(
                f"the training file(s) {', '.join(missing)} (from the model card) are not in {root}: fetch them "
                "with `zfdiffusion fetch-data`, or pass --images (and --masks).")
        for folder in sorted({h.parent for h in hits[wanted[0]]}):
            if all((folder / n).is_file() for n in wanted):
                return [folder / n for n in wanted]
        return [hits[n][0] for n in wanted]

    images = find(names)
    masks = None
    if paired:
        mask_names = td.get("mask_files") or [KNOWN_MASKS.get(n) for n in names]
        if not all(mask_names):
            raise UserInputError("the model card does not name the mask files: pass --masks.")
        masks = find(mask_names)
    return images, masks


def heldout_tiles(data: PatchData, patch: int, stride: int) -> torch.Tensor | None:
    """Overlapping ``patch`` crops (stride ``stride``) of the held-out images: more real examples for the
    distribution statistics than the non-overlapping ``val_crops``."""
    out = [t[:, y:y + patch, x:x + patch] for t in data.val
           for y in range(0, t.shape[1] - patch + 1, stride) for x in range(0, t.shape[2] - patch + 1, stride)]
    return torch.stack(out) if out else None


def spread(n_total: int, k: int) -> np.ndarray:
    return np.unique(np.linspace(0, n_total - 1, min(k, n_total)).round().astype(int))


def downscale(x: np.ndarray, s: int) -> np.ndarray:
    """(..., H, W) images, mean-pooled by ``s`` (H, W cropped to multiples of ``s``)."""
    t = torch.from_numpy(np.ascontiguousarray(x, np.float32))
    lead = t.shape[:-2]
    t = torch.nn.functional.avg_pool2d(t.reshape(-1, 1, *t.shape[-2:]), s)
    return t.reshape(*lead, *t.shape[-2:]).numpy()


def fft_size(n: int) -> int:
    """The smallest 2^a 3^b 5^c at least ``n`` (fast FFT lengths)."""
    m = n
    while True:
        k = m
        for p in (2, 3, 5):
            while k % p == 0:
                k //= p
        if k == 1:
            return m
        m += 1


@torch.no_grad()
def max_ncc(queries: np.ndarray, images: list[np.ndarray], chunk: int = 256) -> dict[str, np.ndarray]:
    """Exhaustive copy search: for each (h, w) query, the highest normalised cross-correlation (Pearson r)
    with any h x w window of any image (every offset, FFT), over the 8 flips / rotations of the query.

    Returns ``ncc`` (N,) and where it was found: ``image``, ``y``, ``x`` (window corner), ``dihedral``
    (index into :data:`DIHEDRAL_VIEWS`). Windows with no variance count as r = 0."""
    n, h, w = queries.shape
    q = torch.from_numpy(np.ascontiguousarray(queries)).double()
    t = torch.cat([dihedral(q, k, f) for k, f in DIHEDRAL_VIEWS])  # (8N, h, w), transform-major
    t = t - t.mean((-2, -1), keepdim=True)
    t = (t / t.flatten(1).norm(dim=1).clamp_min(1e-12)[:, None, None]).float()
    prepared = []  # per image: FFT size, image FFT, window spread, valid-window mask
    for img in images:
        im = torch.from_numpy(np.ascontiguousarray(img)).double()
        hh, ww = im.shape
        if hh < h or ww < w:
            prepared.append(None)
            continue
        c1 = torch.nn.functional.pad(im.cumsum(0).cumsum(1), (1, 0, 1, 0))
        c2 = torch.nn.functional.pad((im * im).cumsum(0).cumsum(1), (1, 0, 1, 0))

        def box(c):  # sums over every h x w window
            return c[h:, w:] - c[:-h, w:] - c[h:, :-w] + c[:-h, :-w]

        s1, s2 = box(c1), box(c2)
        sd = (s2 - s1 * s1 / (h * w)).clamp_min(0).sqrt()  # sqrt of the window's sum of squared deviations
        ok = sd > 1e-6 * max(1.0, float(sd.max()))
        size = (fft_size(hh), fft_size(ww))  # zero padding: valid offsets never wrap around
        prepared.append((size, torch.fft.rfft2(im.float(), s=size), sd.clamp_min(1e-12).float(), ok))
    best = torch.full((len(t),), -2.0)
    where = torch.zeros((len(t), 3), dtype=torch.long)
    for i in range(0, len(t), chunk):
        tf = t[i:i + chunk].flip(-2, -1)
        cache: dict[tuple[int, int], torch.Tensor] = {}
        for m, prep in enumerate(prepared):
            if prep is None:
                continue
            size, fi, sd, ok = prep
            if size not in cache:
                cache[size] = torch.fft.rfft2(tf, s=size)
            corr = torch.fft.irfft2(fi[None] * cache[size], s=size)
            corr = corr[:, h - 1:h - 1 + sd.shape[0], w - 1:w - 1 + sd.shape[1]]  # the valid offsets
            r = torch.where(ok, corr / sd, torch.zeros(())).flatten(1)
            v, j = r.max(1)
            better = v > best[i:i + chunk]
            best[i:i + chunk] = torch.where(better, v, best[i:i + chunk])
            loc = torch.stack([torch.full_like(j, m), j // sd.shape[1], j % sd.shape[1]], 1)
            where[i:i + chunk][better] = loc[better]
    best, where = best.reshape(len(DIHEDRAL_VIEWS), n), where.reshape(len(DIHEDRAL_VIEWS), n, 3)
    k = best.argmax(0)
    ar = torch.arange(n)
    return {"ncc": best[k, ar].double().numpy(), "image": where[k, ar, 0].numpy(), "y": where[k, ar, 1].numpy(),
            "x": where[k, ar, 2].numpy(), "dihedral": k.numpy()}


def intensity_hist(x: np.ndarray, bins: np.ndarray) -> np.ndarray:
    return np.histogram(np.asarray(x).ravel(), bins=bins, density=True)[0]


def wasserstein(a: np.ndarray, b: np.ndarray, n: int = 1001) -> float:
    """1-Wasserstein distance between two intensity distributions (mean |difference of quantiles|)."""
    q = np.linspace(0, 1, n)
    return float(np.mean(np.abs(np.quantile(np.asarray(a).ravel(), q) - np.quantile(np.asarray(b).ravel(), q))))


def spectrum_log_ratio(p: np.ndarray, ref: np.ndarray) -> float:
    """Mean |log10(p / ref)| over the frequency bins above zero: 0 = same spectrum, 0.3 = a factor 2."""
    ok = (ref[1:] > 0) & (p[1:] > 0)
    return float(np.mean(np.abs(np.log10(p[1:][ok] / ref[1:][ok]))))


def mask_recall(found: np.ndarray, masks: np.ndarray, cover: float = 0.5) -> dict:
    """Of the objects in ``found`` (labels per patch, e.g. what a segmentation U-Net finds in the image),
    the fraction whose pixels the ``masks`` (labels or foreground per patch) cover at least ``cover`` of:
    how many of the nuclei that the image shows have a mask."""
    hit = total = 0
    for f, m in zip(found, masks):
        ids, counts = np.unique(f[f > 0], return_counts=True)
        if not len(ids):
            continue
        covered = np.bincount(f[(f > 0) & (m > 0)], minlength=int(f.max()) + 1)[ids]
        hit += int((covered >= cover * counts).sum())
        total += len(ids)
    return {"objects": total, "covered": hit, "recall": hit / total if total else None}


def object_stats(labels: np.ndarray, images: np.ndarray) -> dict:
    """Objects per patch, object areas and foreground fraction of (N, H, W) labels, and the mean image
    intensity inside vs outside the objects (the mask follows the image if inside differs from outside)."""
    counts, areas = [], []
    for lab in labels:
        a = np.bincount(lab.ravel())[1:]
        a = a[a > 0]
        counts.append(len(a))
        areas.extend(a.tolist())
    fg = labels > 0
    inside = float(images[fg].mean()) if fg.any() else None
    outside = float(images[~fg].mean()) if (~fg).any() else None
    return {"patches": len(labels), "objects_per_patch_mean": float(np.mean(counts)),
            "objects_per_patch_std": float(np.std(counts)), "objects_total": int(sum(counts)),
            "object_area_mean_px": float(np.mean(areas)) if areas else None,
            "object_area_median_px": float(np.median(areas)) if areas else None,
            "foreground_fraction": float(fg.mean()), "image_mean_inside": inside, "image_mean_outside": outside,
            "inside_minus_outside": None if inside is None or outside is None else inside - outside}


# ------------------------------------------------------------------------------------- figures
def _save(fig, path: Path) -> None:
    """Every figure of this evaluation ends the same way: laid out, saved at 100 dpi (PNG or JPEG, as
    the suffix says), closed."""
    fig.tight_layout()
    save_figure(fig, path, dpi=100)
    _plt().close(fig)


def _off(ax) -> None:
    ax.set_xticks([])
    ax.set_yticks([])


def fig_samples(path: Path, rows: list[tuple[str, np.ndarray]], title: str) -> None:
    plt = _plt()
    k = max(len(r[1]) for r in rows)
    fig, axes = plt.subplots(len(rows), k, figsize=(2.7 * k, 2.75 * len(rows) + 0.6), squeeze=False)
    for r, (name, imgs) in enumerate(rows):
        for c in range(k):
            ax = axes[r, c]
            _off(ax)
            if c < len(imgs):
                ax.imshow(imgs[c], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            else:
                ax.axis("off")
        axes[r, 0].set_ylabel(name, fontsize=9)
    fig.suptitle(title, fontsize=10)
    _save(fig, path)


def fig_nn_hist(path: Path, panels: list[tuple[dict[str, np.ndarray], str]], title: str) -> None:
    """panels: (series name -> values, x label)."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    for ax, (series, xlabel) in zip(axes[0], panels):
        allv = np.concatenate(list(series.values()))
        lo, hi = min(0.0, float(allv.min())), float(allv.max())
        bins = np.linspace(lo, hi + 0.05 * (hi - lo) + 1e-9, 40)
        for name, d in series.items():
            real = name.startswith("real")
            ax.hist(d, bins=bins, density=True, histtype="stepfilled" if real else "step",
                    alpha=0.35 if real else 1.0, lw=1.5, label=f"{name}, n={len(d)} (median {np.median(d):.3f})")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("density")
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    _save(fig, path)


def fig_pairs(path: Path, groups: list[tuple[str, np.ndarray, np.ndarray, list[str]]]) -> None:
    """groups: (title, queries (k, H, W), nearest training crops (k, H, W), a caption per query)."""
    plt = _plt()
    ncol = sum(len(g[1]) for g in groups)
    fig, axes = plt.subplots(2, ncol, figsize=(2.1 * ncol, 4.9), squeeze=False)
    c = 0
    for title, q, nb, d in groups:
        for i in range(len(q)):
            for r, img in enumerate((q[i], nb[i])):
                axes[r, c].imshow(img, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
                _off(axes[r, c])
            axes[0, c].set_title(f"{title if i == 0 else ''}\n{d[i]}", fontsize=7, loc="left")
            c += 1
    axes[0, 0].set_ylabel("query", fontsize=8)
    axes[1, 0].set_ylabel("nearest training\ncrop or window", fontsize=8)
    fig.suptitle("Top: query (in the flip/rotation that matched); bottom: its match in the training data. Left: the "
                 "generated patches closest (RMS d, [0, 1] intensities) to one of the random training crops; middle: "
                 "the generated patches\nwith the best-correlated window anywhere in the training images (r, "
                 "exhaustive search; file and window corner (y, x)); right: the closest and a median held-out real "
                 "crop (d), for scale", fontsize=9)
    _save(fig, path)


def fig_stats(path: Path, hists: dict[str, tuple[np.ndarray, np.ndarray]],
              spectra: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    styles = {"generated": {"color": "C3", "lw": 1.8}, "real held-out": {"color": "C0", "lw": 1.8},
              "real training": {"color": "C0", "lw": 1.0, "ls": "--"},
              "reconstructed held-out": {"color": "C2", "lw": 1.2}}
    for name, (edges, h) in hists.items():
        axes[0].stairs(h, edges, label=name, **styles.get(name, {}))
    axes[0].set_xlabel("intensity (normalised, [0, 1])")
    axes[0].set_ylabel("density")
    axes[0].set_yscale("log")
    axes[0].set_title("Intensity histogram", fontsize=10)
    axes[0].legend(fontsize=8)
    for name, (f, p) in spectra.items():
        ok = (np.arange(len(f)) > 0) & (p > 0)  # no zero-frequency bin; small patches leave some bins empty
        axes[1].loglog(f[ok], p[ok], label=name, **styles.get(name, {}))
    axes[1].set_xlabel("spatial frequency (cycles / pixel)")
    axes[1].set_ylabel("power")
    axes[1].set_title("Radially averaged power spectrum (mean over patches)", fontsize=10)
    axes[1].legend(fontsize=8)
    _save(fig, path)


def overlay(img: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """A gray image as RGB with the object outlines in yellow."""
    from skimage.segmentation import find_boundaries

    rgb = np.repeat(np.clip(img, 0, 1)[..., None], 3, axis=-1)
    rgb[find_boundaries(labels, mode="inner")] = (1.0, 0.85, 0.0)
    return rgb


def fig_masks(path: Path, rows: list[tuple[str, np.ndarray, np.ndarray]], title: str) -> None:
    plt = _plt()
    k = max(len(r[1]) for r in rows)
    fig, axes = plt.subplots(len(rows), k, figsize=(2.8 * k, 2.95 * len(rows) + 0.6), squeeze=False)
    for r, (name, imgs, labs) in enumerate(rows):
        for c in range(k):
            ax = axes[r, c]
            _off(ax)
            if c < len(imgs):
                ax.imshow(overlay(imgs[c], labs[c]), interpolation="nearest")
                n_obj = int(len(np.unique(labs[c])) - (labs[c] == 0).any())
                ax.set_title(f"{n_obj} object{'' if n_obj == 1 else 's'}", fontsize=7)
            else:
                ax.axis("off")
        axes[r, 0].set_ylabel(name, fontsize=9)
    fig.suptitle(title, fontsize=10)
    _save(fig, path)


# ----------------------------------------------------------------------------------------- main
def default_model() -> str:
    return str(RUN_MODEL) if (RUN_MODEL / "model.json").is_file() else BUNDLED_MODEL


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG + "em", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=default_model(),
                   help="latent diffusion model folder or model name (default: runs/patches/em-ldm-demo if "
                        "trained, else the bundled em-ldm-demo)")
    p.add_argument("--out", type=Path, required=True,
                   help="writes OUT/results/em_eval_<model>.json and OUT/images/em_<model>_*.{png,jpg}")
    p.add_argument("--images", nargs="+", default=None,
                   help="the training images (files or folders; default: the files in the model card, from the "
                        "fetched-data folder)")
    p.add_argument("--masks", nargs="+", default=None, help="their masks, for a paired model (default: as --images)")
    p.add_argument("--n", type=int, default=64, help="generated patches")
    p.add_argument("--steps", type=int, default=50, help="sampling steps (the CLI's default)")
    p.add_argument("--sampler", default=DEFAULT_SAMPLER, choices=SAMPLERS)
    p.add_argument("--seed", type=int, default=0, help="patch i uses seed + i; training crops use --seed too")
    p.add_argument("--batch", type=int, default=8, help="patches per sampling batch")
    p.add_argument("--threshold", type=float, default=0.5, help="mask threshold (paired models)")
    p.add_argument("--min-size", type=int, default=16, help="smallest object in pixels (paired models)")
    p.add_argument("--unet", default="nuclei-unet-demo",
                   help="paired models: segmentation model whose objects the masks should cover (none: skip)")
    p.add_argument("--nn-ref", type=int, default=2000, help="random training crops for the memorisation check")
    p.add_argument("--ncc-downsample", type=int, default=4,
                   help="mean pooling before the exhaustive correlation search (1: full resolution, slow)")
    p.add_argument("--ncc-heldout", type=int, default=64, help="held-out tiles in the exhaustive search")
    p.add_argument("--val-limit", type=int, default=256, help="most held-out crops for the reconstruction metrics")
    p.add_argument("--tile-stride", type=int, default=None,
                   help="stride of the held-out tiles for the distribution statistics (default: patch / 2)")
    add_compute(p)
    a = p.parse_args(argv)
    if min(a.n, a.batch, a.nn_ref, a.val_limit, a.ncc_downsample, a.ncc_heldout) < 1:
        p.error("--n, --batch, --nn-ref, --val-limit, --ncc-downsample and --ncc-heldout must be at least 1")
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    img_dir, res_dir = begin(a)
    t_start = time.perf_counter()
    model = LatentModel.load(a.model, device=a.device)
    card, patch, name = model.card, model.patch_size, model.name
    out_json = res_dir / f"em_eval_{name}.json"
    unet_steps = model.stage.get("training", {}).get("steps_done")
    log(f"model {model.path} ({'image + mask' if model.paired else 'image'}, {patch}x{patch}; autoencoder steps "
        f"{card.get('vae_steps')}, UNet steps {unet_steps}), device {model.device}, "
        f"torch threads {torch.get_num_threads()}")

    # ---- data: the training / held-out split the model was trained with ------------------------
    if a.images is None:
        if a.masks is not None:
            raise UserInputError("--masks needs --images too.")
        images, masks = find_training_files(card, model.paired)
    else:
        images, masks = a.images, a.masks
    if model.paired and masks is None:
        raise UserInputError(f"'{name}' generates image + mask pairs: pass --masks with --images.")
    if not model.paired and masks is not None:
        raise UserInputError(f"'{name}' generates images only: leave out --masks.")
    data = PatchData.from_paths(images, masks, patch=patch, norm=model.normalisation)
    if model.paired and card.get("mask_encoding") and data.mask_encoding != card["mask_encoding"]:
        raise UserInputError(f"these masks are {data.mask_encoding}, the model learned {card['mask_encoding']} masks.")
    trained_on = (card.get("training_data") or {}).get("files")
    files = data.describe()["files"]
    if trained_on and sorted(trained_on) != files:
        log(f"warning: the model card lists the training files {trained_on}, these are {files}: "
            "the held-out split may differ from training")
    encoding = card.get("mask_encoding") or "binary"
    log(f"data: {len(data.names)} images ({', '.join(files)}); {data.split}")
    val = data.val_crops(patch, a.val_limit)
    if val is None:
        raise UserInputError(f"no held-out crops: {data.split}. Give 5 or more images, or images with at least "
                             f"{2 * patch} rows.")
    tiles = heldout_tiles(data, patch, a.tile_stride or max(1, patch // 2))
    timings: dict[str, float] = {}

    # ---- 1. reconstruction ----------------------------------------------------------------------
    t0 = time.perf_counter()
    rec = torch.cat([model.decode(model.encode(val[i:i + a.batch]), batch=a.batch)
                     for i in range(0, len(val), a.batch)])
    timings["reconstruction_s"] = time.perf_counter() - t0
    real_img, rec_img = to_unit(val[:, 0]), to_unit(rec[:, 0])
    recon = {"crops": len(val), "crops_from": "PatchData.val_crops: non-overlapping held-out tiles",
             "mse": float(np.mean((real_img - rec_img) ** 2)),
             "psnr": float(np.mean([psnr(x, y) for x, y in zip(real_img, rec_img)])),
             "ssim": ssim(real_img, rec_img), "card_validation": card.get("validation")}
    if model.paired:
        recon["mask_dice"] = dice(to_unit(rec[:, 1]) >= 0.5, to_unit(val[:, 1]) >= 0.5)
        recon["mask_dice_per_crop_mean"] = float(np.mean(
            [dice(p >= 0.5, q >= 0.5) for p, q in zip(to_unit(rec[:, 1]), to_unit(val[:, 1]))]))
    log(f"reconstruction on {len(val)} held-out crops: MSE {recon['mse']:.5f}, PSNR {recon['psnr']:.2f} dB, "
        f"SSIM {recon['ssim']:.3f}" + (f", mask Dice {recon['mask_dice']:.3f}" if model.paired else ""))

    rec_tiles = to_unit(torch.cat([model.decode(model.encode(tiles[i:i + a.batch]), batch=a.batch)
                                   for i in range(0, len(tiles), a.batch)])[:, 0])

    # ---- 2. generation, timed -------------------------------------------------------------------
    marks: dict[str, float] = {}

    def progress(p):
        if p.step == p.total:
            if model.device.type == "cuda":
                torch.cuda.synchronize(model.device)
            marks[p.stage] = time.perf_counter()

    t0 = time.perf_counter()
    res = model.generate(a.n, seed=a.seed, sampler=a.sampler, steps=a.steps, batch=a.batch, threshold=a.threshold,
                         min_size=a.min_size, callback=progress)
    t_end = time.perf_counter()
    timings.update({
        "generate_s": t_end - t0,
        "sample_s": marks["sample"] - t0, "decode_s": marks["decode"] - marks["sample"],
        "labels_s": t_end - marks["decode"],
        "sample_s_per_patch": (marks["sample"] - t0) / a.n,
        "sample_s_per_patch_per_step": (marks["sample"] - t0) / a.n / a.steps,
        "decode_s_per_patch": (marks["decode"] - marks["sample"]) / a.n,
        "generate_s_per_patch": (t_end - t0) / a.n,
    })
    gen = res.images
    log(f"generated {a.n} patches in {timings['generate_s']:.1f} s: sampling {timings['sample_s_per_patch']:.2f} "
        f"s/patch ({a.steps} steps, batch {a.batch}), decoding {timings['decode_s_per_patch']:.3f} s/patch")

    # ---- 3. memorisation --------------------------------------------------------------------------
    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(a.seed)
    ref = np.concatenate([to_unit(data.random_crops(min(250, a.nn_ref - i), patch, g, augment=False)[:, 0])
                          for i in range(0, a.nn_ref, 250)])
    real_tiles = to_unit(tiles[:, 0])
    d_gen, k_gen = nearest_neighbour_rms_dihedral(gen, ref)
    d_real, k_real = nearest_neighbour_rms_dihedral(real_tiles, ref)
    d_rec, _ = nearest_neighbour_rms_dihedral(rec_tiles, ref)
    timings["memorisation_nn_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    sc = a.ncc_downsample
    train_imgs = [to_unit(t_[0]) for t_ in data.train]
    ncc_real_idx = spread(len(real_tiles), a.ncc_heldout)
    ncc_gen = max_ncc(downscale(gen, sc), [downscale(i, sc) for i in train_imgs])
    ncc_real = max_ncc(downscale(real_tiles[ncc_real_idx], sc), [downscale(i, sc) for i in train_imgs])
    ncc_rec = max_ncc(downscale(rec_tiles[ncc_real_idx], sc), [downscale(i, sc) for i in train_imgs])
    r_gen, r_real, r_rec = ncc_gen["ncc"], ncc_real["ncc"], ncc_rec["ncc"]
    timings["memorisation_ncc_s"] = time.perf_counter() - t0
    mem = {
        "reference": f"{len(ref)} random {patch}x{patch} training crops (PatchData.random_crops, augment=False, "
                     f"seed {a.seed})",
        "metric": "RMS difference per pixel of [0, 1] images, minimised over the 8 flips/rotations of the query",
        "generated": quartiles(d_gen), "real_heldout": quartiles(d_real),
        "real_heldout_reconstructed": quartiles(d_rec),
        "reconstructed_note": "the held-out tiles passed through the autoencoder: as smooth as generated patches "
                              "(the decoder drops fine texture and noise), so the fair reference for RMS distances; "
                              "a smooth patch lies closer to everything than a noisy real one",
        "real_heldout_queries": f"{len(real_tiles)} held-out tiles, stride {a.tile_stride or max(1, patch // 2)}",
        "median_ratio_generated_to_real": float(np.median(d_gen) / np.median(d_real)),
        "frac_generated_below_real_min": float((d_gen < d_real.min()).mean()),
        "frac_generated_below_real_p05": float((d_gen < np.percentile(d_real, 5)).mean()),
        "median_ratio_generated_to_reconstructed": float(np.median(d_gen) / np.median(d_rec)),
        "frac_generated_below_reconstructed_min": float((d_gen < d_rec.min()).mean()),
        "frac_generated_below_reconstructed_p05": float((d_gen < np.percentile(d_rec, 5)).mean()),
        "exhaustive_ncc": {
            "metric": f"highest normalised cross-correlation (Pearson r) with any {patch}x{patch} window of the "
                      f"training images, every offset and the 8 flips/rotations of the patch, after {sc}x{sc} "
                      "mean pooling; a copy of any training region scores near 1. Insensitive to brightness and "
                      "contrast, so flat or blurry patches (close to everything in RMS distance) score low",
            "generated": quartiles(r_gen), "real_heldout": quartiles(r_real),
            "real_heldout_reconstructed": quartiles(r_rec),
            "real_heldout_queries": f"{len(r_real)} of the held-out tiles",
            "frac_generated_above_real_max": float((r_gen > r_real.max()).mean()),
            "frac_generated_above_real_p95": float((r_gen > np.percentile(r_real, 95)).mean()),
            "frac_generated_above_reconstructed_max": float((r_gen > r_rec.max()).mean()),
        },
    }
    log(f"nearest training crop: generated median {np.median(d_gen):.4f} (min {d_gen.min():.4f}), held-out real "
        f"median {np.median(d_real):.4f} (min {d_real.min():.4f}), held-out reconstructed median "
        f"{np.median(d_rec):.4f} (min {d_rec.min():.4f}); {mem['frac_generated_below_reconstructed_min']:.1%} of "
        f"generated below the reconstructed held-out minimum; best correlation with any training window: "
        f"generated median {np.median(r_gen):.3f} (max {r_gen.max():.3f}), held-out real median "
        f"{np.median(r_real):.3f} (max {r_real.max():.3f}), reconstructed {np.median(r_rec):.3f} "
        f"(max {r_rec.max():.3f})")

    # ---- 4. intensity and spectra ----------------------------------------------------------------
    edges = np.linspace(0, 1, 41)  # coarse: 8-bit data normalised to [0, 1] alias finer bins
    train_sub = ref[spread(len(ref), 256)]
    sets = {"generated": gen, "real held-out": real_tiles, "real training": train_sub,
            "reconstructed held-out": rec_tiles}
    hists = {k: (edges, intensity_hist(v, edges)) for k, v in sets.items()}
    spectra = {k: radial_power_spectrum(v) for k, v in sets.items()}
    stats = {
        "intensity": {k: {"mean": float(v.mean()), "std": float(v.std()),
                          "p01": float(np.percentile(v, 1)), "p99": float(np.percentile(v, 99)),
                          "frac_at_0": float((v <= 0).mean()), "frac_at_1": float((v >= 1).mean())}
                      for k, v in sets.items()},
        "wasserstein_generated_vs_real_heldout": wasserstein(gen, real_tiles),
        "wasserstein_generated_vs_real_training": wasserstein(gen, train_sub),
        "wasserstein_real_heldout_vs_real_training": wasserstein(real_tiles, train_sub),
        "wasserstein_generated_vs_reconstructed_heldout": wasserstein(gen, rec_tiles),
        "wasserstein_reconstructed_vs_real_heldout": wasserstein(rec_tiles, real_tiles),
        "spectrum_log10_ratio": {
            "generated_vs_real_heldout": spectrum_log_ratio(spectra["generated"][1], spectra["real held-out"][1]),
            "reconstructed_vs_real_heldout": spectrum_log_ratio(spectra["reconstructed held-out"][1],
                                                                spectra["real held-out"][1]),
            "real_training_vs_real_heldout": spectrum_log_ratio(spectra["real training"][1],
                                                                spectra["real held-out"][1]),
            "generated_vs_reconstructed_heldout": spectrum_log_ratio(spectra["generated"][1],
                                                                     spectra["reconstructed held-out"][1]),
        },
        "edge_profile": {k: edge_profile(v) for k, v in sets.items()},
        # the target of the autoencoder recipe (issue 15): within 2x of the real power up to 0.25 cycles/px
        "spectrum_ratio_generated": spectrum_ratio(real_tiles, gen),
        "spectrum_ratio_reconstructed": spectrum_ratio(real_tiles, rec_tiles),
        "spectra": {k: {"frequency": f.tolist(), "power": p.tolist()} for k, (f, p) in spectra.items()},
        "note": "real held-out: the held-out tiles; real training: 256 of the memorisation reference crops; "
                "reconstructed: the held-out tiles through the autoencoder (what a perfect latent model would "
                "give); generated vs reconstructed isolates the diffusion model from the autoencoder",
    }
    log(f"intensity mean generated {stats['intensity']['generated']['mean']:.3f} vs real held-out "
        f"{stats['intensity']['real held-out']['mean']:.3f}; W1 {stats['wasserstein_generated_vs_real_heldout']:.4f}; "
        f"spectrum |log10 ratio| generated {stats['spectrum_log10_ratio']['generated_vs_real_heldout']:.3f}, "
        f"reconstructed {stats['spectrum_log10_ratio']['reconstructed_vs_real_heldout']:.3f}, generated vs "
        f"reconstructed {stats['spectrum_log10_ratio']['generated_vs_reconstructed_heldout']:.3f}; edge - centre "
        + ", ".join(f"{k} {v['edge_minus_centre']:+.3f}" for k, v in stats["edge_profile"].items()))

    # ---- 5. masks (paired models) ----------------------------------------------------------------
    masks_info = None
    if model.paired:
        real_labels = labels_from_mask(to_unit(tiles[:, 1]), encoding=encoding, threshold=a.threshold,
                                       min_size=a.min_size)
        masks_info = {
            "labels": f"core.masks.labels_from_mask(encoding={encoding!r}, threshold={a.threshold}, "
                      f"min_size={a.min_size}) on the generated masks and on the real held-out (encoded) masks",
            "generated": object_stats(res.labels, gen), "real_heldout": object_stats(real_labels, real_tiles),
        }
        if a.unet != "none":  # do the masks cover the nuclei the image shows? (a segmentation U-Net's objects)
            from ..core.segment.segmenter import Segmenter

            seg = Segmenter.load(a.unet, "cpu")
            found_gen = seg.segment(gen, probability=False).labels
            found_real = seg.segment(real_tiles, probability=False).labels
            masks_info["recall_of_unet_objects"] = {
                "unet": a.unet, "cover": 0.5,
                "generated": mask_recall(found_gen, res.labels), "real_heldout": mask_recall(found_real, real_labels)}
            rc = masks_info["recall_of_unet_objects"]
            log(f"objects of {a.unet} with >= half their pixels in the mask: generated "
                f"{rc['generated']['recall'] or 0:.3f} ({rc['generated']['objects']}), real held-out "
                f"{rc['real_heldout']['recall'] or 0:.3f} ({rc['real_heldout']['objects']})")
        gm, rm = masks_info["generated"], masks_info["real_heldout"]
        log(f"objects per patch: generated {gm['objects_per_patch_mean']:.2f} vs real "
            f"{rm['objects_per_patch_mean']:.2f}; "
            f"mean area {gm['object_area_mean_px'] or 0:.0f} vs {rm['object_area_mean_px'] or 0:.0f} px; foreground "
            f"{gm['foreground_fraction']:.3f} vs {rm['foreground_fraction']:.3f}; inside - outside intensity "
            f"{gm['inside_minus_outside'] or 0:.3f} vs {rm['inside_minus_outside'] or 0:.3f}")

    # ---- 6. figures --------------------------------------------------------------------------------
    figures = []

    def fig_path(what: str, photo: bool = False) -> Path:
        figures.append(img_dir / f"em_{name}_{what}{figure_suffix(photo)}")
        return figures[-1]

    steps_txt = f"UNet {unet_steps} steps, autoencoder {card.get('vae_steps')} steps"
    show = spread(len(val), 6)
    fig_samples(fig_path("samples", photo=True),
                [("real held-out", real_img[show]), ("reconstructed", rec_img[show]), ("generated", gen[:6])],
                f"{name} ({steps_txt}): held-out real {patch}x{patch} crops, their autoencoder reconstructions,\n"
                f"and generated patches (seeds {a.seed}-{a.seed + min(6, a.n) - 1}, {a.sampler} {a.steps} steps)")
    fig_nn_hist(fig_path("nn_hist"),
                [({"real held-out": d_real, "held-out reconstructed": d_rec, "generated": d_gen},
                  "RMS distance to the nearest training crop (intensities in [0, 1])"),
                 ({"real held-out": r_real, "held-out reconstructed": r_rec, "generated": r_gen},
                  f"highest correlation with any training window (all offsets, {sc}x{sc} pooled)")],
                f"{name}: left, the nearest of {len(ref)} random training crops; right, the best-matching window "
                "anywhere in the training images (both: best of 8 flips/rotations of each patch).\nCopies would "
                "sit left of the held-out crops (distance; compare with the equally smooth reconstructions) or right "
                "of them (correlation)")
    pick_real = np.argsort(d_real)[[0, len(d_real) // 2]]  # the closest held-out tile, and a median one
    groups = []
    for title, q_set, idx, k_set in (("closest generated (d)", gen, np.argsort(d_gen)[:4], k_gen),
                                     ("held-out real (d)", real_tiles, pick_real, k_real)):
        qs, nbs, caps = [], [], []
        for i in idx:
            kk, ff = DIHEDRAL_VIEWS[int(k_set[i])]
            q = dihedral(torch.from_numpy(q_set[i]), kk, ff).numpy()
            qs.append(q)
            nbs.append(ref[int(nearest_neighbours(q[None], ref, reference_chunk=256)[1][0])])
            caps.append(f"d={np.sqrt(np.mean((q - nbs[-1]) ** 2)):.3f}")
        groups.append((title, np.stack(qs), np.stack(nbs), caps))
    qs, nbs, caps = [], [], []
    for i in np.argsort(-r_gen)[:4]:  # the best matches anywhere, at full resolution
        kk, ff = DIHEDRAL_VIEWS[int(ncc_gen["dihedral"][i])]
        y, x = int(ncc_gen["y"][i]) * sc, int(ncc_gen["x"][i]) * sc
        qs.append(dihedral(torch.from_numpy(gen[i]), kk, ff).numpy())
        nbs.append(train_imgs[int(ncc_gen["image"][i])][y:y + patch, x:x + patch])
        caps.append(f"r={r_gen[i]:.2f}, {data.names[int(ncc_gen['image'][i])]}\n({y}, {x})")
    groups.insert(1, ("best match anywhere (r)", np.stack(qs), np.stack(nbs), caps))
    fig_pairs(fig_path("nn_pairs", photo=True), groups)
    fig_stats(fig_path("stats"), hists, spectra)
    if model.paired:
        gen_show = np.arange(min(6, a.n))
        tile_show = spread(len(real_tiles), 6)
        fig_masks(fig_path("masks", photo=True),
                  [("generated", gen[gen_show], res.labels[gen_show]),
                   ("real held-out", real_tiles[tile_show], real_labels[tile_show])],
                  f"{name}: object outlines (labels from the mask channel, threshold {a.threshold}, min size "
                  f"{a.min_size}) on generated patches and on real held-out crops")
    timings["total_s"] = time.perf_counter() - t_start

    # ---- 7. results ----------------------------------------------------------------------------------
    result = {
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command("em", argv),
        "git_commit": git_commit(),
        "model": {"path": str(model.path), "name": name, "paired": model.paired, "patch_size": patch,
                  "vae_steps": card.get("vae_steps"), "unet_steps_done": unet_steps,
                  "latent_shape": card.get("latent_shape"), "mask_encoding": card.get("mask_encoding")},
        "settings": {"n": a.n, "steps": a.steps, "sampler": a.sampler, "seed": a.seed,
                     "seeds": f"{a.seed}-{a.seed + a.n - 1}",
                     "batch": a.batch, "threshold": a.threshold, "min_size": a.min_size, "nn_ref": a.nn_ref,
                     "ncc_downsample": a.ncc_downsample, "ncc_heldout": a.ncc_heldout,
                     "tile_stride": a.tile_stride or max(1, patch // 2), "val_limit": a.val_limit,
                     "device": str(model.device)},
        "environment": {"torch": torch.__version__, "threads": torch.get_num_threads(),
                        "python": platform.python_version(), "machine": platform.machine()},
        "data": {**data.describe(), "image_paths": [str(p) for p in images],
                 "mask_paths": None if masks is None else [str(p) for p in masks],
                 "heldout_crops": len(val), "heldout_tiles": len(tiles)},
        "reconstruction": recon,
        "memorisation": mem,
        "statistics": stats,
        "masks": masks_info,
        "timings_s": timings,
        "figures": [shown_path(f) for f in figures],
    }
    out_json.write_text(json.dumps(rounded(result, 5, significant=True), indent=2) + "\n")
    log(f"wrote {shown_path(out_json)} and {len(figures)} figures ({shown_path(img_dir)}/em_{name}_*) in "
        f"{timings['total_s']:.0f} s")
    return 0


if __name__ == "__main__":
    run(main)
