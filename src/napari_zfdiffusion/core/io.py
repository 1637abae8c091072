"""Files in and out: reading a user's images (TIFF, PNG; memory-mapped when possible), and writing
results (TIFFs with provenance, JSON, PNG previews) to a temporary name that is renamed into place."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from .errors import UserInputError

IMAGE_SUFFIXES = (".tif", ".tiff", ".png")


def list_images(paths: str | Path | Iterable[str | Path]) -> list[Path]:
    """Image files from a folder, a file, or a list of either; sorted, and never empty."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    files: list[Path] = []
    for p in paths:
        p = Path(p)
        if p.is_dir() and p.suffix.lower() != ".zarr":
            files.extend(sorted(q for q in p.iterdir() if q.suffix.lower() in IMAGE_SUFFIXES
                                or (q.is_dir() and q.suffix.lower() == ".zarr")))
        elif p.is_dir():  # an OME-Zarr image is a folder
            files.append(p)
        elif p.is_file():
            files.append(p)
        else:
            raise UserInputError(f"'{p}' does not exist: give a folder of TIFF stacks or a list of TIFF files.")
    if not files:
        raise UserInputError(
            f"no .tif/.tiff/.png images found in {', '.join(str(p) for p in paths)}: "
            "put one (Z, Y, X) TIFF (or OME-Zarr) per specimen in the folder."
        )
    return files


def read_image(path: str | Path) -> np.ndarray:
    """Read a TIFF or PNG as a NumPy array, with a clear error for an unreadable file."""
    path = Path(path)
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            arr = tifffile.imread(path)
        else:
            from PIL import Image

            with Image.open(path) as im:
                arr = np.asarray(im)
    except FileNotFoundError:
        raise UserInputError(f"'{path}' does not exist.") from None
    except Exception as e:  # corrupt or not an image
        raise UserInputError(f"could not read '{path}' as an image ({type(e).__name__}: {e}).") from None
    if arr.size == 0:
        raise UserInputError(f"could not read '{path}' as an image: it holds no pixels (empty or corrupted file).")
    return arr


def check_writable(path: str | Path) -> Path:
    """Fail early, before any work, if ``path`` cannot be written."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if path.exists() and path.is_dir():
        raise UserInputError(f"'{path}' is a folder: give a file name such as {path / 'out.tif'}.")
    if not parent.exists():
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise write_failed(parent, e) from None
    if not parent.is_dir():
        raise UserInputError(f"cannot write '{path}': '{parent}' is a file, not a folder. Choose another --out.")
    if not os.access(parent, os.W_OK):
        raise write_failed(path, PermissionError(errno.EACCES, os.strerror(errno.EACCES)))
    return path


def write_failed(path: str | Path, e: OSError, needed: int | None = None) -> UserInputError:
    """One clear message for a write that the system refused, by cause: a full disk (ENOSPC), a used-up
    quota (EDQUOT), a read-only file system (EROFS), no permission (EACCES, EPERM), or another error.
    It names the path, and the space needed (``needed``, bytes) and free where they matter."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    where = f"'{path}'"
    if e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
        sizes = []
        if needed:
            sizes.append(f"{_mb(needed)} needed")
        free = _free_bytes(folder)
        if free is not None:
            sizes.append(f"{_mb(free)} free")
        size = f" ({', '.join(sizes)})" if sizes else ""
        cause = "your disk quota is used up" if e.errno != errno.ENOSPC else "the disk is full"
        return UserInputError(f"could not write {where}: {cause}{size} [{e.strerror or e}]. "
                              "Free some space or choose another --out.")
    if e.errno == errno.EROFS:
        return UserInputError(f"could not write {where}: '{folder}' is on a read-only file system. "
                              "Choose another --out.")
    if e.errno in (errno.EACCES, errno.EPERM):
        return UserInputError(f"could not write {where}: no permission to write in '{folder}'. "
                              "Choose another --out, or ask for write access to it.")
    if e.errno == errno.ENOTDIR:
        return UserInputError(f"could not write {where}: a part of that path is a file, not a folder. "
                              "Choose another --out.")
    return UserInputError(f"could not write {where}: {e.strerror or e}.")


def refused(e: BaseException, path: str | Path, needed: int | None = None) -> BaseException:
    """What to raise for ``e``, raised while writing ``path``: :func:`write_failed`'s message when the
    system refused the write, else ``e`` itself (a bug stays a traceback). Libraries do not all say
    so with an ``OSError``: torch.save raises a RuntimeError ("unexpected pos"), safetensors a
    SafetensorError ("os error 28"), numpy an OSError without errno ("requested and written"); when
    no errno is given, a disk with (nearly) no space left is taken for the cause."""
    if isinstance(e, OSError) and e.errno:
        return write_failed(path, e, needed)
    m = re.search(r"os error (\d+)", str(e))
    if m:
        code = int(m.group(1))
        return write_failed(path, OSError(code, os.strerror(code)), needed)
    if isinstance(e, (OSError, RuntimeError)) or type(e).__name__ == "SafetensorError":
        path = Path(path)
        free = _free_bytes(path if path.is_dir() else path.parent)
        if free is not None and free < max(1 << 20, needed or 0):
            return write_failed(path, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), needed)
        if isinstance(e, OSError):
            return write_failed(path, e, needed)
    return e


def _mb(n: int) -> str:
    if n < 1e6:
        return f"{n / 1e3:.0f} kB"
    return f"{n / 1e6:.1f} MB" if n < 10e6 else f"{n / 1e6:.0f} MB"


def _free_bytes(folder: Path) -> int | None:
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


@contextlib.contextmanager
def writing(path: str | Path, needed: int | None = None):
    """Turn an ``OSError`` raised while writing ``path`` into :func:`write_failed`'s message."""
    try:
        yield
    except Exception as e:  # noqa: BLE001 - refused() gives back what is not a refused write
        raise refused(e, path, needed) from None


def current_umask() -> int:
    """The process's umask (what new files' permissions are masked with)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def temp_path(path: Path) -> Path:
    """A new temporary file beside ``path`` (``.NAME.PID.XXXX.part``), created empty. Temporary files
    that a killed run of this tool left for ``path`` (their process is gone) are removed first."""
    remove_stale_temps(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".part", dir=path.parent)
    except OSError as e:
        raise write_failed(path, e) from None
    os.close(fd)
    return Path(tmp)


def remove_stale_temps(path: Path) -> list[Path]:
    """Remove the temporary files of ``path`` whose writing process no longer runs (a kill -9, a
    power cut); returns them. A temporary file of a live process is left alone."""
    removed = []
    for p in path.parent.glob(f".{glob_escape(path.name)}.*.part"):
        pid = p.name[len(path.name) + 2:].split(".", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            try:
                p.unlink()
                removed.append(p)
            except OSError:
                pass
    return removed


def glob_escape(name: str) -> str:
    import glob

    return glob.escape(name)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def reserve_space(path: Path, what: Path) -> None:
    """Allocate every block of the (sparse) file ``path`` now, so that a full disk is an error here,
    with the space needed named, and not a bus error when a memory map writes into a hole later."""
    size = path.stat().st_size
    if not hasattr(os, "posix_fallocate") or size == 0:
        return
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as e:
        if e.errno in (errno.EOPNOTSUPP, errno.EINVAL, getattr(errno, "ENOTSUP", -1)):
            return  # a file system without it (some network ones): writes stay unreserved
        raise write_failed(what, e, size) from None
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    """Push a written file's data to the disk (before it is renamed into place, so that a power cut
    leaves the old file or the whole new one, never an empty name)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (a no-op where folders cannot be synced)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """fsync every file and folder under ``folder`` (before the folder is renamed into place)."""
    for root, _dirs, files in os.walk(folder):
        for name in files:
            fsync_file(Path(root) / name)
        fsync_dir(Path(root))


def atomic_write(path: str | Path, write: Callable[[Path], None], needed: int | None = None) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it into place.

    A crash, a full disk or a cancel leaves no half-written file under the final name; a refused
    write is :func:`write_failed`'s message (``needed``: the size of the file, for it).
    """
    path = check_writable(path)
    tmp = temp_path(path)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600; give the file the usual permissions
        fsync_file(tmp)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except Exception as e:  # noqa: BLE001
        tmp.unlink(missing_ok=True)
        raise refused(e, path, needed) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def resolution_tags(provenance: dict | None) -> dict:
    """TIFF resolution tags (pixels per centimetre, as Fiji and napari read them) for the pixel size
    the provenance records (``pixel_size_um``: x, y in micrometres); {} when it records none. The z-step
    has no TIFF tag: it stays in the provenance, where :mod:`.reader` finds it."""
    px = (provenance or {}).get("pixel_size_um") or {}
    try:
        x, y = float(px["x"]), float(px["y"])
    except (KeyError, TypeError, ValueError):
        return {}
    if not (x > 0 and y > 0):
        return {}
    return {"resolution": (1e4 / x, 1e4 / y), "resolutionunit": "CENTIMETER"}


def write_tiff(path: str | Path, data: np.ndarray, provenance: dict | None = None) -> Path:
    """Write ``data`` as a TIFF whose ImageDescription holds the provenance as JSON, with the pixel
    size it records in the resolution tags."""
    import tifffile

    desc = json.dumps(provenance or {}, default=str)

    def _write(tmp: Path) -> None:
        tifffile.imwrite(tmp, np.ascontiguousarray(data), description=desc, metadata=None,
                         **resolution_tags(provenance))

    return atomic_write(path, _write, data.nbytes)


def write_ome_zarr(path: str | Path, data: np.ndarray, provenance: dict | None = None) -> Path:
    """Write ``data`` ((Y, X) or (Z, Y, X)) as an OME-Zarr image (NGFF 0.4, one resolution level, one
    chunk per plane) with its physical scale (``pixel_size_um`` of the provenance) and the provenance
    in its attributes (``zfdiffusion``). Built in a hidden folder beside ``path`` and renamed into place:
    a crash or a full disk leaves no half-written image under the final name."""
    import zarr

    path = check_writable(path)
    data = np.ascontiguousarray(data)
    tmp = path.with_name(f".{path.name}.part")
    shutil.rmtree(tmp, ignore_errors=True)
    prov = provenance or {}
    px = prov.get("pixel_size_um") or {}
    names = "zyx"[-data.ndim:]
    axes = [{"name": a, "type": "space", **({"unit": "micrometer"} if px.get(a) else {})} for a in names]
    scale = [float(px.get(a) or 1.0) for a in names]
    try:
        try:
            group = zarr.open_group(str(tmp), mode="w", zarr_format=2)
        except TypeError:  # zarr 2
            group = zarr.open_group(str(tmp), mode="w")
        chunks = (1, *data.shape[-2:]) if data.ndim == 3 else data.shape
        create = getattr(group, "create_array", None) or group.create_dataset
        arr = create("0", shape=data.shape, dtype=data.dtype, chunks=chunks)
        arr[...] = data
        group.attrs["multiscales"] = [{"version": "0.4", "name": path.name, "axes": axes, "datasets": [
            {"path": "0", "coordinateTransformations": [{"type": "scale", "scale": scale}]}]}]
        group.attrs["zfdiffusion"] = json.loads(json.dumps(prov, default=str))
        fsync_tree(tmp)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except Exception as e:  # noqa: BLE001
        shutil.rmtree(tmp, ignore_errors=True)
        raise refused(e, path, data.nbytes) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


LOCK_NAME = ".zfdiffusion.lock"


def lock_folder(folder: str | Path, what: str, name: str = LOCK_NAME, target: str | Path | None = None):
    """Take the lock of an output folder for this process (one writer per folder), or refuse with a
    message naming the run that holds it. Returns the held lock (``.release()`` it when done; it is
    released anyway when the process ends, so a lock left by a killed run is simply taken over: the
    lock is an OS file lock, not the file's existence). ``target``: what the lock protects, for the
    message (default: the folder)."""
    import socket
    import sys as _sys
    import time as _time

    from filelock import FileLock, Timeout

    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise write_failed(folder, e) from None
    path = folder / name
    info = path.with_name(path.name + ".json")
    lock = FileLock(str(path), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        try:
            held = json.loads(info.read_text())
            by = f" (process {held.get('pid')} on {held.get('host')}, since {held.get('since')}: {held.get('command')})"
        except (OSError, ValueError):
            by = ""
        raise UserInputError(f"'{target or folder}' is being written by another {what}{by}: wait for it to finish, "
                             "or choose another --out.") from None
    except OSError as e:
        raise write_failed(path, e) from None
    try:
        info.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                    "since": _time.strftime("%Y-%m-%d %H:%M:%S"),
                                    "command": " ".join(_sys.argv)[:300]}))
    except OSError:
        pass  # the lock holds without its description
    return lock


def read_provenance(path: str | Path) -> dict:
    """The provenance JSON stored by :func:`write_tiff` ({} if there is none)."""
    import tifffile

    with tifffile.TiffFile(path) as tf:
        desc = tf.pages[0].description or ""
    try:
        return json.loads(desc)
    except json.JSONDecodeError:
        return {}


def write_png_preview(path: str | Path, image: np.ndarray) -> Path:
    """An 8-bit PNG of a 2D image in [0, 1] (or a row of several), for a quick look."""
    from PIL import Image

    img = np.asarray(image, dtype=np.float32)
    if img.ndim == 3:
        img = np.concatenate(list(img), axis=1)
    img8 = (np.clip(img, 0, 1) * 255).round().astype(np.uint8)
    return atomic_write(path, lambda tmp: Image.fromarray(img8).save(tmp, format="PNG"))


def write_json(path: str | Path, obj: dict) -> Path:
    text = json.dumps(obj, indent=2, default=str) + "\n"
    return atomic_write(path, lambda tmp: tmp.write_text(text))


class TiffMemmap:
    """A TIFF written through a memory map, for outputs larger than memory: ``with TiffMemmap(path,
    shape, dtype, provenance) as arr: arr[...] = ...``. The file is built under a temporary name and
    renamed into place only when the block ends without an error (a crash or cancel leaves nothing)."""

    def __init__(self, path: str | Path, shape: tuple[int, ...], dtype, provenance: dict | None = None):
        self.path = check_writable(path)
        self.shape, self.dtype, self.provenance = tuple(shape), np.dtype(dtype), provenance or {}
        self.tmp: Path | None = None
        self.array: np.memmap | None = None

    def __enter__(self) -> np.ndarray:
        import tifffile

        self.tmp = temp_path(self.path)
        try:
            self.array = tifffile.memmap(self.tmp, shape=self.shape, dtype=self.dtype,
                                         description=json.dumps(self.provenance, default=str), metadata=None,
                                         **resolution_tags(self.provenance))
            reserve_space(self.tmp, self.path)  # a full disk: an error now, not a bus error mid-job
        except OSError as e:
            self.array = None
            self.tmp.unlink(missing_ok=True)
            raise refused(e, self.path, self.array_bytes()) from None
        except BaseException:
            self.array = None
            self.tmp.unlink(missing_ok=True)
            raise
        return self.array

    def __exit__(self, exc_type, exc, tb) -> bool:
        arr, self.array = self.array, None
        try:
            if exc_type is None:
                arr.flush()
        except OSError as e:
            del arr
            self.tmp.unlink(missing_ok=True)
            raise refused(e, self.path, self.array_bytes()) from None
        del arr
        if exc_type is not None:
            self.tmp.unlink(missing_ok=True)
            return False
        try:
            os.chmod(self.tmp, 0o666 & ~current_umask())
            fsync_file(self.tmp)
            os.replace(self.tmp, self.path)
            fsync_dir(self.path.parent)
        except OSError as e:
            self.tmp.unlink(missing_ok=True)
            raise refused(e, self.path, self.array_bytes()) from None
        return False

    def array_bytes(self) -> int:
        return int(np.prod(self.shape)) * self.dtype.itemsize


def read_image_lazy(path: str | Path) -> np.ndarray:
    """A TIFF as a read-only memory map when it is stored uncompressed and contiguous (big stacks are
    then read plane by plane, as needed), else read into memory like :func:`read_image`."""
    path = Path(path)
    if path.suffix.lower() in (".tif", ".tiff") and path.is_file():
        import tifffile

        try:
            return tifffile.memmap(path, mode="r")
        except Exception:  # noqa: BLE001 - compressed, tiled or odd files: read normally below
            pass
    return read_image(path)
