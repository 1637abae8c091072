"""``zfdiffusion export bioimageio``: a segmentation model as a bioimage.io model package (.zip) for
Fiji/deepImageJ, ilastik and QuPath. The work is :mod:`..core.segment.bioimageio`'s, imported when the
command runs (building the parser imports neither torch nor bioimageio)."""

from __future__ import annotations

from pathlib import Path


def cmd_export_bioimageio(a) -> int:
    from ..core.segment.bioimageio import check_package, export_bioimageio

    r = export_bioimageio(a.model, a.out, test_image=a.test_image, name=a.name, tags=a.tag)
    print(f"wrote {r.path}: bioimage.io model '{r.name}' (spec 0.5), {len(r.files)} files: {', '.join(r.files)}")
    print(f"input (batch, channel, y, x), y and x of {r.min_size} + n * {r.step} pixels; output halo {r.halo}; "
          f"test input {r.input_shape[-2]}x{r.input_shape[-1]}: torchscript and state-dict weights within "
          f"{max(r.torchscript_max_abs, r.state_dict_max_abs):.1e} of the model's probabilities")
    if not a.test:
        print(f"check it as Fiji, ilastik and QuPath will: `bioimageio test {r.path}` (or rerun with --test)")
        return 0
    summary = check_package(r.path)
    for d in summary.details:
        print(f"  {d.status:7s} {d.name}")
        for e in d.errors:
            print(f"          {str(e.msg)[:300]}")
    print(f"bioimageio.core test: {summary.status}")
    return 0 if summary.status in ("passed", "valid-format") else 1


def add_commands(sub) -> None:
    """``export bioimageio``."""
    ex = sub.add_parser("export", help="export a model for other software (bioimage.io: Fiji, ilastik, QuPath)")
    what = ex.add_subparsers(dest="what", required=True, metavar="FORMAT")
    b = what.add_parser(
        "bioimageio", help="a segmentation U-Net as a bioimage.io model package (.zip)",
        description="Write a segmentation model as a bioimage.io model package (spec 0.5): torchscript and "
                    "pytorch_state_dict weights, the model's normalisation as pre-processing, probabilities "
                    "as output (instance labels stay in the plugin), test tensors, a cover and the model card. "
                    "Needs: pip install napari-zfdiffusion[bioimageio].")
    b.add_argument("--model", default="nuclei-unet-demo", help="bundled model name or segmentation model folder")
    b.add_argument("--out", type=Path, required=True, help="the package to write (.zip)")
    b.add_argument("--test-image", type=Path, default=None,
                   help="TIFF or PNG to make the test tensors and cover from (a centred crop of at most 256x256; "
                        "default: a HeLa frame shipped with the plugin)")
    b.add_argument("--name", default=None, help="the package's name (default: the model's, '(napari-zfdiffusion)')")
    b.add_argument("--tag", action="append", default=None,
                   help="a bioimage.io tag to add, e.g. nuclei or fluorescence-light-microscopy (repeatable)")
    b.add_argument("--test", action="store_true",
                   help="then run bioimageio.core's model test on the package (what the consumers run)")
    b.set_defaults(func=cmd_export_bioimageio)


__all__ = ["add_commands", "cmd_export_bioimageio"]
