"""Faults while writing (issue 13, part 1): a full disk is found before a memory map writes into it,
a SIGTERM removes the temporary files on the way out, and those a killed run left are removed at the
next start."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tifffile

from napari_zfdiffusion.core.errors import UserInputError
from napari_zfdiffusion.core.io import TiffMemmap, remove_stale_temps, temp_path, write_tiff


def test_a_full_disk_is_found_before_the_memory_map_is_written(tmp_path, monkeypatch):
    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    out = tmp_path / "labels.tif"
    with pytest.raises(UserInputError, match=r"the disk is full \(\d+ MB needed, \d+ (MB|kB) free\)"):
        with TiffMemmap(out, (64, 4096, 4096), np.int32):
            pytest.fail("the job must not start")
    assert list(tmp_path.iterdir()) == []  # neither the output nor a temporary file


def test_space_is_reserved_for_the_whole_file(tmp_path):
    out = tmp_path / "big.tif"
    with TiffMemmap(out, (8, 512, 512), np.float32) as arr:
        tmp = next(tmp_path.glob(".big.tif.*.part"))
        assert os.stat(tmp).st_blocks * 512 >= 8 * 512 * 512 * 4  # allocated, not a sparse file
        arr[:] = 1
    assert tifffile.imread(out).sum() == 8 * 512 * 512


def test_temporary_files_of_dead_runs_are_removed_at_the_next_start(tmp_path):
    out = tmp_path / "x.tif"
    dead = tmp_path / ".x.tif.999999999.abc123.part"  # no such process
    alive = tmp_path / f".x.tif.{os.getppid()}.def456.part"  # a live process (our parent)
    other = tmp_path / ".y.tif.999999999.abc123.part"  # another output's
    for p in (dead, alive, other):
        p.write_bytes(b"half")
    write_tiff(out, np.zeros((4, 4), np.uint8))
    assert not dead.exists() and alive.exists() and other.exists()
    assert remove_stale_temps(tmp_path / "y.tif") == [other]
    tmp = temp_path(out)
    assert tmp.name.startswith(f".x.tif.{os.getpid()}.") and tmp.exists()


def test_sigterm_removes_the_temporary_files(tiny_segmenter, tmp_path):
    """A `segment` stopped by SIGTERM mid-job exits 130 and leaves neither its output nor a temp file."""
    img = tmp_path / "big.tif"
    rng = np.random.default_rng(0)
    tifffile.imwrite(img, (rng.random((3, 1024, 1024)) * 255).astype(np.uint8))
    out = tmp_path / "o" / "labels.tif"
    proc = subprocess.Popen([sys.executable, "-m", "napari_zfdiffusion.cli", "-q", "segment", "--model",
                             str(tiny_segmenter), "--in", str(img), "--out", str(out), "--tile", "64",
                             "--overlap", "16", "--device", "cpu"], stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    deadline = time.monotonic() + 120
    while not list(out.parent.glob(".labels.tif.*.part")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "the job ended before it could be stopped"
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 130
    assert "interrupted; nothing half-written" in proc.stderr.read()
    assert list(out.parent.iterdir()) == []
