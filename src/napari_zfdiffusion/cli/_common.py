"""What every ``zfdiffusion`` command shares: progress bars, the device and sampling options, the
options of the training commands, and reading the provenance of an input file."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# Light on purpose: building the parser (``--help``, ``--version``, ``models``) must not import torch
# or diffusers; the commands import what they need when they run.
from ..core.choices import DEFAULT_SAMPLER, DEVICE_FORMS, SAMPLERS, check_device

RESOLUTIONS = (64, 128, 256, 512)

# What a slice costs on a CPU (docs/benchmarks.md: the demo cascade, 25 steps a stage, one thread).
CPU_TIME_HINT = "on one CPU thread about 2 s a slice at 64 px, 4 s at 128, 22 s at 256, 2 min at 512"


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` with each option's default, unless its help already names it or there is none to show."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (not action.option_strings or action.default is None or action.default is False
                or action.default == argparse.SUPPRESS or "default" in text.lower()):
            return text
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """The parser of ``zfdiffusion`` and of every subcommand (add_subparsers makes more of its class)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


def add_channel(p: argparse.ArgumentParser) -> None:
    """How to read the input: --channel for multichannel files, --axes for files that do not name theirs."""
    p.add_argument("--channel", type=int, default=None,
                   help="the channel to use when the input has several (axis C of an OME-TIFF or OME-Zarr, 0-based)")
    p.add_argument("--axes", default=None,
                   help="what the input's dimensions are when the file does not say, e.g. TZYX (T: time points "
                        "or specimens, Z: depth, C: channels)")


def device_choice(text: str) -> str:
    """``--device``'s value: auto, cpu, cuda, cuda:N or mps (lower case), or argparse's error naming them."""
    try:
        return check_device(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def batch_choice(text: str) -> int | str:
    """A ``--batch`` value: 'auto' (the command sizes it from the GPU's free memory) or a whole number >= 1."""
    t = str(text).strip().lower()
    if t == "auto":
        return t
    if not t.isdigit() or int(t) < 1:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a whole number of at least 1, got '{text}'")
    return int(t)


def add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", type=device_choice, metavar="{" + ",".join(DEVICE_FORMS) + "}",
                   help="auto = cuda > mps > cpu; cuda:N = the GPU numbered N (0 = the first)")


def add_sampler(p: argparse.ArgumentParser, steps: int) -> None:
    p.add_argument("--sampler", default=DEFAULT_SAMPLER, choices=SAMPLERS,
                   help="DPM-Solver++ (20-25 steps), DDIM, or DDPM (needs many more steps)")
    p.add_argument("--steps", type=int, default=steps, help="sampling steps")


def add_cascade_sampling(p: argparse.ArgumentParser) -> None:
    """The options of every command that samples a depth cascade."""
    p.add_argument("--model", default="zf-cascade-demo", help="bundled model name or model folder")
    add_sampler(p, 25)
    p.add_argument("--sr-steps", type=int, default=None, help="steps for super-resolution stages (default: --steps)")
    p.add_argument("--sr-guidance", type=float, default=1.0, help="guidance in super-resolution stages (1 = none)")
    p.add_argument("--noise-aug", type=float, default=0.1, help="noise level added to low-res inputs (0-1)")
    p.add_argument("--seed", type=int, default=0, help="sample i uses seed + i")
    add_device(p)
    p.add_argument("--resolution", type=int, default=512, choices=RESOLUTIONS,
                   help=f"output side in pixels: stop after the stage that reaches it ({CPU_TIME_HINT}; "
                        "a GPU is much faster)")


def add_training(p: argparse.ArgumentParser, *, steps: int, batch: int, out_help: str = "model folder to create",
                 lr: float = 2e-4, ema_decay: float = 0.999) -> None:
    """The options every ``train`` command shares (what :class:`..core.training.loop.TrainOptions` holds)."""
    p.add_argument("--out", type=Path, required=True, help=out_help)
    p.add_argument("--steps", type=int, default=steps, help="optimiser steps (raise it with --resume to go on)")
    p.add_argument("--batch-size", type=int, default=batch, help="training crops per step, per process")
    p.add_argument("--lr", type=float, default=lr, help="learning rate (AdamW)")
    p.add_argument("--ema-decay", type=float, default=ema_decay,
                   help="moving average of the weights that is exported (0: off)")
    p.add_argument("--checkpoint-every", type=int, default=500, help="steps between checkpoints")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="stop after this many minutes of training (with a checkpoint and the model exported; "
                        "a resumed run counts its earlier minutes)")
    p.add_argument("--credit", default="", help="data credit for the model card")
    p.add_argument("--licence", default="", help="data licence for the model card")
    p.add_argument("--seed", type=int, default=0, help="seed of every random draw (crops, noise)")
    add_device(p)
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    add_channel(p)


def add_patch_training(q: argparse.ArgumentParser, steps: int, batch: int, **kw) -> None:
    """Options of the commands that train on 2D images (and masks): vae, ldm, unet."""
    q.add_argument("--images", nargs="+", required=True,
                   help="2D images or (N, Y, X) stacks: TIFF or PNG, 8/16 bit or float, files or folders")
    q.add_argument("--masks", nargs="+", default=None,
                   help="masks or label images, one per image (sorted order), same shapes")
    add_training(q, steps=steps, batch=batch, **kw)


def training_options(a: argparse.Namespace) -> dict:
    """The shared training options as keyword arguments of a training config."""
    return {"steps": a.steps, "batch_size": a.batch_size, "lr": a.lr, "ema_decay": a.ema_decay,
            "checkpoint_every": a.checkpoint_every, "max_minutes": a.max_minutes, "seed": a.seed,
            "data_credit": a.credit,
            "data_licence": a.licence, "channel": a.channel, "axes": a.axes}


def read_input(path: Path, channel: int | None = None, axes: str | None = None):
    """A small input image (a plane to upsample or to start a volume from) read whole: its planes
    ((Y, X) for one plane, else (N, Y, X)) and its provenance if this plugin wrote it ({} otherwise:
    its values are then normalised like the training data)."""
    import numpy as np

    from ..core.reader import open_image

    src = open_image(path, channel=channel, axes=axes)
    planes = np.asarray(src.planes())
    return (planes[0] if len(planes) == 1 else planes), src.provenance


class TqdmProgress:
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
