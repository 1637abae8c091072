"""Training the patch models (autoencoder, latent UNet), their CLI, and one test per bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image
from safetensors.torch import load_file

from napari_zfdiffusion import cli
from napari_zfdiffusion.core.errors import UserInputError
from napari_zfdiffusion.core.io import read_provenance
from napari_zfdiffusion.core.latent import Autoencoder, LatentModel
from napari_zfdiffusion.core.store import WEIGHTS_FILE, model_kind
from napari_zfdiffusion.core.latent.train import LdmConfig, VaeConfig, train_ldm, train_vae

from conftest import make_blobs, make_tiny_cascade, torchrun_cli


def vcfg(**kw) -> VaeConfig:
    base = dict(size="tiny", steps=4, batch_size=2, patch_size=32, log_every=1, checkpoint_every=100, warmup=2)
    base.update(kw)
    return VaeConfig(**base)


def lcfg(**kw) -> LdmConfig:
    base = dict(size="tiny", steps=3, batch_size=2, bank=8, log_every=1, checkpoint_every=100, warmup=2)
    base.update(kw)
    return LdmConfig(**base)


def tvae(images, out, masks=None, resume=False, **kw):
    return train_vae(images, out, vcfg(**kw), masks=masks, device="cpu", resume=resume, show_progress=False)


def tldm(vae, images, out, masks=None, resume=False, **kw):
    return train_ldm(vae, images, out, lcfg(**kw), masks=masks, device="cpu", resume=resume, show_progress=False)


@pytest.fixture(scope="module")
def paired_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("paired")
    imgs, masks = make_blobs(root / "data", n=5)
    tvae(imgs, root / "vae", masks)
    tldm(root / "vae", imgs, root / "ldm", masks)
    return imgs, masks, root / "vae", root / "ldm"


# ----------------------------------------------------------------------------- smoke
def test_vae_and_ldm_train_into_loadable_folders(paired_models):
    imgs, masks, vae, ldm = paired_models
    card = json.loads((vae / "model.json").read_text())
    assert card["kind"] == "vae" and card["channels"] == ["image", "mask"]
    assert card["mask_encoding"] == "interior" and card["downsampling"] == 2
    assert card["scaling_factor"] > 0 and set(card["validation"]) >= {"mse", "psnr", "ssim", "mask_dice"}
    assert card["training_data"]["validation"] == "last 1 of 5 images held out"
    assert model_kind(vae) == "vae" and model_kind(ldm) == "latent"
    lcard = json.loads((ldm / "model.json").read_text())
    assert lcard["latent_shape"] == [4, 16, 16] and lcard["unet_steps"] == 3
    r = LatentModel.load(ldm, "cpu").generate(2, steps=2)
    assert r.images.shape == r.labels.shape == (2, 32, 32)
    log = [json.loads(x) for x in (vae / "training" / "vae" / "log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in log if "loss" in x] == [1, 2, 3, 4]
    assert any("validation" in x for x in log)


def test_vae_recipe_is_in_the_card_and_the_weights(tmp_path, blobs):
    """The discriminator's and the spectrum term's weights, the padding and the validation spectra are in the
    card; the loaded network pads by replication; the discriminator's state is saved with the checkpoint."""
    tvae(blobs[0], tmp_path / "v", steps=4, disc_start=1)
    card = json.loads((tmp_path / "v" / "model.json").read_text())
    assert card["loss_weights"] == {"mse": 1.0, "kl_beta": 1e-4, "log_spectrum": 0.1, "adversarial": 0.5,
                                    "adversarial_from_step": 1}
    assert card["conv_padding"] == "replicate" and "patch-discriminator" in card["loss"]
    assert {"spectrum_ratio_min", "spectrum_ratio_max", "edge_minus_centre_shift"} <= set(card["validation"])
    vae = Autoencoder.load(tmp_path / "v", "cpu").vae
    pads = {m.padding_mode for m in vae.modules() if isinstance(m, torch.nn.Conv2d) and max(m.padding) > 0}
    assert pads == {"replicate"}
    state = torch.load(tmp_path / "v" / "training" / "vae" / "state.pt", weights_only=True)
    assert set(state["extra"]) == {"disc", "disc_optimizer", "disc_from"} and int(state["extra"]["disc_from"]) == 1


def test_plain_recipe_has_no_discriminator(tmp_path, blobs):
    tvae(blobs[0], tmp_path / "v", steps=2, disc_weight=0.0, spectrum_weight=0.0, conv_padding="zeros")
    card = json.loads((tmp_path / "v" / "model.json").read_text())
    assert card["loss"] == "MSE + beta * KL (KL per latent element)" and card["conv_padding"] == "zeros"
    assert "extra" not in torch.load(tmp_path / "v" / "training" / "vae" / "state.pt", weights_only=True)


def test_vae_resume_with_the_discriminator_matches_an_uninterrupted_run(tmp_path, blobs):
    tvae(blobs[0], tmp_path / "full", steps=6, disc_start=1)
    tvae(blobs[0], tmp_path / "part", steps=3, checkpoint_every=3, disc_start=1)
    tvae(blobs[0], tmp_path / "part", steps=6, disc_start=1, resume=True)
    a = load_file(str(tmp_path / "full" / "vae" / WEIGHTS_FILE))
    b = load_file(str(tmp_path / "part" / "vae" / WEIGHTS_FILE))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_vae_training_reduces_the_loss(tmp_path, blobs):
    # the adversarial term is a game, not a loss that falls: the reconstruction terms alone here
    s = tvae(blobs[0], tmp_path / "v", steps=30, lr=2e-3, log_every=5, disc_weight=0.0)
    log = [json.loads(x) for x in (tmp_path / "v" / "training" / "vae" / "log.jsonl").read_text().splitlines()]
    losses = [x["loss"] for x in log if "loss" in x]
    assert losses[-1] < losses[0] and np.isfinite(s["loss"])


def test_vae_resume_after_a_kill_matches_an_uninterrupted_run(tmp_path, blobs):
    # the default --disc-start is a quarter of the first run's --steps: the same for both runs here
    tvae(blobs[0], tmp_path / "full", steps=4, disc_start=1)
    tvae(blobs[0], tmp_path / "part", steps=2, checkpoint_every=2, disc_start=1)
    tvae(blobs[0], tmp_path / "part", steps=4, resume=True)
    a = load_file(str(tmp_path / "full" / "vae" / WEIGHTS_FILE))
    b = load_file(str(tmp_path / "part" / "vae" / WEIGHTS_FILE))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_ldm_resume_after_a_kill_matches_an_uninterrupted_run(tmp_path, paired_models):
    imgs, masks, vae, _ = paired_models
    tldm(vae, imgs, tmp_path / "full", masks, steps=4)
    tldm(vae, imgs, tmp_path / "part", masks, steps=2, checkpoint_every=2)
    tldm(vae, imgs, tmp_path / "part", masks, steps=4, resume=True)
    a = load_file(str(tmp_path / "full" / "unet" / WEIGHTS_FILE))
    b = load_file(str(tmp_path / "part" / "unet" / WEIGHTS_FILE))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_training_into_a_folder_with_state_needs_resume(tmp_path, blobs):
    tvae(blobs[0], tmp_path / "v", steps=1)
    with pytest.raises(UserInputError, match="--resume"):
        tvae(blobs[0], tmp_path / "v", steps=1)


# ----------------------------------------------------------------------------- CLI
def test_cli_trains_and_generates_with_masks(tmp_path, capsys):
    imgs, masks = make_blobs(tmp_path / "d", n=2)
    common = ["--images", str(imgs), "--masks", str(masks), "--size", "tiny", "--steps", "2", "--batch-size", "2",
              "--device", "cpu"]
    assert cli.main(["-q", "train", "vae", *common, "--out", str(tmp_path / "vae"), "--patch-size", "32"]) == 0
    assert "trained autoencoder: 2 steps" in capsys.readouterr().out
    assert cli.main(["-q", "train", "ldm", *common, "--vae", str(tmp_path / "vae"), "--bank", "4",
                     "--out", str(tmp_path / "ldm")]) == 0
    out, mk, pr = tmp_path / "p.tif", tmp_path / "m.tif", tmp_path / "pr.tif"
    assert cli.main(["-q", "em", "generate", "--model", str(tmp_path / "ldm"), "--n", "3", "--steps", "2",
                     "--seed", "4", "--device", "cpu", "--out", str(out), "--masks-out", str(mk),
                     "--prob-out", str(pr)]) == 0
    stdout = capsys.readouterr().out
    assert "(3, 32, 32)" in stdout and "instance labels" in stdout
    images, labels = tifffile.imread(out), tifffile.imread(mk)
    assert images.shape == labels.shape == tifffile.imread(pr).shape == (3, 32, 32)
    assert labels.dtype == np.int32
    prov = read_provenance(out)
    assert prov["kind"] == "zfdiffusion.latent" and prov["seeds"] == [4, 5, 6] and prov["steps"] == 2
    assert read_provenance(mk)["content"] == "instance labels"


def test_cli_masks_out_needs_a_paired_model(tiny_latent, tmp_path, capsys):
    rc = cli.main(["-q", "em", "generate", "--model", str(tiny_latent), "--steps", "1", "--device", "cpu",
                   "--out", str(tmp_path / "p.tif"), "--masks-out", str(tmp_path / "m.tif")])
    err = capsys.readouterr().err
    assert rc == 2 and "paired" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "p.tif").exists()


@pytest.mark.slow
def test_torchrun_two_processes_train_the_autoencoder(tmp_path):
    imgs, _ = make_blobs(tmp_path / "d", n=4)
    proc = torchrun_cli("train", "vae", "--images", imgs, "--out", tmp_path / "v", "--size", "tiny", "--steps", "3",
                        "--batch-size", "2", "--patch-size", "32", "--device", "cpu")
    assert proc.stdout.count("trained autoencoder: 3 steps") == 1
    info = json.loads((tmp_path / "v" / "vae" / "stage.json").read_text())
    assert info["training"]["world_size"] == 2


# ----------------------------------------------------------------------------- bad input
def test_rgb_images_are_converted_with_a_notice(tmp_path, capsys):
    folder = tmp_path / "rgb"
    folder.mkdir()
    rgb = (np.random.default_rng(0).random((40, 40, 3)) * 255).astype(np.uint8)
    Image.fromarray(rgb).save(folder / "a.png")
    tvae(folder, tmp_path / "v", steps=1)
    assert "converted to grayscale" in capsys.readouterr().out
    assert json.loads((tmp_path / "v" / "model.json").read_text())["channels"] == ["image"]


def test_rgba_is_converted_too(tmp_path, capsys):
    folder = tmp_path / "rgba"
    folder.mkdir()
    Image.fromarray(np.full((40, 40, 4), 128, np.uint8)).save(folder / "a.png")
    tvae(folder, tmp_path / "v", steps=1)
    assert "alpha dropped" in capsys.readouterr().out


def test_images_smaller_than_the_patch(tmp_path):
    imgs, _ = make_blobs(tmp_path / "d", n=1, shape=(20, 60), masks=False)
    with pytest.raises(UserInputError, match="smaller than the 32x32"):
        tvae(imgs, tmp_path / "v")
    assert not (tmp_path / "v").exists()


def test_mask_of_another_shape(tmp_path):
    imgs, masks = make_blobs(tmp_path / "d", n=1)
    tifffile.imwrite(next(masks.iterdir()), np.zeros((40, 40), np.uint16))
    with pytest.raises(UserInputError, match="must have its image's shape"):
        tvae(imgs, tmp_path / "v", masks=masks)


def test_mask_count_mismatch(tmp_path):
    imgs, masks = make_blobs(tmp_path / "d", n=2)
    next(masks.iterdir()).unlink()
    with pytest.raises(UserInputError, match="one mask per image"):
        tvae(imgs, tmp_path / "v", masks=masks)


def test_binary_masks_train_a_binary_model(tmp_path):
    imgs, masks = make_blobs(tmp_path / "d", n=1)
    for f in masks.iterdir():
        tifffile.imwrite(f, ((tifffile.imread(f) > 0) * 255).astype(np.uint8))
    tvae(imgs, tmp_path / "v", masks=masks, steps=1)
    assert json.loads((tmp_path / "v" / "model.json").read_text())["mask_encoding"] == "binary"


def test_ldm_masks_with_an_image_only_autoencoder(tmp_path, blobs):
    tvae(blobs[0], tmp_path / "v", steps=1)
    with pytest.raises(UserInputError, match="images only"):
        tldm(tmp_path / "v", blobs[0], tmp_path / "l", masks=blobs[1])


def test_ldm_without_masks_for_a_paired_autoencoder(paired_models, tmp_path):
    imgs, _, vae, _ = paired_models
    with pytest.raises(UserInputError, match="pass --masks"):
        tldm(vae, imgs, tmp_path / "l")


def test_corrupted_autoencoder_weights(tiny_latent, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_latent, bad)
    (bad / "vae" / WEIGHTS_FILE).write_bytes(b"not safetensors")
    with pytest.raises(UserInputError, match="not the one|corrupted"):
        LatentModel.load(bad, "cpu")
    card = json.loads((bad / "model.json").read_text())
    del card["vae_sha256"]
    (bad / "model.json").write_text(json.dumps(card))
    with pytest.raises(UserInputError, match="corrupted"):
        LatentModel.load(bad, "cpu")


def test_mismatched_autoencoder(tiny_latent, tiny_paired, tmp_path):
    import shutil

    bad = tmp_path / "mixed"
    shutil.copytree(tiny_latent, bad)
    shutil.rmtree(bad / "vae")
    shutil.copytree(tiny_paired / "vae", bad / "vae")
    with pytest.raises(UserInputError, match="not the one this diffusion model was trained with"):
        LatentModel.load(bad, "cpu")


def test_a_cascade_is_not_a_patch_model(tmp_path):
    cas = make_tiny_cascade(tmp_path / "cas", stages=("base",))
    with pytest.raises(UserInputError, match="is a depth cascade, not a patch model"):
        LatentModel.load(cas, "cpu")
    with pytest.raises(UserInputError, match="is a depth cascade"):
        Autoencoder.load(cas, "cpu")
    (cas / "cascade.json").unlink()
    with pytest.raises(UserInputError, match="not a patch model folder"):
        LatentModel.load(cas, "cpu")


def test_a_vae_folder_cannot_generate(paired_models):
    with pytest.raises(UserInputError, match="'vae' model"):
        LatentModel.load(paired_models[2], "cpu")


def test_resume_with_other_channels(tmp_path, blobs):
    tvae(blobs[0], tmp_path / "v", steps=2, checkpoint_every=1)
    with pytest.raises(UserInputError, match="channel"):
        tvae(blobs[0], tmp_path / "v", masks=blobs[1], steps=3, resume=True)


def test_corrupt_training_state_on_resume(tmp_path, blobs):
    tvae(blobs[0], tmp_path / "v", steps=1)
    (tmp_path / "v" / "training" / "vae" / "state.pt").write_bytes(b"garbage")
    with pytest.raises(UserInputError, match="corrupted"):
        tvae(blobs[0], tmp_path / "v", steps=2, resume=True)


@pytest.mark.parametrize(("kw", "match"), [
    ({"size": "huge"}, "unknown autoencoder size"), ({"beta": -1.0}, "--beta"), ({"crop": 8}, "--crop"),
    ({"steps": 0}, "--steps"), ({"spectrum_weight": -1.0}, "--spectrum-weight"), ({"disc_weight": -0.1}, "--disc-weight"),
    ({"disc_start": -5}, "--disc-start"), ({"conv_padding": "circular"}, "--padding"), ({"latent_channels": 0}, "--latent-channels"),
])
def test_bad_vae_options(tmp_path, blobs, kw, match):
    with pytest.raises(UserInputError, match=match):
        tvae(blobs[0], tmp_path / "v", **kw)


def test_images_path_missing(tmp_path):
    with pytest.raises(UserInputError, match="does not exist"):
        tvae(tmp_path / "nowhere", tmp_path / "v")


def test_roundtrip_refuses_rgb_and_nan(tiny_latent):
    ae = Autoencoder.load(tiny_latent, "cpu")
    with pytest.raises(UserInputError, match="RGB"):
        ae.roundtrip(np.zeros((32, 32, 3), np.uint8))
    bad = np.zeros((32, 32), np.float32)
    bad[0, 0] = np.nan
    with pytest.raises(UserInputError, match="NaN"):
        ae.roundtrip(bad)
    with pytest.raises(UserInputError, match="2D"):
        ae.roundtrip(np.zeros((2, 32, 32)))


def test_no_half_written_model_on_bad_input(tmp_path):
    imgs, masks = make_blobs(tmp_path / "d", n=1)
    tifffile.imwrite(next(masks.iterdir()), np.zeros((10, 10), np.uint16))
    with pytest.raises(UserInputError):
        tvae(imgs, tmp_path / "v", masks=masks)
    assert not Path(tmp_path / "v" / "model.json").exists()
