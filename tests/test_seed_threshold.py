"""The watershed's seed threshold, separate from the foreground threshold (issue 14).

Large textured nuclei (CHO's) get several cores >= 0.5 in the centre output and came out in pieces;
a lower seed threshold joins such cores. None keeps the old behaviour exactly (the seeds at the
foreground threshold); a model card's ``seed_threshold`` is the default, the argument, the CLI's
``--seed-threshold`` and the dock override it. No timed assertions; the tiny model trains in seconds.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import tifffile
from scipy import ndimage as ndi

from napari_zfdiffusion.core.errors import UserInputError
from napari_zfdiffusion.core.masks import StripInstances, center_map, check_seed_threshold, drop_small, instances
from napari_zfdiffusion.core.metrics import match_objects
from napari_zfdiffusion.core.segment import Segmenter


def old_instances(foreground, interior=None, *, threshold=0.5, min_size=0):
    """:func:`instances` as it was before the seed threshold (copied from the commit before)."""
    from skimage.measure import label
    from skimage.segmentation import watershed

    mask = foreground >= threshold
    if interior is None:
        lab = label(mask, connectivity=1)
    else:
        seeds = label((interior >= threshold) & mask, connectivity=1)
        lab = watershed(-foreground, seeds, mask=mask) if seeds.max() else np.zeros(mask.shape, np.int64)
        orphans = label(mask & (lab == 0), connectivity=1)
        if orphans.max():
            lab = np.where(orphans > 0, orphans + lab.max(), lab)
    return drop_small(lab, min_size)


def graded_maps(h: int, w: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A foreground probability and a graded centre map of round objects, some touching, with noise:
    the centre map has cores of every height, so the seed threshold matters."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    lab = np.zeros((h, w), np.int32)
    for k in range(1, h * w // 250):
        cy, cx, r = rng.integers(0, h), rng.integers(0, w), rng.integers(5, 14)
        lab[((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r) & (lab == 0)] = k
    # no two foreground values alike (no watershed ties, whose pixels the strips may give the other side)
    fg = ndi.gaussian_filter((lab > 0).astype(np.float64), 1.5) * 0.95 + rng.random((h, w)) * 0.04
    ctr = ndi.gaussian_filter(center_map(lab) * ndi.gaussian_filter(rng.uniform(0.3, 1.3, (h, w)), 4), 1.0)
    return fg.astype(np.float32), np.clip(ctr + rng.random((h, w)) * 1e-3, 0, 1).astype(np.float32)


def two_core_nucleus() -> tuple[np.ndarray, np.ndarray]:
    """One round nucleus (radius 22) whose centre map has two cores (0.8) joined by a saddle of 0.4:
    seeds at 0.5 split it in two, seeds at 0.3 keep it one."""
    yy, xx = np.mgrid[:100, :100]
    disc = (yy - 50) ** 2 + (xx - 50) ** 2 <= 22 ** 2
    fg = np.where(disc, 0.9 - 0.002 * np.hypot(yy - 50, xx - 50), 0.02).astype(np.float32)
    bumps = [0.8 * np.exp(-((yy - 50) ** 2 + (xx - x0) ** 2) / (2 * 6.0 ** 2)) for x0 in (40, 60)]
    ctr = np.where(disc, bumps[0] + bumps[1], 0).astype(np.float32)
    assert abs(ctr[50, 50] - 0.4) < 0.01 and ctr[50, 40] > 0.8
    return fg, ctr


def by_strips(fg, ctr, rows, **kw):
    h, w = fg.shape
    s = StripInstances(h, w, **kw)
    out = np.zeros((h, w), np.int32)
    for a in range(0, h, rows):
        for r0, r1, lab in s.add(fg[a:a + rows], ctr[a:a + rows]):
            out[r0:r1] = lab
    return s.lookup(0)[out]


# ----------------------------------------------------------------------------- labels
@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.7])
def test_none_gives_the_old_labels_exactly(threshold):
    for seed in range(3):
        fg, ctr = graded_maps(160, 140, seed)
        for min_size in (0, 12):
            old = old_instances(fg, ctr, threshold=threshold, min_size=min_size)
            assert old.max() > 10
            assert np.array_equal(instances(fg, ctr, threshold=threshold, min_size=min_size), old)
            assert np.array_equal(instances(fg, ctr, threshold=threshold, min_size=min_size,
                                            seed_threshold=None), old)
            assert np.array_equal(instances(fg, ctr, threshold=threshold, min_size=min_size,
                                            seed_threshold=threshold), old)
            assert np.array_equal(by_strips(fg, ctr, 9, threshold=threshold, min_size=min_size), old)


def test_the_seed_threshold_changes_the_seeds_only():
    fg, ctr = graded_maps(160, 140, 5)
    counts = [instances(fg, ctr, seed_threshold=s).max() for s in (0.2, 0.5, 0.8)]
    assert len(set(counts)) == 3  # (here higher gives fewer: clusters whose objects have no seed stay one)
    for s in (0.2, 0.8):  # the foreground is the same: only how it is cut into objects changes
        assert np.array_equal(instances(fg, ctr, seed_threshold=s) > 0, instances(fg, ctr) > 0)
    assert np.array_equal(instances(fg, None, seed_threshold=0.2), instances(fg, None))  # no seeds: no effect


def test_a_lower_seed_threshold_merges_a_nucleus_that_two_seeds_split():
    fg, ctr = two_core_nucleus()
    split = instances(fg, ctr, min_size=16)
    assert split.max() == 2 and old_instances(fg, ctr, min_size=16).max() == 2
    whole = instances(fg, ctr, min_size=16, seed_threshold=0.3)
    assert whole.max() == 1 and np.array_equal(whole > 0, fg >= 0.5)
    truth = (fg >= 0.5).astype(np.int32)
    assert match_objects(truth, split)["fp"] == 1 and match_objects(truth, whole)["f1"] == 1
    for rows in (1, 7, 40):  # the strip path of big planes: the same
        assert np.array_equal(by_strips(fg, ctr, rows, min_size=16, seed_threshold=0.3), whole)
        assert np.array_equal(by_strips(fg, ctr, rows, min_size=16), split)


@pytest.mark.parametrize("rows", [1, 9, 50])
@pytest.mark.parametrize("seed_threshold", [0.25, 0.35, 0.8])
def test_strip_labels_equal_whole_plane_labels_at_any_seed_threshold(rows, seed_threshold):
    for seed in range(2):
        fg, ctr = graded_maps(150, 130, seed)
        ref = instances(fg, ctr, min_size=12, seed_threshold=seed_threshold)
        assert np.array_equal(by_strips(fg, ctr, rows, min_size=12, seed_threshold=seed_threshold), ref)


@pytest.mark.parametrize("bad", [0, 0.0, -0.1, 1.0001, 2, float("nan"), float("inf"), "abc"])
def test_bad_seed_thresholds_are_refused_with_the_range(bad):
    fg, ctr = two_core_nucleus()
    for call in (lambda: instances(fg, ctr, seed_threshold=bad),
                 lambda: StripInstances(100, 100, seed_threshold=bad),
                 lambda: check_seed_threshold(bad)):
        with pytest.raises(UserInputError, match=r"seed threshold must be a number in \(0, 1\]"):
            call()


def test_the_edges_of_the_range_are_taken():
    fg, ctr = two_core_nucleus()
    assert instances(fg, ctr, seed_threshold=1.0).max() == 1  # no seed: the region is one seedless object
    assert instances(fg, ctr, seed_threshold=1e-6).max() == 1
    assert check_seed_threshold("0.3") == 0.3 and check_seed_threshold(None) is None


# ----------------------------------------------------------------------------- the Segmenter
@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from conftest import make_tiny_segmenter

    return make_tiny_segmenter(tmp_path_factory.mktemp("m") / "unet")


def with_card(src, dest, **fields):
    """A copy of the model folder ``src`` with ``fields`` set in its model.json (None: removed)."""
    shutil.copytree(src, dest)
    card = json.loads((dest / "model.json").read_text())
    for k, v in fields.items():
        card.pop(k, None) if v is None else card.__setitem__(k, v)
    (dest / "model.json").write_text(json.dumps(card, indent=2))
    return dest


@pytest.fixture
def scripted(model, monkeypatch):
    """A Segmenter whose probabilities are :func:`two_core_nucleus`'s (whatever the image)."""
    seg = Segmenter.load(model, "cpu")
    fg, ctr = two_core_nucleus()
    monkeypatch.setattr(seg, "predict", lambda planes, **kw: np.stack([fg, ctr])[None].repeat(len(planes), 0))
    return seg


def test_the_card_value_is_the_default_and_the_argument_overrides_it(scripted):
    img = np.zeros((100, 100), np.uint8)
    scripted.card.pop("seed_threshold", None)
    assert scripted.seed_threshold is None
    r = scripted.segment(img, min_size=16)
    assert r.n_objects == 2 and r.provenance["seed_threshold"] == 0.5  # none in the card: the threshold
    assert scripted.segment(img, min_size=16, threshold=0.35).provenance["seed_threshold"] == 0.35
    assert scripted.segment(img, min_size=16, seed_threshold=0.3).n_objects == 1
    scripted.card["seed_threshold"] = 0.3
    r = scripted.segment(img, min_size=16)
    assert r.n_objects == 1 and r.provenance["seed_threshold"] == 0.3 and r.provenance["threshold"] == 0.5
    r = scripted.segment(img, min_size=16, seed_threshold=0.5)
    assert r.n_objects == 2 and r.provenance["seed_threshold"] == 0.5
    r = scripted.segment(img, min_size=16, use_interior=False)
    assert r.n_objects == 1 and "seed_threshold" not in r.provenance  # connected components: no seeds


def test_segment_refuses_bad_values_and_a_bad_card(scripted):
    img = np.zeros((100, 100), np.uint8)
    for bad in (0, 1.5, float("nan"), -1):
        with pytest.raises(UserInputError, match=r"seed threshold must be a number in \(0, 1\]"):
            scripted.segment(img, seed_threshold=bad)
    scripted.card["seed_threshold"] = 7
    with pytest.raises(UserInputError, match=r"seed_threshold in the model card of .*model\.json.* \(0, 1\]"):
        scripted.segment(img)
    assert scripted.segment(img, seed_threshold=0.35, min_size=16).n_objects == 1  # the argument wins


def test_the_real_prediction_and_the_strip_path_take_it(model, monkeypatch):
    """With the network's own output: labels as instances() gives them from its probabilities, and
    the strip path of big planes gives the same as the whole plane at a seed threshold of its own."""
    from conftest import make_blobs

    seg = Segmenter.load(model, "cpu")
    imgs, _ = make_blobs(model.parent / "blobs-st", n=1, shape=(160, 192))
    img = tifffile.imread(sorted(imgs.glob("*.tif"))[0])
    p = seg.predict(img, tile=64, overlap=16)[0]
    for st in (0.25, 0.7):
        whole = seg.segment(img, tile=64, overlap=16, seed_threshold=st)
        assert np.array_equal(whole.labels, instances(p[0], p[1], threshold=0.5, min_size=16, seed_threshold=st))
        monkeypatch.setattr(seg, "strip_threshold", 0)
        monkeypatch.setattr(seg, "strip_pixels", 12 * 192)
        strips = seg.segment(img, tile=64, overlap=16, seed_threshold=st)
        assert seg.strip_stats["largest_band"] < 160
        assert np.array_equal(strips.labels, whole.labels) and strips.provenance["seed_threshold"] == st
        monkeypatch.undo()


# ----------------------------------------------------------------------------- the command line
def test_cli_default_is_the_cards_and_the_option_overrides_it(model, tmp_path, capsys):
    from napari_zfdiffusion import cli
    from napari_zfdiffusion.core.io import read_provenance

    folder = with_card(model, tmp_path / "with seeds", seed_threshold=0.3)
    img = (np.random.default_rng(3).random((96, 128)) * 60).astype(np.uint8)
    img[20:50, 30:70] += 150
    tifffile.imwrite(tmp_path / "in.tif", img)
    seg = Segmenter.load(folder, "cpu")
    kw = {k: seg.card[k] for k in ("tile", "overlap", "min_size")}  # the card's, as the command takes them

    def run(*extra):
        out = tmp_path / f"out{len(extra)}.tif"
        assert cli.main(["-q", "segment", "--model", str(folder), "--in", str(tmp_path / "in.tif"), "--out", str(out),
                         "--device", "cpu", *extra]) == 0
        return tifffile.imread(out), read_provenance(out), capsys.readouterr().out

    labels, prov, said = run()
    assert prov["seed_threshold"] == 0.3 and "seed threshold 0.3," in said
    assert np.array_equal(labels, seg.segment(img, seed_threshold=0.3, **kw).labels)
    labels, prov, said = run("--seed-threshold", "0.6")
    assert prov["seed_threshold"] == 0.6 and "seed threshold 0.6," in said
    assert np.array_equal(labels, seg.segment(img, seed_threshold=0.6, **kw).labels)

    plain = with_card(model, tmp_path / "no seeds", seed_threshold=None)  # an old card: the threshold
    out = tmp_path / "plain.tif"
    assert cli.main(["-q", "segment", "--model", str(plain), "--in", str(tmp_path / "in.tif"), "--out", str(out),
                     "--threshold", "0.4"]) == 0
    assert read_provenance(out)["seed_threshold"] == 0.4


@pytest.mark.parametrize("bad", ["0", "1.5", "nan", "-0.2"])
def test_cli_refuses_a_bad_seed_threshold_and_writes_nothing(model, tmp_path, capsys, bad):
    from napari_zfdiffusion import cli

    tifffile.imwrite(tmp_path / "in.tif", np.zeros((64, 64), np.uint8))
    out = tmp_path / "out.tif"
    assert cli.main(["segment", "--model", str(model), "--in", str(tmp_path / "in.tif"), "--out", str(out),
                     "--seed-threshold", bad]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--seed-threshold must be a number in (0, 1]" in err[0]
    assert not out.exists() and not list(tmp_path.glob("*.part")) and not list(tmp_path.glob(".*.part"))


# ----------------------------------------------------------------------------- the tuning
def test_seed_scores_are_the_segmenters_figures(model):
    """evaluation.generalist.seed_scores predicts once per plane and labels per seed threshold: the
    same counts as segmenting each plane at that seed threshold."""
    from conftest import make_blobs

    from napari_zfdiffusion.evaluation.generalist import seed_scores

    seg = Segmenter.load(model, "cpu")
    imgs, masks = make_blobs(model.parent / "blobs-score", n=2, shape=(96, 128))
    pairs = [(tifffile.imread(p), tifffile.imread(masks / p.name)) for p in sorted(imgs.glob("*.tif"))]
    got = seed_scores(seg, pairs, (0.25, 0.5), threshold=0.5, tile=64, overlap=16)
    for st in (0.25, 0.5):
        tp = fp = fn = 0
        for img, truth in pairs:
            m = match_objects(truth, seg.segment(img, tile=64, overlap=16, min_size=16, seed_threshold=st).labels)
            tp, fp, fn = tp + m["tp"], fp + m["fp"], fn + m["fn"]
        assert (got[st]["tp"], got[st]["fp"], got[st]["fn"]) == (tp, fp, fn) and tp > 0
        assert got[st]["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))


def test_choose_seed_takes_the_best_mean_then_the_nearest_to_the_threshold():
    from napari_zfdiffusion.evaluation.generalist import SEED_GRID, choose_seed

    assert SEED_GRID == (0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6)
    assert choose_seed({0.2: 0.5, 0.3: 0.7, 0.5: 0.6}, 0.5) == 0.3
    assert choose_seed({0.3: 0.7, 0.4: 0.7, 0.6: 0.7}, 0.5) == 0.4  # a tie: nearest the threshold
    assert choose_seed({0.4: 0.7, 0.6: 0.7}, 0.5) == 0.4  # equally near: the lower


def test_training_planes_come_from_the_card_by_source(tmp_path):
    from napari_zfdiffusion.evaluation.generalist import training_planes

    names = ["hela_t00.tif", "hela_t01.tif", "cho_t00_z0.tif", "cho_t00_z1.tif", "cho_t01_z0.tif", "dsb_left.tif"]
    for n in names + ["hela_t02.tif"]:  # one not in the card: not used
        src = n.split("_")[0]
        (tmp_path / src / "train" / "images").mkdir(parents=True, exist_ok=True)
        (tmp_path / src / "train" / "images" / n).write_bytes(b"")
    card = {"training_data": {"files": names + names[:2] + ["other.tif"]}}  # repeated files count once
    got = training_planes(card, tmp_path)
    assert {s: [p.name for p in v] for s, v in got.items()} == {
        "cho": ["cho_t00_z0.tif", "cho_t00_z1.tif", "cho_t01_z0.tif"], "dsb": ["dsb_left.tif"],
        "hela": ["hela_t00.tif", "hela_t01.tif"]}
    assert [p.name for p in training_planes(card, tmp_path, 2)["cho"]] == ["cho_t00_z0.tif", "cho_t01_z0.tif"]
    with pytest.raises(UserInputError, match="no training planes"):
        training_planes({"training_data": {"files": ["other.tif"]}}, tmp_path)
    card["training_data"]["files"].append("cho_t09_z0.tif")
    with pytest.raises(UserInputError, match="fetch-data --dataset seg"):
        training_planes(card, tmp_path)


def test_held_out_planes_are_whole_planes_of_both_parts(tmp_path):
    """The leave-one-source-out rows score a held-out source on its training and test parts together:
    a column split is joined back into the plane it was cut from, a time split gives both parts' planes."""
    from napari_zfdiffusion.evaluation.generalist import whole_planes

    rng = np.random.default_rng(0)
    plane = rng.integers(0, 255, (8, 12), dtype=np.uint8)
    labels = np.zeros((8, 12), np.uint16)
    labels[2:6, 6:10] = 7  # one object across the cut at column 8

    def put(src, part, name, im, lab):
        for sub, a in (("images", im), ("masks", lab)):
            (tmp_path / src / part / sub).mkdir(parents=True, exist_ok=True)
            tifffile.imwrite(tmp_path / src / part / sub / name, a)

    put("dsb", "train", "dsb_left.tif", plane[:, :8], labels[:, :8])
    put("dsb", "test", "dsb_right.tif", plane[:, 8:], labels[:, 8:])
    (im, lab), = whole_planes(tmp_path, "dsb")
    assert np.array_equal(im, plane) and np.array_equal(lab, labels)  # one object again, not two halves
    put("hela", "train", "hela_t00.tif", plane, labels)
    put("hela", "test", "hela_t01.tif", plane // 2, labels)
    got = whole_planes(tmp_path, "hela")
    assert len(got) == 2 and np.array_equal(got[0][0], plane) and np.array_equal(got[1][0], plane // 2)


def test_the_generalist_card_says_the_seed_and_join_thresholds(model, tmp_path):
    """evaluation.cards seg-generalist: a paragraph on the card's seed (and join) threshold, with the
    tuning's figures when RESULTS/seg_seed_threshold.json chose them; none without a seed threshold."""
    from napari_zfdiffusion.evaluation import cards

    folder = with_card(model, tmp_path / "gen", seed_threshold=0.5, join_threshold=0.4, name="gen")
    results = tmp_path / "results"
    results.mkdir()
    tuned = {"model": "gen", "chosen": [0.5, 0.4], "chosen_name": "0.5 j0.4", "seeds": [0.2, 0.45, 0.5, 0.6],
             "joins": [0.15, 0.4, 0.5], "command": "python -m TUNE",
             "mean_f1": {"0.2": 0.6, "0.45": 0.704, "0.5": 0.701, "0.6": 0.6, "0.5 j0.4": 0.763},
             "test": {"cho": {"in_training": True, "old": {"f1": 0.374}, "tuned": {"f1": 0.663}},
                      "bacteria": {"in_training": False, "old": {"f1": 0.0}, "tuned": {"f1": 0.0}}}}
    (results / "seg_seed_threshold.json").write_text(json.dumps(tuned))
    assert cards.main(["seg-generalist", str(folder), "--results", str(results)]) == 0
    text = " ".join((folder / "MODEL_CARD.md").read_text().split())
    assert "**Seed threshold 0.5, join threshold 0.4.** Nuclei are seeded where the centre output is at least 0.5" in text
    assert "linked above 0.4 are one seed" in text
    assert "(0.763 against 0.701 with the seeds at 0.5 and no joining): `python -m TUNE`" in text
    assert "cho 0.374 -> 0.663." in text and "bacteria 0.000" not in text and "--join-threshold" in text
    card = json.loads((folder / "model.json").read_text())
    assert (card["seed_threshold"], card["join_threshold"]) == (0.5, 0.4)  # kept

    plain = with_card(model, tmp_path / "plain", seed_threshold=None, name="plain")
    assert cards.main(["seg-generalist", str(plain), "--results", str(results)]) == 0
    assert "**Seed threshold" not in (plain / "MODEL_CARD.md").read_text()
