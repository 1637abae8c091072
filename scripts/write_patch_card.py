"""Write MODEL_CARD.md (and the ``quality`` field of model.json) for a patch model folder (kind
``latent``): data and credits, training, the measured scale factor, and, when present,
docs/results/em_eval_<name>.json (reconstruction, memorisation, spectra, masks) and
docs/results/bench_latent.json (speed).

Usage: python scripts/write_patch_card.py MODEL_DIR [--name N] [--eval JSON] [--bench JSON]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _load(p: Path | None) -> dict:
    return json.loads(p.read_text()) if p is not None and p.is_file() else {}


def _f(v, fmt: str = ".3f") -> str:
    return "n/a" if v is None else format(v, fmt)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", type=Path)
    ap.add_argument("--name", default=None)
    ap.add_argument("--eval", type=Path, default=None)
    ap.add_argument("--bench", type=Path, default=ROOT / "docs/results/bench_latent.json")
    a = ap.parse_args()
    card = _load(a.model / "model.json")
    name = a.name or card.get("name") or a.model.name
    card["name"] = name
    ev = _load(a.eval or ROOT / f"docs/results/em_eval_{name}.json")
    unet = _load(a.model / "unet" / "stage.json")
    vae = _load(a.model / "vae" / "stage.json")
    ut, vt = unet.get("training", {}), vae.get("training", {})
    data = card.get("training_data", {})
    paired = len(card.get("channels", [])) > 1

    rec = ev.get("reconstruction", {})
    mem = ev.get("memorisation", {})
    masks = ev.get("masks") or {}
    if ev:
        card["quality"] = {
            "reconstruction_heldout": {k: rec.get(k) for k in ("crops", "mse", "psnr", "ssim")},
            "nn_rms_median": {"generated": mem.get("generated", {}).get("median"),
                              "real_heldout": mem.get("real_heldout", {}).get("median")},
            "evaluation": str((a.eval or Path(f"docs/results/em_eval_{name}.json"))),
        }
        if paired and masks:
            card["quality"]["objects_per_patch"] = {
                "generated": masks.get("generated", {}).get("objects_per_patch_mean"),
                "real_heldout": masks.get("real_heldout", {}).get("objects_per_patch_mean")}
    (a.model / "model.json").write_text(json.dumps(card, indent=2) + "\n")

    v = card.get("validation") or {}
    lines = [
        f"# {name}",
        "",
        f"Generates {card['patch_size']}x{card['patch_size']} grayscale patches"
        + (" with an aligned mask (instance labels)" if paired else "")
        + f" by latent diffusion; trained on {', '.join(data.get('files', []))}.",
        "",
        "| | |",
        "|---|---|",
        f"| kind | latent diffusion (`zfdiffusion em generate --model {name}`) |",
        f"| channels | {', '.join(card.get('channels', []))}"
        + (f" (mask encoding: {card.get('mask_encoding')})" if paired else "") + " |",
        f"| autoencoder | diffusers AutoencoderKL, size `{vt.get('size')}`, downsampling {card.get('downsampling')}, "
        f"latent {card.get('latent_shape')}, MSE + beta*KL with beta {card.get('beta')} per latent element, "
        f"{vt.get('steps_done')} steps of batch {vt.get('batch_size')} on {vt.get('crop') or card['patch_size']}px crops |",
        f"| latent scale factor | {_f(card.get('scaling_factor'), '.4f')} (1 / std of the training latents, measured) |",
        f"| diffusion UNet | ZfUNet (diffusers UNet2DModel), size `{ut.get('size')}`, loss {ut.get('loss')}, "
        f"{ut.get('steps_done')} steps of batch {ut.get('batch_size')} on {ut.get('bank')} encoded crops, EMA {ut.get('ema_decay')}; "
        "weights stored in float16, loaded as float32 |",
        f"| schedule | {unet.get('schedule', {}).get('beta_schedule')}, {unet.get('schedule', {}).get('prediction_type')} |",
        f"| normalisation | per image, percentiles {card.get('normalisation', {}).get('low')}-"
        f"{card.get('normalisation', {}).get('high')} to [0, 1], then (x - 0.5) / 0.5 |",
        f"| training time | autoencoder {_f(vt.get('train_seconds'), '.0f')} s, UNet {_f(ut.get('train_seconds'), '.0f')} s "
        f"(CPU, one thread each; torch {ut.get('torch')}) |",
        f"| plugin version | {card.get('plugin_version')} |",
        "",
        "## Data",
        "",
        f"* Files: {', '.join(data.get('files', []))} ({data.get('images')} image(s)); validation: {data.get('validation')}.",
        f"* Credit: {data.get('credit') or 'n/a'}",
        f"* Licence: {data.get('licence') or 'n/a'}",
        "",
        "## Measured quality",
        "",
        f"Autoencoder on held-out crops at the end of training: MSE {_f(v.get('mse'), '.4f')}, "
        f"PSNR {_f(v.get('psnr'), '.2f')} dB, SSIM {_f(v.get('ssim'))}"
        + (f", mask Dice {_f(v.get('mask_dice'))}" if v.get("mask_dice") is not None else "") + f" ({v.get('crops')} crops).",
    ]
    if ev:
        lines += [
            "",
            f"From `scripts/evaluate_em.py` ({ev.get('settings', {}).get('n')} generated patches, "
            f"{ev.get('settings', {}).get('sampler')} {ev.get('settings', {}).get('steps')} steps; "
            "docs/evaluation.md has the figures):",
            "",
            f"* Reconstruction of {rec.get('crops')} held-out crops: PSNR {_f(rec.get('psnr'), '.2f')} dB, "
            f"SSIM {_f(rec.get('ssim'))}.",
            f"* Nearest-neighbour RMS distance to {mem.get('reference', 'the training crops')}: generated median "
            f"{_f(mem.get('generated', {}).get('median'))}, held-out real median "
            f"{_f(mem.get('real_heldout', {}).get('median'))}.",
        ]
        ex = mem.get("exhaustive_ncc") or {}
        if ex:
            lines.append(f"* Highest correlation with any training window: generated median "
                         f"{_f(ex.get('generated', {}).get('median'))}, held-out real median "
                         f"{_f(ex.get('real_heldout', {}).get('median'))}; generated above the best held-out "
                         f"real: {_f(ex.get('frac_generated_above_real_max'), '.2f')}.")
        if paired and masks:
            g, r = masks.get("generated", {}), masks.get("real_heldout", {})
            lines.append(f"* Objects per patch: generated {_f(g.get('objects_per_patch_mean'), '.1f')}, real held-out "
                         f"{_f(r.get('objects_per_patch_mean'), '.1f')}; median object area "
                         f"{_f(g.get('object_area_median_px'), '.0f')} vs {_f(r.get('object_area_median_px'), '.0f')} px; "
                         f"foreground fraction {_f(g.get('foreground_fraction'), '.2f')} vs "
                         f"{_f(r.get('foreground_fraction'), '.2f')}.")
    bench = _load(a.bench)
    if bench:
        lines += ["", "Speed: see docs/benchmarks.md (`benchmarks/bench_latent.py`)."]
    lines += [
        "",
        "## Limits",
        "",
        "* A demo trained on a CPU in about 1.5 hours on two images (EM) or 16 frames (nuclei): the autoencoder "
        "(16x compression) smooths fine texture, and the samples cover only what those images show.",
        "* Not for biological conclusions. Train on your own data with `zfdiffusion train vae` and "
        "`zfdiffusion train ldm` (docs/training.md); on a GPU use `--size base` and 10x the steps.",
    ]
    if paired:
        lines.append("* The nuclei masks it learned from are the Cell Tracking Challenge's automatic segmentation "
                     "(ERR_SEG), not manual annotation: they miss some nuclei, and so will the generated masks.")
    (a.model / "MODEL_CARD.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {a.model / 'MODEL_CARD.md'}")


if __name__ == "__main__":
    main()
