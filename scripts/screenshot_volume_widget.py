"""Screenshot of napari with the "Generate volume" widget docked, after one volume.

Needs a display with OpenGL; on a headless machine run it under Xvfb::

    xvfb-run -a -s "-screen 0 1600x1000x24" .venv/bin/python scripts/screenshot_volume_widget.py \
        [--model zf-cascade-demo|FOLDER] [--depths 0-4] [--seed 0] [--steps 25] [--resolution 256] [--3d]

A model trained without --continuity is run with continuity guidance 0 (independent planes), as the
widget does. Writes docs/images/widget_volume.png (the whole window) unless --out says otherwise.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _screenshot import ROOT, open_cascade_widget, save_screenshot


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="model name or folder (default: the bundled zf-cascade-demo)")
    ap.add_argument("--depths", default=None, help="first-last depth class, e.g. 0-4 (default: all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--resolution", type=int, default=None, help="default: the model's largest")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--3d", dest="three_d", action="store_true", help="show the volume in 3D (default: the last plane)")
    ap.add_argument("--plane", type=int, default=None, help="show this plane (default: the last one made)")
    ap.add_argument("--size", default="1500x1000", help="window size WxH")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "images" / "widget_volume.png")
    args = ap.parse_args(argv)

    from napari_zfdiffusion.widgets.volume import GenerateVolumeWidget

    opened = open_cascade_widget(GenerateVolumeWidget, "Generate volume", args.size, args.model)
    if isinstance(opened, int):
        return opened
    viewer, widget, errors = opened
    widget.device.value = args.device
    if args.depths:
        first, _, last = args.depths.partition("-")
        widget.last_depth.value = int(last or first)
        widget.first_depth.value = int(first)
    widget.seed.value = args.seed
    widget.steps.value = args.steps
    if args.resolution is not None:
        widget.resolution.value = args.resolution
    widget.generate()
    if not widget.wait(3600) or errors or not len(viewer.layers):
        print(f"generation failed: {errors}", file=sys.stderr)
        return 1
    if args.plane is not None:
        viewer.dims.set_point(0, args.plane)
    viewer.reset_view()
    if args.three_d:  # the volume at its true z-step (the layer's scale), seen from the side
        viewer.dims.ndisplay = 3
        camera = viewer.scene.camera if hasattr(viewer, "scene") else viewer.camera
        camera.angles = (-10, 40, 110)
        camera.zoom *= 0.8
    save_screenshot(viewer, args.out)
    print(f"wrote {args.out} ({viewer.layers[-1].name}, {widget.status.value})")
    viewer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
