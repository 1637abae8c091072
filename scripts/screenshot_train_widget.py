"""Screenshot of napari with the "Train" widget docked, after a short U-Net training on HeLa frames.

Needs a display with OpenGL; on a headless machine run it under Xvfb::

    xvfb-run -a -s "-screen 0 1600x1000x24" .venv/bin/python scripts/screenshot_train_widget.py \
        [--out docs/images/widget_train.png] [--steps 400] [--size 1500x900]

The data are the Cell Tracking Challenge Fluo-N2DL-HeLa sequence 02, frames 0-3 (a 256x320 crop)
with their ERR_SEG labels (fetched with `zfdiffusion fetch-data --dataset hela` if missing). The dock
trains a small U-Net in a separate process (about 4 minutes on a CPU for 400 steps) into a
temporary ZFDIFFUSION_HOME; the screenshot shows the loss plot and the last checkpoint's preview.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _screenshot import ROOT, open_viewer, save_screenshot


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "images" / "widget_train.png")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--size", default="1500x900", help="window size WxH")
    a = ap.parse_args()
    home = Path(tempfile.mkdtemp(prefix="zfdiffusion-train-shot-"))
    os.environ["ZFDIFFUSION_HOME"] = str(home)
    import numpy as np
    import tifffile

    from napari_zfdiffusion.core.fetch import data_dir, fetch
    from napari_zfdiffusion.widgets.train import TrainWidget

    d = data_dir() / "hela"
    if not (d / "Fluo_Hela_02_img.tif").is_file():
        fetch("hela")
    img = tifffile.imread(d / "Fluo_Hela_02_img.tif")[:4, 200:456, 380:700]
    lab = tifffile.imread(d / "Fluo_Hela_02_ERR_SEG.tif")[:4, 200:456, 380:700].astype(np.int32)
    viewer, w, errors = open_viewer(TrainWidget, "Train", a.size)
    il = viewer.add_image(img, name="HeLa frames 0-3", colormap="gray")
    ll = viewer.add_labels(lab, name="HeLa labels", opacity=0.3, visible=False)
    w.image_layer.value, w.labels_layer.value = il, ll
    w.preset.value = "test"
    w.device.value = "cpu"
    w.size.value = "small"
    w.steps.value = a.steps
    w.checkpoint_every.value = max(1, a.steps // 4)
    w.extra.value = "--crop 128"
    w.out.value = home / "models" / "hela-unet"
    t = time.time()
    if not w.start() or not w.wait(1800):
        print("training did not finish:", w.status.value, errors)
        return 1
    print("trained in", round(time.time() - t), "s:", w.status.value)
    preview = viewer.layers["hela-unet preview labels"]
    preview.contour = 1
    viewer.layers.selection.active = preview
    w.show_log.value = False
    save_screenshot(viewer, a.out)
    viewer.close()
    print(f"wrote {a.out}; errors: {errors or 'none'}")
    return 0 if not errors else 1


if __name__ == "__main__":
    raise SystemExit(main())
