"""How many corrected planes it takes to beat the starting model in a new domain (issue 16, part 6).

    python -m napari_zfdiffusion.evaluation.finetune --start nuclei-unet-demo --source cho --threads 2 --out docs

A person segments planes of a domain the model was not trained on, corrects the labels, and
fine-tunes (the Segment dock's "Fine-tune on my corrections", or ``train unet --init-from``). Here
the corrections are the annotations of ``zfdiffusion fetch-data --dataset seg`` (a perfect
corrector): for N = 1, 2, 4 (``--planes``) training planes of ``--source``, picked apart from each
other, and ``--seeds`` different picks, the starting model is fine-tuned with
:func:`..core.segment.finetune.fine_tune` (the dock's defaults: 200 steps, lr 3e-4) and scored on the
source's test planes (foreground IoU, object F1 at IoU 0.5, boundary offset), beside the starting
model. Writes ``OUT/results/seg_finetune.json`` and ``.md``; the fine-tuned models go to ``--work``,
where a rerun finds the finished ones (an interrupted one is trained again).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from ._common import PROG, git_commit, log, output_dirs, run, set_threads, shown_path
from .generalist import read_pairs, score
from .seg import MIN_SIZE


def picks(n_train: int, n: int, seed: int) -> list[int]:
    """``n`` training planes spread over the set (a time series or stack: neighbours look alike), the
    spread shifted by the seed."""
    rng = np.random.default_rng(seed)
    offset = rng.uniform(0, n_train / n)
    return sorted({int(offset + k * n_train / n) % n_train for k in range(n)})


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog=PROG + "finetune", description=__doc__.splitlines()[0])
    ap.add_argument("--start", default="nuclei-unet-demo", help="the model to fine-tune (name or folder)")
    ap.add_argument("--source", default="cho", help="the new domain: a source of `fetch-data --dataset seg`")
    ap.add_argument("--planes", type=int, nargs="+", default=[1, 2, 4], help="numbers of corrected planes")
    ap.add_argument("--seeds", type=int, default=2, help="different picks of planes per number")
    ap.add_argument("--steps", type=int, default=None, help="fine-tuning steps (default: the dock's)")
    ap.add_argument("--work", type=Path, default=Path("runs") / "finetune", help="where the fine-tuned models go")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("docs"))
    return ap.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    _, res_dir = output_dirs(a.out)
    from ..core.fetch import prepare_segmentation
    from ..core.segment import Segmenter
    from ..core.segment.finetune import FINE_TUNE_STEPS, fine_tune

    set_threads(a.threads)
    steps = a.steps or FINE_TUNE_STEPS
    root = prepare_segmentation(quiet=True)
    train = read_pairs(root / a.source / "train" / "images")
    test = read_pairs(root / a.source / "test" / "images")

    def scored(model) -> dict:
        seg = Segmenter.load(model, "cpu")
        return score(test, lambda im: seg.segment(im, min_size=MIN_SIZE).labels)

    start = scored(a.start)
    log(f"start {a.start} on {a.source}: F1 {start['f1']:.3f} IoU {start['iou']:.3f}")
    rows = []
    for n in a.planes:
        for seed in range(a.seeds):
            idx = picks(len(train), n, seed)
            out = a.work / f"{Path(str(a.start)).name}-{a.source}-n{n}-s{seed}"
            t0 = time.perf_counter()
            if not (out / "model.json").is_file():
                if out.exists():  # an interrupted run: start it again
                    import shutil

                    shutil.rmtree(out)
                fine_tune(a.start, [train[i][0] for i in idx], [train[i][1] for i in idx], out, steps=steps,
                          device="cpu", seed=seed)
            secs = time.perf_counter() - t0
            stage = out / "unet" / "stage.json"  # the training's own time (also for a run made before)
            if stage.is_file():
                secs = float(json.loads(stage.read_text()).get("training", {}).get("train_seconds", secs))
            r = scored(out)
            rows.append({"planes": n, "seed": seed, "train_planes": idx, "seconds": round(secs, 1), **r})
            log(f"{n} plane(s), seed {seed} ({idx}): F1 {r['f1']:.3f} IoU {r['iou']:.3f} ({secs:.0f} s)")
    result = {"commit": git_commit(), "start": str(a.start), "source": a.source, "steps": steps,
              "test_planes": len(test), "train_planes": len(train), "threads": a.threads, "starting_model": start,
              "fine_tuned": rows}
    path = res_dir / "seg_finetune.json"
    path.write_text(json.dumps(result, indent=2, default=float) + "\n")
    write_markdown(result, path.with_suffix(".md"))
    print(f"wrote {shown_path(path)}, {shown_path(path.with_suffix('.md'))}")
    return 0


def write_markdown(result: dict, path: Path) -> None:
    s = result["starting_model"]
    lines = [f"Starting model `{result['start']}`, new domain `{result['source']}` ({result['test_planes']} test "
             f"planes); fine-tuned {result['steps']} steps on N corrected training planes (the annotations), "
             "mean (min-max) over the picks of planes.", "",
             "| corrected planes | foreground IoU | object F1 (IoU 0.5) | boundary offset (px) | minutes (CPU) |",
             "|---|---|---|---|---|",
             f"| 0 (starting model) | {s['iou']:.3f} | {s['f1']:.3f} | {s['boundary_offset_px']:+.2f} | |"]
    for n in sorted({r["planes"] for r in result["fine_tuned"]}):
        rs = [r for r in result["fine_tuned"] if r["planes"] == n]

        def span(key, fmt="{:.3f}", rs=rs):
            v = [r[key] for r in rs]
            return fmt.format(np.mean(v)) + (f" ({fmt.format(min(v))}-{fmt.format(max(v))})" if len(v) > 1 else "")

        lines.append(f"| {n} | {span('iou')} | {span('f1')} | {span('boundary_offset_px', '{:+.2f}')} | "
                     f"{np.mean([r['seconds'] for r in rs]) / 60:.1f} |")
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    run(main)
