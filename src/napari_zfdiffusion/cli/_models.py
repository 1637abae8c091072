"""``zfdiffusion models``: what each model is and does, read from its JSON cards alone; the
registry's models that can be downloaded, and ``--fetch NAME`` to download one (core.registry).

Light on purpose: nothing here imports torch or diffusers (no network is built), so the listing
takes a fraction of a second.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

STAGES = ("base", "sr128", "sr256", "sr512")  # the cascade's stages, in order (as core.cascade.model has them)
WHERE = {"bundled": "bundled with the package", "user": "cached in ZFDIFFUSION_HOME/models", "path": "a folder",
         "cached": "downloaded from the model registry (sha256-checked), cached in ZFDIFFUSION_HOME/models"}


def cmd_models(a) -> int:
    from ..core.registry import format_size
    from ..core.store import ModelEntry, list_models, model_kind, resolve_model, user_models_dir

    if a.fetch:
        if a.name and a.name != a.fetch:
            from ..core.errors import UserInputError

            raise UserInputError(f"give one model: `zfdiffusion models --fetch {a.fetch}`")
        a.name = a.fetch
        fetch(a.fetch, offline=True if a.offline else None, quiet=getattr(a, "quiet", False))
    if a.name:
        listed = {m.name: m for m in list_models(downloadable=True)}
        if a.name in listed and listed[a.name].source == "downloadable":
            models = [listed[a.name]]
        else:
            path = resolve_model(a.name)
            known = {m.path.resolve(): m for m in list_models()}
            models = [known.get(path.resolve()) or ModelEntry(path.name, model_kind(path) or "unknown", path, "path")]
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
            try:
                lines = describe(m)
            except (TypeError, ValueError, AttributeError, KeyError) as e:  # a card with fields of odd types
                lines = [f"its card could not be read as expected ({type(e).__name__}: {str(e)[:100]}); "
                         "loading the model says what is wrong"]
            for line in lines:
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


def describe(m) -> list[str]:
    """Lines about one model (a :class:`..core.store.ModelEntry`): what it does, what it makes, its
    depth classes and their meaning, pixel size, size on disk and where it lives."""
    from ..core.errors import UserInputError
    from ..core.store import CARD_FILE, CASCADE_FILE, read_json

    if m.source == "downloadable":
        from urllib.parse import urlsplit

        from ..core.registry import format_size, load_registry

        r = load_registry()[m.name]
        hosts = ", ".join(sorted({urlsplit(f.url).hostname or "?" for f in r.files}))
        lines = [f"what: {m.description}"] if m.description else []
        lines.append(f"download: {format_size(r.size)} in {len(r.files)} files from {hosts}, each checked against "
                     f"the registry's sha256, into {m.path}")
        return lines + ([f"licence: {r.licence}"] if r.licence else [])
    where = f"on disk: {_size(m.path)}; {WHERE.get(m.source, m.source)}"
    try:
        card = read_json(m.path / (CASCADE_FILE if (m.path / CASCADE_FILE).is_file() else CARD_FILE))
    except UserInputError as e:
        return [f"unreadable: {e}", where]
    lines = [f"what: {card['description']}"] if card.get("description") else []
    if m.kind == "cascade":
        lines += _cascade(m.path, card, read_json)
    elif m.kind == "latent":
        p = card.get("patch_size", "?")
        paired = "mask" in (card.get("channels") or [])
        lines.append(f"makes: {p}x{p} image patches " + ("WITH masks (instance labels and foreground probability)"
                                                          if paired else "(no masks)") + ", with `em generate`")
    elif m.kind == "vae":
        lines.append("makes: nothing by itself: an autoencoder to encode / decode images, and to train a latent "
                     "model on (`train ldm --vae`)")
    elif m.kind == "segmentation":
        d = {k: card.get(k) for k in ("tile", "overlap", "threshold", "min_size") if card.get(k) is not None}
        defaults = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in d.items())
        lines.append("makes: masks (instance labels, and a foreground probability) of your images, with `segment`"
                     + (f"; card defaults {defaults}" if d else ""))
        v = card.get("validation") or {}
        if "dice" in v:
            lines.append(f"held out: Dice {v['dice']:.3f}, IoU {v['iou']:.3f}"
                         + (f", object F1 {v['f1']:.3f}" if "f1" in v else ""))
    if m.kind != "cascade":
        lines.append(_pixel(card.get("pixel_size_um")))
    data = card.get("training_data") or {}
    if isinstance(data, dict) and data.get("credit"):
        lines.append(f"trained on: {data['credit']}")
    lines.append(where)
    return lines


def _cascade(path: Path, card: dict, read_json) -> list[str]:
    res, volume = [], True
    for name in STAGES:  # the stages chain: sr256 only after sr128, and so on
        info = path / name / "stage.json"
        if not info.is_file():
            break
        stage = read_json(info)
        res.append(int(stage.get("resolution", 0)))
        volume = volume and int(stage.get("prev_channels") or 0) > 0
    volume = volume and bool(res)
    out = ["makes: images, no masks: depth slices with `generate`"
           + ("; volumes with `volume` (every stage takes the plane above)" if volume else
              " (a slice model: `volume` makes its planes independently)"),
           f"resolutions: {', '.join(map(str, res)) or 'none (no trained stage)'} px"]
    classes = card.get("depth_classes") or []
    if classes:
        out.append(f"depth classes (--depth 0 to {len(classes) - 1}):")
        out += [f"  {i}: {c.get('label', '') if isinstance(c, dict) else c}" for i, c in enumerate(classes)]
    field, z = card.get("field_um"), card.get("z_step_um")
    if field and res:
        per = ", ".join(f"{field / r:.3g} um/px at {r}" for r in res)
        x = (card.get("pixel_size_um") or {}).get("x") if isinstance(card.get("pixel_size_um"), dict) else None
        src = f" (training data {x:g} um/px)" if isinstance(x, (int, float)) else ""
        out.append(f"pixel size: every slice shows {field:.3g} um{src}: {per}"
                   + (f"; planes {z:g} um apart" if z else ""))
    else:
        out.append(_pixel(card.get("pixel_size_um")) + (f"; planes {z:g} um apart" if z else ""))
    return out


def _pixel(size) -> str:
    if isinstance(size, dict) and size:
        return "pixel size: " + ", ".join(f"{k} {v:g} um" for k, v in size.items() if isinstance(v, (int, float)))
    return "pixel size: not recorded in the card"


def _size(folder: Path) -> str:
    total = 0
    for root, _dirs, files in os.walk(folder):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return f"{total / 1e6:.1f} MB" if total >= 1e5 else f"{total / 1e3:.1f} kB"


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
