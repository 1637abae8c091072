"""``zfdiffusion models``: what each model is and does, read from its JSON cards alone; the
registry's models that can be downloaded, and ``--fetch NAME`` to download one (core.registry).

Light on purpose: nothing here imports torch or diffusers (no network is built), so the listing
takes a fraction of a second. What a model is comes from :mod:`..core.modelinfo` (``describe``, shared
with the docks' "About the model"); its names are imported here as before.
"""

from __future__ import annotations

import sys
from pathlib import Path

from ..core.modelinfo import STAGES, WHERE, _cascade, _pixel, _size, describe, describe_lines, model_entry


def cmd_models(a) -> int:
    from ..core.registry import format_size
    from ..core.store import list_models, user_models_dir

    if a.fetch:
        if a.name and a.name != a.fetch:
            from ..core.errors import UserInputError

            raise UserInputError(f"give one model: `zfdiffusion models --fetch {a.fetch}`")
        a.name = a.fetch
        fetch(a.fetch, offline=True if a.offline else None, quiet=getattr(a, "quiet", False))
    if a.name:
        models = [model_entry(a.name)]
    else:
        models = list_models(downloadable=True)
    if not models:
        print("no models found")
    for m in models:
        if m.source == "downloadable":
            print(f"{m.name:24s} {m.kind:12s} downloadable ({format_size(m.size or 0)}): "
                  f"`zfdiffusion models --fetch {m.name}`")
        else:
            print(f"{m.name:24s} {m.kind:12s} {m.source:8s} {m.path}")
        if not a.brief:
            for line in describe_lines(m):  # describe(m), or why the card could not be read
                print(f"    {line}")
    print(f"(user models go in {user_models_dir()}: copy a model folder there, or set ZFDIFFUSION_HOME to move "
          "this cache; `zfdiffusion models NAME` shows one model; `zfdiffusion models --fetch NAME` downloads a "
          "downloadable one there)")
    return 0


def fetch(name: str, offline: bool | None = None, quiet: bool = False) -> Path:
    """Download the registry's model ``name`` into the cache (once), with a progress bar in bytes."""
    from ..core.registry import format_size
    from ..core.store import fetch_model, user_models_dir

    existed = (user_models_dir() / name).is_dir()
    bar = _ByteBar(quiet)
    try:
        path = fetch_model(name, bar, offline=offline)
    finally:
        bar.close()
    files = [p for p in path.rglob("*") if p.is_file()]
    print(f"{name}: {'already in the cache' if existed else 'downloaded'}, {len(files)} files "
          f"({format_size(sum(p.stat().st_size for p in files))}), each matching the registry's sha256: {path}",
          file=sys.stderr)
    return path


class _ByteBar:
    """A download's progress records (bytes) as one tqdm bar on stderr."""

    def __init__(self, quiet: bool):
        self.quiet, self.bar = quiet, None

    def __call__(self, p) -> None:
        if self.quiet:
            return
        if self.bar is None:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=p.total, initial=p.step, desc=p.stage, unit="B", unit_scale=True,
                            file=sys.stderr, dynamic_ncols=True)
        self.bar.update(p.step - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def add_commands(sub) -> None:
    m = sub.add_parser("models", help="list bundled, user and downloadable models, and what each one does; "
                                      "download one",
                       description="The bundled models, those in ZFDIFFUSION_HOME/models, and the model registry's "
                                   "downloadable ones: kind, what each makes (slices, volumes, patches, masks), "
                                   "depth classes, pixel size, size on disk. Read from the models' cards, without "
                                   "loading any network. --fetch NAME downloads a registry model into "
                                   "ZFDIFFUSION_HOME/models, every file checked against the registry's sha256.")
    m.add_argument("name", nargs="?", default=None, help="only this model (a name or a model folder)")
    m.add_argument("--brief", action="store_true", help="one line per model")
    m.add_argument("--fetch", metavar="NAME", default=None,
                   help="download this registry model into the cache (once; the files are sha256-checked)")
    m.add_argument("--offline", action="store_true",
                   help="use only the cache, never the network (as ZFDIFFUSION_OFFLINE=1): --fetch then checks the "
                        "files copied there by hand and names each missing one")
    m.set_defaults(func=cmd_models)


__all__ = ["STAGES", "WHERE", "_cascade", "_pixel", "_size", "add_commands", "cmd_models", "describe",
           "fetch"]
