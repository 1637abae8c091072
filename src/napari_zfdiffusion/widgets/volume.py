"""Dock widget: generate a (Z, Y, X) volume plane by plane with a depth cascade.

The widget gathers parameters, starts a worker (:mod:`._jobs`) and fills one layer; all computing
is :meth:`Cascade.generate_volume` from the GUI-free core.

One 3D Image layer "<model> volume d<first>-<last> <R>px s<seed>" of zeros (Z, R, R) is added when a
job starts.
Each plane is sent from the worker thread, as soon as it is done, through a queued signal
(:class:`ItemRelay`): the GUI thread writes it into the layer and moves the viewer to it. At the end
the layer gets the provenance in ``metadata["zfdiffusion"]``. Cancel (or an error) keeps the planes
made so far, in a layer renamed "... (cancelled, k/Z planes)"; with none made, the layer goes.

"Start from layer": the plane shown now of a 2D or (N, Y, X) Image layer becomes the first plane,
and the rest of the volume continues from it. A layer made by this plugin is taken as already in
[0, 1]; any other layer is normalised like the training data. A model trained without
``--continuity`` makes each plane on its own (continuity guidance 0, its control disabled).
"About the model" (:mod:`._about`) says what the model's cards say, and warns when the layer to start
from looks unlike its training data (also as a notification when the volume starts from it).

"Copy CLI command" copies the ``zfdiffusion volume`` command of these settings
(:meth:`GenerateVolumeWidget.cli_command`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from magicgui.widgets import ComboBox, FloatSpinBox, Label, SpinBox
from napari.layers import Image
from napari.utils.notifications import show_error, show_info

from ..core.errors import UserInputError
from ._about import AboutPanel, layer_warnings
from ._download import ModelDownload
from ._jobs import CascadeJobWidget, ItemRelay, cli_line, cli_model
from ._layers import (
    PROVENANCE_KEY,
    data_limits,
    generated_provenance,
    image_layers,
    layer_geometry,
    layer_image,
    shown_plane,
    unique_name,
)
from ._models import cascade_choices, get_cascade

if TYPE_CHECKING:
    import napari

    from ..core.cascade import Cascade

CONTINUITY_TIP = ("continuity: how closely each plane follows the plane above it; 0 makes every plane on "
                  "its own, 1 follows it as trained (typical), higher follows it more closely")
NO_CONTINUITY_TIP = ("this model is not a volume model (trained without --continuity): each plane is made "
                     "on its own (continuity guidance 0). Train one with `zfdiffusion train cascade "
                     "--continuity`.")


@dataclass
class _Run:
    """The volume being made: its layer, its size and how many planes have arrived."""

    layer: Image
    name: str
    n_planes: int
    request: dict
    done: int = 0


class GenerateVolumeWidget(CascadeJobWidget):
    """Generate a volume over a range of depth classes, each plane conditioned on the one above.

    Job handling (start, progress, cancel, errors, :meth:`wait`) comes from :class:`JobWidget`.
    """

    GUIDE_SECTION = "generate-volumes-in-napari"

    def __init__(self, viewer: napari.viewer.Viewer):
        super().__init__(viewer)
        self._cascade: Cascade | None = None
        self._run: _Run | None = None
        self._planes = ItemRelay()  # (run, k, plane) from the worker thread, queued to the GUI thread
        self._planes.item.connect(self._on_plane)

        self._model_rows(cascade_choices(), "the volume model (a depth cascade trained with --continuity): "
                                            "bundled, your own, or downloadable (`zfdiffusion models`)",
                         "a cascade model folder made by `zfdiffusion train cascade`")
        self.download = ModelDownload(self, cascade_choices)  # "Download NAME (SIZE)" for a registry model
        self.first_depth = SpinBox(label="first depth", min=0, max=0,
                                   tooltip="the depth class of the top plane of the volume")
        self.first_meaning = Label(label="", value="", tooltip="where the top plane lies in the specimen")
        self.last_depth = SpinBox(label="last depth", min=0, max=0,
                                  tooltip="the depth class of the bottom plane (one plane per depth class)")
        self.last_meaning = Label(label="", value="", tooltip="where the bottom plane lies in the specimen")
        self.resolution = ComboBox(label="resolution", choices=self._resolutions,
                                   tooltip="the size of each plane in pixels: each step up doubles it and takes "
                                           "about 4 times longer (starts at 128 on a CPU, 512 on a GPU)")
        self.guidance = FloatSpinBox(label="depth guidance", value=3.0, min=0.0, max=50.0, step=0.5,
                                     tooltip="guidance: how strongly each plane follows its depth; 0 ignores it, "
                                             "1 follows it as trained, 3 is typical")
        self.continuity = FloatSpinBox(label="continuity guidance", value=1.0, min=0.0, max=50.0, step=0.25,
                                       tooltip=CONTINUITY_TIP)
        self._sampler_rows(25, "denoising steps of the first (64 px) stage of each plane", "20-25")
        self.sr_steps = SpinBox(label="upscaling steps", value=25, min=1, max=1000,
                                tooltip="denoising steps of each super-resolution stage of each plane: fewer is "
                                        "faster, most of the time goes there")
        seed_row = self._seed_row("seed: the same seed and settings give the same volume")
        self.start_layer = ComboBox(label="start from layer", choices=self._image_layers, nullable=True,
                                    tooltip="none: generate the first plane too. An image layer: the plane it "
                                            "shows now becomes the first plane, and the volume continues from it")
        self.start_layer.null_string = "none"
        self.start_layer.reset_choices()
        self.generate_button, buttons = self._run_row("Generate", self.generate,
                                                      "generate the volume plane by plane (in the background)")
        self._lay_out([self.model, self.download.button, self.first_depth, self.first_meaning, self.last_depth,
                       self.last_meaning, self.resolution, self.guidance, self.continuity, self.start_layer],
                      [self.sampler, self.steps, self.sr_steps, seed_row, self.device, self.device_info,
                       self.model_folder],
                      [buttons])
        self.about = AboutPanel("the layer to start from")
        self.about.install(self.sections)

        self.first_depth.changed.connect(self._on_first_depth)
        self.last_depth.changed.connect(self._on_last_depth)
        self.start_layer.changed.connect(self.check_domain)
        self._wire_model()

    # ------------------------------------------------------------ model
    def _load_model_info(self, *_) -> None:
        """Read the chosen model's cards (small JSON): depth classes, resolutions, volume or not."""
        cascade = self.download.load_cascade()  # None, without an error, for a model to download
        self.about.show_model(self.model.value, None if cascade is None else cascade.card)
        self.check_domain()
        if cascade is None:
            return
        top = cascade.n_classes - 1
        self.first_depth.max = self.last_depth.max = top
        self.first_depth.value, self.last_depth.value = 0, top
        self._show_depth_meaning()
        if cascade.continuity:
            if not self.continuity.enabled:  # was forced to 0 by a model without continuity
                self.continuity.value = 1.0
            self.continuity.enabled = True
            self.continuity.tooltip = CONTINUITY_TIP
            kind = "volume model"
        else:
            self.continuity.value = 0.0
            self.continuity.enabled = False
            self.continuity.tooltip = NO_CONTINUITY_TIP
            kind = "not a volume model: independent planes"
        self.status.value = f"{cascade.name}: {cascade.n_classes} depth classes, up to " \
                            f"{cascade.resolutions[-1]} ({kind})"
        self._set_running(self._job is not None)

    def check_domain(self, *_) -> list[str]:
        """Whether the layer to start from looks unlike the model's training data (field of view,
        intensities): the warnings, shown in "About the model" (none without a layer to start from)."""
        card = None if self._cascade is None else self._cascade.card
        warnings = layer_warnings(self._viewer, self.start_layer.value, card, "slices")
        self.about.set_warnings(warnings)
        return warnings

    def _image_layers(self, *_) -> list[tuple[str, Image]]:
        return image_layers(self._viewer)

    def _on_first_depth(self, *_) -> None:
        self.last_depth.value = max(self.last_depth.value, self.first_depth.value)  # the range goes down
        self._show_depth_meaning()

    def _on_last_depth(self, *_) -> None:
        self.first_depth.value = min(self.first_depth.value, self.last_depth.value)
        self._show_depth_meaning()

    def _show_depth_meaning(self, *_) -> None:
        c = self._cascade
        if c is None:
            return
        for spin, label in ((self.first_depth, self.first_meaning), (self.last_depth, self.last_meaning)):
            if spin.value < c.n_classes:
                label.value = c.depth_label(spin.value)

    # ------------------------------------------------------------ parameters
    def params(self) -> dict:
        """The parameters as :meth:`Cascade.generate_volume` takes them (without the first plane)."""
        return {"depths": tuple(range(int(self.first_depth.value), int(self.last_depth.value) + 1)),
                "guidance": float(self.guidance.value), "continuity_guidance": float(self.continuity.value),
                "resolution": self.resolution.value, "seed": int(self.seed.value), "steps": int(self.steps.value),
                "sr_steps": int(self.sr_steps.value), "sampler": self.sampler.value}

    def _first_plane(self) -> tuple[dict, dict]:
        """The first plane from "start from layer": (arguments for the core, what to record)."""
        layer = self.start_layer.value
        if layer is None:
            return {}, {}
        data = layer_image(layer, "starting a volume")
        index = shown_plane(self._viewer, layer, data) if data.ndim == 3 else None
        plane = np.asarray(data[index] if index is not None else data)
        prov = generated_provenance(layer)
        source = {"source_layer": layer.name, "source_plane": index}
        if prov is not None:
            source["source"] = prov
        return {"first_plane": plane, "first_plane_normalised": prov is not None}, source

    # ------------------------------------------------------------ the command line
    def cli_command(self) -> str:
        """``zfdiffusion volume`` doing what Generate would do now, as one shell line: the model (its name,
        or its folder), the device (unless auto), the depths (first-last), resolution, depth guidance,
        continuity guidance, sampler, steps, upscaling steps (``--sr-steps``), seed, ``--out volume.tif``,
        and with "start from layer" ``--first-plane`` with the layer's file.

        Left out: the plane shown of a stack chosen to start from (``--first-plane`` takes a 2D file:
        the command has ``FIRST_PLANE.tif`` and a note says to save that plane); a layer napari knows no
        file for gives ``FIRST_PLANE.tif`` too, with a note.
        """
        if self._cascade is None or self.model.value is None:
            raise UserInputError("choose a usable model first (or a model folder).")
        first, last = int(self.first_depth.value), int(self.last_depth.value)
        start = self.start_layer.value
        first_plane = None
        if start is not None:
            if start.ndim - int(bool(start.rgb)) == 3:
                try:
                    plane = shown_plane(self._viewer, start, layer_image(start, "starting a volume"))
                except UserInputError as e:
                    plane = None
                    self.cli_notes.append(str(e))
                first_plane = "FIRST_PLANE.tif"
                self.cli_notes.append(f"--first-plane takes a 2D image: save plane {plane} of '{start.name}' alone "
                                      f"and put that file in place of {first_plane}")
            else:
                first_plane = self._cli_input(start, "FIRST_PLANE.tif", "the first plane")
        return cli_line(["volume"], [
            ("--model", cli_model(self.model.value)), ("--device", self._cli_device()),
            ("--depths", f"{first}-{last}" if last > first else str(first)),
            ("--resolution", self.resolution.value), ("--guidance", float(self.guidance.value)),
            ("--continuity-guidance", float(self.continuity.value)), ("--sampler", self.sampler.value),
            ("--steps", int(self.steps.value)), ("--sr-steps", int(self.sr_steps.value)),
            ("--seed", int(self.seed.value)), ("--first-plane", first_plane), ("--out", "volume.tif")])

    # ------------------------------------------------------------ jobs
    def _set_running(self, running: bool) -> None:
        self.generate_button.enabled = not running and self._cascade is not None
        self.cancel_button.enabled = running

    def generate(self, **overrides) -> None:
        """Start a volume with the widget's parameters (``overrides`` replace some of them)."""
        if self._job is not None:
            show_info("a job is running: wait for it or press Cancel.")
            return
        if self._cascade is None:
            show_error("choose a usable model first (or a model folder).")
            return
        params = {**self.params(), **overrides}
        try:
            first, source = self._first_plane()
        except UserInputError as e:
            show_error(str(e))
            return
        params.update(first)
        if first:  # once per layer and model
            self.about.notify(self.start_layer.value, self.model.value, self.check_domain())
        depths = tuple(params["depths"])
        res = int(params["resolution"])
        span = f"d{depths[0]}-{depths[-1]} " if depths else ""
        name = unique_name(self._viewer, f"{self._cascade.name} volume {span}{res}px s{params['seed']}")
        geometry = layer_geometry(self._cascade.pixel_size_um(res, volume=True), 3)  # the true z-step in 3D
        layer = self._viewer.add_image(np.zeros((max(len(depths), 1), res, res), np.float32), name=name,
                                       contrast_limits=(0, 1), colormap="gray", **geometry)
        request = {k: v for k, v in params.items() if k not in ("first_plane", "depths")}
        request.update(depths=list(depths), model=self.model.value, **source)
        run = self._run = _Run(layer, layer.name, len(depths), request)
        model, device = self.model.value, self.device.value
        relay = self._planes

        def job(callback, token):
            return get_cascade(model, device).generate_volume(
                **params, callback=callback, on_plane=lambda k, image: relay.item.emit((run, k, image)))

        planes = len(depths) - (1 if first else 0)
        self._start(job, "generating a volume", self._on_volume,
                    self._stage_costs(res, params["steps"], params["sr_steps"], planes))

    def _on_plane(self, item) -> None:
        """A finished plane (GUI thread): into the layer, and the viewer moves to it."""
        run, k, image = item
        if run is not self._run or run.layer not in self._viewer.layers:
            return  # a plane of an earlier job, or the layer was deleted meanwhile
        layer = run.layer
        layer.data[k] = image
        run.done = max(run.done, k + 1)
        axis = self._viewer.dims.ndim - layer.ndim
        self._viewer.dims.set_point(axis, layer.data_to_world((k, 0, 0))[0])
        layer.contrast_limits = data_limits(layer.data[: run.done])  # from the planes made so far
        layer.refresh()
        self.status.value = f"plane {k + 1}/{run.n_planes} done"

    def _on_volume(self, result) -> None:
        run, self._run = self._run, None
        result.provenance.update({k: v for k, v in run.request.items()
                                  if k.startswith("source") or k == "first_plane_normalised"})
        if run.layer in self._viewer.layers:
            if run.layer.data.shape == result.images.shape:
                np.copyto(run.layer.data, result.images)  # the same planes: no new layer data, no reset
            else:
                run.layer.data = result.images.astype(np.float32, copy=False)
            run.layer.metadata[PROVENANCE_KEY] = result.provenance
            run.layer.contrast_limits = data_limits(run.layer.data)
            run.layer.refresh()
        self.status.value = f"added '{run.layer.name}' ({run.n_planes} planes)"

    def _keep_partial(self, why: str) -> str:
        """After a cancel or an error: keep the planes made so far (or drop an empty layer); a message."""
        run, self._run = self._run, None
        if run is None or run.layer not in self._viewer.layers:
            return "nothing was added"
        if run.done == 0:
            self._viewer.layers.remove(run.layer)
            return "nothing was added"
        run.layer.data = run.layer.data[: run.done]
        run.layer.name = f"{run.name} ({why}, {run.done}/{run.n_planes} planes)"
        run.layer.metadata[PROVENANCE_KEY] = {"kind": "zfdiffusion.cascade", "operation": "volume",
                                              "complete": False, "planes_done": run.done, **run.request}
        return f"kept {run.done}/{run.n_planes} planes in '{run.layer.name}'"

    def _on_cancel(self) -> None:
        kept = self._keep_partial("cancelled")
        self.status.value = f"cancelled: {kept}"
        show_info(f"zfdiffusion: cancelled; {kept}.")

    def _on_error(self, exc: BaseException) -> None:
        kept = self._keep_partial("failed")
        super()._on_error(exc)
        if not kept.startswith("nothing"):
            self.status.value = f"failed: {kept}"


__all__ = ["GenerateVolumeWidget"]
