"""Helpers both evaluation scripts use: the git commit, quartile summaries, headless matplotlib."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def quartiles(d) -> dict:
    d = np.asarray(d, dtype=np.float64)
    q = np.percentile(d, [0, 5, 25, 50, 75, 100])
    return {"n": int(d.size), "min": q[0], "p05": q[1], "q25": q[2], "median": q[3], "q75": q[4], "max": q[5],
            "mean": float(d.mean())}


def plt():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as pyplot

    return pyplot
