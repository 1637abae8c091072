"""``zfdiffusion segment | train unet``: U-Net segmentation of images and stacks of any size."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..core.errors import UserInputError
from ._common import (TqdmProgress, add_channel, add_device, add_patch_training, batch_choice,
                      training_options)


def cmd_train_unet(a) -> int:
    from ..core.segment.train import UnetConfig, train_unet

    cfg = UnetConfig(size=a.size, crop=a.crop, interior=not a.no_interior, extra_fraction=a.extra_fraction,
                     val_fraction=a.val_fraction, tile=a.tile, overlap=a.overlap,
                     intensity_aug=not a.no_intensity_aug, zoom_aug=tuple(a.zoom_aug), blur_aug=a.blur_aug,
                     inner=a.inner, renorm_aug=a.renorm_aug, init_from=a.init_from,
                     **training_options(a))
    s = train_unet(a.images, a.masks, a.out, cfg, extra_images=a.extra_images, extra_masks=a.extra_masks,
                   val_images=a.val_images, val_masks=a.val_masks, device=a.device, resume=a.resume,
                   show_progress=not a.quiet)
    if s["rank"] == 0:
        v = s.get("validation") or {}
        extra = (f", held-out IoU {v['iou']:.3f}, Dice {v['dice']:.3f}, object F1 {v['f1']:.3f}" if v else "")
        print(f"trained U-Net: {s['steps']} steps, loss {s['loss']:.4f}, {s['seconds']} s{extra} -> {s['model']}")
    return 0


def cmd_segment(a) -> int:
    import hashlib

    from ..core.io import check_writable, lock_folder
    from ..core.store import home

    out = check_writable(a.out)
    if a.prob_out:
        check_writable(a.prob_out)
    # one writer per output file; the lock lives in the cache, not beside the user's file
    key = hashlib.sha1(str(out.resolve()).encode()).hexdigest()[:16]
    lock = lock_folder(home() / "locks", "segmentation", f"segment-{key}.lock", target=out)
    try:
        return _segment(a, out)
    finally:
        lock.release()


def _segment(a, out) -> int:
    from contextlib import ExitStack

    import numpy as np

    from ..core.io import TiffMemmap
    from ..core.masks import check_join_threshold, check_min_volume_fraction, check_seed_threshold
    from ..core.reader import open_image
    from ..core.segment import Segmenter
    from ..core.segment.segmenter import as_planes

    check_seed_threshold(a.seed_threshold, "--seed-threshold")  # before the weights load
    check_join_threshold(a.join_threshold, a.seed_threshold or 1.0, "--join-threshold")
    if a.min_volume_fraction is not None:
        check_min_volume_fraction(a.min_volume_fraction, "--min-volume-fraction")
    seg = Segmenter.load(a.model, a.device)
    for key, fallback in (("tile", 256), ("overlap", 32), ("threshold", 0.5), ("min_size", 16)):
        if getattr(a, key) is None:  # as the widget does: the model's own defaults
            setattr(a, key, type(fallback)(seg.card.get(key, fallback)))
    seeds = seg.seed_threshold_for(a.threshold, a.seed_threshold)  # None: the card's, else --threshold
    joins = seg.join_threshold_for(seeds, check_join_threshold(
        a.join_threshold, seeds, f"--join-threshold (at most the seed threshold, {seeds:g})"))
    a.batch = _batch(a, seg)
    src = open_image(a.input, channel=a.channel, axes=a.axes)
    image = src.planes()  # every plane (time points x depth), lazily; the chosen channel
    as_planes(image[:1], a.input.name)  # checks the planes before any output is created
    axes = src.stack_axes()
    all_axes, sizes = src.image_axes()
    outer = [s for ax, s in zip(all_axes, sizes) if ax not in ("Y", "X", "S")]
    mode, depth, notes = _stack_mode(a, all_axes, sizes, src.pixel_um)
    diameter = _diameter(a, src.pixel_um)
    shape = (*outer, *image.shape[1:3])  # the input's shape without channels: (T, Z, Y, X), (Z, Y, X), (Y, X)
    pixel = {ax.lower(): v for ax, v in src.pixel_um.items() if v and (ax != "Z" or "Z" in axes)}
    prov = {"input": str(a.input), "input_provenance": src.provenance or None, "input_axes": src.axes,
            "channel": a.channel, "axes": "".join(ax for ax in src.image_axes()[0] if ax != "S"),
            "pixel_size_um": pixel or None}
    bar = TqdmProgress(a.quiet)
    with ExitStack() as stack:
        labels = stack.enter_context(TiffMemmap(out, shape, np.int32, {**prov, "content": "instance labels"}))
        prob = (stack.enter_context(TiffMemmap(a.prob_out, shape, np.float32,
                                               {**prov, "content": "foreground probability", "labels": str(out)}))
                if a.prob_out else None)
        res = seg.segment(image, tile=a.tile, overlap=a.overlap, threshold=a.threshold, min_size=a.min_size,
                          batch=a.batch, use_interior=not a.no_interior, labels_out=labels, prob_out=prob,
                          probability=False, callback=bar, source=str(a.input), name=a.input.name,
                          diameter=diameter, stack=mode, depth=depth, stitch_iou=a.stitch_iou,
                          **({} if a.min_volume_fraction is None else {"min_volume_fraction": a.min_volume_fraction}),
                          seed_threshold=seeds,
                          join_threshold=seeds if joins is None else joins)  # the seed threshold: off
        # the full provenance is known only now: rewrite the description in place (same length or shorter)
    _write_description(out, {**prov, **res.provenance, "content": "instance labels"})
    if a.prob_out:
        _write_description(a.prob_out, {**prov, **res.provenance, "content": "foreground probability",
                                         "labels": str(out)})
    for note in notes + res.notices:
        print(f"note: {note}")
    seeded = f", seed threshold {seeds:g}" if "seed_threshold" in res.provenance else ""
    seeded += f", cores joined above {joins:g}" if "join_threshold" in res.provenance else ""
    print(f"wrote {out} {shape} int32: {res.provenance['objects']} objects "
          f"({res.provenance['labels_from']}, threshold {a.threshold}{seeded}, min size {a.min_size})")
    if a.prob_out:
        print(f"wrote {a.prob_out} {shape} float32 foreground probability")
    return 0


def _batch(a, seg) -> int:
    """``--batch`` as a number of tiles. 'auto': 4 on a CPU or MPS (as always), and on a CUDA GPU as many
    tiles as fit in half its free memory (less 1 GiB), at most 32. A tile is costed by
    :func:`..core.device.pyramid_bytes` over the U-Net's widths at the tile side: 8 float32 copies of its
    feature maps at every level, about 63 MB for the demo model ('small', widths 16-128) at 256 px, twice
    what its fp16 autocast needs."""
    if a.batch != "auto":
        return a.batch
    from ..core.device import auto_batch, pyramid_bytes

    return auto_batch(seg.device, pyramid_bytes(seg.net.config.channels, max(32, a.tile)), default=4, cap=32)


def _stack_mode(a, axes: str, sizes: tuple, pixel_um: dict) -> tuple[str, int | None, list[str]]:
    """How to segment the input's planes ("planes" or "volume"), the planes per volume, and notes.
    --stack auto: a z-stack (a Z axis) as a volume, a time series or a single plane as planes."""
    has_z = "Z" in axes and dict(zip(axes, sizes))["Z"] > 1
    mode = a.stack if a.stack != "auto" else ("volume" if has_z else "planes")
    if mode == "planes" or not has_z and "T" not in axes:
        return mode, None, []  # (a single plane asked as a volume: the segmenter says why not)
    if not has_z:
        raise UserInputError(f"'{a.input.name}' is a time series (axes {axes}), not a z-stack: its planes are not "
                             "depths of one volume. Segment it with --stack planes, or, if the planes are depths, "
                             "say so with --axes ZYX.")
    depth = dict(zip(axes, sizes))["Z"]
    notes = [f"segmented as a volume: labels linked across neighbouring planes (objects overlapping with IoU >= "
             f"{a.stitch_iou:g}); --stack planes segments each plane on its own"]
    if not pixel_um.get("Z"):
        notes.append("the file gives no z-step: linking assumes an object spans several planes. If the planes are "
                     "far apart compared with the objects, objects split into one per plane; set the z-step in the "
                     "file (Fiji: Image > Properties; ImageJ or OME metadata) or segment with --stack planes")
    elif pixel_um.get("X") and pixel_um["Z"] > 4 * pixel_um["X"]:
        notes.append(f"the z-step ({pixel_um['Z']:g} um) is {pixel_um['Z'] / pixel_um['X']:.0f}x the pixel size: "
                     "small objects may appear in one plane only")
    return "volume", depth, notes


def _diameter(a, pixel_um: dict):
    """The object diameter in pixels (or "auto", or None) from --diameter or --diameter-um."""
    if a.diameter is not None and a.diameter_um is not None:
        raise UserInputError("give --diameter (pixels) or --diameter-um (micrometres), not both.")
    if a.diameter_um is None:
        return a.diameter
    px = a.pixel_size_um or pixel_um.get("X")
    if not px:
        raise UserInputError(f"--diameter-um needs the pixel size, and '{a.input.name}' does not give it: add "
                             "--pixel-size-um, or give the diameter in pixels with --diameter.")
    if a.diameter_um <= 0:
        raise UserInputError(f"--diameter-um must be positive, got {a.diameter_um:g}.")
    return a.diameter_um / px


def _write_description(path, provenance: dict) -> None:
    import json

    import tifffile

    with tifffile.TiffFile(path, mode="r+b") as tf:
        tf.pages[0].tags["ImageDescription"].overwrite(json.dumps(provenance, default=str))


def add_commands(sub, train: argparse._SubParsersAction) -> None:
    """``segment`` and ``train unet``."""
    un = train.add_parser("unet", help="train a segmentation U-Net on images with masks (real, generated or both)")
    add_patch_training(un, 4000, 8, lr=1e-3, ema_decay=0.99)
    un.add_argument("--size", default="small", choices=("tiny", "small", "base"),
                    help="tiny (tests), small (0.66 M parameters; a CPU trains it), base (GPU)")
    un.add_argument("--crop", type=int, default=128, help="side of the random training crops (multiple of 16)")
    un.add_argument("--extra-images", nargs="+", default=None, help="more training images, e.g. generated patches")
    un.add_argument("--extra-masks", nargs="+", default=None, help="their masks (e.g. `em generate --masks-out`)")
    un.add_argument("--extra-fraction", type=float, default=0.5, help="share of each batch from the extra pairs")
    un.add_argument("--val-images", nargs="+", default=None, help="validation images (default: split off --images)")
    un.add_argument("--val-masks", nargs="+", default=None, help="their masks")
    un.add_argument("--val-fraction", type=float, default=0.2, help="share of --images held out for validation")
    un.add_argument("--no-interior", action="store_true",
                    help="predict the foreground only (labels by connected components; touching objects merge)")
    un.add_argument("--inner", choices=("center", "interior"), default="center",
                    help="what the second output learns from label images: center (each object's distance to its "
                         "edge, normalised: touching objects of any size stay apart) or interior (the objects "
                         "without the one-pixel rim where they touch; the models before 0.3)")
    un.add_argument("--init-from", default=None, metavar="MODEL",
                    help="fine-tune: start from this segmentation model (bundled name or folder), e.g. on a few "
                         "corrected planes of your own; its outputs (centre or interior) are kept; a few hundred "
                         "steps with --lr 3e-4 are typical")
    un.add_argument("--renorm-aug", type=float, default=0.25,
                    help="share of crops percentile-normalised on their own (empty fields: no objects); 0: none")
    un.add_argument("--no-intensity-aug", action="store_true",
                    help="no random background offset / contrast / gamma / noise in training (on by default)")
    un.add_argument("--zoom-aug", type=float, nargs=2, default=(0.5, 2.0), metavar=("LOW", "HIGH"),
                    help="random zoom of the training crops (objects of other sizes, as other microscopes give "
                         "them); 1 1: none")
    un.add_argument("--blur-aug", type=float, default=1.5,
                    help="largest Gaussian blur sigma (pixels) put on a third of the crops; 0: none")
    un.add_argument("--tile", type=int, default=256, help="tile side for validation and the card's default")
    un.add_argument("--overlap", type=int, default=32, help="pixels shared by neighbouring tiles (as --tile)")
    un.set_defaults(func=cmd_train_unet)

    sg = sub.add_parser("segment", help="segment a 2D image, a (N, Y, X) stack or a time series with a U-Net")
    sg.add_argument("--model", default="nuclei-unet-demo", help="bundled model name or model folder")
    sg.add_argument("--in", dest="input", type=Path, required=True, help="TIFF or PNG: 2D, or (N, Y, X)")
    sg.add_argument("--out", type=Path, required=True, help="instance labels TIFF (int32, same shape)")
    sg.add_argument("--prob-out", type=Path, default=None, help="also write the foreground probability TIFF")
    sg.add_argument("--tile", type=int, default=None, help="tile side (default: the model card's, 256 for the demo)")
    sg.add_argument("--overlap", type=int, default=None, help="pixels shared by neighbouring tiles (card; 32)")
    sg.add_argument("--threshold", type=float, default=None, help="foreground probability threshold (card; 0.5)")
    sg.add_argument("--seed-threshold", type=float, default=None,
                    help="where the watershed's seeds begin in the centre (or interior) output, in (0, 1]: lower "
                         "joins the pieces of large textured nuclei, higher splits touching ones (default: the "
                         "model card's seed_threshold, tuned on its training data; else --threshold)")
    sg.add_argument("--join-threshold", type=float, default=None,
                    help="cores of the centre output linked at or above this value become one seed, so a large "
                         "textured nucleus is not cut into pieces while touching nuclei stay apart; in (0, seed "
                         "threshold], the seed threshold itself turns joining off (default: the model card's "
                         "join_threshold, tuned with the seed threshold; else off)")
    sg.add_argument("--min-size", type=int, default=None, help="smallest object in pixels (card; 16)")
    sg.add_argument("--batch", type=batch_choice, default="auto",
                    help="tiles per forward pass: a number, or auto = 4 on a CPU, on a GPU as many as fit in half "
                         "its free memory (at most 32)")
    sg.add_argument("--no-interior", action="store_true", help="connected components instead of the watershed")
    sg.add_argument("--diameter", default=None,
                    help="typical object diameter in pixels, or 'auto' (measured in a first pass): the image is "
                         "rescaled so that its objects have the size the model was trained on (see `zfdiffusion "
                         "models NAME`); default: the image as it is")
    sg.add_argument("--diameter-um", type=float, default=None,
                    help="the object diameter in micrometres (with the file's pixel size, or --pixel-size-um)")
    sg.add_argument("--pixel-size-um", type=float, default=None, help="pixel size when the file does not give it")
    sg.add_argument("--stack", choices=("auto", "planes", "volume"), default="auto",
                    help="volume: 3D objects, labels linked across planes; planes: each plane on its own (time "
                         "series); auto: volume for a z-stack, planes otherwise")
    sg.add_argument("--stitch-iou", type=float, default=0.25,
                    help="with --stack volume: the overlap (IoU) at which objects of neighbouring planes are one")
    sg.add_argument("--min-volume-fraction", type=float, default=None,
                    help="with --stack volume: drop 3D objects with fewer voxels than this share of the typical "
                         "object's (out-of-focus glow, fragments that linking leaves); default 0.1; 0 keeps every "
                         "object")
    add_channel(sg)
    add_device(sg)
    sg.set_defaults(func=cmd_segment)
