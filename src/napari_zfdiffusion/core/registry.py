"""The registry of downloadable models: models that are not bundled, each a list of files with the
address, size and sha256 of every one (``napari_zfdiffusion/registry.json``, or the file that
``ZFDIFFUSION_REGISTRY`` names: a lab's own registry, a mirror inside an institute's network).

:func:`download_model` puts a registry model into a folder: every file is downloaded (with pooch's
HTTP downloader: requests, TLS certificates always checked) to a temporary name, its size and sha256
checked, and renamed into a hidden staging folder beside the model folder; the staging folder is
renamed to the model's name only when every file is there and verified. A download that stops (a
closed connection, Ctrl-C, a full disk, a wrong file) leaves nothing under the model's name: only
the files already verified, which the next run reuses. Offline (``ZFDIFFUSION_OFFLINE=1``) nothing
is downloaded, and the error names each missing file and where to put it.

Which folder a name goes to (the cache, ``ZFDIFFUSION_HOME/models``) is :mod:`.store`'s business:
:func:`.store.fetch_model` and :func:`.store.resolve_model` use this module, never the other way round.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

from .errors import UserInputError
from .io import current_umask, fsync_dir, fsync_file, lock_folder, refused, temp_path, write_failed
from .progress import Progress

REGISTRY_ENV = "ZFDIFFUSION_REGISTRY"
OFFLINE_ENV = "ZFDIFFUSION_OFFLINE"
KINDS = ("cascade", "vae", "latent", "segmentation")
TIMEOUT_S = (15, 60)  # connecting, and waiting for the next bytes: a dead server is an error, not a hang
CHUNK = 1 << 18
GUIDE = 'docs/user-guide.md, "Models: bundled, downloadable, offline"'
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_SHA = re.compile(r"^[0-9a-f]{64}$")
_LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True)
class RegistryFile:
    path: str  # relative to the model folder, with "/" (e.g. "base/config.json")
    url: str
    sha256: str
    size: int  # bytes


@dataclass(frozen=True)
class RegistryModel:
    name: str
    kind: str
    description: str
    files: tuple[RegistryFile, ...]
    licence: str = ""

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)


def registry_path() -> Path:
    """The registry file: ``ZFDIFFUSION_REGISTRY`` if set, else the one shipped in the package."""
    env = os.environ.get(REGISTRY_ENV)
    return Path(env).expanduser() if env else Path(__file__).resolve().parent.parent / "registry.json"


def is_offline() -> bool:
    return os.environ.get(OFFLINE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def format_size(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def load_registry(path: Path | None = None) -> dict[str, RegistryModel]:
    """The registry's models by name, every field checked (a clear error names the first bad one)."""
    path = Path(path) if path is not None else registry_path()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserInputError(f"the model registry '{path}' does not exist"
                             + (f" (set by {REGISTRY_ENV})." if os.environ.get(REGISTRY_ENV) else ".")) from None
    except (OSError, ValueError) as e:
        raise UserInputError(f"the model registry '{path}' could not be read ({e}).") from None
    models = data.get("models") if isinstance(data, dict) else None
    if not isinstance(models, list):
        raise UserInputError(f"the model registry '{path}' must be a JSON object with a list 'models'.")
    out: dict[str, RegistryModel] = {}
    for i, m in enumerate(models):
        where = f"the model registry '{path}', model {i + 1}"
        if not isinstance(m, dict) or not isinstance(m.get("name"), str) or not _NAME.match(m["name"]):
            raise UserInputError(f"{where}: 'name' must be a folder name (letters, digits, '.', '_', '-').")
        where = f"the model registry '{path}', model '{m['name']}'"
        if m["name"] in out:
            raise UserInputError(f"{where} is listed twice.")
        if m.get("kind") not in KINDS:
            raise UserInputError(f"{where}: 'kind' must be one of {', '.join(KINDS)}, got {m.get('kind')!r}.")
        files = m.get("files")
        if not isinstance(files, list) or not files:
            raise UserInputError(f"{where}: 'files' must be a non-empty list.")
        out[m["name"]] = RegistryModel(m["name"], m["kind"], str(m.get("description", "")),
                                       tuple(_file(f, where) for f in files), str(m.get("licence", "")))
        if len({f.path for f in out[m["name"]].files}) != len(files):
            raise UserInputError(f"{where} lists a file twice.")
    return out


def _file(f, where: str) -> RegistryFile:
    if not isinstance(f, dict):
        raise UserInputError(f"{where}: every file must be an object with path, url, sha256 and size.")
    p = f.get("path")
    parts = PurePosixPath(p).parts if isinstance(p, str) else ()
    if not parts or p.startswith("/") or "\\" in p or any(x in ("..", ".") or x.startswith(".") for x in parts):
        raise UserInputError(f"{where}: file path {p!r} must be a relative path inside the model folder.")
    url = f.get("url")
    u = urlsplit(url) if isinstance(url, str) else None
    if u is None or not u.hostname or not (u.scheme == "https" or (u.scheme == "http" and u.hostname in _LOOPBACK)):
        raise UserInputError(f"{where}: file '{p}' needs an https:// address, got {url!r}.")
    sha = f.get("sha256")
    if not isinstance(sha, str) or not _SHA.match(sha):
        raise UserInputError(f"{where}: file '{p}' needs a sha256 of 64 lowercase hex digits, got {sha!r}.")
    size = f.get("size")
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise UserInputError(f"{where}: file '{p}' needs its size in bytes, got {size!r}.")
    return RegistryFile(p, url, sha, size)


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def staging_dir(folder: Path) -> Path:
    """Where a download of ``folder`` is assembled (hidden, beside it: same disk, one rename)."""
    return folder.with_name(f".{folder.name}.download")


def problems(model: RegistryModel, folder: Path, hashes: bool = True) -> list[tuple[RegistryFile, str]]:
    """(file, what is wrong) for each of ``model``'s files that ``folder`` lacks or holds with another
    sha256 (``hashes=False``: only whether each is there)."""
    out = []
    for f in model.files:
        p = folder / f.path
        if not p.is_file():
            out.append((f, "missing"))
        elif hashes:
            got = sha256_of(p)
            if got != f.sha256:
                out.append((f, f"sha256 {got}, expected {f.sha256}"))
    return out


def not_downloaded(model: RegistryModel, folder: Path) -> str:
    """What to say when a registry model is asked for by name before it was fetched."""
    msg = (f"model '{model.name}' is not downloaded yet ({format_size(model.size)}, from the model registry): "
           f"run `zfdiffusion models --fetch {model.name}`, which puts it in '{folder}'")
    if is_offline():
        msg += (f". Offline ({OFFLINE_ENV}=1): copy the model folder there from a machine that has it "
                f"(see {GUIDE})")
    return msg + "."


def offline_error(model: RegistryModel, folder: Path, missing: list[tuple[RegistryFile, str]],
                  offline: bool = True) -> UserInputError:
    """The files of ``model`` that ``folder`` lacks, each with where to put it and where it comes from."""
    lines = "\n".join(f"  {folder / f.path}  (from {f.url})" for f, _what in missing)
    why = (f"offline mode ({OFFLINE_ENV}=1 or --offline): nothing is downloaded, and model '{model.name}' is not "
           "complete in the cache" if offline else f"'{folder}' holds only part of model '{model.name}' (copied "
           "by hand?); delete it to download the model again, or complete it")
    return UserInputError(
        f"{why}. Missing: {len(missing)} of its {len(model.files)} files; put each at its place:\n{lines}\n"
        f"Download them on a machine with internet (or run `zfdiffusion models --fetch {model.name}` there and copy "
        f"the folder '{folder.name}'); `zfdiffusion models --fetch {model.name} --offline` then checks each against "
        "the registry's sha256.")


def download_model(model: RegistryModel, folder: Path, progress: Callable[[Progress], None] | None = None,
                   offline: bool | None = None) -> Path:
    """``folder`` holding ``model``'s files, every one sha256-checked: an existing complete folder as
    it is, else downloaded (see the module docstring). ``progress`` gets Progress records in bytes
    (one stage); raising :class:`.errors.Cancelled` from it stops the download (verified files kept)."""
    folder = Path(folder)
    offline = is_offline() if offline is None else offline
    if folder.is_dir():
        return _checked(model, folder, offline)
    if offline:
        raise offline_error(model, folder, [(f, "missing") for f in model.files])
    lock = lock_folder(folder.parent, f"download of model '{model.name}'", name=f".{model.name}.lock",
                       target=folder)
    try:
        if folder.is_dir():  # another process finished it while we waited for the lock
            return _checked(model, folder, offline)
        stage = staging_dir(folder)
        try:
            stage.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise write_failed(stage, e) from None
        for f, _what in problems(model, stage):  # a file of an earlier run that is not the registry's
            (stage / f.path).unlink(missing_ok=True)
        todo = [f for f in model.files if not (stage / f.path).is_file()]
        needed = sum(f.size for f in todo)
        free = _free(stage)
        if free is not None and free < needed + (16 << 20):
            raise write_failed(folder, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), needed)
        done = model.size - needed
        for f in todo:
            _download_file(model, f, stage, done, progress)
            done += f.size
        _remove_strays(model, stage)
        try:
            os.replace(stage, folder)
            fsync_dir(folder.parent)
        except OSError as e:
            raise write_failed(folder, e) from None
    finally:
        lock.release()
    return folder


def _checked(model: RegistryModel, folder: Path, offline: bool) -> Path:
    """``folder`` if it holds every file of ``model`` with the registry's sha256, else a clear error."""
    bad = problems(model, folder)
    wrong = [(f, what) for f, what in bad if what != "missing"]
    if wrong:
        f, what = wrong[0]
        raise UserInputError(f"'{folder / f.path}' is not the registry's file ({what}): the copy of model "
                             f"'{model.name}' in the cache is damaged or another model. Replace that file with the "
                             f"one from {f.url}, or delete '{folder}' and run `zfdiffusion models --fetch "
                             f"{model.name}` again.")
    if bad:
        raise offline_error(model, folder, bad, offline)
    return folder


def _free(folder: Path) -> int | None:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


class _Sink:
    """The file a download is written to, counting bytes for the progress records."""

    def __init__(self, fh, limit: int, what: str, start: int, total: int, stage: str, progress):
        self.fh, self.n, self.limit, self.what = fh, 0, limit, what
        self.start, self.total, self.stage, self.progress = start, total, stage, progress

    def write(self, chunk: bytes) -> int:
        self.n += len(chunk)
        if self.n > self.limit:  # a wrong or endless file: stop before it fills the disk
            raise UserInputError(f"refused {self.what}: the server sends more than the {self.limit:,} bytes the "
                                 "registry gives for it. The partial file was removed; nothing is kept under its "
                                 "name. The server holds another file than the registry names.")
        self.fh.write(chunk)
        if self.progress is not None:
            self.progress(Progress(self.stage, min(self.start + self.n, self.total), self.total))
        return len(chunk)

    def flush(self) -> None:
        self.fh.flush()


def _download_file(model: RegistryModel, f: RegistryFile, stage: Path, start: int, progress) -> None:
    import pooch
    import requests

    dest = stage / f.path
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise write_failed(dest.parent, e) from None
    tmp = temp_path(dest)
    what = f"'{f.path}' of model '{model.name}' from {f.url}"
    host = urlsplit(f.url).hostname
    try:
        try:
            with open(tmp, "wb") as fh:
                sink = _Sink(fh, f.size, what, start, model.size, f"downloading {model.name}", progress)
                pooch.HTTPDownloader(chunk_size=CHUNK, timeout=TIMEOUT_S)(f.url, sink, None)
        except requests.exceptions.SSLError as e:
            raise UserInputError(f"could not download {what}: the TLS certificate check failed ({_short(e)}). "
                                 "It is never turned off: fix the system's certificates (behind a proxy that "
                                 "inspects traffic, point REQUESTS_CA_BUNDLE at its certificate).") from None
        except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as e:
            raise UserInputError(f"could not download {what}: {host} cannot be reached ({_short(e)}): the server is "
                                 f"down, or this machine has no network. Try again later, or work offline: copy "
                                 f"the model's files into the cache by hand and set {OFFLINE_ENV}=1 (see "
                                 f"{GUIDE}).") from None
        except requests.exceptions.HTTPError as e:
            code = e.response.status_code if e.response is not None else "?"
            hint = (" The file is not there: the registry names a file that is not published (yet), or the "
                    "registry is newer than the server." if code == 404 else " Try again later.")
            raise UserInputError(f"could not download {what}: the server answered {code} "
                                 f"{getattr(e.response, 'reason', '') or ''}.{hint}") from None
        except (requests.exceptions.ChunkedEncodingError, requests.exceptions.ContentDecodingError) as e:
            raise UserInputError(_interrupted(what, tmp, f, _short(e))) from None  # a connection closed mid-file
        except requests.exceptions.RequestException as e:
            raise UserInputError(f"could not download {what}: {type(e).__name__}: {_short(e)}.") from None
        got_size = tmp.stat().st_size  # complete as the server sent it (requests checks Content-Length)
        got = sha256_of(tmp)
        if got_size != f.size or got != f.sha256:
            raise UserInputError(
                f"refused {what}: its sha256 is {got} ({got_size:,} bytes), but the registry expects {f.sha256} "
                f"({f.size:,} bytes). The downloaded file was removed; nothing is kept under its name. The server "
                "holds another file than the registry names (changed, corrupted, or a wrong registry entry).")
        os.chmod(tmp, 0o666 & ~current_umask())
        fsync_file(tmp)
        os.replace(tmp, dest)
    except UserInputError:
        tmp.unlink(missing_ok=True)
        raise
    except Exception as e:  # noqa: BLE001 - a refused write (full disk, ...) is one clear message
        tmp.unlink(missing_ok=True)
        raise refused(e, dest, f.size) from None
    except BaseException:  # Ctrl-C, a cancel: no partial file stays
        tmp.unlink(missing_ok=True)
        raise


def _interrupted(what: str, tmp: Path, f: RegistryFile, why: str) -> str:
    try:
        got = tmp.stat().st_size
    except OSError:
        got = 0
    return (f"the download of {what} was interrupted ({why}; {got:,} of its {f.size:,} bytes were written). The "
            "partial file was removed and nothing is under its final name: run the command again to start that "
            "file again (the files already verified are kept).")


def _short(e: BaseException) -> str:
    """The innermost reason of a requests error, e.g. "[Errno 111] Connection refused"."""
    for _ in range(6):
        inner = getattr(e, "reason", None)
        if not isinstance(inner, BaseException):
            inner = e.args[0] if e.args and isinstance(e.args[0], BaseException) else None
        if inner is None:
            break
        e = inner
    text = e.args[0] if e.args and isinstance(e.args[0], str) else str(e)
    m = re.search(r"\[Errno -?\d+\][^'\")]*", text)
    return (m.group(0) if m else text).strip()[:200]


def _remove_strays(model: RegistryModel, stage: Path) -> None:
    """Delete what the staging folder holds besides the model's files (temporary files of a killed run)."""
    keep = {str(stage / f.path) for f in model.files}
    for root, _dirs, files in os.walk(stage):
        for name in files:
            p = os.path.join(root, name)
            if p not in keep:
                try:
                    os.unlink(p)
                except OSError:
                    pass
    for f in model.files:  # the renames into the staging folder, durable before it gets the model's name
        fsync_dir((stage / f.path).parent)


__all__ = ["OFFLINE_ENV", "REGISTRY_ENV", "RegistryFile", "RegistryModel", "download_model", "format_size",
           "is_offline", "load_registry", "not_downloaded", "offline_error", "problems", "registry_path",
           "sha256_of", "staging_dir"]
