"""Shared fixtures: tiny random models, synthetic stacks, an isolated ZFDIFFUSION_HOME."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest


def make_tiny_cascade(path: Path, n_classes: int = 3, stages=("base", "sr128", "sr256", "sr512")) -> Path:
    """A cascade folder of randomly initialised tiny models: right shapes, fast, meaningless images."""
    import torch

    from napari_zfdiffusion.core.io import write_json
    from napari_zfdiffusion.core.models import build_model
    from napari_zfdiffusion.core.sampling import DEFAULT_SCHEDULE
    from napari_zfdiffusion.core.store import save_unet
    from napari_zfdiffusion.core.train import STAGES, depth_class_cards

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    write_json(path / "cascade.json", {
        "kind": "cascade", "name": path.name, "depth_classes": depth_class_cards(n_classes, n_classes, 2.0),
        "normalisation": {"method": "percentile", "low": 1.0, "high": 99.8, "per": "stack"},
    })
    torch.manual_seed(0)
    for st in stages:
        res, lres = STAGES[st]
        model = build_model("base" if st == "base" else "sr", "tiny", resolution=res, num_classes=n_classes)
        save_unet(model, path / st, {"stage": st, "resolution": res, "input_resolution": lres,
                                     "schedule": dict(DEFAULT_SCHEDULE)})
    return path


def make_stacks(folder: Path, n: int = 3, z: int = 4, shape=(40, 48), dtype=np.uint16, seed: int = 0) -> Path:
    """Synthetic (Z, Y, X) stacks whose planes get dimmer with depth, like the real ones."""
    import tifffile

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        stack = rng.random((z, *shape)) * np.linspace(1.0, 0.3, z)[:, None, None]
        info = np.iinfo(dtype).max if np.issubdtype(dtype, np.integer) else 1.0
        tifffile.imwrite(folder / f"specimen_{i:02d}.tif", (stack * info * 0.5).astype(dtype))
    return folder


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path, monkeypatch):
    """User models and fetched data go to a temporary ZFDIFFUSION_HOME in every test."""
    monkeypatch.setenv("ZFDIFFUSION_HOME", str(tmp_path / "zfhome"))


@pytest.fixture(scope="session")
def tiny_cascade(tmp_path_factory) -> Path:
    return make_tiny_cascade(tmp_path_factory.mktemp("models") / "tiny-cascade")


@pytest.fixture
def stacks(tmp_path) -> Path:
    return make_stacks(tmp_path / "stacks")
