"""`zfdiffusion export bioimageio`: the bundled segmentation U-Net as a bioimage.io model package (spec
0.5), checked by bioimageio.spec, by bioimageio.core's own model test (what Fiji/deepImageJ, ilastik
and QuPath rely on) where it is installed, and against the plugin's own probabilities.

bioimageio.spec is in the `testing` extra; bioimageio.core is not (its 0.11 pins bioimageio.spec
0.5.12.0, which fails under the pinned pydantic 2.14): the core test skips, saying so, without it.
"""

from __future__ import annotations

import io
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from napari_zfdiffusion.cli import main

MODEL = "nuclei-unet-demo"
FILES = {"rdf.yaml", "README.md", "cover.png", "test_input.npy", "test_output.npy", "sample_input.tif",
         "sample_output.tif", "weights.pt", "weights_torchscript.pt", "zfdiffusion_resunet.py",
         "zfdiffusion_model.json"}
# torchscript vs the plugin's probabilities on the test input: they differ only by bioimage.io's
# scale_range dividing by (hi - lo + 1e-6) where the plugin divides by (hi - lo) (measured: 8e-7)
TOLERANCE = 1e-5


def _spec_or_skip():
    from napari_zfdiffusion.core.errors import UserInputError
    from napari_zfdiffusion.core.segment.bioimageio import require_spec

    try:
        require_spec()
    except UserInputError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    """The bundled demo model exported once by the command, as a user runs it."""
    _spec_or_skip()
    out = tmp_path_factory.mktemp("bioimageio") / "nuclei-unet-demo.zip"
    assert main(["-q", "export", "bioimageio", "--model", MODEL, "--out", str(out), "--tag", "nuclei"]) == 0
    return out


def _read(z: zipfile.ZipFile, name: str):
    return np.load(io.BytesIO(z.read(name)))


def test_refuses_an_output_that_is_not_a_zip(tmp_path, capsys):
    assert main(["export", "bioimageio", "--model", MODEL, "--out", str(tmp_path / "m.bioimage")]) == 2
    err = capsys.readouterr().err
    assert "is a .zip file" in err and "m.zip" in err and "Traceback" not in err
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("model, words", [("nuclei-ldm-demo", "but a segmentation model is needed"),
                                          ("zf-cascade-demo", "not a segmentation model")])
def test_refuses_a_model_that_is_not_a_segmentation_model(tmp_path, capsys, model, words):
    assert main(["export", "bioimageio", "--model", model, "--out", str(tmp_path / "m.zip")]) == 2
    assert words in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_without_bioimageio_spec_it_says_what_to_install(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "bioimageio.spec", None)  # `import bioimageio.spec` fails
    assert main(["export", "bioimageio", "--out", str(tmp_path / "m.zip")]) == 2
    assert "pip install napari-zfdiffusion[bioimageio]" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_help_imports_neither_torch_nor_bioimageio():
    code = ("import sys\nfrom napari_zfdiffusion.cli import main\ntry:\n    main(['export', 'bioimageio', '--help'])\n"
            "except SystemExit:\n    pass\nprint('@@' + ','.join(m for m in ('torch', 'diffusers', 'bioimageio') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True).stdout
    assert "--test-image" in out
    assert out.strip().splitlines()[-1] == "@@"


def test_package_holds_weights_tensors_cover_card_and_the_normalisation(package):
    from bioimageio.spec import load_description
    from PIL import Image

    with zipfile.ZipFile(package) as z:
        assert set(z.namelist()) == FILES
        raw, out = _read(z, "test_input.npy"), _read(z, "test_output.npy")
        cover = Image.open(io.BytesIO(z.read("cover.png")))
        readme = z.read("README.md").decode()
    assert raw.shape == (1, 1, 256, 256) and raw.dtype == np.float32 and raw.max() > 255  # raw uint16 intensities
    assert out.shape == (1, 2, 256, 256) and 0.0 <= out.min() and out.max() <= 1.0
    assert cover.size == (512, 256)  # 2:1, input | probability
    assert readme.startswith("# nuclei-unet-demo") and "## Validation" in readme
    assert "Not in the package: instance labels" in readme and "watershed" in readme
    assert "(second output >= 0.55, the card's seed threshold" in readme  # as the plugin seeds
    assert "second output >= 0.45 (the card's join threshold) that reach the seed threshold" in readme

    d = load_description(package, format_version="discover")
    assert d.validation_summary.status == "valid-format", d.validation_summary.format()
    assert d.format_version.startswith("0.5")
    assert d.license == "BSD-3-Clause" and d.authors and d.cite
    assert "nuclei" in d.tags and "unet" in d.tags
    assert d.weights.torchscript is not None and d.weights.torchscript.parent == "pytorch_state_dict"
    arch = d.weights.pytorch_state_dict.architecture
    assert arch.callable == "ResUNet" and arch.kwargs == {"in_channels": 1, "out_channels": 2,
                                                          "channels": [16, 32, 64, 128], "blocks": 1,
                                                          "probability": True}
    (inp,), (outp,) = d.inputs, d.outputs
    assert [a.id for a in inp.axes] == ["batch", "channel", "y", "x"]
    assert [a.id for a in outp.axes] == ["batch", "channel", "y", "x"]
    assert inp.axes[2].size.min == 64 and inp.axes[2].size.step == 8  # multiples of the down-sampling factor
    assert outp.axes[1].channel_names == ["foreground", "center"]
    assert outp.axes[2].halo == outp.axes[3].halo == 16  # half the card's overlap (32)
    ops = [p.id for p in inp.preprocessing]
    assert ops == ["ensure_dtype", "scale_range", "clip", "scale_linear", "ensure_dtype"]
    scale = inp.preprocessing[1].kwargs
    assert (scale.min_percentile, scale.max_percentile) == (1.0, 99.8) and list(scale.axes) == ["y", "x"]
    assert (inp.preprocessing[2].kwargs.min, inp.preprocessing[2].kwargs.max) == (0.0, 1.0)
    assert (inp.preprocessing[3].kwargs.gain, inp.preprocessing[3].kwargs.offset) == (2.0, -1.0)
    plugin = d.config.model_dump()["zfdiffusion"]
    assert (plugin["threshold"], plugin["seed_threshold"], plugin["join_threshold"]) == (0.5, 0.55, 0.45)


def test_torchscript_and_state_dict_give_the_plugins_probabilities(package, tmp_path):
    """Both weight formats on the test input, with the package's pre-processing, against the plugin's
    own prediction (Segmenter.predict: its normalisation, its tiles) of the same image."""
    import importlib.util

    import torch

    from napari_zfdiffusion.core.segment import Segmenter
    from napari_zfdiffusion.core.segment.bioimageio import preprocess

    seg = Segmenter.load(MODEL, "cpu")
    with zipfile.ZipFile(package) as z:
        raw, out = _read(z, "test_input.npy"), _read(z, "test_output.npy")
        scripted = torch.jit.load(io.BytesIO(z.read("weights_torchscript.pt")))
        state = torch.load(io.BytesIO(z.read("weights.pt")), weights_only=True)
        (tmp_path / "arch.py").write_bytes(z.read("zfdiffusion_resunet.py"))
    spec = importlib.util.spec_from_file_location("arch_under_test", tmp_path / "arch.py")
    arch = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(arch)
    plain = arch.ResUNet(in_channels=1, out_channels=2, channels=[16, 32, 64, 128], blocks=1).eval()
    plain.load_state_dict(state, strict=True)

    expected = seg.predict(raw[0, 0])  # (1, 2, 256, 256) probabilities, as `zfdiffusion segment` computes them
    x = torch.from_numpy(preprocess(raw, seg.norm))
    with torch.no_grad():
        by_script, by_state = scripted(x).numpy(), plain(x).numpy()
    assert np.abs(by_script - expected).max() <= TOLERANCE
    assert np.abs(by_state - expected).max() <= TOLERANCE
    assert np.abs(out - expected).max() <= TOLERANCE
    assert np.array_equal(by_script, out) or np.abs(by_script - out).max() <= 1e-6
    # any size the package allows (64 + n * 8, not square), batch of two: the two formats agree
    y = torch.from_numpy(preprocess(np.stack([raw[0, :, :72, :200], raw[0, :, 40:112, 8:208]]), seg.norm))
    with torch.no_grad():
        a, b = scripted(y), plain(y)
    assert a.shape == (2, 2, 72, 200) and torch.allclose(a, b, atol=1e-6)


def test_bioimageio_core_model_test_passes(package):
    """bioimageio.core's test: both weight formats reproduce the test output, and run at other sizes
    and batch sizes (what the consumers do with a package)."""
    pytest.importorskip("bioimageio.core", reason="bioimageio.core is not installed (the [bioimageio] extra)")
    from napari_zfdiffusion.core.segment.bioimageio import check_package

    summary = check_package(package)
    failed = [(d.name, [str(e.msg)[:200] for e in d.errors]) for d in summary.details if d.status != "passed"]
    assert summary.status == "passed", failed
    names = " | ".join(d.name for d in summary.details)
    assert "Reproduce test outputs from test inputs (torchscript)" in names
    assert "Reproduce test outputs from test inputs (pytorch_state_dict)" in names


def test_a_test_image_too_small_for_the_network_is_refused(tmp_path, capsys):
    _spec_or_skip()
    from PIL import Image

    Image.fromarray(np.full((40, 60), 7, np.uint8)).save(tmp_path / "small.png")
    out = tmp_path / "m.zip"
    assert main(["export", "bioimageio", "--out", str(out), "--test-image", str(tmp_path / "small.png")]) == 2
    err = capsys.readouterr().err
    assert "40x60 pixels" in err and "64x64 at least" in err
    assert not out.exists()
