"""Model folders (safetensors + JSON, never pickles), the model registry, and atomic output files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from safetensors.torch import load_file

from napari_zfdiffusion.core.errors import UserInputError
from napari_zfdiffusion.core.io import atomic_write, check_writable, read_provenance, write_json, write_tiff
from napari_zfdiffusion.core.diffusion.unet import ZfUNet, build_model
from napari_zfdiffusion.core.store import (
    STAGE_FILE,
    WEIGHTS_FILE,
    home,
    list_models,
    load_model,
    model_kind,
    read_json,
    resolve_model,
    save_model,
    user_models_dir,
)

from conftest import make_tiny_cascade


def tiny(num_classes=3, kind="base", res=64):
    torch.manual_seed(1)
    return build_model(kind, "tiny", resolution=res, num_classes=num_classes)


# ----------------------------------------------------------------------------- home and registry
def test_home_follows_the_environment(tmp_path, monkeypatch):
    assert home() == tmp_path / "zfhome"  # conftest isolates it per test
    monkeypatch.setenv("ZFDIFFUSION_HOME", str(tmp_path / "elsewhere"))
    assert user_models_dir() == tmp_path / "elsewhere" / "models"


def test_user_models_are_listed_and_resolved_by_name(tmp_path):
    make_tiny_cascade(user_models_dir() / "fish-a", stages=("base",))
    (user_models_dir() / "not-a-model").mkdir()
    (user_models_dir() / "stray-file.txt").write_text("x")
    entries = {m.name: m for m in list_models() if m.source == "user"}
    assert set(entries) == {"fish-a"}
    assert entries["fish-a"].kind == "cascade" and entries["fish-a"].path == user_models_dir() / "fish-a"
    assert resolve_model("fish-a") == user_models_dir() / "fish-a"
    assert resolve_model(tmp_path) == tmp_path  # an existing folder is taken as it is


def test_a_corrupted_user_model_is_listed_as_such(tmp_path):
    bad = user_models_dir() / "broken"
    bad.mkdir(parents=True)
    (bad / "cascade.json").write_text("{oops")
    entries = {m.name: m for m in list_models()}
    assert entries["broken"].kind == "corrupted"


def test_unknown_model_names_the_known_ones():
    make_tiny_cascade(user_models_dir() / "fish-b", stages=("base",))
    with pytest.raises(UserInputError, match="fish-b"):
        resolve_model("fish-z")


def test_model_kind(tmp_path):
    assert model_kind(tmp_path) is None
    (tmp_path / "model.json").write_text(json.dumps({"kind": "segmentation"}))
    assert model_kind(tmp_path) == "segmentation"
    (tmp_path / "cascade.json").write_text("{}")
    assert model_kind(tmp_path) == "cascade"


# ----------------------------------------------------------------------------- JSON
def test_read_json_errors(tmp_path):
    with pytest.raises(UserInputError, match="missing"):
        read_json(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(UserInputError, match="not valid JSON"):
        read_json(tmp_path / "bad.json")
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(UserInputError, match="JSON object"):
        read_json(tmp_path / "list.json")
    write_json(tmp_path / "ok.json", {"a": 1, "p": Path("/x")})
    assert read_json(tmp_path / "ok.json") == {"a": 1, "p": "/x"}


# ----------------------------------------------------------------------------- stage folders
def test_save_and_load_round_trip(tmp_path):
    model = tiny()
    save_model(model, tmp_path / "base", {"stage": "base", "resolution": 64})
    folder = tmp_path / "base"
    assert {p.name for p in folder.iterdir()} == {"config.json", WEIGHTS_FILE, STAGE_FILE}
    assert not list(folder.glob("*.bin")) and not list(folder.glob("*.pt"))  # no pickles
    assert read_json(folder / STAGE_FILE) == {"stage": "base", "resolution": 64}
    loaded = load_model(folder, ZfUNet)
    assert not loaded.training
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert loaded.config.num_classes == 3 and loaded.null_class == 3
    x = torch.randn(2, 1, 64, 64)
    t = torch.tensor(10)
    labels = torch.tensor([0, 3])
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x, t, labels), loaded(x, t, labels), rtol=1e-5, atol=1e-5)


def test_sr_model_round_trip_and_conditioning(tmp_path):
    model = tiny(kind="sr", res=128).eval()
    save_model(model, tmp_path / "sr128", {"stage": "sr128"})
    loaded = load_model(tmp_path / "sr128", ZfUNet)
    x, c = torch.randn(1, 1, 32, 32), torch.randn(1, 1, 32, 32)
    lab = torch.tensor([1])
    with torch.no_grad():
        out = loaded(x, torch.tensor(5), lab, cond=c, noise_level=torch.tensor([0.1]))
        ref = model(x, torch.tensor(5), lab, cond=c, noise_level=torch.tensor([0.1]))
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        other = loaded(x, torch.tensor(5), lab, cond=c, noise_level=torch.tensor([0.5]))
    assert out.shape == (1, 1, 32, 32) and not torch.equal(out, other)
    with pytest.raises(ValueError, match="conditioning"):
        loaded(x, torch.tensor(5), lab)


def test_save_replaces_a_stage_atomically(tmp_path):
    folder = tmp_path / "base"
    save_model(tiny(3), folder, {"v": 1})
    (folder / "extra-from-old-version.txt").write_text("old")
    save_model(tiny(4), folder, {"v": 2})
    assert read_json(folder / STAGE_FILE) == {"v": 2}
    assert load_model(folder, ZfUNet).config.num_classes == 4
    assert not (folder / "extra-from-old-version.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base"]  # no .tmp / .old left behind


def test_a_failed_save_keeps_the_previous_stage(tmp_path, monkeypatch):
    folder = tmp_path / "base"
    save_model(tiny(3), folder, {"v": 1})
    before = load_file(str(folder / WEIGHTS_FILE))
    model = tiny(4)

    def broken_save(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(model, "save_pretrained", broken_save)
    with pytest.raises(UserInputError, match=r"could not write '.*base': disk full"):
        save_model(model, folder, {"v": 2})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base"]  # no .tmp left
    after = load_file(str(folder / WEIGHTS_FILE))
    assert read_json(folder / STAGE_FILE) == {"v": 1}
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_loading_never_unpickles(tmp_path, monkeypatch):
    save_model(tiny(), tmp_path / "base", {})
    (tmp_path / "base" / "diffusion_pytorch_model.bin").write_bytes(b"not a pickle")
    calls = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(a) or {})
    load_model(tmp_path / "base", ZfUNet)
    assert calls == []


def test_load_missing_config(tmp_path):
    save_model(tiny(), tmp_path / "base", {})
    (tmp_path / "base" / "config.json").unlink()
    with pytest.raises(UserInputError, match="missing config.json"):
        load_model(tmp_path / "base", ZfUNet)


# ----------------------------------------------------------------------------- output files
def test_write_tiff_with_provenance(tmp_path):
    data = np.random.default_rng(0).random((3, 16, 16)).astype(np.float32)
    prov = {"model": "m", "seed": 4, "path": Path("/x")}
    out = write_tiff(tmp_path / "sub" / "o.tif", data, prov)
    assert out == tmp_path / "sub" / "o.tif"
    assert np.array_equal(tifffile.imread(out), data)
    assert read_provenance(out) == {"model": "m", "seed": 4, "path": "/x"}
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["o.tif"]


def test_read_provenance_of_a_foreign_tiff(tmp_path):
    tifffile.imwrite(tmp_path / "plain.tif", np.zeros((4, 4), np.uint8), description="just a microscope")
    assert read_provenance(tmp_path / "plain.tif") == {}


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "o.tif"
    target.write_bytes(b"previous result")

    def half_then_crash(tmp: Path) -> None:
        tmp.write_bytes(b"half")
        raise RuntimeError("crash while writing")

    with pytest.raises(RuntimeError):
        atomic_write(target, half_then_crash)
    assert target.read_bytes() == b"previous result"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.tif"]

    def full_disk(tmp: Path) -> None:
        tmp.write_bytes(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(UserInputError, match="No space left"):
        atomic_write(tmp_path / "new.tif", full_disk)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.tif"]


def test_check_writable(tmp_path):
    assert check_writable(tmp_path / "a" / "b" / "o.tif") == tmp_path / "a" / "b" / "o.tif"
    assert (tmp_path / "a" / "b").is_dir()  # the folder is made before any work
    with pytest.raises(UserInputError, match="is a folder"):
        check_writable(tmp_path / "a")
    (tmp_path / "f").write_text("x")
    with pytest.raises(UserInputError, match="is a file"):
        check_writable(tmp_path / "f" / "o.tif")
    with pytest.raises(UserInputError, match="a part of that path is a file"):
        check_writable(tmp_path / "f" / "deeper" / "o.tif")


def test_the_tiny_cascade_fixture_is_a_valid_model(tiny_cascade):
    shutil.copytree(tiny_cascade, user_models_dir() / "copied")
    entry = next(m for m in list_models() if m.name == "copied")
    assert entry.kind == "cascade" and entry.source == "user"
    for st in ("base", "sr128", "sr256", "sr512"):
        assert (entry.path / st / WEIGHTS_FILE).is_file()


def test_saved_models_follow_the_umask(tmp_path):
    import os

    old = os.umask(0o027)
    try:
        save_model(build_model("base", "tiny", resolution=64, num_classes=2), tmp_path / "base", {"stage": "base"})
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "base").iterdir()}
    assert set(modes.values()) == {0o640}, modes  # the weights too (safetensors alone writes 0600)
