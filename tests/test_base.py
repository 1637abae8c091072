"""The shared base of the core: progress on one scale, depth ranges, the size filter, the image to
model-space conversion, the training objective and the provenance stamp."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_zfdiffusion.core.cascade.depths import parse_depths
from napari_zfdiffusion.core.diffusion.objective import (
    alphas,
    noise_to_level,
    noised_batch,
    schedule_for,
    training_scheduler,
)
from napari_zfdiffusion.core.errors import UserInputError
from napari_zfdiffusion.core.images import Normalisation, to_model
from napari_zfdiffusion.core.masks import drop_small
from napari_zfdiffusion.core.progress import Progress, rescaled
from napari_zfdiffusion.core.provenance import PLUGIN_VERSION, is_ours, stamp


# ----------------------------------------------------------------------------- progress
def test_rescaled_counts_parts_on_one_scale():
    seen = []
    for k in range(3):  # 3 batches of 4 steps each: one stream 1..12 of 12
        cb = rescaled(seen.append, k, 1, 3, stage="sample", n_stages=2)
        for step in range(1, 5):
            cb(Progress("sample", step, 4))
    assert [p.step for p in seen] == list(range(1, 13)) and {p.total for p in seen} == {12}
    assert seen[-1].fraction == pytest.approx(0.5)  # stage 1 of 2 done
    groups = []
    cb = rescaled(groups.append, 4, 2, 10)  # planes 4-5 of 10, 3 tiles per plane
    cb(Progress("tiles", 6, 6))
    assert (groups[0].step, groups[0].total, groups[0].stage) == (18, 30, "tiles")
    assert rescaled(None, 0, 1, 1) is None


# ----------------------------------------------------------------------------- depths
@pytest.mark.parametrize("text, n, want", [
    ("all", 3, (0, 1, 2)), ("1-3", 5, (1, 2, 3)), ("0, 2,4", 5, (0, 2, 4)), ("3,1-2,3", 5, (3, 1, 2)),
])
def test_parse_depths(text, n, want):
    assert parse_depths(text, n) == want


@pytest.mark.parametrize("text, consecutive, match", [
    ("0-9", False, "depth classes 0-4"), ("4-1", False, "top to bottom"), ("x", False, "1,3,5"),
    ("0,2", True, "consecutive"), ("", False, "range of depth classes"),
])
def test_bad_depths(text, consecutive, match):
    with pytest.raises(UserInputError, match=match):
        parse_depths(text, 5, consecutive=consecutive)


# ----------------------------------------------------------------------------- masks
def test_drop_small_removes_and_renumbers():
    lab = np.zeros((8, 8), np.int64)
    lab[0, 0] = 5  # 1 pixel
    lab[2:5, 2:5] = 9  # 9 pixels
    lab[6:8, 6:8] = 2  # 4 pixels
    out = drop_small(lab.copy(), 4)
    assert out.dtype == np.int32 and set(np.unique(out)) == {0, 1, 2}
    assert (out[2:5, 2:5] == 2).all() and (out[6:8, 6:8] == 1).all() and out[0, 0] == 0  # order kept
    assert set(np.unique(drop_small(lab.copy(), 0))) == {0, 1, 2, 3}


# ----------------------------------------------------------------------------- images
def test_to_model_normalises_or_clips():
    img = np.arange(64, dtype=np.uint16).reshape(8, 8)
    x = to_model(img, Normalisation(0, 100))
    assert x.shape == (1, 1, 8, 8) and x.min() == -1 and x.max() == 1
    y = to_model(np.full((4, 4), 2.0), normalise=False)
    assert torch.all(y == 1.0)  # values taken as [0, 1], clipped


@pytest.mark.parametrize("img, match", [
    (np.zeros((8, 8, 3), np.uint8), "RGB"), (np.zeros((2, 8, 8)), "2D image"),
    (np.full((8, 8), np.nan), "NaN"), (np.array([["a"] * 8] * 8), "numbers"),
])
def test_to_model_refuses_bad_images(img, match):
    with pytest.raises(UserInputError, match=match):
        to_model(img, name="my image")


# ----------------------------------------------------------------------------- objective
@pytest.mark.parametrize("loss", ["v", "l1"])
def test_noised_batch_target(loss):
    sched = training_scheduler(schedule_for(loss))
    x0 = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    xt, t, target = noised_batch(x0, sched, torch.Generator().manual_seed(2))
    g = torch.Generator().manual_seed(2)  # the same draws: time steps, then the noise
    t2 = torch.randint(0, 1000, (4,), generator=g)
    eps = torch.randn(x0.shape, generator=g)
    a = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
    assert torch.equal(t, t2)
    torch.testing.assert_close(xt, a.sqrt() * x0 + (1 - a).sqrt() * eps)
    want = a.sqrt() * eps - (1 - a).sqrt() * x0 if loss == "v" else eps
    torch.testing.assert_close(target, want)


def test_noise_to_level_ends():
    ac = alphas(schedule_for("v"))
    x, noise = torch.ones(2, 1, 4, 4), torch.zeros(2, 1, 4, 4)
    torch.testing.assert_close(noise_to_level(x, 0.0, ac, noise), x * ac[0].sqrt())
    per_item = noise_to_level(x, torch.tensor([0.0, 1.0]), ac, noise)
    assert per_item[0].mean() > 0.99 and per_item[1].abs().max() < 1e-3  # level 1: (almost) pure noise


# ----------------------------------------------------------------------------- provenance
def test_stamp_and_is_ours():
    class M:
        name, path = "m", "/models/m"

    p = stamp("zfdiffusion.test", model=M(), device="cpu", seed=3)
    assert p["model"] == "m" and p["model_path"] == "/models/m" and p["plugin_version"] == PLUGIN_VERSION
    assert p["device"] == "cpu" and p["seed"] == 3 and p["created"].endswith("+00:00")
    assert is_ours(p) and not is_ours({"kind": "other"}) and not is_ours(None)
