"""Write MODEL_CARD.md (and the `quality` field of cascade.json) for a cascade model folder.

Facts come from the folder's own JSON (data, depth classes, normalisation, steps, loss, time) and,
when present, from docs/results/cascade_eval.json (measured depth fidelity),
docs/results/volume_eval.json (plane-to-plane agreement of volumes, for a model trained with
``--continuity``) and docs/results/bench_cascade.json (speed).
Usage: python scripts/write_model_card.py MODEL_DIR [--name N] [--parent SLICE_MODEL_DIR]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _load(p: Path) -> dict:
    return json.loads(p.read_text()) if p.is_file() else {}


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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", type=Path)
    ap.add_argument("--name", default=None)
    ap.add_argument("--eval", type=Path, default=ROOT / "docs/results/cascade_eval.json")
    ap.add_argument("--volume-eval", type=Path, default=ROOT / "docs/results/volume_eval.json")
    ap.add_argument("--parent", type=Path, action="append", default=[],
                    help="a cascade the stages were fine-tuned from (--init-from), oldest first; repeat for a "
                         "chain. Only for the step counts and training time")
    a = ap.parse_args()
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
    quality = "Not measured yet: run `scripts/evaluate_cascade.py`."
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


if __name__ == "__main__":
    main()
