"""Store model folders' weights in float16 (half the size; :func:`core.store.load_model` loads them as float32).

    .venv/bin/python scripts/slim_weights.py [ROOT ...]      (default: weights/, the bundled demo models)

For every ``diffusion_pytorch_model.safetensors`` under each ROOT:

* float32 tensors become float16, except those kept in float32 (listed in the folder's stage.json):
  batch-norm running statistics (``running_mean``/``running_var``: a few KB, and they divide the
  activations), any tensor that would overflow float16 (|x| > 65504) and any whose relative
  round-trip error ||fp16(x) - x|| / ||x|| exceeds 1e-3 (values mostly below float16's normal range);
* integer, bool and float16 tensors stay as they are; the file's safetensors metadata is kept;
* the folder's stage.json gets ``"stored_dtype": "float16"`` (and ``"stored_float32": [names]`` when
  some tensors stayed float32);
* a latent model's card (model.json) gets the new ``vae_sha256`` of its autoencoder (vae/), which
  LatentModel.load checks.

Idempotent: a second run changes nothing (a file is rewritten only when one of its tensors changes).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
from napari_zfdiffusion.core.store import CARD_FILE, STAGE_FILE, WEIGHTS_FILE, weights_sha256

FP16_MAX = torch.finfo(torch.float16).max
MAX_REL_ERROR = 1e-3
BN_STATS = ("running_mean", "running_var")


def keep_float32(name: str, t: torch.Tensor) -> str | None:
    """Why ``t`` stays float32, or None when float16 is fine."""
    if name.rsplit(".", 1)[-1] in BN_STATS:
        return "batch-norm running statistics"
    if t.numel() and t.abs().max().item() > FP16_MAX:
        return f"overflows float16 (max |x| {t.abs().max().item():.3g})"
    norm = t.double().norm().item()
    if norm > 0:
        rel = (t.half().double() - t.double()).norm().item() / norm
        if rel > MAX_REL_ERROR:
            return f"relative float16 error {rel:.2g}"
    return None


def _write_json(path: Path, data: dict, newline: bool) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + ("\n" if newline else ""))
    os.chmod(tmp, path.stat().st_mode & 0o777)
    os.replace(tmp, path)


def _update_json(path: Path, changes: dict) -> bool:
    text = path.read_text()
    data = json.loads(text)
    new = {**data, **changes}
    if new == data:
        return False
    _write_json(path, new, text.endswith("\n"))
    return True


def slim_file(path: Path) -> dict:
    """Convert one weights file; returns a summary (sizes, what stayed float32, the largest error)."""
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    out, kept, changed, worst = {}, {}, False, 0.0
    for k, t in tensors.items():
        if t.dtype == torch.float32:
            why = keep_float32(k, t)
            if why:
                kept[k] = why
                out[k] = t
                continue
            h = t.half()
            if t.norm() > 0:
                worst = max(worst, ((h.double() - t.double()).norm() / t.double().norm()).item())
            out[k], changed = h, True
        else:
            if t.is_floating_point() and t.dtype != torch.float16:
                kept[k] = f"stored as {t.dtype}"
            out[k] = t
    before = path.stat().st_size
    if changed:
        tmp = path.with_name(path.name + ".tmp")
        save_file(out, str(tmp), metadata=metadata)
        os.chmod(tmp, path.stat().st_mode & 0o777)
        os.replace(tmp, path)
    stage = path.parent / STAGE_FILE
    stage_changed = False
    if stage.is_file():
        changes = {"stored_dtype": "float16"}
        if kept:
            changes["stored_float32"] = sorted(kept)
        stage_changed = _update_json(stage, changes)
    reasons = sorted(set(kept.values()))
    return {"file": path, "before": before, "after": path.stat().st_size, "changed": changed,
            "stage_changed": stage_changed, "kept": kept, "reasons": reasons, "max_rel_error": worst}


def update_cards(root: Path) -> list[Path]:
    """The ``vae_sha256`` of every latent model card under ``root``, for its autoencoder as stored now."""
    changed = []
    for card in sorted(root.rglob(CARD_FILE)):
        vae = card.parent / "vae"
        data = json.loads(card.read_text())
        if (data.get("vae_sha256") and (vae / WEIGHTS_FILE).is_file()
                and _update_json(card, {"vae_sha256": weights_sha256(vae)})):
            changed.append(card)
    return changed


def main(argv: list[str] | None = None) -> int:
    roots = [Path(a) for a in (argv if argv is not None else sys.argv[1:])] or [ROOT / "weights"]
    for root in roots:
        for path in sorted(root.rglob(WEIGHTS_FILE)):
            s = slim_file(path)
            what = "converted" if s["changed"] else "unchanged"
            print(f"{path.relative_to(root)}: {what}, {s['before']:,} -> {s['after']:,} bytes"
                  + (f", max relative error {s['max_rel_error']:.2g}" if s["changed"] else "")
                  + (f"; {len(s['kept'])} tensors kept float32 ({'; '.join(s['reasons'])})" if s["kept"] else ""))
        for card in update_cards(root):
            print(f"{card.relative_to(root)}: vae_sha256 updated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
