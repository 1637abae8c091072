"""Run inside `unshare -rm` by tests/test_fault_injection.py: for each size, mount a tmpfs of that
many kB on MNT, run a `zfdiffusion` command whose output is on it, check what the full disk left,
grow the tmpfs, run the command again (with the resume flags), compare with the uninterrupted run
REF, and unmount.

    python _fullrun.py MNT SIZE_KB[,SIZE_KB...] REF -- ARGV... -- RESUME...
"""

from __future__ import annotations

import contextlib
import io
import subprocess
import sys
from pathlib import Path

import _faultkit as fk


def main() -> int:
    mnt, sizes, ref = Path(sys.argv[1]), [int(s) for s in sys.argv[2].split(",")], Path(sys.argv[3])
    rest = sys.argv[5:]
    cut = rest.index("--")
    argv, resume = rest[:cut], rest[cut + 1:]
    problems = []
    for size_kb in sizes:
        problems += [f"at {size_kb} kB: {p}" for p in one_size(mnt, size_kb, ref, argv, resume)]
    for p in problems:
        print("PROBLEM:", p)
    return 1 if problems else 0


def one_size(mnt: Path, size_kb: int, ref: Path, argv: list[str], resume: list[str]) -> list[str]:
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(mnt)], check=True)
    import torch

    from napari_zfdiffusion import cli

    torch.set_num_threads(fk.THREADS)

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = cli.main(argv)
    err = err.getvalue()
    problems = []
    if rc == 0:
        print(f"it fitted in {size_kb} kB")
    else:
        if rc != 2 or "the disk is full" not in err or "Traceback" in err:
            problems.append(f"exit code {rc}, said: {err[-2000:]}")
        left = fk.leftovers(mnt)
        if left:
            problems.append(f"temporary files left: {left}")
        for p in fk.final_files(mnt):
            try:
                fk.check_whole(p)
            except Exception as e:  # noqa: BLE001
                problems.append(f"partial file {p}: {type(e).__name__}: {e}")
        print(f"full at {size_kb} kB: {err.strip()[-300:]}")
    subprocess.run(["mount", "-o", "remount,size=512m", str(mnt)], check=True)
    rc = cli.main(argv + resume)
    if rc != 0:
        problems.append(f"the rerun ended with {rc}")
    out = next(p for p in mnt.iterdir() if p.name == "out")
    d = fk.differences(ref, out)
    if d:
        problems.append(f"after the rerun the output differs from an uninterrupted run: {d}")
    if fk.leftovers(mnt):
        problems.append(f"temporary files left after the rerun: {fk.leftovers(mnt)}")
    subprocess.run(["umount", str(mnt)], check=True)
    return problems


if __name__ == "__main__":
    sys.exit(main())
