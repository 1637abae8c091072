"""Training the segmentation U-Net (`train unet`), the `segment` command, and one test per bad input."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import tifffile
import torch
from safetensors.torch import load_file

from napari_zfdiffusion import cli
from napari_zfdiffusion.core.errors import UserInputError
from napari_zfdiffusion.core.io import read_provenance
from napari_zfdiffusion.core.segment import Segmenter
from napari_zfdiffusion.core.store import WEIGHTS_FILE, list_models, model_kind
from napari_zfdiffusion.core.segment.train import UnetConfig, train_unet

from conftest import make_blobs, torchrun_cli


def ucfg(**kw) -> UnetConfig:
    base = dict(size="tiny", steps=4, batch_size=2, crop=32, log_every=1, checkpoint_every=100, warmup=2, tile=64,
                overlap=16)
    base.update(kw)
    return UnetConfig(**base)


def tunet(images, masks, out, resume=False, **kw):
    extra = {k: kw.pop(k) for k in ("extra_images", "extra_masks", "val_images", "val_masks") if k in kw}
    return train_unet(images, masks, out, ucfg(**kw), device="cpu", resume=resume, show_progress=False, **extra)


def log(folder):
    return [json.loads(x) for x in (folder / "training" / "unet" / "log.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------- training
def test_trains_into_a_loadable_folder_with_validation_figures(tmp_path, blobs):
    s = tunet(*blobs, tmp_path / "m", steps=3)
    assert s["steps"] == 3 and model_kind(tmp_path / "m") == "segmentation"
    card = json.loads((tmp_path / "m" / "model.json").read_text())
    assert card["outputs"] == ["foreground", "center"]  # the default second output since 0.3
    assert set(card["validation"]) >= {"iou", "dice", "f1"}
    assert card["training_data"]["mask_files"]
    seg = Segmenter.load(tmp_path / "m", "cpu")
    assert seg.has_interior


def test_training_reduces_the_loss_and_validation_is_logged_per_checkpoint(tmp_path):
    imgs, masks = make_blobs(tmp_path / "d", n=6, shape=(96, 128))
    tunet(imgs, masks, tmp_path / "m", steps=60, batch_size=8, crop=64, checkpoint_every=30, log_every=10, lr=3e-3)
    recs = log(tmp_path / "m")
    losses = [r["loss"] for r in recs if "loss" in r]
    assert losses[-1] < 0.7 * losses[0]
    vals = [r["validation"] for r in recs if "validation" in r]
    assert len(vals) == 2 and vals[-1]["dice"] > 0.7


def test_resume_after_a_kill_matches_an_uninterrupted_run(tmp_path, blobs):
    tunet(*blobs, tmp_path / "full", steps=4)
    tunet(*blobs, tmp_path / "part", steps=2, checkpoint_every=2)
    tunet(*blobs, tmp_path / "part", steps=4, resume=True)
    a = load_file(str(tmp_path / "full" / "unet" / WEIGHTS_FILE))
    b = load_file(str(tmp_path / "part" / "unet" / WEIGHTS_FILE))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any("running_mean" in k for k in a)  # batch-norm statistics are saved (and resumed) too


def test_ema_off_exports_the_trained_weights(tmp_path, blobs):
    tunet(*blobs, tmp_path / "m", steps=3, ema_decay=0.0)
    state = torch.load(tmp_path / "m" / "training" / "unet" / "state.pt", weights_only=True)
    w = load_file(str(tmp_path / "m" / "unet" / WEIGHTS_FILE))
    assert all(torch.equal(w[k], state["model"][k]) for k in w)


def test_generated_pairs_mixed_into_every_batch(tmp_path):
    real = make_blobs(tmp_path / "real", n=2)
    gen = make_blobs(tmp_path / "gen", n=3, seed=9, name="gen")
    tunet(*real, tmp_path / "m", extra_images=gen[0], extra_masks=gen[1], extra_fraction=0.5, batch_size=4)
    card = json.loads((tmp_path / "m" / "model.json").read_text())
    assert card["extra_training_data"]["images"] == 3
    assert card["extra_training_data"]["fraction_of_batch"] == 0.5


def test_generated_only_with_a_separate_validation_set(tmp_path):
    gen = make_blobs(tmp_path / "gen", n=3, name="gen")
    val = make_blobs(tmp_path / "val", n=2, seed=3)
    tunet(*gen, tmp_path / "m", val_images=val[0], val_masks=val[1])
    card = json.loads((tmp_path / "m" / "model.json").read_text())
    assert card["validation"]["images"] == 2
    assert "separate validation" in card["training_data"]["validation"]


def test_binary_masks_and_no_interior(tmp_path):
    imgs, masks = make_blobs(tmp_path / "d", n=2)
    bdir = tmp_path / "binary"
    bdir.mkdir()
    for f in sorted(masks.iterdir()):
        tifffile.imwrite(bdir / f.name, (tifffile.imread(f) > 0).astype(np.uint8) * 255)
    tunet(imgs, bdir, tmp_path / "m", interior=False)
    seg = Segmenter.load(tmp_path / "m", "cpu")
    assert seg.outputs == ["foreground"] and not seg.has_interior
    r = seg.segment(tifffile.imread(next(imgs.iterdir())), tile=64, overlap=16)
    assert r.provenance["labels_from"] == "connected components"


def test_torchrun_two_processes(tmp_path):
    imgs, masks = make_blobs(tmp_path / "d", n=2)
    proc = torchrun_cli("train", "unet", "--images", imgs, "--masks", masks, "--out", tmp_path / "u", "--size", "tiny",
                        "--steps", "3", "--batch-size", "2", "--crop", "32", "--tile", "64", "--overlap", "16",
                        "--device", "cpu")
    assert proc.stdout.count("trained U-Net: 3 steps") == 1
    info = json.loads((tmp_path / "u" / "unet" / "stage.json").read_text())
    assert info["training"]["world_size"] == 2


# ----------------------------------------------------------------------------- CLI
def test_cli_trains_and_segments_a_stack(tmp_path, capsys):
    imgs, masks = make_blobs(tmp_path / "d", n=2)
    assert cli.main(["-q", "train", "unet", "--images", str(imgs), "--masks", str(masks), "--out",
                     str(tmp_path / "m"), "--size", "tiny", "--steps", "3", "--batch-size", "2", "--crop", "32",
                     "--tile", "64", "--overlap", "16", "--device", "cpu", "--inner", "interior"]) == 0
    assert "trained U-Net: 3 steps" in capsys.readouterr().out
    assert json.loads((tmp_path / "m" / "model.json").read_text())["outputs"] == ["foreground", "interior"]
    stack = np.stack([tifffile.imread(f) for f in sorted(imgs.iterdir())])
    tifffile.imwrite(tmp_path / "stack.tif", stack)
    out, prob = tmp_path / "o" / "labels.tif", tmp_path / "o" / "prob.tif"
    assert cli.main(["-q", "segment", "--model", str(tmp_path / "m"), "--in", str(tmp_path / "stack.tif"),
                     "--out", str(out), "--prob-out", str(prob), "--tile", "64", "--overlap", "16",
                     "--threshold", "0.5", "--min-size", "4", "--device", "cpu"]) == 0
    said = capsys.readouterr().out
    lab, p = tifffile.imread(out), tifffile.imread(prob)
    assert lab.shape == p.shape == stack.shape and lab.dtype == np.int32 and p.dtype == np.float32
    prov = read_provenance(out)
    assert prov["model"] == "m" and prov["tile"] == 64 and prov["objects"] == lab.max()
    assert prov["input"] == str(tmp_path / "stack.tif") and prov["content"] == "instance labels"
    assert prov["labels_from"] == "watershed from interiors"
    assert read_provenance(prob)["labels"] == str(out)
    assert f"{prov['objects']} objects" in said
    assert sorted(x.name for x in out.parent.iterdir()) == ["labels.tif", "prob.tif"]  # no temporary files


def test_cli_segments_a_generated_stack_with_its_provenance(tiny_segmenter, tiny_paired, tmp_path, capsys):
    gen = tmp_path / "gen.tif"
    assert cli.main(["-q", "em", "generate", "--model", str(tiny_paired), "--n", "2", "--steps", "2",
                     "--device", "cpu", "--out", str(gen)]) == 0
    out = tmp_path / "lab.tif"
    assert cli.main(["-q", "segment", "--model", str(tiny_segmenter), "--in", str(gen), "--out", str(out),
                     "--tile", "64", "--overlap", "16", "--device", "cpu"]) == 0
    prov = read_provenance(out)
    assert prov["input_provenance"]["kind"].startswith("zfdiffusion")
    assert tifffile.imread(out).shape == tifffile.imread(gen).shape


def test_cli_bad_input_is_one_line_and_leaves_nothing(tiny_segmenter, tmp_path, capsys):
    tifffile.imwrite(tmp_path / "4d.tif", np.zeros((2, 2, 40, 40), np.uint8))
    out = tmp_path / "o" / "l.tif"
    assert cli.main(["-q", "segment", "--model", str(tiny_segmenter), "--in", str(tmp_path / "4d.tif"),
                     "--out", str(out), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "dimensions" in err and err.count("\n") == 1
    assert not out.exists() and not any(out.parent.glob("*.part"))
    assert cli.main(["-q", "segment", "--model", str(tiny_segmenter), "--in", str(tmp_path / "none.tif"),
                     "--out", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_cli_segment_with_a_generator_folder(tiny_latent, tmp_path, capsys):
    tifffile.imwrite(tmp_path / "i.tif", np.zeros((40, 40), np.uint8))
    assert cli.main(["-q", "segment", "--model", str(tiny_latent), "--in", str(tmp_path / "i.tif"),
                     "--out", str(tmp_path / "l.tif")]) == 2
    assert "'latent' model" in capsys.readouterr().err


# ----------------------------------------------------------------------------- bad training input
def test_empty_masks(tmp_path):
    imgs, masks = make_blobs(tmp_path / "d", n=2)
    for f in masks.iterdir():
        tifffile.imwrite(f, np.zeros_like(tifffile.imread(f)))
    with pytest.raises(UserInputError, match="every mask is empty"):
        tunet(imgs, masks, tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_some_empty_masks_give_a_notice(tmp_path, capsys):
    imgs, masks = make_blobs(tmp_path / "d", n=2)
    f = sorted(masks.iterdir())[0]
    tifffile.imwrite(f, np.zeros_like(tifffile.imread(f)))
    tunet(imgs, masks, tmp_path / "m", steps=1)
    assert "1 of 2 mask(s) are empty" in capsys.readouterr().out


def test_mask_of_another_shape(tmp_path):
    imgs, masks = make_blobs(tmp_path / "d", n=2)
    f = sorted(masks.iterdir())[0]
    tifffile.imwrite(f, tifffile.imread(f)[:-3])
    with pytest.raises(UserInputError, match="each mask must have its image's shape"):
        tunet(imgs, masks, tmp_path / "m")


def test_masks_are_needed(tmp_path, blobs):
    with pytest.raises(UserInputError, match="--masks is needed"):
        tunet(blobs[0], None, tmp_path / "m")
    with pytest.raises(UserInputError, match="together"):
        tunet(*blobs, tmp_path / "m", extra_images=blobs[0])


def test_images_smaller_than_the_crop(tmp_path):
    imgs, masks = make_blobs(tmp_path / "d", n=2, shape=(24, 30))
    with pytest.raises(UserInputError, match="smaller than"):
        tunet(imgs, masks, tmp_path / "m")


def test_rgb_training_images_are_converted(tmp_path, capsys):
    imgs, masks = make_blobs(tmp_path / "d", n=2)
    for f in imgs.iterdir():
        tifffile.imwrite(f, np.repeat(tifffile.imread(f)[..., None], 3, axis=-1))
    tunet(imgs, masks, tmp_path / "m", steps=1)
    assert "converted to grayscale" in capsys.readouterr().out


def test_resume_with_other_outputs(tmp_path, blobs):
    tunet(*blobs, tmp_path / "m", steps=2)
    with pytest.raises(UserInputError, match="outputs"):
        tunet(*blobs, tmp_path / "m", steps=3, interior=False, resume=True)


@pytest.mark.parametrize("kw, match", [(dict(size="huge"), "size"), (dict(crop=40), "crop"),
                                       (dict(extra_fraction=2.0), "extra-fraction"), (dict(steps=0), "steps"),
                                       (dict(ema_decay=1.0), "ema-decay"), (dict(val_fraction=1.0), "val-fraction")])
def test_bad_options(tmp_path, blobs, kw, match):
    with pytest.raises(UserInputError, match=match):
        tunet(*blobs, tmp_path / "m", **kw)


def test_segmentation_models_are_listed(tiny_segmenter, monkeypatch, tmp_path):
    import shutil

    from napari_zfdiffusion.core.store import user_models_dir

    shutil.copytree(tiny_segmenter, user_models_dir() / "my-unet")
    kinds = {m.name: m.kind for m in list_models()}
    assert kinds["my-unet"] == "segmentation"


def test_cli_segment_takes_its_defaults_from_the_model_card(tiny_segmenter, tmp_path, capsys):
    """The tiny model's card says tile 64 and overlap 16 (the widget reads the same card)."""
    imgs, _ = make_blobs(tmp_path / "d", n=1)
    assert cli.main(["-q", "segment", "--model", str(tiny_segmenter), "--in", str(next(imgs.iterdir())),
                     "--out", str(tmp_path / "l.tif"), "--device", "cpu"]) == 0
    prov = read_provenance(tmp_path / "l.tif")
    assert (prov["tile"], prov["overlap"], prov["threshold"], prov["min_size"]) == (64, 16, 0.5, 16)


# ----------------------------------------------------------------------------- fine-tuning
def test_fine_tuning_starts_from_the_model_and_keeps_its_outputs(tiny_segmenter, tmp_path, capsys):
    """`train unet --init-from MODEL`: the network starts as MODEL's (the first loss is MODEL's loss,
    far below a fresh network's), keeps what its second output means even when asked otherwise,
    and the card names the parent."""
    imgs, masks = make_blobs(tmp_path / "d", n=2, seed=7)
    parent = json.loads((tiny_segmenter / "model.json").read_text())
    s = tunet(imgs, masks, tmp_path / "ft", steps=3, init_from=str(tiny_segmenter), inner="interior", size="small")
    card = json.loads((tmp_path / "ft" / "model.json").read_text())
    assert card["outputs"] == parent["outputs"] == ["foreground", "center"]
    assert card["fine_tuned_from"]["name"] == "tiny-unet" and card["fine_tuned_from"]["steps"] == parent["steps"]
    assert Segmenter.load(tmp_path / "ft", "cpu").net.config.channels == [8, 16]  # the parent's size, not --size
    fresh = tunet(imgs, masks, tmp_path / "fresh", steps=3, size="tiny")
    first = [log(tmp_path / f)[0]["loss"] for f in ("ft", "fresh")]
    assert first[0] < 0.85 * first[1], first  # (BCE of soft centre targets has a floor well above 0)
    a = load_file(str(tiny_segmenter / "unet" / WEIGHTS_FILE))
    b = load_file(str(tmp_path / "ft" / "unet" / WEIGHTS_FILE))
    assert any(not torch.equal(a[k], b[k]) for k in a)  # it did learn
    assert s["steps"] == 3


def test_a_fine_tuned_model_keeps_its_parents_seed_and_join_thresholds(tiny_segmenter, tmp_path):
    parent = tmp_path / "parent"
    shutil.copytree(tiny_segmenter, parent)
    card = json.loads((parent / "model.json").read_text())
    (parent / "model.json").write_text(json.dumps({**card, "seed_threshold": 0.4, "join_threshold": 0.25}))
    imgs, masks = make_blobs(tmp_path / "d", n=2, seed=7)
    tunet(imgs, masks, tmp_path / "ft", steps=1, init_from=str(parent))
    ft = json.loads((tmp_path / "ft" / "model.json").read_text())
    assert ft["seed_threshold"] == 0.4 and "seed_threshold" not in ft["fine_tuned_from"]
    assert ft["join_threshold"] == 0.25 and "join_threshold" not in ft["fine_tuned_from"]


def test_fine_tuning_from_a_model_that_is_not_a_segmenter(tiny_latent, tmp_path, capsys, blobs):
    assert cli.main(["-q", "train", "unet", "--images", str(blobs[0]), "--masks", str(blobs[1]), "--out",
                     str(tmp_path / "m"), "--init-from", str(tiny_latent), "--steps", "2", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "segmentation" in err and "Traceback" not in err and not (tmp_path / "m").exists()


def test_edited_planes_are_the_ones_a_person_changed():
    from napari_zfdiffusion.core.segment.finetune import edited_planes, plane_checksums

    lab = np.zeros((3, 20, 20), np.int32)
    lab[:, 5:9, 5:9] = 1
    sums = plane_checksums(lab)
    assert edited_planes(lab, sums) == []
    lab[1, 12:15, 12:15] = 2  # a painted object
    lab[2, 5:7, 5:9] = 0  # a corrected outline
    assert edited_planes(lab, sums) == [1, 2]
    assert edited_planes(lab[0], plane_checksums(lab[0])) == []  # 2D
    assert edited_planes(lab, None) == [0, 1, 2]  # no record of the model's labels: every plane with objects
    lab[0] = 0
    assert edited_planes(lab, None) == [1, 2]


def test_fine_tuning_on_corrected_planes_changes_the_prediction(tiny_segmenter, tmp_path, monkeypatch):
    import tempfile

    from napari_zfdiffusion.core.segment.finetune import fine_tune

    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))

    imgs, masks = make_blobs(tmp_path / "d", n=2, seed=11)
    images = [tifffile.imread(f) for f in sorted(imgs.iterdir())]
    labels = [tifffile.imread(f).astype(np.int32) for f in sorted(masks.iterdir())]
    seen = []
    s = fine_tune(tiny_segmenter, images, labels, tmp_path / "ft", steps=4, device="cpu", callback=seen.append)
    assert s["steps"] == 4 and [p.step for p in seen][-1] == 4
    before = Segmenter.load(tiny_segmenter, "cpu").predict(images[0][None], tile=64, overlap=16)
    after = Segmenter.load(tmp_path / "ft", "cpu").predict(images[0][None], tile=64, overlap=16)
    assert np.abs(after - before).max() > 1e-3
    assert not list((tmp_path / "tmp").iterdir())  # the temporary planes are gone


@pytest.mark.parametrize("case, match", [
    ("no planes", "at least one corrected plane"),
    ("shapes", "same shape"),
    ("floats", "integers"),
    ("empty", "no objects"),
    ("small", "at least 32x32"),
    ("exists", "already holds files"),
])
def test_fine_tuning_bad_input(tiny_segmenter, tmp_path, case, match):
    from napari_zfdiffusion.core.segment.finetune import fine_tune

    img = np.random.default_rng(0).random((64, 64)).astype(np.float32)
    lab = np.zeros((64, 64), np.int32)
    lab[10:20, 10:20] = 1
    images, labels, out = [img], [lab], tmp_path / "ft"
    if case == "no planes":
        images, labels = [], []
    elif case == "shapes":
        labels = [lab[:50]]
    elif case == "floats":
        labels = [lab.astype(np.float32)]
    elif case == "empty":
        labels = [np.zeros_like(lab)]
    elif case == "small":
        images, labels = [img[:20, :20]], [lab[:20, :20]]
    elif case == "exists":
        out.mkdir()
        (out / "something.txt").write_text("mine")
    with pytest.raises(UserInputError, match=match):
        fine_tune(tiny_segmenter, images, labels, out, steps=2, device="cpu")
    if case == "exists":
        assert (out / "something.txt").read_text() == "mine"


def test_fine_tune_evaluation_picks_planes_apart():
    from napari_zfdiffusion.evaluation.finetune import picks

    for n in (1, 2, 4):
        for seed in range(3):
            p = picks(74, n, seed)
            assert len(p) == n and all(0 <= i < 74 for i in p)
            if n > 1:
                assert min(np.diff(p)) >= 74 // n - 1
    assert picks(74, 2, 0) != picks(74, 2, 1)
