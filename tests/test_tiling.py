"""Tiled prediction (groundwork for segmentation): tiles cover the image, blending is seamless, and
a network whose receptive field fits in the overlap gives the whole-image result."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_zfdiffusion.core.errors import Cancelled, UserInputError
from napari_zfdiffusion.core.tiling import blend_weight, predict_tiled, tile_starts


def conv_net(channels: int = 1) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(),
                               torch.nn.Conv2d(4, channels, 3, padding=1)).eval()


@pytest.mark.parametrize(("length", "tile", "overlap"), [(100, 32, 8), (32, 32, 8), (20, 32, 8), (257, 64, 16)])
def test_tiles_cover_the_whole_length(length, tile, overlap):
    starts = tile_starts(length, tile, overlap)
    covered = np.zeros(max(length, tile), bool)
    for s in starts:
        covered[s:s + tile] = True
    assert covered[:length].all() and starts[0] == 0
    assert all(b - a <= tile - overlap for a, b in zip(starts, starts[1:]))


def test_blend_weight_is_zero_at_shared_sides_and_one_on_the_image_border():
    w = blend_weight(32, 8)
    assert w.shape == (32, 32) and w[0, 16] == 0 and w[16, 16] == 1.0 and w[0:2].max() == 0
    np.testing.assert_allclose(w, w.T)
    border = blend_weight(32, 8, (True, False, True, False))
    assert border[0, 0] == 1.0 and border[-1, -1] == 0


@pytest.mark.parametrize("shape", [(70, 90), (3, 70, 90), (40, 300)])
def test_tiled_equals_whole_image_when_the_receptive_field_fits(shape):
    net = conv_net()
    img = np.random.default_rng(0).random(shape).astype(np.float32)
    tiled = predict_tiled(net, img, tile=32, overlap=8, batch=3)
    planes = img[None] if img.ndim == 2 else img
    with torch.no_grad():
        whole = net(torch.from_numpy(planes)[:, None])[:, 0].numpy()
    whole = whole[0] if img.ndim == 2 else whole
    assert tiled.shape == img.shape and tiled.dtype == np.float32
    # away from the image border (zero padding there is the same in both), tiles only see real pixels
    inner = (Ellipsis, slice(2, -2), slice(2, -2))
    np.testing.assert_allclose(tiled[inner], whole[inner], atol=1e-5)


def test_several_channels_a_small_image_and_an_output_memmap(tmp_path):
    net = conv_net(channels=2)
    img = np.random.default_rng(1).random((2, 20, 24)).astype(np.float32)
    out = np.lib.format.open_memmap(tmp_path / "o.npy", mode="w+", dtype=np.float32, shape=(2, 2, 20, 24))
    res = predict_tiled(net, img, tile=32, overlap=8, out_channels=2, out=out)
    assert res.shape == (2, 2, 20, 24) and np.isfinite(np.asarray(out)).all()


def test_progress_per_batch_and_cancel():
    img = np.zeros((2, 64, 64), np.float32)
    seen = []
    predict_tiled(conv_net(), img, tile=32, overlap=8, batch=2, callback=seen.append)
    assert seen[-1].step == seen[-1].total == 2 * 9 and [p.step for p in seen][:2] == [2, 4]

    def stop(p):
        raise Cancelled("stop")

    with pytest.raises(Cancelled):
        predict_tiled(conv_net(), img, tile=32, overlap=8, callback=stop)


@pytest.mark.parametrize(("kw", "match"), [({"tile": 16, "overlap": 16}, "larger than the overlap"),
                                           ({"tile": 8}, "at least 16")])
def test_bad_tiling_options(kw, match):
    with pytest.raises(UserInputError, match=match):
        predict_tiled(conv_net(), np.zeros((40, 40), np.float32), **kw)


def test_4d_input_is_refused():
    with pytest.raises(UserInputError, match="2D image or a"):
        predict_tiled(conv_net(), np.zeros((2, 2, 40, 40), np.float32))
