"""Models are folders: diffusers-format weights (safetensors) plus JSON cards. Never pickles.

Kinds: ``cascade`` (``cascade.json``, see :mod:`.cascade`); the patch models ``vae`` and ``latent``
(``model.json``, see :mod:`.latent`) and ``segmentation`` (``model.json``, see :mod:`.segment`).
A cascade folder::

    MODEL/
      cascade.json          what the whole model is: depth classes, normalisation, data, licence
      MODEL_CARD.md         the same for people, with measured quality
      base/                 config.json + diffusion_pytorch_model.safetensors + stage.json
      sr128/ sr256/ sr512/  the super-resolution stages (any that were trained)

``stage.json`` holds a stage's resolution, noise schedule, loss, steps and training log summary.
Every network loads through :func:`load_model` (safetensors only) and is written by :func:`save_model`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from .errors import UserInputError
from .io import current_umask

CASCADE_FILE = "cascade.json"
CARD_FILE = "model.json"  # the card of a patch or segmentation model
STAGE_FILE = "stage.json"
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"

# What each model.json kind is called in messages, and the command that makes one.
CARD_KINDS = {
    "vae": ("patch model", "`zfdiffusion train vae` or `zfdiffusion train ldm`"),
    "latent": ("patch model", "`zfdiffusion train vae` or `zfdiffusion train ldm`"),
    "segmentation": ("segmentation model", "`zfdiffusion train unet`, or the bundled 'nuclei-unet-demo'"),
}


def home() -> Path:
    """Where user models and fetched data live (``ZFDIFFUSION_HOME``, default ~/.cache/napari-zfdiffusion)."""
    return Path(os.environ.get("ZFDIFFUSION_HOME", Path.home() / ".cache" / "napari-zfdiffusion"))


def user_models_dir() -> Path:
    return home() / "models"


def bundled_dir() -> Path | None:
    """The demo models shipped with the package (wheel: package/weights; source checkout: repo/weights)."""
    pkg = Path(str(resources.files("napari_zfdiffusion")))
    for cand in (pkg / "weights", pkg.parent.parent / "weights"):
        if cand.is_dir():
            return cand
    return None


@dataclass(frozen=True)
class ModelEntry:
    name: str
    kind: str
    path: Path
    source: str  # "bundled", "user" or "path"
    description: str = ""


def model_kind(path: Path) -> str | None:
    if (path / CASCADE_FILE).is_file():
        return read_json(path / CASCADE_FILE).get("kind", "cascade")
    if (path / CARD_FILE).is_file():
        return read_json(path / CARD_FILE).get("kind")
    return None


def list_models() -> list[ModelEntry]:
    out = []
    for source, root in (("bundled", bundled_dir()), ("user", user_models_dir())):
        if root is None or not root.is_dir():
            continue
        for p in sorted(root.iterdir()):
            if not p.is_dir():
                continue
            try:
                kind = model_kind(p)
            except UserInputError:
                kind = "corrupted"
            if kind:
                desc = ""
                if kind != "corrupted":
                    card = p / CASCADE_FILE if (p / CASCADE_FILE).is_file() else p / CARD_FILE
                    desc = read_json(card).get("description", "")
                out.append(ModelEntry(p.name, kind, p, source, desc))
    return out


def resolve_model(model: str | Path) -> Path:
    """A model folder from a path, or the name of a bundled or user model."""
    p = Path(model).expanduser()
    if p.is_dir():
        return p
    for root in (bundled_dir(), user_models_dir()):
        if root is not None and (root / str(model)).is_dir():
            return root / str(model)
    names = ", ".join(m.name for m in list_models()) or "none"
    raise UserInputError(
        f"no model folder or known model named '{model}'. Known models: {names}. "
        "Give a folder path, or run `zfdiffusion models` to list them."
    )


def read_json(path: Path) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise UserInputError(f"'{path}' is missing: the model folder is incomplete.") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserInputError(f"'{path}' is corrupted (not valid JSON: {e}).") from None
    if not isinstance(data, dict):
        raise UserInputError(f"'{path}' is corrupted (expected a JSON object).")
    return data


def read_card(path: Path, kinds: tuple[str, ...]) -> dict:
    """The ``model.json`` card of a patch or segmentation model folder, checked to be one of ``kinds``."""
    what, how = CARD_KINDS.get(kinds[0], ("model", "`zfdiffusion train ...`"))
    if not (path / CARD_FILE).is_file():
        if (path / CASCADE_FILE).is_file():
            raise UserInputError(f"'{path}' is a depth cascade, not a {what}: use it with `zfdiffusion generate` "
                                 "or the Generate slices widget.")
        raise UserInputError(f"'{path}' is not a {what} folder (no {CARD_FILE}). Give a folder made by {how}.")
    card = read_json(path / CARD_FILE)
    if card.get("kind") not in kinds:
        want = " or ".join(kinds)
        raise UserInputError(f"'{path}' holds a '{card.get('kind')}' model, but a {want} model is needed here.")
    return card


def weights_sha256(folder: Path) -> str:
    """The sha256 of a network folder's weights (which autoencoder a latent model was trained with)."""
    h = hashlib.sha256()
    with open(Path(folder) / WEIGHTS_FILE, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_model(folder: Path, cls, what: str = "model folder"):
    """The network ``cls`` (a diffusers ``ModelMixin``) saved in ``folder``, in eval mode, from
    safetensors only (never a pickle), with a clear error when the folder is broken. ``what`` names
    the folder in messages (e.g. "autoencoder folder")."""
    folder = Path(folder)
    for name in ("config.json", WEIGHTS_FILE):
        if not (folder / name).is_file():
            raise UserInputError(f"{what} '{folder}' is missing {name}: copy the whole folder again or retrain.")
    try:
        model = cls.from_pretrained(folder, use_safetensors=True, low_cpu_mem_usage=False)
    except Exception as e:  # noqa: BLE001 - any failure here means broken or mismatched weights
        raise UserInputError(
            f"{what} '{folder}' could not be loaded ({type(e).__name__}: {str(e)[:300]}). "
            "The weights are corrupted or do not match config.json."
        ) from None
    return model.eval()


def save_model(model, folder: Path, stage_info: dict) -> None:
    """Write a network folder atomically: into ``folder.tmp``, then swap it into place."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    old = folder.with_name(folder.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    with open(tmp / STAGE_FILE, "w") as f:
        json.dump(stage_info, f, indent=2, default=str)
    mode = 0o666 & ~current_umask()  # safetensors writes its file 0600: give every file the usual permissions
    for p in tmp.iterdir():
        if p.is_file():
            os.chmod(p, mode)
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)
