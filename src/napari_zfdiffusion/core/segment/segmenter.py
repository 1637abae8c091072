"""Segmentation: a residual U-Net that predicts a foreground probability map (the original work's
"grayscale mask") and, optionally, each object's interior, then instance labels from them.

* **Model** (:class:`.net.ResUNet`): a residual U-Net with batch norm, so tiles give the
  whole-image result.
* **Outputs**: channel 0 is the foreground probability; channel 1 (if trained) the object
  *interior* (the foreground minus the one-pixel rim where objects touch, learned from label images).
* **Labels** (:func:`..masks.instances`): with an interior channel, connected interiors seed a watershed
  over the foreground, so touching objects stay apart; without one, connected components. The seeds
  have their own threshold: the ``seed_threshold`` argument, else the card's ``seed_threshold``
  (tuned on the training sources, see :mod:`...evaluation.generalist`), else the foreground threshold;
  cores linked above the ``join_threshold`` (argument, else the card's; None: off) are one seed.
* **Inference at any size** (:class:`Segmenter`): percentile normalisation per plane, then
  :func:`..tiling.predict_tiled` tile by tile, plane by plane, into an array or a memory-mapped file.
* **Big single planes** (more than :attr:`Segmenter.strip_threshold` pixels, e.g. 9000x9000 or
  16384x16384): in horizontal strips, so that memory is a few strips plus the outputs, which may be
  memory maps. See :meth:`Segmenter.segment`.

A model folder::

    MODEL/
      model.json      kind "segmentation": outputs, normalisation, tile, training data, validation
      unet/           config.json + diffusion_pytorch_model.safetensors + stage.json
      MODEL_CARD.md
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..device import maybe_compile, resolve_device
from ..errors import UserInputError
from ..images import Normalisation, check_finite, exact_percentiles, looks_rgb, to_gray, unit_to_model
from ..masks import (StripInstances, check_join_threshold, check_min_volume_fraction, check_seed_threshold,
                     instances)
from ..progress import Progress, ProgressCallback, rescaled
from ..provenance import stamp
from ..reader import release
from ..store import load_model, read_card, resolve_model
from ..tiling import predict_tiled, predict_tiled_rows, tile_starts
from .net import ResUNet

KIND = "segmentation"
OUTPUTS = ("foreground", "interior")
# In a volume, 3D objects under this share of the typical object's voxels are dropped (out-of-focus glow and
# fragments that linking leaves). On the training volumes (cells3d columns 0-191, CHO time points 0-14, every
# other one) 3D object F1 went 0.51 / 0.60 at 0 to 0.85 / 0.93 at 0.1; 0.3 scored higher (0.93 / 0.98) but
# would drop a nucleus under about two thirds of the typical diameter (cut by the volume's edge, or a small
# cell): 0.1 keeps nuclei down to about half of it. docs/evaluation.md, "3D instances".
MIN_VOLUME_FRACTION = 0.1


# ----------------------------------------------------------------------------- inference
def as_planes(image, name: str = "the image") -> tuple[np.ndarray, bool, list[str]]:
    """A user's image as (N, Y, X) planes: 2D, a stack or time series; RGB(A) to grayscale.

    Returns (planes, was_2d, notices). 4D/5D arrays and tiny images are refused with the reason; NaNs
    are refused plane by plane as planes are read (:meth:`Segmenter.normalise`), so a big memory-mapped
    stack is never read twice.
    """
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


def plane_limits(plane, norm: Normalisation, *, rows: int = 1024, name: str = "the image") -> tuple[float, float, bool]:
    """``(lo, hi, constant)`` of :meth:`..images.Normalisation.apply` for a 2D plane, read a band
    of rows at a time: the percentiles exactly as ``np.percentile`` gives them on the whole plane as
    float32 (:func:`..images.exact_percentiles`), and whether nothing in the plane rises above ``lo``."""
    (lo, hi), top = exact_percentiles(plane, (norm.low, norm.high), rows=rows, name=name)
    if not hi > lo:
        hi = lo + 1.0
    # the map is monotonic: the normalised plane is all -1 (zero in [0, 1]) iff its largest value is
    constant = not norm.scale(np.array([top], np.float32), lo, hi).any()
    return lo, hi, constant


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
    """A trained segmentation model, ready to run on images of any size.

    ``strip_threshold``: planes of more pixels than this are segmented in strips (see :meth:`segment`);
    ``strip_pixels``: about how many pixels a strip has (its rows: this over the plane's width, at
    least one). Attributes, so that a test or a benchmark can change them on one Segmenter.
    """

    #: planes of up to 4096x4096 pixels are segmented whole: their results stay exactly what they were
    #: (and their working memory, about 30 bytes per pixel, is under 1 GB); larger ones in strips
    strip_threshold: int = 4096 * 4096
    #: a strip of 2 megapixels (233 rows of a 9000-pixel-wide plane) keeps the labelling's working
    #: memory (about 40 bytes per pixel of the rows held, see masks.StripInstances) in the low hundreds
    #: of MB; smaller strips cost no prediction (the tiles are the same) and little else
    strip_pixels: int = 2 * 1024 * 1024

    def __init__(self, path: Path, card: dict, net: ResUNet, device: torch.device):
        self.path, self.card, self.net, self.device = path, card, net, device
        self.name = card.get("name", path.name)
        self.norm = Normalisation.from_dict(card.get("normalisation"))
        self.outputs = list(card.get("outputs", OUTPUTS[: net.config.out_channels]))

    @classmethod
    def load(cls, model: str | Path, device: str = "auto") -> Segmenter:
        path = resolve_model(model)
        card = read_card(path, (KIND,))
        dev = resolve_device(device)
        net = maybe_compile(load_model(path / "unet", ResUNet).to(dev).eval().requires_grad_(False), dev)
        return cls(path, card, net, dev)

    @property
    def has_interior(self) -> bool:
        """The second output seeds the watershed: object interiors, or centres (both: >= the seed threshold)."""
        return len(self.outputs) > 1 and self.outputs[1] in ("interior", "center")

    @property
    def seed_threshold(self) -> float | None:
        """The seed threshold the card gives (``seed_threshold``; None: none, the foreground threshold
        is used). A card value outside (0, 1] is refused with the model's name."""
        where = f"the seed_threshold in the model card of '{self.name}' ({self.path / 'model.json'})"
        return check_seed_threshold(self.card.get("seed_threshold"), where)

    def seed_threshold_for(self, threshold: float, seed_threshold: float | None = None) -> float:
        """The seed threshold :meth:`segment` uses: ``seed_threshold`` if given (checked), else the
        card's, else ``threshold``."""
        st = check_seed_threshold(seed_threshold)
        if st is None:
            st = self.seed_threshold
        return float(threshold) if st is None else st

    @property
    def join_threshold(self) -> float | None:
        """The join threshold the card gives (``join_threshold``; None: cores are not joined). A card
        value outside (0, 1] is refused with the model's name."""
        where = f"the join_threshold in the model card of '{self.name}' ({self.path / 'model.json'})"
        return check_join_threshold(self.card.get("join_threshold"), 1.0, where)

    def join_threshold_for(self, seed_threshold: float, join_threshold: float | None = None) -> float | None:
        """The join threshold :meth:`segment` uses: ``join_threshold`` if given (checked: in (0, seed
        threshold]; the seed threshold itself turns joining off), else the card's, held at the seed
        threshold where a lower seed threshold was asked for; None: no joining."""
        jt = check_join_threshold(join_threshold, seed_threshold)
        if jt is None and self.join_threshold is not None:
            jt = min(self.join_threshold, seed_threshold)
        return None if jt is None or jt >= seed_threshold else jt

    @property
    def diameter(self) -> float | None:
        """The median object diameter (pixels) of the training masks, from the card (None: unknown)."""
        d = self.card.get("object_diameter_px")
        return float(d) if d else None

    def scale_for(self, diameter, planes: np.ndarray, *, tile: int, overlap: int, threshold: float,
                  min_size: int, batch: int, notices: list[str]) -> tuple[float, float | None]:
        """The factor to rescale planes by so that objects of ``diameter`` pixels appear at the size the
        model was trained on, and the diameter used (measured for "auto"). None: no rescaling.
        "auto": a first pass at the image's own scale on up to 3 planes; the area-weighted median
        diameter of the objects found (:func:`..masks.typical_diameter`) is taken for the diameter
        (cellpose's idea, without a separate size model)."""
        if diameter is None:
            return 1.0, None
        n, h, w = planes.shape
        if self.diameter is None:
            raise UserInputError(f"the model '{self.name}' does not say the size of the objects it was trained on "
                                 "(object_diameter_px in its model.json): segment without a diameter, or retrain it.")
        if isinstance(diameter, str) and diameter != "auto":
            try:
                diameter = float(diameter)
            except ValueError:
                raise UserInputError(f"the diameter must be a number of pixels or 'auto', got '{diameter}'.") from None
        if diameter == "auto":
            from ..masks import foreground_diameters, typical_diameter

            # from the foreground alone: at a scale the model was not trained on, objects may come out
            # split or merged, but the foreground they cover is the most reliable output
            pick = sorted(set(np.linspace(0, n - 1, min(3, n)).round().astype(int).tolist()))
            p = self.predict(planes[pick], tile=tile, overlap=overlap, batch=batch, stack=n > 1)
            d = np.concatenate([foreground_diameters(p[j, 0] >= threshold, min_size) for j in range(len(pick))])
            if d.size == 0:
                notices.append("diameter 'auto': no objects found at the image's own scale; not rescaled")
                return 1.0, None
            est = typical_diameter(d)  # area-weighted: specks and fragments do not pull it down
            f = float(np.clip(self.diameter / est, 0.25, 4.0))
            notices.append(f"diameter 'auto': objects of about {est:.0f} px found; the model was trained on "
                           f"{self.diameter:.0f} px objects, so the image is rescaled by {f:.2f}")
            return (1.0 if abs(np.log(f)) < np.log(1.1) else f), est
        if not np.isfinite(diameter) or diameter <= 0:
            raise UserInputError(f"the object diameter must be a positive number of pixels, got {diameter:g}.")
        if diameter > max(h, w):
            raise UserInputError(f"the object diameter ({diameter:g} px) is larger than the image ({h}x{w} px): "
                                 "give the diameter in pixels of this image.")
        f = self.diameter / float(diameter)
        if not 1 / 8 <= f <= 8:
            raise UserInputError(f"objects of {diameter:g} px would need the image rescaled by {f:.2f}, more than 8x "
                                 f"(the model was trained on {self.diameter:.0f} px objects): rescale the image first.")
        return (1.0 if abs(f - 1) < 0.02 else f), float(diameter)

    def normalise(self, plane: np.ndarray, name: str = "the image") -> tuple[np.ndarray, bool]:
        """A plane in [-1, 1] exactly as training normalised it (:func:`..images.model_space`), and
        whether nothing in it rises above the background (a constant plane). NaN or infinite values
        are refused."""
        check_finite(plane, name)
        unit = self.norm.apply(plane)
        constant = not unit.any()
        return unit_to_model(unit), constant

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
        planes, _, more = as_planes(image, name)
        if notices is not None:
            notices.extend(more)
        n, h, w = planes.shape
        c = self.net.config.out_channels
        self.check_tiling(tile, overlap)
        many = n > 1 if stack is None else stack
        result = np.zeros((n, c, h, w), np.float32) if out is None else out
        group = self.planes_per_pass(h, w, tile, overlap, batch)
        for g in range(0, n, group):
            ks = range(g, min(n, g + group))
            normed = [self.normalise(planes[k], f"{name}, plane {first_plane + k}" if many else name) for k in ks]
            cb = rescaled(callback, g, len(ks), n)  # one count of tiles over the whole stack
            predict_tiled(self._fn, np.stack([x for x, _ in normed]), tile=tile, overlap=overlap, out_channels=c,
                          batch=batch, callback=cb, out=result[g:g + len(ks)], align=self.net.multiple)
            for k, (_, constant) in zip(ks, normed):
                if constant:
                    result[k] = 0.0
                    if notices is not None:
                        notices.append(f"plane {first_plane + k} is constant: no objects" if many
                                       else f"{name} is constant: no objects")
        return result

    @staticmethod
    def _link_planes(labels: np.ndarray, depth: int, iou: float, min_volume_fraction: float = 0.0) -> int:
        """Link the labels of each run of ``depth`` planes into 3D objects, drop those under
        ``min_volume_fraction`` of the run's typical object, and number them across the runs; the
        number of objects."""
        from ..masks import drop_small_volumes, stitch_planes

        total = 0
        for v in range(0, labels.shape[0], depth):
            part = labels[v:v + depth]
            stitch_planes(part, iou)
            top = drop_small_volumes(part, min_volume_fraction)
            if total:
                for z in range(part.shape[0]):
                    part[z] = np.where(part[z] > 0, part[z] + total, 0)
            total += top
        return total

    def _predict_rescaled(self, planes, ks, scale: float, *, tile: int, overlap: int, batch: int,
                          callback, notices, name: str, stack: bool) -> np.ndarray:
        """Probabilities (len(ks), C, Y, X) of planes ``ks`` rescaled by ``scale`` for the model and
        brought back to their own grid (bilinear)."""
        import torch.nn.functional as F

        h, w = planes.shape[1:]
        size = (max(8, round(h * scale)), max(8, round(w * scale)))
        out = []
        for j, k in enumerate(ks):
            x = torch.from_numpy(np.asarray(planes[k], np.float32))[None, None]
            small = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=scale < 1)[0, 0]
            p = self.predict(small.numpy()[None], tile=tile, overlap=overlap, batch=batch,
                             callback=rescaled(callback, j, 1, len(ks)), notices=notices, name=name, first_plane=k,
                             stack=stack)
            back = F.interpolate(torch.from_numpy(p), size=(h, w), mode="bilinear", align_corners=False,
                                 antialias=scale > 1)
            out.append(back[0].clamp_(0, 1).numpy())
        return np.stack(out)

    def _segment_strips(self, plane, labels: np.ndarray, prob: np.ndarray | None, *, tile: int, overlap: int,
                        threshold: float, min_size: int, batch: int, interior: bool, offset: int,
                        callback: ProgressCallback | None, notices: list[str], name: str,
                        constant_note: str, seed_threshold: float | None = None,
                        join_threshold: float | None = None) -> int:
        """One big plane in strips into ``labels`` (and ``prob``), labels numbered from ``offset`` + 1;
        returns the number of objects. See :meth:`segment`. Leaves what the strips held in
        ``self.strip_stats`` (rows per strip, the most rows predicted and labelled at once, forced
        cuts; for tests and benchmarks)."""
        h, w = plane.shape
        rows = max(1, self.strip_pixels // w)
        lo, hi, constant = plane_limits(plane, self.norm, rows=rows, name=name)
        release(plane)  # the pages of a memory-mapped input: read once, no need to count them
        if constant:  # as predict() does: no objects, zero probability, and a notice
            for a in range(0, h, rows):
                b = min(h, a + rows)
                labels[a:b] = 0
                if prob is not None:
                    prob[a:b] = 0.0
            n_tiles = self.tiles_per_plane(h, w, tile, overlap)
            if callback is not None:
                callback(Progress("tiles", n_tiles, n_tiles))
            notices.append(constant_note)
            return 0
        c = self.net.config.out_channels
        strips = StripInstances(h, w, interior=interior, threshold=threshold, min_size=min_size,
                                max_rows=4 * rows + tile, halo=rows, seed_threshold=seed_threshold,
                                join_threshold=join_threshold)
        largest = 0
        for r0, r1, block in predict_tiled_rows(
                self._fn, lambda a, b: unit_to_model(self.norm.scale(plane[a:b], lo, hi)), (h, w), tile=tile,
                overlap=overlap, out_channels=c, batch=batch, band_rows=rows, callback=callback,
                align=self.net.multiple):
            largest = max(largest, r1 - r0)
            if prob is not None:
                prob[r0:r1] = block[0]
            for a, b, lab in strips.add(block[0], block[1] if interior else None):
                labels[a:b] = lab
            for done in (plane, labels, prob):  # written or read: the file keeps them, not our memory
                release(done)
        lut = strips.lookup(offset)
        for a in range(0, h, rows):  # provisional ids -> the final labels
            labels[a:a + rows] = lut[labels[a:a + rows]]
            release(labels)
        self.strip_stats = {"strip_rows": rows, "largest_band": largest, "largest_window": strips.largest_window,
                            "forced_cuts": strips.forced_cuts, "provisional_ids": strips.count}
        return strips.objects

    def tiles_per_plane(self, h: int, w: int, tile: int, overlap: int) -> int:
        m = self.net.multiple
        return len(tile_starts(h, tile, overlap, m)) * len(tile_starts(w, tile, overlap, m))

    def planes_per_pass(self, h: int, w: int, tile: int, overlap: int, batch: int) -> int:
        """Planes handled together: several when one plane has fewer tiles than a batch (a stack of
        small planes, e.g. generated patches, then runs ``batch`` planes per forward pass)."""
        return max(1, batch // self.tiles_per_plane(h, w, tile, overlap))

    def segment(self, image, *, tile: int = 256, overlap: int = 32, threshold: float = 0.5, min_size: int = 16,
                batch: int = 4, use_interior: bool = True, probability: bool = True,
                prob_out: np.ndarray | None = None, labels_out: np.ndarray | None = None,
                callback: ProgressCallback | None = None, source: str = "", name: str = "the image",
                diameter: float | str | None = None, stack: str = "planes", depth: int | None = None,
                stitch_iou: float = 0.25, seed_threshold: float | None = None,
                join_threshold: float | None = None, min_volume_fraction: float = MIN_VOLUME_FRACTION) -> SegResult:
        """Segment a 2D image or a (N, Y, X) stack/time series: labels per plane, numbered across the stack.

        ``seed_threshold``: where the watershed's seeds begin in the centre (or interior) output, in
        (0, 1]; None: the card's ``seed_threshold`` if it has one, else ``threshold`` (as before the
        two were separate). Lower joins the pieces of a large textured object, higher splits touching
        objects. Used with the interior/centre output only.

        ``join_threshold``: cores of the centre output that connect at or above it are one seed
        (in (0, seed threshold]; the seed threshold itself: no joining). None: the card's
        ``join_threshold`` (held at the seed threshold), else no joining. It keeps a large textured
        nucleus whole where touching nuclei, whose centre output falls towards 0 between them, stay apart.

        ``prob_out`` / ``labels_out``: arrays of the input's shape (e.g. memory maps) to write into.
        ``probability`` False (and no ``prob_out``): the probability map is not kept (memory: one
        plane's worth instead of the stack's). ``name`` names the image in error messages.

        **Big planes** (more than ``strip_threshold`` pixels) go in horizontal strips of about
        ``strip_pixels`` pixels, so that the working memory is a few strips whatever the plane's
        size (the input may be a memory map, read a band of rows at a time; the outputs too, written
        a band at a time). Same results as the whole plane, by construction:

        1. the normalisation limits come from one pass over the plane: its percentiles exactly as
           ``np.percentile`` has them (histograms of the values, :func:`plane_limits`), and each
           strip is normalised with them by the same float32 operations;
        2. :func:`..tiling.predict_tiled_rows` runs the whole plane's tiles, in its batches, and
           gives its rows band by band: the probabilities equal the whole plane's bit for bit (the
           strip's "halo" is the tiles that reach into the next strip: their partial sums carry over);
        3. :class:`..masks.StripInstances` labels each connected foreground region once all of it is
           there (rows with an unfinished region wait for the next strip), so the watershed of each
           region is the whole plane's; small objects are dropped by their whole size, and the labels
           numbered as the whole plane numbers them: after the strips, one pass over the plane's
           labels (e.g. the memory map) turns provisional ids into the final ones.

        Regions taller than a few strips (e.g. a connected tissue) are cut and merged across the
        cut instead (an approximation of the watershed near the cut only; see
        :class:`..masks.StripInstances`). Progress counts tiles over the job as for any plane.

        **Object size** (``diameter``, pixels, or "auto"): the image is rescaled so that its objects
        appear at the size the model learned (the card's ``object_diameter_px``), segmented, and the
        probabilities brought back to the image's grid, where the labels are made (see :meth:`scale_for`).

        **Stacks** (``stack``): "planes" segments each plane on its own (time points, or unrelated
        planes); "volume" links the labels of neighbouring planes into 3D objects (by overlap, see
        :func:`..masks.stitch_planes`; ``depth``: planes per volume when the stack is several
        volumes one after the other, e.g. the time points of a (T, Z, Y, X) movie). In a volume, 3D
        objects with fewer voxels than ``min_volume_fraction`` of the volume's typical object (the one
        its median foreground voxel belongs to) are dropped: out-of-focus glow and fragments that
        linking leaves (see :func:`..masks.drop_small_volumes`; 0: keep every object).
        """
        if stack not in ("planes", "volume"):
            raise UserInputError(f"stack must be 'planes' or 'volume', got '{stack}'.")
        if not 0.0 < stitch_iou < 1.0:
            raise UserInputError(f"the stitching overlap (IoU) must be between 0 and 1, got {stitch_iou}.")
        if not 0.0 < threshold < 1.0:
            raise UserInputError(f"the threshold must be between 0 and 1, got {threshold}.")
        if min_size < 0:
            raise UserInputError(f"the minimum object size must be 0 or more, got {min_size}.")
        min_volume_fraction = check_min_volume_fraction(min_volume_fraction)
        seed_threshold = self.seed_threshold_for(threshold, seed_threshold)
        join_threshold = self.join_threshold_for(seed_threshold, join_threshold)
        self.check_tiling(tile, overlap)
        planes, two_d, notices = as_planes(image, name)
        n, h, w = planes.shape
        if stack == "volume" and n < 2:
            raise UserInputError(f"{name} is a single plane: it cannot be segmented as a volume. Segment it as a "
                                 "plane, or give a stack.")
        depth = depth or n
        if stack == "volume" and (depth < 2 or n % depth):
            raise UserInputError(f"a stack of {n} planes cannot be cut into volumes of {depth} planes.")
        scale, used_diameter = self.scale_for(diameter, planes, tile=tile, overlap=overlap, threshold=threshold,
                                              min_size=min_size, batch=batch, notices=notices)
        if scale != 1.0 and h * w > self.strip_threshold:
            raise UserInputError(f"rescaling for the object size works on planes up to "
                                 f"{self.strip_threshold} pixels; {name} has {h}x{w}: rescale it first, or "
                                 "segment without a diameter.")
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
            cb = rescaled(callback, g, len(ks), n)
            if len(ks) == 1 and h * w > self.strip_threshold:
                next_id += self._segment_strips(
                    planes[g], labels[g], prob[g] if keep else None, tile=tile, overlap=overlap, threshold=threshold,
                    min_size=min_size, batch=batch, interior=interior, offset=next_id, callback=cb, notices=notices,
                    name=f"{name}, plane {g}" if n > 1 else name, constant_note=f"plane {g} is constant: no objects"
                    if n > 1 else f"{name} is constant: no objects", seed_threshold=seed_threshold,
                    join_threshold=join_threshold)
                continue
            if scale != 1.0:
                p = self._predict_rescaled(planes, ks, scale, tile=tile, overlap=overlap, batch=batch,
                                           callback=cb, notices=notices, name=name, stack=n > 1)
            else:
                p = self.predict(planes[g:g + len(ks)], tile=tile, overlap=overlap, batch=batch, callback=cb,
                                 notices=notices, name=name, first_plane=g, stack=n > 1)
            for j, k in enumerate(ks):
                if keep:
                    prob[k] = p[j, 0]
                lab = instances(p[j, 0], p[j, 1] if interior else None, threshold=threshold, min_size=min_size,
                                seed_threshold=seed_threshold, join_threshold=join_threshold)
                labels[k] = np.where(lab > 0, lab + next_id, 0) if next_id else lab
                next_id += int(lab.max())
        if stack == "volume":
            next_id = self._link_planes(labels, depth, stitch_iou, min_volume_fraction)
        prov = stamp("zfdiffusion-segmentation", model=self, device=self.device, tile=tile, overlap=overlap,
                     threshold=threshold, **({"seed_threshold": seed_threshold} if interior else {}),
                     **({"join_threshold": join_threshold} if interior and join_threshold is not None else {}),
                     min_size=min_size, stack=stack,
                     **({"volume_depth": depth, "stitch_iou": stitch_iou, "min_volume_fraction": min_volume_fraction}
                        if stack == "volume" else {}),
                     **({"diameter_px": used_diameter, "model_diameter_px": self.diameter, "rescaled_by": scale}
                        if diameter is not None else {}),
                     labels_from=f"watershed from {self.outputs[1]}s" if interior else "connected components",
                     normalisation=self.norm.to_dict(), input=source, input_shape=list(np.shape(image)),
                     objects=next_id)
        if two_d:
            return SegResult(labels[0], None if prob is None else prob[0], prov, notices)
        return SegResult(labels, prob, prov, notices)


def describe(seg: Segmenter) -> str:
    """One line about a segmentation model for the widget."""
    card = seg.card if isinstance(seg, Segmenter) else seg
    v = card.get("validation") or {}
    data = card.get("training_data") or {}
    figs = f"; held-out Dice {v['dice']:.3f}, IoU {v['iou']:.3f}" if "dice" in v else ""
    if card.get("object_diameter_px"):
        figs += f"; objects of about {float(card['object_diameter_px']):.0f} px"
    split = data.get("validation")
    return (f"U-Net ({', '.join(card.get('outputs', OUTPUTS))}), trained {card.get('steps', '?')} steps on "
            f"{data.get('images', '?')} image(s){f' ({split})' if split else ''}{figs}")


__all__ = ["KIND", "OUTPUTS", "SegResult", "Segmenter", "as_planes", "describe"]
