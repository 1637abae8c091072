"""Quality figures shared by training logs, the pipelines and the evaluation (images, masks, volumes).

All take float images in [0, 1].
"""

from __future__ import annotations

import numpy as np


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(1.0 / mse)


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean SSIM of two 2D images (scikit-image, data range 1), or the mean over a (N, Y, X) batch."""
    from skimage.metrics import structural_similarity

    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    if a.ndim == 3:
        return float(np.mean([ssim(x, y) for x, y in zip(a, b)]))
    return float(structural_similarity(a, b, data_range=1.0))


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two boolean masks (1.0 when both are empty)."""
    p, t = np.asarray(pred, bool), np.asarray(truth, bool)
    s = p.sum() + t.sum()
    return 1.0 if s == 0 else float(2.0 * (p & t).sum() / s)


def iou(pred: np.ndarray, truth: np.ndarray) -> float:
    p, t = np.asarray(pred, bool), np.asarray(truth, bool)
    u = (p | t).sum()
    return 1.0 if u == 0 else float((p & t).sum() / u)


def radial_power_spectrum(img: np.ndarray, bins: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Radially averaged power spectrum of a 2D image (or the mean over a (N, Y, X) batch).

    Returns (frequency in cycles per pixel, power), with the mean removed and a Hann window applied.
    """
    img = np.asarray(img, np.float64)
    if img.ndim == 3:
        specs = [radial_power_spectrum(i, bins) for i in img]
        return specs[0][0], np.mean([s[1] for s in specs], axis=0)
    h, w = img.shape
    win = np.outer(np.hanning(h), np.hanning(w))
    f = np.fft.fftshift(np.fft.fft2((img - img.mean()) * win))
    p = np.abs(f) ** 2 / (h * w)
    fy = np.fft.fftshift(np.fft.fftfreq(h))[:, None]
    fx = np.fft.fftshift(np.fft.fftfreq(w))[None, :]
    r = np.sqrt(fy**2 + fx**2)
    edges = np.linspace(0, 0.5, bins + 1)
    idx = np.digitize(r.ravel(), edges) - 1
    ok = (idx >= 0) & (idx < bins)
    power = np.bincount(idx[ok], weights=p.ravel()[ok], minlength=bins) / np.maximum(
        np.bincount(idx[ok], minlength=bins), 1)
    return 0.5 * (edges[1:] + edges[:-1]), power


def edge_profile(x: np.ndarray, band: int = 16) -> dict:
    """Mean intensity of a ``band``-pixel frame at the patch edges, of the central half, and their difference
    (padding artefacts of a convolutional decoder show up as a frame)."""
    h, w = x.shape[-2:]
    frame = np.ones((h, w), bool)
    frame[band:h - band, band:w - band] = False
    edge, centre = float(x[..., frame].mean()), float(x[..., h // 4:3 * h // 4, w // 4:3 * w // 4].mean())
    return {"edge_band_mean": edge, "centre_mean": centre, "edge_minus_centre": edge - centre}


def spectrum_ratio(real: np.ndarray, other: np.ndarray, up_to: float = 0.25, from_: float = 1 / 64) -> dict:
    """The radially averaged power of ``other`` over that of ``real`` (both (N, Y, X) batches), at the
    frequencies from ``from_`` to ``up_to`` cycles/pixel: its smallest and largest value (1 = the same
    power; "within 2x" = between 0.5 and 2)."""
    f, p_real = radial_power_spectrum(real)
    _, p_other = radial_power_spectrum(other)
    keep = (f >= from_) & (f <= up_to)
    r = p_other[keep] / np.maximum(p_real[keep], 1e-20)
    return {"spectrum_ratio_min": float(r.min()), "spectrum_ratio_max": float(r.max())}


def nearest_neighbour_rms(queries: np.ndarray, reference: np.ndarray, chunk: int = 256) -> np.ndarray:
    """For each query image, the RMS distance to its nearest reference image (all (N, Y, X) in [0, 1])."""
    q = np.asarray(queries, np.float32).reshape(len(queries), -1)
    r = np.asarray(reference, np.float32).reshape(len(reference), -1)
    rn = (r**2).sum(1)
    best = np.full(len(q), np.inf)
    for i in range(0, len(r), chunk):
        d = (q**2).sum(1)[:, None] + rn[None, i:i + chunk] - 2.0 * q @ r[i:i + chunk].T
        best = np.minimum(best, d.min(1))
    return np.sqrt(np.maximum(best, 0) / q.shape[1])


def match_objects(truth: np.ndarray, pred: np.ndarray, threshold: float = 0.5) -> dict:
    """Per-object matching of two label images: an object pair matches when its IoU exceeds
    ``threshold`` (for 0.5 or more each object matches at most one other).

    Returns tp, fp, fn, precision, recall, f1 and the mean IoU of the matched pairs.
    """
    t = np.asarray(truth).astype(np.int64).ravel()
    p = np.asarray(pred).astype(np.int64).ravel()
    nt, np_ = int(t.max(initial=0)), int(p.max(initial=0))
    area_t = np.bincount(t, minlength=nt + 1)
    area_p = np.bincount(p, minlength=np_ + 1)
    both = (t > 0) & (p > 0)
    pairs, inter = np.unique(t[both] * (np_ + 1) + p[both], return_counts=True)
    ti, pi = pairs // (np_ + 1), pairs % (np_ + 1)
    iou_pairs = inter / (area_t[ti] + area_p[pi] - inter)
    ok = iou_pairs > threshold
    tp = int(len(np.unique(ti[ok])))
    n_true, n_pred = int((area_t[1:] > 0).sum()), int((area_p[1:] > 0).sum())
    fp, fn = n_pred - tp, n_true - tp
    prec = tp / n_pred if n_pred else 1.0
    rec = tp / n_true if n_true else 1.0
    f1 = 2 * tp / (2 * tp + fp + fn) if (tp + fp + fn) else 1.0
    return {"tp": tp, "fp": fp, "fn": fn, "precision": prec, "recall": rec, "f1": f1,
            "matched_iou": float(iou_pairs[ok].mean()) if ok.any() else 0.0}


def neighbour_agreement(volume: np.ndarray) -> dict:
    """Pearson correlation and SSIM between each plane and the next, for a (Z, Y, X) volume in [0, 1]."""
    vol = np.asarray(volume, dtype=np.float32)
    if vol.ndim != 3 or vol.shape[0] < 2:
        raise ValueError("neighbour agreement needs a (Z, Y, X) volume with at least 2 planes")
    corr, sims = [], []
    for a, b in zip(vol[:-1], vol[1:]):
        c = np.corrcoef(a.ravel(), b.ravel())[0, 1]
        corr.append(float(c) if np.isfinite(c) else 0.0)
        sims.append(ssim(a, b))
    return {"correlation": corr, "ssim": sims,
            "mean_correlation": float(np.mean(corr)), "mean_ssim": float(np.mean(sims))}


def nearest_neighbours(queries: np.ndarray, reference: np.ndarray, *, query_groups=None, reference_groups=None,
                       chunk: int = 256, reference_chunk: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """For each query row (N, D), or image (N, ...), the Euclidean distance to its nearest ``reference`` row
    (M, D) or image, and that row's index; in float64.

    With groups ((N,) and (M,) labels), a query ignores the references of its own group
    (leave-one-group-out, e.g. the other views of the same time point). ``chunk`` queries, and
    ``reference_chunk`` references (None: all at once), are compared at a time.
    """
    import torch

    q_all = np.asarray(queries).reshape(len(queries), -1)
    ref = np.asarray(reference).reshape(len(reference), -1)
    rc = max(1, len(ref) if reference_chunk is None else reference_chunk)
    rg = None if reference_groups is None else torch.from_numpy(np.asarray(reference_groups))
    qg_all = None if query_groups is None else np.asarray(query_groups)

    def part(j: int) -> tuple[torch.Tensor, torch.Tensor]:
        r = torch.from_numpy(ref[j:j + rc]).double()
        return r, (r * r).sum(1)

    starts = range(0, len(ref), rc)
    whole = part(0) if len(starts) == 1 else None  # one block: converted once, not per query chunk
    out_d, out_i = [], []
    for i in range(0, len(q_all), chunk):
        qq = torch.from_numpy(q_all[i:i + chunk]).double()
        q2 = (qq * qq).sum(1)[:, None]
        best = torch.full((len(qq),), float("inf"), dtype=torch.float64)
        arg = torch.zeros(len(qq), dtype=torch.long)
        for j in starts:
            r, r2 = whole if whole is not None else part(j)
            d2 = q2 + r2[None] - 2 * qq @ r.T
            if rg is not None:
                same = torch.from_numpy(qg_all[i:i + chunk])[:, None] == rg[None, j:j + len(r)]
                d2[same] = float("inf")
            v, k = d2.clamp_min(0).min(1)
            better = v < best
            best = torch.where(better, v, best)
            arg = torch.where(better, k + j, arg)
        out_d.append(best.sqrt())
        out_i.append(arg)
    if not out_d:
        return np.zeros(0), np.zeros(0, dtype=np.int64)
    return torch.cat(out_d).numpy(), torch.cat(out_i).numpy()


# The 8 flips and 90-degree rotations as (k, flip) for :func:`.images.dihedral`, in a fixed order.
DIHEDRAL_VIEWS = [(k, f) for f in (False, True) for k in range(4)]


def nearest_neighbour_rms_dihedral(queries: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`nearest_neighbour_rms` minimised over the 8 flips / rotations of each (H, W) query: the
    distances, and the index into :data:`DIHEDRAL_VIEWS` of the view that came closest."""
    import torch

    from .images import dihedral

    q = torch.from_numpy(np.asarray(queries))
    d = np.stack([nearest_neighbour_rms(dihedral(q, k, f).numpy(), reference) for k, f in DIHEDRAL_VIEWS])
    return d.min(0), d.argmin(0)
