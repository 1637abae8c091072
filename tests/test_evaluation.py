"""Smoke tests of the evaluation commands (napari_zfdiffusion.evaluation): each runs end to end on tiny
random models and synthetic data in a temporary folder (never fetched data), with the smallest settings,
and writes its results and figures under --out."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import make_blobs, make_tiny_cascade, make_tiny_latent

pytest.importorskip("matplotlib")

DOCS_RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results"


def numbers(obj):
    """Every number in a nested JSON value."""
    if isinstance(obj, bool):
        return
    if isinstance(obj, (int, float)):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from numbers(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from numbers(v)


def check_json(path: Path, keys, finite=None) -> dict:
    """The JSON at ``path``: it exists, holds ``keys`` at the top level, and the numbers under ``finite``
    (default: all of ``keys``) are finite."""
    assert path.is_file() and path.stat().st_size > 0, path
    data = json.loads(path.read_text())
    missing = set(keys) - set(data)
    assert not missing, f"{path.name} lacks {missing}"
    for k in keys if finite is None else finite:
        vals = list(numbers(data[k]))
        bad = [v for v in vals if not math.isfinite(v)]
        assert not bad, f"{path.name}: non-finite numbers under {k!r}"
    return data


def check_files(*paths: Path) -> None:
    for p in paths:
        assert p.is_file() and p.stat().st_size > 0, p
        if p.suffix == ".png":
            assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", p


@pytest.fixture(scope="module")
def cho(tmp_path_factory) -> Path:
    """Like the fetched CHO data: train/cho_t00..15.tif and test/cho_t16..19.tif, (3, Y, X) stacks whose
    planes get dimmer with depth."""
    import tifffile

    root = tmp_path_factory.mktemp("cho")
    rng = np.random.default_rng(0)
    for t in range(20):
        folder = root / ("test" if t >= 16 else "train")
        folder.mkdir(exist_ok=True)
        stack = rng.random((3, 44, 52)) * np.array([1.0, 0.6, 0.3])[:, None, None]
        tifffile.imwrite(folder / f"cho_t{t:02d}.tif", (stack * 255).astype(np.uint8))
    return root


@pytest.fixture(scope="module")
def cascade_model(tmp_path_factory) -> Path:
    return make_tiny_cascade(tmp_path_factory.mktemp("models") / "tiny-cascade", stages=("base", "sr128"))


def test_cascade(cho, cascade_model, tmp_path):
    from napari_zfdiffusion.evaluation import cascade

    out = tmp_path / "out"
    assert cascade.main(["--model", str(cascade_model), "--data", str(cho), "--out", str(out), "--n-per-cell", "1",
                         "--guidance", "1", "--steps", "1", "--sr-steps", "1", "--clf-iters", "3", "--batch", "1",
                         "--threads", "1", "--tag", "_t"]) == 0
    r = check_json(out / "results" / "cascade_eval_t.json",
                   ["model", "settings", "data", "classifier", "accuracy", "memorisation", "timings_s", "figures"],
                   finite=["accuracy", "memorisation", "timings_s"])
    assert r["command"].startswith("python -m napari_zfdiffusion.evaluation.cascade ")
    assert r["accuracy"]["generated"].keys() == {"1"}
    assert r["memorisation"]["generated"]["1"]["pixel"]["n"] == 3
    names = ["grid_depth_guidance_t.png", "confusion_t.png", "nn_hist_t.png", "nn_pairs_t.png", "stages_t.jpg"]
    assert r["figures"] == sorted(f"images/cascade_{n}" for n in names)
    check_files(out / "results" / "cascade_eval_t.md", *(out / "images" / f"cascade_{n}" for n in names))


def test_volume(cho, tmp_path):
    from napari_zfdiffusion.evaluation import volume

    model = make_tiny_cascade(tmp_path / "tiny-volume", stages=("base",), continuity=True)
    out = tmp_path / "out"
    assert volume.main(["--model", str(model), "--data", str(cho), "--out", str(out), "--resolution", "64",
                        "--n-volumes", "1", "--continuity", "1", "--steps", "1", "--sr-steps", "1",
                        "--clf-iters", "3", "--threads", "1"]) == 0
    r = check_json(out / "results" / "volume_eval.json", ["model", "settings", "classifier", "sets"],
                   finite=["sets"])
    assert len(r["sets"]) == 4  # real held out, real training, baseline, continuity 1
    for s in r["sets"].values():
        assert -1 <= s["neighbour_correlation"]["mean"] <= 1
    check_files(out / "results" / "volume_eval.md", out / "images" / "volume_xz.png",
                out / "images" / "volume_planes.jpg")


def test_em(tiny_paired, tmp_path):
    from napari_zfdiffusion.evaluation import em

    imgs, masks = make_blobs(tmp_path / "data", n=5, shape=(80, 96))
    out = tmp_path / "out"
    assert em.main(["--model", str(tiny_paired), "--images", str(imgs), "--masks", str(masks), "--out", str(out),
                    "--n", "2", "--steps", "1", "--batch", "2", "--nn-ref", "40", "--ncc-heldout", "4",
                    "--val-limit", "4", "--threads", "1"]) == 0
    name = tiny_paired.name
    r = check_json(out / "results" / f"em_eval_{name}.json",
                   ["model", "settings", "data", "reconstruction", "memorisation", "statistics", "masks",
                    "timings_s", "figures"],
                   finite=["memorisation", "timings_s"])
    for k in ("mse", "psnr", "ssim", "mask_dice"):
        assert math.isfinite(r["reconstruction"][k])
    assert r["masks"]["generated"]["patches"] == 2
    figs = [out / "images" / f"em_{name}_{w}" for w in ("samples.jpg", "nn_hist.png", "nn_pairs.jpg", "stats.png",
                                                        "masks.jpg")]
    assert r["figures"] == [str(p) for p in figs]  # outside the working directory: absolute
    check_files(*figs)


def test_seg(tiny_segmenter, tmp_path):
    import tifffile

    from napari_zfdiffusion.evaluation import seg

    data = tmp_path / "data"
    imgs, masks = make_blobs(tmp_path / "hela", n=20, shape=(96, 128), name="frame", seed=1)
    (data / "hela").mkdir(parents=True)
    tifffile.imwrite(data / seg.HELA_IMAGES, np.stack([tifffile.imread(f) for f in sorted(imgs.iterdir())]))
    tifffile.imwrite(data / seg.HELA_MASKS, np.stack([tifffile.imread(f) for f in sorted(masks.iterdir())]))
    imgs, masks = make_blobs(tmp_path / "dsb", n=1, shape=(112, 112), seed=2)
    (data / "nuclei2d").mkdir()
    shutil.copy(next(imgs.iterdir()), data / seg.DSB_IMAGE)
    shutil.copy(next(masks.iterdir()), data / seg.DSB_MASK)
    run = tmp_path / "run"
    shutil.copytree(tiny_segmenter, run / "real")
    imgs, masks = make_blobs(tmp_path / "gen", n=6, shape=(64, 64), dtype=np.float32, seed=3)
    (run / "gen").mkdir()
    tifffile.imwrite(run / "gen" / "images.tif", np.stack([tifffile.imread(f) for f in sorted(imgs.iterdir())]))
    tifffile.imwrite(run / "gen" / "labels.tif", np.stack([tifffile.imread(f) for f in sorted(masks.iterdir())]))

    out = tmp_path / "out"
    assert seg.main(["--run", str(run), "--models", "real", "synth", "--data", str(data), "--out", str(out),
                     "--threads", "1", "--tag", "_t"]) == 0
    r = check_json(out / "results" / "seg_eval_t.json",
                   ["sets", "models", "data", "baseline", "generated_vs_own_masks", "tiling_vs_whole"])
    assert set(r["sets"]) == {"hela_test", "dsb_manual"}
    assert set(r["sets"]["hela_test"]) == {"Otsu + watershed", "U-Net real", "U-Net real, no interior"}
    assert set(r["models"]) == {"real"}  # no synth/ in the run folder: skipped
    check_files(out / "results" / "seg_eval_t.md",
                *(out / "images" / f"seg_{n}_t.png" for n in ("hela_test", "dsb_manual", "generated_pairs")))


def test_sampler_failure(cascade_model, tmp_path):
    from napari_zfdiffusion.evaluation import sampler_failure

    out = tmp_path / "out"
    assert sampler_failure.main(["--model", str(cascade_model), "--n", "2", "--samplers", "ddim:1,dpmsolver++:1",
                                 "--threads", "1", "--out", str(out)]) == 0
    r = check_json(out / "results" / "sampler_failure.json",
                   ["model", "depth", "guidance", "seed", "threshold", "rows"])
    assert [(row["sampler"], row["n"], len(row["means"])) for row in r["rows"]] == [("ddim", 2, 2),
                                                                                    ("dpmsolver++", 2, 2)]


def test_cards(tiny_segmenter, tmp_path):
    """The three card writers, on tiny model folders, with the published results in docs/results."""
    from napari_zfdiffusion.evaluation import cards

    if not (DOCS_RESULTS / "cascade_eval.json").is_file():
        pytest.skip("no docs/results in this checkout")
    common = ["--results", str(DOCS_RESULTS)]
    casc = make_tiny_cascade(tmp_path / "casc", stages=("base", "sr128"), continuity=True)
    assert cards.main(["cascade", str(casc), "--name", "my-cascade", *common]) == 0
    card = json.loads((casc / "cascade.json").read_text())
    assert card["name"] == "my-cascade" and card["quality"]["real_heldout_accuracy"] > 0
    assert "volume_neighbour_correlation" in card["quality"]  # a volume model: volume_eval.json counts

    patch = make_tiny_latent(tmp_path / "patch", paired=True)
    assert cards.main(["patch", str(patch), "--eval", str(DOCS_RESULTS / "em_eval_nuclei-ldm-demo.json"),
                       *common]) == 0
    assert json.loads((patch / "model.json").read_text())["quality"]["objects_per_patch"]["generated"] > 0

    segm = shutil.copytree(tiny_segmenter, tmp_path / "seg")
    assert cards.main(["seg", str(segm), "--name", "my-unet", *common]) == 0
    assert set(json.loads((segm / "model.json").read_text())["quality"]) == {"hela_test", "dsb_manual"}
    for folder, title in ((casc, "# Model card: my-cascade"), (patch, "# patch"), (segm, "# my-unet")):
        text = (folder / "MODEL_CARD.md").read_text()
        assert text.startswith(title) and "scripts/evaluate" not in text


def test_figures_need_the_eval_extra(monkeypatch):
    from napari_zfdiffusion.core.errors import UserInputError
    from napari_zfdiffusion.evaluation import _common

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    with pytest.raises(UserInputError, match=r"napari-zfdiffusion\[eval\]"):
        _common.plt()


def test_imports_no_gui_and_no_matplotlib():
    """The evaluation modules import only the core: no napari or Qt, and matplotlib only when drawing."""
    code = ("import sys, napari_zfdiffusion.evaluation as e; "
            "[__import__(f'napari_zfdiffusion.evaluation.{m}') for m in "
            "('cascade', 'volume', 'em', 'seg', 'sampler_failure', 'cards')]; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('PyQt5', 'PyQt6', 'PySide2', 'PySide6', "
            "'qtpy', 'napari', 'magicgui', 'superqt', 'vispy', 'matplotlib') "
            "or m.startswith(('napari_zfdiffusion.widgets', 'napari_zfdiffusion.cli'))); "
            "assert not bad, bad")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
