"""The `zfdiffusion` command, driven through cli.main([...])."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import tifffile
from PIL import Image

from napari_zfdiffusion import __version__, cli
from napari_zfdiffusion.core.io import read_provenance

from conftest import make_tiny_cascade


def gen_args(model, out, *extra, preview=None):
    args = ["-q", "generate", "--model", str(model), "--depth", "1", "--guidance", "2", "--resolution", "128",
            "--steps", "2", "--n", "2", "--seed", "3", "--device", "cpu", "--out", str(out)]
    if preview is not None:
        args += ["--preview", str(preview)]
    return args + list(extra)


@pytest.fixture
def generated(tiny_cascade, tmp_path, capsys):
    out, prev = tmp_path / "x.tif", tmp_path / "x.png"
    assert cli.main(gen_args(tiny_cascade, out, preview=prev)) == 0
    capsys.readouterr()
    return out, prev


def test_generate_writes_tiff_with_provenance_and_preview(tiny_cascade, tmp_path, capsys):
    out, prev = tmp_path / "x.tif", tmp_path / "x.png"
    assert cli.main(gen_args(tiny_cascade, out, preview=prev)) == 0
    stdout = capsys.readouterr().out
    assert f"wrote {out}" in stdout and "(2, 128, 128)" in stdout and "wrote preview" in stdout

    data = tifffile.imread(out)
    assert data.shape == (2, 128, 128) and data.dtype == np.float32
    assert data.min() >= 0 and data.max() <= 1
    p = read_provenance(out)
    assert p["model"] == "tiny-cascade" and p["plugin_version"] == __version__
    assert (p["depth"], p["guidance"], p["seed"], p["sampler"], p["steps"]) == (1, 2.0, 3, "dpmsolver++", 2)
    assert p["seeds"] == [3, 4] and p["resolution"] == 128

    with Image.open(prev) as im:
        assert im.size == (256, 128) and im.mode == "L"  # the two samples side by side
    assert not list(tmp_path.glob(".*.part"))


def test_generate_matches_the_library(tiny_cascade, generated):
    from napari_zfdiffusion.core.cascade import Cascade

    out, _ = generated
    r = Cascade.load(tiny_cascade, "cpu").generate(1, guidance=2.0, resolution=128, n=2, seed=3, steps=2)
    assert np.array_equal(tifffile.imread(out), r.images)


def test_upsample_uses_the_provenance_depth(tiny_cascade, generated, tmp_path, capsys):
    src, _ = generated
    up = tmp_path / "up.tif"
    rc = cli.main(["-q", "upsample", str(src), "--model", str(tiny_cascade), "--resolution", "256",
                   "--steps", "1", "--device", "cpu", "--out", str(up)])
    assert rc == 0
    assert "(2, 256, 256)" in capsys.readouterr().out
    data = tifffile.imread(up)
    assert data.shape == (2, 256, 256) and data.dtype == np.float32
    p = read_provenance(up)
    assert p["depth"] == 1 and p["operation"] == "upsample" and p["stages"] == ["sr256"]
    assert p["input"] == str(src) and p["input_shape"] == [128, 128]

    # An explicit --depth wins over the file's own
    up2 = tmp_path / "up2.tif"
    assert cli.main(["-q", "upsample", str(src), "--model", str(tiny_cascade), "--resolution", "256",
                     "--steps", "1", "--device", "cpu", "--depth", "0", "--out", str(up2)]) == 0
    assert read_provenance(up2)["depth"] == 0


def test_upsample_a_plain_png_needs_a_depth(tiny_cascade, tmp_path, capsys):
    png = tmp_path / "plain.png"
    Image.fromarray((np.random.default_rng(0).random((64, 64)) * 255).astype(np.uint8)).save(png)
    out = tmp_path / "up.tif"
    rc = cli.main(["-q", "upsample", str(png), "--model", str(tiny_cascade), "--resolution", "128",
                   "--steps", "1", "--device", "cpu", "--out", str(out)])
    assert rc == 2
    assert "--depth" in capsys.readouterr().err
    assert not out.exists()
    assert cli.main(["-q", "upsample", str(png), "--model", str(tiny_cascade), "--resolution", "128",
                     "--steps", "1", "--device", "cpu", "--depth", "2", "--out", str(out)]) == 0
    assert tifffile.imread(out).squeeze().shape == (128, 128)  # tifffile drops the length-1 axis


def test_models_lists_a_user_model(tmp_path, capsys):
    home = tmp_path / "zfhome"
    assert str(home) == os.environ["ZFDIFFUSION_HOME"]
    make_tiny_cascade(home / "models" / "my-fish", stages=("base",))
    assert cli.main(["models"]) == 0
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.startswith("my-fish"))
    assert "cascade" in line and "user" in line and str(home / "models" / "my-fish") in line
    assert str(home / "models") in out

    # ... and generate finds it by name
    tif = tmp_path / "byname.tif"
    assert cli.main(["-q", "generate", "--model", "my-fish", "--depth", "0", "--resolution", "64", "--steps", "1",
                     "--device", "cpu", "--out", str(tif)]) == 0
    assert read_provenance(tif)["model"] == "my-fish"


def test_models_with_no_user_models(capsys):
    assert cli.main(["models"]) == 0
    assert "user models go in" in capsys.readouterr().out


def test_train_through_the_cli(stacks, tmp_path, capsys):
    out = tmp_path / "m"
    args = ["-q", "train", "cascade", "--data", str(stacks), "--out", str(out), "--stage", "base", "--size", "tiny",
            "--steps", "2", "--batch-size", "2", "--device", "cpu", "--depth-classes", "2", "--credit", "me",
            "--licence", "CC0"]
    assert cli.main(args) == 0
    assert "trained base: 2 steps" in capsys.readouterr().out
    card = json.loads((out / "cascade.json").read_text())
    assert len(card["depth_classes"]) == 2
    assert card["training_data"]["credit"] == "me" and card["training_data"]["licence"] == "CC0"

    # again without --resume: a clear error, exit code 2
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("zfdiffusion: error:") and "--resume" in err and len(err.splitlines()) == 1
    # with --resume to more steps
    assert cli.main([*args, "--steps", "4", "--resume"]) == 0
    assert "trained base: 4 steps" in capsys.readouterr().out


@pytest.mark.parametrize("args, needle", [
    (["--depth", "9"], "depth 9 is out of range"),
    (["--guidance", "-1"], "guidance"),
    (["--steps", "0"], "steps"),
    (["--n", "0"], "number of samples"),
    (["--seed", "-4"], "seed"),
    (["--noise-aug", "1.5"], "noise augmentation"),
])
def test_errors_exit_2_with_one_line(tiny_cascade, tmp_path, capsys, args, needle):
    out = tmp_path / "bad.tif"
    argv = gen_args(tiny_cascade, out) + args  # argparse: the last occurrence of an option wins
    assert cli.main(argv) == 2
    cap = capsys.readouterr()
    lines = cap.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("zfdiffusion: error:") and needle in lines[0]
    assert "Traceback" not in cap.err
    assert not out.exists() and not list(tmp_path.glob("*.part")) and not list(tmp_path.glob(".*.part"))


def test_argparse_errors_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["generate", "--depth", "0", "--out", str(tmp_path / "x.tif"), "--sampler", "euler"])
    assert e.value.code == 2
    assert "sampler" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli.main(["generate", "--out", str(tmp_path / "x.tif")])  # no --depth
    assert e.value.code == 2
    assert "--depth" in capsys.readouterr().err


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0
    assert __version__ in capsys.readouterr().out
