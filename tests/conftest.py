"""Shared fixtures: tiny random models, synthetic stacks, an isolated ZFDIFFUSION_HOME."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest


def make_tiny_cascade(path: Path, n_classes: int = 3, stages=("base", "sr128", "sr256", "sr512"),
                      continuity: bool = False) -> Path:
    """A cascade folder of randomly initialised tiny models: right shapes, fast, meaningless images.
    ``continuity``: a volume model (every stage also takes the previous plane)."""
    import torch

    from napari_zfdiffusion.core.io import write_json
    from napari_zfdiffusion.core.diffusion.unet import build_model
    from napari_zfdiffusion.core.diffusion.sampling import DEFAULT_SCHEDULE
    from napari_zfdiffusion.core.store import save_model
    from napari_zfdiffusion.core.cascade.depths import depth_class_cards
    from napari_zfdiffusion.core.cascade.train import STAGES

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    write_json(path / "cascade.json", {
        "kind": "cascade", "name": path.name, "depth_classes": depth_class_cards(n_classes, n_classes, 2.0),
        "normalisation": {"method": "percentile", "low": 1.0, "high": 99.8, "per": "stack"},
    })
    torch.manual_seed(0)
    for st in stages:
        res, lres = STAGES[st]
        model = build_model("base" if st == "base" else "sr", "tiny", resolution=res, num_classes=n_classes,
                            prev_channels=int(continuity))
        if continuity:  # a learned, non-zero "has previous plane" signal, as after training
            torch.nn.init.normal_(model.prev_embedding.weight, std=0.5)
        save_model(model, path / st, {"stage": st, "resolution": res, "input_resolution": lres,
                                     "schedule": dict(DEFAULT_SCHEDULE), "prev_channels": int(continuity)})
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


def make_blobs(folder: Path, n: int = 2, shape=(80, 96), dtype=np.uint8, seed: int = 0, masks: bool = True,
               name: str = "blobs") -> tuple[Path, Path | None]:
    """2D images of bright discs on a noisy background (like nuclei or granules), and their label images."""
    import tifffile

    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    for i in range(n):
        lab = np.zeros(shape, np.uint16)
        for k in range(1, 7):
            cy, cx, r = rng.integers(8, shape[0] - 8), rng.integers(8, shape[1] - 8), rng.integers(4, 8)
            lab[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = k
        img = (lab > 0) * 0.6 + rng.random(shape) * 0.3
        info = np.iinfo(dtype).max if np.issubdtype(dtype, np.integer) else 1.0
        tifffile.imwrite(folder / "images" / f"{name}_{i:02d}.tif", (img * info).astype(dtype))
        if masks:
            (folder / "masks").mkdir(exist_ok=True)
            tifffile.imwrite(folder / "masks" / f"{name}_{i:02d}.tif", lab)
    return folder / "images", (folder / "masks" if masks else None)


def make_tiny_latent(path: Path, paired: bool = False, patch: int = 32) -> Path:
    """A latent-diffusion folder (tiny autoencoder downsampling by 2 + tiny latent UNet), random weights."""
    import torch

    from napari_zfdiffusion.core.io import write_json
    from napari_zfdiffusion.core.latent.autoencoder import build_autoencoder
    from napari_zfdiffusion.core.store import weights_sha256
    from napari_zfdiffusion.core.diffusion.unet import build_model
    from napari_zfdiffusion.core.diffusion.sampling import DEFAULT_SCHEDULE
    from napari_zfdiffusion.core.store import save_model

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    channels = ["image", "mask"] if paired else ["image"]
    vae = build_autoencoder(len(channels), "tiny")
    save_model(vae, path / "vae", {"kind": "vae"})
    shape = [4, patch // 2, patch // 2]
    unet = build_model("latent", "tiny", resolution=shape[1], num_classes=0, channels=4)
    save_model(unet, path / "unet", {"kind": "latent-unet", "resolution": shape[1],
                                     "schedule": dict(DEFAULT_SCHEDULE, prediction_type="v_prediction")})
    write_json(path / "model.json", {
        "kind": "latent", "name": path.name, "description": "tiny test model", "channels": channels,
        "mask_encoding": "interior" if paired else None, "scaling_factor": 1.0, "downsampling": 2,
        "latent_channels": 4, "patch_size": patch, "latent_shape": shape,
        "normalisation": {"method": "percentile", "low": 1.0, "high": 99.8, "per": "image"},
        "vae_sha256": weights_sha256(path / "vae"),
    })
    return path


def torchrun_cli(*args: str, procs: int = 2, timeout: int = 300):
    """``zfdiffusion ARGS`` under ``torchrun --standalone --nproc_per_node PROCS`` on the CPU, one thread
    per process; fails the test, with the output, unless it exits 0. Returns the CompletedProcess."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs),
           "-m", "napari_zfdiffusion.cli", "-q", *map(str, args)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def make_tiny_segmenter(path: Path, steps: int = 160, interior: bool = True, inner: str = "center") -> Path:
    """A tiny segmentation U-Net trained for a few seconds on blobs: it finds the bright discs."""
    from napari_zfdiffusion.core.segment.train import UnetConfig, train_unet

    path = Path(path)
    imgs, masks = make_blobs(path.parent / f"{path.name}-data", n=6, shape=(96, 128))
    cfg = UnetConfig(size="tiny", steps=steps, batch_size=8, crop=64, checkpoint_every=steps, tile=64, overlap=16,
                     interior=interior, inner=inner)
    train_unet(imgs, masks, path, cfg, device="cpu", show_progress=False)
    return path


@pytest.fixture(scope="session")
def tiny_segmenter(tmp_path_factory) -> Path:
    return make_tiny_segmenter(tmp_path_factory.mktemp("models") / "tiny-unet")


@pytest.fixture(scope="session")
def tiny_volume(tmp_path_factory) -> Path:
    """A tiny volume model (every stage takes the previous plane): 3 depth classes, 64 and 128 px."""
    return make_tiny_cascade(tmp_path_factory.mktemp("models") / "tiny-volume", stages=("base", "sr128"),
                             continuity=True)


@pytest.fixture(scope="session")
def tiny_latent(tmp_path_factory) -> Path:
    return make_tiny_latent(tmp_path_factory.mktemp("models") / "tiny-latent")


@pytest.fixture(scope="session")
def tiny_paired(tmp_path_factory) -> Path:
    return make_tiny_latent(tmp_path_factory.mktemp("models") / "tiny-paired", paired=True)


@pytest.fixture
def blobs(tmp_path) -> tuple[Path, Path]:
    return make_blobs(tmp_path / "blobs")


@pytest.fixture
def notes():  # for the widget tests (napari imported only when used)
    """Every napari notification shown during the test, as (severity, message)."""
    from napari.utils.notifications import notification_manager

    seen = []

    def record(event):
        n = event if not hasattr(event, "value") else event.value
        seen.append((str(n.severity), n.message))

    notification_manager.notification_ready.connect(record)
    yield seen
    notification_manager.notification_ready.disconnect(record)


def errors(notes):
    return [m for s, m in notes if s == "error"]


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path, monkeypatch):
    """User models and fetched data go to a temporary ZFDIFFUSION_HOME in every test."""
    monkeypatch.setenv("ZFDIFFUSION_HOME", str(tmp_path / "zfhome"))


@pytest.fixture
def full_disk(monkeypatch):
    """Every TIFF write fails as a full disk does, after writing part of the file."""
    import errno

    import tifffile

    def full(path, *a, **k):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tifffile, "imwrite", full)


@pytest.fixture(scope="session")
def tiny_cascade(tmp_path_factory) -> Path:
    return make_tiny_cascade(tmp_path_factory.mktemp("models") / "tiny-cascade")


@pytest.fixture
def stacks(tmp_path) -> Path:
    return make_stacks(tmp_path / "stacks")
