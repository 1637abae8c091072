"""Dock widget: generate zebrafish slices with a depth cascade, or upsample an image layer.

The widget gathers parameters, starts a worker (:mod:`._jobs`) and puts results into layers;
all computing is :meth:`Cascade.generate` / :meth:`Cascade.upsample` from the GUI-free core.

Upsample takes the selected Image layer. A 2D layer is upsampled as is. A 3D layer (N, Y, X),
such as a generated stack or a z-stack, gives the plane shown now, or every plane with
"all planes" ticked. A layer made by this plugin (provenance in ``metadata["zfdiffusion"]``) is
taken as already in [0, 1] (no normalisation) at its own depth class; any other layer is
normalised like the training data and upsampled at the widget's depth.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from magicgui.widgets import CheckBox, ComboBox, FloatSpinBox, Label, PushButton, Slider, SpinBox
from napari.layers import Image
from napari.utils.notifications import show_error

from ..core.diffusion.sampling import DEFAULT_SAMPLER, SAMPLERS
from ..core.errors import UserInputError
from ._jobs import CascadeJobWidget, row
from ._layers import PROVENANCE_KEY, generated_provenance, layer_image, layer_geometry, shown_plane
from ._models import cascade_choices, get_cascade

if TYPE_CHECKING:
    import napari

    from ..core.cascade import Cascade


class GenerateSlicesWidget(CascadeJobWidget):
    """Generate slices at a chosen depth class, and upsample existing images through the cascade.

    Job handling (start, progress, cancel, errors, :meth:`wait`) comes from :class:`JobWidget`.
    """

    def __init__(self, viewer: napari.viewer.Viewer):
        super().__init__(viewer, labels=True)
        self._cascade: Cascade | None = None

        self._model_rows(cascade_choices(), "bundled and user models (`zfdiffusion models`)",
                         "a cascade model folder made by `zfdiffusion train cascade`")
        self.depth = Slider(label="depth class", min=0, max=0, tooltip="the plane to generate")
        self.depth_meaning = Label(label="plane", value="")
        self.guidance = FloatSpinBox(label="guidance", value=3.0, min=0.0, max=50.0, step=0.5,
                                     tooltip="0 = unconditional, 1 = conditional, >1 = stronger depth")
        self.sampler = ComboBox(label="sampler", choices=list(SAMPLERS), value=DEFAULT_SAMPLER)
        self.steps = SpinBox(label="steps", value=25, min=1, max=1000, tooltip="steps per stage")
        self.resolution = ComboBox(label="resolution", choices=self._resolutions)
        self.n_samples = SpinBox(label="samples", value=1, min=1, max=64)
        seed_row = self._seed_row()
        self.all_planes = CheckBox(text="all planes", value=False,
                                   tooltip="for a (N, Y, X) layer: every plane instead of the one shown")
        self.generate_button, buttons = self._run_row("Generate", self.generate)
        self.upsample_button = PushButton(text="Upsample selected layer")
        self.status = Label(label="status", value="")
        up_row = row("", self.upsample_button, self.all_planes)
        self.extend([self.model, self.model_folder, self.device, self.depth, self.depth_meaning,
                     self.guidance, self.sampler, self.steps, self.resolution, self.n_samples, seed_row,
                     buttons, up_row, self.status])

        self.depth.changed.connect(self._show_depth_meaning)
        self.upsample_button.changed.connect(lambda *_: self.upsample_selected())
        self._wire_model()

    # ------------------------------------------------------------ model
    def _load_model_info(self, *_) -> None:
        """Read the chosen model's card (small JSON) to fill depth and resolution; weights load later."""
        cascade = self._load_cascade()
        if cascade is None:
            return
        self.depth.max = cascade.n_classes - 1
        self._show_depth_meaning()
        self.status.value = f"{cascade.name}: {cascade.n_classes} depth classes, up to {cascade.resolutions[-1]}"
        self._set_running(self._job is not None)

    def _show_depth_meaning(self, *_) -> None:
        if self._cascade is not None and self.depth.value < self._cascade.n_classes:
            self.depth_meaning.value = self._cascade.depth_label(self.depth.value)

    # ------------------------------------------------------------ parameters
    def params(self) -> dict:
        """The generation parameters as :meth:`Cascade.generate` takes them."""
        return {"depth": int(self.depth.value), "guidance": float(self.guidance.value),
                "resolution": self.resolution.value, "n": int(self.n_samples.value),
                "seed": int(self.seed.value), "sampler": self.sampler.value, "steps": int(self.steps.value)}

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

        name = f"depth {params['depth']} seed {params['seed']}"
        self._start(job, "generating", lambda result: self._add_layer(result, name))

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
        if data.ndim == 3 and not self.all_planes.value:
            plane = shown_plane(self._viewer, layer, data)
            data = data[plane]
            name = f"{layer.name} [plane {plane}] x{self.resolution.value}"
        else:
            name = f"{layer.name} x{self.resolution.value}"
        image = np.asarray(data)
        prov = generated_provenance(layer)
        ours = prov is not None and ("depth" in prov or "depths" in prov)
        depth = int(self.depth.value)
        if ours and "depth" in prov:
            depth = int(prov["depth"])
        elif ours and plane is not None and plane < len(prov["depths"]):  # one plane of a generated volume
            depth = int(prov["depths"][plane])
        model, device = self.model.value, self.device.value
        kw = {"resolution": self.resolution.value, "seed": int(self.seed.value), "sampler": self.sampler.value,
              "steps": int(self.steps.value), "normalise": not ours}

        def job(callback, token):
            return get_cascade(model, device).upsample(image, depth, callback=callback, **kw)

        def done(result):
            result.provenance["source_layer"] = layer.name
            if ours:
                result.provenance["source"] = prov
            self._add_layer(result, name)

        self._start(job, "upsampling", done)

    def _add_layer(self, result, name: str) -> None:
        images = result.images.astype(np.float32, copy=False)
        if len(images) == 1:  # one sample: a 2D layer, shown whatever plane another stack is at
            images = images[0]
        # micrometres, when the model knows its pixel size: all resolutions of one field overlay
        geometry = layer_geometry(result.provenance.get("pixel_size_um"), images.ndim, z=False)
        self._viewer.add_image(images, name=name, contrast_limits=(0, 1), colormap="gray",
                               metadata={PROVENANCE_KEY: result.provenance}, **geometry)
        self.status.value = f"added '{name}'"


__all__ = ["GenerateSlicesWidget"]
