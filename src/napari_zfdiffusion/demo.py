"""`make demo`: napari with the slice, volume and EM-patch generators and the Segment widget docked
(four tabs) and the demo models loaded, or, where no display works, the CLI writing a 512x512 slice,
a 5-plane volume at 128x128, nuclei patches with their masks, PNG previews, and the HeLa sample with
its U-Net labels into outputs/.

Set ZFDIFFUSION_DEMO_HEADLESS=1 to force the command-line path.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

DEMO_MODEL = "zf-cascade-demo"


def display_works() -> bool:
    """True when a Qt application can start here (checked in a subprocess: Qt aborts without a display)."""
    if os.environ.get("ZFDIFFUSION_DEMO_HEADLESS") or os.environ.get("CI"):
        return False
    if not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY") or sys.platform in ("darwin", "win32")):
        return False
    probe = "from qtpy.QtWidgets import QApplication; QApplication([])"
    try:
        return subprocess.run([sys.executable, "-c", probe], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def run_gui() -> int:
    import napari
    from qtpy.QtWidgets import QApplication

    from .widgets.em import GenerateEMWidget
    from .widgets.generate import GenerateSlicesWidget
    from .widgets.segment import SegmentWidget
    from .widgets.volume import GenerateVolumeWidget

    viewer = napari.Viewer(title="napari-zfdiffusion demo")
    em = viewer.window.add_dock_widget(GenerateEMWidget(viewer), name="Generate EM patches", area="right")
    seg = viewer.window.add_dock_widget(SegmentWidget(viewer), name="Segment", area="right")
    volume = viewer.window.add_dock_widget(GenerateVolumeWidget(viewer), name="Generate volume", area="right")
    slices = viewer.window.add_dock_widget(GenerateSlicesWidget(viewer), name="Generate slices", area="right")
    try:  # four tabs, "Generate slices" in front (Qt's own call on napari's main window)
        viewer.window._qt_window.tabifyDockWidget(em, seg)
        viewer.window._qt_window.tabifyDockWidget(seg, volume)
        viewer.window._qt_window.tabifyDockWidget(volume, slices)
        QApplication.processEvents()  # the tab bar exists only after a layout pass; then bring one forward
        slices.raise_()
    except AttributeError:
        pass
    napari.run()
    return 0


def run_cli(out_dir: Path = Path("outputs")) -> int:
    from .cli import main

    out_dir.mkdir(parents=True, exist_ok=True)
    tif, png = out_dir / "demo_depth2_seed0.tif", out_dir / "demo_depth2_seed0.png"
    print("no display: generating one 512x512 slice from the command line instead "
          "(depth 2, guidance 3, DPM-Solver++; about a minute on a laptop CPU)")
    rc = main(["generate", "--model", DEMO_MODEL, "--depth", "2", "--guidance", "3", "--resolution", "512",
               "--steps", "25", "--sr-steps", "20", "--seed", "0", "--out", str(tif), "--preview", str(png)])
    if rc != 0:
        return rc
    print(f"\nthe slice:   {tif.resolve()}\nthe preview: {png.resolve()}\n")
    vol, vol_png = out_dir / "demo_volume_seed0.tif", out_dir / "demo_volume_seed0.png"
    print("and a whole volume, depths 0-4 at 128x128, each plane conditioned on the one above (under a minute)")
    rc = main(["volume", "--model", DEMO_MODEL, "--depths", "all", "--resolution", "128", "--guidance", "3",
               "--continuity-guidance", "1", "--seed", "0", "--out", str(vol), "--preview", str(vol_png)])
    if rc != 0:
        return rc
    print(f"\nthe volume:  {vol.resolve()}\nits planes:  {vol_png.resolve()}\n")
    patches, labels, prev = (out_dir / f"demo_nuclei_{k}" for k in ("patches.tif", "labels.tif", "patches.png"))
    print("and four 256x256 nuclei patches with their masks (latent diffusion, 50 steps; seconds)")
    rc = main(["em", "generate", "--model", "nuclei-ldm-demo", "--n", "4", "--steps", "50", "--seed", "0",
               "--out", str(patches), "--masks-out", str(labels), "--preview", str(prev)])
    if rc != 0:
        return rc
    print(f"\nthe patches: {patches.resolve()}\ntheir masks: {labels.resolve()}\nthe preview: {prev.resolve()}\n")
    import tifffile

    from ._sample_data import hela_nuclei

    hela, hela_labels = out_dir / "demo_hela.tif", out_dir / "demo_hela_labels.tif"
    tifffile.imwrite(hela, hela_nuclei()[0][0])
    print("and the real HeLa sample (4 frames) segmented by the U-Net (nuclei-unet-demo; seconds)")
    rc = main(["segment", "--model", "nuclei-unet-demo", "--in", str(hela), "--out", str(hela_labels)])
    if rc == 0:
        print(f"\nthe frames: {hela.resolve()}\ntheir labels: {hela_labels.resolve()}")
    return rc


def main() -> int:
    return run_gui() if display_works() else run_cli()


if __name__ == "__main__":
    sys.exit(main())
