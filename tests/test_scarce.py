"""The scarce-data experiment's tool (issue 14): frame choice, preparation, the paired statistics and
the report, on blobs and tiny models (the experiment itself is scripts/scarce_data.sh)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import tifffile

from napari_zfdiffusion.core.errors import UserInputError
from napari_zfdiffusion.evaluation import scarce

from conftest import make_blobs


def test_frames_are_evenly_spaced_in_the_training_frames():
    assert scarce.frames_for(1) == [0]
    assert scarce.frames_for(2) == [0, 8]
    assert scarce.frames_for(4) == [0, 4, 8, 12]
    assert max(scarce.frames_for(16)) == 15  # never a test frame (16-19)
    for k in (0, 17):
        with pytest.raises(UserInputError, match="K must be"):
            scarce.frames_for(k)


def test_paired_difference_pairs_by_seed():
    real = {0: {"f1": 0.5}, 1: {"f1": 0.6}, 2: {"f1": 0.7}}
    mixed = {0: {"f1": 0.6}, 1: {"f1": 0.5}, 3: {"f1": 0.9}}  # seed 3 has no partner, seed 2 neither
    d = scarce.paired_difference(real, mixed, "f1")
    assert d["seeds"] == [0, 1] and d["differences"] == pytest.approx([0.1, -0.1])
    assert d["mean"] == pytest.approx(0.0) and d["positive"] == 1 and d["n"] == 2
    s = scarce.summary([0.2, 0.4, float("nan"), None])
    assert s["n"] == 2 and s["mean"] == pytest.approx(0.3) and s["std"] == pytest.approx(np.sqrt(0.02))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A stand-in for the fetched data: 20 'HeLa' frames of blobs with labels, and one 'DSB' image."""
    root = tmp_path_factory.mktemp("data")
    imgs, masks = make_blobs(root / "blobs", n=21, shape=(96, 128), dtype=np.uint16)
    frames = sorted(imgs.glob("*.tif"))
    (root / "hela").mkdir()
    tifffile.imwrite(root / "hela" / "Fluo_Hela_02_img.tif", np.stack([tifffile.imread(f) for f in frames[:20]]))
    tifffile.imwrite(root / "hela" / "Fluo_Hela_02_ERR_SEG.tif",
                     np.stack([tifffile.imread(masks / f.name) for f in frames[:20]]))
    (root / "nuclei2d").mkdir()
    shutil.copy(frames[20], root / "nuclei2d" / "img2d.tif")
    shutil.copy(masks / frames[20].name, root / "nuclei2d" / "mask2d.tif")
    return root


def test_prepare_writes_the_k_frames_and_says_which(data, tmp_path):
    scarce.main(["--prepare", "--run", str(tmp_path / "run"), "--ks", "1", "4", "--data", str(data)])
    hela = tifffile.imread(data / "hela" / "Fluo_Hela_02_img.tif")
    for k, frames in ((1, [0]), (4, [0, 4, 8, 12])):
        d = tmp_path / "run" / f"k{k}"
        assert json.loads((d / "frames.json").read_text())["frames"] == frames
        written = sorted((d / "real" / "images").glob("*.tif"))
        assert [p.name for p in written] == [f"frame{f:02d}.tif" for f in frames]
        assert np.array_equal(tifffile.imread(written[-1]), hela[frames[-1]])
        assert sorted(p.name for p in (d / "real" / "masks").glob("*.tif")) == [p.name for p in written]


def test_scoring_reports_arms_paired_differences_and_the_generated_pairs(data, tmp_path, tiny_segmenter):
    run = tmp_path / "run"
    scarce.prepare(run, [1, 2], data)
    # the same network in every arm and seed: the differences must be exactly 0
    for name in ("k1/real_s0", "k1/real_s1", "k1/mixed_s0", "k1/mixed_s1", "k2/real_s0"):
        shutil.copytree(tiny_segmenter, run / name)
    gen_imgs, gen_masks = make_blobs(tmp_path / "gen", n=3, shape=(64, 64), dtype=np.uint16)
    (run / "k1" / "gen").mkdir()
    tifffile.imwrite(run / "k1" / "gen" / "images.tif", np.stack([tifffile.imread(p) for p in sorted(gen_imgs.glob("*.tif"))]))
    tifffile.imwrite(run / "k1" / "gen" / "labels.tif",
                     np.stack([tifffile.imread(gen_masks / p.name) for p in sorted(gen_imgs.glob("*.tif"))]))
    # the generator's cards, as train vae and train ldm write them
    (run / "k1" / "vae").mkdir()
    (run / "k1" / "vae" / "model.json").write_text(json.dumps(
        {"steps": 7, "validation": {"psnr": 21.5, "ssim": 0.5, "mask_dice": 0.9, "edge_minus_centre_shift": -0.01}}))
    (run / "k1" / "ldm" / "unet").mkdir(parents=True)
    (run / "k1" / "ldm" / "unet" / "stage.json").write_text(json.dumps(
        {"training": {"steps_done": 9, "size": "compact", "train_seconds": 3.0}}))
    out = tmp_path / "out"
    assert scarce.main(["--run", str(run), "--out", str(out), "--judge", str(tiny_segmenter), "--data", str(data)]) == 0

    r = json.loads((out / "results" / "scarce_data.json").read_text())
    k1, k2 = r["k"]["1"], r["k"]["2"]
    assert set(k1["arms"]) == {"real", "mixed"} and set(k2["arms"]) == {"real"}
    assert r["tests"]["hela_heldout"]["images"] == 4 and r["tests"]["dsb_unseen"]["images"] == 1
    f1 = k1["arms"]["real"]["hela_heldout"]["f1"]
    assert f1["n"] == 2 and 0 < f1["mean"] <= 1 and f1["std"] == 0  # a trained tiny U-Net finds the blobs
    diff = k1["mixed_minus_real"]["hela_heldout"]["f1"]
    assert diff["differences"] == [0, 0] and diff["positive"] == 0
    assert "mixed_minus_real" not in k2  # one arm only: nothing to pair
    st, jt = k1["arms"]["real"]["seeds_joins_tuned_on_k_frames"]["0"]  # tuned on the K frames, as a lab would
    assert 0 < st <= 1 and (jt is None or jt < st) and r["tune_seeds"]
    assert set(k1["arms"]["real"]["f1_seeds_at_threshold"]["0"]) == {"hela_heldout", "dsb_unseen"}
    assert (run / "eval_cache.json").is_file()  # a rerun scores only the U-Nets it has not seen
    assert k1["otsu"]["sigma"] in (1.0, 2.0, 3.0) and "f1" in k1["otsu"]["dsb_unseen"]
    g = k1["generated"]
    assert g["pairs"] == 3 and 0 <= g["judge_recall_by_mask"] <= 1 and g["nearest_real_rms_median"] > 0
    assert abs(g["edge_minus_centre"]) < 1 and abs(g["real_edge_minus_centre"]) < 1
    assert k1["generator"] == {"vae_steps": 7, "vae_psnr": 21.5, "vae_ssim": 0.5, "vae_mask_dice": 0.9,
                               "vae_edge_minus_centre": -0.01, "ldm_steps": 9, "ldm_size": "compact",
                               "ldm_seconds": 3.0, "pairs": 3}
    assert k2["generator"]["vae_steps"] is None  # no generator trained for K=2: nothing made up
    md = (out / "results" / "scarce_data.md").read_text()
    assert "| 1 | [0] | 7 | 21.500 / 0.500 / 0.900 | -0.010 | 9 (compact) | 3 |" in md and "| 2 | [0, 8] |" not in md
    assert "| 1 | real | 2 |" in md and "| 1 | mixed - real (paired by seed) | 2 |" in md and "## The generated pairs" in md
    assert (out / "images" / "scarce_data.png").stat().st_size > 10_000


def test_relabelled_masks_come_from_the_k_frame_unet_and_make_an_arm(data, tmp_path, tiny_segmenter):
    """--relabel: the generated images segmented by the K-frame U-Net (seed 0), one label image per
    generated image numbered from 1; U-Nets in kK/relabelled_sS are scored as a third arm, paired
    with the real one by seed."""
    run = tmp_path / "run"
    scarce.prepare(run, [1], data)
    for name in ("k1/real_s0", "k1/relabelled_s0"):
        shutil.copytree(tiny_segmenter, run / name)
    gen_imgs, _ = make_blobs(tmp_path / "gen", n=2, shape=(64, 64), dtype=np.uint16)
    (run / "k1" / "gen").mkdir()
    images = np.stack([tifffile.imread(p) for p in sorted(gen_imgs.glob("*.tif"))])
    tifffile.imwrite(run / "k1" / "gen" / "images.tif", images)
    assert scarce.main(["--relabel", "--run", str(run), "--ks", "1"]) == 0
    lab = tifffile.imread(run / "k1" / "gen" / "labels_relabelled.tif")
    assert lab.shape == images.shape and lab.dtype == np.uint16
    for one in lab:
        assert np.array_equal(np.unique(one), np.arange(one.max() + 1)) and one.max() > 0  # 1..n in each image
    out = tmp_path / "out"
    assert scarce.main(["--run", str(run), "--out", str(out), "--judge", "none", "--data", str(data)]) == 0
    r = json.loads((out / "results" / "scarce_data.json").read_text())["k"]["1"]
    assert set(r["arms"]) == {"real", "relabelled"} and r["relabelled_minus_real"]["hela_heldout"]["f1"]["differences"] == [0]
    assert "| 1 | relabelled - real (paired by seed) | 1 |" in (out / "results" / "scarce_data.md").read_text()


def test_scoring_an_empty_run_says_what_to_do(tmp_path, data):
    with pytest.raises(UserInputError, match="scripts/scarce_data.sh"):
        scarce.main(["--run", str(tmp_path), "--out", str(tmp_path / "o"), "--data", str(data)])
