"""Write MODEL_CARD.md (and the ``quality`` field of model.json) for a segmentation model folder:
data and credits, training, validation, and, when present, the held-out figures of
docs/results/seg_eval.json (``scripts/evaluate_seg.py``) and the speed of docs/results/bench_segment.json.

Usage: python scripts/write_seg_card.py MODEL_DIR [--name N] [--run-name real] [--eval JSON] [--bench JSON]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _load(p: Path | None) -> dict:
    return json.loads(p.read_text()) if p is not None and p.is_file() else {}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", type=Path)
    ap.add_argument("--name", default=None)
    ap.add_argument("--run-name", default="real", help="the model's name in the evaluation JSON")
    ap.add_argument("--eval", type=Path, default=ROOT / "docs/results/seg_eval.json")
    ap.add_argument("--bench", type=Path, default=ROOT / "docs/results/bench_segment.json")
    a = ap.parse_args()
    card = _load(a.model / "model.json")
    name = a.name or card.get("name") or a.model.name
    card["name"] = name
    stage = _load(a.model / "unet" / "stage.json").get("training", {})
    ev = _load(a.eval)
    data = card.get("training_data", {})
    val = card.get("validation") or {}
    rows = []
    quality = {}
    for set_name, label in (("hela_test", "HeLa frames 16-19 (held out) vs ERR_SEG"),
                            ("dsb_manual", "DSB 2018 nuclei (another lab) vs manual masks")):
        res = ev.get("sets", {}).get(set_name, {})
        for method in ("Otsu + watershed", f"U-Net {a.run_name}"):
            r = res.get(method)
            if r:
                shown = "this model" if method.startswith("U-Net") else method
                rows.append(f"| {label} | {shown} | {r['iou']:.3f} | {r['dice']:.3f} | {r['f1']:.3f} |")
                if method.startswith("U-Net"):
                    quality[set_name] = {k: r[k] for k in ("iou", "dice", "f1", "precision", "recall")}
    if quality:
        card["quality"] = quality
    bench = _load(a.bench)
    speed = ""
    threads = bench.get("settings", {}).get("threads")
    for case in bench.get("cases", []):
        med = case.get("median", {})
        if med.get("job_s"):
            what = "x".join(str(v) for v in case["shape"])
            speed += (f"* {what}: {med['job_s']:.1f} s, {case['megapixels'] / med['job_s']:.2f} megapixels/s "
                      f"(CPU, {threads or '?'} threads)\n")
    (a.model / "model.json").write_text(json.dumps(card, indent=2, default=str) + "\n")
    text = f"""# {name}

A residual U-Net ({stage.get('size', 'small')}, 0.66 M parameters) that segments fluorescent nuclei:
per-pixel foreground probability and object interiors; instance labels by a watershed of the
foreground seeded by the interiors. Made by `zfdiffusion train unet` and
`scripts/train_demo_unet.sh`; used by the Segment widget and `zfdiffusion segment`.

## Training data

* {data.get('images', '?')} image(s) from {', '.join(data.get('files', []))}, masks
  {', '.join(data.get('mask_files', []))} ({data.get('mask_encoding')}); validation: {data.get('validation')}.
* Credit: {data.get('credit') or 'n/a'}. Licence: {data.get('licence') or 'n/a'}.
* The masks are the Cell Tracking Challenge's automatic segmentation (ERR_SEG), not manual
  annotation: the model learns to reproduce that segmentation, including its misses.

## Training

{stage.get('steps_done', '?')} steps, batch {stage.get('batch_size', '?')} random {stage.get('crop', '?')}x{stage.get('crop', '?')}
crops with flips, rotations and random intensity changes (background offset, contrast,
gamma, noise), AdamW lr {stage.get('lr', '?')}, EMA {stage.get('ema_decay', '?')}, on a CPU
({stage.get('train_seconds', 0) / 60:.0f} min, torch {stage.get('torch', '?')}). Loss: BCE on both outputs + soft Dice on
the foreground. Percentile normalisation per plane (1st to 99.8th percentile).

## Quality

Validation at the last checkpoint (the held-out frames): foreground IoU {val.get('iou', float('nan')):.3f},
Dice {val.get('dice', float('nan')):.3f}, object F1 at IoU 0.5 {val.get('f1', float('nan')):.3f}.

| test set | method | foreground IoU | Dice | object F1 (IoU 0.5) |
|---|---|---|---|---|
{chr(10).join(rows) if rows else '| (run scripts/evaluate_seg.py) | | | | |'}

Full tables, the generated-to-real experiment and figures: docs/evaluation.md (Segmentation).

## Speed

{speed or 'See docs/benchmarks.md (Segmentation).'}
Tile 256, overlap 32, batch 4, whole job (normalisation, tiles, watershed, memory-mapped outputs);
docs/benchmarks.md (Segmentation).

## Limits

Trained on one cell line, one microscope and automatic masks. Expect to retrain (`zfdiffusion
train unet`, minutes on a GPU) for other stains, magnifications or modalities; EM needs EM masks.
"""
    (a.model / "MODEL_CARD.md").write_text(text)
    print(f"wrote {a.model / 'MODEL_CARD.md'}")


if __name__ == "__main__":
    main()
