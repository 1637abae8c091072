"""Volumes: plane-to-plane conditioning (model, training, sampling), `zfdiffusion volume`, and
`zfdiffusion dataset --n-volumes`, with one test per bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile
import torch

from napari_zfdiffusion import cli
from napari_zfdiffusion.core.cascade import Cascade
from napari_zfdiffusion.core.cascade.dataset import MANIFEST_FILE
from napari_zfdiffusion.core.errors import Cancelled, UserInputError
from napari_zfdiffusion.core.io import read_provenance
from napari_zfdiffusion.core.diffusion.unet import ZfUNet, add_prev_channel, build_model
from napari_zfdiffusion.core.cascade.train import STAGES, TrainConfig, _batch, train_stage
from napari_zfdiffusion.core.cascade.depths import parse_depths
from napari_zfdiffusion.core.cascade.volume import first_plane_tensor
from napari_zfdiffusion.core.metrics import neighbour_agreement

from conftest import make_stacks, make_tiny_cascade, torchrun_cli


@pytest.fixture(scope="module")
def vol_model(tmp_path_factory):
    return make_tiny_cascade(tmp_path_factory.mktemp("models") / "tiny-volume", continuity=True)


@pytest.fixture(scope="module")
def vcas(vol_model):
    return Cascade.load(vol_model, "cpu")


def gen(cas, **kw):
    kw.setdefault("resolution", 64)
    kw.setdefault("steps", 2)
    return cas.generate_volume(kw.pop("depths", "0-2"), **kw)


# ----------------------------------------------------------------------------- the model
@pytest.mark.parametrize("kind", ["base", "sr"])
def test_a_warm_started_volume_model_predicts_exactly_what_its_parent_did(kind):
    torch.manual_seed(0)
    parent = build_model(kind, "tiny", resolution=64, num_classes=3).eval()
    child = add_prev_channel(parent).eval()
    assert child.config.prev_channels == 1 and child.unet.conv_in.in_channels == parent.unet.conv_in.in_channels + 1
    x, t = torch.randn(2, 1, 32, 32), torch.tensor(400)
    kw = {"class_labels": torch.tensor([0, 3])}
    if kind == "sr":
        kw.update(cond=torch.randn(2, 1, 32, 32), noise_level=torch.tensor([0.1, 0.2]))
    with torch.no_grad():
        ref = parent(x, t, **kw)
        assert torch.equal(child(x, t, **kw), ref)  # no previous plane
        assert torch.equal(child(x, t, prev=torch.randn(2, 1, 32, 32), has_prev=torch.ones(2).long(), **kw), ref)


def test_the_previous_plane_and_its_flag_change_the_prediction(vcas):
    model = vcas._model(vcas.stages["base"])
    x, t, lab = torch.randn(1, 1, 64, 64), torch.tensor(300), torch.tensor([1])
    with torch.no_grad():
        none = model(x, t, class_labels=lab)
        zeros_flag_off = model(x, t, class_labels=lab, prev=torch.zeros(1, 1, 64, 64), has_prev=torch.tensor([0]))
        plane = model(x, t, class_labels=lab, prev=torch.randn(1, 1, 64, 64))
    assert torch.equal(none, zeros_flag_off)  # "no previous plane" is zeros with the flag off
    assert not torch.allclose(none, plane)


def test_a_slice_model_refuses_a_previous_plane():
    model = build_model("base", "tiny", resolution=64, num_classes=2)
    with pytest.raises(ValueError, match="does not take a previous plane"):
        model(torch.randn(1, 1, 64, 64), torch.tensor(1), class_labels=torch.tensor([0]),
              prev=torch.zeros(1, 1, 64, 64))


# ----------------------------------------------------------------------------- training
def _tcfg(**kw):
    base = dict(stage="base", size="tiny", steps=3, batch_size=4, log_every=1, checkpoint_every=100, warmup=1,
                continuity=True)
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.parametrize("stage", ["base", "sr128"])
def test_training_pairs_each_plane_with_the_plane_above_under_the_same_crop_and_flips(tmp_path, stage):
    from napari_zfdiffusion.core.cascade.data import DepthDataset, Normalisation

    rng = np.random.default_rng(0)
    img = rng.random((80, 90)).astype(np.float32)
    # plane z is the same image plus z: the pair (z, z-1) differs by one plane's step, whatever the flips
    tifffile.imwrite(tmp_path / "s.tif", np.stack([img * 100 + 10 * z for z in range(4)]).astype(np.float32))
    ds = DepthDataset.from_paths(tmp_path / "s.tif", norm=Normalisation(0, 100))  # linear: no clipping
    cfg = _tcfg(stage=stage)
    g = torch.Generator().manual_seed(1)
    idx = torch.tensor([0, 1, 2, 3, 1, 2])
    x, cond, prev, has_prev = _batch(ds, idx, cfg, g)
    res = STAGES[stage][0]
    side = res if stage == "base" else 64  # super-resolution stages train on crops
    assert x.shape == prev.shape == (6, 1, side, side)
    assert (cond is None) == (stage == "base")
    assert has_prev.tolist() == [0, 1, 1, 1, 1, 1]  # the top plane has none
    assert torch.count_nonzero(prev[0]) == 0
    step = float((ds.plane(0, 1) - ds.plane(0, 0)).mean())
    for k in range(1, 6):
        np.testing.assert_allclose((x[k] - prev[k]).numpy(), step, atol=2e-3)


def test_train_a_volume_stage_from_a_slice_model(tmp_path):
    stacks = make_stacks(tmp_path / "data", n=2, z=3)
    parent = tmp_path / "slices"
    train_stage(stacks, parent, TrainConfig(stage="base", size="tiny", steps=2, batch_size=2, warmup=1,
                                           loss="l2"), device="cpu", show_progress=False)
    out = tmp_path / "volume"
    s = train_stage(stacks, out, _tcfg(init_from=str(parent), loss="l2"), device="cpu", show_progress=False)
    assert np.isfinite(s["loss"])
    assert json.loads((out / "base" / "stage.json").read_text())["prev_channels"] == 1
    cas = Cascade.load(out, "cpu")
    assert cas.continuity
    assert gen(cas, depths="all").images.shape == (3, 64, 64)
    # and on from that volume model (loaded from disk, checkpointed along the way)
    again = train_stage(stacks, tmp_path / "again", _tcfg(init_from=str(out), loss="l2", checkpoint_every=1),
                        device="cpu", show_progress=False)
    assert again["steps"] == 3


def test_init_from_refuses_a_different_prediction_target(tmp_path):
    stacks = make_stacks(tmp_path / "data", n=2, z=3)
    parent = tmp_path / "slices"
    train_stage(stacks, parent, TrainConfig(stage="base", size="tiny", steps=1, batch_size=2, warmup=1, loss="v"),
                device="cpu", show_progress=False)
    with pytest.raises(UserInputError, match="predicts v_prediction.*use --loss v.*--retarget"):
        train_stage(stacks, tmp_path / "v", _tcfg(init_from=str(parent), loss="l1"), device="cpu",
                    show_progress=False)
    train_stage(stacks, tmp_path / "e", _tcfg(init_from=str(parent), loss="l1", retarget=True), device="cpu",
                show_progress=False)  # asked for: fine-tuned to the new target
    assert json.loads((tmp_path / "e" / "base" / "stage.json").read_text())["schedule"]["prediction_type"] == "epsilon"


def test_init_from_refuses_other_depth_classes(tmp_path):
    parent = tmp_path / "slices"
    train_stage(make_stacks(tmp_path / "a", n=2, z=3), parent, TrainConfig(stage="base", size="tiny", steps=1,
                batch_size=2, warmup=1), device="cpu", show_progress=False)
    with pytest.raises(UserInputError, match="3 depth classes, but this data gives 5"):
        train_stage(make_stacks(tmp_path / "b", n=2, z=5), tmp_path / "v", _tcfg(init_from=str(parent)),
                    device="cpu", show_progress=False)


def test_resuming_with_another_continuity_setting_is_refused(tmp_path):
    stacks = make_stacks(tmp_path / "data", n=2, z=3)
    out = tmp_path / "m"
    train_stage(stacks, out, _tcfg(steps=2, checkpoint_every=1), device="cpu", show_progress=False)
    with pytest.raises(UserInputError, match="with --continuity"):
        train_stage(stacks, out, _tcfg(steps=3, continuity=False), device="cpu", resume=True, show_progress=False)


def test_bad_continuity_training_options():
    with pytest.raises(UserInputError, match="p-noprev"):
        _tcfg(p_noprev=1.0).validate()
    with pytest.raises(UserInputError, match="prev-noise-max"):
        _tcfg(prev_noise_max=-0.1).validate()


# ----------------------------------------------------------------------------- sampling
@pytest.mark.parametrize("res", [64, 128, 256])
def test_volume_shape_range_and_provenance(vcas, res):
    r = gen(vcas, depths="0-2", resolution=res, steps=1, seed=3)
    assert r.images.shape == (3, res, res) and r.images.dtype == np.float32
    assert 0 <= r.images.min() and r.images.max() <= 1
    p = r.provenance
    assert (p["operation"], p["depths"], p["resolution"], p["seed"]) == ("volume", [0, 1, 2], res, 3)
    assert p["continuity_guidance"] == 1.0 and len(p["depth_labels"]) == 3
    assert p["stages"] == [s for s in ("base", "sr128", "sr256") if STAGES[s][0] <= res]


def test_same_seed_same_volume_bitwise_and_seeds_differ(vcas):
    a, b, c = (gen(vcas, seed=s).images for s in (5, 5, 6))
    assert np.array_equal(a, b)
    assert not np.allclose(a, c)


def test_continuity_guidance_zero_ignores_the_plane_above(vcas):
    rng = np.random.default_rng(0)
    tops = [rng.random((64, 64)) for _ in range(2)]
    a, b = (gen(vcas, first_plane=t, continuity_guidance=0.0, seed=1).images for t in tops)
    assert not np.allclose(a[0], b[0])
    np.testing.assert_array_equal(a[1:], b[1:])  # independent planes: the first plane changes nothing
    c, d = (gen(vcas, first_plane=t, continuity_guidance=1.0, seed=1).images for t in tops)
    assert not np.allclose(c[1], d[1])  # conditioned: it does


def test_continuity_weight_is_the_chain_coefficient(vcas, monkeypatch):
    """c = 1 uses only the prediction with the plane above; c = 0 only the one without."""
    import napari_zfdiffusion.core.cascade.model as cmod

    seen = []
    real = cmod.denoise

    def spy(model, shape, *, conditions, guidance, **kw):
        seen.append((len(conditions), list(guidance), [c.get("has_prev") for c in conditions]))
        return real(model, shape, conditions=conditions, guidance=guidance, **kw)

    monkeypatch.setattr(cmod, "denoise", spy)
    gen(vcas, depths="0-1", guidance=2.0, continuity_guidance=1.5)
    assert seen[0][:2] == (2, [2.0])  # top plane: nothing above
    n, w, flags = seen[1]
    assert (n, w) == (3, [2.0, 1.5])
    assert [int(f[0]) for f in flags] == [0, 0, 1]


def test_planes_arrive_in_order_and_progress_reaches_one(vcas):
    planes, fractions = [], []
    r = gen(vcas, depths="0-2", resolution=128, on_plane=lambda k, im: planes.append((k, im.copy())),
            callback=lambda p: fractions.append(p.fraction))
    assert [k for k, _ in planes] == [0, 1, 2]
    for k, im in planes:
        np.testing.assert_array_equal(im, r.images[k])
    assert fractions == sorted(fractions) and fractions[-1] == pytest.approx(1.0)
    assert len(fractions) == 3 * 2 * 2  # planes x stages x steps


def test_cancel_stops_within_one_step(vcas):
    calls = []

    def cb(p):
        calls.append(p)
        if len(calls) == 3:
            raise Cancelled("stop")

    with pytest.raises(Cancelled):
        gen(vcas, callback=cb)
    assert len(calls) == 3


def test_start_from_a_users_plane(vcas):
    rng = np.random.default_rng(2)
    top = (rng.random((100, 100)) * 4000).astype(np.uint16)
    r = gen(vcas, depths="1-2", first_plane=top, resolution=64)
    assert r.images.shape == (2, 64, 64) and r.provenance["first_plane_given"]
    expected = (first_plane_tensor(top, 64, vcas.normalisation)[0, 0].numpy() + 1) / 2
    np.testing.assert_allclose(r.images[0], expected, atol=1e-6)


def test_a_slice_model_makes_independent_planes_only(tiny_cascade):
    cas = Cascade.load(tiny_cascade, "cpu")
    assert not cas.continuity
    assert gen(cas, continuity_guidance=0.0).images.shape == (3, 64, 64)
    with pytest.raises(UserInputError, match="not a volume model"):
        gen(cas, continuity_guidance=1.0)


@pytest.mark.parametrize("depths, match", [
    ("0-13", "outside this model: it has depth classes 0-2"),
    ("2-0", "top to bottom"),
    ("-1", "outside"),
    ("a-b", "range of depth classes"),
    ((0, 2), "consecutive"),
])
def test_bad_depth_ranges(vcas, depths, match):
    with pytest.raises(UserInputError, match=match):
        gen(vcas, depths=depths)


@pytest.mark.parametrize("plane, match", [
    (np.zeros((32, 32)), "smaller than the volume's 64x64"),
    (np.zeros((64, 80)), "must be square"),
    (np.zeros((2, 64, 64)), "one 2D plane"),
    (np.zeros((64, 64, 3), np.uint8), "RGB"),
    (np.full((64, 64), np.nan), "NaN"),
    (np.array([["a"] * 64] * 64), "numbers"),
])
def test_bad_first_planes(vcas, plane, match):
    with pytest.raises(UserInputError, match=match):
        gen(vcas, first_plane=plane)


def test_bad_volume_options(vcas):
    with pytest.raises(UserInputError, match="continuity guidance must be 0 or more"):
        gen(vcas, continuity_guidance=-1)
    with pytest.raises(UserInputError, match="resolution 100 is not available"):
        gen(vcas, resolution=100)
    with pytest.raises(UserInputError, match="steps must be"):
        gen(vcas, steps=0)


def test_parse_depths():
    assert parse_depths("all", 4, consecutive=True) == (0, 1, 2, 3)
    assert parse_depths(" 1-3 ", 5, consecutive=True) == (1, 2, 3)
    assert parse_depths("2", 5, consecutive=True) == (2,)
    assert parse_depths("0,2-3", 5) == (0, 2, 3)  # slices of a data set may skip depths


# ----------------------------------------------------------------------------- agreement metric
def test_neighbour_agreement():
    rng = np.random.default_rng(0)
    img = rng.random((32, 32)).astype(np.float32)
    same = neighbour_agreement(np.stack([img, img, img]))
    assert same["mean_correlation"] == pytest.approx(1.0) and same["mean_ssim"] == pytest.approx(1.0)
    noise = neighbour_agreement(rng.random((3, 32, 32)).astype(np.float32))
    assert abs(noise["mean_correlation"]) < 0.1 and len(noise["ssim"]) == 2
    with pytest.raises(ValueError):
        neighbour_agreement(img[None])


# ----------------------------------------------------------------------------- CLI
def vol_cli(model, out, *extra):
    return cli.main(["-q", "volume", "--model", str(model), "--resolution", "64", "--steps", "2", "--device", "cpu",
                     "--out", str(out), *extra])


def test_cli_volume_writes_a_tiff_with_provenance(vol_model, vcas, tmp_path, capsys):
    out = tmp_path / "vol.tif"
    assert vol_cli(vol_model, out, "--depths", "0-2", "--seed", "4", "--continuity-guidance", "2",
                   "--preview", str(tmp_path / "v.png")) == 0
    assert "(3, 64, 64)" in capsys.readouterr().out
    vol = tifffile.imread(out)
    np.testing.assert_array_equal(vol, gen(vcas, seed=4, continuity_guidance=2.0).images)
    prov = read_provenance(out)
    assert prov["continuity_guidance"] == 2.0 and prov["depths"] == [0, 1, 2]
    assert (tmp_path / "v.png").is_file()


def test_cli_volume_from_a_first_plane_file(vol_model, tmp_path, capsys):
    tifffile.imwrite(tmp_path / "top.tif", (np.random.default_rng(0).random((70, 70)) * 255).astype(np.uint8))
    assert vol_cli(vol_model, tmp_path / "v.tif", "--depths", "1-2", "--first-plane", str(tmp_path / "top.tif")) == 0
    assert read_provenance(tmp_path / "v.tif")["first_plane"].endswith("top.tif")
    tifffile.imwrite(tmp_path / "small.tif", np.zeros((40, 40), np.uint8))
    assert vol_cli(vol_model, tmp_path / "w.tif", "--first-plane", str(tmp_path / "small.tif")) == 2
    assert "smaller than the volume's 64x64" in capsys.readouterr().err
    assert not (tmp_path / "w.tif").exists()


def test_cli_volume_bad_depths(vol_model, tmp_path, capsys):
    assert vol_cli(vol_model, tmp_path / "v.tif", "--depths", "0-13") == 2
    assert "outside this model" in capsys.readouterr().err


# ----------------------------------------------------------------------------- data sets of volumes
def ds_cli(model, out, *extra):
    return cli.main(["-q", "dataset", "--model", str(model), "--n-volumes", "3", "--depths", "0-1",
                     "--resolution", "64", "--steps", "2", "--device", "cpu", "--out", str(out), *extra])


def test_a_data_set_of_volumes_is_reproducible_and_resumes(vol_model, vcas, tmp_path, capsys):
    out = tmp_path / "ds"
    assert ds_cli(vol_model, out, "--seed", "10") == 0
    items = [json.loads(x) for x in (out / MANIFEST_FILE).read_text().splitlines()]
    assert [(i["file"], i["seed"]) for i in items] == [(f"items/volume_{j:06d}.tif", 10 + j) for j in range(3)]
    assert items[1]["provenance"]["operation"] == "volume" and items[1]["provenance"]["seed"] == 11
    vol = tifffile.imread(out / items[1]["file"])
    np.testing.assert_array_equal(vol, gen(vcas, depths="0-1", seed=11).images)  # = `volume --seed 11`
    victim = out / items[0]["file"]
    victim.unlink()
    (out / MANIFEST_FILE).unlink()
    capsys.readouterr()
    assert ds_cli(vol_model, out, "--seed", "10") == 0
    assert "made 1 of its 3 items" in capsys.readouterr().out
    assert victim.is_file() and (out / MANIFEST_FILE).is_file()
    assert ds_cli(vol_model, out, "--seed", "11") == 2  # another data set in the same folder
    assert "differs in seed" in capsys.readouterr().err


def test_data_set_needs_exactly_one_kind_of_item(vol_model, tmp_path, capsys):
    assert ds_cli(vol_model, tmp_path / "a", "--per-depth", "2") == 2
    assert "either --per-depth" in capsys.readouterr().err
    assert cli.main(["-q", "dataset", "--model", str(vol_model), "--out", str(tmp_path / "b")]) == 2
    assert "either --per-depth" in capsys.readouterr().err
    assert cli.main(["-q", "dataset", "--model", str(vol_model), "--n-volumes", "0", "--out", str(tmp_path / "c")]) == 2
    assert "--n-volumes must be at least 1" in capsys.readouterr().err


def test_volumes_from_a_slice_model_need_continuity_zero(tiny_cascade, tmp_path, capsys):
    assert ds_cli(tiny_cascade, tmp_path / "a") == 2
    assert "not a volume model" in capsys.readouterr().err
    assert ds_cli(tiny_cascade, tmp_path / "b", "--continuity-guidance", "0") == 0


def test_a_full_disk_leaves_no_half_written_volume(vol_model, tmp_path, capsys, full_disk):
    assert ds_cli(vol_model, tmp_path / "ds") == 2
    assert "No space left on device" in capsys.readouterr().err
    assert list((tmp_path / "ds" / "items").iterdir()) == []


@pytest.mark.slow
def test_two_processes_make_exactly_the_requested_volumes(vol_model, tmp_path):
    out = tmp_path / "ds"
    torchrun_cli("dataset", "--model", vol_model, "--n-volumes", "5", "--depths", "0-1", "--resolution", "64",
                 "--steps", "1", "--device", "cpu", "--out", out)
    files = sorted(p.name for p in (out / "items").iterdir())
    assert files == [f"volume_{j:06d}.tif" for j in range(5)]
    ranks = [read_provenance(out / "items" / f)["rank"] for f in files]
    assert ranks == [0, 1, 0, 1, 0]
    assert len((out / MANIFEST_FILE).read_text().splitlines()) == 5


def test_zfunet_config_round_trip_keeps_prev_channels(tmp_path):
    m = build_model("sr", "tiny", resolution=128, num_classes=2, prev_channels=1)
    m.save_pretrained(tmp_path / "m", safe_serialization=True)
    back = ZfUNet.from_pretrained(tmp_path / "m", use_safetensors=True)
    assert back.config.prev_channels == 1 and back.prev_embedding is not None


def test_a_data_set_of_ome_zarr_volumes_resumes_and_trains(vol_model, vcas, tmp_path, capsys):
    """--format zarr: one OME-Zarr image per item, atomic, resumable, read back by napari's reader
    path and by the training commands."""
    import shutil

    from napari_zfdiffusion.core.cascade.data import DepthDataset
    from napari_zfdiffusion.core.reader import open_image

    out = tmp_path / "ds"
    assert ds_cli(vol_model, out, "--seed", "10", "--format", "zarr") == 0
    items = [json.loads(x) for x in (out / MANIFEST_FILE).read_text().splitlines()]
    assert [i["file"] for i in items] == [f"items/volume_{j:06d}.ome.zarr" for j in range(3)]
    src = open_image(out / items[1]["file"])
    assert src.axes == "ZYX" and src.provenance["seed"] == 11 and items[1]["provenance"]["seed"] == 11
    np.testing.assert_array_equal(np.asarray(src.data), gen(vcas, depths="0-1", seed=11).images)
    assert not list((out / "items").glob(".*"))  # no temporary folders left
    shutil.rmtree(out / items[0]["file"])
    capsys.readouterr()
    assert ds_cli(vol_model, out, "--seed", "10", "--format", "zarr") == 0
    assert "made 1 of its 3 items" in capsys.readouterr().out
    assert ds_cli(vol_model, out, "--seed", "10") == 2  # the same folder in another format: refused
    ds = DepthDataset.from_paths(out / "items")  # the items train a cascade as they are
    assert len(ds.names) == 3 and ds.n_planes == 2
