"""Fault injection (issue 13, part 6): every command that writes is made to fail, or killed, at each
of its write points, and must then leave

* a clear message and no traceback (a refused write) or nothing to say (a kill);
* no partial file under a final name: every file under its final name is whole;
* no stray temporary file (after a refused write or a SIGTERM at once; after a SIGKILL, once the
  same command has run again);
* and the same command run again (``--resume`` for training) must reach the state of an
  uninterrupted run: pixels, weights, optimiser state, cards and logs equal, but their times.

A write point is an ``fsync`` (see tests/_faultkit.py). The refused writes cycle through a full
disk, a used-up quota, a read-only file system and a missing permission. A real full disk (a small
tmpfs) is in test_a_real_full_disk_at_many_sizes.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import _faultkit as fk
from napari_zfdiffusion import cli

from conftest import make_blobs, make_stacks


@pytest.fixture(autouse=True)
def _threads():
    """The same number of threads in every run (this process, the children): bitwise equal results."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(fk.THREADS)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_cascade, tiny_segmenter):
    root = tmp_path_factory.mktemp("fault-inputs")
    stacks = make_stacks(root / "stacks", n=2, z=3, shape=(40, 48))
    images, masks = make_blobs(root / "blobs", n=2, shape=(64, 64))
    stack = make_blobs(root / "stack", n=1, shape=(64, 80), masks=False)[0]
    return {"cascade": tiny_cascade, "segmenter": tiny_segmenter, "stacks": stacks, "images": images,
            "masks": masks, "image": next(Path(stack).glob("*.tif"))}


def command(kind: str, inputs: dict, out: Path) -> tuple[list[str], list[str]]:
    """The command line of ``kind`` writing into ``out``, and what to add to it to resume."""
    common = ["--device", "cpu"]
    if kind == "generate":
        return ["-q", "generate", "--model", str(inputs["cascade"]), "--depth", "1", "--resolution", "64",
                "--steps", "2", "--n", "2", "--out", str(out / "slices.tif"), "--preview", str(out / "slices.png"),
                *common], []
    if kind == "dataset":
        return ["-q", "dataset", "--model", str(inputs["cascade"]), "--per-depth", "2", "--depths", "0-1",
                "--resolution", "64", "--steps", "2", "--out", str(out), *common], []
    if kind == "segment":
        return ["-q", "segment", "--model", str(inputs["segmenter"]), "--in", str(inputs["image"]),
                "--out", str(out / "labels.tif"), "--prob-out", str(out / "prob.tif"), *common], []
    if kind == "train-cascade":
        return ["-q", "train", "cascade", "--data", str(inputs["stacks"]), "--out", str(out), "--stage", "base",
                "--size", "tiny", "--steps", "2", "--checkpoint-every", "1", "--batch-size", "2", *common], ["--resume"]
    if kind == "train-unet":
        return ["-q", "train", "unet", "--images", str(inputs["images"]), "--masks", str(inputs["masks"]),
                "--out", str(out), "--size", "tiny", "--steps", "2", "--checkpoint-every", "1", "--batch-size", "2",
                "--crop", "32", *common], ["--resume"]
    raise ValueError(kind)


KINDS = ["generate", "dataset", "segment", "train-cascade", "train-unet"]


def reference(kind, inputs, root: Path) -> tuple[Path, list[str]]:
    out = root / "ref" / "out"
    rc, points = fk.trace_writes(command(kind, inputs, out)[0])
    assert rc == 0 and points
    return out, points


def assert_whole(out: Path) -> None:
    for p in fk.final_files(out):
        fk.check_whole(p)  # raises on a truncated or half-written file


@pytest.mark.parametrize("kind", KINDS)
def test_a_refused_write_at_every_write_point(kind, inputs, tmp_path, capsys):
    ref, points = reference(kind, inputs, tmp_path)
    files = [p for p in points if not p.endswith("/")]
    n_files = len(files)
    for i in boundaries(files):
        code = fk.CODES[i % len(fk.CODES)]
        out = tmp_path / f"fail{i}" / "out"
        argv, resume = command(kind, inputs, out)
        capsys.readouterr()
        with fk.Injected(i, code) as fault:
            rc = cli.main(argv)
        err = capsys.readouterr().err
        where = f"{kind}, write point {i} of {n_files} ({fault.path}), {fk.MESSAGES[code]}"
        assert fault.hit, where
        assert rc == 2, f"{where}: exit code {rc}\n{err}"
        assert "could not write '" in err and fk.MESSAGES[code] in err, f"{where}: {err}"
        assert "Traceback" not in err, where
        assert fk.leftovers(out.parent) == [], where
        assert_whole(out.parent)
        assert cli.main(argv + resume) == 0, where
        assert fk.leftovers(out.parent) == [], where
        assert fk.differences(ref, out) == [], where


def boundaries(points: list[str]) -> list[int]:
    """The write points (1-based) that stand for all: a point is known by what is written and what
    was written just before it; of points alike (the items of a data set, the checkpoints of a
    training) only the last is kept, and the first point of the run."""
    import re

    kinds = [re.sub(r"\d+", "#", re.sub(r"\.\d+\.\w+\.part", ".part", p)) for p in points]
    keys = list(zip(["start"] + kinds[:-1], kinds))
    return sorted({1} | {i + 1 for i, k in enumerate(keys) if k not in keys[i + 1:]})


@pytest.mark.parametrize("kind", ["dataset", "segment", "train-cascade", "train-unet"])
def test_a_kill_at_every_write_point_resumes_to_the_uninterrupted_state(kind, inputs, tmp_path):
    ref, points = reference(kind, inputs, tmp_path)
    for i in boundaries(points):
        out = tmp_path / f"kill{i}" / "out"
        argv, resume = command(kind, inputs, out)
        where = f"{kind}, killed at write point {i} of {len(points)} ({points[i - 1]})"
        assert fk.die_at(argv, i) == -signal.SIGKILL, where
        assert_whole(out.parent)
        assert cli.main(argv + resume) == 0, where
        assert fk.leftovers(out.parent) == [], where
        assert fk.differences(ref, out) == [], where


@pytest.mark.parametrize("kind", ["dataset", "train-cascade"])
def test_sigterm_at_write_points_leaves_no_temporary_file(kind, inputs, tmp_path):
    ref, points = reference(kind, inputs, tmp_path)
    for i in boundaries(points)[::2]:
        out = tmp_path / f"term{i}" / "out"
        argv, resume = command(kind, inputs, out)
        where = f"{kind}, SIGTERM at write point {i} of {len(points)} ({points[i - 1]})"
        assert fk.die_at(argv, i, signal.SIGTERM) == 130, where
        assert fk.leftovers(out.parent) == [], where
        assert_whole(out.parent)
        assert cli.main(argv + resume) == 0, where
        assert fk.differences(ref, out) == [], where


def test_the_differences_are_found(inputs, tmp_path):
    """The comparison that the tests above rely on sees a changed pixel, a changed weight and a
    missing file."""
    import numpy as np
    import tifffile
    from safetensors.torch import load_file, save_file

    ref, _ = reference("train-cascade", inputs, tmp_path)
    other = tmp_path / "other" / "out"
    shutil.copytree(ref, other)
    assert fk.differences(ref, other) == []
    w = other / "base" / "diffusion_pytorch_model.safetensors"
    t = load_file(str(w))
    key = next(iter(t))
    t[key] = t[key].clone()
    t[key].view(-1)[0] += 1e-3
    save_file(t, str(w))
    (other / "training" / "base" / "log.jsonl").unlink()
    assert fk.differences(ref, other) == [f"missing {Path('training/base/log.jsonl')}",
                                          f"differs {Path('base/diffusion_pytorch_model.safetensors')}"]
    ds, _ = reference("dataset", inputs, tmp_path / "d")
    copy, _ = reference("dataset", inputs, tmp_path / "d2")  # a second uninterrupted run: the same
    assert fk.differences(ds, copy) == []
    item = next((ds / "items").glob("*.tif"))
    arr = tifffile.imread(item)
    arr.flat[0] = np.nextafter(arr.flat[0], np.float32(2))
    from napari_zfdiffusion.core.io import read_provenance, write_tiff

    write_tiff(copy / "items" / item.name, arr, read_provenance(item))
    assert fk.differences(ds, copy) == [f"differs {Path('items') / item.name}"]


# ----------------------------------------------------------------------------- a real full disk

def _can_mount_tmpfs() -> bool:
    if not shutil.which("unshare"):
        return False
    r = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
                       capture_output=True, check=False)
    return r.returncode == 0


@pytest.mark.skipif(sys.platform != "linux" or not _can_mount_tmpfs(),
                    reason="needs unprivileged user namespaces to mount a small tmpfs")
@pytest.mark.parametrize("kind", ["segment", "train-cascade", "dataset"])
def test_a_real_full_disk_at_many_sizes(kind, inputs, tmp_path):
    """The command runs on a tmpfs too small for its outputs (at sizes that fill it at different
    moments): it must say the disk is full, leave no temporary file and no partial file; the same
    command, once the tmpfs is grown, ends as an uninterrupted run does."""
    ref, _ = reference(kind, inputs, tmp_path)
    total = sum(p.stat().st_size for p in fk.final_files(ref))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    script = Path(__file__).with_name("_fullrun.py")
    sizes = ",".join(str(max(16, int(total * frac / 1024))) for frac in (0.05, 0.3, 0.6, 0.9))
    argv, resume = command(kind, inputs, mnt / "out")
    r = subprocess.run(["unshare", "-rm", sys.executable, str(script), str(mnt), sizes, str(ref),
                        "--", *argv, "--", *resume], capture_output=True, text=True, timeout=600, check=False)
    assert r.returncode == 0, f"{kind} on disks of {sizes} kB:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    assert r.stdout.count("full at") >= 3, r.stdout  # the disk filled at (nearly) every size
