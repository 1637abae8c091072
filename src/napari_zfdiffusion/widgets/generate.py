"""Dock widget: generate zebrafish slices with a depth cascade, or upsample an image layer.

The widget gathers parameters, starts a worker (:mod:`._jobs`) and puts results into layers;
all computing is :meth:`Cascade.generate` / :meth:`Cascade.upsample` from the GUI-free core.

Upsample takes the selected Image layer. A 2D layer is upsampled as is. A 3D layer (N, Y, X),
such as a generated stack or a z-stack, gives the plane shown now, or every plane with
"all planes" ticked. A layer made by this plugin (provenance in ``metadata["zfdiffusion"]``) is
taken as already in [0, 1] (no normalisation) at its own depth class; any other layer is
normalised like the training data and upsampled at the widget's depth. "About the model" (:mod:`._about`)
says what the model's cards say, and warns when the selected layer looks unlike its training data
(the field of view it shows, its intensities), also as a notification when it is upsampled.

"Copy CLI command" copies the ``zfdiffusion generate`` command of these settings, "Copy upsample
command" the ``zfdiffusion upsample`` one of the selected layer (:meth:`GenerateSlicesWidget.cli_command`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from magicgui.widgets import CheckBox, ComboBox, FloatSpinBox, Label, PushButton, Slider, SpinBox
from napari.layers import Image
from napari.utils.notifications import show_error

from ..core.errors import UserInputError
from ._about import AboutPanel, layer_warnings
from ._download import ModelDownload
from ._jobs import CascadeJobWidget, cli_line, cli_model, row
from ._layers import (
    PROVENANCE_KEY,
    data_limits,
    generated_provenance,
    layer_geometry,
    layer_image,
    shown_plane,
    unique_name,
)
from ._models import cascade_choices, get_cascade

if TYPE_CHECKING:
    import napari

    from ..core.cascade import Cascade


class GenerateSlicesWidget(CascadeJobWidget):
    """Generate slices at a chosen depth class, and upsample existing images through the cascade.

    Job handling (start, progress, cancel, errors, :meth:`wait`) comes from :class:`JobWidget`.
    """

    GUIDE_SECTION = "generate-slices-in-napari"

    def __init__(self, viewer: napari.viewer.Viewer):
        super().__init__(viewer)
        self._cascade: Cascade | None = None

        self._model_rows(cascade_choices(), "the slice model (a depth cascade): bundled, your own, or downloadable "
                                            "(`zfdiffusion models` lists them)",
                         "a cascade model folder made by `zfdiffusion train cascade`")
        self.download = ModelDownload(self, cascade_choices)  # "Download NAME (SIZE)" for a registry model
        self.depth = Slider(label="depth class", min=0, max=0,
                            tooltip="depth: which plane of the specimen to generate (the line below says where it is)")
        self.depth_meaning = Label(label="plane", value="", tooltip="where this depth class lies in the specimen")
        self.guidance = FloatSpinBox(label="guidance", value=3.0, min=0.0, max=50.0, step=0.5,
                                     tooltip="guidance: how strongly the image follows the chosen depth; 0 ignores "
                                             "it, 1 follows it as trained, 3 is typical, higher is stronger but "
                                             "less varied")
        self.resolution = ComboBox(label="resolution", choices=self._resolutions,
                                   tooltip="the size of the result in pixels: each step up doubles it and takes "
                                           "about 4 times longer (starts at 128 on a CPU, 512 on a GPU)")
        self.n_samples = SpinBox(label="samples", value=1, min=1, max=64,
                                 tooltip="how many slices to make at once (sample i uses seed + i)")
        self._sampler_rows(25, "denoising steps of the first (64 px) stage: more is slower and a little cleaner",
                           "20-25")
        self.sr_steps = SpinBox(label="upscaling steps", value=25, min=1, max=1000,
                                tooltip="denoising steps of each super-resolution stage (128, 256, 512 px): "
                                        "fewer is faster, most of the time goes there")
        seed_row = self._seed_row("seed: the same seed and settings give the same slice; sample i of a batch "
                                  "uses seed + i")
        self.all_planes = CheckBox(text="all planes", value=False,
                                   tooltip="for a stack layer (N, Y, X): upsample every plane instead of the one "
                                           "shown")
        self.generate_button, buttons = self._run_row("Generate", self.generate,
                                                      "generate slices with these settings (in the background)")
        self.upsample_button = PushButton(text="Upsample selected layer",
                                          tooltip="take the selected image layer (a square image, e.g. a 64 px "
                                                  "slice) through the super-resolution stages up to the resolution")
        up_row = row("", self.upsample_button, self.all_planes)
        self.upsample_cli_button = PushButton(text="Copy upsample command",
                                              tooltip="copy the zfdiffusion upsample command that does what "
                                                      "'Upsample selected layer' would do with these settings, for "
                                                      "batch work over folders")
        self.upsample_cli_button.changed.connect(lambda *_: self.copy_cli_command(job="upsample"))
        self.cli_row.append(self.upsample_cli_button)
        self._lay_out([self.model, self.download.button, self.depth, self.depth_meaning, self.guidance,
                       self.resolution, self.n_samples],
                      [self.sampler, self.steps, self.sr_steps, seed_row, self.device, self.device_info,
                       self.model_folder],
                      [buttons, up_row])
        self.about = AboutPanel("the selected layer (to upsample)")
        self.about.install(self.sections)

        self.depth.changed.connect(self._show_depth_meaning)
        self.upsample_button.changed.connect(lambda *_: self.upsample_selected())
        viewer.layers.selection.events.active.connect(self.check_domain)
        self._wire_model()

    # ------------------------------------------------------------ model
    def _load_model_info(self, *_) -> None:
        """Read the chosen model's card (small JSON) to fill depth and resolution; weights load later."""
        cascade = self.download.load_cascade()  # None, without an error, for a model to download
        self.about.show_model(self.model.value, None if cascade is None else cascade.card)
        self.check_domain()
        if cascade is None:
            return
        self.depth.max = cascade.n_classes - 1
        self._show_depth_meaning()
        self.status.value = f"{cascade.name}: {cascade.n_classes} depth classes, up to {cascade.resolutions[-1]}"
        self._set_running(self._job is not None)

    def _show_depth_meaning(self, *_) -> None:
        if self._cascade is not None and self.depth.value < self._cascade.n_classes:
            self.depth_meaning.value = self._cascade.depth_label(self.depth.value)

    def check_domain(self, *_, layer: Image | None = None) -> list[str]:
        """Whether ``layer`` (default: the selected one, what "Upsample selected layer" takes) looks unlike
        the model's training data (field of view, intensities): the warnings, shown in "About the model"."""
        layer = self._viewer.layers.selection.active if layer is None else layer
        card = None if self._cascade is None else self._cascade.card
        warnings = layer_warnings(self._viewer, layer, card, "slices")
        self.about.set_warnings(warnings)
        return warnings

    # ------------------------------------------------------------ parameters
    def params(self) -> dict:
        """The generation parameters as :meth:`Cascade.generate` takes them."""
        return {"depth": int(self.depth.value), "guidance": float(self.guidance.value),
                "resolution": self.resolution.value, "n": int(self.n_samples.value),
                "seed": int(self.seed.value), "sampler": self.sampler.value, "steps": int(self.steps.value),
                "sr_steps": int(self.sr_steps.value)}

    # ------------------------------------------------------------ jobs
    def _set_running(self, running: bool) -> None:
        self.generate_button.enabled = not running and self._cascade is not None
        self.upsample_button.enabled = not running
        self.cancel_button.enabled = running

    def generate(self, **overrides) -> None:
        """Start generating with the widget's parameters (``overrides`` replace some of them)."""
        params = {**self.params(), **overrides}
        model, device = self.model.value, self.device.value

        def job(callback, token):
            return get_cascade(model, device).generate(**params, callback=callback)

        self._start(job, "generating", self._add_layer,
                    self._stage_costs(int(params["resolution"] or 0), params["steps"], params["sr_steps"]))

    def upsample_selected(self) -> None:
        """Start upsampling the selected Image layer (see the module docstring for which planes)."""
        layer = self._viewer.layers.selection.active
        if not isinstance(layer, Image):
            show_error("select an Image layer to upsample (click it in the layer list).")
            return
        try:
            data = layer_image(layer, "upsampling")
        except UserInputError as e:
            show_error(str(e))
            return
        plane = None
        seed = int(self.seed.value)
        if data.ndim == 3 and not self.all_planes.value:
            plane = shown_plane(self._viewer, layer, data)
            data = data[plane]
            name = f"{layer.name} [plane {plane}] {self.resolution.value}px s{seed}"
        else:
            name = f"{layer.name} {self.resolution.value}px s{seed}"
        image = np.asarray(data)
        self.about.notify(layer, self.model.value, self.check_domain(layer=layer))  # once per layer and model
        prov = generated_provenance(layer)
        ours, depth = self._upsample_depth(layer, plane)
        model, device = self.model.value, self.device.value
        kw = {"resolution": self.resolution.value, "seed": seed, "sampler": self.sampler.value,
              "steps": int(self.sr_steps.value), "normalise": not ours}

        def job(callback, token):
            return get_cascade(model, device).upsample(image, depth, callback=callback, **kw)

        def done(result):
            result.provenance["source_layer"] = layer.name
            if ours:
                result.provenance["source"] = prov
            self._add_layer(result, name)

        larger = [r for r in (self._cascade.resolutions if self._cascade else []) if r > image.shape[-1]]
        costs = self._stage_costs(int(kw["resolution"] or 0), 0, kw["steps"], first=larger[0]) if larger else None
        self._start(job, "upsampling", done, costs)

    def _upsample_depth(self, layer: Image, plane: int | None) -> tuple[bool, int]:
        """Whether ``layer`` is a slice or volume this plugin made, and the depth class its upsampling
        uses: its own (that of ``plane`` of a generated volume), else the dock's."""
        prov = generated_provenance(layer)
        ours = prov is not None and ("depth" in prov or "depths" in prov)
        depth = int(self.depth.value)
        if ours and "depth" in prov:
            depth = int(prov["depth"])
        elif ours and plane is not None and plane < len(prov["depths"]):  # one plane of a generated volume
            depth = int(prov["depths"][plane])
        return ours, depth

    # ------------------------------------------------------------ the command line
    def cli_command(self, job: str = "generate") -> str:
        """The command doing what this dock would do now, as one shell line.

        ``job="generate"``: ``zfdiffusion generate`` with the model (its name, or its folder), the device
        (unless auto), depth, guidance, resolution, samples (``--n``), sampler, steps, upscaling steps
        (``--sr-steps``), seed, and ``--out slices.tif``. Everything the dock sets is there.

        ``job="upsample"``: ``zfdiffusion upsample`` of the selected image layer's file (``IMAGE.tif``
        where napari knows none: a note says to save the layer first), at the depth the dock would use
        (a generated layer's own), with the resolution, sampler, upscaling steps (upsample's
        ``--steps``), seed, and ``--out <name>_<R>px.tif``. Left out: the plane shown of a stack
        without "all planes" (the command upsamples every plane of the file: a note says so).
        """
        if self._cascade is None or self.model.value is None:
            raise UserInputError("choose a usable model first (or a model folder).")
        common = [("--model", cli_model(self.model.value)), ("--device", self._cli_device())]
        sampling = [("--resolution", self.resolution.value), ("--sampler", self.sampler.value)]
        seed = ("--seed", int(self.seed.value))
        if job == "generate":
            return cli_line(["generate"], [*common, ("--depth", int(self.depth.value)),
                                           ("--guidance", float(self.guidance.value)), sampling[0],
                                           ("--n", int(self.n_samples.value)), sampling[1],
                                           ("--steps", int(self.steps.value)), ("--sr-steps", int(self.sr_steps.value)),
                                           seed, ("--out", "slices.tif")])
        if job != "upsample":
            raise ValueError(f"no command for job {job!r}: 'generate' or 'upsample'")
        layer = self._viewer.layers.selection.active
        layer = layer if isinstance(layer, Image) else None
        depth = int(self.depth.value)
        if layer is not None:
            plane = None
            try:
                data = layer_image(layer, "upsampling")
            except UserInputError as e:
                self.cli_notes.append(str(e))
            else:
                if data.ndim == 3 and not self.all_planes.value:
                    plane = shown_plane(self._viewer, layer, data)
                    self.cli_notes.append(f"the command upsamples every plane of the file, not only plane {plane} "
                                          "shown now")
            depth = self._upsample_depth(layer, plane)[1]
        source = self._cli_input(layer, "IMAGE.tif", "the image to upsample")
        out = f"{Path(source).stem}_{self.resolution.value}px.tif"
        return cli_line(["upsample"], [("", source), *common, ("--depth", depth), *sampling,
                                       ("--steps", int(self.sr_steps.value)), seed, ("--out", out)])

    def _add_layer(self, result, name: str | None = None) -> None:
        """A result as a layer named ``name`` (default: model, depth, resolution, seed), made unique."""
        images = result.images.astype(np.float32, copy=False)
        if len(images) == 1:  # one sample: a 2D layer, shown whatever plane another stack is at
            images = images[0]
        if name is None:
            prov = result.provenance
            seeds = prov.get("seeds") or [prov.get("seed", 0)]
            seed = f"s{seeds[0]}" + (f"-{seeds[-1]}" if len(seeds) > 1 else "")
            name = f"{prov.get('model', 'slices')} d{prov.get('depth')} {prov.get('resolution')}px {seed}"
        # micrometres, when the model knows its pixel size: all resolutions of one field overlay
        geometry = layer_geometry(result.provenance.get("pixel_size_um"), images.ndim, z=False)
        layer = self._viewer.add_image(images, name=unique_name(self._viewer, name), colormap="gray",
                                       contrast_limits=data_limits(images),
                                       metadata={PROVENANCE_KEY: result.provenance}, **geometry)
        self.status.value = f"added '{layer.name}'"


__all__ = ["GenerateSlicesWidget"]
