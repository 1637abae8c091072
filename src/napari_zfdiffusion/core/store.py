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

import numpy as np
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from .errors import UserInputError
from .io import current_umask, fsync_dir, fsync_tree, writing
from .registry import download_model, load_registry, not_downloaded, registry_path

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
    path: Path  # for a "downloadable" model: the folder it will be fetched into
    source: str  # "bundled", "user", "cached" (a user model fetched from the registry), "downloadable" or "path"
    description: str = ""
    size: int | None = None  # bytes to download, for a "downloadable" model


def model_kind(path: Path) -> str | None:
    if (path / CASCADE_FILE).is_file():
        return read_json(path / CASCADE_FILE).get("kind", "cascade")
    if (path / CARD_FILE).is_file():
        return read_json(path / CARD_FILE).get("kind")
    return None


def list_models(downloadable: bool = False) -> list[ModelEntry]:
    """The bundled and user models (a user model that the registry names is "cached"); with
    ``downloadable``, also the registry's models not fetched yet (source "downloadable")."""
    out = []
    registry = load_registry()
    for source, root in (("bundled", bundled_dir()), ("user", user_models_dir())):
        if root is None or not root.is_dir():
            continue
        for p in sorted(root.iterdir()):
            if not p.is_dir() or p.name.startswith("."):  # hidden: e.g. a download being assembled
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
                cached = source == "user" and p.name in registry
                out.append(ModelEntry(p.name, kind, p, "cached" if cached else source, desc))
    if downloadable:
        have = {m.name for m in out}
        out += [ModelEntry(r.name, r.kind, user_models_dir() / r.name, "downloadable", r.description, r.size)
                for r in registry.values() if r.name not in have]
    return out


def resolve_model(model: str | Path) -> Path:
    """A model folder from a path, or the name of a bundled or user model."""
    p = Path(model).expanduser()
    if p.is_dir():
        return p
    for root in (bundled_dir(), user_models_dir()):
        if root is not None and (root / str(model)).is_dir():
            return root / str(model)
    registry = load_registry()
    if str(model) in registry:
        raise UserInputError(not_downloaded(registry[str(model)], user_models_dir() / str(model)))
    names = ", ".join(m.name for m in list_models()) or "none"
    raise UserInputError(
        f"no model folder or known model named '{model}'. Known models: {names}. "
        "Give a folder path, or run `zfdiffusion models` to list them."
    )


def fetch_model(name: str, progress=None, *, offline: bool | None = None) -> Path:
    """The folder of the registry's model ``name`` in the cache (``ZFDIFFUSION_HOME/models/NAME``),
    downloaded on first use with every file's sha256 checked (:func:`.registry.download_model`);
    ``progress`` gets Progress records in bytes. Offline (``offline``, default ``ZFDIFFUSION_OFFLINE``)
    nothing is downloaded and the error names each missing file and where to put it."""
    registry = load_registry()
    if name not in registry:
        bundled = bundled_dir()
        if bundled is not None and (bundled / name).is_dir():
            raise UserInputError(f"'{name}' is bundled with the package: there is nothing to download.")
        known = ", ".join(registry) or "none"
        raise UserInputError(f"no model named '{name}' in the model registry ({registry_path()}). Downloadable "
                             f"models: {known}. `zfdiffusion models` lists every model.")
    return download_model(registry[name], user_models_dir() / name, progress, offline)


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


# The fields of each kind of card a loader uses, and their types: "int", "num", "str", "bool",
# "dict", "list" (of anything), "list[str]", "list[int]", "list[dict]"; a trailing "?" allows null.
_NORM = {"normalisation": "dict?"}
CARD_FIELDS = {
    "cascade": {"depth_classes": "list[dict]", "z_step_um": "num?", "field_um": "num?", "pixel_size_um": "dict?",
                "name": "str?", **_NORM},
    "stage": {"resolution": "int", "input_resolution": "int?", "schedule": "dict?", "prev_channels": "int?"},
    "vae": {"channels": "list[str]", "scaling_factor": "num", "patch_size": "int", "mask_encoding": "str?",
            **_NORM},
    "latent": {"channels": "list[str]", "scaling_factor": "num", "patch_size": "int", "latent_shape": "list[int]",
               "mask_encoding": "str?", "vae_sha256": "str?", **_NORM},
    "segmentation": {"outputs": "list[str]?", "tile": "int?", "overlap": "int?", "threshold": "num?",
                     "seed_threshold": "num?", "join_threshold": "num?", "min_size": "int?", "name": "str?", "object_diameter_px": "num?", **_NORM},
}
_NORM_FIELDS = {"low": "num?", "high": "num?", "per": "str?"}


def _type_ok(v, t: str) -> bool:
    if t.endswith("?"):
        if v is None:
            return True
        t = t[:-1]
    if t == "int":
        return isinstance(v, int) and not isinstance(v, bool)
    if t == "num":
        return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v
    if t == "str":
        return isinstance(v, str)
    if t == "bool":
        return isinstance(v, bool)
    if t == "dict":
        return isinstance(v, dict)
    if t.startswith("list"):
        if not isinstance(v, list):
            return False
        inner = t[5:-1] if t != "list" else None
        return inner is None or all(_type_ok(x, inner) for x in v)
    raise ValueError(t)


_WORDS = {"int": "a whole number", "num": "a number", "str": "text", "bool": "true or false", "dict": "an object",
          "list": "a list", "list[str]": "a list of text", "list[int]": "a list of whole numbers",
          "list[dict]": "a list of objects"}


def check_fields(data: dict, kind: str, where: str, required: tuple[str, ...] = ()) -> dict:
    """``data`` (a card, a stage.json) with the fields of ``kind`` checked against :data:`CARD_FIELDS`:
    a UserInputError names the first field that is missing (of ``required``) or of the wrong type."""
    for key in required:
        if key not in data:
            raise UserInputError(f"{where} lacks the field '{key}': the model folder is incomplete or damaged.")
    for key, t in CARD_FIELDS[kind].items():
        if key in data and not _type_ok(data[key], t):
            raise UserInputError(f"{where} field '{key}' must be {_WORDS[t.rstrip('?')]}"
                                 f"{' (or null)' if t.endswith('?') else ''}, got {str(data[key])[:60]!r}.")
    norm = data.get("normalisation")
    if isinstance(norm, dict):
        for key, t in _NORM_FIELDS.items():
            if key in norm and not _type_ok(norm[key], t):
                raise UserInputError(f"{where} field 'normalisation.{key}' must be {_WORDS[t.rstrip('?')]}, "
                                     f"got {str(norm[key])[:60]!r}.")
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
    required = {"vae": ("scaling_factor", "patch_size"), "latent": ("scaling_factor", "patch_size", "latent_shape")}
    return check_fields(card, card["kind"], f"'{path / CARD_FILE}'", required.get(card["kind"], ()))


def weights_sha256(folder: Path) -> str:
    """The sha256 of a network folder's weights (which autoencoder a latent model was trained with)."""
    h = hashlib.sha256()
    with open(Path(folder) / WEIGHTS_FILE, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# What a network's config.json may ask for: the largest value of each size field, and the most
# entries of each list. A hostile or broken config is refused in milliseconds instead of building a
# network of a million blocks. (The bundled and trainable sizes sit far below these.)
CONFIG_LIMITS = {"layers_per_block": 32, "blocks": 32, "sample_size": 16384, "num_classes": 100_000,
                 "in_channels": 64, "out_channels": 64, "cond_channels": 64, "prev_channels": 8,
                 "latent_channels": 64, "attention_head_dim": 4096, "norm_num_groups": 1024}
CONFIG_LISTS = {"block_out_channels": 8192, "channels": 8192, "attention": None, "down_block_types": None,
                "up_block_types": None}
MAX_LIST = 16
MAX_PARAMETERS = 2_000_000_000  # the weights file's tensors, from its header: 8 GB of float32


def check_network_folder(folder: Path, what: str = "model folder") -> None:
    """Check a network folder before anything is built: config.json's size fields are whole numbers
    within :data:`CONFIG_LIMITS` (lists within :data:`MAX_LIST` entries), and the weights file's
    header (read without the weights) holds at most :data:`MAX_PARAMETERS` values. A clear
    UserInputError names the field and what was expected."""
    config = read_json(folder / "config.json")
    where = f"{what} '{folder}': config.json"
    for key, limit in CONFIG_LIMITS.items():
        if key in config and config[key] is not None:
            v = config[key]
            if isinstance(v, bool) or not isinstance(v, int):
                raise UserInputError(f"{where} field '{key}' must be a whole number, got {v!r}.")
            if not 0 <= v <= limit:
                raise UserInputError(f"{where} field '{key}' is {v}: it must be between 0 and {limit}.")
    for key, limit in CONFIG_LISTS.items():
        if key in config and config[key] is not None:
            v = config[key]
            if not isinstance(v, list) or len(v) > MAX_LIST:
                raise UserInputError(f"{where} field '{key}' must be a list of at most {MAX_LIST} entries, "
                                     f"got {str(v)[:80]}.")
            if limit is not None and any(isinstance(x, bool) or not isinstance(x, int) or not 1 <= x <= limit
                                         for x in v):
                raise UserInputError(f"{where} field '{key}' must hold whole numbers between 1 and {limit}, "
                                     f"got {str(v)[:80]}.")
    try:
        from safetensors import safe_open

        with safe_open(str(folder / WEIGHTS_FILE), framework="np") as f:
            n = 0
            for k in f.keys():
                shape = f.get_slice(k).get_shape()
                n += int(np.prod(shape)) if shape else 1
    except Exception as e:  # noqa: BLE001 - an unreadable header is a broken file
        raise UserInputError(f"{what} '{folder}' could not be loaded: its weights file is corrupted or truncated "
                             f"(not valid safetensors: {str(e)[:200]}). Copy the whole folder again.") from None
    if n > MAX_PARAMETERS:
        raise UserInputError(f"{what} '{folder}': its weights hold {n:,} values, more than the {MAX_PARAMETERS:,} "
                             "this plugin loads.")


def load_model(folder: Path, cls, what: str = "model folder"):
    """The network ``cls`` (a diffusers ``ModelMixin``) saved in ``folder``, in eval mode, from
    safetensors only (never a pickle), with a clear error when the folder is broken. ``what`` names
    the folder in messages (e.g. "autoencoder folder")."""
    folder = Path(folder)
    old = folder.with_name(folder.name + ".old")
    if not folder.exists() and old.is_dir():
        raise UserInputError(f"{what} '{folder}' is missing, but a save that was interrupted left its previous "
                             f"version in '{old}': rename that to '{folder.name}', or resume the training.")
    for name in ("config.json", WEIGHTS_FILE):
        if not (folder / name).is_file():
            raise UserInputError(f"{what} '{folder}' is missing {name}: copy the whole folder again or retrain.")
    check_network_folder(folder, what)
    try:
        model = cls.from_pretrained(folder, use_safetensors=True, low_cpu_mem_usage=False)
    except Exception as e:  # noqa: BLE001 - any failure here means broken or mismatched weights
        raise UserInputError(
            f"{what} '{folder}' could not be loaded ({type(e).__name__}: {str(e)[:300]}). "
            "The weights are corrupted or do not match config.json."
        ) from None
    # Weights may be stored in float16 (the bundled demos, scripts/slim_weights.py): the network is
    # float32 whatever the file holds (diffusers copies them into float32 here; .float() makes sure).
    return model.float().eval()


def save_model(model, folder: Path, stage_info: dict) -> None:
    """Write a network folder atomically: into ``folder.tmp``, pushed to the disk, then swapped into
    place (the previous version goes to ``folder.old`` for the instant of the swap). A kill leaves the
    old folder or the new one; the next save puts back a ``.old`` that a kill mid-swap left. A refused
    write (full disk, no permission, ...) is one clear message, and ``folder.tmp`` is removed."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    old = folder.with_name(folder.name + ".old")
    needed = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    with writing(folder, needed):
        if old.is_dir() and not folder.exists():  # a kill between the two renames of an earlier save
            os.replace(old, folder)
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            model.save_pretrained(tmp, safe_serialization=True)
            with open(tmp / STAGE_FILE, "w") as f:
                json.dump(stage_info, f, indent=2, default=str)
            mode = 0o666 & ~current_umask()  # safetensors writes its file 0600: give every file the usual permissions
            for p in tmp.iterdir():
                if p.is_file():
                    os.chmod(p, mode)
            fsync_tree(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        shutil.rmtree(old, ignore_errors=True)
        try:
            if folder.exists():
                os.replace(folder, old)
            os.replace(tmp, folder)
        except BaseException:  # e.g. a SIGTERM between the two renames: put the previous version back
            if not folder.exists() and old.is_dir():
                os.replace(old, folder)
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        try:
            fsync_dir(folder.parent)
        finally:
            shutil.rmtree(old, ignore_errors=True)
