"""The segmentation U-Net beside what users would pick instead (StarDist, Cellpose), on the same
test planes with the same figures as `python -m napari_zfdiffusion.evaluation.generalist`.

    python benchmarks/seg_vs_others.py --model runs/seggen/all --out docs/results/seg_vs_others.json

Neither tool can run on this project's machines: their pip packages hold no weights, and both fetch
them at run time (StarDist's `2D_versatile_fluo` from GitHub releases, Cellpose's from Hugging Face),
which these machines cannot reach (checked on stardist 0.9.2 and cellpose 4.2.1.1: their wheels list
no weight files; the URLs are in stardist/models/__init__.py and cellpose/models.py). On a machine
that has them installed and their weights cached (`pip install stardist tensorflow cellpose`, run
each once online), this script runs them side by side; a tool that cannot be imported or loaded is
reported as such, not silently left out.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def stardist_fn():
    from csbdeep.utils import normalize
    from stardist.models import StarDist2D

    model = StarDist2D.from_pretrained("2D_versatile_fluo")
    return lambda im: model.predict_instances(normalize(np.asarray(im, np.float32), 1, 99.8))[0]


def cellpose_fn():
    from cellpose import models

    model = models.CellposeModel(gpu=False)
    return lambda im: model.eval(np.asarray(im, np.float32))[0]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="nuclei-unet-demo", help="the plugin's segmentation model")
    ap.add_argument("--out", type=Path, default=Path("docs/results/seg_vs_others.json"))
    a = ap.parse_args(argv)

    from napari_zfdiffusion.core.fetch import prepare_segmentation
    from napari_zfdiffusion.core.segment import Segmenter
    from napari_zfdiffusion.evaluation.generalist import OTHER, SOURCES, read_pairs, score

    root = prepare_segmentation(quiet=True)
    test = {s: read_pairs(root / s / "test" / "images") for s in SOURCES + OTHER}
    seg = Segmenter.load(a.model, "auto")
    tools = {"napari-zfdiffusion U-Net": lambda: (lambda im: seg.segment(im, min_size=16).labels),
             "StarDist 2D_versatile_fluo": stardist_fn, "Cellpose (default model)": cellpose_fn}
    result = {"model": str(a.model), "tools": {}}
    for name, make in tools.items():
        try:
            fn = make()
        except Exception as e:  # noqa: BLE001 - not installed, or its weights cannot be fetched
            result["tools"][name] = {"unavailable": f"{type(e).__name__}: {str(e)[:200]}"}
            print(f"{name}: unavailable ({type(e).__name__}: {str(e)[:120]})")
            continue
        rows = {}
        for s, pairs in test.items():
            t0 = time.perf_counter()
            r = score(pairs, fn)
            r["seconds"] = round(time.perf_counter() - t0, 2)
            rows[s] = r
            print(f"{name:28s} {s:9s} IoU {r['iou']:.3f} F1 {r['f1']:.3f} offset {r['boundary_offset_px']:+.2f} "
                  f"({r['seconds']} s)")
        result["tools"][name] = rows
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2, default=float) + "\n")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
