"""Malformed and hostile model folders are refused in milliseconds, with a message naming the field,
before any network is built (issue 13, part 3)."""

from __future__ import annotations

import json
import shutil
import time

import pytest

from napari_zfdiffusion import cli
from napari_zfdiffusion.core.cascade import Cascade
from napari_zfdiffusion.core.errors import UserInputError
from napari_zfdiffusion.core.latent import LatentModel
from napari_zfdiffusion.core.segment import Segmenter

from conftest import make_tiny_cascade, make_tiny_latent


def edit_json(path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return make_tiny_cascade(root / "cas", stages=("base",)), make_tiny_latent(root / "lat")


@pytest.mark.parametrize("where, changes, match", [
    ("base/config.json", {"layers_per_block": 200_000}, "'layers_per_block' is 200000"),
    ("base/config.json", {"block_out_channels": [16] * 40}, "at most 16 entries"),
    ("base/config.json", {"block_out_channels": [16, 10**9]}, "between 1 and 8192"),
    ("base/config.json", {"num_classes": "five"}, "'num_classes' must be a whole number"),
    ("base/config.json", {"sample_size": -3}, "'sample_size' is -3"),
    ("cascade.json", {"depth_classes": "0-4"}, "'depth_classes' must be a list of objects"),
    ("cascade.json", {"z_step_um": "2 um"}, "'z_step_um' must be a number"),
    ("cascade.json", {"normalisation": {"low": "1%"}}, "'normalisation.low' must be a number"),
    ("base/stage.json", {"resolution": "64"}, "'resolution' must be a whole number"),
    ("base/stage.json", {"prev_channels": 1.5}, "'prev_channels' must be a whole number"),
])
def test_bad_cascade_folders(folders, tmp_path, where, changes, match):
    folder = shutil.copytree(folders[0], tmp_path / "m")
    edit_json(folder / where, **changes)
    t = time.perf_counter()
    with pytest.raises(UserInputError, match=match):
        Cascade.load(folder, "cpu").generate(0, resolution=64, steps=1)
    assert time.perf_counter() - t < 5  # refused, not built (200,000 blocks would take minutes and GBs)


@pytest.mark.parametrize("changes, match", [
    ({"scaling_factor": "high"}, "'scaling_factor' must be a number"),
    ({"patch_size": 32.5}, "'patch_size' must be a whole number"),
    ({"latent_shape": [4, "16", 16]}, "'latent_shape' must be a list of whole numbers"),
    ({"channels": "image"}, "'channels' must be a list of text"),
    ({"scaling_factor": None}, "'scaling_factor' must be a number"),
])
def test_bad_latent_cards(folders, tmp_path, changes, match):
    folder = shutil.copytree(folders[1], tmp_path / "m")
    edit_json(folder / "model.json", **changes)
    with pytest.raises(UserInputError, match=match):
        LatentModel.load(folder, "cpu")


def test_bad_segmentation_card_and_config(tiny_segmenter, tmp_path):
    folder = shutil.copytree(tiny_segmenter, tmp_path / "m")
    edit_json(folder / "model.json", tile="256")
    with pytest.raises(UserInputError, match="'tile' must be a whole number"):
        Segmenter.load(folder, "cpu")
    edit_json(folder / "model.json", tile=256)
    edit_json(folder / "unet" / "config.json", blocks=100_000)
    with pytest.raises(UserInputError, match="'blocks' is 100000"):
        Segmenter.load(folder, "cpu")


def test_the_cli_answers_in_one_line(folders, tmp_path, capsys):
    folder = shutil.copytree(folders[1], tmp_path / "m")
    edit_json(folder / "model.json", scaling_factor="high")
    assert cli.main(["-q", "em", "generate", "--model", str(folder), "--out", str(tmp_path / "o.tif"),
                     "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "scaling_factor" in err and not (tmp_path / "o.tif").exists()
