"""Joining the cores of one nucleus (issue 14): seeds are the connected regions of the centre output
above the ``join_threshold`` that reach the seed threshold (hysteresis). A large textured nucleus
whose centre output has several peaks stays one object; touching nuclei, whose centre output falls
towards 0 where they meet, stay apart; a region that never reaches the seed threshold seeds nothing.
None (or the seed threshold itself) gives the labels of before exactly, whole plane or in strips.
"""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from test_seed_threshold import (  # noqa: F401 - model and scripted are fixtures, shared
    by_strips,
    graded_maps,
    model,
    old_instances,
    scripted,
    two_core_nucleus,
    with_card,
)

from napari_zfdiffusion.core.errors import UserInputError
from napari_zfdiffusion.core.masks import StripInstances, check_join_threshold, instances
from napari_zfdiffusion.core.metrics import match_objects
from napari_zfdiffusion.core.segment import Segmenter


def touching_pair() -> tuple[np.ndarray, np.ndarray]:
    """Two discs (radius 15) that touch along x = 50; each centre map peaks at 1 and falls to 0 at its edge."""
    yy, xx = np.mgrid[:80, :100]
    lab = np.zeros((80, 100), np.int32)
    for k, x0 in ((1, 35), (2, 65)):
        lab[((yy - 40) ** 2 + (xx - x0) ** 2 <= 15 ** 2) & (lab == 0)] = k
    from napari_zfdiffusion.core.masks import center_map

    fg = np.where(lab > 0, 0.9, 0.02).astype(np.float32)
    return fg, center_map(lab).astype(np.float32)


def test_join_none_or_at_the_seed_threshold_gives_the_old_labels():
    for seed in range(3):
        fg, ctr = graded_maps(160, 140, seed)
        old = old_instances(fg, ctr, min_size=12)
        for jt in (None, 0.5):
            assert np.array_equal(instances(fg, ctr, min_size=12, join_threshold=jt), old)
            assert np.array_equal(by_strips(fg, ctr, 9, min_size=12, join_threshold=jt), old)


def test_cores_joined_above_the_join_threshold_make_one_nucleus():
    fg, ctr = two_core_nucleus()  # two cores of 0.8 and a saddle of 0.4 between them
    truth = (fg >= 0.5).astype(np.int32)
    assert instances(fg, ctr, min_size=16).max() == 2  # seeds at 0.5: split
    whole = instances(fg, ctr, min_size=16, join_threshold=0.35)
    assert whole.max() == 1 and match_objects(truth, whole)["f1"] == 1
    assert instances(fg, ctr, min_size=16, join_threshold=0.45).max() == 2  # the saddle is below 0.45
    assert instances(fg, ctr, min_size=16, seed_threshold=0.6, join_threshold=0.35).max() == 1
    for rows in (1, 7, 40):
        assert np.array_equal(by_strips(fg, ctr, rows, min_size=16, join_threshold=0.35), whole)


def test_touching_nuclei_stay_apart_at_any_join_threshold_above_their_contact():
    fg, ctr = touching_pair()
    assert instances(fg, ctr).max() == 2
    for jt in (0.1, 0.2, 0.3):
        lab = instances(fg, ctr, join_threshold=jt)
        assert lab.max() == 2 and np.array_equal(lab > 0, fg >= 0.5)


def test_a_region_that_never_reaches_the_seed_threshold_seeds_nothing():
    """Unlike a low seed threshold, joining adds no object: a weak bump inside a nucleus is flooded
    from the nucleus's seed, a weak blob on its own stays one seedless object, as without joining."""
    yy, xx = np.mgrid[:100, :140]
    disc = (yy - 50) ** 2 + (xx - 40) ** 2 <= 25 ** 2
    blob = (yy - 50) ** 2 + (xx - 110) ** 2 <= 12 ** 2
    fg = np.where(disc | blob, 0.9, 0.02).astype(np.float32)
    ctr = np.zeros_like(fg)
    ctr += 0.9 * np.exp(-((yy - 50) ** 2 + (xx - 35) ** 2) / 50.0) * disc  # the nucleus's core
    ctr += 0.4 * np.exp(-((yy - 40) ** 2 + (xx - 52) ** 2) / 8.0) * disc  # a weak bump apart from it
    ctr += 0.4 * np.exp(-((yy - 50) ** 2 + (xx - 110) ** 2) / 30.0) * blob  # a weak blob on its own
    low_seeds = instances(fg, ctr, seed_threshold=0.3)
    assert low_seeds.max() == 3  # the bump becomes an object of its own
    joined = instances(fg, ctr, seed_threshold=0.5, join_threshold=0.3)
    assert joined.max() == 2 and np.array_equal(joined, instances(fg, ctr, seed_threshold=0.5))


@pytest.mark.parametrize("rows", [1, 9, 50])
@pytest.mark.parametrize("jt", [0.2, 0.35])
def test_strip_labels_equal_whole_plane_labels_with_joining(rows, jt):
    for seed in range(2):
        fg, ctr = graded_maps(150, 130, seed)
        ref = instances(fg, ctr, min_size=12, seed_threshold=0.5, join_threshold=jt)
        assert not np.array_equal(ref, instances(fg, ctr, min_size=12))  # it changes something here
        assert np.array_equal(by_strips(fg, ctr, rows, min_size=12, join_threshold=jt), ref)


@pytest.mark.parametrize("bad", [0, -0.1, 0.6, float("nan"), "x"])
def test_bad_join_thresholds_are_refused_with_the_range(bad):
    fg, ctr = two_core_nucleus()
    for call in (lambda: instances(fg, ctr, join_threshold=bad),
                 lambda: StripInstances(100, 100, join_threshold=bad),
                 lambda: check_join_threshold(bad, 0.5)):
        with pytest.raises(UserInputError, match=r"join threshold must be a number in \(0, 0\.5\]"):
            call()
    assert check_join_threshold("0.3", 0.5) == 0.3 and check_join_threshold(None, 0.5) is None


# ----------------------------------------------------------------------------- the Segmenter and the CLI
# (fixtures from test_seed_threshold: ``model``, the tiny U-Net; ``scripted``, a Segmenter whose
# probabilities are two_core_nucleus's whatever the image)
def test_the_card_value_is_the_default_and_the_argument_overrides_it(scripted):
    img = np.zeros((100, 100), np.uint8)
    scripted.card.pop("join_threshold", None)
    r = scripted.segment(img, min_size=16)
    assert r.n_objects == 2 and "join_threshold" not in r.provenance
    r = scripted.segment(img, min_size=16, join_threshold=0.35)
    assert r.n_objects == 1 and r.provenance["join_threshold"] == 0.35
    scripted.card["join_threshold"] = 0.35
    r = scripted.segment(img, min_size=16)
    assert r.n_objects == 1 and r.provenance["join_threshold"] == 0.35
    r = scripted.segment(img, min_size=16, join_threshold=0.5)  # the seed threshold itself: off
    assert r.n_objects == 2 and "join_threshold" not in r.provenance
    r = scripted.segment(img, min_size=16, seed_threshold=0.3)  # the card's 0.35 is held at a lower seed threshold
    assert r.n_objects == 1 and "join_threshold" not in r.provenance
    with pytest.raises(UserInputError, match=r"join threshold must be a number in \(0, 0\.5\]"):
        scripted.segment(img, join_threshold=0.7)
    scripted.card["join_threshold"] = 3
    with pytest.raises(UserInputError, match=r"join_threshold in the model card of .*model\.json"):
        scripted.segment(img)


def test_the_real_prediction_and_the_strip_path_take_it(model, monkeypatch):
    from conftest import make_blobs

    seg = Segmenter.load(model, "cpu")
    imgs, _ = make_blobs(model.parent / "blobs-jt", n=1, shape=(160, 192))
    img = tifffile.imread(sorted(imgs.glob("*.tif"))[0])
    p = seg.predict(img, tile=64, overlap=16)[0]
    whole = seg.segment(img, tile=64, overlap=16, seed_threshold=0.6, join_threshold=0.2)
    assert np.array_equal(whole.labels, instances(p[0], p[1], threshold=0.5, min_size=16, seed_threshold=0.6,
                                                  join_threshold=0.2))
    monkeypatch.setattr(seg, "strip_threshold", 0)
    monkeypatch.setattr(seg, "strip_pixels", 12 * 192)
    strips = seg.segment(img, tile=64, overlap=16, seed_threshold=0.6, join_threshold=0.2)
    assert seg.strip_stats["largest_band"] < 160
    assert np.array_equal(strips.labels, whole.labels) and strips.provenance["join_threshold"] == 0.2


def test_cli_default_is_the_cards_and_the_option_overrides_it(model, tmp_path, capsys):
    from napari_zfdiffusion import cli
    from napari_zfdiffusion.core.io import read_provenance

    folder = with_card(model, tmp_path / "joined", seed_threshold=0.6, join_threshold=0.2)
    img = (np.random.default_rng(3).random((96, 128)) * 60).astype(np.uint8)
    img[20:50, 30:70] += 150
    tifffile.imwrite(tmp_path / "in.tif", img)
    seg = Segmenter.load(folder, "cpu")
    kw = {k: seg.card[k] for k in ("tile", "overlap", "min_size")}

    def run(*extra):
        out = tmp_path / f"out{len(extra)}.tif"
        assert cli.main(["-q", "segment", "--model", str(folder), "--in", str(tmp_path / "in.tif"), "--out", str(out),
                         "--device", "cpu", *extra]) == 0
        return tifffile.imread(out), read_provenance(out), capsys.readouterr().out

    labels, prov, said = run()
    assert prov["join_threshold"] == 0.2 and "cores joined above 0.2" in said
    assert np.array_equal(labels, seg.segment(img, **kw).labels)
    labels, prov, said = run("--join-threshold", "0.6")  # the seed threshold: off
    assert "join_threshold" not in prov and "joined" not in said
    assert np.array_equal(labels, seg.segment(img, join_threshold=0.6, **kw).labels)


@pytest.mark.parametrize("bad", ["0", "0.9", "nan"])
def test_cli_refuses_a_bad_join_threshold_and_writes_nothing(model, tmp_path, capsys, bad):
    from napari_zfdiffusion import cli

    tifffile.imwrite(tmp_path / "in.tif", np.zeros((64, 64), np.uint8))
    out = tmp_path / "out.tif"
    assert cli.main(["segment", "--model", str(model), "--in", str(tmp_path / "in.tif"), "--out", str(out),
                     "--seed-threshold", "0.5", "--join-threshold", bad]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--join-threshold" in err[0] and "(0, 0.5]" in err[0]
    assert not out.exists() and not list(tmp_path.glob("*.part")) and not list(tmp_path.glob(".*.part"))


# ----------------------------------------------------------------------------- the tuning
def test_the_tuning_grid_and_its_choice():
    from napari_zfdiffusion.evaluation.generalist import COMBOS, JOIN_GRID, SEED_GRID, choose_combo, combo_name

    assert all((st, None) in COMBOS for st in SEED_GRID)
    assert all(jt < st for st, jt in COMBOS if jt is not None) and (0.45, 0.3) in COMBOS and (0.2, 0.2) not in COMBOS
    assert len(COMBOS) == len(SEED_GRID) + sum(jt < st for st in SEED_GRID for jt in JOIN_GRID)
    assert combo_name((0.45, None)) == "0.45" and combo_name((0.45, 0.3)) == "0.45 j0.3"
    assert choose_combo({(0.5, None): 0.6, (0.45, 0.3): 0.7, (0.45, None): 0.65}, 0.5) == (0.45, 0.3)
    assert choose_combo({(0.5, None): 0.7, (0.5, 0.3): 0.7}, 0.5) == (0.5, None)  # a tie: no joining
    assert choose_combo({(0.5, 0.2): 0.7, (0.5, 0.3): 0.7, (0.4, 0.3): 0.7}, 0.5) == (0.5, 0.3)  # the least joining


def test_seed_scores_with_joining_are_the_segmenters_figures(model):
    from conftest import make_blobs

    from napari_zfdiffusion.evaluation.generalist import seed_scores

    seg = Segmenter.load(model, "cpu")
    imgs, masks = make_blobs(model.parent / "blobs-jscore", n=2, shape=(96, 128))
    pairs = [(tifffile.imread(p), tifffile.imread(masks / p.name)) for p in sorted(imgs.glob("*.tif"))]
    combos = ((0.5, None), (0.6, 0.2))
    got = seed_scores(seg, pairs, combos, threshold=0.5, tile=64, overlap=16)
    for st, jt in combos:
        tp = fp = fn = 0
        for img, truth in pairs:
            lab = seg.segment(img, tile=64, overlap=16, min_size=16, seed_threshold=st,
                              join_threshold=st if jt is None else jt).labels
            m = match_objects(truth, lab)
            tp, fp, fn = tp + m["tp"], fp + m["fp"], fn + m["fn"]
        assert (got[st, jt]["tp"], got[st, jt]["fp"], got[st, jt]["fn"]) == (tp, fp, fn) and tp > 0
