"""Screenshot of napari with the "Generate slices" widget docked, after one generation.

Needs a display with OpenGL; on a headless machine run it under Xvfb::

    xvfb-run -a -s "-screen 0 1600x1000x24" .venv/bin/python scripts/screenshot_widget.py \
        [--model zf-cascade-demo|FOLDER] [--depth 2] [--seed 0] [--steps 25] [--resolution 512]

Writes docs/images/widget_generate.png (the whole window) unless --out says otherwise.
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
    ap.add_argument("--depth", type=int, default=None, help="depth class (default: the middle one)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--n", type=int, default=1, help="number of samples")
    ap.add_argument("--resolution", type=int, default=None, help="default: the model's largest")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--size", default="1500x900", help="window size WxH")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "images" / "widget_generate.png")
    args = ap.parse_args(argv)

    from napari_zfdiffusion.widgets.generate import GenerateSlicesWidget

    opened = open_cascade_widget(GenerateSlicesWidget, "Generate slices", args.size, args.model)
    if isinstance(opened, int):
        return opened
    viewer, widget, errors = opened
    widget.device.value = args.device
    n_classes = widget._cascade.n_classes
    widget.depth.value = args.depth if args.depth is not None else n_classes // 2
    widget.seed.value = args.seed
    widget.steps.value = args.steps
    widget.n_samples.value = args.n
    if args.resolution is not None:
        widget.resolution.value = args.resolution
    widget.generate()
    if not widget.wait(3600) or errors or not len(viewer.layers):
        print(f"generation failed: {errors}", file=sys.stderr)
        return 1
    viewer.reset_view()
    save_screenshot(viewer, args.out)
    print(f"wrote {args.out} ({viewer.layers[-1].name}, {widget.status.value})")
    viewer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
