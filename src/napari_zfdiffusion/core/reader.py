"""One image reader for every command: TIFF (plain, ImageJ, OME-TIFF), PNG and OME-Zarr / NGFF, as a
lazy array with its axes and physical pixel sizes.

:func:`open_image` reads only the metadata; the pixels stay on disk (a memory map for uncompressed
TIFFs, chunked Zarr otherwise) until a plane or a crop is asked for. Axes use tifffile's letters::

    T time   Z depth   C channel   Y, X   S samples (RGB)   Q, I, ... axes the file does not name

How the axes are used (:meth:`ImageSource.stacks`, :meth:`ImageSource.planes`):

* **C** is never taken as Z: a file with several channels needs ``channel`` (``--channel N``); a
  single channel is dropped. **S** (RGB samples) stays last, for the consumer to make grayscale.
* **T** and any other named axis besides Z, Y, X (a specimen or position axis) become separate
  specimens: a TZYX movie is T stacks of (Z, Y, X).
* One unnamed axis in front of (Y, X) is Z (a plain multi-page TIFF is a z-stack, as before);
  several unnamed axes cannot be told apart and are refused, naming the axes found.

Physical sizes (micrometres per pixel, per axis Z / Y / X; None when the file does not say) come
from OME metadata (PhysicalSizeX/Y/Z with their units), ImageJ metadata (the X/Y resolution tags in
its unit, and ``spacing`` for Z), the provenance this plugin writes (``pixel_size_um``), plain TIFF
resolution tags in centimetres, and NGFF ``coordinateTransformations`` with the axes' units.
"""

from __future__ import annotations

import itertools
import json
import math
import mmap
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from .errors import UserInputError
from .provenance import is_ours

SPATIAL = ("Z", "Y", "X")
_UNIT_UM = {"µm": 1.0, "um": 1.0, "micron": 1.0, "microns": 1.0, "micrometer": 1.0, "micrometre": 1.0,
            "nm": 1e-3, "nanometer": 1e-3, "nanometre": 1e-3, "mm": 1e3, "millimeter": 1e3, "millimetre": 1e3,
            "cm": 1e4, "centimeter": 1e4, "m": 1e6, "meter": 1e6, "metre": 1e6, "å": 1e-4, "angstrom": 1e-4,
            "\\u00B5m": 1.0}
_NAMED = set("TZCYXS")


def to_um(value, unit) -> float | None:
    """``value`` in ``unit`` as micrometres (None if either is unknown or not a positive number)."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    factor = _UNIT_UM.get(str(unit if unit is not None else "µm").strip().lower().replace("\u00b5", "µ"))
    if factor is None or not (v > 0 and math.isfinite(v)):
        return None
    return v * factor


class Lazy:
    """A read-only view of part of a lazy array (np.memmap, zarr.Array, or an in-memory array): some
    axes fixed at an index, the others free. Indexing reads only what is asked for."""

    def __init__(self, data, fixed: dict[int, int] | None = None, guard=None):
        self._data = data
        self._fixed = dict(fixed or {})
        self._guard = guard  # called before every read: refuses a file that changed since it was opened
        self._free = [i for i in range(len(data.shape)) if i not in self._fixed]
        self.shape = tuple(int(data.shape[i]) for i in self._free)
        self.dtype = np.dtype(data.dtype)
        self.ndim = len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        if any(k is Ellipsis for k in key):
            i = key.index(Ellipsis)
            key = key[:i] + (slice(None),) * (self.ndim - len(key) + 1) + key[i + 1:]
        free = iter(key + (slice(None),) * (self.ndim - len(key)))
        full = tuple(self._fixed[i] if i in self._fixed else next(free) for i in range(len(self._data.shape)))
        if self._guard is not None:
            self._guard()
        return np.asarray(self._data[full])

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = self[...]
        return out if dtype is None else out.astype(dtype, copy=False)

    def release(self) -> None:
        """Let go of the pages of a memory-mapped file that reading has touched: they stay in the
        kernel's page cache (a re-read is cheap) but no longer count in this process's memory, which
        otherwise grows to every page of every file read so far. Nothing to do for other arrays."""
        release(self._data)


def release(data) -> None:
    """:meth:`Lazy.release` for any array this module hands out (a memory map or a view of one, a
    :class:`Lazy`, :class:`Planes`): madvise(DONTNEED) on the memory map's pages (Linux, macOS).
    Chunked (Zarr) and in-memory arrays hold nothing to release."""
    if isinstance(data, Lazy):
        data = data._data
    elif isinstance(data, Planes):
        for base in {id(v._data): v._data for v in data._views}.values():
            release(base)
        return
    mm = getattr(data, "_mmap", None)
    if mm is not None and hasattr(mm, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
        try:
            mm.madvise(mmap.MADV_DONTNEED)
        except (OSError, ValueError):  # a closed map or a platform without it: the pages stay counted
            pass


class Planes:
    """(N, Y, X[, S]) planes drawn from several lazy views, read one plane (or a few) at a time."""

    def __init__(self, views: list[Lazy]):
        if not views:
            raise ValueError("no planes")
        self._views = views
        self.shape = (len(views), *views[0].shape)
        self.dtype = views[0].dtype
        self.ndim = len(self.shape)

    def __len__(self) -> int:
        return len(self._views)

    def __getitem__(self, key):
        if isinstance(key, tuple):
            head, rest = key[0], key[1:]
        else:
            head, rest = key, ()
        if isinstance(head, (int, np.integer)):
            return self._views[int(head)][rest] if rest else self._views[int(head)][...]
        idx = range(len(self._views))[head]
        return np.stack([self._views[i][rest] if rest else self._views[i][...] for i in idx])

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = self[:]
        return out if dtype is None else out.astype(dtype, copy=False)


@dataclass
class ImageSource:
    """An image file opened for reading: its lazy ``data``, ``axes`` (one letter per dimension),
    physical pixel sizes in micrometres (``pixel_um``: Z, Y, X; None where unknown), and the
    provenance this plugin wrote into it ({} for other files)."""

    path: Path
    data: object
    axes: str
    pixel_um: dict = field(default_factory=lambda: {"Z": None, "Y": None, "X": None})
    provenance: dict = field(default_factory=dict)
    channel: int | None = None  # the channel chosen, when the file had several
    stamp: tuple | None = None  # (size, modification time) of the file when it was opened

    def check_unchanged(self) -> None:
        """Refuse to read on from a file that was changed (rewritten, truncated) since it was opened:
        its planes would no longer be those its metadata describe (a truncated memory map can even
        crash the process)."""
        if self.stamp is None:
            return
        try:
            st = self.path.stat()
            now = (st.st_size, st.st_mtime_ns)
        except OSError:
            now = None
        if now != self.stamp:
            raise UserInputError(f"{self.name} changed while it was being read (it was "
                                 f"{'deleted' if now is None else 'rewritten'} since it was opened): stop "
                                 "whatever writes it, then run the command again.")

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.data.shape)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.data.dtype)

    def size(self, axis: str) -> int:
        return self.shape[self.axes.index(axis)] if axis in self.axes else 1

    @property
    def rgb(self) -> bool:
        return self.axes.endswith("S") and self.size("S") in (3, 4)

    def describe(self) -> str:
        dims = " x ".join(f"{a}={s}" for a, s in zip(self.axes, self.shape))
        sizes = ", ".join(f"{a.lower()} {v:g} um" for a, v in self.pixel_um.items() if v)
        return f"{self.name}: axes {self.axes} ({dims}), {self.dtype}" + (f", pixel size {sizes}" if sizes else "")

    # ------------------------------------------------------------------ axes
    def _checked(self, channel: int | None) -> tuple[str, dict[int, int]]:
        """The axes after choosing a channel and naming an unnamed depth axis, and the fixed indices."""
        axes = list(self.axes)
        fixed: dict[int, int] = {}
        if "C" in axes:
            i = axes.index("C")
            n = self.shape[i]
            if n == 1:
                fixed[i] = 0
            elif channel is None:
                raise UserInputError(
                    f"{self.name} has {n} channels (axes {self.axes}, shape {self.shape}): choose one with "
                    f"--channel N (0-{n - 1}); channels are never taken as depth planes.")
            elif not 0 <= channel < n:
                raise UserInputError(f"{self.name}: channel {channel} does not exist; it has channels 0-{n - 1}.")
            else:
                fixed[i] = int(channel)
        elif channel not in (None, 0):
            raise UserInputError(f"{self.name} has one channel (axes {self.axes}): --channel {channel} does not exist.")
        if "S" in axes and not self.rgb:  # samples that are not RGB(A) colour: channels by another name
            i = axes.index("S")
            if self.shape[i] > 1:
                if channel is None:
                    raise UserInputError(f"{self.name} has {self.shape[i]} samples per pixel (axes {self.axes}): "
                                         "choose one with --channel N.")
                fixed[i] = int(channel)
            else:
                fixed[i] = 0
        free = [a for i, a in enumerate(axes) if i not in fixed]
        spatial_end = free[-3:] if free[-1] == "S" else free[-2:]
        if [a for a in spatial_end if a != "S"] != ["Y", "X"]:
            if len(free) >= 2 and not ({"Y", "X"} & set(free)):  # a file that names no axis: the last two are Y, X
                k = len(free) - (3 if self.rgb else 2)
                free[k:k + 2] = ["Y", "X"]
            else:
                raise UserInputError(f"{self.name}: cannot find the image plane (Y, X) in its axes {self.axes}.")
        unnamed = [a for a in free if a not in _NAMED]
        if unnamed:
            if len(unnamed) == 1 and "Z" not in free:
                free[free.index(unnamed[0])] = "Z"
            else:
                raise UserInputError(
                    f"{self.name} has {len(self.shape)} dimensions (axes {self.axes}, shape {self.shape}): "
                    f"{len(unnamed)} of them are not named, "
                    "so time points, depth and channels cannot be told apart. Save it as OME-TIFF with its axes "
                    "(e.g. tifffile.imwrite(..., metadata={'axes': 'TZYX'})), say what they are with --axes "
                    "(e.g. --axes TZYX), or split it into (Z, Y, X) stacks.")
        return "".join(free), fixed

    def stacks(self, channel: int | None = None) -> list[tuple[str, Lazy]]:
        """One (Z, Y, X) (or (Y, X) without Z; S last for RGB) lazy stack per specimen: every
        combination of the axes other than Z, Y, X and S (time points, positions), with a name."""
        channel = self.channel if channel is None else channel
        axes, fixed = self._checked(channel)
        free_pos = [i for i in range(len(self.axes)) if i not in fixed]
        outer = [(pos, a) for pos, a in zip(free_pos, axes) if a not in ("Z", "Y", "X", "S")]
        out = []
        for combo in itertools.product(*(range(self.shape[pos]) for pos, _ in outer)):
            f = dict(fixed)
            f.update({pos: i for (pos, _), i in zip(outer, combo)})
            label = "".join(f"_{a.lower()}{i}" for (_, a), i in zip(outer, combo))
            out.append((f"{self.path.stem}{label}", Lazy(self.data, f, self.check_unchanged)))
        return out

    def image_axes(self, channel: int | None = None) -> tuple[str, tuple[int, ...]]:
        """The axes left once a channel is chosen (an unnamed depth axis named Z), and their sizes."""
        axes, fixed = self._checked(self.channel if channel is None else channel)
        return axes, tuple(s for i, s in enumerate(self.shape) if i not in fixed)

    def stack_axes(self, channel: int | None = None) -> str:
        """The axes of each of :meth:`stacks` (e.g. "ZYX", "YX", "YXS")."""
        axes, _ = self._checked(self.channel if channel is None else channel)
        return "".join(a for a in axes if a in ("Z", "Y", "X", "S"))

    def planes(self, channel: int | None = None):
        """Every 2D plane (Y, X[, S]), specimen by specimen and depth by depth, as one (N, Y, X[, S])
        lazy array: a view of the memory map when the file allows it (nothing read), else
        :class:`Planes`, which reads a plane when it is indexed. Also the axes it came from."""
        channel = self.channel if channel is None else channel
        axes, fixed = self._checked(channel)
        lead = len(axes) - (3 if axes.endswith("S") else 2)
        if isinstance(self.data, np.ndarray):
            view = self.data[tuple(fixed.get(i, slice(None)) for i in range(len(self.axes)))]
            plane_shape = view.shape[lead:]
            flat = view.reshape((-1, *plane_shape)) if lead else view[None]
            if np.shares_memory(flat, view) or not isinstance(self.data, np.memmap):
                return flat
        views = []
        for name, stack in self.stacks(channel):
            if "Z" in axes:
                views.extend(Lazy(stack._data, {**stack._fixed, stack._free[0]: z}, self.check_unchanged)
                             for z in range(stack.shape[0]))
            else:
                views.append(stack)
        return Planes(views)

    def with_channel(self, channel: int | None) -> ImageSource:
        self._checked(channel)  # refuse a bad channel now
        return replace(self, channel=channel)


def layer_geometry(pixel_size_um: dict | None, ndim: int, *, z: bool = True) -> dict:
    """``scale`` and ``translate`` of a layer (micrometres) from a provenance's ``pixel_size_um``
    (z, y, x), so that layers of one field overlay in napari whatever their resolution: each spans
    [0, field] in y and x (napari puts a pixel's centre at its coordinate, so the first centre sits
    half a pixel in). ``z``: the third axis from the end is depth (a volume), else samples (scale 1).
    {} when the size is not known."""
    px = pixel_size_um or {}
    if not px.get("x") or not px.get("y"):
        return {}
    sy, sx = float(px["y"]), float(px["x"])
    scale, translate = [sy, sx], [sy / 2, sx / 2]
    if ndim >= 3:
        scale.insert(0, float(px.get("z") or 1.0) if z else 1.0)
        translate.insert(0, 0.0)
    pad = [1.0] * (ndim - len(scale))
    return {"scale": tuple(pad + scale), "translate": tuple([0.0] * len(pad) + translate)}


# ---------------------------------------------------------------------------------------------- open
def open_image(path, *, channel: int | None = None, axes: str | None = None) -> ImageSource:
    """Open an image file or OME-Zarr store for lazy reading; the axes and pixel sizes from its metadata.

    ``channel``: the channel to use when the file has several (checked when planes are asked for,
    and here if given). ``axes``: what the dimensions are (e.g. "TZYX"), for a file that does not say
    (a plain TIFF saved without metadata); it must name every dimension."""
    path = Path(path)
    if not path.exists():
        raise UserInputError(f"'{path}' does not exist.")
    if path.is_dir() or path.suffix.lower() == ".zarr":
        src = _open_zarr(path)
    elif path.suffix.lower() in (".tif", ".tiff", ".btf", ".tf8"):
        src = _open_tiff(path)
    else:
        src = _open_other(path)
    if path.is_file():
        st = path.stat()
        src = replace(src, stamp=(st.st_size, st.st_mtime_ns))
    if axes:
        given = str(axes).strip().upper()
        if len(given) != len(src.shape) or set(given) - set("TZCYXSQ") or len(set(given)) != len(given):
            raise UserInputError(f"--axes {axes}: {src.name} has {len(src.shape)} dimensions {src.shape} (its own "
                                 f"axes: {src.axes}); give one letter each from T, Z, C, Y, X, e.g. "
                                 f"{'TZCYX'[-len(src.shape):]}.")
        src = replace(src, axes=given)
    if channel is not None:
        src = src.with_channel(channel)
    return src


def _open_other(path: Path) -> ImageSource:
    from .io import read_image

    arr = read_image(path)
    axes = "YXS" if arr.ndim == 3 and arr.shape[-1] in (3, 4) else "QYX"[-arr.ndim:]
    return ImageSource(path, arr, axes)


def _tiff_data(path: Path, shape: tuple[int, ...]):
    """The first series as a read-only memory map when it is stored uncompressed and contiguous,
    else a chunked (Zarr) view that decodes only the pages asked for, else (no zarr) read whole."""
    import tifffile

    try:
        mm = tifffile.memmap(path, mode="r")
        if tuple(mm.shape) == tuple(shape):
            return mm
    except Exception:  # noqa: BLE001 - compressed, tiled, or odd files: a chunked view instead
        pass
    try:
        import zarr

        return zarr.open(tifffile.imread(path, aszarr=True), mode="r")  # the store keeps the file open
    except ImportError:
        return tifffile.imread(path)


def _open_tiff(path: Path) -> ImageSource:
    import tifffile

    try:
        with tifffile.TiffFile(path) as tf:
            series = tf.series[0]
            axes = series.axes.upper()
            if "S" in axes[:-1]:  # planar samples (tifffile writes a (3 or 4, Y, X) stack so): planes, as always
                axes = axes.replace("S", "Q")
            pixel = {"Z": None, "Y": None, "X": None}
            desc = tf.pages[0].description or ""
            prov = {}
            try:
                prov = json.loads(desc) if desc.startswith("{") else {}
            except json.JSONDecodeError:
                prov = {}
            prov = prov if is_ours(prov) or "pixel_size_um" in prov else {}
            if tf.is_ome:
                pixel.update(_ome_sizes(tf.ome_metadata))
            elif tf.is_imagej:
                pixel.update(_imagej_sizes(tf))
            else:
                pixel.update(_tag_sizes(tf.pages[0]))
            for a, v in (prov.get("pixel_size_um") or {}).items():
                if str(a).upper() in pixel and pixel[str(a).upper()] is None:
                    pixel[str(a).upper()] = to_um(v, "um")
            if series.shape and 0 in series.shape:
                raise UserInputError(f"could not read '{path}' as an image: it holds no pixels.")
            shape = tuple(series.shape)
        data = _tiff_data(path, shape)
    except UserInputError:
        raise
    except FileNotFoundError:
        raise UserInputError(f"'{path}' does not exist.") from None
    except Exception as e:  # noqa: BLE001 - corrupt or not a TIFF
        raise UserInputError(f"could not read '{path}' as an image ({type(e).__name__}: {e}).") from None
    if len(axes) != len(data.shape):
        axes = ("Q" * len(data.shape) + "YX")[-len(data.shape):] if len(data.shape) >= 2 else axes
    return ImageSource(path, data, axes, pixel, prov if is_ours(prov) else {})


def _ome_sizes(xml: str) -> dict:
    import xml.etree.ElementTree as ET

    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return {}
    pixels = next((el for el in root.iter() if el.tag.endswith("Pixels")), None)
    if pixels is None:
        return {}
    out = {}
    for a in SPATIAL:
        v = pixels.get(f"PhysicalSize{a}")
        if v is not None:
            out[a] = to_um(v, pixels.get(f"PhysicalSize{a}Unit", "µm"))
    return out


def _resolution_um(page, unit_um: float) -> dict:
    out = {}
    for a, tag in (("X", "XResolution"), ("Y", "YResolution")):
        t = page.tags.get(tag)
        if t is None:
            continue
        num, den = t.value if isinstance(t.value, tuple) else (t.value, 1)
        if num and den:
            out[a] = unit_um * den / num
    return out


def _imagej_sizes(tf) -> dict:
    meta = tf.imagej_metadata or {}
    unit = meta.get("unit", "pixel")
    factor = to_um(1.0, unit)
    if factor is None:  # "pixel", "inch" or none: no physical size
        return {}
    out = _resolution_um(tf.pages[0], factor)
    if meta.get("spacing"):
        out["Z"] = to_um(meta["spacing"], unit)
    return out


def _tag_sizes(page) -> dict:
    """Resolution tags of a plain TIFF, trusted only in centimetres (inches are the 72 dpi of screens)."""
    unit = page.tags.get("ResolutionUnit")
    if unit is None or int(unit.value) != 3:
        return {}
    return _resolution_um(page, 1e4)


def _open_zarr(path: Path) -> ImageSource:
    try:
        import zarr
    except ImportError:
        raise UserInputError(f"'{path}' is a Zarr store: reading it needs the zarr package (pip install zarr).") \
            from None
    try:
        node = zarr.open(str(path), mode="r")
    except Exception as e:  # noqa: BLE001 - not a Zarr store at all
        raise UserInputError(f"'{path}' is not a Zarr store or an image file ({type(e).__name__}: {e}).") from None
    attrs = dict(node.attrs)
    ms = attrs.get("multiscales") or (attrs.get("ome") or {}).get("multiscales")
    if hasattr(node, "shape") and not ms:  # a bare Zarr array: no axes, no sizes
        if len(node.shape) < 2:
            raise UserInputError(f"'{path}' holds a {len(node.shape)}D array, not an image.")
        return ImageSource(path, node, ("Q" * len(node.shape) + "YX")[-len(node.shape):])
    if not ms:
        raise UserInputError(f"'{path}' is a Zarr store but not an OME-Zarr image (no 'multiscales' metadata): "
                             "give the image's own folder, or an OME-Zarr written by napari, bioformats2raw or "
                             "`zfdiffusion dataset --format zarr`.")
    ms0 = ms[0]
    names = [(a["name"] if isinstance(a, dict) else str(a)) for a in ms0.get("axes", [])]
    units = [(a.get("unit") if isinstance(a, dict) else None) for a in ms0.get("axes", [])]
    level = ms0["datasets"][0]
    try:
        arr = node[level["path"]]
    except KeyError:
        raise UserInputError(f"'{path}': its multiscales metadata names '{level['path']}', which is missing.") from None
    if not names:
        names = list("TCZYX"[-len(arr.shape):])
    if len(names) != len(arr.shape):
        raise UserInputError(f"'{path}': its metadata names axes {names} but the array has {len(arr.shape)} "
                             "dimensions.")
    prov = attrs.get("zfdiffusion") if is_ours(attrs.get("zfdiffusion")) else {}
    letters = "".join(n[0].upper() if n.lower() in ("t", "c", "z", "y", "x") else "Q" for n in names)
    scale = [1.0] * len(names)
    for tr in level.get("coordinateTransformations", []) + ms0.get("coordinateTransformations", []):
        if tr.get("type") == "scale":
            scale = [s * float(t) for s, t in zip(scale, tr["scale"])]
    pixel = {"Z": None, "Y": None, "X": None}
    for letter, s, unit in zip(letters, scale, units):
        if letter in pixel and unit:
            pixel[letter] = to_um(s, unit)
    return ImageSource(path, arr, letters, pixel, prov)


__all__ = ["ImageSource", "Lazy", "Planes", "layer_geometry", "open_image", "to_um"]
