"""One writer per output folder (issue 13, part 2): a second run into a folder that a running one
holds is refused with a message naming the running one; a lock left by a killed run is taken over."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from napari_zfdiffusion import cli
from napari_zfdiffusion.core.errors import UserInputError
from napari_zfdiffusion.core.io import lock_folder

from conftest import make_stacks


def test_a_held_folder_is_refused_naming_the_holder(tmp_path):
    held = lock_folder(tmp_path / "out", "data set run")
    try:
        with pytest.raises(UserInputError, match=f"being written by another data set run \\(process {os.getpid()}"):
            lock_folder(tmp_path / "out", "data set run")
    finally:
        held.release()
    lock_folder(tmp_path / "out", "data set run").release()  # free again


def test_a_lock_left_by_a_killed_process_is_taken_over(tmp_path):
    code = ("import sys, time; from napari_zfdiffusion.core.io import lock_folder; "
            f"held = lock_folder({str(tmp_path / 'out')!r}, 'test'); print('held', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    with pytest.raises(UserInputError, match="being written by another test"):
        lock_folder(tmp_path / "out", "test")
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    assert (tmp_path / "out" / ".zfdiffusion.lock").exists()  # the file stays; the OS lock went with the process
    lock_folder(tmp_path / "out", "test").release()


def test_cli_runs_into_a_held_folder_are_refused(tiny_cascade, tiny_segmenter, tmp_path, capsys):
    ds = tmp_path / "ds"
    held = lock_folder(ds, "data set run", ".zfdiffusion.rank0.lock")
    try:
        assert cli.main(["-q", "dataset", "--model", str(tiny_cascade), "--per-depth", "1", "--depths", "0",
                         "--resolution", "64", "--steps", "1", "--device", "cpu", "--out", str(ds)]) == 2
        assert "being written by another data set run" in capsys.readouterr().err
        assert not (ds / "items").exists()  # nothing started
    finally:
        held.release()
    data = make_stacks(tmp_path / "stacks", n=2)
    held = lock_folder(tmp_path / "m" / "training" / "base", "training run")
    try:
        assert cli.main(["-q", "train", "cascade", "--data", str(data), "--out", str(tmp_path / "m"), "--size", "tiny",
                         "--steps", "1", "--device", "cpu"]) == 2
        assert "being written by another training run" in capsys.readouterr().err
    finally:
        held.release()
    import hashlib

    from napari_zfdiffusion.core.store import home

    out = tmp_path / "seg" / "labels.tif"
    out.parent.mkdir()
    key = hashlib.sha1(str(out.resolve()).encode()).hexdigest()[:16]
    held = lock_folder(home() / "locks", "segmentation", f"segment-{key}.lock")
    try:
        import numpy as np
        import tifffile

        tifffile.imwrite(tmp_path / "img.tif", np.zeros((64, 64), np.uint8))
        assert cli.main(["-q", "segment", "--model", str(tiny_segmenter), "--in", str(tmp_path / "img.tif"),
                         "--out", str(out), "--device", "cpu"]) == 2
        assert "being written by another segmentation" in capsys.readouterr().err and not out.exists()
    finally:
        held.release()


def test_two_data_set_runs_started_together(tiny_cascade, tmp_path):
    """Two processes into one folder at once: one makes the data set, the other is refused (exit 2)."""
    out = tmp_path / "ds"
    args = [sys.executable, "-m", "napari_zfdiffusion.cli", "-q", "dataset", "--model", str(tiny_cascade),
            "--per-depth", "3", "--depths", "0-1", "--resolution", "64", "--steps", "2", "--device", "cpu",
            "--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [(p.wait(300), p.stderr.read()) for p in procs]
    codes = sorted(rc for rc, _ in results)
    if codes == [0, 0]:  # the first finished before the second started: then it resumed a complete set
        return
    assert codes == [0, 2], results
    assert any("being written by another data set run" in err for rc, err in results if rc == 2)
    assert len(list((out / "items").iterdir())) == 6 and not list((out / "items").glob(".*"))
