"""What a model is, from its JSON cards alone, and whether an input looks like its training data.

- :func:`describe`: lines about one model (what it does and makes, depth classes and their meaning,
  pixel size, training data, size on disk), as ``zfdiffusion models`` prints them; :func:`about_lines`
  adds the card's measured quality and its training intensities, for the docks' "About the model".
- :func:`domain_warnings`: plain-words warnings when an image looks unlike the model's training data
  (pixel size, intensity statistics, a flat image), from the card and a cheap look at the image.

Light on purpose: nothing here imports torch or diffusers (no network is built), so the listing of
``zfdiffusion models`` takes a fraction of a second; no Qt or napari either (a GUI-free core). Importing
this module imports only the standard library (numpy and :mod:`.store` load when a function needs them),
so that the command line's parser, which imports it, starts fast.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import UserInputError

if TYPE_CHECKING:
    import numpy as np

    from .store import ModelEntry

STAGES = ("base", "sr128", "sr256", "sr512")  # the cascade's stages, in order (as core.cascade.model has them)
WHERE = {"bundled": "bundled with the package", "user": "cached in ZFDIFFUSION_HOME/models", "path": "a folder",
         "cached": "downloaded from the model registry (sha256-checked), cached in ZFDIFFUSION_HOME/models"}
MODEL_CARD = "MODEL_CARD.md"  # the card for people, in every model folder

# domain_warnings' thresholds (see its docstring)
PIXEL_RATIO = 1.5  # pixel sizes (or fields of view) further apart than this warn
INTENSITY_RATIO = 10.0  # an intensity figure further than this from every training image's warns
MAX_SAMPLE = 1_000_000  # the most pixels read from an image to measure its statistics
FEW_LEVELS = 4  # an integer image with fewer grey levels than this between its percentiles is nearly flat
FLAT_RELATIVE = 1e-3  # a float image whose percentile range is less than this share of its level is nearly flat
PERCENTILES = (1.0, 99.8)  # when the card does not say which percentiles its normalisation uses
KINDS = {"cascade": "slices", "latent": "patches", "vae": "patches", "segmentation": "segmentation",
         "slices": "slices", "volume": "slices", "patches": "patches"}


# ---------------------------------------------------------------- what a model is
def model_entry(model: str | Path) -> ModelEntry:
    """The :class:`ModelEntry` of a model name or folder: the listed one (bundled, user, cached, or a
    registry model not downloaded yet), else a "path" entry for a folder; a UserInputError if neither."""
    from .store import ModelEntry, list_models, model_kind, resolve_model

    listed = {m.name: m for m in list_models(downloadable=True)}
    if str(model) in listed and listed[str(model)].source == "downloadable":
        return listed[str(model)]
    path = resolve_model(model)
    known = {m.path.resolve(): m for m in list_models()}
    return known.get(path.resolve()) or ModelEntry(path.name, model_kind(path) or "unknown", path, "path")


def describe(m: ModelEntry) -> list[str]:
    """Lines about one model (a :class:`..store.ModelEntry`): what it does, what it makes, its
    depth classes and their meaning, pixel size, size on disk and where it lives."""
    from .store import read_json

    if m.source == "downloadable":
        from urllib.parse import urlsplit

        from .registry import format_size, load_registry

        r = load_registry()[m.name]
        hosts = ", ".join(sorted({urlsplit(f.url).hostname or "?" for f in r.files}))
        lines = [f"what: {m.description}"] if m.description else []
        lines.append(f"download: {format_size(r.size)} in {len(r.files)} files from {hosts}, each checked against "
                     f"the registry's sha256, into {m.path}")
        return lines + ([f"licence: {r.licence}"] if r.licence else [])
    where = f"on disk: {_size(m.path)}; {WHERE.get(m.source, m.source)}"
    try:
        card = read_card_file(m.path)
    except UserInputError as e:
        return [f"unreadable: {e}", where]
    lines = [f"what: {card['description']}"] if card.get("description") else []
    if m.kind == "cascade":
        lines += _cascade(m.path, card, read_json)
    elif m.kind == "latent":
        p = card.get("patch_size", "?")
        paired = "mask" in (card.get("channels") or [])
        lines.append(f"makes: {p}x{p} image patches " + ("WITH masks (instance labels and foreground probability)"
                                                          if paired else "(no masks)") + ", with `em generate`")
    elif m.kind == "vae":
        lines.append("makes: nothing by itself: an autoencoder to encode / decode images, and to train a latent "
                     "model on (`train ldm --vae`)")
    elif m.kind == "segmentation":
        d = {k: card.get(k) for k in ("tile", "overlap", "threshold", "min_size") if card.get(k) is not None}
        defaults = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in d.items())
        lines.append("makes: masks (instance labels, and a foreground probability) of your images, with `segment`"
                     + (f"; card defaults {defaults}" if d else ""))
        v = card.get("validation") or {}
        if "dice" in v:
            lines.append(f"held out: Dice {v['dice']:.3f}, IoU {v['iou']:.3f}"
                         + (f", object F1 {v['f1']:.3f}" if "f1" in v else ""))
    if m.kind != "cascade":
        lines.append(_pixel(card.get("pixel_size_um")))
    data = card.get("training_data") or {}
    if isinstance(data, dict) and data.get("credit"):
        lines.append(f"trained on: {data['credit']}")
    lines.append(where)
    return lines


def describe_lines(m: ModelEntry) -> list[str]:
    """:func:`describe`, or one line saying the card could not be read as expected (fields of odd types)."""
    try:
        return describe(m)
    except (TypeError, ValueError, AttributeError, KeyError) as e:  # a card with fields of odd types
        return [f"its card could not be read as expected ({type(e).__name__}: {str(e)[:100]}); "
                "loading the model says what is wrong"]


def read_card_file(folder: Path) -> dict:
    """The JSON card of a model folder: cascade.json for a cascade, else model.json."""
    from .store import CARD_FILE, CASCADE_FILE, read_json

    return read_json(folder / (CASCADE_FILE if (folder / CASCADE_FILE).is_file() else CARD_FILE))


def model_card_file(folder: Path | None) -> Path | None:
    """The folder's MODEL_CARD.md (the card for people), or None when it has none."""
    if folder is None:
        return None
    path = Path(folder) / MODEL_CARD
    return path if path.is_file() else None


def about_lines(m: ModelEntry, card: dict | None = None) -> list[str]:
    """What the docks' "About the model" shows: :func:`describe_lines`, then the card's measured
    quality (:func:`quality_lines`) and its training images' intensities (:func:`intensity_line`).
    ``card``: the model's card when the caller has read it (read here otherwise)."""
    lines = describe_lines(m)
    if m.source == "downloadable":
        return lines
    if card is None:
        try:
            card = read_card_file(m.path)
        except UserInputError:
            return lines
    extra = quality_lines(card)
    stats = intensity_line(card)
    at = next((i for i, line in enumerate(lines) if line.startswith("on disk:")), len(lines))
    return lines[:at] + extra + ([stats] if stats else []) + lines[at:]


def quality_lines(card: dict) -> list[str]:
    """The card's measured quality (its ``quality`` section) in lines: "measured quality:" and one line per
    measurement (numbers as 3 significant digits; nested figures by name). Text (such as the file of an
    evaluation) is left out; [] when the card records none."""
    quality = card.get("quality")
    if not isinstance(quality, dict) or not quality:
        return []
    out = []
    for key, value in quality.items():
        words = str(key).replace("_", " ")
        if isinstance(value, dict):
            parts = [f"{str(k).replace('_', ' ')} {_num(v)}" for k, v in value.items() if _is_num(v)]
            if parts:
                out.append(f"  {words}: {', '.join(parts)}")
        elif _is_num(value):
            out.append(f"  {words}: {_num(value)}")
    return ["measured quality (from the card):", *out] if out else []


def intensity_line(card: dict) -> str | None:
    """The training images' raw intensities at the normalisation's percentiles, in one line (None when the
    card does not record them)."""
    stats = training_stats(card)
    if not stats:
        return None
    low, high = norm_percentiles(card)
    lows, highs = [s[0] for s in stats], [s[1] for s in stats]
    return (f"training intensities ({len(stats)} image(s)): {_th(low)} percentile {_span(lows)}, "
            f"{_th(high)} percentile {_span(highs)}")


def _cascade(path: Path, card: dict, read_json) -> list[str]:
    res, volume = [], True
    for name in STAGES:  # the stages chain: sr256 only after sr128, and so on
        info = path / name / "stage.json"
        if not info.is_file():
            break
        stage = read_json(info)
        res.append(int(stage.get("resolution", 0)))
        volume = volume and int(stage.get("prev_channels") or 0) > 0
    volume = volume and bool(res)
    out = ["makes: images, no masks: depth slices with `generate`"
           + ("; volumes with `volume` (every stage takes the plane above)" if volume else
              " (a slice model: `volume` makes its planes independently)"),
           f"resolutions: {', '.join(map(str, res)) or 'none (no trained stage)'} px"]
    classes = card.get("depth_classes") or []
    if classes:
        out.append(f"depth classes (--depth 0 to {len(classes) - 1}):")
        out += [f"  {i}: {c.get('label', '') if isinstance(c, dict) else c}" for i, c in enumerate(classes)]
    field, z = card.get("field_um"), card.get("z_step_um")
    if field and res:
        per = ", ".join(f"{field / r:.3g} um/px at {r}" for r in res)
        x = (card.get("pixel_size_um") or {}).get("x") if isinstance(card.get("pixel_size_um"), dict) else None
        src = f" (training data {x:g} um/px)" if isinstance(x, (int, float)) else ""
        out.append(f"pixel size: every slice shows {field:.3g} um{src}: {per}"
                   + (f"; planes {z:g} um apart" if z else ""))
    else:
        out.append(_pixel(card.get("pixel_size_um")) + (f"; planes {z:g} um apart" if z else ""))
    return out


def _pixel(size) -> str:
    if isinstance(size, dict) and size:
        return "pixel size: " + ", ".join(f"{k} {v:g} um" for k, v in size.items() if isinstance(v, (int, float)))
    return "pixel size: not recorded in the card"


def _size(folder: Path) -> str:
    total = 0
    for root, _dirs, files in os.walk(folder):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return f"{total / 1e6:.1f} MB" if total >= 1e5 else f"{total / 1e3:.1f} kB"


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _num(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def _th(p: float) -> str:
    """A percentile as an ordinal: 1st, 2nd, 3rd, 99.8th."""
    if p != int(p):
        return f"{p:g}th"
    n = int(p)
    return f"{n}{'th' if 10 <= n % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"


def _span(values: list[float]) -> str:
    lo, hi = min(values), max(values)
    return f"{lo:.4g}" if lo == hi else f"{lo:.4g} to {hi:.4g}"


# ---------------------------------------------------------------- the card's facts about its data
def card_pixel_size(card: dict) -> float | None:
    """The training data's pixel size (micrometres, x; else y) from the card's ``pixel_size_um`` (a dict
    such as {"x": 0.6, "y": 0.6}, or one number), or None when it is not recorded."""
    size = card.get("pixel_size_um")
    if isinstance(size, dict):
        size = size.get("x", size.get("y"))
    return float(size) if _is_num(size) and size > 0 else None


def norm_percentiles(card: dict) -> tuple[float, float]:
    """The percentiles the card's normalisation maps to 0 and 1 (default 1st and 99.8th)."""
    norm = card.get("normalisation") if isinstance(card.get("normalisation"), dict) else {}
    low, high = norm.get("low", PERCENTILES[0]), norm.get("high", PERCENTILES[1])
    ok = _is_num(low) and _is_num(high) and 0 <= low < high <= 100
    return (float(low), float(high)) if ok else PERCENTILES


def training_stats(card: dict) -> list[tuple[float, float]]:
    """Each training image's raw (low, high) percentile values, from the card's ``normalisation_stats``
    (a cascade has them at the top of its card; patch and segmentation models in ``training_data``, an
    autoencoder's data also in ``vae_training_data``). [] when the card records none."""
    for where in (card, card.get("training_data"), card.get("vae_training_data")):
        stats = where.get("normalisation_stats") if isinstance(where, dict) else None
        if isinstance(stats, dict) and stats:
            out = [(float(v[0]), float(v[1])) for v in stats.values()
                   if isinstance(v, (list, tuple)) and len(v) == 2 and all(_is_num(x) for x in v)]
            if out:
                return out
    return []


# ---------------------------------------------------------------- is the input like the training data?
def sample(image, max_pixels: int = MAX_SAMPLE) -> np.ndarray:
    """At most about ``max_pixels`` values of ``image``, evenly strided along every axis (the longest axis
    is thinned first), as a flat array: cheap for a large, memory-mapped or lazy (dask) array."""
    import numpy as np

    shape = tuple(int(s) for s in np.shape(image))
    steps = [1] * len(shape)
    kept = list(shape)
    while math.prod(kept) > max_pixels:
        i = max(range(len(kept)), key=lambda k: kept[k])
        steps[i] *= 2
        kept[i] = -(-shape[i] // steps[i])
    return np.asarray(image[tuple(slice(None, None, s) for s in steps)]).reshape(-1)


def domain_warnings(card: dict, image, pixel_size_um: float | None = None, kind: str | None = None, *,
                    rescaled: bool = False, normalised: bool = False) -> list[str]:
    """Plain-words warnings when ``image`` looks unlike the training data of the model of ``card``;
    [] when it looks alike, and no warning where the card lacks what a rule needs (never a guess).

    ``image``: the 2D image (or the plane, the stack) the model will see, any array (a memory-mapped or
    lazy one is read at :data:`MAX_SAMPLE` values at most: :func:`sample`). ``pixel_size_um``: its pixel
    size in micrometres, None when unknown. ``kind``: what the model does with it: "segmentation",
    "slices" (a cascade upsamples it, or a volume starts from it), "patches" (an autoencoder encodes
    it); default from the card's kind. ``rescaled``: the caller rescales the image to the model's scale
    (Segment's object diameter is set): no pixel-size warning. ``normalised``: the values are already
    normalised intensities in [0, 1] (a layer this plugin made): no intensity-statistics warning.

    The rules, each giving at most one warning:

    1. **flat image** (needs no card): every sampled value the same, or the normalisation's low and high
       percentiles equal (almost every pixel has one value: "nearly empty"), or an integer image with
       fewer than :data:`FEW_LEVELS` grey levels between them, or a float image whose percentile range
       is less than :data:`FLAT_RELATIVE` of its level; or no finite value at all. Percentile
       normalisation would stretch noise to the full range. The intensity rule is then skipped.
    2. **pixel size**: both the image's and the model's pixel size known, and more than
       :data:`PIXEL_RATIO` (1.5x) apart. Segmentation compares with the card's ``pixel_size_um`` and says
       which object diameter rescales the image (from ``object_diameter_px``), or to resample it. A
       cascade takes a square image as its whole field (``field_um``), so for slices the image's field
       (width x pixel size) is compared with ``field_um`` (the card's raw ``pixel_size_um`` is not the
       scale of its slices); without ``field_um`` there is no warning. Patches compare pixel sizes.
    3. **intensities**: from the card's ``normalisation_stats`` (each training image's raw values at the
       normalisation's low and high percentiles, see :func:`training_stats`) and the image's own values at
       those percentiles (default 1st and 99.8th, on the sample), the first of these that holds: an 8-bit
       image for a model whose every training image has its high percentile above 255 (16-bit or float
       data); the image's range (high - low) more than :data:`INTENSITY_RATIO` (10x) away from every
       training image's range; its high percentile more than 10x away from every training image's (all
       positive). Percentile normalisation adapts the range, but a different camera or microscope often
       means another domain. An image like the training data (its range and high percentile within 10x
       of some training image's) gives no warning.
    """
    import numpy as np

    kind = KINDS.get(kind or str(card.get("kind", "")), "segmentation")
    values = sample(image)
    if values.dtype == bool:
        values = values.astype(np.uint8)
    if not (np.issubdtype(values.dtype, np.integer) or np.issubdtype(values.dtype, np.floating)):
        return []  # not numbers: the model's own checks say so
    integer = bool(np.issubdtype(values.dtype, np.integer))
    eight_bit = integer and values.dtype.itemsize == 1
    if not integer:
        values = values[np.isfinite(values)]
    low, high = norm_percentiles(card)
    figures = None  # (min, max, low percentile, high percentile) of the sample
    if values.size:
        lo, hi = (float(v) for v in np.percentile(values.astype(np.float64, copy=False), [low, high]))
        figures = (float(values.min()), float(values.max()), lo, hi)
    out: list[str] = []
    flat = _flat(figures, integer, low, high)
    if flat:
        out.append(flat)
    size = None if rescaled else _pixel_warning(card, tuple(np.shape(image)), pixel_size_um, kind)
    if size:
        out.append(size)
    if not flat and not normalised:
        intensity = _intensity_warning(card, figures[2:], eight_bit, kind)
        if intensity:
            out.append(intensity)
    return out


def _flat(figures: tuple[float, float, float, float] | None, integer: bool, low: float, high: float) -> str | None:
    """Rule 1 (see :func:`domain_warnings`): ``figures`` (min, max, low and high percentile) of the image."""
    if figures is None:
        return "empty image: it has no finite values (all NaN or infinite): there is nothing to work on."
    vmin, vmax, lo, hi = figures
    if vmin == vmax:
        return f"empty image: every pixel is {vmin:g} (constant): there is nothing to work on."
    cure = ("percentile normalisation would stretch its noise to the full range: check that this is the layer "
            "(and the plane) you mean")
    if hi == lo:
        return (f"nearly empty image: its {_th(low)} and {_th(high)} percentiles are both {lo:g} (almost every "
                f"pixel has that value): {cure}.")
    if integer and hi - lo + 1 < FEW_LEVELS:
        return (f"nearly constant image: only {int(hi - lo) + 1} grey levels between its {_th(low)} and "
                f"{_th(high)} percentiles ({lo:g} to {hi:g}): {cure}.")
    if not integer and (hi - lo) < FLAT_RELATIVE * max(abs(lo), abs(hi)):
        return (f"nearly constant image: its {_th(low)} to {_th(high)} percentiles ({lo:.6g} to {hi:.6g}) differ by "
                f"less than {FLAT_RELATIVE:.1%} of its level: {cure}.")
    return None


def _ratio(a: float, b: float) -> float:
    return max(a / b, b / a)


def _pixel_warning(card: dict, shape: tuple, pixel_size_um: float | None, kind: str) -> str | None:
    """Rule 2 (see :func:`domain_warnings`)."""
    if pixel_size_um is None or not _is_num(pixel_size_um) or pixel_size_um <= 0 or not shape:
        return None
    p = float(pixel_size_um)
    if kind == "slices":
        field = card.get("field_um")
        if not _is_num(field) or field <= 0:
            return None
        width = int(shape[-1])
        shows = width * p
        if _ratio(shows, field) <= PIXEL_RATIO:
            return None
        more = "more" if shows > field else "less"
        return (f"field of view: this image shows {shows:.3g} µm across ({width} px at {p:g} µm/px), "
                f"{_ratio(shows, field):.1f}x {more} than the model's slices ({field:.3g} µm). The model takes a "
                f"square image as its whole field, so its structures come out at the wrong scale: crop or resample "
                f"it to show about {field:.3g} µm (about {field / p:.0f} px of yours).")
    c = card_pixel_size(card)
    if c is None or _ratio(p, c) <= PIXEL_RATIO:
        return None
    r = _ratio(p, c)
    looks = "smaller" if p > c else "larger"
    head = (f"pixel size: this layer has {p:g} µm/px, the model was trained at {c:g} µm/px ({r:.1f}x "
            f"{'larger' if p > c else 'smaller'} pixels): things look {r:.1f}x {looks} than the model learned them.")
    if kind == "segmentation":
        d = card.get("object_diameter_px")
        if _is_num(d) and d > 0:
            return (f"{head} Set 'object diameter' to about {d * c / p:.0f} px (objects of the training size, "
                    f"{d:.0f} px there, at your pixel size), or tick 'estimate the object size', so that the "
                    "image is rescaled to the model's scale.")
        return (f"{head} Resample the image to about {c:g} µm/px first (this model's card gives no object size, "
                "so the object diameter cannot rescale it).")
    return f"{head} Resample the image to about {c:g} µm/px first."


def _intensity_warning(card: dict, percentiles: tuple[float, float], eight_bit: bool, kind: str) -> str | None:
    """Rule 3 (see :func:`domain_warnings`): ``percentiles``, the image's values at the card's percentiles."""
    stats = training_stats(card)
    if not stats:
        return None
    low, high = norm_percentiles(card)
    lo, hi = percentiles
    highs = [h for _, h in stats]
    ranges = [h - lo_ for lo_, h in stats if h > lo_]
    span = hi - lo
    if eight_bit and min(highs) > 255:  # one reason, the plainest: the others follow from it
        reason = (f"this image is 8-bit, but the model was trained on data with values above 255 (16-bit or more: "
                  f"its training images' {_th(high)} percentiles are {_span(highs)})")
    elif ranges and span > 0 and all(_ratio(span, r) > INTENSITY_RATIO for r in ranges):
        reason = (f"its intensity range ({_th(high)} - {_th(low)} percentile) is {span:.4g}, more than "
                  f"{INTENSITY_RATIO:g}x away from every training image's ({_span(ranges)})")
    elif hi > 0 and all(h > 0 for h in highs) and all(_ratio(hi, h) > INTENSITY_RATIO for h in highs):
        reason = (f"its {_th(high)} percentile is {hi:.4g}, more than {INTENSITY_RATIO:g}x away from every "
                  f"training image's ({_span(highs)})")
    else:
        return None
    check = {"segmentation": "check the labels closely, and if they are poor correct a few planes and use "
                             "'Fine-tune on my corrections'",
             "slices": "the result may look like the training data more than like your image",
             "patches": "the reconstruction shows what the model can represent of it"}[kind]
    return (f"intensities unlike the training data: {reason}. Percentile normalisation adapts the "
            f"range, but a different camera or microscope often means a different domain: {check}.")


__all__ = ["FEW_LEVELS", "FLAT_RELATIVE", "INTENSITY_RATIO", "MAX_SAMPLE", "MODEL_CARD", "PIXEL_RATIO", "STAGES",
           "WHERE", "about_lines", "card_pixel_size", "describe", "describe_lines", "domain_warnings",
           "intensity_line", "model_card_file", "model_entry", "norm_percentiles", "quality_lines",
           "read_card_file", "sample", "training_stats"]
