"""Screenshot of napari with the "Segment" widget docked, after segmenting real HeLa nuclei.

Needs a display with OpenGL; on a headless machine run it under Xvfb::

    xvfb-run -a -s "-screen 0 1600x1000x24" .venv/bin/python scripts/screenshot_segment_widget.py \
        [--model nuclei-unet-demo|FOLDER] [--frames 16-19] [--probability] [--zoom 2]

The image is the Cell Tracking Challenge Fluo-N2DL-HeLa sequence 02 (fetched into the data cache
with `zfdiffusion fetch-data --dataset hela` if it is not there yet), frames 16-19: the frames the
demo U-Net did not train on. The widget segments them as a time series, plane by plane. Writes
docs/images/widget_segment.png (the whole window) unless --out says otherwise.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _screenshot import ROOT, choose_model, open_viewer, save_screenshot

HELA = "Fluo_Hela_02_img.tif"


def load_hela(frames: tuple[int, int]):
    """Frames first..last (inclusive) of the HeLa time series, fetched if missing, and its credit."""
    import tifffile

    from napari_zfdiffusion.core.fetch import SOURCES, data_dir, fetch

    path = data_dir() / "hela" / HELA
    if not path.is_file():
        fetch("hela")
    first, last = frames
    return tifffile.imread(path, key=range(first, last + 1)), SOURCES["hela"].credit


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="nuclei-unet-demo", help="model name or folder (default: nuclei-unet-demo)")
    ap.add_argument("--frames", default="16-19", help="first-last time points of the HeLa sequence (0-19)")
    ap.add_argument("--probability", action="store_true", help="also add the (hidden) probability map")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--zoom", type=float, default=2.0,
                    help="zoom into the centre of the frame (1: whole frame; the outlines are one pixel wide)")
    ap.add_argument("--size", default="1500x900", help="window size WxH")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "images" / "widget_segment.png")
    args = ap.parse_args(argv)

    import numpy as np

    from napari_zfdiffusion.core.errors import UserInputError
    from napari_zfdiffusion.core.store import resolve_model
    from napari_zfdiffusion.widgets.segment import SegmentWidget

    try:
        path = resolve_model(args.model).expanduser().resolve()  # a bundled/user model's name, or a folder
        first, last = (int(v) for v in args.frames.split("-"))
        image, credit = load_hela((first, last))
    except (UserInputError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    viewer, widget, errors = open_viewer(SegmentWidget, "Segment", args.size)
    widget.device.value = args.device
    choose_model(widget, path)
    if errors:
        print(f"model '{args.model}' cannot segment: {errors}", file=sys.stderr)
        return 1
    name = f"HeLa nuclei, frames {first}-{last}"
    # HeLa nuclei range from barely above the background to saturated: gamma 0.5 shows the dim ones too
    layer = viewer.add_image(image, name=name, colormap="gray", metadata={"credit": credit}, gamma=0.5,
                             axis_labels=("t", "y", "x"),  # a time series: the dock segments it plane by plane
                             contrast_limits=tuple(float(v) for v in np.percentile(image, [0.5, 99.8])))
    widget.add_probability.value = args.probability
    widget.segment(layer)
    if not widget.wait(3600) or errors or f"{name} labels" not in viewer.layers:
        print(f"segmentation failed: {errors}", file=sys.stderr)
        return 1
    labels = viewer.layers[f"{name} labels"]
    labels.contour, labels.opacity = 2, 1.0  # outlines that show on the brightest nuclei too
    viewer.layers.selection.active = labels
    viewer.dims.set_current_step(0, 0)
    viewer.reset_view()
    viewer.camera.zoom *= args.zoom
    save_screenshot(viewer, args.out)
    print(f"wrote {args.out} ({widget.status.value}; model: {widget.info.value})")
    viewer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
