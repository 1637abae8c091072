"""``python -m napari_zfdiffusion.cli``: the ``zfdiffusion`` command (as ``torchrun -m`` starts it)."""

import sys

from . import main

sys.exit(main())
