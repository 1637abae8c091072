"""The hashed model registry: downloadable models fetched into the cache, every file sha256-checked.

Served by a local HTTP server (127.0.0.1, a thread of this test) from a copy of the bundled
nuclei-unet-demo (1.4 MB), with a registry file made by the test (ZFDIFFUSION_REGISTRY).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import socket
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest

from napari_zfdiffusion import cli
from napari_zfdiffusion.core.errors import UserInputError
from napari_zfdiffusion.core.registry import load_registry, registry_path, staging_dir
from napari_zfdiffusion.core.store import (
    bundled_dir,
    fetch_model,
    list_models,
    resolve_model,
    user_models_dir,
)

NAME = "tiny-unet"
BIG = "unet/diffusion_pytorch_model.safetensors"


class Handler(SimpleHTTPRequestHandler):
    """Serves a folder; ``cut`` (a set of paths) is answered with the full Content-Length but only half
    of the bytes, then the connection is closed (once per path)."""

    cut: ClassVar[set[str]] = set()
    requests: ClassVar[list[str]] = []

    def log_message(self, *args):
        pass

    def do_GET(self):
        path = self.path.lstrip("/")
        type(self).requests.append(path)
        if path in self.cut:
            self.cut.discard(path)
            data = (Path(self.directory) / path).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        super().do_GET()


@pytest.fixture
def served(tmp_path, monkeypatch):
    """(served folder, base URL, registry path): the demo segmentation model on 127.0.0.1."""
    src = tmp_path / "served"
    shutil.copytree(bundled_dir() / "nuclei-unet-demo", src)
    Handler.cut, Handler.requests = set(), []
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(src)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_address[1]}/"
    reg = write_registry(tmp_path / "registry.json", src, base)
    monkeypatch.setenv("ZFDIFFUSION_REGISTRY", str(reg))
    monkeypatch.delenv("ZFDIFFUSION_OFFLINE", raising=False)
    yield src, base, reg
    server.shutdown()
    server.server_close()


def write_registry(path: Path, folder: Path, base: str, name: str = NAME, **changes) -> Path:
    files = []
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            rel = p.relative_to(folder).as_posix()
            files.append({"path": rel, "url": base + rel, "sha256": hashlib.sha256(p.read_bytes()).hexdigest(),
                          "size": p.stat().st_size, **changes.get(rel, {})})
    path.write_text(json.dumps({"format": 1, "models": [
        {"name": name, "kind": "segmentation", "description": "a tiny test U-Net", "files": files}]}))
    return path


def leftovers(root: Path) -> list[str]:
    """Files under ``root`` that look half-written (temporary names)."""
    return [str(p) for p in root.rglob("*") if p.name.endswith(".part") or p.name.startswith("tmp")]


def test_fetch_verifies_lists_as_cached_and_loads(served):
    src, _base, _reg = served
    entry = {m.name: m for m in list_models(downloadable=True)}[NAME]
    assert entry.source == "downloadable" and entry.size == sum(p.stat().st_size for p in src.rglob("*")
                                                                if p.is_file())
    assert NAME not in {m.name for m in list_models()}  # only when asked for
    with pytest.raises(UserInputError, match=f"not downloaded yet.*zfdiffusion models --fetch {NAME}"):
        resolve_model(NAME)

    records = []
    path = fetch_model(NAME, progress=records.append)
    assert path == user_models_dir() / NAME
    for p in src.rglob("*"):
        if p.is_file():
            assert (path / p.relative_to(src)).read_bytes() == p.read_bytes()
    assert records[-1].step == records[-1].total == entry.size
    assert not staging_dir(path).exists() and leftovers(user_models_dir()) == []
    assert {m.name: m.source for m in list_models()}[NAME] == "cached"
    assert resolve_model(NAME) == path

    n = len(Handler.requests)
    assert fetch_model(NAME) == path and len(Handler.requests) == n  # cached: verified, not downloaded again

    from napari_zfdiffusion.core.segment.segmenter import Segmenter

    seg = Segmenter.load(NAME, device="cpu")
    assert seg is not None


def test_a_wrong_hash_is_refused_and_nothing_is_left(served, tmp_path):
    src, base, reg = served
    write_registry(reg, src, base, **{"unet/config.json": {"sha256": "0" * 64}})
    with pytest.raises(UserInputError) as e:
        fetch_model(NAME)
    msg = str(e.value)
    real = hashlib.sha256((src / "unet/config.json").read_bytes()).hexdigest()
    assert "'unet/config.json'" in msg and f"its sha256 is {real}" in msg and f"expects {'0' * 64}" in msg
    assert "was removed" in msg
    final = user_models_dir() / NAME
    assert not final.exists() and not (staging_dir(final) / "unet/config.json").exists()
    assert leftovers(user_models_dir()) == []
    assert NAME not in {m.name for m in list_models()}


def test_an_interrupted_download_leaves_nothing_and_a_rerun_works(served, capsys):
    Handler.cut = {BIG}
    with pytest.raises(UserInputError, match=r"was interrupted \(Connection broken.*bytes were written\).*"
                                             r"run the command again"):
        fetch_model(NAME)
    final = user_models_dir() / NAME
    assert not final.exists() and not (staging_dir(final) / BIG).exists()
    assert leftovers(user_models_dir()) == []
    assert NAME not in {m.name for m in list_models()}

    before = len(Handler.requests)
    assert cli.main(["-q", "models", "--fetch", NAME]) == 0  # the rerun: only what was missing
    assert (final / BIG).is_file() and BIG in Handler.requests[before:]
    assert "model.json" not in Handler.requests[before:]  # verified in the first run, kept
    assert not staging_dir(final).exists()


def test_server_down_says_so_and_how_to_work_offline(served, tmp_path):
    src, _base, reg = served
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    write_registry(reg, src, f"http://127.0.0.1:{port}/")
    with pytest.raises(UserInputError) as e:
        fetch_model(NAME)
    msg = str(e.value)
    assert "cannot be reached" in msg and "server is down" in msg and "ZFDIFFUSION_OFFLINE=1" in msg
    assert not (user_models_dir() / NAME).exists()


def test_offline_names_each_missing_file_and_where_to_put_it(served, monkeypatch):
    src, _base, _reg = served
    monkeypatch.setenv("ZFDIFFUSION_OFFLINE", "1")
    final = user_models_dir() / NAME
    with pytest.raises(UserInputError) as e:
        fetch_model(NAME)
    msg = str(e.value)
    assert "offline mode" in msg and str(final / BIG) in msg and str(final / "model.json") in msg
    assert Handler.requests == []  # nothing was asked of the network
    with pytest.raises(UserInputError, match="Offline"):
        resolve_model(NAME)

    # copied by hand, all but one file: exactly that one is named
    shutil.copytree(src, final, ignore=lambda d, names: ["MODEL_CARD.md"] if Path(d) == src else [])
    with pytest.raises(UserInputError) as e:
        fetch_model(NAME)
    msg = str(e.value)
    assert "1 of its" in msg and str(final / "MODEL_CARD.md") in msg and str(final / BIG) not in msg

    # a wrong file copied by hand is named, with both hashes
    (final / "MODEL_CARD.md").write_text("not the card")
    with pytest.raises(UserInputError, match=r"MODEL_CARD.md' is not the registry's file \(sha256 [0-9a-f]{64}, "
                                             r"expected [0-9a-f]{64}\)"):
        fetch_model(NAME)
    shutil.copy(src / "MODEL_CARD.md", final / "MODEL_CARD.md")
    assert fetch_model(NAME) == final and Handler.requests == []
    assert {m.name: m.source for m in list_models()}[NAME] == "cached"


def test_a_full_disk_is_refused_before_downloading(served, monkeypatch):
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    with pytest.raises(UserInputError, match="the disk is full"):
        fetch_model(NAME)
    assert Handler.requests == [] and not (user_models_dir() / NAME).exists()


def test_a_disk_that_fills_during_the_download_leaves_nothing(served, monkeypatch):
    from napari_zfdiffusion.core import registry

    def full(self, chunk):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(registry._Sink, "write", full)
    with pytest.raises(UserInputError, match="the disk is full"):
        fetch_model(NAME)
    assert not (user_models_dir() / NAME).exists() and leftovers(user_models_dir()) == []


def test_the_models_command_lists_fetches_and_explains(served, capsys):
    assert cli.main(["models", "--brief"]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith(NAME))
    assert "downloadable" in line and "MB" in line and f"--fetch {NAME}" in line

    assert cli.main(["models", "--fetch", "no-such-model"]) == 2
    err = capsys.readouterr().err
    assert "no model named 'no-such-model' in the model registry" in err and NAME in err

    assert cli.main(["models", "--fetch", NAME, "--offline"]) == 2
    assert "offline mode" in capsys.readouterr().err and Handler.requests == []

    assert cli.main(["-q", "models", "--fetch", NAME]) == 0
    cap = capsys.readouterr()
    assert f"{NAME}: downloaded" in cap.err and "sha256" in cap.err
    assert cap.out.startswith(NAME) and "cached" in cap.out and "held out: Dice" in cap.out
    assert cli.main(["-q", "models", "--fetch", NAME, "--offline"]) == 0  # from the cache alone
    assert "already in the cache" in capsys.readouterr().err


def test_bad_registries_are_refused_with_the_field(tmp_path, monkeypatch):
    def registry(**file):
        f = {"path": "model.json", "url": "https://example.org/m.json", "sha256": "a" * 64, "size": 1, **file}
        p = tmp_path / "r.json"
        p.write_text(json.dumps({"models": [{"name": "m", "kind": "segmentation", "files": [f]}]}))
        return p

    assert load_registry(registry())["m"].size == 1
    for change, words in [({"path": "../evil"}, "relative path"), ({"path": "/etc/x"}, "relative path"),
                          ({"url": "http://example.org/m.json"}, "https://"), ({"sha256": "abc"}, "64 lowercase"),
                          ({"size": -1}, "size in bytes")]:
        with pytest.raises(UserInputError, match=words):
            load_registry(registry(**change))
    monkeypatch.setenv("ZFDIFFUSION_REGISTRY", str(tmp_path / "missing.json"))
    with pytest.raises(UserInputError, match="missing.json' does not exist"):
        list_models()


def test_the_shipped_registry_names_the_release_assets_of_the_bundled_demo(monkeypatch):
    """Until they are published, its one entry's files are the bundled zf-cascade-demo's: uploading
    those files under the addresses it gives makes it work."""
    monkeypatch.delenv("ZFDIFFUSION_REGISTRY", raising=False)
    assert registry_path().parent.name == "napari_zfdiffusion"
    (model,) = load_registry().values()
    demo = bundled_dir() / "zf-cascade-demo"
    assert {f.path for f in model.files} == {p.relative_to(demo).as_posix() for p in demo.rglob("*") if p.is_file()}
    for f in model.files:
        assert f.url.startswith("https://github.com/zfdiffusion/napari-zfdiffusion/releases/download/")
        assert f.sha256 == hashlib.sha256((demo / f.path).read_bytes()).hexdigest()
        assert f.size == (demo / f.path).stat().st_size


def test_tls_certificates_are_always_checked(served, tmp_path):
    """A server whose certificate no authority signed is refused, with what to do (never unchecked)."""
    import ssl
    import subprocess

    if shutil.which("openssl") is None:
        pytest.skip("needs openssl to make a self-signed certificate")
    src, _base, reg = served
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=127.0.0.1"], check=True, capture_output=True)
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(src)))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        write_registry(reg, src, f"https://127.0.0.1:{server.server_address[1]}/")
        with pytest.raises(UserInputError, match="TLS certificate check failed.*never turned off"):
            fetch_model(NAME)
    finally:
        server.shutdown()
        server.server_close()
    assert not (user_models_dir() / NAME).exists()


def test_the_docks_list_a_downloadable_model_last_and_then_as_cached(served):
    from napari_zfdiffusion.widgets._models import model_choices

    choices = model_choices(("segmentation",), "nuclei-unet-demo")
    assert choices[0][0] == "nuclei-unet-demo (bundled)"
    assert choices[-1][1] == NAME and choices[-1][0].startswith(f"{NAME} (download, ") and "MB)" in choices[-1][0]
    with pytest.raises(UserInputError, match=f"--fetch {NAME}"):  # what a dock shows when it is chosen
        resolve_model(choices[-1][1])
    fetch_model(NAME)
    assert (f"{NAME} (cached)", str(user_models_dir() / NAME)) in model_choices(("segmentation",), "nuclei-unet-demo")
