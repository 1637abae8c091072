"""Segmentation: a residual U-Net that predicts a foreground probability map (the original work's
"grayscale mask") and, optionally, each object's interior, then instance labels from them.

* **Model** (:class:`ResUNet`): residual blocks with batch normalisation, strided-convolution
  downsampling, nearest upsampling and skip connections. Batch norm (not group norm) so that in
  inference every output pixel depends only on its neighbourhood: tiles give the whole-image result.
* **Outputs**: channel 0 is the foreground probability; channel 1 (if trained) the object
  *interior* (the foreground minus the one-pixel rim where objects touch, learned from label images).
* **Labels** (:func:`instances`): with an interior channel, connected interiors seed a watershed
  over the foreground, so touching objects stay apart; without one, connected components.
* **Inference at any size** (:class:`Segmenter`): percentile normalisation per plane, then
  :func:`.tiling.predict_tiled` tile by tile, plane by plane, into an array or a memory-mapped file.

A model folder::

    MODEL/
      model.json      kind "segmentation": outputs, normalisation, tile, training data, validation
      unet/           config.json + diffusion_pytorch_model.safetensors + stage.json
      MODEL_CARD.md
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn
from torch.nn import functional as F

from .. import __version__
from .data import Normalisation, check_finite, looks_rgb
from .device import resolve_device
from .errors import UserInputError
from .latent import CARD_FILE, read_card
from .sampling import ProgressCallback
from .store import load_unet, resolve_model
from .tiling import predict_tiled

KIND = "segmentation"
OUTPUTS = ("foreground", "interior")

# Widths per resolution level. ``tiny`` is for tests; ``small`` trains on a CPU; ``base`` on a GPU.
SEG_SIZES: dict[str, dict] = {
    "tiny": dict(channels=(8, 16), blocks=1),
    "small": dict(channels=(16, 32, 64, 128), blocks=1),
    "base": dict(channels=(32, 64, 128, 256), blocks=2),
}


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.skip = nn.Identity() if cin == cout else nn.Conv2d(cin, cout, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(h))
        return F.silu(h + self.skip(x))


class ResUNet(ModelMixin, ConfigMixin):
    """Residual U-Net: (B, in_channels, H, W) -> (B, out_channels, H, W) logits, any H and W.

    Inputs whose sides are not multiples of 2**(levels - 1) are padded by reflection and the output
    cropped back.
    """

    config_name = "config.json"

    @register_to_config
    def __init__(self, in_channels: int = 1, out_channels: int = 2, channels: tuple[int, ...] = (16, 32, 64, 128),
                 blocks: int = 1):
        super().__init__()
        ch = list(channels)
        self.stem = nn.Sequential(nn.Conv2d(in_channels, ch[0], 3, padding=1, bias=False), nn.BatchNorm2d(ch[0]),
                                  nn.SiLU())
        self.down = nn.ModuleList()
        self.pool = nn.ModuleList()
        for i, c in enumerate(ch):
            self.down.append(nn.Sequential(*[ResBlock(c, c) for _ in range(blocks)]))
            if i < len(ch) - 1:
                self.pool.append(nn.Sequential(nn.Conv2d(c, ch[i + 1], 3, stride=2, padding=1, bias=False),
                                               nn.BatchNorm2d(ch[i + 1]), nn.SiLU()))
        self.up = nn.ModuleList()
        self.merge = nn.ModuleList()
        for i in range(len(ch) - 2, -1, -1):
            self.up.append(nn.Conv2d(ch[i + 1], ch[i], 1, bias=False))
            self.merge.append(nn.Sequential(ResBlock(2 * ch[i], ch[i]),
                                            *[ResBlock(ch[i], ch[i]) for _ in range(blocks - 1)]))
        self.head = nn.Conv2d(ch[0], out_channels, 1)

    @property
    def multiple(self) -> int:
        return 2 ** (len(self.config.channels) - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        m = self.multiple
        ph, pw = (-h) % m, (-w) % m
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph), mode="reflect" if ph < h and pw < w else "replicate")
        x = self.stem(x)
        skips = []
        for i, block in enumerate(self.down):
            x = block(x)
            if i < len(self.pool):
                skips.append(x)
                x = self.pool[i](x)
        for up, merge in zip(self.up, self.merge):
            skip = skips.pop()
            x = up(F.interpolate(x, size=skip.shape[-2:], mode="nearest"))
            x = merge(torch.cat([x, skip], dim=1))
        return self.head(x)[..., :h, :w]


def build_segmenter(size: str = "small", out_channels: int = 2) -> ResUNet:
    if size not in SEG_SIZES:
        raise UserInputError(f"unknown model size '{size}': choose one of {', '.join(SEG_SIZES)}.")
    return ResUNet(in_channels=1, out_channels=out_channels, **SEG_SIZES[size])


# ----------------------------------------------------------------------------- labels
def targets_from_mask(mask: np.ndarray) -> np.ndarray:
    """(2, Y, X) float32 training targets from a mask: foreground, and interior.

    A label image (more than two values) gives the interior without the one-pixel rim where objects
    touch; a binary mask (any two values, or floats in [0, 1] thresholded at 0.5) has no instances to
    separate, so its interior is the foreground itself.
    """
    from .patches import encode_mask, mask_encoding

    enc = mask_encoding([mask])
    fg = encode_mask(mask, "binary") if enc == "binary" else (mask > 0).astype(np.float32)
    fg = (fg >= 0.5).astype(np.float32)
    interior = encode_mask(mask, "interior") if enc == "interior" else fg
    return np.stack([fg, interior])


def instances(foreground: np.ndarray, interior: np.ndarray | None = None, *, threshold: float = 0.5,
              min_size: int = 0) -> np.ndarray:
    """Instance labels (int32, 1..K) of one 2D probability map.

    With ``interior``: connected regions of ``interior >= threshold`` are the seeds of a watershed
    over the foreground probability, inside ``foreground >= threshold``; foreground regions with no
    seed become objects of their own. Without: connected components. Objects smaller than
    ``min_size`` pixels are removed and the labels renumbered 1..K.
    """
    from skimage.measure import label
    from skimage.segmentation import relabel_sequential, watershed

    mask = foreground >= threshold
    if interior is None:
        lab = label(mask, connectivity=1)
    else:
        seeds = label((interior >= threshold) & mask, connectivity=1)
        lab = watershed(-foreground, seeds, mask=mask) if seeds.max() else np.zeros(mask.shape, np.int64)
        orphans = label(mask & (lab == 0), connectivity=1)
        if orphans.max():
            lab = np.where(orphans > 0, orphans + lab.max(), lab)
    if min_size > 1 and lab.max() > 0:
        small = np.bincount(lab.ravel()) < min_size
        small[0] = False
        lab[small[lab]] = 0
    return relabel_sequential(lab.astype(np.int32))[0].astype(np.int32)


def otsu_watershed(image: np.ndarray, *, min_size: int = 16, min_distance: int = 5, sigma: float = 1.0) -> np.ndarray:
    """The classical baseline: Gaussian smoothing, Otsu threshold, distance-transform watershed."""
    from scipy import ndimage as ndi
    from skimage.feature import peak_local_max
    from skimage.filters import gaussian, threshold_otsu
    from skimage.segmentation import relabel_sequential, watershed

    img = gaussian(np.asarray(image, np.float32), sigma=sigma, preserve_range=True)
    if img.max() == img.min():
        return np.zeros(img.shape, np.int32)
    mask = img > threshold_otsu(img)
    dist = ndi.distance_transform_edt(mask)
    peaks = peak_local_max(dist, min_distance=min_distance, labels=ndi.label(mask)[0], exclude_border=False)
    markers = np.zeros(mask.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    lab = watershed(-dist, markers, mask=mask)
    if min_size > 1 and lab.max() > 0:
        small = np.bincount(lab.ravel()) < min_size
        small[0] = False
        lab[small[lab]] = 0
    return relabel_sequential(lab.astype(np.int32))[0].astype(np.int32)


# ----------------------------------------------------------------------------- inference
def as_planes(image, name: str = "the image") -> tuple[np.ndarray, bool, list[str]]:
    """A user's image as (N, Y, X) planes: 2D, a stack or time series; RGB(A) to grayscale.

    Returns (planes, was_2d, notices). 4D/5D arrays and tiny images are refused with the reason; NaNs
    are refused plane by plane as planes are read (:meth:`Segmenter.normalise`), so a big memory-mapped
    stack is never read twice.
    """
    from .patches import to_gray

    notices: list[str] = []
    arr = image if isinstance(image, np.ndarray) else np.asarray(image)
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise UserInputError(f"{name} has data type {arr.dtype}: give numbers (integers or floats).")
    if looks_rgb(arr) and arr.ndim in (3, 4):
        arr = to_gray(arr, name, notices)
    if arr.ndim not in (2, 3):
        raise UserInputError(
            f"{name} has {arr.ndim} dimensions {arr.shape}: give a 2D image or a (N, Y, X) stack or time series. "
            "For 4D/5D data choose one channel and one time point (or z) first, e.g. in napari with the sliders "
            "and Image > Split, or with numpy/tifffile.")
    if min(arr.shape[-2:]) < 8:
        raise UserInputError(f"{name} is {arr.shape[-2]}x{arr.shape[-1]} pixels: too small to segment (8x8 at least).")
    two_d = arr.ndim == 2
    return (arr[None] if two_d else arr), two_d, notices


@dataclass
class SegResult:
    """Instance labels (int32) and foreground probability (float32, or None when not kept), 2D or
    (N, Y, X) like the input."""

    labels: np.ndarray
    probability: np.ndarray | None
    provenance: dict
    notices: list[str] = field(default_factory=list)

    @property
    def n_objects(self) -> int:
        return int(self.labels.max()) if self.labels.size else 0


class Segmenter:
    """A trained segmentation model, ready to run on images of any size."""

    def __init__(self, path: Path, card: dict, net: ResUNet, device: torch.device):
        self.path, self.card, self.net, self.device = path, card, net, device
        self.name = card.get("name", path.name)
        self.norm = Normalisation.from_dict(card.get("normalisation"))
        self.outputs = list(card.get("outputs", OUTPUTS[: net.config.out_channels]))

    @classmethod
    def load(cls, model: str | Path, device: str = "auto") -> Segmenter:
        path = resolve_model(model)
        if not (path / CARD_FILE).is_file() and not (path / "cascade.json").is_file():
            raise UserInputError(f"'{path}' is not a segmentation model folder (no {CARD_FILE}): give a folder made "
                                 "by `zfdiffusion train unet`, or the bundled 'nuclei-unet-demo'.")
        card = read_card(path, (KIND,))
        dev = resolve_device(device)
        net = load_unet(path / "unet", ResUNet).to(dev).eval().requires_grad_(False)
        return cls(path, card, net, dev)

    @property
    def has_interior(self) -> bool:
        return "interior" in self.outputs

    def normalise(self, plane: np.ndarray, name: str = "the image") -> tuple[np.ndarray, bool]:
        """A plane in [-1, 1] exactly as training normalised it (``norm.apply(x) * 2 - 1``, in place),
        and whether nothing in it rises above the background (a constant plane). NaN or infinite
        values are refused."""
        check_finite(plane, name)
        out = self.norm.apply(plane)
        constant = not out.any()
        out *= 2.0
        out -= 1.0
        return out, constant

    def check_tiling(self, tile: int, overlap: int) -> None:
        if overlap < 0:
            raise UserInputError(f"the overlap must be 0 or more, got {overlap}.")
        if overlap >= tile:
            raise UserInputError(f"the overlap ({overlap}) must be smaller than the tile ({tile}).")
        if tile % self.net.multiple or tile < 32:
            raise UserInputError(f"the tile must be a multiple of {self.net.multiple} and at least 32, got {tile}.")

    def _fn(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cuda", dtype=torch.float16, enabled=self.device.type == "cuda"):
            return torch.sigmoid(self.net(x.to(self.device)).float())

    def predict(self, image, *, tile: int = 256, overlap: int = 32, batch: int = 4, out: np.ndarray | None = None,
                callback: ProgressCallback | None = None, notices: list[str] | None = None,
                name: str = "the image", first_plane: int = 0, stack: bool | None = None) -> np.ndarray:
        """Probabilities (N, C, Y, X) float32 for (N, Y, X) planes (see :func:`as_planes`), tiled.

        ``out``: an array of that shape to write into (e.g. a memory map). Constant planes give zeros.
        Progress counts tiles over the whole stack. ``first_plane``/``stack``: how to name planes in
        messages when ``image`` is part of a larger stack.
        """
        from .sampling import Progress

        planes, _, more = as_planes(image, name)
        if notices is not None:
            notices.extend(more)
        n, h, w = planes.shape
        c = self.net.config.out_channels
        self.check_tiling(tile, overlap)
        many = n > 1 if stack is None else stack
        result = np.zeros((n, c, h, w), np.float32) if out is None else out
        per = self.tiles_per_plane(h, w, tile, overlap)
        group = self.planes_per_pass(h, w, tile, overlap, batch)
        for g in range(0, n, group):
            ks = range(g, min(n, g + group))
            normed = [self.normalise(planes[k], f"{name}, plane {first_plane + k}" if many else name) for k in ks]
            cb = None
            if callback is not None:
                def cb(p, g=g):
                    callback(Progress("tiles", g * per + p.step, n * per))
            predict_tiled(self._fn, np.stack([x for x, _ in normed]), tile=tile, overlap=overlap, out_channels=c,
                          batch=batch, callback=cb, out=result[g:g + len(ks)], align=self.net.multiple)
            for k, (_, constant) in zip(ks, normed):
                if constant:
                    result[k] = 0.0
                    if notices is not None:
                        notices.append(f"plane {first_plane + k} is constant: no objects" if many
                                       else f"{name} is constant: no objects")
        return result

    def tiles_per_plane(self, h: int, w: int, tile: int, overlap: int) -> int:
        from .tiling import tile_starts

        m = self.net.multiple
        return len(tile_starts(h, tile, overlap, m)) * len(tile_starts(w, tile, overlap, m))

    def planes_per_pass(self, h: int, w: int, tile: int, overlap: int, batch: int) -> int:
        """Planes handled together: several when one plane has fewer tiles than a batch (a stack of
        small planes, e.g. generated patches, then runs ``batch`` planes per forward pass)."""
        return max(1, batch // self.tiles_per_plane(h, w, tile, overlap))

    def segment(self, image, *, tile: int = 256, overlap: int = 32, threshold: float = 0.5, min_size: int = 16,
                batch: int = 4, use_interior: bool = True, probability: bool = True,
                prob_out: np.ndarray | None = None, labels_out: np.ndarray | None = None,
                callback: ProgressCallback | None = None, source: str = "", name: str = "the image") -> SegResult:
        """Segment a 2D image or a (N, Y, X) stack/time series: labels per plane, numbered across the stack.

        ``prob_out`` / ``labels_out``: arrays of the input's shape (e.g. memory maps) to write into.
        ``probability`` False (and no ``prob_out``): the probability map is not kept (memory: one
        plane's worth instead of the stack's). ``name`` names the image in error messages.
        """
        from .sampling import Progress

        if not 0.0 < threshold < 1.0:
            raise UserInputError(f"the threshold must be between 0 and 1, got {threshold}.")
        if min_size < 0:
            raise UserInputError(f"the minimum object size must be 0 or more, got {min_size}.")
        self.check_tiling(tile, overlap)
        planes, two_d, notices = as_planes(image, name)
        n, h, w = planes.shape
        keep = probability or prob_out is not None
        prob = None
        if keep:
            prob = np.zeros((n, h, w), np.float32) if prob_out is None else prob_out.reshape(n, h, w)
        labels = np.zeros((n, h, w), np.int32) if labels_out is None else labels_out.reshape(n, h, w)
        interior = use_interior and self.has_interior
        next_id = 0
        group = self.planes_per_pass(h, w, tile, overlap, batch)
        for g in range(0, n, group):
            ks = range(g, min(n, g + group))

            def cb(p, g=g, size=len(ks)):
                if callback is not None:
                    callback(Progress("tiles", g * p.total // size + p.step, n * p.total // size))
            p = self.predict(planes[g:g + len(ks)], tile=tile, overlap=overlap, batch=batch, callback=cb,
                             notices=notices, name=name, first_plane=g, stack=n > 1)
            for j, k in enumerate(ks):
                if keep:
                    prob[k] = p[j, 0]
                lab = instances(p[j, 0], p[j, 1] if interior else None, threshold=threshold, min_size=min_size)
                labels[k] = np.where(lab > 0, lab + next_id, 0) if next_id else lab
                next_id += int(lab.max())
        prov = {
            "kind": "zfdiffusion-segmentation", "model": self.name, "model_path": str(self.path),
            "tile": tile, "overlap": overlap, "threshold": threshold, "min_size": min_size,
            "labels_from": "watershed from interiors" if interior else "connected components",
            "normalisation": self.norm.to_dict(), "input": source, "input_shape": list(np.shape(image)),
            "objects": next_id, "device": str(self.device), "plugin_version": __version__,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        if two_d:
            return SegResult(labels[0], None if prob is None else prob[0], prov, notices)
        return SegResult(labels, prob, prov, notices)


def describe(seg: Segmenter) -> str:
    """One line about a segmentation model for the widget."""
    card = seg.card if isinstance(seg, Segmenter) else seg
    v = card.get("validation") or {}
    data = card.get("training_data") or {}
    figs = f"; held-out Dice {v['dice']:.3f}, IoU {v['iou']:.3f}" if "dice" in v else ""
    split = data.get("validation")
    return (f"U-Net ({', '.join(card.get('outputs', OUTPUTS))}), trained {card.get('steps', '?')} steps on "
            f"{data.get('images', '?')} image(s){f' ({split})' if split else ''}{figs}")
