"""Latent diffusion for patches: shapes, masks, determinism, encode/decode, the scale factor (no Qt)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_zfdiffusion.core.errors import Cancelled, UserInputError
from napari_zfdiffusion.core.latent import Autoencoder, LatentModel
from napari_zfdiffusion.core.latent.autoencoder import build_autoencoder
from napari_zfdiffusion.core.masks import encode_mask, labels_from_mask, mask_encoding
from napari_zfdiffusion.core.training.patches import PatchData
from napari_zfdiffusion.core.diffusion.sampling import make_scheduler
from napari_zfdiffusion.core.latent.train import measure_scaling

from conftest import make_blobs


# ----------------------------------------------------------------------------- autoencoder
@pytest.mark.parametrize(("size", "factor"), [("tiny", 2), ("small", 8)])
def test_autoencoder_latent_shape(size, factor):
    vae = build_autoencoder(2, size).eval()
    with torch.no_grad():
        post = vae.encode(torch.zeros(1, 2, 256, 256)).latent_dist
        rec = vae.decode(post.mode()).sample
    assert post.mode().shape == (1, 4, 256 // factor, 256 // factor)
    assert rec.shape == (1, 2, 256, 256)


def test_forward_returns_reconstruction_and_kl():
    vae = build_autoencoder(1, "tiny")
    rec, kl = vae(torch.zeros(3, 1, 16, 16), generator=torch.Generator().manual_seed(0))
    assert rec.shape == (3, 1, 16, 16) and kl.shape == (3,) and torch.all(kl >= 0)


def test_roundtrip_keeps_the_shape_of_any_image(tiny_latent):
    ae = Autoencoder.load(tiny_latent, "cpu")
    img = np.random.default_rng(0).integers(0, 4000, (33, 47)).astype(np.uint16)
    rec, fig = ae.roundtrip(img)
    assert rec.shape == (33, 47) and rec.dtype == np.float32
    assert 0.0 <= rec.min() and rec.max() <= 1.0
    assert set(fig) >= {"mse", "psnr", "ssim", "latent_shape"} and fig["latent_shape"] == [4, 17, 24]


def test_roundtrip_of_a_paired_model_encodes_an_empty_mask(tiny_paired):
    rec, _ = Autoencoder.load(tiny_paired, "cpu").roundtrip(np.ones((32, 32)) * np.arange(32))
    assert rec.shape == (32, 32)


def test_scaling_factor_gives_unit_variance_latents(blobs):
    data = PatchData.from_paths(blobs[0], patch=32)
    vae = build_autoencoder(1, "tiny").eval()
    scale = measure_scaling(vae, data, 32, n=32)
    with torch.no_grad():
        x = data.random_crops(64, 32, torch.Generator().manual_seed(5), augment=False)
        z = vae.encode(x).latent_dist.sample(torch.Generator().manual_seed(6)) * scale
    assert z.std().item() == pytest.approx(1.0, abs=0.15)


# ----------------------------------------------------------------------------- generation
def test_generate_images_only(tiny_latent):
    r = LatentModel.load(tiny_latent, "cpu").generate(3, steps=2, seed=1)
    assert r.images.shape == (3, 32, 32) and r.images.dtype == np.float32
    assert r.masks is None and r.labels is None
    assert r.provenance["seeds"] == [1, 2, 3] and r.provenance["paired"] is False


def test_generate_paired_gives_aligned_masks_and_labels(tiny_paired):
    r = LatentModel.load(tiny_paired, "cpu").generate(2, steps=2, seed=0, min_size=1)
    assert r.images.shape == r.masks.shape == r.labels.shape == (2, 32, 32)
    assert r.labels.dtype == np.int32 and r.masks.min() >= 0 and r.masks.max() <= 1
    expected = labels_from_mask(r.masks, encoding="interior", threshold=0.5, min_size=1)
    np.testing.assert_array_equal(r.labels, expected)


def test_same_seed_same_patches_whatever_the_batch(tiny_paired):
    m = LatentModel.load(tiny_paired, "cpu")
    a = m.generate(3, steps=3, seed=7, batch=3)
    b = m.generate(3, steps=3, seed=7, batch=1)
    c = m.generate(1, steps=3, seed=8)
    np.testing.assert_allclose(a.images, b.images, atol=1e-5)
    np.testing.assert_allclose(a.images[1], c.images[0], atol=1e-5)
    assert not np.allclose(a.images[0], a.images[1])


@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "dpmsolver++"])
def test_every_sampler_runs_without_clipping_latents(tiny_latent, sampler):
    assert make_scheduler(sampler, clip=False).config.get("clip_sample", False) is False
    assert make_scheduler(sampler, clip=False).config.get("thresholding", False) is False
    r = LatentModel.load(tiny_latent, "cpu").generate(1, steps=2, sampler=sampler)
    assert np.isfinite(r.images).all()


def test_progress_covers_sampling_then_decoding_and_cancel_stops(tiny_latent):
    m = LatentModel.load(tiny_latent, "cpu")
    seen = []
    m.generate(3, steps=2, batch=2, callback=seen.append)
    stages = [p.stage for p in seen]
    assert stages.index("decode") > stages.index("sample")
    assert [p.step for p in seen if p.stage == "sample"] == [1, 2, 3, 4]
    assert seen[-1].fraction == pytest.approx(1.0)

    calls = []

    def stop(p):
        calls.append(p)
        raise Cancelled("stop")

    with pytest.raises(Cancelled):
        m.generate(2, steps=5, callback=stop)
    assert len(calls) == 1


@pytest.mark.parametrize(("kw", "match"), [
    ({"n": 0}, "at least 1"), ({"steps": 0}, "steps"), ({"threshold": 1.5}, "threshold"),
    ({"sampler": "euler"}, "unknown sampler"), ({"seed": -1}, "seed"),
])
def test_bad_generation_options(tiny_paired, kw, match):
    args = {"n": 1, "steps": 2, **kw}
    with pytest.raises(UserInputError, match=match):
        LatentModel.load(tiny_paired, "cpu").generate(**args)


# ----------------------------------------------------------------------------- masks
def two_touching_discs() -> np.ndarray:
    yy, xx = np.mgrid[:40, :60]
    lab = np.zeros((40, 60), np.uint16)
    lab[(yy - 20) ** 2 + (xx - 20) ** 2 <= 100] = 1
    lab[((yy - 20) ** 2 + (xx - 39) ** 2 <= 100) & (lab == 0)] = 2
    return lab


def test_interior_encoding_keeps_touching_objects_apart():
    lab = two_touching_discs()
    assert mask_encoding([lab]) == "interior"
    interior = encode_mask(lab, "interior")
    labels = labels_from_mask(interior, encoding="interior")
    assert labels.max() == 2  # plain foreground would have merged them into one
    assert labels_from_mask((lab > 0).astype(float), encoding="binary").max() == 1
    # grown back by the rim: nearly the original area
    assert abs(int((labels > 0).sum()) - int((lab > 0).sum())) < 0.1 * (lab > 0).sum()


@pytest.mark.parametrize(("mask", "kind"), [
    (np.array([[0, 255], [255, 0]], np.uint8), "binary"),
    (np.array([[0, 1], [1, 0]], bool), "binary"),
    (np.array([[0.0, 0.3], [0.9, 1.0]], np.float32), "binary"),
    (np.array([[0, 1], [2, 3]], np.uint16), "interior"),
])
def test_mask_kinds_are_recognised(mask, kind):
    assert mask_encoding([mask]) == kind
    enc = encode_mask(mask, kind)
    assert enc.dtype == np.float32 and enc.min() >= 0 and enc.max() <= 1


def test_labels_from_mask_drops_small_objects():
    prob = np.zeros((20, 20))
    prob[2:4, 2:4] = 1  # 4 px
    prob[10:16, 10:16] = 1  # 36 px
    assert labels_from_mask(prob, min_size=10).max() == 1
    assert labels_from_mask(prob, min_size=0).max() == 2


# ----------------------------------------------------------------------------- data
def test_patch_data_holds_out_whole_images_or_bottom_rows(tmp_path):
    imgs, masks = make_blobs(tmp_path / "five", n=5)
    d = PatchData.from_paths(imgs, masks, patch=32)
    assert (len(d.train), len(d.val)) == (4, 1) and d.channels == ["image", "mask"]
    assert d.mask_encoding == "interior" and d.train[0].shape == (2, 80, 96)
    imgs2, _ = make_blobs(tmp_path / "two", n=2, masks=False)
    d2 = PatchData.from_paths(imgs2, patch=32)
    assert len(d2.train) == len(d2.val) == 2
    assert d2.train[0].shape[1] + d2.val[0].shape[1] == 80 and d2.val[0].shape[1] >= 32
    assert -1.0 <= float(d2.train[0].min()) and float(d2.train[0].max()) <= 1.0


def test_random_crops_are_seeded_and_in_range(blobs):
    d = PatchData.from_paths(*blobs, patch=32)
    a = d.random_crops(5, 24, torch.Generator().manual_seed(3))
    b = d.random_crops(5, 24, torch.Generator().manual_seed(3))
    assert a.shape == (5, 2, 24, 24) and torch.equal(a, b)
    v = d.val_crops(32)
    assert v is not None and v.shape[1:] == (2, 32, 32)


def test_bundled_patches_agree_across_batch_sizes():
    """The guarantee in docs/guarantees.md, on a bundled model: batch 4 and batch 1 agree within 1e-4."""
    m = LatentModel.load("nuclei-ldm-demo", "cpu")
    a = m.generate(3, seed=0, steps=4, batch=3)
    b = m.generate(3, seed=0, steps=4, batch=1)
    assert np.abs(a.images - b.images).max() < 1e-4
    assert np.array_equal(a.images, m.generate(3, seed=0, steps=4, batch=3).images)  # same batch: bitwise


def test_recipe_losses():
    """The log-spectrum term is 0 for the same image and grows as detail is blurred away; the hinge loss
    is 0 for a confident discriminator; the adaptive weight is the ratio of the two gradients' norms."""
    from napari_zfdiffusion.core.latent.losses import PatchDiscriminator, adaptive_weight, hinge_d_loss, log_spectrum_loss

    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 1, 64, 64, generator=g) * 2 - 1
    blur1 = torch.nn.functional.avg_pool2d(x, 3, 1, 1)
    blur2 = torch.nn.functional.avg_pool2d(x, 7, 1, 3)
    assert float(log_spectrum_loss(x, x)) == 0.0
    assert 0 < float(log_spectrum_loss(blur1, x)) < float(log_spectrum_loss(blur2, x))
    assert float(hinge_d_loss(torch.full((4,), 2.0), torch.full((4,), -2.0))) == 0.0
    assert float(hinge_d_loss(torch.zeros(4), torch.zeros(4))) == 1.0
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    assert float(adaptive_weight((3 * w).sum(), (0.5 * w).sum(), w)) == pytest.approx(6.0, rel=1e-3)
    assert PatchDiscriminator(2)(torch.zeros(1, 2, 64, 64)).shape[:2] == (1, 1)


def test_conv_padding_is_saved_and_loaded(tmp_path):
    from napari_zfdiffusion.core.latent.autoencoder import KLAutoencoder

    vae = build_autoencoder(1, "tiny", conv_padding="replicate").eval()
    vae.save_pretrained(tmp_path, safe_serialization=True)
    back = KLAutoencoder.from_pretrained(tmp_path).eval()
    assert back.config["conv_padding"] == "replicate"
    x = torch.randn(1, 1, 32, 32)
    assert torch.equal(vae(x, sample_posterior=False)[0], back(x, sample_posterior=False)[0])
    with pytest.raises(UserInputError, match="padding"):
        build_autoencoder(1, "tiny", conv_padding="circular")


def test_decode_margin_keeps_the_shape_and_zero_changes_nothing(tiny_latent):
    model = LatentModel.load(tiny_latent, "cpu")
    z = torch.randn(2, *model.card["latent_shape"], generator=torch.Generator().manual_seed(0))
    plain = model.decode(z)
    assert torch.equal(model.decode(z, margin=0), plain)
    padded = model.decode(z, margin=2)
    assert padded.shape == plain.shape and not torch.equal(padded, plain)
    model.card["decode_margin"] = 2  # the card's value is the default
    assert torch.equal(model.decode(z), padded)
