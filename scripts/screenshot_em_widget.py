"""Screenshot of napari with the "Generate EM patches" widget docked, after one generation.

Needs a display with OpenGL; on a headless machine run it under Xvfb::

    xvfb-run -a -s "-screen 0 1600x1000x24" .venv/bin/python scripts/screenshot_em_widget.py \
        [--model em-ldm-demo|FOLDER] [--n 4] [--seed 0] [--steps 25] [--roundtrip]

With ``--roundtrip`` it also opens the EM sample image and encodes / decodes it (the status then
shows MSE / PSNR / SSIM). Writes docs/images/widget_em.png (the whole window) unless --out says
otherwise.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _screenshot import ROOT, choose_model, open_viewer, save_screenshot


def default_model() -> str | None:
    """The bundled em-ldm-demo, else the first latent model known (`zfdiffusion models`)."""
    from napari_zfdiffusion.core.store import list_models
    from napari_zfdiffusion.widgets.em import DEMO_MODEL

    latent = [m for m in list_models() if m.kind == "latent"]
    for m in latent:
        if m.name == DEMO_MODEL:
            return str(m.path)
    return str(latent[0].path) if latent else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="model name or folder (default: the bundled em-ldm-demo)")
    ap.add_argument("--n", type=int, default=4, help="number of patches")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--roundtrip", action="store_true", help="also encode / decode the EM sample image")
    ap.add_argument("--size", default="1500x900", help="window size WxH")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "images" / "widget_em.png")
    args = ap.parse_args(argv)

    from napari_zfdiffusion.core.store import resolve_model
    from napari_zfdiffusion.widgets.em import GenerateEMWidget

    model = args.model or default_model()
    if model is None:
        print("no latent model found: give --model FOLDER (made by `zfdiffusion train ldm`)", file=sys.stderr)
        return 2
    viewer, widget, errors = open_viewer(GenerateEMWidget, "Generate EM patches", args.size)
    widget.device.value = args.device
    path = resolve_model(model).expanduser().resolve()  # a name of a bundled/user model, or a folder
    choose_model(widget, path)
    if not widget.can_generate:
        print(f"model '{model}' cannot generate patches: {errors or widget.info.value}", file=sys.stderr)
        return 1
    widget.seed.value = args.seed
    widget.steps.value = args.steps
    widget.n_patches.value = args.n
    if args.roundtrip:
        viewer.open_sample("napari-zfdiffusion", "em_islet")
        widget.roundtrip(viewer.layers["EM pancreatic islet"])
        if not widget.wait(3600) or errors:
            print(f"encode / decode failed: {errors}", file=sys.stderr)
            return 1
        figures = widget.status.value
        for layer in list(viewer.layers):
            layer.visible = False  # the patches are what the screenshot shows; the layers stay listed
    widget.generate()
    if not widget.wait(3600) or errors or not len(viewer.layers):
        print(f"generation failed: {errors}", file=sys.stderr)
        return 1
    if args.roundtrip:
        widget.status.value = f"{widget.status.value}. Encode / decode {figures}"
    # the generated patches: the visible image layer the dock named after what the model makes
    # ("nuclei patches ...", "EM patches ...")
    patches = next(layer for layer in viewer.layers
                   if layer.visible and layer._type_string == "image" and " patches " in f"{layer.name} ")
    viewer.layers.selection.active = patches
    viewer.reset_view(layers=[patches])  # the patches, not the larger (hidden) sample image
    save_screenshot(viewer, args.out)
    print(f"wrote {args.out} ({patches.name}, {widget.status.value}; model: {widget.info.value})")
    viewer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
