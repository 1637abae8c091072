"""``zfdiffusion generate | upsample | volume | dataset | train cascade``: the depth cascade."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..core.choices import CASCADE_DEFAULTS, CASCADE_PRESETS, cascade_training_options
from ._common import (
    CPU_TIME_HINT,
    TqdmProgress,
    add_cascade_sampling,
    add_channel,
    add_training,
    read_input,
    training_options,
)


def cmd_generate(a) -> int:
    from ..core.cascade import Cascade
    from ..core.io import check_writable, write_png_preview, write_tiff

    out = check_writable(a.out)
    if a.preview:
        check_writable(a.preview)
    cas = Cascade.load(a.model, a.device)
    res = cas.generate(a.depth, guidance=a.guidance, resolution=a.resolution, n=a.n, seed=a.seed,
                       sampler=a.sampler, steps=a.steps, sr_steps=a.sr_steps, sr_guidance=a.sr_guidance,
                       noise_aug=a.noise_aug, callback=TqdmProgress(a.quiet))
    write_tiff(out, res.images, res.provenance)
    print(f"wrote {out} {res.images.shape} float32 in [0, 1] (depth {a.depth}: {res.provenance['depth_label']})")
    if a.preview:
        prev = write_png_preview(a.preview, res.images)
        print(f"wrote preview {prev}")
    return 0


def cmd_upsample(a) -> int:
    from ..core.cascade import Cascade
    from ..core.errors import UserInputError
    from ..core.io import check_writable, write_tiff

    out = check_writable(a.out)
    img, prov = read_input(a.input, a.channel, a.axes)
    depth = a.depth if a.depth is not None else prov.get("depth")
    if depth is None:
        raise UserInputError("the image carries no depth: pass --depth D.")
    cas = Cascade.load(a.model, a.device)
    res = cas.upsample(img, depth, resolution=a.resolution, seed=a.seed, sampler=a.sampler, steps=a.steps,
                       sr_guidance=a.sr_guidance, noise_aug=a.noise_aug, normalise=not prov,
                       callback=TqdmProgress(a.quiet))
    res.provenance["input"] = str(a.input)
    write_tiff(out, res.images, res.provenance)
    print(f"wrote {out} {res.images.shape}")
    return 0


def cmd_volume(a) -> int:
    from ..core.cascade import Cascade
    from ..core.io import check_writable, write_png_preview, write_tiff

    out = check_writable(a.out)
    if a.preview:
        check_writable(a.preview)
    first, ours = None, False
    if a.first_plane is not None:
        first, prov = read_input(a.first_plane, a.channel, a.axes)
        ours = bool(prov)
    cas = Cascade.load(a.model, a.device)
    res = cas.generate_volume(a.depths, guidance=a.guidance, continuity_guidance=a.continuity_guidance,
                              resolution=a.resolution, seed=a.seed, first_plane=first, first_plane_normalised=ours,
                              sampler=a.sampler, steps=a.steps, sr_steps=a.sr_steps, sr_guidance=a.sr_guidance,
                              noise_aug=a.noise_aug, callback=TqdmProgress(a.quiet))
    if a.first_plane is not None:
        res.provenance["first_plane"] = str(a.first_plane)
    write_tiff(out, res.images, res.provenance)
    print(f"wrote {out} {res.images.shape} (Z, Y, X) float32 in [0, 1], depths {res.provenance['depths']}")
    if a.preview:
        print(f"wrote preview {write_png_preview(a.preview, res.images)}")
    return 0


def cmd_dataset(a) -> int:
    import os

    from ..core.cascade import Cascade
    from ..core.cascade.dataset import SliceSpec, VolumeSpec, make_items
    from ..core.cascade.depths import parse_depths
    from ..core.device import resolve_device
    from ..core.errors import UserInputError

    if (a.per_depth is None) == (a.n_volumes is None):
        raise UserInputError("give either --per-depth N (slices) or --n-volumes N (volumes).")
    count = a.per_depth if a.per_depth is not None else a.n_volumes
    if count < 1:
        raise UserInputError(f"--{'per-depth' if a.per_depth is not None else 'n-volumes'} must be at least 1, "
                             f"got {count}.")
    device = resolve_device(a.device)
    if device.type == "cuda" and "LOCAL_RANK" in os.environ:  # torchrun: one GPU per process
        device = f"cuda:{os.environ['LOCAL_RANK']}"
    cas = Cascade.load(a.model, device)
    resolution = cas.check_resolution(a.resolution)
    common = dict(model=cas.name, seed=a.seed, resolution=resolution, guidance=a.guidance, steps=a.steps,
                  sr_steps=a.sr_steps, sampler=a.sampler, sr_guidance=a.sr_guidance, noise_aug=a.noise_aug,
                  format=a.format)
    if a.per_depth is not None:
        spec = SliceSpec(depths=parse_depths(a.depths, cas.n_classes), n_per_depth=a.per_depth, **common)
    else:
        if a.continuity_guidance != 0 and not cas.continuity:
            raise UserInputError(f"'{cas.name}' is not a volume model: use --continuity-guidance 0 for "
                                 "independent planes, or train one with `train cascade --continuity`.")
        spec = VolumeSpec(depths=parse_depths(a.depths, cas.n_classes, consecutive=True), n_volumes=a.n_volumes,
                          continuity_guidance=a.continuity_guidance, **common)
    s = make_items(cas, spec, a.out, show_progress=not a.quiet)
    rate = f", {s['items_per_s']} items/s" if s["items_per_s"] else ""
    print(f"rank {s['rank']}/{s['world']}: made {s['made']} of its {s['mine']} items in {s['seconds']} s{rate}; "
          f"data set {'complete' if s['complete'] else 'not complete yet'} ({s['total']} items) in {a.out}")
    return 0


def cmd_train_cascade(a) -> int:
    from ..core.cascade.train import STAGES, TrainConfig, train_stage

    stages = list(STAGES) if a.stage == "all" else [a.stage]
    for st in stages:
        opts = training_options(a)
        given = {"size": a.size, "warmup": a.warmup,
                 **{k: opts[k] for k in ("lr", "batch_size", "steps", "max_minutes")}}
        opts.update(cascade_training_options(a.preset, st, given))
        cfg = TrainConfig(stage=st, loss=a.loss, p_uncond=a.p_uncond, crop=a.crop,
                          depth_classes=a.depth_classes, z_step_um=a.z_step_um, depth_bin_um=a.depth_bin_um,
                          continuity=a.continuity, p_noprev=a.p_noprev, init_from=a.init_from, retarget=a.retarget,
                          preset=a.preset, **opts)
        summary = train_stage(a.data, a.out, cfg, device=a.device, resume=a.resume, show_progress=not a.quiet)
        if summary["rank"] == 0:
            print(f"trained {st}: {summary['steps']} steps, loss {summary['loss']:.4f}, {summary['seconds']} s "
                  f"-> {summary['model']}")
    return 0


def add_commands(sub, train: argparse._SubParsersAction) -> None:
    """The cascade's commands, and ``train cascade``."""
    g = sub.add_parser("generate", help="generate depth slices into a (N, Y, X) TIFF",
                       description="Generate depth slices with a cascade: the base stage at 64 px, then the "
                                   f"super-resolution stages up to --resolution ({CPU_TIME_HINT}).")
    add_cascade_sampling(g)
    g.add_argument("--depth", type=int, required=True,
                   help="depth class: 0 to K-1 (`zfdiffusion models NAME` lists each class and what it means)")
    g.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance (0 uncond, 1 cond)")
    g.add_argument("--n", type=int, default=1, help="number of samples")
    g.add_argument("--out", type=Path, required=True, help="output TIFF")
    g.add_argument("--preview", type=Path, default=None, help="also write a PNG preview here")
    g.set_defaults(func=cmd_generate)

    u = sub.add_parser("upsample", help="take a 2D image through the remaining cascade stages",
                       description="Take a square 2D image (e.g. a 64 px slice from `generate --resolution 64`) "
                                   "through the remaining super-resolution stages up to --resolution.")
    add_cascade_sampling(u)
    u.add_argument("input", type=Path, help="2D image file (TIFF or PNG), square")
    u.add_argument("--depth", type=int, default=None, help="depth class (default: from the file's provenance)")
    u.add_argument("--out", type=Path, required=True, help="output TIFF")
    add_channel(u)
    u.set_defaults(func=cmd_upsample)

    ds = sub.add_parser("dataset", help="fill a folder with generated slices: resumable, parallel under torchrun")
    add_cascade_sampling(ds)
    ds.add_argument("--depths", default="all",
                    help="depth classes: 0-4, 1,3,5 or all (default); for volumes a range top to bottom")
    ds.add_argument("--per-depth", type=int, default=None,
                    help="slices per depth (slice j has seed SEED + j); not --n: torchrun would take that for itself")
    ds.add_argument("--n-volumes", type=int, default=None,
                    help="volumes instead of slices (volume j is `zfdiffusion volume --seed SEED+j`)")
    ds.add_argument("--guidance", type=float, default=3.0, help="depth guidance (0 uncond, 1 cond)")
    ds.add_argument("--continuity-guidance", type=float, default=1.0,
                    help="volumes: weight of the plane above (0 = independent planes, 1 = as trained)")
    ds.add_argument("--out", type=Path, required=True, help="data set folder (one file per item + manifest)")
    ds.add_argument("--format", default="tiff", choices=("tiff", "zarr"),
                    help="one TIFF per item (default) or one OME-Zarr image per item (napari and training read both)")
    ds.set_defaults(func=cmd_dataset)

    v = sub.add_parser("volume", help="generate a (Z, Y, X) volume whose planes follow each other",
                       description="Generate a (Z, Y, X) volume plane by plane, each conditioned on the plane above; "
                                   f"a plane costs about what a slice does ({CPU_TIME_HINT}).")
    add_cascade_sampling(v)
    v.add_argument("--depths", default="all", help="consecutive depth classes, top to bottom: 0-4 or all (default)")
    v.add_argument("--guidance", type=float, default=3.0, help="depth guidance (0 uncond, 1 cond)")
    v.add_argument("--continuity-guidance", type=float, default=1.0,
                   help="weight of the plane above (0 = planes made independently, 1 = as trained, >1 = stronger)")
    v.add_argument("--first-plane", type=Path, default=None,
                   help="start from this real 2D plane (square TIFF/PNG, at least --resolution on a side)")
    v.add_argument("--out", type=Path, required=True, help="output (Z, Y, X) TIFF")
    v.add_argument("--preview", type=Path, default=None, help="also write a PNG of the planes side by side")
    add_channel(v)
    v.set_defaults(func=cmd_volume)

    c = train.add_parser("cascade", help="train the depth cascade on (Z, Y, X) TIFF stacks")
    c.add_argument("--data", nargs="+", required=True, help="folder(s) or TIFF files, one stack per specimen")
    add_training(c, steps=20000, batch=16, out_help="model folder to create or extend")
    c.add_argument("--preset", default=None, choices=tuple(CASCADE_PRESETS),
                   help="quick: the best model a CPU makes in about an hour (small network, lr 1e-3, the base "
                        "stage stops after 60 minutes of training, each super-resolution stage after 20); "
                        "full: for a GPU (base network, batch 64, 40000 steps). Options given on the command "
                        "line win over the preset's")
    c.add_argument("--stage", default="base", choices=("base", "sr128", "sr256", "sr512", "all"),
                   help="the stage to train (all: the four in a row)")
    c.add_argument("--size", default=None, choices=("tiny", "small", "base"),
                   help="network size: tiny (tests), small (CPU), base (GPU) (default: small, or the preset's)")
    c.add_argument("--loss", default="v", choices=("l1", "l2", "v"),
                   help="v: v-prediction (default; stable with the cosine schedule); l1 on the noise as in the "
                        "original work; l2. With --init-from it must train what the parent stage predicts (v for "
                        "a parent trained with the default; l1 or l2 for an epsilon parent), unless --retarget")
    c.add_argument("--p-uncond", type=float, default=0.15, help="probability of dropping the depth condition")
    c.add_argument("--continuity", action="store_true",
                   help="volume model: also condition each plane on the plane above it (see `zfdiffusion volume`)")
    c.add_argument("--p-noprev", type=float, default=0.2,
                   help="with --continuity: probability of dropping the previous plane (for continuity guidance)")
    c.add_argument("--init-from", default=None,
                   help="start from this cascade's stage (model name or folder) instead of random weights")
    c.add_argument("--retarget", action="store_true",
                   help="with --init-from: allow a different prediction target than the parent's (e.g. epsilon -> v)")
    c.add_argument("--warmup", type=int, default=None, help="learning-rate warm-up steps (default: 200, or the "
                                                           "preset's)")
    c.add_argument("--crop", type=int, default=None, help="crop side for super-resolution stages")
    c.add_argument("--depth-classes", type=int, default=None, help="K depth bins (default: one per plane)")
    c.add_argument("--z-step-um", type=float, default=None,
                   help="plane spacing in micrometres, for files that carry none (OME/ImageJ files say it)")
    c.add_argument("--depth-bin-um", type=float, default=None,
                   help="depth classes as bins of this many micrometres from the top plane: stacks with other "
                        "numbers of planes or z-steps train together")
    # the options a preset sets: None unless given, resolved per stage by cascade_training_options
    c.set_defaults(func=cmd_train_cascade, steps=None, batch_size=None, lr=None)
    for action in c._actions:
        if action.dest in ("steps", "batch_size", "lr"):
            action.help += f" (default: {CASCADE_DEFAULTS[action.dest]:g}, or the preset's)"
        elif action.dest == "max_minutes":
            action.help += " (default: none, or the preset's)"
