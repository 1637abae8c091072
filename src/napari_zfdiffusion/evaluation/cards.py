"""Model cards: MODEL_CARD.md (and the ``quality`` field of the JSON card) for a model folder, from the
folder's own JSON and, when present, the evaluation results (``OUT/results`` of the evaluation
modules; ``--results``, default ``docs/results`` in the working directory).

    python -m napari_zfdiffusion.evaluation.cards cascade MODEL_DIR [--name N] [--parent SLICE_MODEL_DIR]
    python -m napari_zfdiffusion.evaluation.cards patch MODEL_DIR [--name N] [--eval JSON] [--bench JSON]
    python -m napari_zfdiffusion.evaluation.cards seg MODEL_DIR [--name N] [--run-name real] [--eval JSON] [--bench JSON]

* ``cascade``: a cascade folder; facts from its JSON (data, depth classes, normalisation, steps, loss,
  time), ``cascade_eval.json`` (measured depth fidelity), ``volume_eval.json`` (plane-to-plane
  agreement of volumes, for a model trained with ``--continuity``) and ``bench_cascade.json`` (speed).
* ``patch``: a patch model folder (kind ``latent``): data and credits, training, the measured scale
  factor, ``em_eval_<name>.json`` (reconstruction, memorisation, spectra, masks) and
  ``bench_latent.json`` (speed).
* ``seg``: a segmentation model folder: data and credits, training, validation, the held-out figures of
  ``seg_eval.json`` (:mod:`.seg`) and the speed of ``bench_segment.json``.

``scripts/export_demo.sh`` and ``scripts/export_patch_demo.sh`` call these for the bundled models.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from ._common import PROG

RESULTS = Path("docs") / "results"


def _load(p: Path | None) -> dict:
    return json.loads(p.read_text()) if p is not None and p.is_file() else {}


def _f(v, fmt: str = ".3f") -> str:
    return "n/a" if v is None else format(v, fmt)


def _memorisation_sentence(nn: dict, mem: dict) -> str:
    """What the nearest-neighbour distances say, from the numbers (not a fixed claim)."""
    gen = {k: v for k, v in nn.items() if k.startswith("generated") and v is not None}
    if all(v >= 0.9 * nn["real_heldout"] for v in gen.values()):
        return "Generated planes are no closer to the training set than new real planes are."
    below = [r.get("frac_below_heldout_min", 0) or 0 for g, r in mem.get("generated", {}).items() if g != "0"]
    return ("Generated planes sit closer to the training set than held-out real planes do (whose cells drift in z), "
            f"but at guidance 1 and above {max(below, default=0):.0%} are closer than the closest held-out real "
            "plane" + (": no sign of copies" if max(below, default=0) == 0 else ": look at those pairs")
            + " (docs/evaluation.md).")


def cascade_card(a: argparse.Namespace) -> int:
    """MODEL_CARD.md and the ``quality`` of cascade.json for a cascade folder."""
    card = _load(a.model / "cascade.json")
    if a.name:
        card["name"] = a.name
    ev = _load(a.eval)
    acc = ev.get("accuracy", {})
    mem = ev.get("memorisation", {})
    if ev:
        card["quality"] = {
            "chance": acc.get("chance"),
            "real_heldout_accuracy": acc.get("real_heldout", {}).get("mean"),
            "generated_accuracy_by_guidance": {g: r["mean"] for g, r in acc.get("generated", {}).items()},
            "nn_pixel_median": {"real_heldout": mem.get("real_heldout", {}).get("pixel", {}).get("median"),
                                **{f"generated_g{g}": r.get("pixel", {}).get("median")
                                   for g, r in mem.get("generated", {}).items()}},
            "evaluated_at_commit": ev.get("git_commit"),
        }
    volume = all(_load(a.model / st / "stage.json").get("prev_channels", 0)
                 for st in ("base", "sr128", "sr256", "sr512") if (a.model / st / "stage.json").is_file())
    card["description"] = ("Demo depth cascade (64 -> 128 -> 256 -> 512) trained on CPU on real CHO nuclei "
                           "z-stacks, a public stand-in for zebrafish brain depth planes."
                           + (" It also makes volumes: every stage takes the plane above." if volume else ""))
    vev = _load(a.volume_eval) if volume else {}
    if vev:
        card.setdefault("quality", {})["volume_neighbour_correlation"] = {
            name: r["neighbour_correlation"]["mean"] for name, r in vev["sets"].items()}
        card["quality"]["volume_evaluated_at_commit"] = vev.get("git_commit")
    (a.model / "cascade.json").write_text(json.dumps(card, indent=2) + "\n")
    rows = []
    for st in ("base", "sr128", "sr256", "sr512"):
        info = _load(a.model / st / "stage.json")
        if not info:
            continue
        tr = info.get("training", {})
        cfg = _load(a.model / st / "config.json")
        size = (a.model / st / "diffusion_pytorch_model.safetensors").stat().st_size / 2**20
        steps, minutes = str(tr.get("steps_done")), (tr.get("train_seconds") or 0) / 60
        earlier = []
        for par in a.parent:
            pinfo = _load(par / st / "stage.json")
            if pinfo and pinfo != info:  # a stage copied unchanged from a parent is not counted twice
                earlier.append(str(pinfo.get("training", {}).get("steps_done")))
                minutes += (pinfo.get("training", {}).get("train_seconds") or 0) / 60
        if earlier:
            steps = " + ".join([*earlier, steps])
        rows.append(
            f"| {st} | {info.get('input_resolution') or '-'} -> {info['resolution']} | "
            f"{tuple(cfg.get('block_out_channels', ()))} | {size:.1f} MB | {steps} | "
            f"{tr.get('batch_size')} | {tr.get('loss')} | {tr.get('final_loss_ema', 0):.4f} | "
            f"{minutes:.0f} min |"
        )
    norm = card.get("normalisation", {})
    classes = "\n".join(f"| {d['index']} | {d['label']} |" for d in card.get("depth_classes", []))
    data = card.get("training_data", {})
    quality = "Not measured yet: run `python -m napari_zfdiffusion.evaluation.cascade`."
    if ev:
        q = card["quality"]
        qrows = "\n".join(f"| generated, guidance {g} | {v:.2f} |" for g, v in q["generated_accuracy_by_guidance"].items())
        quality = (
            "Depth fidelity: a small CNN depth classifier trained on real planes (time points 0-11) "
            "names the depth class of held-out real planes and of generated ones, 100 per guidance "
            "(docs/evaluation.md).\n\n"
            f"| planes | classifier accuracy |\n|---|---|\n| chance | {q['chance']:.2f} |\n"
            f"| real, held out (t16-19) | {q['real_heldout_accuracy']:.2f} |\n{qrows}\n"
        )
        nn = q["nn_pixel_median"]
        quality += ("\nMemorisation check (RMS pixel distance to the nearest training view, 64x64, median): "
                    f"held-out real planes {nn['real_heldout']:.3f}; generated "
                    + ", ".join(f"guidance {k[11:]}: {v:.3f}" for k, v in nn.items() if k.startswith("generated"))
                    + ". " + _memorisation_sentence(nn, mem) + "\n")
    sr_losses = {_load(a.model / st / "stage.json").get("training", {}).get("loss")
                 for st in ("sr128", "sr256", "sr512") if (a.model / st / "stage.json").is_file()}
    targets = ("Base: v-prediction (see Limits); super-resolution stages: epsilon prediction, L1."
               if sr_losses != {"v"} else
               "Base: v-prediction; super-resolution stages: first epsilon prediction with L1, then fine-tuned "
               "to v-prediction together with the volume training (see Limits).")
    sr_limit = ("- The super-resolution stages saw only 450-1000 steps: they keep the nuclei's shapes and add texture,\n"
                "  but lift the background to grey (about 0.2 instead of 0) and leave faint noise.")
    if sr_losses == {"v"}:
        sr_limit = ("- The super-resolution stages were first trained on epsilon with L1 (450-1000 steps); most of their\n"
                    "  samples came out grey or as bright noise. Fine-tuned to v-prediction (300-800 steps, with the\n"
                    "  volume training) their outputs keep the real intensity per depth and a dark background\n"
                    "  (docs/evaluation.md, Volumes). They are still briefly trained: fine texture is soft.")
    volume_time = ("" if not volume else
                   ", then fine-tuned for volumes in about 50 minutes (`scripts/train_demo_volume.sh`, base and "
                   "super-resolution stages side by side)")
    base_limit = ("- The base model is small and briefly trained (5000 CPU steps at batch 8): generated planes follow\n"
                  "  the real brightness profile over depth, but a classifier trained on real planes names their depth\n"
                  "  only about half as well as for real planes (docs/evaluation.md).")
    q = card.get("quality", {})
    if volume and q.get("generated_accuracy_by_guidance") and q.get("real_heldout_accuracy"):
        best = max(q["generated_accuracy_by_guidance"].values())
        base_limit = ("- The base model is small and briefly trained (6200 CPU steps at batch 8): generated planes follow\n"
                      "  the real brightness profile over depth; a classifier trained on real planes names their depth\n"
                      f"  with accuracy up to {best:.2f}, against {q['real_heldout_accuracy']:.2f} for held-out real "
                      "planes (docs/evaluation.md).")
    volumes = ""
    if volume:
        volumes = """## Volumes

Every stage also takes the plane above (the previous plane of the same volume, at the stage's
resolution). The stages were fine-tuned from the slice-only cascade (`--continuity --init-from`,
`scripts/train_demo_volume.sh`) on consecutive planes of the same 16 stacks, with the plane above
lightly noised (up to 0.1 of the schedule) and dropped with probability 0.2 (always absent at the
top plane), so depth and continuity guidance can be set separately. Continuity guidance 0 makes
independent planes: the model is then a slice model.
"""
        if vev:
            st = vev["settings"]
            vrows = "\n".join(
                f"| {name} | {r['neighbour_correlation']['mean']:.3f} | {r['neighbour_ssim']['mean']:.3f} | "
                f"{r['depth']['accuracy']:.2f} |" for name, r in vev["sets"].items())
            volumes += f"""
Plane-to-plane agreement at {st['resolution']} px ({st['n_volumes']} generated volumes per row, depths
{st['depths'][0]}-{st['depths'][-1]}, depth guidance {st['guidance']}; docs/evaluation.md):

| volumes | neighbour correlation | neighbour SSIM | depth-classifier accuracy |
|---|---|---|---|
{vrows}
"""
    text = f"""# Model card: {card.get('name', a.model.name)}

{card['description']}

**This is a demo model.** It was trained on a CPU (2 cores) in about two and a half hours with the project's own
command, `scripts/train_demo_cascade.sh` (`zfdiffusion train cascade`), on a small public data set{volume_time}.
It shows that the pipeline works end to end; how well the depth condition is learned is measured
below. It is not a zebrafish model. Train your own on your stacks (docs/training.md); on a GPU use `--size base` and more steps.

## Data

- {data.get('credit', '')}
- Licence: {data.get('licence', '')}
- Files: {', '.join(data.get('files', []))}
- Each time point is treated as one specimen: 16 specimens x {card.get('n_planes')} planes, 443x512 px,
  uint8. The planes are 1 um apart; deeper planes are dimmer and more blurred.
- Intensity: per-stack percentile normalisation ({norm.get('low')}th percentile -> 0,
  {norm.get('high')}th -> 1); outputs are
  normalised intensities in [0, 1]. Planes are cut to a 443x443 square (random offset in training)
  and resized to each stage's resolution, so the 512 stage has learnt from slightly upsampled data.

## Depth classes

| class | meaning |
|---|---|
{classes}

## Stages

| stage | resolution | UNet channels | weights | steps | batch | loss | final loss (EMA) | CPU time |
|---|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}

All stages: diffusers `UNet2DModel` with depth embedding + learned null class (condition dropped with
probability 0.15 in training), cosine noise schedule (1000 steps), AdamW, EMA 0.999. {targets}
Base: attention at 16x16 and 8x8. Super-resolution stages: fully convolutional, trained on random
crops (64/96/128 px), conditioned on the bilinearly upsampled low-res image with noise augmentation
(level drawn from [0, 0.3] in training; 0.1 at sampling) and its level.

## Measured quality

{quality}
{volumes}
## Limits

- Trained on 80 real planes of one cell line: generated images are nuclei-like blobs with the
  intensity and blur of each depth, not new biology.
{base_limit}
- Base recipe: 4000 steps of L1 on the noise (epsilon), then 1000 steps fine-tuned to v-prediction.
  The epsilon model left a third of its samples as bright noise; v-prediction removed that (0/16
  failures with every sampler). New models train with `--loss v` by default.
{sr_limit}
- Loading uses safetensors only; the folder holds no pickles.
"""
    (a.model / "MODEL_CARD.md").write_text(text)
    print(f"wrote {a.model / 'MODEL_CARD.md'}")
    return 0


def patch_card(a: argparse.Namespace) -> int:
    """MODEL_CARD.md and the ``quality`` of model.json for a patch (latent) model folder."""
    card = _load(a.model / "model.json")
    name = a.name or card.get("name") or a.model.name
    card["name"] = name
    eval_path = a.eval or a.results / f"em_eval_{name}.json"
    ev = _load(eval_path)
    unet = _load(a.model / "unet" / "stage.json")
    vae = _load(a.model / "vae" / "stage.json")
    ut, vt = unet.get("training", {}), vae.get("training", {})
    data = card.get("training_data", {})
    paired = len(card.get("channels", [])) > 1
    shape = card.get("latent_shape") or [card.get("latent_channels", 4), 1, 1]
    compression = card["patch_size"] ** 2 * len(card.get("channels", ["image"])) / float(np.prod(shape))
    stats = ev.get("statistics") or {}

    rec = ev.get("reconstruction", {})
    mem = ev.get("memorisation", {})
    masks = ev.get("masks") or {}
    if ev:
        card["quality"] = {
            "reconstruction_heldout": {k: rec.get(k) for k in ("crops", "mse", "psnr", "ssim")},
            "nn_rms_median": {"generated": mem.get("generated", {}).get("median"),
                              "real_heldout": mem.get("real_heldout", {}).get("median")},
            "evaluation": str(eval_path),
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
        f"latent {card.get('latent_shape')} ({compression:g}x fewer numbers than the patch), "
        f"{card.get('loss') or 'MSE + beta * KL'} with beta {card.get('beta')}, "
        f"{card.get('conv_padding', 'zeros')} padding, "
        f"{vt.get('steps_done')} steps of batch {vt.get('batch_size')} on {vt.get('crop') or card['patch_size']}px crops; "
        "weights stored in float16, loaded as float32 |",
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
        + (f", mask Dice {_f(v.get('mask_dice'))}" if v.get("mask_dice") is not None else "") + f" ({v.get('crops')} crops)"
        + (f"; power of the reconstructions over the real crops' from 1/64 to 0.25 cycles/px: "
           f"{_f(v.get('spectrum_ratio_min'), '.2f')}-{_f(v.get('spectrum_ratio_max'), '.2f')}"
           if v.get("spectrum_ratio_min") is not None else "") + ".",
    ]
    if ev:
        lines += [
            "",
            f"From `napari_zfdiffusion.evaluation.em` ({ev.get('settings', {}).get('n')} generated patches, "
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
        edge = stats.get("edge_profile") or {}
        if edge:
            lines.append("* Edge band (16 px) minus centre intensity: generated "
                         f"{_f((edge.get('generated') or {}).get('edge_minus_centre'), '+.4f')}, reconstructed "
                         f"{_f((edge.get('reconstructed held-out') or {}).get('edge_minus_centre'), '+.4f')}, real held-out "
                         f"{_f((edge.get('real held-out') or {}).get('edge_minus_centre'), '+.4f')}.")
        spec = stats.get("spectrum_ratio_generated") or {}
        if spec:
            lines.append(f"* Power spectrum of the generated patches over the real held-out crops', 1/64 to 0.25 "
                         f"cycles/px: {_f(spec.get('spectrum_ratio_min'), '.2f')}-{_f(spec.get('spectrum_ratio_max'), '.2f')}.")
        if paired and masks:
            rc = masks.get("recall_of_unet_objects") or {}
            if rc:
                lines.append(f"* Nuclei with a mask: of the objects that `{rc.get('unet')}` finds in the images, "
                             f"{_f((rc.get('generated') or {}).get('recall'), '.3f')} have at least half their pixels "
                             f"in the generated mask ({_f((rc.get('real_heldout') or {}).get('recall'), '.3f')} for "
                             "the real held-out crops and their training masks).")
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
        f"* A demo trained on a CPU on {data.get('images')} image(s) ({data.get('validation')}): the samples cover only "
        "what those images show, "
        f"and the autoencoder ({compression:g}x compression) keeps what its held-out figures above say, not more.",
        "* Not for biological conclusions. Train on your own data with `zfdiffusion train vae` and "
        "`zfdiffusion train ldm` (docs/training.md); on a GPU use `--size base` and 10x the steps.",
    ]
    # what the measurements above say the samples are not (thresholds: a spectrum within 2x, as for the
    # autoencoder; generated patches no farther from the training crops than held-out real ones, +10 %)
    g_nn, r_nn = (mem.get("generated") or {}).get("median"), (mem.get("real_heldout") or {}).get("median")
    if ev and g_nn is not None and r_nn and g_nn > 1.1 * r_nn:
        lines.append(f"* The generated patches are farther from every training crop than held-out real crops are "
                     f"(median {g_nn:.3f} against {r_nn:.3f}): they are less like the training images than new real "
                     "images would be. Look at the samples in docs/evaluation.md before training on them.")
    spec = (stats.get("spectrum_ratio_generated") or {}) if ev else {}
    lo, hi = spec.get("spectrum_ratio_min"), spec.get("spectrum_ratio_max")
    if lo is not None and hi is not None and (lo < 0.5 or hi > 2):
        lines.append(f"* Their power spectrum is {lo:.2f}-{hi:.2f}x the real crops' up to 0.25 cycles/px (outside "
                     "0.5-2x): their texture and contrast differ from the real images at some scales.")
    if paired:
        lines.append("* The nuclei masks it learned from are the Cell Tracking Challenge's automatic segmentation "
                     "(ERR_SEG), not manual annotation: they miss some nuclei, and so will the generated masks.")
    (a.model / "MODEL_CARD.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {a.model / 'MODEL_CARD.md'}")
    return 0


def seg_card(a: argparse.Namespace) -> int:
    """MODEL_CARD.md and the ``quality`` of model.json for a segmentation model folder."""
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
{chr(10).join(rows) if rows else '| (run napari_zfdiffusion.evaluation.seg) | | | | |'}

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
    return 0


SOURCE_WORDS = {
    "hela": "HeLa nuclei, widefield fluorescence time-lapse (Cell Tracking Challenge Fluo-N2DL-HeLa, automatic "
            "ERR_SEG masks)",
    "cho": "CHO nuclei, confocal 3D time-lapse, planes (Cell Tracking Challenge Fluo-N3DH-CHO, automatic ERR_SEG "
           "masks): large nuclei, dim background",
    "nuclei3d": "cells3d nuclei, confocal z-stack planes with 3D labels (Allen Institute, via scikit-image)",
    "dsb": "DSB 2018 fluorescence nuclei of another lab (manual masks, as shipped with StarDist)",
}


def generalist_card(a: argparse.Namespace) -> int:
    """MODEL_CARD.md and the ``quality`` of model.json for the generalist segmentation U-Net (issue 14):
    the domains it was trained on, the leave-one-source-out table (each source scored by a model that
    never saw it, beside Otsu + watershed tuned on the other sources), its own in-domain figures, 3D
    object F1, and where it is expected to fail."""
    card = _load(a.model / "model.json")
    name = a.name or card.get("name") or a.model.name
    card["name"] = name
    stage = _load(a.model / "unet" / "stage.json").get("training", {})
    ev = _load(a.eval)
    fmt = "| {} | {} | {:.3f} | {:.3f} | {:+.2f} |"
    held = ["| held-out source | method | foreground IoU | object F1 (IoU 0.5) | boundary offset (px) |",
            "|---|---|---|---|---|"]
    wins = []
    for s, row in ev.get("held_out", {}).items():
        # the held-out model as a lab gets it: its seed and join thresholds tuned on its own training planes
        tuned = next((k for k in row if k.startswith("U-Net without it, seeds") and "tuned on its training" in k), None)
        b, u = row.get("baseline"), row.get(tuned or "U-Net without it")
        if not b or not u:
            continue
        how = ""
        if tuned:
            jt = u.get("join_threshold")
            how = f" (seeds {u['seed_threshold']:g}" + (f", joined above {jt:g}" if jt is not None else "") + \
                  ", tuned on its training planes)"
        d = ev.get("data", {}).get(s, {})
        if "held_out_planes" in d:  # scored on whole planes of both parts (evaluation.generalist --held-out-planes)
            n = d["held_out_planes"]
            s_shown = f"{s} ({n} plane{'' if n == 1 else 's'}, {d['held_out_objects']} objects)"
        else:
            s_shown = f"{s} (test planes)"
        held.append(fmt.format(s_shown, "Otsu + watershed", b["iou"], b["f1"], b["boundary_offset_px"]))
        held.append(fmt.format(s_shown, f"U-Net trained without {s}{how}", u["iou"], u["f1"], u["boundary_offset_px"]))
        wins.append((s, u["f1"] - b["f1"], u["iou"] - b["iou"]))
    own = ["| test planes | foreground IoU | Dice | object F1 (IoU 0.5) | precision | recall | boundary offset (px) |",
           "|---|---|---|---|---|---|---|"]
    quality = {}
    for s, row in ev.get("in_domain", {}).items():
        r = row.get("generalist")
        if r:
            own.append(f"| {s} | {r['iou']:.3f} | {r['dice']:.3f} | {r['f1']:.3f} | {r['precision']:.3f} | "
                       f"{r['recall']:.3f} | {r['boundary_offset_px']:+.2f} |")
            quality[s] = {k: r[k] for k in ("iou", "dice", "f1", "precision", "recall", "boundary_offset_px")}
    three = [f"| {v} | {r['volume']['f1']:.3f} | "
             + (f"{r['volume, every object']['f1']:.3f}" if "volume, every object" in r else "n/a")
             + f" | {r['planes']['f1']:.3f} |" for v, r in ev.get("3d", {}).items()]
    fraction = next((r["volume"].get("min_volume_fraction") for r in ev.get("3d", {}).values()), None)
    # the seed threshold of the card (evaluation.generalist --tune-seed-threshold), with its figures when
    # RESULTS/seg_seed_threshold.json chose it
    st, fg, jt = card.get("seed_threshold"), float(card.get("threshold", 0.5)), card.get("join_threshold")
    seeds = ""
    if st is not None:
        tuned = _load(a.results / "seg_seed_threshold.json")
        tuned = tuned if tuned.get("chosen") == [st, jt] and tuned.get("model") == name else {}
        mean, test = tuned.get("mean_f1") or {}, tuned.get("test") or {}
        chosen = tuned.get("chosen_name", "")
        how = (f" This pair gave the best mean object F1 (IoU 0.5) over the training sources on their own "
               f"training planes, of seed thresholds {min(tuned['seeds']):g}-{max(tuned['seeds']):g} alone and "
               f"with join thresholds {min(tuned['joins']):g}-{max(tuned['joins']):g} ({mean[chosen]:.3f} against "
               f"{mean[f'{fg:g}']:.3f} with the seeds at {fg:g} and no joining): `{tuned['command']}` "
               "(docs/results/seg_seed_threshold.json). On the test planes, object F1 before -> with them (the "
               "bundled weights, stored in float16): " + ", ".join(
                   f"{s} {r['old']['f1']:.3f} -> {r['tuned']['f1']:.3f}" for s, r in test.items()
                   if r.get("in_training")) + "."
               if tuned and f"{fg:g}" in mean and chosen in mean else "")
        import textwrap

        joined = (f"; cores of the centre output linked above {jt:g} are one seed (`join_threshold`), so a large "
                  f"textured nucleus stays whole while touching nuclei, whose centre output falls towards 0 "
                  f"between them, stay apart") if jt is not None else ""
        seeds = "\n\n" + textwrap.fill(
                (f"**Seed threshold {st:g}{f', join threshold {jt:g}' if jt is not None else ''}.** Nuclei are "
                 f"seeded where the centre output is at least {st:g} (`seed_threshold` in model.json; the "
                 f"foreground threshold stays {fg:g}){joined}.{how} `--seed-threshold` and `--join-threshold` "
                 "(`zfdiffusion segment`), \"seed threshold\" and \"join cores above\" (Segment dock, Advanced) "
                 "change them."), 100, break_long_words=False, break_on_hyphens=False)
    card["quality"] = quality
    (a.model / "model.json").write_text(json.dumps(card, indent=2, default=str) + "\n")
    sources = [s for s in SOURCE_WORDS if s in ev.get("held_out", {})]
    beaten = [s for s, df1, _ in wins if df1 > 0]
    lost = [f"{s} (object F1 {df1:+.3f})" for s, df1, _ in wins if df1 <= 0]
    verdict = (f"Held out, the U-Net beats Otsu + watershed in object F1 on every source ({', '.join(beaten)})."
               if wins and not lost else
               f"Held out, the U-Net beats Otsu + watershed in object F1 on {', '.join(beaten) or 'no source'}, "
               f"not on {', '.join(lost)}: on such images try the diameter, fine-tune on a few corrected planes, "
               "or compare with the baseline.")
    text = f"""# {name}

A residual U-Net ({stage.get('size', 'small')}) that segments fluorescent nuclei in 2D planes, z-stacks
(3D objects, planes linked) and time series. Per pixel it predicts the foreground probability and
each nucleus's centre (normalised distance to its edge); instance labels come from a watershed of
the foreground seeded by the centres' cores, so touching nuclei stay apart at any size. Made by
`scripts/train_seg_generalist.sh` (`zfdiffusion train unet`); used by the Segment dock and
`zfdiffusion segment`.

## Trained on (the domains it knows)

{chr(10).join(f"* {SOURCE_WORDS[s]}" for s in sources)}

Training planes only (`zfdiffusion fetch-data --dataset seg` cuts each source into training and test
planes; time series by time, stacks and the DSB image by columns). Smaller sources repeated so that
each weighs about the same. Augmentation for what differs between labs: random zoom 0.5-2x,
Gaussian blur, background offset, contrast, gamma, noise, and a quarter of the crops
percentile-normalised on their own (so empty fields give no objects). Objects of about
{card.get('object_diameter_px') or '?'} px across (median): `--diameter` rescales other sizes to it.

## Training

{stage.get('steps_done', '?')} steps, batch {stage.get('batch_size', '?')} crops of {stage.get('crop', '?')} px, AdamW lr {stage.get('lr', '?')},
EMA {stage.get('ema_decay', '?')}, on a CPU ({stage.get('train_seconds', 0) / 60:.0f} min, {stage.get('world_size', 1)} process,
torch {stage.get('torch', '?')}). Loss: BCE on both outputs + soft Dice on the foreground.

## Quality

On the test planes of its training sources (never trained on), and on bacteria (outside its domain):

{chr(10).join(own)}

**Leave one source out** (a model trained without the source, scored on it, as this model would do
on a lab's new images; the baseline's smoothing and peak distance tuned on the other sources; the
held-out source's training and test parts together, whole planes, as neither was seen):

{chr(10).join(held)}

{verdict}

3D object F1 at IoU 0.5 against the 3D labels (planes linked as a volume{
f", 3D objects under {fraction:g} of the typical object's voxels dropped (`--min-volume-fraction`)"
if fraction is not None else ""} / the same keeping every object / each plane on its own):

| volume | as a volume | as a volume, every object | plane by plane |
|---|---|---|---|
{chr(10).join(three)}

All figures: `python -m napari_zfdiffusion.evaluation.generalist --run RUN` (docs/evaluation.md).{seeds}

## Where it is expected to fail

* Not nuclei: cytoplasm, membranes, bacteria (rods, phase contrast: see the bacteria row of
  docs/evaluation.md), EM, brightfield or histology stains.
* Large nuclei with textured interiors, as CHO's (about 68 px across, 2.4x its training size): the
  join threshold keeps most of them whole, but some still come out in pieces, and the faint nuclei
  that CHO's automatic masks leave out count as false objects (precision on CHO above). A diameter
  near the real one helps (held out, 20 whole planes: `auto` 0.603 with the tuned seeds, against
  0.517 without), but the outlines then sit 2-2.6 px outside; fine-tuning on a few corrected planes
  is the other route (docs/evaluation.md).
* Small, crowded nuclei (DSB's, about 23 px): joining merges some touching pairs there; `--diameter
  auto` (held out, the whole image: 0.858 with seeds at 0.5, against 0.760 with the tuned joins) or
  a join threshold at the seed threshold (no joining: 0.819) do better.
* The out-of-focus planes at the ends of a z-stack, segmented as planes: the blurred glow of the
  nuclei above or below is outlined as objects (held out on cells3d, 97 of 221 false objects were in
  the outer 7 of 20 planes), and cells3d's large touching nuclei merge with the joins tuned on the
  other sources: there it loses to Otsu + watershed (0.579 against 0.732). Segment such a stack as a
  volume (small 3D pieces are dropped) and try `--join-threshold` at the seed threshold.
* Outlines: with the cores joined, the mean boundary offset is +1.1-1.2 px on cells3d and held-out
  CHO (the split lines inside nuclei, which pulled the average in, are gone). A foreground
  `--threshold` of 0.7 drew them in on cells3d's test planes (+1.20 -> +0.94 px, object F1 0.728 ->
  0.758), but it was not tuned on training planes, so 0.5 stays the default.
* Objects much smaller or larger than about 0.5-2x its training size without `--diameter`; dense
  clusters of nuclei that touch along most of their outline; very dim nuclei next to bright ones
  (percentile normalisation per plane).
* 3D linking assumes a nucleus spans several planes: for widely spaced planes choose `planes`. In a
  volume, 3D objects under a tenth of the typical object's voxels are dropped (out-of-focus glow,
  fragments): a real nucleus that small (under about half the typical diameter) goes too; keep it
  with `--min-volume-fraction 0`.
* Two of its sources have automatic (ERR_SEG), not manual, masks: it learned their misses too.
* A few planes of your own, corrected and fine-tuned on ("Fine-tune on my corrections", or
  `zfdiffusion train unet --init-from`), adapt it to a new domain (docs/evaluation.md).
"""
    (a.model / "MODEL_CARD.md").write_text(text)
    print(f"wrote {a.model / 'MODEL_CARD.md'}")
    return 0


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog=PROG + "cards", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="kind", required=True, metavar="{cascade,patch,seg,seg-generalist}")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("model", type=Path, help="the model folder (MODEL_CARD.md and its JSON card are written there)")
        p.add_argument("--name", default=None)
        p.add_argument("--results", type=Path, default=RESULTS,
                       help="folder of the evaluation and benchmark results (default: docs/results)")

    c = sub.add_parser("cascade", help="a depth cascade (cascade.json)")
    common(c)
    c.add_argument("--eval", type=Path, default=None, help="default: RESULTS/cascade_eval.json")
    c.add_argument("--volume-eval", type=Path, default=None, help="default: RESULTS/volume_eval.json")
    c.add_argument("--parent", type=Path, action="append", default=[],
                   help="a cascade the stages were fine-tuned from (--init-from), oldest first; repeat for a "
                        "chain. Only for the step counts and training time")
    p = sub.add_parser("patch", help="a latent diffusion patch model (model.json, kind latent)")
    common(p)
    p.add_argument("--eval", type=Path, default=None, help="default: RESULTS/em_eval_<name>.json")
    p.add_argument("--bench", type=Path, default=None, help="default: RESULTS/bench_latent.json")
    s = sub.add_parser("seg", help="a segmentation U-Net (model.json, kind segmentation)")
    common(s)
    s.add_argument("--run-name", default="real", help="the model's name in the evaluation JSON")
    s.add_argument("--eval", type=Path, default=None, help="default: RESULTS/seg_eval.json")
    s.add_argument("--bench", type=Path, default=None, help="default: RESULTS/bench_segment.json")
    g = sub.add_parser("seg-generalist", help="the generalist segmentation U-Net (issue 14)")
    common(g)
    g.add_argument("--eval", type=Path, default=None, help="default: RESULTS/seg_generalist.json")
    a = ap.parse_args(argv)
    if a.kind == "cascade":
        a.eval = a.eval or a.results / "cascade_eval.json"
        a.volume_eval = a.volume_eval or a.results / "volume_eval.json"
    elif a.kind == "patch":
        a.bench = a.bench or a.results / "bench_latent.json"
    elif a.kind == "seg-generalist":
        a.eval = a.eval or a.results / "seg_generalist.json"
    else:
        a.eval = a.eval or a.results / "seg_eval.json"
        a.bench = a.bench or a.results / "bench_segment.json"
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    return {"cascade": cascade_card, "patch": patch_card, "seg": seg_card, "seg-generalist": generalist_card}[a.kind](a)


if __name__ == "__main__":
    raise SystemExit(main())
