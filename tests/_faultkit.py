"""Tools of the fault-injection tests (tests/test_fault_injection.py): run a `zfdiffusion` command and
make it fail or die at its N-th write point, find what it left, and compare an output tree with that
of an uninterrupted run.

A *write point* is a call of ``os.fsync``: every output of the tool (TIFF, JSON, data-set item,
memory-mapped output, training state, model folder) is pushed to the disk with ``fsync`` before it
is renamed into place, and its folder after (see core/io.py). Failing there is a full disk found at
the last moment of a write; dying there is a kill with the data written but not yet published
(file fsync) or just published (folder fsync).

Commands that must die run in children of a fork server that has already imported torch and the
CLI (and run nothing), so that each kill costs milliseconds, not the 3-4 s of importing torch.
"""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import re
import signal
import stat
import sys
from pathlib import Path

import numpy as np

# ----------------------------------------------------------------------------- write points

THREADS = 1  # every run of these tests, in this process and in children (the sums' order: bitwise equal results)


def _is_dir(fd: int) -> bool:
    try:
        return stat.S_ISDIR(os.fstat(fd).st_mode)
    except OSError:
        return False


def trace_writes(argv: list[str]) -> tuple[int, list[str]]:
    """Run the command in this process; its exit code and the path of each write point, in order
    (folders end with '/')."""
    from napari_zfdiffusion import cli

    seen: list[str] = []
    real = os.fsync

    def fsync(fd):
        path = os.readlink(f"/proc/self/fd/{fd}")
        seen.append(path + ("/" if _is_dir(fd) else ""))
        return real(fd)

    os.fsync = fsync
    try:
        rc = cli.main(argv)
    finally:
        os.fsync = real
    return rc, seen


class Injected:
    """Make the ``n``-th file write point (1-based; folder syncs are not counted: a folder's fsync
    failing is ignored by design) raise ``OSError(code)``. ``hit``: whether it fired."""

    def __init__(self, n: int, code: int):
        self.n, self.code, self.count, self.hit, self.path = n, code, 0, False, None
        self.real = os.fsync

    def __enter__(self):
        def fsync(fd):
            if not _is_dir(fd):
                self.count += 1
                if self.count == self.n:
                    self.hit, self.path = True, os.readlink(f"/proc/self/fd/{fd}")
                    raise OSError(self.code, os.strerror(self.code))
            return self.real(fd)

        os.fsync = fsync
        return self

    def __exit__(self, *exc):
        os.fsync = self.real
        return False


# ----------------------------------------------------------------------------- kills

def _die_at(argv: list[str], env: dict, n: int, sig: int) -> None:  # runs in a forked child
    import torch

    torch.set_num_threads(THREADS)  # as in the reference run: the results are then equal bit for bit
    os.environ.update(env)
    count = 0
    real = os.fsync

    def fsync(fd):
        nonlocal count
        count += 1
        if count == n:
            os.kill(os.getpid(), sig)
            if sig != signal.SIGKILL:  # SIGTERM: its handler raises at the next bytecode
                for _ in range(1000):
                    pass
        return real(fd)

    os.fsync = fsync
    from napari_zfdiffusion import cli

    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    sys.exit(cli.main(argv))


_CTX = None


def _context():
    global _CTX
    if _CTX is None:
        _CTX = multiprocessing.get_context("forkserver")
        _CTX.set_forkserver_preload(["torch", "diffusers", "napari_zfdiffusion.cli", "_faultkit"])
    return _CTX


def die_at(argv: list[str], n: int, sig: int = signal.SIGKILL, timeout: float = 120) -> int:
    """Run the command in a child process that gets ``sig`` at its ``n``-th write point (file or
    folder fsync); its exit code (-9 for SIGKILL)."""
    env = {k: v for k, v in os.environ.items() if k.startswith("ZFDIFFUSION")}
    p = _context().Process(target=_die_at, args=(argv, env, n, sig))
    p.start()
    p.join(timeout)
    if p.is_alive():
        p.kill()
        raise TimeoutError(f"{argv} did not end")
    return p.exitcode


# ----------------------------------------------------------------------------- what is left

TEMP = re.compile(r"(^\..+\.\d+\.[^.]+\.part$)|(^\..+\.part$)|(\.tmp$)|(\.old$)")
LOCKS = re.compile(r"^\.zfdiffusion.*\.lock(\.json)?$")


def leftovers(folder: Path) -> list[Path]:
    """Temporary files and folders of this tool under ``folder``."""
    return sorted(p for p in Path(folder).rglob("*") if TEMP.search(p.name))


def final_files(folder: Path) -> list[Path]:
    """The files under their final names (not temporary, not inside a temporary folder, not locks)."""
    out = []
    for p in Path(folder).rglob("*"):
        rel = p.relative_to(folder)
        if p.is_file() and not any(TEMP.search(part) for part in rel.parts) and not LOCKS.match(p.name):
            out.append(p)
    return sorted(out)


def check_whole(path: Path) -> None:
    """Raise if ``path`` is not a whole file of its kind (a TIFF, JSON, safetensors, torch state)."""
    name = path.name
    if name.endswith((".tif", ".tiff")):
        import tifffile

        tifffile.imread(path)
    elif name.endswith(".jsonl"):
        for line in path.read_text().splitlines():
            json.loads(line)
    elif name.endswith(".json"):
        json.loads(path.read_text())
    elif name.endswith(".safetensors"):
        from safetensors.torch import load_file

        load_file(str(path))
    elif name.endswith(".pt"):
        import torch

        torch.load(path, map_location="cpu", weights_only=True)


# ----------------------------------------------------------------------------- same state

VOLATILE = {"created", "seconds", "train_seconds", "since", "elapsed"}


def _norm(obj, out: Path):
    if isinstance(obj, dict):
        return {k: _norm(v, out) for k, v in obj.items() if k not in VOLATILE}
    if isinstance(obj, list):
        return [_norm(v, out) for v in obj]
    if isinstance(obj, str):
        return obj.replace(str(out), "<OUT>")
    if isinstance(obj, float):
        return round(obj, 12)
    return obj


def _content(path: Path, out: Path):
    name = path.name
    if name.endswith((".tif", ".tiff")):
        import tifffile

        from napari_zfdiffusion.core.io import read_provenance

        return tifffile.imread(path), _norm(read_provenance(path), out)
    if name.endswith(".jsonl"):
        return [_norm(json.loads(line), out) for line in path.read_text().splitlines()]
    if name.endswith(".json"):
        return _norm(json.loads(path.read_text()), out)
    if name.endswith(".safetensors"):
        from safetensors.torch import load_file

        return {k: v.numpy() for k, v in load_file(str(path)).items()}
    if name.endswith(".pt"):
        import torch

        s = torch.load(path, map_location="cpu", weights_only=True)
        return _flatten(_norm_state(s, out))
    return path.read_bytes()


def _norm_state(s, out):
    return {k: v for k, v in s.items() if k != "elapsed"} if isinstance(s, dict) else s


def _flatten(obj, prefix=""):
    import torch

    flat = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            flat.update(_flatten(v, f"{prefix}{k}."))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            flat.update(_flatten(v, f"{prefix}{i}."))
    elif isinstance(obj, torch.Tensor):
        flat[prefix] = obj.numpy()
    else:
        flat[prefix] = obj
    return flat


def _equal(a, b) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.shape == b.shape and a.dtype == b.dtype \
            and np.array_equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


def differences(ref: Path, out: Path) -> list[str]:
    """How the tree ``out`` differs from ``ref`` (an uninterrupted run's): missing or extra files,
    and files whose content differs (pixels, tensors, cards and logs but their times and paths)."""
    a = {p.relative_to(ref) for p in final_files(ref)}
    b = {p.relative_to(out) for p in final_files(out)}
    diffs = [f"missing {p}" for p in sorted(a - b)] + [f"extra {p}" for p in sorted(b - a)]
    for rel in sorted(a & b):
        if not _equal(_content(ref / rel, ref), _content(out / rel, out)):
            diffs.append(f"differs {rel}")
    return diffs


CODES = [errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES]
MESSAGES = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "your disk quota is used up",
            errno.EROFS: "read-only file system", errno.EACCES: "no permission to write"}
