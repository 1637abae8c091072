"""Synthetic data sets at scale: many generated items written to a folder, resumably and in parallel.

``zfdiffusion dataset`` fills ``OUT/`` with one TIFF per item (``items/``), each carrying its own
provenance, plus ``dataset.json`` (what the data set is: model, settings, the item list's rule) and,
once every item exists, ``manifest.jsonl`` (one line per item: file, seed, depth(s), provenance).

Items are **slices** (:class:`SliceSpec`: N per depth) or **volumes** (:class:`VolumeSpec`: N
(Z, Y, X) volumes over a depth range, each plane conditioned on the one above).

* **One file per item**, written under a temporary name and renamed: a killed run or a full disk
  never leaves a half-written item. By default a TIFF (:func:`..io.write_tiff`; Fiji, napari and
  tifffile read it, with its pixel size and provenance). With ``format="zarr"`` (``--format zarr``)
  an OME-Zarr image (:func:`..io.write_ome_zarr`): a folder built under a hidden name and renamed
  into place (a folder renames atomically too), with the physical scale in its NGFF metadata and
  the provenance in its attributes; napari and the training commands read it. One image per item,
  not one chunked array for the whole set, because items stay independent: each is written
  atomically and resumed by its existence, ranks never share a store, an item can be copied,
  checked or deleted alone, and slices and volumes of any size fit the same scheme; the manifest
  indexes the items.
* **Resume** by skipping items whose file exists: run the same command again.
* **Parallel**: under ``torchrun --nproc_per_node N`` (or several nodes) item ``k`` is made by rank
  ``k % WORLD_SIZE``; the items are fixed by the command, not by who makes them, so the union is
  exactly the requested set whatever the number of processes.
* **Reproducible**: slice ``j`` of depth ``d`` is sample 0 of ``zfdiffusion generate --depth d
  --seed SEED+j``, and volume ``j`` is ``zfdiffusion volume --seed SEED+j``, with the same settings.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import UserInputError
from ..io import atomic_write, lock_folder, read_provenance, write_json, write_ome_zarr, write_tiff
from ..reader import open_image
from ..progress import Progress, ProgressCallback
from ..provenance import made_by, now

DATASET_FILE = "dataset.json"
MANIFEST_FILE = "manifest.jsonl"


@dataclass(frozen=True)
class Item:
    """One file of a data set: its name under ``items/`` and what the manifest says about it."""

    name: str
    seed: int
    depth: int | None = None  # slices

    def manifest(self) -> dict:
        d = {"file": f"items/{self.name}", "seed": self.seed}
        if self.depth is not None:
            d["depth"] = self.depth
        return d


@dataclass(frozen=True, kw_only=True)
class _Spec:
    """What every data set shares: the model and the sampling settings. Every field is checked
    again on resume (``dataset.json``)."""

    ITEMS = ""  # "slices" or "volumes"

    model: str
    depths: tuple[int, ...]
    seed: int = 0
    resolution: int | None = None
    guidance: float = 3.0
    steps: int = 25
    sr_steps: int | None = None
    sampler: str = "dpmsolver++"
    sr_guidance: float = 1.0
    noise_aug: float = 0.1
    format: str = "tiff"  # or "zarr": one OME-Zarr image per item

    @property
    def suffix(self) -> str:
        return ".ome.zarr" if self.format == "zarr" else ".tif"

    def write(self, path: Path, image, provenance: dict) -> None:
        (write_ome_zarr if self.format == "zarr" else write_tiff)(path, image, provenance)

    def _sampling(self) -> dict:
        return {"guidance": self.guidance, "resolution": self.resolution, "sampler": self.sampler,
                "steps": self.steps, "sr_steps": self.sr_steps, "sr_guidance": self.sr_guidance,
                "noise_aug": self.noise_aug}

    def to_dict(self) -> dict:
        return {"kind": "zfdiffusion-dataset", "format_version": 1, "items": self.ITEMS, **asdict(self),
                "depths": list(self.depths)}


@dataclass(frozen=True, kw_only=True)
class SliceSpec(_Spec):
    """A data set of slices, ``n_per_depth`` per depth."""

    ITEMS = "slices"
    n_per_depth: int

    def items(self) -> list[Item]:
        """Every item, in a fixed order: item j of depth d has seed SEED + j."""
        return [Item(self.filename(d, j), self.seed + j, d) for d in self.depths for j in range(self.n_per_depth)]

    def filename(self, depth: int, j: int) -> str:
        return f"slice_d{depth:03d}_{j:06d}{self.suffix}"

    def make(self, cascade, item: Item):
        res = cascade.generate(item.depth, n=1, seed=item.seed, **self._sampling())
        return res.images[0], res.provenance


@dataclass(frozen=True, kw_only=True)
class VolumeSpec(_Spec):
    """A data set of ``n_volumes`` (Z, Y, X) volumes over consecutive ``depths``; volume j has seed SEED + j."""

    ITEMS = "volumes"
    n_volumes: int
    continuity_guidance: float = 1.0

    def items(self) -> list[Item]:
        return [Item(f"volume_{j:06d}{self.suffix}", self.seed + j) for j in range(self.n_volumes)]

    def make(self, cascade, item: Item):
        res = cascade.generate_volume(self.depths, continuity_guidance=self.continuity_guidance, seed=item.seed,
                                      **self._sampling())
        return res.images, res.provenance


def _rank_world() -> tuple[int, int]:
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def _ours_to_resume(p: Path) -> bool:
    """What a run killed before its dataset.json was in place can have left: our lock files, a
    temporary dataset.json, an empty items folder."""
    return (p.name.startswith(".zfdiffusion.") or p.name.startswith(f".{DATASET_FILE}.") and p.name.endswith(".part")
            or p.name == "items" and p.is_dir() and not any(p.iterdir()))


def _refuse_foreign(out: Path) -> None:
    """A folder that holds something but no data set (our own lock files aside) is not ours to fill."""
    if out.exists() and any(not _ours_to_resume(p) for p in out.iterdir()):
        raise UserInputError(f"'{out}' is not empty and holds no {DATASET_FILE}: choose an empty or new folder.")


def check_folder(out: Path, spec_dict: dict) -> None:
    """Create ``out`` (or accept it if it holds this same data set) and write ``dataset.json``."""
    path = out / DATASET_FILE
    if path.is_file():
        try:
            old = json.loads(path.read_text())
            old.setdefault("format", "tiff")  # data sets from before --format were TIFFs
        except json.JSONDecodeError:
            raise UserInputError(f"'{path}' is corrupted: move the folder aside or choose another --out.") from None
        diff = sorted(k for k in set(old) | set(spec_dict) if k not in ("created", "plugin_version")
                      and old.get(k) != spec_dict.get(k))
        if diff:
            raise UserInputError(
                f"'{out}' holds a different data set (it differs in {', '.join(diff)}): run the same command "
                "to resume it, or choose another --out.")
        return
    _refuse_foreign(out)
    write_json(path, {**spec_dict, "created": now(), **made_by()})  # the settings before the first item
    (out / "items").mkdir(parents=True, exist_ok=True)


def make_items(cascade, spec: SliceSpec | VolumeSpec, out: str | Path, *, show_progress: bool = True,
               callback: ProgressCallback | None = None) -> dict:
    """Generate this rank's share of ``spec`` into ``out``; skip items that exist. Returns a summary."""
    out = Path(out)
    rank, world = _rank_world()
    spec_dict = spec.to_dict()
    if rank == 0 and not (out / DATASET_FILE).is_file():
        _refuse_foreign(out)  # before a lock file is put in it
    lock = lock_folder(out, "data set run", f".zfdiffusion.rank{rank}.lock")  # one run per folder
    try:
        return _make_items(cascade, spec, spec_dict, out, rank, world, show_progress, callback)
    finally:
        lock.release()


def _make_items(cascade, spec, spec_dict: dict, out: Path, rank: int, world: int, show_progress: bool,
                callback) -> dict:
    if rank == 0:
        check_folder(out, spec_dict)
    else:  # the other ranks wait for rank 0's dataset.json, then check it the same way
        deadline = time.monotonic() + 120
        while not (out / DATASET_FILE).is_file() and time.monotonic() < deadline:
            time.sleep(0.2)
        check_folder(out, spec_dict)
    items = spec.items()
    mine = [it for k, it in enumerate(items) if k % world == rank]
    todo = [it for it in mine if not (out / "items" / it.name).exists()]
    bar = None
    if show_progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(mine), initial=len(mine) - len(todo), unit="item", dynamic_ncols=True,
                   desc=f"dataset{f' rank {rank}/{world}' if world > 1 else ''}")
    t0 = time.perf_counter()
    for i, it in enumerate(todo):
        image, prov = spec.make(cascade, it)
        prov = {**prov, "dataset": str(out), "item": it.name, "rank": rank, "world": world}
        spec.write(out / "items" / it.name, image, prov)
        if bar is not None:
            bar.update(1)
        if callback is not None:
            callback(Progress("items", i + 1, len(todo)))
    secs = time.perf_counter() - t0
    if bar is not None:
        bar.close()
    complete = write_manifest(out, spec)
    return {"rank": rank, "world": world, "mine": len(mine), "made": len(todo), "seconds": round(secs, 2),
            "items_per_s": round(len(todo) / secs, 3) if secs > 0 and todo else None, "complete": complete,
            "total": len(items)}


def write_manifest(out: Path, spec: SliceSpec | VolumeSpec) -> bool:
    """``manifest.jsonl`` (file, seed, depth and the item's own provenance) once every item exists;
    True if complete."""
    items = spec.items()
    if not all((out / "items" / it.name).exists() for it in items):
        return False
    lines = []
    for it in items:
        item = out / "items" / it.name
        prov = read_provenance(item) if spec.format != "zarr" else open_image(item).provenance
        prov.pop("dataset", None)  # the folder it was made in; the manifest lives there
        lines.append(json.dumps({**it.manifest(), "provenance": prov}, default=str))
    text = "\n".join(lines) + "\n"
    atomic_write(out / MANIFEST_FILE, lambda tmp: tmp.write_text(text))
    return True
