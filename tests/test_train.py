"""Training: smoke runs of each kind of stage, exact resume, v-prediction, depth bins, torchrun."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from napari_zfdiffusion.core.cascade import Cascade
from napari_zfdiffusion.core.errors import UserInputError
from napari_zfdiffusion.core.diffusion.sampling import make_scheduler
from napari_zfdiffusion.core.diffusion.unet import ZfUNet
from napari_zfdiffusion.core.store import WEIGHTS_FILE, load_model
from napari_zfdiffusion.core.cascade.train import TrainConfig, train_stage

from conftest import make_stacks, torchrun_cli


def cfg(stage="base", **kw) -> TrainConfig:
    base = dict(stage=stage, size="tiny", steps=3, batch_size=2, log_every=1, checkpoint_every=100, warmup=2)
    base.update(kw)
    return TrainConfig(**base)


def train(data, out, **kw):
    resume = kw.pop("resume", False)
    callback = kw.pop("callback", None)
    return train_stage(data, out, cfg(**kw), device="cpu", resume=resume, show_progress=False, callback=callback)


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / WEIGHTS_FILE))


def read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ----------------------------------------------------------------------------- smoke
def test_train_base_and_sr_stage_gives_a_loadable_cascade(stacks, tmp_path):
    out = tmp_path / "model"
    s_base = train(stacks, out, stage="base", steps=3)
    s_sr = train(stacks, out, stage="sr128", steps=2)
    assert (s_base["steps"], s_sr["steps"]) == (3, 2)
    assert s_base["model"] == str(out / "base") and s_base["world"] == 1
    assert np.isfinite(s_base["loss"]) and np.isfinite(s_sr["loss"])

    card = json.loads((out / "cascade.json").read_text())
    assert card["kind"] == "cascade" and len(card["depth_classes"]) == 4  # one class per plane
    assert card["n_planes"] == 4
    assert card["training_data"]["files"] == [f"specimen_{i:02d}.tif" for i in range(3)]
    for stage, steps, res, lres in (("base", 3, 64, None), ("sr128", 2, 128, 64)):
        folder = out / stage
        assert {p.name for p in folder.iterdir()} >= {"config.json", WEIGHTS_FILE, "stage.json"}
        info = json.loads((folder / "stage.json").read_text())
        assert (info["stage"], info["resolution"], info["input_resolution"]) == (stage, res, lres)
        assert info["training"]["steps_done"] == steps
        assert info["schedule"]["prediction_type"] == "v_prediction"  # the default loss is v
        log = read_log(out / "training" / stage / "log.jsonl")
        assert [r["step"] for r in log] == list(range(1, steps + 1))
        assert all(np.isfinite(r["loss"]) for r in log)
        assert (out / "training" / stage / "state.pt").is_file()
        model = load_model(folder, ZfUNet)
        assert model.config.num_classes == 4
    assert not list(out.rglob("*.tmp")) and not list(out.rglob("*.old"))

    c = Cascade.load(out, "cpu")
    assert c.resolutions == [64, 128]
    r = c.generate(3, guidance=2.0, resolution=128, n=2, steps=2, seed=0)
    assert r.images.shape == (2, 128, 128) and r.images.dtype == np.float32
    assert np.isfinite(r.images).all()


def test_training_changes_the_weights_and_reports_progress(stacks, tmp_path):
    seen = []
    train(stacks, tmp_path / "a", steps=1, callback=seen.append)
    train(stacks, tmp_path / "b", steps=4, callback=None)
    w1, w4 = weights(tmp_path / "a" / "base"), weights(tmp_path / "b" / "base")
    assert any(not torch.equal(w1[k], w4[k]) for k in w1)
    assert [(p.step, p.total) for p in seen] == [(1, 1)]


def test_same_seed_trains_the_same_weights(stacks, tmp_path):
    train(stacks, tmp_path / "a", steps=2, seed=5)
    train(stacks, tmp_path / "b", steps=2, seed=5)
    train(stacks, tmp_path / "c", steps=2, seed=6)
    a, b, c = (weights(tmp_path / x / "base") for x in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


# ----------------------------------------------------------------------------- resume
class Killed(Exception):
    pass


@pytest.mark.parametrize("stage", ["base", "sr128"])
def test_resume_after_a_kill_matches_an_uninterrupted_run(stacks, tmp_path, stage):
    n, k = 6, 3
    straight = tmp_path / "straight"
    train(stacks, straight, stage=stage, steps=n, checkpoint_every=k)

    def kill_after_checkpoint(p):
        if p.step == k + 1:  # the process dies during step k+1, after the checkpoint of step k
            raise Killed

    resumed = tmp_path / "resumed"
    with pytest.raises(Killed):
        train(stacks, resumed, stage=stage, steps=n, checkpoint_every=k, callback=kill_after_checkpoint)
    assert json.loads((resumed / stage / "stage.json").read_text())["training"]["steps_done"] == k

    summary = train(stacks, resumed, stage=stage, steps=n, checkpoint_every=k, resume=True)
    assert summary["steps"] == n

    a, b = weights(straight / stage), weights(resumed / stage)  # the exported EMA weights
    assert a.keys() == b.keys()
    assert all(torch.equal(a[key], b[key]) for key in a)
    sa = torch.load(straight / "training" / stage / "state.pt", weights_only=True)
    sb = torch.load(resumed / "training" / stage / "state.pt", weights_only=True)
    assert int(sa["step"]) == int(sb["step"]) == n
    for part in ("model", "ema"):
        assert all(torch.equal(sa[part][key], sb[part][key]) for key in sa[part])
    ia = json.loads((straight / stage / "stage.json").read_text())["training"]
    ib = json.loads((resumed / stage / "stage.json").read_text())["training"]
    assert ia["steps_done"] == ib["steps_done"] == n
    assert read_log(resumed / "training" / stage / "log.jsonl")[-1]["step"] == n


def test_resume_to_more_steps_continues_counting(stacks, tmp_path):
    out = tmp_path / "m"
    train(stacks, out, steps=2)
    s = train(stacks, out, steps=4, resume=True)
    assert s["steps"] == 4
    assert json.loads((out / "base" / "stage.json").read_text())["training"]["steps_done"] == 4
    assert [r["step"] for r in read_log(out / "training" / "base" / "log.jsonl")] == [1, 2, 3, 4]


def test_resume_with_nothing_to_resume_starts_from_the_same_weights(stacks, tmp_path):
    train(stacks, tmp_path / "plain", steps=2)
    train(stacks, tmp_path / "resumed", steps=2, resume=True)
    a, b = weights(tmp_path / "plain" / "base"), weights(tmp_path / "resumed" / "base")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_training_into_a_folder_with_state_needs_resume(stacks, tmp_path):
    out = tmp_path / "m"
    train(stacks, out, steps=2)
    before = weights(out / "base")
    with pytest.raises(UserInputError, match="--resume"):
        train(stacks, out, steps=2)
    after = weights(out / "base")
    assert all(torch.equal(before[k], after[k]) for k in before)  # the earlier run is untouched


def test_other_stage_into_same_folder_needs_same_depth_classes(stacks, tmp_path):
    out = tmp_path / "m"
    train(stacks, out, stage="base", steps=1)
    with pytest.raises(UserInputError, match="depth classes"):
        train(stacks, out, stage="sr128", steps=1, depth_classes=2)
    assert not (out / "sr128").exists()


# ----------------------------------------------------------------------------- v-prediction
def test_v_prediction_trains_exports_and_samples(stacks, tmp_path):
    out = tmp_path / "v"
    s = train(stacks, out, stage="base", steps=3, loss="v")
    assert np.isfinite(s["loss"])
    info = json.loads((out / "base" / "stage.json").read_text())
    assert info["schedule"]["prediction_type"] == "v_prediction"
    assert info["training"]["loss"] == "v"
    c = Cascade.load(out, "cpu")
    assert make_scheduler("ddim", c.stages["base"].schedule).config.prediction_type == "v_prediction"
    r = c.generate(1, guidance=2.0, resolution=64, n=1, steps=3, seed=0)
    assert r.images.shape == (1, 64, 64) and np.isfinite(r.images).all()

    # Sampling really reads the prediction type: the same weights read as epsilon give another image.
    info["schedule"]["prediction_type"] = "epsilon"
    (out / "base" / "stage.json").write_text(json.dumps(info))
    eps = Cascade.load(out, "cpu").generate(1, guidance=2.0, resolution=64, n=1, steps=3, seed=0)
    assert not np.array_equal(r.images, eps.images)


@pytest.mark.parametrize("loss", ["l1", "l2"])
def test_epsilon_losses_export_epsilon(stacks, tmp_path, loss):
    train(stacks, tmp_path / loss, steps=1, loss=loss)
    info = json.loads((tmp_path / loss / "base" / "stage.json").read_text())
    assert info["schedule"]["prediction_type"] == "epsilon" and info["training"]["loss"] == loss


# ----------------------------------------------------------------------------- depth classes
def test_depth_classes_bin_the_planes(tmp_path):
    data = make_stacks(tmp_path / "deep", n=2, z=6)
    out = tmp_path / "k"
    train(data, out, steps=1, depth_classes=2, z_step_um=2.0)
    card = json.loads((out / "cascade.json").read_text())
    classes = card["depth_classes"]
    assert [c["planes"] for c in classes] == [[0, 1, 2], [3, 4, 5]]
    assert "top" in classes[0]["label"] and "bottom" in classes[1]["label"]
    assert "z = 0-4 um" in classes[0]["label"]
    assert card["n_planes"] == 6
    assert load_model(out / "base", ZfUNet).config.num_classes == 2
    c = Cascade.load(out, "cpu")
    assert c.n_classes == 2
    c.generate(1, resolution=64, steps=1)
    with pytest.raises(UserInputError, match="out of range"):
        c.generate(2, resolution=64, steps=1)


@pytest.mark.parametrize("k", [0, 7])
def test_depth_classes_out_of_range(tmp_path, k):
    data = make_stacks(tmp_path / "deep", n=1, z=6)
    with pytest.raises(UserInputError, match="depth-classes"):
        train(data, tmp_path / "k", steps=1, depth_classes=k)
    assert not (tmp_path / "k").exists()


@pytest.mark.parametrize("field, value, match", [
    ("stage", "sr1024", "unknown stage"), ("loss", "huber", "unknown loss"), ("size", "huge", "model size"),
    ("steps", 0, "--steps"), ("batch_size", 0, "--batch-size"), ("p_uncond", 1.0, "--p-uncond"),
    ("max_minutes", 0, "--max-minutes"), ("max_minutes", -5, "--max-minutes"),
])
def test_bad_training_options(stacks, tmp_path, field, value, match):
    with pytest.raises(UserInputError, match=match):
        train(stacks, tmp_path / "m", **{field: value})
    assert not (tmp_path / "m").exists()


# ----------------------------------------------------------------------------- time limit, presets
def test_max_minutes_stops_with_a_checkpoint_and_resume_needs_more(stacks, tmp_path):
    out = tmp_path / "m"
    s = train(stacks, out, steps=50, max_minutes=1e-9)  # out of time after the first step
    assert s["steps"] == 1
    info = json.loads((out / "base" / "stage.json").read_text())["training"]
    assert info["steps_done"] == 1 and info["max_minutes"] == 1e-9  # the model is exported at the stop
    assert Cascade.load(out, "cpu").generate(0, resolution=64, steps=1).images.shape == (1, 64, 64)
    before = weights(out / "base")
    with pytest.raises(UserInputError, match="raise --max-minutes"):
        train(stacks, out, steps=50, max_minutes=1e-9, resume=True)
    after = weights(out / "base")
    assert all(torch.equal(before[k], after[k]) for k in before)
    # a larger limit (or none) goes on from the step where it stopped
    assert train(stacks, out, steps=3, resume=True)["steps"] == 3
    assert [r["step"] for r in read_log(out / "training" / "base" / "log.jsonl")] == [1, 2, 3]


def test_a_time_limit_gives_the_progress_its_expected_last_step():
    from napari_zfdiffusion.core.training.loop import LoopConfig, _expected_last_step

    lc = LoopConfig(steps=5000, lr=1e-3, warmup=1, ema_decay=0.9, checkpoint_every=100, log_every=10, seed=0,
                    max_seconds=100.0)
    assert _expected_last_step(10, 0, 10.0, 0.0, lc) == 100  # 1 s a step, 90 s left
    assert _expected_last_step(30, 20, 10.0, 50.0, lc) == 70  # resumed after 50 s: 40 s left at 1 s a step
    assert _expected_last_step(10, 0, 1.0, 0.0, lc) == 1000  # 0.1 s a step
    assert _expected_last_step(10, 0, 0.1, 0.0, lc) == 5000  # fast: the steps end it first
    assert _expected_last_step(10, 0, 200.0, 0.0, lc) == 11  # out of time: the next step is the last


def test_presets_fill_what_the_command_line_leaves_out():
    from napari_zfdiffusion.core.choices import CASCADE_DEFAULTS, cascade_training_options

    assert cascade_training_options(None, "base", {}) == CASCADE_DEFAULTS
    quick = cascade_training_options("quick", "base", {"lr": 5e-4, "size": None})
    assert quick["lr"] == 5e-4 and quick["size"] == "small" and quick["max_minutes"] == 60  # given wins
    assert cascade_training_options("quick", "sr256", {})["max_minutes"] == 20
    full = cascade_training_options("full", "base", {})
    assert full["size"] == "base" and full["max_minutes"] is None
    with pytest.raises(ValueError, match="unknown preset"):
        cascade_training_options("fast", "base", {})


def test_train_cascade_preset_on_the_command_line(stacks, tmp_path):
    from napari_zfdiffusion import cli

    out = tmp_path / "q"
    assert cli.main(["-q", "train", "cascade", "--data", str(stacks), "--out", str(out), "--preset", "quick",
                     "--size", "tiny", "--steps", "2", "--batch-size", "2", "--device", "cpu"]) == 0
    t = json.loads((out / "base" / "stage.json").read_text())["training"]
    assert (t["preset"], t["size"], t["lr"], t["max_minutes"], t["warmup"], t["steps_done"]) == (
        "quick", "tiny", 1e-3, 60, 200, 2)
    plain = tmp_path / "p"
    assert cli.main(["-q", "train", "cascade", "--data", str(stacks), "--out", str(plain), "--size", "tiny",
                     "--steps", "1", "--batch-size", "2", "--device", "cpu"]) == 0
    t = json.loads((plain / "base" / "stage.json").read_text())["training"]
    assert (t["preset"], t["size"], t["lr"], t["max_minutes"], t["batch_size"]) == (None, "tiny", 1e-3, None, 2)


# ----------------------------------------------------------------------------- torchrun
@pytest.mark.slow
def test_torchrun_two_processes_on_cpu(stacks, tmp_path):
    out = tmp_path / "ddp"
    proc = torchrun_cli("train", "cascade", "--data", stacks, "--out", out, "--stage", "base", "--size", "tiny",
                        "--steps", "3", "--batch-size", "2", "--device", "cpu")
    assert proc.stdout.count("trained base: 3 steps") == 1  # rank 0 reports, rank 1 stays quiet
    info = json.loads((out / "base" / "stage.json").read_text())
    assert info["training"]["world_size"] == 2 and info["training"]["steps_done"] == 3
    assert load_model(out / "base", ZfUNet).config.num_classes == 4
    r = Cascade.load(out, "cpu").generate(0, resolution=64, steps=1)
    assert r.images.shape == (1, 64, 64)
