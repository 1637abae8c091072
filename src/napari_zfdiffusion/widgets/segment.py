"""Dock widget: segment an Image layer (2D, a (N, Y, X) stack or a time series) with a U-Net, and
the "Segment with zfdiffusion" layer command that opens it for a chosen layer.

The widget gathers parameters, starts a worker (:mod:`._jobs`) and puts results into layers; all
computing is :meth:`Segmenter.segment` from the GUI-free core (tiled, plane by plane; 4D/5D, NaN
and non-numeric layers are refused there with the reason).

Choosing a model reads only its card (small JSON): threshold, seed threshold, tile, overlap and
minimum object size take the model's defaults, and a folder of another kind is answered by a
notification. The weights load in the worker on the first job and stay cached. "About the model"
(:mod:`._about`, collapsed) holds the one-line 'about' summary and what the cards say; above it a warning when the chosen layer
looks unlike the training data (pixel size, intensities, a flat image), also notified once per layer
and model when Segment is pressed.

Results: a Labels layer "<layer> labels" (int32 instance labels, numbered across the stack) with the
source layer's scale and translation, drawn as outlines (contour 0 in the layer controls fills them),
and optionally an Image layer "<layer> probability" (the
foreground probability, float32 in [0, 1]). It is added *hidden*: with additive blending and the
magma colormap it would brighten the whole image and hide the objects; tick its eye to compare it
with the labels when choosing a threshold. Both carry the provenance in ``metadata["zfdiffusion"]``.
With "replace previous result" (on by default) a new run on the same source layer removes the
layers of this dock's previous run on it first, so the new ones take their names; off, the new
ones are added beside them ("<layer> labels 2").

"Copy CLI command" copies the ``zfdiffusion segment`` command of these settings for the chosen
layer's file (:meth:`SegmentWidget.cli_command`).

**Correct and fine-tune** (human in the loop): edit the Labels layer that Segment made (paint,
erase, fill, a new label for a missed object), then press "Fine-tune on my corrections". The planes
you changed (found by the checksums kept with the labels as the model made them) train the chosen
model further (:func:`..core.segment.finetune.fine_tune`: 200 steps by default, optionally with
generated pairs mixed in), into a new model folder in the user models folder; the dock switches to
it and segments the source layer again, as a new layer "<layer> labels (fine-tuned)". Edited
labels are never replaced or removed by the dock.
"""

from __future__ import annotations

import weakref
from pathlib import Path

import numpy as np
from typing import TYPE_CHECKING

from magicgui.widgets import CheckBox, ComboBox, FileEdit, FloatSpinBox, Label, PushButton, SpinBox
from napari.layers import Image, Labels, Layer
from napari.utils.notifications import show_error, show_info
from napari.viewer import Viewer

from ..core.errors import UserInputError
from ..core.segment import Segmenter, describe
from ..core.segment.finetune import FINE_TUNE_STEPS, edited_planes, fine_tune, finetuned_folder, plane_checksums
from ..core.segment.segmenter import KIND, MIN_VOLUME_FRACTION
from ..core.store import model_kind, read_card, resolve_model
from ._about import AboutPanel, layer_warnings
from ._download import ModelDownload
from ._jobs import JobWidget, cli_line, cli_model, cli_value, error_message
from ._layers import PROVENANCE_KEY, image_layers, unique_name
from ._models import get_model
from ._models import model_choices as _choices

if TYPE_CHECKING:
    import napari

DEMO_MODEL = "nuclei-unet-demo"
PLUGIN = "napari-zfdiffusion"
WIDGET_NAME = "Segment"  # the widget's display_name in napari.yaml
COMMAND = "napari-zfdiffusion.segment_layer"
MENU_TITLE = "Segment with zfdiffusion"
DEFAULTS = {"threshold": 0.5, "tile": 256, "overlap": 32, "min_size": 16}  # for a card without them
STACK_CHOICES = [("volume (3D objects)", "volume"), ("planes (each on its own)", "planes")]
TIME_LABELS = ("t", "time", "frame", "frames")
MADE_KEY = "zfdiffusion_made"  # labels.metadata: the checksums of the labels as the model made them
OTHER_KINDS = {
    "cascade": "a zebrafish slice cascade: open it with Plugins > zfdiffusion > Generate slices",
    "latent": "a latent diffusion model (patches): open it with Plugins > zfdiffusion > Generate EM patches",
    "vae": "an autoencoder (encode / decode): open it with Plugins > zfdiffusion > Generate EM patches",
}


def model_choices() -> list[tuple[str, str]]:
    """(label, folder) for each segmentation model; bundled first, the demo first of all."""
    return _choices((KIND,), DEMO_MODEL)


def read_segmentation_card(path: Path) -> dict:
    """The card of a segmentation model folder, or a UserInputError that says what the folder is."""
    kind = model_kind(path)
    if kind in OTHER_KINDS:
        raise UserInputError(f"'{path.name}' is {OTHER_KINDS[kind]}. Here choose a segmentation model "
                             f"(made by `zfdiffusion train unet`, or the bundled '{DEMO_MODEL}').")
    if kind is None:
        raise UserInputError(f"'{path}' is not a model folder (no model.json): choose a folder made by "
                             f"`zfdiffusion train unet`, or the bundled '{DEMO_MODEL}'.")
    return read_card(path, (KIND,))


class SegmentWidget(JobWidget):
    """Segment the chosen Image layer: labels (and optionally the foreground probability) as layers.

    Job handling (start, progress, cancel, errors, :meth:`wait`) comes from :class:`JobWidget`.
    """

    GUIDE_SECTION = "segment-in-napari"

    def __init__(self, viewer: napari.viewer.Viewer):  # this spelling: napari passes the viewer by it
        super().__init__(viewer, label="Segment")
        self._card: dict | None = None
        self._model_error = ""
        self._results: dict[int, tuple[weakref.ref, list[Layer]]] = {}  # id(source) -> (source, its last result)

        self.layer = ComboBox(label="image layer", choices=self._image_layers, nullable=True,
                              tooltip="a 2D image, a (N, Y, X) z-stack or time series (plane by plane), or RGB "
                                      "(made grayscale); follows the layer selected in the layer list")
        self._model_rows(model_choices(), "bundled and user segmentation models (`zfdiffusion models`)",
                         "a folder made by `zfdiffusion train unet`")
        self.download = ModelDownload(self, model_choices)  # "Download NAME (SIZE)" for a registry model
        self.info = Label(label="about", value="", tooltip="what the chosen model was trained on, how well it did "
                                                           "on held-out images, and the object size it learned")
        self.threshold = FloatSpinBox(label="threshold", value=DEFAULTS["threshold"], min=0.01, max=0.99, step=0.05,
                                      tooltip="threshold: how sure the model must be that a pixel belongs to an "
                                              "object; lower gives larger objects and more of the dim ones")
        self.tile = SpinBox(label="tile size", value=DEFAULTS["tile"], min=32, max=4096, step=32,
                            tooltip="the image is processed in square tiles of this size (pixels); larger "
                                    "tiles are faster on a GPU and need more memory")
        self.overlap = SpinBox(label="overlap", value=DEFAULTS["overlap"], min=0, max=2048, step=8,
                               tooltip="pixels shared by neighbouring tiles, blended smoothly (no seams)")
        self.min_size = SpinBox(label="min object size", value=DEFAULTS["min_size"], min=0, max=10_000_000,
                                tooltip="objects smaller than this many pixels are dropped")
        self.use_interior = CheckBox(text="split touching objects (watershed)", value=True,
                                     tooltip="seed a watershed from the predicted object centres or interiors "
                                             "(models trained with a second output); off: connected components")
        self.seed_threshold = FloatSpinBox(
            label="seed threshold", value=DEFAULTS["threshold"], min=0.01, max=1.0, step=0.05,
            tooltip="seed threshold: where the watershed starts an object in the predicted centres (0-1); lower "
                    "joins the pieces of a large textured nucleus, higher splits touching ones. Set from the "
                    "model's card (for a model without one: the threshold)")
        self.join_threshold = FloatSpinBox(
            label="join cores above", value=DEFAULTS["threshold"], min=0.01, max=1.0, step=0.05,
            tooltip="cores of the predicted centres linked at or above this value become one object, so a large "
                    "textured nucleus is not cut into pieces while touching nuclei stay apart. The seed threshold "
                    "or more: no joining. Set from the model's card (tuned with the seed threshold)")
        self.diameter = FloatSpinBox(label="object diameter (px)", value=0, min=0, max=100_000, step=1,
                                     tooltip="the typical diameter of the objects in this image, in pixels: the "
                                             "image is rescaled so that they have the size the model was "
                                             "trained on (see 'About the model'). 0: the image as it is")
        self.auto_diameter = CheckBox(text="estimate the object size (auto)", value=False,
                                      tooltip="measure the objects' size in a first pass and rescale to the "
                                              "model's (as cellpose's diameter estimate)")
        self.stack = ComboBox(label="stack", choices=STACK_CHOICES, value="volume",
                              tooltip="for a stack: 'volume' makes 3D objects (labels linked across "
                                      "neighbouring planes); 'planes' segments each plane on its own (time "
                                      "series). Chosen from the layer's axis labels and scale")
        self.min_volume_fraction = FloatSpinBox(
            label="drop 3D pieces under", value=MIN_VOLUME_FRACTION, min=0.0, max=0.95, step=0.05,
            tooltip="for a volume: 3D objects with fewer voxels than this share of the typical nucleus's are "
                    "dropped after linking (the out-of-focus glow of a nucleus in planes above or below it, "
                    "fragments). 0: keep every object")
        self.add_probability = CheckBox(text="add probability map (hidden)", value=False,
                                        tooltip="also add the foreground probability as a hidden image layer, to "
                                                "compare with the labels when choosing a threshold")
        self.replace = CheckBox(text="replace previous result", value=True,
                                tooltip="a new run on the same layer replaces the labels (and probability) this "
                                        "dock made from it last time; off: they are kept and new ones added")
        self.segment_button, buttons = self._run_row("Segment", self.segment,
                                                     "segment the chosen layer with these settings (in the "
                                                     "background)")
        self.finetune_button = PushButton(text="Fine-tune on my corrections",
                                          tooltip="after correcting the labels Segment made (paint, erase, fill): "
                                                  "train the model further on the planes you changed, save it as a "
                                                  "new model and segment the image again with it")
        self.ft_steps = SpinBox(label="fine-tune steps", value=FINE_TUNE_STEPS, min=5, max=100_000, step=50,
                                tooltip="training steps of 'Fine-tune on my corrections': 200 take a few "
                                        "minutes on a CPU; more adapt further to your images")
        self.ft_extra = FileEdit(label="generated pairs", mode="d", nullable=True,
                                 tooltip="optional: a folder with images/ and masks/ of generated pairs (e.g. "
                                         "from `zfdiffusion em generate --masks-out`) mixed into a quarter of "
                                         "every fine-tuning batch")
        self.finetune_button.changed.connect(lambda *_: self.fine_tune_corrections())
        self._lay_out([self.layer, self.model, self.download.button, self.diameter, self.auto_diameter,
                       self.stack, self.threshold, self.min_size, self.use_interior, self.add_probability,
                       self.replace],
                      [self.tile, self.overlap, self.seed_threshold, self.join_threshold, self.min_volume_fraction,
                       self.device, self.device_info,
                       self.model_folder, self.ft_steps, self.ft_extra],
                      [buttons, self.finetune_button])
        # what the model is (the 'about' line first), and a warning for a layer unlike its training data
        self.about = AboutPanel("the chosen image layer", lead=self.info)
        self.about.install(self.sections)
        self.auto_diameter.changed.connect(lambda v: setattr(self.diameter, "enabled", not v))
        self.layer.changed.connect(self._default_stack)
        self.stack.changed.connect(self._volume_controls)
        for w in (self.layer, self.diameter, self.auto_diameter):
            w.changed.connect(self.check_domain)

        viewer.layers.selection.events.active.connect(self._follow_selection)
        register_layer_context_menu()
        self._follow_selection()
        self._default_stack()
        self._wire_model()

    # ------------------------------------------------------------ model
    @property
    def has_interior(self) -> bool:
        outputs = list(self._card.get("outputs", ())) if self._card is not None else []
        return len(outputs) > 1 and outputs[1] in ("interior", "center")

    def _load_model_info(self, *_) -> None:
        """Read the chosen model's card (small JSON) and take its defaults; weights load on first use."""
        self._card = None
        self._model_error = ""
        if self.download.update():  # a registry model to download: its button, no error
            self.info.value = "not downloaded yet"
            self._model_error = self.download.note
        elif self.model.value is None:
            self.info.value = (f"no model: choose a folder made by `zfdiffusion train unet` (the bundled "
                               f"'{DEMO_MODEL}' is not installed)")
        else:
            try:
                path = resolve_model(self.model.value)
                self._card = read_segmentation_card(path)
            except Exception as e:  # noqa: BLE001 - any bad folder becomes a message
                self.info.value = "model not usable"
                self._model_error = error_message(e)
                show_error(self._model_error)
            else:
                c = self._card
                self.info.value = f"{c.get('name', path.name)}: {describe(c)}"
                self.threshold.value = float(c.get("threshold", DEFAULTS["threshold"]))
                self.tile.value = int(c.get("tile", DEFAULTS["tile"]))
                self.overlap.value = int(c.get("overlap", DEFAULTS["overlap"]))
                self.min_size.value = int(c.get("min_size", DEFAULTS["min_size"]))
                self.seed_threshold.value = self._seed_default()
                self.join_threshold.value = self._join_default()
                self.use_interior.value = self.has_interior
        self.about.show_model(self.model.value, self._card)
        self.check_domain()
        self._set_running(self._job is not None)

    def check_domain(self, *_, layer: Image | None = None) -> list[str]:
        """Whether ``layer`` (default: the chosen one) looks unlike the model's training data: the
        warnings, shown in "About the model" (none with the object diameter set: no pixel-size one)."""
        layer = self.layer.value if layer is None else layer
        rescaled = bool(self.auto_diameter.value) or float(self.diameter.value) > 0
        warnings = layer_warnings(self._viewer, layer, self._card, "segmentation", rescaled=rescaled)
        self.about.set_warnings(warnings)
        return warnings

    # ------------------------------------------------------------ parameters
    def _image_layers(self, *_) -> list[tuple[str, Image]]:
        return image_layers(self._viewer)

    def _follow_selection(self, *_) -> None:
        """The layer to segment follows the Image layer selected in the layer list."""
        self.layer.reset_choices()
        active = self._viewer.layers.selection.active
        if isinstance(active, Image):
            self.layer.value = active

    def _default_stack(self, *_) -> None:
        """For a stack: 'planes' when its first axis is time (by its label), else 'volume'; the choice
        is offered only for stacks. A volume whose z scale is the same as its pixel size (napari's
        default when the file gave none) gets a note on how to set it."""
        layer = self.layer.value
        self.stack.enabled = _is_stack(layer)
        if self.stack.enabled:
            self.stack.value = _default_stack(layer)
        self._volume_controls()

    def _volume_controls(self, *_) -> None:
        """"drop 3D pieces under" applies to a volume only."""
        self.min_volume_fraction.enabled = self.stack_for(self.layer.value) == "volume"

    def stack_for(self, layer: Image) -> str:
        """How ``layer`` is segmented: the choice shown when it is the chosen layer, else its default."""
        if not _is_stack(layer):
            return "planes"
        return self.stack.value if layer is self.layer.value else _default_stack(layer)

    def stack_note(self, layer: Image) -> str | None:
        """A note for a volume without its own z scale (None if it has one or is not a volume)."""
        if self.stack_for(layer) != "volume":
            return None
        z, y = float(layer.scale[0]), float(layer.scale[-1])
        if z == y:
            return (f"layer '{layer.name}' has the same scale along z as in x and y (napari's default when the "
                    "file gives no z-step): planes are linked into 3D objects by their overlap, which assumes an "
                    "object spans several planes. If the planes are far apart, set the z scale (Layer > "
                    "Transform, or the file's metadata) or choose 'planes'")
        return None

    def select_layer(self, layer: Image) -> None:
        self.layer.reset_choices()
        self.layer.value = layer

    def params(self) -> dict:
        """The parameters as :meth:`Segmenter.segment` takes them (the seed threshold only when it is
        not the model's default)."""
        diameter = "auto" if self.auto_diameter.value else (float(self.diameter.value) or None)
        seeds = self._seed_value()
        joins = self._join_value()
        return {"tile": int(self.tile.value), "overlap": int(self.overlap.value),
                "threshold": float(self.threshold.value), "min_size": int(self.min_size.value),
                "use_interior": bool(self.use_interior.value), "diameter": diameter,
                "stack": self.stack_for(self.layer.value),
                **({"min_volume_fraction": float(self.min_volume_fraction.value)}
                   if self.stack_for(self.layer.value) == "volume" else {}),
                **({"seed_threshold": seeds} if seeds is not None else {}),
                **({"join_threshold": joins} if joins is not None else {})}

    def _seed_default(self) -> float:
        """The chosen model's seed threshold: its card's, else its threshold."""
        c = self._card or {}
        return float(c.get("seed_threshold", c.get("threshold", DEFAULTS["threshold"])))

    def _join_default(self) -> float:
        """The chosen model's join threshold: its card's, else its seed threshold (no joining)."""
        c = self._card or {}
        return float(c.get("join_threshold", self._seed_default()))

    def _join_value(self) -> float | None:
        """The join threshold to use: None (the model's default) while the control shows it; else the
        control's value, held at the seed threshold (at or above it: no joining)."""
        v = float(self.join_threshold.value)
        if abs(v - self._join_default()) < 1e-6:
            return None
        return min(v, float(self.seed_threshold.value))

    def _seed_value(self) -> float | None:
        """The seed threshold to use: None (the model's default, which follows the threshold for a card
        without one) while the control shows the model's default."""
        v = float(self.seed_threshold.value)
        return None if abs(v - self._seed_default()) < 1e-6 else v

    # ------------------------------------------------------------ the command line
    def cli_command(self) -> str:
        """``zfdiffusion segment`` doing what Segment would do now, as one shell line: ``--in`` the chosen
        layer's file (``IMAGE.tif`` where napari knows none, with a note to save the layer first), the
        model (its name, or its folder), the device (unless auto), tile, overlap, threshold, min size,
        ``--seed-threshold`` and ``--join-threshold`` when they differ from the model's defaults, ``--no-interior`` when "split
        touching objects" is unticked, the diameter (``auto``, or in pixels; none for 0), ``--stack
        planes|volume`` for a stack (and ``--min-volume-fraction`` for a volume when not the default),
        ``--out <name>_labels.tif`` and, with "add probability map" ticked,
        ``--prob-out <name>_probability.tif``.

        Left out: "replace previous result" (files are written, not layers), the layer's scale (the
        command reads the file's own pixel size), a channel napari split off a file (a note asks for
        ``--channel``), and an RGB layer's conversion to gray.
        """
        if self.model.value is None or self._card is None:
            raise UserInputError(self._model_error or "choose a usable segmentation model first (or a folder "
                                                      "made by `zfdiffusion train unet`).")
        layer = self.layer.value if isinstance(self.layer.value, Image) else None
        source = self._cli_input(layer, "IMAGE.tif", "the image to segment")
        stem = Path(source).stem
        diameter = "auto" if self.auto_diameter.value else (cli_value(float(self.diameter.value))
                                                            if self.diameter.value else None)
        return cli_line(["segment"], [
            ("--model", cli_model(self.model.value)), ("--device", self._cli_device()), ("--in", source),
            ("--out", f"{stem}_labels.tif"),
            ("--prob-out", f"{stem}_probability.tif" if self.add_probability.value else None),
            ("--tile", int(self.tile.value)), ("--overlap", int(self.overlap.value)),
            ("--threshold", float(self.threshold.value)), ("--seed-threshold", self._seed_value()),
            ("--join-threshold", self._join_value()),
            ("--min-size", int(self.min_size.value)), ("--no-interior", not self.use_interior.value),
            ("--diameter", diameter),
            ("--stack", self.stack_for(layer) if _is_stack(layer) else None),
            ("--min-volume-fraction", self._volume_fraction_option(layer))])

    def _volume_fraction_option(self, layer) -> float | None:
        """``--min-volume-fraction`` for a volume whose control differs from the default (else None)."""
        if not _is_stack(layer) or self.stack_for(layer) != "volume":
            return None
        v = float(self.min_volume_fraction.value)
        return None if abs(v - MIN_VOLUME_FRACTION) < 1e-6 else v

    # ------------------------------------------------------------ jobs
    def _set_running(self, running: bool) -> None:
        self.segment_button.enabled = not running and self._card is not None
        self.finetune_button.enabled = not running and self._card is not None
        self.cancel_button.enabled = running
        self.use_interior.enabled = self.seed_threshold.enabled = self.join_threshold.enabled = self.has_interior

    def segment(self, layer: Image | None = None, **overrides) -> None:
        """Start segmenting ``layer`` (default: the chosen one); ``overrides`` replace some parameters."""
        layer = self.layer.value if layer is None else layer
        if not isinstance(layer, Image):
            show_error("choose an Image layer to segment (open an image, or File > Open Sample > zfdiffusion).")
            return
        if self._card is None:
            show_error(self._model_error or "choose a segmentation model first: a folder made by "
                       f"`zfdiffusion train unet` (the bundled '{DEMO_MODEL}' is not installed).")
            return
        params = {**self.params(), "stack": self.stack_for(layer), **overrides}
        self.about.notify(layer, self.model.value, self.check_domain(layer=layer))  # once per layer and model
        note = self.stack_note(layer) if params["stack"] == "volume" else None
        if note:
            show_info(f"zfdiffusion: {note}")
        model, device = self.model.value, self.device.value
        keep = bool(self.add_probability.value)
        data = layer.data[0] if layer.multiscale else layer.data  # full resolution of a multiscale layer
        name = layer.name
        source = f"napari layer '{name}'"

        def job(callback, token):
            seg = get_model(Segmenter, model, device)
            token.check()
            try:
                return seg, seg.segment(data, **params, probability=keep, callback=callback, source=source)
            except UserInputError as e:  # the core speaks of "the image": say which layer
                raise UserInputError(f"layer '{name}': {e}") from None

        def done(out):
            seg, result = out
            self.info.value = f"{seg.name}: {describe(seg)}"
            self._add_result(layer, result, keep)

        self._start(job, f"segmenting '{layer.name}'", done)

    # ------------------------------------------------------------ results
    def _add_result(self, source: Image, result, keep_probability: bool, suffix: str = "") -> None:
        prov = dict(result.provenance, source_layer=source.name)
        earlier = source.metadata.get(PROVENANCE_KEY)
        if isinstance(earlier, dict):  # a layer made by this plugin: keep how it was made
            prov["input_provenance"] = earlier
        meta = {PROVENANCE_KEY: prov}
        place = {"scale": source.scale, "translate": source.translate, "rotate": source.rotate,
                 "shear": source.shear, "units": source.units, "axis_labels": source.axis_labels}
        replaced = self._remove_previous(source) if self.replace.value else 0
        added = []
        if keep_probability:
            added.append(self._viewer.add_image(result.probability,
                                                name=unique_name(self._viewer, f"{source.name} probability"),
                                                colormap="magma", blending="additive", contrast_limits=(0, 1),
                                                visible=False, metadata=meta, **place))
        labels = self._viewer.add_labels(result.labels, name=unique_name(self._viewer, f"{source.name} labels{suffix}"),
                                         metadata={**meta, MADE_KEY: plane_checksums(result.labels)}, **place)
        labels.contour = 1  # outlines, as for generated masks: the image stays visible, so the fit can be judged
        added.append(labels)
        self._results[id(source)] = (weakref.ref(source), list(added))
        layers = self._viewer.layers
        layers.selection.active = labels
        if source in layers:  # the source may have been deleted while the job ran
            for i, layer in enumerate(added):  # just above the source in the layer list, the labels on top
                layers.move(layers.index(layer), layers.index(source) + 1 + i)
            self.select_layer(source)  # a second press segments the source again, not the probability
        for note in result.notices:
            show_info(f"zfdiffusion: {note}")
        shape = result.labels.shape
        planes = "" if result.labels.ndim == 2 else f" in {shape[0]} planes"
        again = " (replacing the previous result)" if replaced else ""
        self.status.value = (f"added '{labels.name}'{again}: {result.n_objects} objects{planes} "
                             f"({prov['labels_from']})")

    def _remove_previous(self, source: Image) -> int:
        """Remove the layers of this dock's previous run on ``source`` that are still open; how many."""
        ref, earlier = self._results.pop(id(source), (None, []))
        if ref is None or ref() is not source:
            return 0
        gone = [layer for layer in earlier if layer in self._viewer.layers]
        edited = [layer for layer in gone if isinstance(layer, Labels) and self.edited(layer)]
        for layer in edited:  # a person's corrections are never thrown away
            show_info(f"zfdiffusion: kept '{layer.name}': you edited it (Fine-tune on my corrections learns from it)")
        gone = [layer for layer in gone if layer not in edited]
        for layer in gone:
            self._viewer.layers.remove(layer)
        return len(gone)


    # ------------------------------------------------------------ correct and fine-tune
    @staticmethod
    def edited(labels: Labels) -> list[int]:
        """The planes of a Labels layer that differ from the labels as the model made them (every plane
        with objects for a layer this dock did not make)."""
        return edited_planes(labels.data, labels.metadata.get(MADE_KEY))

    def corrections_layer(self) -> Labels | None:
        """The Labels layer to learn from: the selected one if it is a Labels layer, else the last labels
        this dock made from the chosen image layer."""
        active = self._viewer.layers.selection.active
        if isinstance(active, Labels):
            return active
        ref, layers = self._results.get(id(self.layer.value), (None, []))
        found = [x for x in layers if isinstance(x, Labels) and x in self._viewer.layers]
        return found[-1] if ref is not None and ref() is self.layer.value and found else None

    def fine_tune_corrections(self, labels: Labels | None = None) -> None:
        """Fine-tune the chosen model on the corrected planes of ``labels`` (default:
        :meth:`corrections_layer`), save it as a new model, choose it, and segment the source again."""
        labels = self.corrections_layer() if labels is None else labels
        if not isinstance(labels, Labels):
            show_error("Fine-tune: segment an image first, correct its labels (paint, erase, fill), and select "
                       "that Labels layer.")
            return
        prov = labels.metadata.get(PROVENANCE_KEY) or {}
        source_name = prov.get("source_layer")
        source = next((x for x in self._viewer.layers if isinstance(x, Image) and x.name == source_name), None)
        if source is None and isinstance(self.layer.value, Image) and self.layer.value.data.shape[-2:] == \
                labels.data.shape[-2:]:
            source = self.layer.value  # labels drawn by hand on the chosen image
        if source is None:
            show_error(f"Fine-tune: the image layer that '{labels.name}' belongs to "
                       f"{f'({source_name!r}) ' if source_name else ''}is not open: open it, or choose it as "
                       "the image layer.")
            return
        planes = self.edited(labels)
        if not planes:
            show_error(f"Fine-tune: '{labels.name}' has no corrections yet. Edit it first (paint a missed object "
                       "with a new label, erase a false one, fix outlines), then press Fine-tune again.")
            return
        if self._card is None:
            show_error(self._model_error or "choose a segmentation model to fine-tune first.")
            return
        from ..core.segment.segmenter import as_planes

        try:
            image_planes = as_planes(source.data[0] if source.multiscale else source.data, f"layer '{source.name}'")[0]
        except UserInputError as e:
            show_error(str(e))
            return
        lab = labels.data if labels.data.ndim == 3 else labels.data[None]
        if image_planes.shape != lab.shape:
            show_error(f"Fine-tune: '{labels.name}' is {lab.shape} but its image '{source.name}' is "
                       f"{image_planes.shape} (as planes): they must match.")
            return
        images = [np.asarray(image_planes[k]) for k in planes]
        corrected = [np.asarray(lab[k]).astype(np.int32) for k in planes]
        model, device, steps = self.model.value, self.device.value, int(self.ft_steps.value)
        extra = self.ft_extra.value
        extra = Path(extra) if extra is not None and str(extra) not in ("", ".") else None
        extra_kw = ({"extra_images": [extra / "images"], "extra_masks": [extra / "masks"]}
                    if extra is not None else {})
        out = finetuned_folder(resolve_model(model).name)
        params = {**self.params(), "stack": self.stack_for(source)}
        data = source.data[0] if source.multiscale else source.data
        credit = f"{len(planes)} corrected plane(s) of napari layer '{source.name}'"

        def job(callback, token):
            try:
                fine_tune(model, images, corrected, out, steps=steps, device=device, callback=callback,
                          credit=credit, **extra_kw)
                token.check()
                seg = Segmenter.load(out, device)
                return seg, seg.segment(data, **params, probability=False, callback=callback,
                                        source=f"napari layer '{source.name}'")
            except Exception:  # Cancelled too
                if not (out / "model.json").is_file():  # nothing usable was made: leave nothing behind
                    import shutil

                    shutil.rmtree(out, ignore_errors=True)
                raise

        def done(result):
            seg, res = result
            value = str(out)
            if value not in [v for _, v in self._models]:
                self._models.append((f"{out.name} (fine-tuned)", value))
                self.model.reset_choices()
            self.model.value = value
            self._add_result(source, res, False, suffix=" (fine-tuned)")
            self.status.value = (f"fine-tuned on {len(planes)} corrected plane(s) -> model '{out.name}'; "
                                 + self.status.value)

        self._start(job, f"fine-tuning on {len(planes)} corrected plane(s) of '{labels.name}'", done)


def _is_stack(layer) -> bool:
    return isinstance(layer, Image) and layer.ndim - int(bool(layer.rgb)) == 3


def _default_stack(layer: Image) -> str:
    """'planes' when the stack's first axis is time (by its label), else 'volume'."""
    first = str(layer.axis_labels[0]).lower() if getattr(layer, "axis_labels", None) else ""
    return "planes" if first in TIME_LABELS else "volume"


# ---------------------------------------------------------------- the layer command
def _unwrap(obj):
    """The object behind napari's PublicOnlyProxy (what commands from menus receive)."""
    return getattr(obj, "__wrapped__", obj)


def open_segment_widget(viewer: Viewer) -> SegmentWidget:
    """The Segment widget docked in ``viewer`` (docked now if it is not yet), shown and raised."""
    viewer = _unwrap(viewer)
    widget = next((_unwrap(w) for w in viewer.window.dock_widgets.values()
                   if isinstance(_unwrap(w), SegmentWidget)), None)
    if widget is None:
        _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, WIDGET_NAME)
    dock = widget.native.parent()
    if dock is not None:
        dock.show()
        dock.raise_()
    return widget


def segment_layer(viewer: Viewer, layer: Layer | None = None) -> None:
    """The layer command "Segment with zfdiffusion": open the Segment widget with ``layer`` chosen.

    It does not start a run: the model and its parameters are checked first, then Segment is
    pressed (a large stack takes minutes on a CPU).
    """
    viewer = _unwrap(viewer)
    layer = _unwrap(layer) if layer is not None else viewer.layers.selection.active
    if not isinstance(layer, Image):
        show_error("Segment with zfdiffusion: select an Image layer first (2D, a z-stack or a time series).")
        return
    widget = open_segment_widget(viewer)
    widget.select_layer(layer)


def register_layer_context_menu() -> bool:
    """Put "Segment with zfdiffusion" into the layer list's right-click menu; True if it is there.

    napari 0.9 lets plugin manifests contribute to the Layers menu (napari.yaml puts the command in
    Layers > Segment) but no longer to the layer list's context menu ("napari/layers/context" is
    dropped silently). So the item is added through napari's app-model once this module runs (when
    a zfdiffusion widget opens); on napari versions that honour the manifest entry it is there
    already and is not added twice. Private napari API: any failure leaves the menu as it is.
    """
    try:
        from app_model.expressions import parse_expression
        from app_model.types import CommandRule, MenuItem
        from napari._app_model import get_app_model
        from napari._app_model.constants import MenuId

        app = get_app_model()
        menu = MenuId.LAYERLIST_CONTEXT
        if any(getattr(getattr(item, "command", None), "id", None) == COMMAND for item in app.menus.get_menu(menu)):
            return True
        if COMMAND not in app.commands:  # the plugin is not registered with napari (e.g. disabled)
            return False
        app.menus.append_menu_items([(menu, MenuItem(
            command=CommandRule(id=COMMAND, title=MENU_TITLE), when=parse_expression("active_layer_type == 'image'"),
            group="8_zfdiffusion"))])
        return True
    except Exception:  # noqa: BLE001 - a convenience only; the Layers menu entry is the documented way
        return False


__all__ = ["SegmentWidget", "model_choices", "open_segment_widget", "register_layer_context_menu",
           "segment_layer"]
