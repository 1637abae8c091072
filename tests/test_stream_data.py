"""Cascade training data that streams: the stacks stay on disk, each stack's percentiles are exact
and computed once, the base stage's small planes are cached, and a torchrun rank reads only its own
specimens. Memory is checked by counting the bytes the data set holds, not by timing."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import torch

from napari_zfdiffusion.core.cascade.data import DepthDataset
from napari_zfdiffusion.core.cascade.train import TrainConfig, _batch
from napari_zfdiffusion.core.images import Normalisation


@pytest.fixture(scope="module")
def many(tmp_path_factory):
    """24 specimens of (4, 200, 240) uint16: 9 MB of pixels as float32."""
    folder = tmp_path_factory.mktemp("many")
    rng = np.random.default_rng(0)
    for i in range(24):
        tifffile.imwrite(folder / f"s{i:02d}.tif", (rng.random((4, 200, 240)) ** 2 * 4000).astype(np.uint16))
    return folder


def test_the_stacks_stay_on_disk(many):
    ds = DepthDataset.from_paths(many)
    assert ds.held_bytes() == 0 and isinstance(ds.stacks[0]._data, np.memmap)
    ds.cache(64)  # the base stage's planes: 24 x 4 x 64 x 77 floats
    raw_float = 24 * 4 * 200 * 240 * 4
    assert 0 < ds.held_bytes() <= 24 * 4 * 64 * 77 * 4 < raw_float / 9


def test_percentiles_are_exact_and_planes_match_whole_stack_normalisation(many):
    norm = Normalisation(1.0, 99.8)
    ds = DepthDataset.from_paths(many, norm=norm)
    whole = tifffile.imread(many / "s03.tif")
    want = norm.apply(whole) * 2 - 1  # what the in-memory data set did
    np.testing.assert_array_equal(ds.stack(3).numpy(), want)


def test_batches_from_disk_and_from_the_cache(many):
    ds = DepthDataset.from_paths(many, cache_res=64)
    g = torch.Generator().manual_seed(0)
    idx = torch.tensor([0, 5, 17, 95])
    x, cond, prev, has_prev = _batch(ds, idx, TrainConfig(stage="base", continuity=True), g)
    assert x.shape == (4, 1, 64, 64) and cond is None and has_prev.tolist() == [0, 1, 1, 1]
    x, cond, prev, _ = _batch(ds, idx, TrainConfig(stage="sr128", continuity=True), g)  # read from disk
    assert x.shape == cond.shape == prev.shape == (4, 1, 64, 64)  # the stage's crops
    assert float(x.min()) >= -1 and float(x.max()) <= 1


def test_a_rank_reads_only_its_own_specimens(many, monkeypatch):
    seen = []
    real = DepthDataset._percentiles

    def spy(self, spec):
        seen.append(spec)
        return real(self, spec)

    monkeypatch.setattr(DepthDataset, "_percentiles", spy)
    ds = DepthDataset.from_paths(many, rank=1, world=2, cache_res=64)
    assert ds.mine == list(range(1, 24, 2)) and sorted(seen) == ds.mine and set(ds.small) == set(ds.mine)
    assert set(ds.specimen[ds.shard(1, 2)].tolist()) == set(ds.mine)


def test_nan_in_a_float_stack_is_refused_before_training(tmp_path):
    stack = np.ones((3, 32, 32), np.float32)
    stack[1, 2, 3] = np.nan
    tifffile.imwrite(tmp_path / "bad.tif", stack)
    with pytest.raises(Exception, match="bad.tif holds 1 NaN"):
        DepthDataset.from_paths(tmp_path)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int16, np.float32, np.float64, np.int32])
def test_stack_percentiles_equal_numpy_on_the_whole_stack(dtype):
    from napari_zfdiffusion.core.images import stack_percentiles

    rng = np.random.default_rng(3)
    a = (rng.normal(size=(5, 37, 41)) * 300 + 200).astype(dtype)
    for q in ((1.0, 99.8), (33.3, 57.77), (0, 100)):
        want = np.percentile(a.astype(np.float32), q)
        assert np.array_equal(stack_percentiles(a, *q), want), (dtype, q)


def test_the_card_records_each_stacks_statistics(many, tmp_path):
    import json

    from napari_zfdiffusion.core.cascade.train import train_stage
    from napari_zfdiffusion.core.images import stack_percentiles

    files = sorted(many.glob("*.tif"))[:3]
    out = tmp_path / "m"
    train_stage(files, out, TrainConfig(stage="sr128", size="tiny", steps=1, batch_size=2, checkpoint_every=1),
                device="cpu", show_progress=False)
    stats = json.loads((out / "cascade.json").read_text())["normalisation_stats"]
    assert list(stats) == [f.name for f in files]
    assert stats[files[1].name] == list(stack_percentiles(tifffile.memmap(files[1]), 1.0, 99.8))


def test_a_patch_models_card_records_each_images_statistics(tmp_path):
    import json

    from conftest import make_blobs

    from napari_zfdiffusion.core.latent.train import VaeConfig, train_vae

    imgs, _ = make_blobs(tmp_path / "b", n=2, shape=(64, 64), masks=False)
    out = tmp_path / "vae"
    train_vae(imgs, out, VaeConfig(size="tiny", steps=1, batch_size=2, patch_size=32, checkpoint_every=1),
              device="cpu", show_progress=False)
    stats = json.loads((out / "model.json").read_text())["training_data"]["normalisation_stats"]
    assert sorted(stats) == ["blobs_00.tif", "blobs_01.tif"] and all(lo < hi for lo, hi in stats.values())
