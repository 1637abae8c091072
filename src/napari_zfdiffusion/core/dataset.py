"""Synthetic data sets at scale: many generated items written to a folder, resumably and in parallel.

``zfdiffusion dataset`` fills ``OUT/`` with one TIFF per item (``items/``), each carrying its own
provenance, plus ``dataset.json`` (what the data set is: model, settings, the item list's rule) and,
once every item exists, ``manifest.jsonl`` (one line per item: file, depth, seed).

* **One TIFF per item**, written under a temporary name and renamed (:func:`.io.write_tiff`): a
  killed run or a full disk never leaves a half-written item, and any program reads the result.
* **Resume** by skipping items whose file exists: run the same command again.
* **Parallel**: under ``torchrun --nproc_per_node N`` (or several nodes) item ``k`` is made by rank
  ``k % WORLD_SIZE``; the items are fixed by the command, not by who makes them, so the union is
  exactly the requested set whatever the number of processes.
* **Reproducible**: item ``j`` of depth ``d`` is sample 0 of ``zfdiffusion generate --depth d
  --seed SEED+j`` with the same settings.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .. import __version__
from .errors import UserInputError
from .io import write_json, write_tiff
from .sampling import ProgressCallback

DATASET_FILE = "dataset.json"
MANIFEST_FILE = "manifest.jsonl"


@dataclass(frozen=True)
class SliceSpec:
    """What a data set of slices is: every field is checked again on resume."""

    model: str
    depths: tuple[int, ...]
    n_per_depth: int
    seed: int = 0
    resolution: int | None = None
    guidance: float = 3.0
    steps: int = 25
    sr_steps: int | None = None
    sampler: str = "dpmsolver++"
    sr_guidance: float = 1.0
    noise_aug: float = 0.1

    def items(self) -> list[tuple[int, int]]:
        """(depth, j) for every item, in a fixed order."""
        return [(d, j) for d in self.depths for j in range(self.n_per_depth)]

    @staticmethod
    def filename(depth: int, j: int) -> str:
        return f"slice_d{depth:03d}_{j:06d}.tif"

    def to_dict(self) -> dict:
        return {"kind": "zfdiffusion-dataset", "format_version": 1, "items": "slices", **asdict(self),
                "depths": list(self.depths)}


def parse_depths(text: str, n_classes: int) -> tuple[int, ...]:
    """'0-4', '1,3,5' or '2' (or 'all') as depth classes, checked against the model's."""
    text = str(text).strip()
    if text == "all":
        return tuple(range(n_classes))
    out: list[int] = []
    try:
        for part in text.split(","):
            if "-" in part.strip()[1:]:
                a, b = part.split("-", 1)
                out.extend(range(int(a), int(b) + 1))
            else:
                out.append(int(part))
    except ValueError:
        raise UserInputError(f"--depths '{text}': give depth classes like 0-4, 1,3,5 or all.") from None
    bad = [d for d in out if not 0 <= d < n_classes]
    if bad or not out:
        raise UserInputError(f"--depths '{text}': this model has depth classes 0-{n_classes - 1}; "
                             f"{bad or 'none'} {'is' if len(bad) == 1 else 'are'} outside.")
    return tuple(dict.fromkeys(out))


def _rank_world() -> tuple[int, int]:
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def check_folder(out: Path, spec_dict: dict) -> None:
    """Create ``out`` (or accept it if it holds this same data set) and write ``dataset.json``."""
    path = out / DATASET_FILE
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except json.JSONDecodeError:
            raise UserInputError(f"'{path}' is corrupted: move the folder aside or choose another --out.") from None
        diff = sorted(k for k in set(old) | set(spec_dict) if k not in ("created", "plugin_version")
                      and old.get(k) != spec_dict.get(k))
        if diff:
            raise UserInputError(
                f"'{out}' holds a different data set (it differs in {', '.join(diff)}): run the same command "
                "to resume it, or choose another --out.")
        return
    if out.exists() and any(out.iterdir()):
        raise UserInputError(f"'{out}' is not empty and holds no {DATASET_FILE}: choose an empty or new folder.")
    (out / "items").mkdir(parents=True, exist_ok=True)
    write_json(path, {**spec_dict, "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "plugin_version": __version__})


def make_slices(cascade, spec: SliceSpec, out: str | Path, *, show_progress: bool = True,
                callback: ProgressCallback | None = None) -> dict:
    """Generate this rank's share of ``spec`` into ``out``; skip items that exist. Returns a summary."""
    from .sampling import Progress

    out = Path(out)
    rank, world = _rank_world()
    spec_dict = spec.to_dict()
    if rank == 0:
        check_folder(out, spec_dict)
    else:  # the other ranks wait for rank 0's dataset.json, then check it the same way
        deadline = time.monotonic() + 120
        while not (out / DATASET_FILE).is_file() and time.monotonic() < deadline:
            time.sleep(0.2)
        check_folder(out, spec_dict)
    items = spec.items()
    mine = [(k, d, j) for k, (d, j) in enumerate(items) if k % world == rank]
    todo = [(k, d, j) for k, d, j in mine if not (out / "items" / spec.filename(d, j)).is_file()]
    bar = None
    if show_progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(mine), initial=len(mine) - len(todo), unit="item", dynamic_ncols=True,
                   desc=f"dataset{f' rank {rank}/{world}' if world > 1 else ''}")
    t0 = time.perf_counter()
    for i, (_, d, j) in enumerate(todo):
        res = cascade.generate(d, guidance=spec.guidance, resolution=spec.resolution, n=1, seed=spec.seed + j,
                               sampler=spec.sampler, steps=spec.steps, sr_steps=spec.sr_steps,
                               sr_guidance=spec.sr_guidance, noise_aug=spec.noise_aug)
        prov = {**res.provenance, "dataset": str(out), "item": spec.filename(d, j), "rank": rank, "world": world}
        write_tiff(out / "items" / spec.filename(d, j), res.images[0], prov)
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


def write_manifest(out: Path, spec: SliceSpec) -> bool:
    """``manifest.jsonl`` (file, depth, seed per item) once every item exists; True if complete."""
    lines = []
    for d, j in spec.items():
        name = spec.filename(d, j)
        if not (out / "items" / name).is_file():
            return False
        lines.append(json.dumps({"file": f"items/{name}", "depth": d, "seed": spec.seed + j}))
    from .io import atomic_write

    text = "\n".join(lines) + "\n"
    atomic_write(out / MANIFEST_FILE, lambda tmp: tmp.write_text(text))
    return True
