"""`zfdiffusion dataset`: items reproducible from their seed, resume, parallel ranks, and bad input."""

from __future__ import annotations

import json

import numpy as np
import tifffile

from napari_zfdiffusion import cli
from napari_zfdiffusion.core.cascade import Cascade
from napari_zfdiffusion.core.cascade.dataset import DATASET_FILE, MANIFEST_FILE
from napari_zfdiffusion.core.io import read_provenance

from conftest import torchrun_cli


def run(model, out, *extra):
    return cli.main(["-q", "dataset", "--model", str(model), "--per-depth", "2", "--depths", "0-1", "--resolution", "64",
                     "--steps", "2", "--device", "cpu", "--out", str(out), *extra])


def manifest(out):
    return [json.loads(x) for x in (out / MANIFEST_FILE).read_text().splitlines()]


def test_fills_a_folder_with_reproducible_items(tiny_cascade, tmp_path, capsys):
    out = tmp_path / "ds"
    assert run(tiny_cascade, out, "--seed", "7") == 0
    assert "data set complete (4 items)" in capsys.readouterr().out
    items = manifest(out)
    assert [(i["depth"], i["seed"]) for i in items] == [(0, 7), (0, 8), (1, 7), (1, 8)]
    first = tifffile.imread(out / items[1]["file"])
    assert first.shape == (64, 64) and read_provenance(out / items[1]["file"])["seed"] == 8
    # item j of depth d is sample 0 of `generate --depth d --seed SEED+j`
    again = Cascade.load(tiny_cascade, "cpu").generate(0, resolution=64, n=1, seed=8, steps=2).images[0]
    np.testing.assert_allclose(first, again, atol=1e-6)
    assert json.loads((out / DATASET_FILE).read_text())["n_per_depth"] == 2


def test_resume_skips_finished_items(tiny_cascade, tmp_path, capsys):
    out = tmp_path / "ds"
    assert run(tiny_cascade, out) == 0
    victim = out / manifest(out)[2]["file"]
    kept = {p.name: p.stat().st_mtime_ns for p in (out / "items").iterdir() if p != victim}
    victim.unlink()  # as if the run had been killed before this item
    capsys.readouterr()
    assert run(tiny_cascade, out) == 0
    assert "made 1 of its 4 items" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in (out / "items").iterdir() if p != victim} == kept
    assert victim.is_file() and len(manifest(out)) == 4


def test_a_folder_with_another_data_set_is_refused(tiny_cascade, tmp_path, capsys):
    out = tmp_path / "ds"
    assert run(tiny_cascade, out) == 0
    capsys.readouterr()
    assert run(tiny_cascade, out, "--guidance", "5") == 2
    assert "holds a different data set (it differs in guidance)" in capsys.readouterr().err
    other = tmp_path / "other"
    other.mkdir()
    (other / "x.txt").write_text("not ours")
    assert run(tiny_cascade, other) == 2
    assert "not empty" in capsys.readouterr().err


def test_depths_outside_the_model(tiny_cascade, tmp_path, capsys):
    assert cli.main(["-q", "dataset", "--model", str(tiny_cascade), "--per-depth", "1", "--depths", "2-5",
                     "--resolution", "64", "--out", str(tmp_path / "ds")]) == 2
    assert "depth classes 0-2" in capsys.readouterr().err
    assert not (tmp_path / "ds").exists()


def test_a_full_disk_leaves_no_half_written_item(tiny_cascade, tmp_path, capsys, full_disk):
    out = tmp_path / "ds"
    assert run(tiny_cascade, out) == 2
    assert "No space left on device" in capsys.readouterr().err
    assert list((out / "items").iterdir()) == []  # neither an item nor a temporary file


def test_two_processes_under_torchrun_make_exactly_the_requested_set(tiny_cascade, tmp_path):
    out = tmp_path / "ds"
    torchrun_cli("dataset", "--model", tiny_cascade, "--per-depth", "3", "--depths", "all", "--resolution", "64",
                 "--steps", "2", "--device", "cpu", "--out", out)
    files = sorted(p.name for p in (out / "items").iterdir())
    expected = sorted(f"slice_d{d:03d}_{j:06d}.tif" for d in range(3) for j in range(3))
    assert files == expected  # the union is the requested set, no duplicates, nothing else
    ranks = [read_provenance(out / "items" / f)["rank"] for f in files]
    assert sorted(set(ranks)) == [0, 1] and ranks.count(0) == 5 and ranks.count(1) == 4
    assert len(manifest(out)) == 9
