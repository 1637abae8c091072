"""What the evaluation modules share: logging, the git commit, quartile summaries, rounding for the
JSON, the output folders, matplotlib on a headless backend (imported only when needed) and saving figures
(PNG for plots, JPEG for photographs of samples)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from ..core.errors import UserInputError

PROG = "python -m napari_zfdiffusion.evaluation."
EVAL_EXTRA = "pip install 'napari-zfdiffusion[eval]'"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def git_commit() -> str | None:
    """The short commit of the source checkout this package runs from, or None (an installed copy)."""
    pkg = Path(__file__).resolve().parents[1]
    try:
        def git(*args: str) -> str:
            return subprocess.run(["git", *args], cwd=pkg, capture_output=True, text=True,
                                  check=True).stdout.strip()

        top = Path(git("rev-parse", "--show-toplevel")).resolve()
        if pkg != top / "src" / pkg.name:  # e.g. a virtual environment inside some other repository
            return None
        return git("rev-parse", "--short", "HEAD")
    except (OSError, subprocess.CalledProcessError):
        return None


def quartiles(d) -> dict:
    d = np.asarray(d, dtype=np.float64)
    q = np.percentile(d, [0, 5, 25, 50, 75, 100])
    return {"n": int(d.size), "min": q[0], "p05": q[1], "q25": q[2], "median": q[3], "q75": q[4], "max": q[5],
            "mean": float(d.mean())}


def rounded(obj, nd: int = 4, *, significant: bool = False):
    """Every float in a nested dict / list rounded to ``nd`` decimals (or ``nd`` significant digits)."""
    if isinstance(obj, float):
        return float(f"{obj:.{nd}g}") if significant else round(obj, nd)
    if isinstance(obj, dict):
        return {k: rounded(v, nd, significant=significant) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [rounded(v, nd, significant=significant) for v in obj]
    if isinstance(obj, np.generic):
        return rounded(obj.item(), nd, significant=significant)
    return obj


def floats(s: str) -> list[float]:
    return [float(v) for v in s.split(",") if v.strip()]


def plt():
    """matplotlib.pyplot on the Agg backend (no display needed); a clear error if matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        raise UserInputError(f"the evaluation figures need matplotlib: {EVAL_EXTRA}") from None
    matplotlib.use("Agg")
    from matplotlib import pyplot

    return pyplot


def figure_suffix(photo: bool) -> str:
    """The suffix of a figure file: ``.jpg`` for a figure that is mostly photographs of samples (image
    grids, sample pairs), ``.png`` for a plot (lines, bars, text)."""
    return ".jpg" if photo else ".png"


def save_figure(fig, path: Path, *, dpi: int) -> Path:
    """Save ``fig`` in the format its suffix says (the caller lays it out and closes it).

    ``.png`` for plots; ``.jpg`` for figures that are mostly photographs of samples, which the
    repository's size budget (issue 17) keeps as JPEG: quality 90, no chroma subsampling (thin coloured
    outlines stay crisp), one channel when the figure is grey, so that a rerun writes what is committed."""
    path = Path(path)
    if path.suffix == ".png":
        fig.savefig(path, dpi=dpi)
        return path
    if path.suffix != ".jpg":
        raise ValueError(f"{path.name}: a figure is a .png (plot) or a .jpg (photographs of samples)")
    import io

    from PIL import Image  # a dependency of matplotlib

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)  # the same pixels as the PNG would have
    buf.seek(0)
    with Image.open(buf) as im:
        rgb = im.convert("RGB")
    a = np.asarray(rgb)
    grey = bool((a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all())
    (rgb.convert("L") if grey else rgb).save(path, "JPEG", quality=90, subsampling=0, optimize=True)
    return path


def output_dirs(out: Path) -> tuple[Path, Path]:
    """``OUT/images`` and ``OUT/results``, created."""
    img_dir, res_dir = Path(out) / "images", Path(out) / "results"
    img_dir.mkdir(parents=True, exist_ok=True)
    res_dir.mkdir(parents=True, exist_ok=True)
    return img_dir, res_dir


def begin(a) -> tuple[Path, Path]:
    """The start of every evaluation: check that matplotlib is there (now, not after minutes of
    sampling), set the torch threads, create ``--out``; returns (images folder, results folder)."""
    plt()
    set_threads(getattr(a, "threads", None))
    return output_dirs(a.out)


def command(module: str, argv) -> str:
    """The command line that ran ``module``, for the results."""
    args = sys.argv[1:] if argv is None else [str(a) for a in argv]
    return " ".join(["python -m", f"napari_zfdiffusion.evaluation.{module}", *args])


def shown_path(path: Path) -> str:
    """A path as the results list it: relative to the working directory when inside it."""
    p = Path(os.path.abspath(path))
    try:
        return str(p.relative_to(Path.cwd()))
    except ValueError:
        return str(p)


def add_compute(p) -> None:
    """``--device`` (cpu by default: the published numbers are CPU numbers, reproducible) and ``--threads``."""
    p.add_argument("--device", default="cpu", help="cpu (default, reproducible), cuda, mps or auto")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's own, i.e. OMP_NUM_THREADS or all cores)")


def set_threads(n: int | None) -> None:
    if n:
        import torch

        torch.set_num_threads(n)


def run(main) -> None:
    """``sys.exit(main())``, with a user's mistake (or a missing extra) as one line, not a traceback."""
    try:
        sys.exit(main())
    except UserInputError as e:
        sys.exit(f"error: {e}")
