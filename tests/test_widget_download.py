"""The "Download NAME (SIZE)" button under the docks' model boxes (widgets/_download.py), pressed as a
person would: choose the registry model in the box, press the button, wait for the job.

The registry model is test_registry's: a copy of the bundled nuclei-unet-demo (1.4 MB) served by a
local HTTP server (127.0.0.1, a thread of this test), named by a registry file made by the test
(ZFDIFFUSION_REGISTRY). Its handler can hold one file after its first bytes until the test lets it
go on, so that Cancel is pressed in the middle of a download. Runs under Xvfb (pytest-xvfb).
"""

from __future__ import annotations

import json
import shutil
import threading
from functools import partial
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest
from conftest import errors
from test_registry import BIG, NAME, Handler, leftovers, write_registry

pytest.importorskip("napari")
pytest.importorskip("qtpy")

pytestmark = pytest.mark.gui

HELD_AT = 600_000  # bytes of BIG sent before the server waits: two blocks of 256 kB reach the client


class Holding(Handler):
    """test_registry's handler; the file ``hold`` is sent up to HELD_AT bytes, then ``held`` is set and
    the rest waits for ``go``."""

    hold: ClassVar[str | None] = None
    held: ClassVar[threading.Event] = threading.Event()
    go: ClassVar[threading.Event] = threading.Event()

    def do_GET(self):
        path = self.path.lstrip("/")
        if path != self.hold:
            return super().do_GET()
        type(self).requests.append(path)
        data = (Path(self.directory) / path).read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data[:HELD_AT])
        self.wfile.flush()
        self.held.set()
        self.go.wait(10)
        try:
            self.wfile.write(data[HELD_AT:])
            self.wfile.flush()
        except OSError:  # the client has gone (cancelled)
            pass
        return None


@pytest.fixture
def served(tmp_path, monkeypatch):
    """(served folder, write(**changes): the registry file, with ``changes`` to its files)."""
    from napari_zfdiffusion.core.store import bundled_dir

    src = tmp_path / "served"
    shutil.copytree(bundled_dir() / "nuclei-unet-demo", src)
    Handler.cut, Handler.requests = set(), []
    Holding.hold, Holding.held, Holding.go = None, threading.Event(), threading.Event()
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(Holding, directory=str(src)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}/"

    def write(**changes) -> Path:
        return write_registry(tmp_path / "registry.json", src, base, **changes)

    monkeypatch.setenv("ZFDIFFUSION_REGISTRY", str(write()))
    monkeypatch.delenv("ZFDIFFUSION_OFFLINE", raising=False)
    yield src, write
    Holding.go.set()
    server.shutdown()
    server.server_close()


def segment_dock(viewer, name: str = "Segment"):
    from napari_zfdiffusion.widgets.segment import SegmentWidget

    w = SegmentWidget(viewer)
    viewer.window.add_dock_widget(w, name=name)
    w.device.value = "cpu"
    return w


def shown(w) -> bool:
    """Whether the dock's Download button shows (once the dock is on screen)."""
    return w.download.button.native.isVisibleTo(w.native)


def model_folder() -> Path:
    from napari_zfdiffusion.core.store import user_models_dir

    return user_models_dir() / NAME


def test_download_button_fetches_checks_and_chooses_the_model(make_napari_viewer, served, notes):
    from napari_zfdiffusion.core.registry import load_registry, problems, staging_dir

    src, _ = served
    viewer = make_napari_viewer()
    w, other = segment_dock(viewer), segment_dock(viewer, "Segment 2")
    assert not shown(w) and "not usable" not in w.info.value  # the bundled demo: nothing to download
    assert (f"{NAME} (download, 1.4 MB)", NAME) in w._models

    w.model.value = NAME
    button = w.download.button
    assert shown(w) and button.enabled and button.text == f"Download {NAME} (1.4 MB)"
    assert "not downloaded yet" in w.status.value and f"'Download {NAME}'" in w.status.value
    assert w.info.value == "not downloaded yet" and not w.segment_button.enabled
    assert errors(notes) == []  # a model to download is no error

    button.native.click()
    assert not button.enabled and w.cancel_button.enabled and not w.segment_button.enabled
    assert w.wait(20)

    folder = model_folder()
    files = [p for p in src.rglob("*") if p.is_file()]
    assert all((folder / p.relative_to(src)).read_bytes() == p.read_bytes() for p in files)
    assert problems(load_registry()[NAME], folder) == []  # every sha256 the registry's
    assert not staging_dir(folder).exists() and leftovers(folder.parent) == []
    assert w.last_progress.step == w.last_progress.total == sum(p.stat().st_size for p in files)
    assert w.progress_bar.value == w.progress_bar.max and w.status.value.startswith(f"downloaded '{NAME}'")
    # the box now holds the downloaded model, read as any other: the dock can segment with it
    assert w.model.value == str(folder) and not shown(w)
    assert w.segment_button.enabled and not w.cancel_button.enabled and "U-Net" in w.info.value
    for dock in (w, other):  # every dock's list: the model is "cached", no longer to download
        assert (f"{NAME} (cached)", str(folder)) in dock._models
        assert not any("(download" in label for label, _ in dock._models)
        assert str(folder) in [v for v in dock.model.choices if v is not None]
    assert other.model.value != str(folder) and not shown(other)  # its own choice is kept
    assert errors(notes) == [] and any(f"model '{NAME}' downloaded" in m for s, m in notes if s == "info")


def test_a_wrong_hash_is_a_clear_error_and_leaves_no_model(make_napari_viewer, served, notes, monkeypatch):
    _, write = served
    monkeypatch.setenv("ZFDIFFUSION_REGISTRY", str(write(**{BIG: {"sha256": "0" * 64}})))
    w = segment_dock(make_napari_viewer())
    w.model.value = NAME
    w.download.button.native.click()
    assert w.wait(20)

    [message] = errors(notes)
    assert message.startswith(f"refused '{BIG}' of model '{NAME}'") and f"expects {'0' * 64}" in message
    assert "Traceback" not in message
    assert w.status.value.startswith(f"download of '{NAME}' failed: refused")
    assert not model_folder().exists() and leftovers(model_folder().parent) == []
    assert w.model.value == NAME and shown(w) and w.download.button.enabled  # to try again
    assert not w.cancel_button.enabled


def test_cancel_mid_download_leaves_no_model_and_the_next_download_goes_on(make_napari_viewer, served, qtbot,
                                                                            notes):
    from napari_zfdiffusion.core.registry import staging_dir

    src, _ = served
    Holding.hold = BIG
    w = segment_dock(make_napari_viewer())
    w.model.value = NAME
    w.download.button.native.click()
    qtbot.waitUntil(lambda: Holding.held.is_set() and w.last_progress is not None
                    and w.last_progress.step > HELD_AT // 2, timeout=10_000)
    assert w.status.value.startswith(f"downloading {NAME}: ") and " of 1.4 MB" in w.status.value
    bar = w._job.pbar.desc  # napari's progress bar (Activity) says the same
    assert bar.startswith(f"downloading {NAME}: ") and " of 1.4 MB" in bar and bar.count("downloading") == 1
    w.cancel_button.native.click()
    Holding.go.set()  # the next block arrives: the download stops there
    assert w.wait(20)

    assert w.status.value.startswith(f"download of '{NAME}' cancelled: nothing is under its name")
    assert errors(notes) == []
    assert not model_folder().exists() and leftovers(model_folder().parent) == []
    stage = staging_dir(model_folder())  # only whole, checked files are kept, for the next try
    kept = [p.relative_to(stage) for p in stage.rglob("*") if p.is_file()]
    assert BIG not in [k.as_posix() for k in kept] and all((stage / k).read_bytes() == (src / k).read_bytes()
                                                            for k in kept)
    assert w.model.value == NAME and shown(w) and w.download.button.enabled

    Holding.hold, Handler.requests = None, []
    w.download.button.native.click()
    assert w.wait(20)
    assert w.model.value == str(model_folder()) and (model_folder() / BIG).read_bytes() == (src / BIG).read_bytes()
    assert BIG in Handler.requests and not set(Handler.requests) & {k.as_posix() for k in kept}


def test_offline_the_error_names_each_missing_file(make_napari_viewer, served, notes, monkeypatch):
    monkeypatch.setenv("ZFDIFFUSION_OFFLINE", "1")
    w = segment_dock(make_napari_viewer())
    w.model.value = NAME
    assert shown(w) and "Offline (ZFDIFFUSION_OFFLINE=1)" in w.status.value
    w.download.button.native.click()
    assert w.wait(20)

    [message] = errors(notes)
    assert message.startswith("offline mode (ZFDIFFUSION_OFFLINE=1 or --offline)")
    assert str(model_folder() / BIG) in message and "Missing: 6 of its 6 files" in message
    assert w.status.value.startswith(f"download of '{NAME}' failed: offline mode")
    assert Handler.requests == [] and not model_folder().exists()


def test_every_dock_with_a_model_box_offers_the_download(make_napari_viewer, tmp_path, monkeypatch, notes):
    """A registry model of each dock's kind (never fetched here): the button shows for it, not for the
    dock's own models, and choosing it is no error."""
    from napari_zfdiffusion.widgets.em import GenerateEMWidget
    from napari_zfdiffusion.widgets.generate import GenerateSlicesWidget
    from napari_zfdiffusion.widgets.segment import SegmentWidget
    from napari_zfdiffusion.widgets.volume import GenerateVolumeWidget

    kinds = {"cascade": "zf-big", "latent": "em-big", "segmentation": "unet-big"}
    registry = tmp_path / "registry.json"
    registry.write_text(json.dumps({"models": [
        {"name": name, "kind": kind, "files": [{"path": "model.json", "url": f"https://example.org/{name}.json",
                                                "sha256": "0" * 64, "size": 33_700_000}]}
        for kind, name in kinds.items()]}))
    monkeypatch.setenv("ZFDIFFUSION_REGISTRY", str(registry))
    viewer = make_napari_viewer()
    for cls, kind, run in ((GenerateSlicesWidget, "cascade", "generate_button"),
                           (GenerateVolumeWidget, "cascade", "generate_button"),
                           (GenerateEMWidget, "latent", "generate_button"),
                           (SegmentWidget, "segmentation", "segment_button")):
        w = cls(viewer)
        viewer.window.add_dock_widget(w, name=cls.__name__)
        name = kinds[kind]
        first = w.model.value
        assert not shown(w) and getattr(w, run).enabled, cls
        assert [v for _, v in w._models if v in kinds.values()] == [name], cls  # its kind only
        w.model.value = name
        assert shown(w) and w.download.button.text == f"Download {name} (33.7 MB)", cls
        assert w.status.value.startswith(f"'{name}' is not downloaded yet (33.7 MB"), cls
        assert not getattr(w, run).enabled, cls
        w.model.value = first
        assert not shown(w) and getattr(w, run).enabled, cls
    assert errors(notes) == []
