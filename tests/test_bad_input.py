"""Bad input is answered with a UserInputError (CLI: exit code 2, one line naming the problem),
and never leaves a partial output file behind."""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from napari_zfdiffusion import cli
from napari_zfdiffusion.core.cascade import Cascade
from napari_zfdiffusion.core.cascade.data import DepthDataset
from napari_zfdiffusion.core.errors import UserInputError
from napari_zfdiffusion.core.io import check_writable, write_tiff
from napari_zfdiffusion.core.store import WEIGHTS_FILE
from napari_zfdiffusion.core.cascade.train import TrainConfig, train_stage

from conftest import make_stacks


# ----------------------------------------------------------------------------- helpers
def leftovers(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.endswith((".part", ".tmp"))]


def cli_fails(argv: list[str], needle: str, out: Path, capsys) -> str:
    """Run the CLI, expect exit code 2 and one line on stderr naming the problem; no output left."""
    rc = cli.main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("zfdiffusion: error:")
    assert needle.lower() in lines[0].lower(), lines[0]
    assert not out.exists()
    if out.parent.is_dir():
        assert not leftovers(out.parent)
    return lines[0]


def generate(model, out, *extra) -> list[str]:
    return ["-q", "generate", "--model", str(model), "--depth", "0", "--resolution", "64", "--steps", "1",
            "--device", "cpu", "--out", str(out), *extra]


def train_fails(data, out: Path, match: str, **kw) -> None:
    device = kw.pop("device", "cpu")
    cfg = TrainConfig(stage="base", size="tiny", steps=1, batch_size=2, **kw)
    with pytest.raises(UserInputError, match=match):
        train_stage(data, out, cfg, device=device, show_progress=False)
    assert not out.exists()  # nothing written for data that cannot be trained on


@pytest.fixture(scope="module")
def cas(tiny_cascade) -> Cascade:
    return Cascade.load(tiny_cascade, "cpu")


@pytest.fixture
def base_copy(tiny_cascade, tmp_path) -> Path:
    """A one-stage copy of the tiny cascade that a test may break."""
    path = tmp_path / "copy"
    path.mkdir()
    shutil.copy(tiny_cascade / "cascade.json", path / "cascade.json")
    shutil.copytree(tiny_cascade / "base", path / "base")
    return path


# ----------------------------------------------------------------------------- sampling settings
def test_depth_out_of_range(tiny_cascade, tmp_path, capsys, cas):
    out = tmp_path / "o.tif"
    cli_fails(generate(tiny_cascade, out, "--depth", "3"), "depth 3 is out of range", out, capsys)
    cli_fails(generate(tiny_cascade, out, "--depth", "-1"), "out of range", out, capsys)
    for bad in (3, -1, 1.5, True, "1"):
        with pytest.raises(UserInputError, match="depth"):
            cas.generate(bad, resolution=64, steps=1)
    with pytest.raises(UserInputError, match="depth"):
        cas.upsample(np.zeros((64, 64), np.float32), 5, resolution=128, steps=1)


def test_negative_guidance(tiny_cascade, tmp_path, capsys, cas):
    out = tmp_path / "o.tif"
    cli_fails(generate(tiny_cascade, out, "--guidance", "-0.5"), "guidance", out, capsys)
    cli_fails(generate(tiny_cascade, out, "--sr-guidance", "-1"), "super-resolution guidance", out, capsys)
    with pytest.raises(UserInputError, match="guidance"):
        cas.generate(0, guidance=-1.0, resolution=64, steps=1)


def test_nan_guidance(tiny_cascade, tmp_path, capsys, cas):
    out = tmp_path / "o.tif"
    cli_fails(generate(tiny_cascade, out, "--guidance", "nan"), "guidance", out, capsys)
    with pytest.raises(UserInputError, match="guidance"):
        cas.generate(0, guidance=math.nan, resolution=64, steps=1)
    with pytest.raises(UserInputError, match="guidance"):
        cas.upsample(np.zeros((64, 64), np.float32), 0, sr_guidance=math.nan, resolution=128, steps=1)


def test_steps_zero(tiny_cascade, tmp_path, capsys, cas):
    out = tmp_path / "o.tif"
    cli_fails(generate(tiny_cascade, out, "--steps", "0"), "steps", out, capsys)
    cli_fails(generate(tiny_cascade, out, "--sr-steps", "0"), "steps", out, capsys)
    with pytest.raises(UserInputError, match="steps"):
        cas.upsample(np.zeros((64, 64), np.float32), 0, resolution=128, steps=0)


def test_unknown_sampler(tiny_cascade, tmp_path, capsys, cas):
    with pytest.raises(UserInputError, match="unknown sampler 'euler'"):
        cas.generate(0, resolution=64, steps=1, sampler="euler")
    with pytest.raises(UserInputError, match="unknown sampler"):
        cas.upsample(np.zeros((64, 64), np.float32), 0, resolution=128, steps=1, sampler="heun")
    out = tmp_path / "o.tif"
    with pytest.raises(SystemExit) as e:  # argparse refuses it before anything runs
        cli.main(generate(tiny_cascade, out, "--sampler", "euler"))
    assert e.value.code == 2
    assert "--sampler" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("level", [-0.1, 1.5, math.nan])
def test_noise_aug_out_of_range(cas, level):
    with pytest.raises(UserInputError, match="noise augmentation"):
        cas.generate(0, resolution=128, steps=1, noise_aug=level)


# ----------------------------------------------------------------------------- images to upsample
@pytest.mark.parametrize("shape", [(1, 1, 64, 64), (2, 3, 64, 64, 1), (64,)])
def test_non_2d_image_to_upsample(cas, shape):
    with pytest.raises(UserInputError, match="2D image"):
        cas.upsample(np.zeros(shape, np.float32), 0, resolution=128, steps=1)


def test_rgb_image_to_upsample(cas, tiny_cascade, tmp_path, capsys):
    with pytest.raises(UserInputError, match="RGB"):
        cas.upsample(np.zeros((64, 64, 3), np.uint8), 0, resolution=128, steps=1)
    png = tmp_path / "rgb.png"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(png)
    out = tmp_path / "o.tif"
    cli_fails(["-q", "upsample", str(png), "--model", str(tiny_cascade), "--depth", "0", "--resolution", "128",
               "--steps", "1", "--device", "cpu", "--out", str(out)], "RGB", out, capsys)


def test_non_square_image_to_upsample(cas, tiny_cascade, tmp_path, capsys):
    with pytest.raises(UserInputError, match="square"):
        cas.upsample(np.zeros((64, 96), np.float32), 0, resolution=128, steps=1)
    tif = tmp_path / "wide.tif"
    tifffile.imwrite(tif, np.zeros((64, 80), np.uint16))
    out = tmp_path / "o.tif"
    cli_fails(["-q", "upsample", str(tif), "--model", str(tiny_cascade), "--depth", "0", "--resolution", "128",
               "--steps", "1", "--device", "cpu", "--out", str(out)], "64x80", out, capsys)


def test_nan_image_to_upsample(cas):
    img = np.zeros((64, 64), np.float32)
    img[3, 4] = np.nan
    for normalise in (True, False):
        with pytest.raises(UserInputError, match="NaN"):
            cas.upsample(img, 0, resolution=128, steps=1, normalise=normalise)


# ----------------------------------------------------------------------------- training data
def test_nan_in_a_training_stack(tmp_path, capsys):
    data = tmp_path / "data"
    make_stacks(data, n=2, dtype=np.float32)
    stack = tifffile.imread(data / "specimen_01.tif")
    stack[1, 2, 3] = np.nan
    tifffile.imwrite(data / "specimen_01.tif", stack)
    train_fails(data, tmp_path / "m", "specimen_01.tif holds 1 NaN")
    out = tmp_path / "m2"
    cli_fails(["-q", "train", "cascade", "--data", str(data), "--out", str(out), "--size", "tiny", "--steps", "1",
               "--device", "cpu"], "NaN", out, capsys)


@pytest.mark.parametrize("shape, match", [
    ((2, 4, 40, 48), "4 dimensions"),           # e.g. T, Z, Y, X
    ((2, 4, 2, 40, 48), "5 dimensions"),        # e.g. T, Z, C, Y, X
    ((4, 40, 48, 3), "RGB"),                    # an RGB stack
    ((40, 48, 3), "RGB"),                       # an RGB image
])
def test_wrong_dimensions_given_to_training(tmp_path, shape, match):
    data = tmp_path / "data"
    make_stacks(data, n=1)
    tifffile.imwrite(data / "odd.tif", np.zeros(shape, np.uint8))
    train_fails(data, tmp_path / "m", match)
    with pytest.raises(UserInputError, match="odd.tif"):
        DepthDataset.from_paths(data)


def test_2d_file_given_to_training(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    tifffile.imwrite(data / "plane.tif", np.zeros((40, 48), np.uint16))
    train_fails(data, tmp_path / "m", "single 2D plane")
    train_fails(data / "plane.tif", tmp_path / "m", "plane.tif")


def test_empty_folder(tmp_path, capsys):
    data = tmp_path / "empty"
    data.mkdir()
    (data / "notes.txt").write_text("not an image")
    train_fails(data, tmp_path / "m", "no .tif")
    out = tmp_path / "m2"
    cli_fails(["-q", "train", "cascade", "--data", str(data), "--out", str(out), "--size", "tiny", "--steps", "1",
               "--device", "cpu"], "no .tif", out, capsys)


def test_missing_data_folder(tmp_path):
    train_fails(tmp_path / "nowhere", tmp_path / "m", "does not exist")


def test_stacks_with_different_z(tmp_path):
    data = tmp_path / "data"
    make_stacks(data, n=2, z=4)
    tifffile.imwrite(data / "short.tif", np.ones((3, 40, 48), np.uint16))
    train_fails(data, tmp_path / "m", "different numbers of planes")


def test_corrupted_training_file(tmp_path):
    data = tmp_path / "data"
    make_stacks(data, n=1)
    (data / "broken.tif").write_bytes(b"II*\x00garbage")
    train_fails(data, tmp_path / "m", "could not read")


def test_planes_too_small(tmp_path):
    data = tmp_path / "data"
    make_stacks(data, n=1, shape=(8, 8))
    train_fails(data, tmp_path / "m", "too small")


# ----------------------------------------------------------------------------- model folders
def test_missing_model_folder(tmp_path, capsys):
    out = tmp_path / "o.tif"
    cli_fails(generate(tmp_path / "no-such-model", out), "no model folder or known model", out, capsys)
    with pytest.raises(UserInputError, match="no-such"):
        Cascade.load("no-such-model-name")


def test_folder_that_is_not_a_model(tmp_path, capsys):
    (tmp_path / "empty-model").mkdir()
    out = tmp_path / "o.tif"
    cli_fails(generate(tmp_path / "empty-model", out), "not a cascade model folder", out, capsys)


def test_model_folder_missing_its_weights(base_copy, tmp_path, capsys):
    (base_copy / "base" / WEIGHTS_FILE).unlink()
    out = tmp_path / "o.tif"
    cli_fails(generate(base_copy, out), f"missing {WEIGHTS_FILE}", out, capsys)
    with pytest.raises(UserInputError, match="missing"):
        Cascade.load(base_copy, "cpu").generate(0, resolution=64, steps=1)


def test_corrupted_safetensors(base_copy, tmp_path, capsys):
    w = base_copy / "base" / WEIGHTS_FILE
    data = w.read_bytes()
    w.write_bytes(data[: len(data) // 2])  # truncated, as by an interrupted copy
    out = tmp_path / "o.tif"
    cli_fails(generate(base_copy, out), "could not be loaded", out, capsys)
    w.write_bytes(b"\x00" * 64)  # not safetensors at all
    with pytest.raises(UserInputError, match="corrupted"):
        Cascade.load(base_copy, "cpu").generate(0, resolution=64, steps=1)


def test_weights_that_do_not_match_the_config(base_copy):
    cfg = base_copy / "base" / "config.json"
    cfg.write_text(cfg.read_text().replace('"num_classes": 3', '"num_classes": 5'))
    with pytest.raises(UserInputError, match="could not be loaded"):
        Cascade.load(base_copy, "cpu").generate(0, resolution=64, steps=1)


@pytest.mark.parametrize("text", ["{not json", "", "[1, 2]", "\xff\xfe"])
def test_corrupted_cascade_json(base_copy, tmp_path, capsys, text):
    (base_copy / "cascade.json").write_text(text, encoding="latin-1")
    with pytest.raises(UserInputError, match="corrupted"):
        Cascade.load(base_copy, "cpu")
    out = tmp_path / "o.tif"
    cli_fails(generate(base_copy, out), "cascade.json", out, capsys)


def test_corrupted_stage_json(base_copy):
    (base_copy / "base" / "stage.json").write_text("{")
    with pytest.raises(UserInputError, match="stage.json"):
        Cascade.load(base_copy, "cpu")


# ----------------------------------------------------------------------------- devices
@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_where_there_is_none(tiny_cascade, stacks, tmp_path, capsys):
    out = tmp_path / "o.tif"
    cli_fails(generate(tiny_cascade, out, "--device", "cuda"), "CUDA", out, capsys)
    with pytest.raises(UserInputError, match="--device cpu"):
        Cascade.load(tiny_cascade, "cuda:1")
    train_fails(stacks, tmp_path / "m", "CUDA", device="cuda")


def test_unknown_device(tiny_cascade):
    with pytest.raises(UserInputError, match="unknown device"):
        Cascade.load(tiny_cascade, "tpu")


# ----------------------------------------------------------------------------- output paths
def test_output_under_a_regular_file(tiny_cascade, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("I am a file")
    for out in (blocker / "o.tif", blocker / "sub" / "o.tif"):
        cli_fails(generate(tiny_cascade, out), str(blocker), out, capsys)
        with pytest.raises(UserInputError):
            write_tiff(out, np.zeros((2, 2), np.float32))
    assert blocker.read_text() == "I am a file"
    assert not leftovers(tmp_path)


def test_output_is_a_folder(tiny_cascade, tmp_path, capsys):
    folder = tmp_path / "a-folder"
    folder.mkdir()
    rc = cli.main(generate(tiny_cascade, folder))
    assert rc == 2 and "is a folder" in capsys.readouterr().err
    assert list(folder.iterdir()) == []


def test_preview_under_a_regular_file(tiny_cascade, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    out = tmp_path / "o.tif"
    cli_fails(generate(tiny_cascade, out, "--preview", str(blocker / "p.png")), str(blocker), out, capsys)
    assert not (blocker.parent / "p.png").exists()


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root can write into read-only folders")
def test_output_in_a_read_only_folder(tiny_cascade, tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        out = ro / "o.tif"
        cli_fails(generate(tiny_cascade, out), "permission", out, capsys)
        with pytest.raises(UserInputError):
            check_writable(out)
    finally:
        ro.chmod(0o755)


def test_training_output_under_a_regular_file(stacks, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    for out in (blocker, blocker / "model"):
        cli_fails(["-q", "train", "cascade", "--data", str(stacks), "--out", str(out), "--size", "tiny",
                   "--steps", "1", "--device", "cpu"], "cannot create the model folder", blocker / "model", capsys)
    assert blocker.read_text() == "x"
