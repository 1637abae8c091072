"""evaluation/time_to_quality.py: the held-out split, training in increments with exact resume, the
results file and plot, and the errors for stacks it cannot measure. Tiny synthetic stacks, --size tiny,
a few steps."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from safetensors.torch import load_file

from conftest import make_stacks
from napari_zfdiffusion.core.errors import UserInputError
from napari_zfdiffusion.core.reader import open_image
from napari_zfdiffusion.core.store import WEIGHTS_FILE

pytest.importorskip("matplotlib")

ttq = pytest.importorskip("napari_zfdiffusion.evaluation.time_to_quality")

STEPS = (2, 5)
TINY = ["--size", "tiny", "--batch-size", "2", "--warmup", "2", "--depth-classes", "2"]
FAST = ["--n-per-class", "2", "--sample-steps", "2", "--clf-iters", "5", "--threads", "1"]


def marked_stack(path: Path, z: int = 4, shape=(40, 48), mark: int = 60000) -> np.ndarray:
    """A (Z, Y, X) uint16 OME-TIFF with a 2 um z-step whose bottom-right quarter alone holds ``mark``."""
    rng = np.random.default_rng(1)
    arr = rng.integers(0, 1000, (z, *shape)).astype(np.uint16)
    arr[:, shape[0] // 2:, shape[1] // 2:] = mark
    tifffile.imwrite(path, arr, ome=True, metadata={"axes": "ZYX", "PhysicalSizeZ": 2.0, "PhysicalSizeX": 0.5,
                                                    "PhysicalSizeY": 0.5})
    return arr


def test_the_held_out_quarter_is_not_in_the_training_copy(tmp_path):
    (tmp_path / "in").mkdir()
    arr = marked_stack(tmp_path / "in" / "a.ome.tif")
    info = ttq.split_holdout(ttq.read_inputs(tmp_path / "in"), tmp_path / "out")
    train = sorted((tmp_path / "out" / "train_data").glob("*.tif"))
    held = sorted((tmp_path / "out" / "heldout_data").glob("*.tif"))
    assert len(train) == 3 and len(held) == 1 and info["holdout"] == "xy"
    for f in train:
        t = tifffile.imread(f)
        assert t.shape == (4, 20, 24) and not (t == 60000).any()
        assert open_image(f).pixel_um == {"Z": 2.0, "Y": 0.5, "X": 0.5}  # the z-step and pixel size kept
    assert np.array_equal(tifffile.imread(held[0]), arr[:, 20:, 24:])
    # together the four quarters are the whole field
    parts = {f.name.split("_")[-1].split(".")[0]: tifffile.imread(f) for f in train + held}
    whole = np.block([[parts["tl"], parts["tr"]], [parts["bl"], parts["br"]]])
    assert np.array_equal(whole, arr)


def test_time_holdout_keeps_the_last_fifth_of_the_time_points(tmp_path):
    movie = np.stack([np.full((3, 32, 32), t, np.uint8) for t in range(10)])  # (T, Z, Y, X)
    tifffile.imwrite(tmp_path / "movie.tif", movie)
    info = ttq.split_holdout(ttq.read_inputs(tmp_path / "movie.tif", axes="TZYX"), tmp_path / "out", "time")
    held = [int(tifffile.imread(f).max()) for f in sorted((tmp_path / "out" / "heldout_data").glob("*.tif"))]
    train = [int(tifffile.imread(f).max()) for f in sorted((tmp_path / "out" / "train_data").glob("*.tif"))]
    assert held == [8, 9] and train == list(range(8)) and len(info["heldout_specimens"]) == 2


@pytest.fixture(scope="module")
def measured(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ttq")
    stacks = make_stacks(root / "stacks", n=2, z=4, shape=(64, 72))
    out = root / "out"
    assert ttq.main(["--data", str(stacks), "--out", str(out), "--at-steps", ",".join(map(str, STEPS)),
                     "--label", "tiny run", *TINY, *FAST]) == 0
    return out


def test_increments_resume_exactly(measured, tmp_path):
    from napari_zfdiffusion import cli

    straight = tmp_path / "straight"  # one uninterrupted run of the same steps, on the same training copy
    assert cli.main(["-q", "train", "cascade", "--stage", "base", "--data", str(measured / "train_data"),
                     "--out", str(straight), "--steps", str(STEPS[-1]), "--device", "cpu", *TINY]) == 0
    a, b = load_file(str(straight / "base" / WEIGHTS_FILE)), load_file(str(measured / "run" / "base" / WEIGHTS_FILE))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sa = torch.load(straight / "training" / "base" / "state.pt", weights_only=True)
    sb = torch.load(measured / "run" / "training" / "base" / "state.pt", weights_only=True)
    assert int(sa["step"]) == int(sb["step"]) == STEPS[-1]
    assert all(torch.equal(sa["model"][k], sb["model"][k]) for k in sa["model"])


def test_one_record_per_checkpoint_with_minutes_increasing(measured, tmp_path):
    r = json.loads((measured / ttq.RESULT).read_text())
    cps = r["checkpoints"]
    assert [c["steps"] for c in cps] == list(STEPS)
    minutes = [c["minutes"] for c in cps]
    assert all(m > 0 for m in minutes) and minutes == sorted(set(minutes))
    for c in cps:
        assert 0 <= c["accuracy"] <= 1 and c["real_heldout_accuracy"] == r["real_heldout"]["accuracy"]
        assert c["nn_ratio"] > 0 and np.isfinite(c["nn_ratio"])
        assert c["accuracy_ratio"] == pytest.approx(c["accuracy"] / c["real_heldout_accuracy"], abs=1e-3)
    assert r["settings"]["training"]["size"] == "tiny" and r["settings"]["training"]["depth_classes"] == 2
    assert r["machine"]["torch_threads"] == 1 and r["data"]["train_stacks"] == 6
    assert (measured / ttq.FIGURE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # finished runs plotted together
    to = tmp_path / "docs" / "both.png"
    assert ttq.main(["--plot", str(measured), str(measured / ttq.RESULT), "--to", str(to)]) == 0
    assert to.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the run is not overwritten by mistake
    with pytest.raises(UserInputError, match="--resume"):
        ttq.main(["--data", r["data"]["inputs"][0], "--out", str(measured), "--at-steps", "9", *TINY, *FAST])


def test_stacks_it_cannot_measure_are_refused_clearly(tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    tifffile.imwrite(flat / "plane.tif", np.zeros((40, 48), np.uint16))
    with pytest.raises(UserInputError, match="single 2D plane"):
        ttq.main(["--data", str(flat), "--out", str(tmp_path / "o1"), *FAST])
    one = tmp_path / "one"
    one.mkdir()
    tifffile.imwrite(one / "z1.ome.tif", np.zeros((1, 40, 48), np.uint16), ome=True, metadata={"axes": "ZYX"})
    with pytest.raises(UserInputError, match="single 2D plane"):  # a one-plane stack is a 2D image
        ttq.main(["--data", str(one), "--out", str(tmp_path / "o2"), *FAST])
    few = make_stacks(tmp_path / "few", n=2, z=3)
    with pytest.raises(UserInputError, match="fewer than --depth-classes 6"):
        ttq.main(["--data", str(few), "--out", str(tmp_path / "o3"), "--depth-classes", "6", *FAST])
    with pytest.raises(UserInputError, match="does not exist"):
        ttq.main(["--data", str(tmp_path / "missing.tif"), "--out", str(tmp_path / "o4"), *FAST])
    assert not (tmp_path / "o3").exists()  # refused before anything was written
