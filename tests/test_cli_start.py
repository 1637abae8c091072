"""`zfdiffusion --help`, `--version` and `models` start fast: they import neither torch nor diffusers.

Checked by what a fresh process imported, not by its wall time (benchmarks/cli_start.py measures
that: docs/results/cli_start.json).
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from napari_zfdiffusion import __version__

HEAVY = ("torch", "diffusers")

SCRIPT = """
import sys
from napari_zfdiffusion.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as e:
    code = e.code
sys.stdout.flush()
print("@@heavy=" + ",".join(m for m in {heavy!r} if m in sys.modules))
print("@@code=" + str(code))
"""


def run_cli(*args: str) -> tuple[str, list[str], str]:
    proc = subprocess.run([sys.executable, "-c", SCRIPT.format(heavy=HEAVY), *args], capture_output=True, check=False,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    heavy = next(ln for ln in lines if ln.startswith("@@heavy="))[len("@@heavy="):]
    code = next(ln for ln in lines if ln.startswith("@@code="))[len("@@code="):]
    return proc.stdout, [m for m in heavy.split(",") if m], code


@pytest.mark.parametrize("args", [["--help"], ["--version"], ["models"], ["models", "--brief"],
                                  ["generate", "--help"], ["train", "cascade", "--help"], ["em", "generate", "--help"],
                                  ["segment", "--help"]])
def test_light_commands_import_neither_torch_nor_diffusers(args):
    out, heavy, code = run_cli(*args)
    assert heavy == [], f"`zfdiffusion {' '.join(args)}` imported {heavy}"
    assert code in ("0", "None")
    if args == ["--version"]:
        assert __version__ in out


def test_models_describes_each_bundled_model_from_its_card():
    out, heavy, _ = run_cli("models")
    assert heavy == []
    assert "zf-cascade-demo" in out and "depth classes (--depth 0 to 4)" in out
    assert "0: plane 0, z = 0 um (top)" in out  # what each depth class means
    assert "um/px at 512" in out  # pixel size at each resolution
    assert "WITH masks" in out and "(no masks)" in out  # nuclei-ldm-demo vs em-ldm-demo
    assert "on disk:" in out and "MB; bundled with the package" in out


def test_models_shows_a_user_model_as_cached(tmp_path, capsys):
    from conftest import make_tiny_cascade

    from napari_zfdiffusion import cli

    home = tmp_path / "zfhome"  # the autouse fixture's ZFDIFFUSION_HOME
    make_tiny_cascade(home / "models" / "my-fish", stages=("base", "sr128"))
    assert cli.main(["models", "my-fish"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("my-fish") and "cached in ZFDIFFUSION_HOME/models" in out
    assert "resolutions: 64, 128 px" in out and "zf-cascade-demo" not in out
    assert cli.main(["models", "no-such-model"]) == 2


def test_light_choices_agree_with_the_modules_that_use_them():
    """core.choices (what the parser offers) holds the same names as core.device and the sampler."""
    from napari_zfdiffusion.core import choices, device
    from napari_zfdiffusion.core.diffusion import sampling

    assert choices.DEVICES == device.DEVICES
    assert choices.SAMPLERS == sampling.SAMPLERS
    assert choices.DEFAULT_SAMPLER == sampling.DEFAULT_SAMPLER


def test_help_shows_defaults_and_the_time_a_slice_takes(capsys, monkeypatch):
    from napari_zfdiffusion import cli

    monkeypatch.setenv("COLUMNS", "300")  # no line breaks inside a default

    with pytest.raises(SystemExit):
        cli.main(["generate", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "(default: 512)" in out and "2 min at 512" in out
    assert "(default: 25)" in out and "(default: zf-cascade-demo)" in out and "(default: 0)" in out
    assert "--info" not in out
