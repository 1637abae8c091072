"""Dock widget: generate EM patches (and their masks) with a latent diffusion model, and encode /
decode an image layer through the model's autoencoder.

The widget gathers parameters, starts a worker (:mod:`._jobs`) and puts results into layers; all
computing is :meth:`LatentModel.generate` / :meth:`Autoencoder.roundtrip` from the GUI-free core.

Choosing a model reads only its card (small JSON): the controls follow it at once (mask threshold
and minimum object size only for a paired model, which generates masks), and a bad folder is
answered by a notification. The weights load in the worker on the first job and stay cached.

Encode / decode takes the chosen Image layer's plane shown now (a 2D layer as is) and adds the
reconstruction next to it, in the source's intensity range and with its contrast limits, and the
difference (reconstruction - source, clipped to the range the model sees) as a third layer, with
MSE / PSNR / SSIM in the status. A layer made by this plugin is taken as already in [0, 1]; any
other is normalised like the training data. "About the model" (:mod:`._about`) says what the model's
cards say, and warns when the layer to encode / decode looks unlike its training data (also as a
notification at Encode / decode).

Layer names say what the model makes ("nuclei patches s0-3" for nuclei-ldm-demo, "EM patches ..."
for em-ldm-demo: the subject is the model's name without -ldm, -demo, ...) and are made unique.

"Copy CLI command" copies the ``zfdiffusion em generate`` command of these settings
(:meth:`GenerateEMWidget.cli_command`); encode / decode has no command.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from magicgui.widgets import CheckBox, ComboBox, FloatSpinBox, Label, PushButton, SpinBox
from napari.layers import Image
from napari.utils.notifications import show_error

from ..core.errors import UserInputError
from ..core.images import Normalisation
from ..core.latent import Autoencoder, LatentModel, describe
from ..core.provenance import stamp
from ..core.store import model_kind, read_card, resolve_model
from ._about import AboutPanel, layer_warnings
from ._download import ModelDownload
from ._jobs import JobWidget, cli_line, cli_model, error_message
from ._layers import (
    PROVENANCE_KEY,
    data_limits,
    generated_provenance,
    image_layers,
    shown_image,
    unique_name,
)
from ._models import cached_model, get_model
from ._models import model_choices as _choices

if TYPE_CHECKING:
    import napari

DEMO_MODEL = "em-ldm-demo"
KINDS = ("latent", "vae")  # a "vae" folder only encodes / decodes


def model_choices() -> list[tuple[str, str]]:
    """(label, folder) for each latent model, then each autoencoder; bundled first, the demo first."""
    return _choices(KINDS, DEMO_MODEL, {"vae": ", autoencoder only"})


def loader_for(card: dict) -> type[Autoencoder]:
    return LatentModel if card.get("kind") == "latent" else Autoencoder


_GENERIC = {"ldm", "latent", "vae", "demo", "model", "diffusion", "autoencoder", "patches"}


def subject(model_name: str) -> str:
    """What a latent model makes, from its name: "nuclei-ldm-demo" -> "nuclei", "em-ldm-demo" -> "EM";
    a name of generic words only -> "generated"."""
    words = [w for w in re.split(r"[-_ ]+", model_name) if w and w.lower() not in _GENERIC]
    if not words:
        return "generated"
    text = "-".join(words)
    return text.upper() if len(text) <= 3 else text


def seeds_text(seed: int, n: int) -> str:
    """"s3" for one patch, "s3-6" for four (patch i has seed + i)."""
    return f"s{seed}" + (f"-{seed + n - 1}" if n > 1 else "")


class GenerateEMWidget(JobWidget):
    """Generate EM patches (with masks and labels for a paired model); encode / decode a layer.

    Job handling (start, progress, cancel, errors, :meth:`wait`) comes from :class:`JobWidget`.
    """

    GUIDE_SECTION = "generate-em-patches-in-napari"

    def __init__(self, viewer: napari.viewer.Viewer):
        super().__init__(viewer, label="Generate EM patches")
        self._card: dict | None = None
        self.last_figures: dict | None = None

        self._model_rows(model_choices(), "the patch model (latent diffusion; some also make masks): bundled, "
                                          "your own, or downloadable (`zfdiffusion models`)",
                         "a folder made by `zfdiffusion train ldm` (or `train vae`: encode / decode only)")
        self.download = ModelDownload(self, model_choices)  # "Download NAME (SIZE)" for a registry model
        self.info = Label(label="about", value="", tooltip="what the chosen model makes and how well its "
                                                           "autoencoder keeps held-out images")
        self.n_patches = SpinBox(label="patches", value=4, min=1, max=256,
                                 tooltip="how many patches to make (patch i uses seed + i)")
        self._sampler_rows(50, "denoising steps: more is slower and a little cleaner", "25-50")
        seed_row = self._seed_row("seed: patch i is the same as patch 0 of a run with seed + i")
        self.threshold = FloatSpinBox(label="mask threshold", value=0.5, min=0.01, max=0.99, step=0.05,
                                      tooltip="mask threshold (models with masks): how sure the model must be "
                                              "that a pixel is in an object; lower gives larger objects")
        self.min_size = SpinBox(label="min object size", value=16, min=0, max=1_000_000,
                                tooltip="objects smaller than this many pixels are dropped from the labels")
        self.keep_probability = CheckBox(text="add mask probability (hidden)", value=True,
                                         tooltip="also add the mask probability as a hidden image layer, to "
                                                 "compare with the labels when choosing a threshold")
        self.generate_button, buttons = self._run_row("Generate", self.generate,
                                                      "generate patches with these settings (in the background)")
        self.layer = ComboBox(label="encode / decode", choices=self._image_layers,
                              tooltip="an image layer to send through the model's autoencoder: a 2D image, or "
                                      "the plane shown now of a stack (follows the layer selected in the list)")
        self.roundtrip_button = PushButton(text="Encode / decode",
                                           tooltip="encode and decode the chosen layer: what the model can "
                                                   "represent of your images (adds the reconstruction and the "
                                                   "difference)")
        self.info.native.setWordWrap(True)
        self._lay_out([self.model, self.download.button, self.info, self.n_patches, self.threshold, self.min_size,
                       self.keep_probability],
                      [self.sampler, self.steps, seed_row, self.device, self.device_info, self.model_folder],
                      [buttons, self.layer, self.roundtrip_button])

        self.about = AboutPanel("the layer to encode / decode")
        self.about.install(self.sections)

        self.roundtrip_button.changed.connect(lambda *_: self.roundtrip())
        self.layer.changed.connect(self.check_domain)
        viewer.layers.selection.events.active.connect(self._follow_selection)
        self._wire_model()

    # ------------------------------------------------------------ model
    @property
    def paired(self) -> bool:
        return self._card is not None and len(self._card.get("channels", ["image"])) > 1

    @property
    def can_generate(self) -> bool:
        return self._card is not None and self._card.get("kind") == "latent"

    def _load_model_info(self, *_) -> None:
        """Read the chosen model's card (small JSON); the weights load in the worker on first use."""
        self._card = None
        if self.download.update():  # a registry model to download: its button, no error
            self.info.value = "not downloaded yet"
        elif self.model.value is None:
            self.info.value = "no model: choose a folder made by `zfdiffusion train ldm`"
        else:
            try:
                path = resolve_model(self.model.value)
                if model_kind(path) == "cascade":
                    raise UserInputError(
                        f"'{path.name}' is a zebrafish slice cascade: open it with Plugins > zfdiffusion > "
                        "Generate slices. Here choose a latent model (made by `zfdiffusion train ldm`).")
                self._card = read_card(path, KINDS)
            except Exception as e:  # noqa: BLE001 - any bad folder becomes a message
                self.info.value = "model not usable"
                show_error(error_message(e))
            else:
                self.info.value = self._describe(path)
        self.about.show_model(self.model.value, self._card)
        self.check_domain()
        self._set_running(self._job is not None)

    def check_domain(self, *_, layer: Image | None = None) -> list[str]:
        """Whether ``layer`` (default: the one to encode / decode) looks unlike the model's training data:
        the warnings, shown in "About the model"."""
        layer = self.layer.value if layer is None else layer
        warnings = layer_warnings(self._viewer, layer, self._card, "patches")
        self.about.set_warnings(warnings)
        return warnings

    def _describe(self, path: Path) -> str:
        """The model's description: :func:`describe` once loaded, its card until then."""
        loaded = cached_model(loader_for(self._card), str(path), self.device.value)
        if loaded is not None:
            return describe(loaded)
        c = self._card
        if not self.can_generate:
            return f"{path.name}: {c.get('description', '')} (an autoencoder: encode / decode only)"
        size = c.get("patch_size", "?")
        return (f"{path.name}: {c.get('description', '')}; {size}x{size} patches"
                + (" with masks" if self.paired else "") + " (weights load on first use)")

    # ------------------------------------------------------------ parameters
    def _image_layers(self, *_) -> list[tuple[str, Image]]:
        return image_layers(self._viewer)

    def _follow_selection(self, *_) -> None:
        """The image layer to encode / decode follows the layer selected in the layer list."""
        active = self._viewer.layers.selection.active
        if isinstance(active, Image):
            self.layer.reset_choices()
            self.layer.value = active

    def params(self) -> dict:
        """The generation parameters as :meth:`LatentModel.generate` takes them."""
        return {"n": int(self.n_patches.value), "seed": int(self.seed.value), "sampler": self.sampler.value,
                "steps": int(self.steps.value), "threshold": float(self.threshold.value),
                "min_size": int(self.min_size.value)}

    # ------------------------------------------------------------ the command line
    def cli_command(self) -> str:
        """``zfdiffusion em generate`` doing what Generate would do now, as one shell line: the model (its
        name, or its folder), the device (unless auto), patches (``--n``), sampler, steps, seed and
        ``--out patches.tif``; for a paired model also the mask threshold, the minimum object size,
        ``--masks-out patches_labels.tif`` (the labels layer) and, with "add mask probability" ticked,
        ``--prob-out patches_probability.tif``.

        Left out: encode / decode (no command does it), and the layer names (the files are named).
        """
        if self.model.value is None or self._card is None:
            raise UserInputError("choose a usable model first (or a model folder).")
        if not self.can_generate:
            raise UserInputError(f"'{Path(self.model.value).name}' is an autoencoder only: encode / decode has "
                                 "no command; choose a latent diffusion model for `zfdiffusion em generate`.")
        paired = self.paired
        return cli_line(["em", "generate"], [
            ("--model", cli_model(self.model.value)), ("--device", self._cli_device()),
            ("--n", int(self.n_patches.value)), ("--sampler", self.sampler.value), ("--steps", int(self.steps.value)),
            ("--seed", int(self.seed.value)), ("--out", "patches.tif"),
            ("--threshold", float(self.threshold.value) if paired else None),
            ("--min-size", int(self.min_size.value) if paired else None),
            ("--masks-out", "patches_labels.tif" if paired else None),
            ("--prob-out", "patches_probability.tif" if paired and self.keep_probability.value else None)])

    # ------------------------------------------------------------ jobs
    def _set_running(self, running: bool) -> None:
        self.generate_button.enabled = not running and self.can_generate
        self.roundtrip_button.enabled = not running and self._card is not None
        self.cancel_button.enabled = running
        for w in (self.threshold, self.min_size, self.keep_probability):
            w.enabled = self.paired

    def _loaded(self, model) -> None:
        """A job's model is loaded (in the worker): show its full description (GUI thread)."""
        chosen = self.model.value
        if self._card is not None and chosen is not None and Path(chosen).resolve() == model.path.resolve():
            self.info.value = describe(model)

    def generate(self, **overrides) -> None:
        """Start generating with the widget's parameters (``overrides`` replace some of them)."""
        if self._card is not None and not self.can_generate:
            show_error(f"'{Path(self.model.value).name}' is an autoencoder only: choose a latent diffusion "
                       "model (made by `zfdiffusion train ldm`) to generate patches.")
            return
        params = {**self.params(), **overrides}
        model, device = self.model.value, self.device.value
        keep = bool(self.keep_probability.value)

        def job(callback, token):
            m = get_model(LatentModel, model, device)
            return m, m.generate(**params, callback=callback)

        def done(out):
            m, result = out
            self._loaded(m)
            self._add_patches(result, m.name, seeds_text(params["seed"], params["n"]), keep)

        name = Path(model).name if model else "model"
        # sampling steps of every batch, then decoding (a decoded patch costs about as much as 2 steps)
        self._start(job, f"generating {subject(name)} patches", done, [params["steps"] * params["n"], 2 * params["n"]])

    def roundtrip(self, layer: Image | None = None) -> None:
        """Start encoding and decoding ``layer`` (default: the chosen one) through the autoencoder."""
        layer = self.layer.value if layer is None else layer
        if not isinstance(layer, Image):
            show_error("choose an Image layer to encode / decode (open one, or File > Open Sample > "
                       "zfdiffusion > EM: pancreatic islet).")
            return
        try:
            image, plane = shown_image(self._viewer, layer, "encode / decode")
        except UserInputError as e:
            show_error(str(e))
            return
        ours = generated_provenance(layer) is not None
        self.about.notify(layer, self.model.value, self.check_domain(layer=layer))  # once per layer and model
        model, device = self.model.value, self.device.value
        loader = loader_for(self._card or {})
        name = f"{layer.name}{'' if plane is None else f' [plane {plane}]'}"

        def job(callback, token):
            m = get_model(loader, model, device)
            token.check()
            return m, *m.roundtrip(image, normalise=not ours)

        def done(out):
            m, rec, figures = out
            self._loaded(m)
            self._add_roundtrip(layer, image, rec, figures, name, m.name, None if ours else m.normalisation, stamp(
                "zfdiffusion.autoencode", model=m, device=m.device, operation="roundtrip", source_layer=layer.name,
                plane=plane, normalised=not ours, input_shape=list(image.shape), **figures))

        self._start(job, "encoding / decoding", done)

    # ------------------------------------------------------------ results
    def _add_patches(self, result, model: str, seeds: str, keep_probability: bool) -> None:
        """Patches "<subject> patches <seeds>", their labels and (hidden) mask probability, named uniquely."""
        meta = {PROVENANCE_KEY: result.provenance}
        what = subject(model)
        tail = f" {seeds}" + ("" if what == model else f" ({model})")
        images = result.images.astype(np.float32, copy=False)
        image = self._viewer.add_image(images, name=unique_name(self._viewer, f"{what} patches{tail}"),
                                       contrast_limits=data_limits(images), colormap="gray", metadata=meta)
        if result.masks is not None and keep_probability:
            self._viewer.add_image(result.masks.astype(np.float32, copy=False),
                                   name=unique_name(self._viewer, f"{what} mask probability{tail}"),
                                   contrast_limits=(0, 1), colormap="magma", blending="additive",
                                   visible=False, metadata=meta)
        if result.labels is not None:
            labels = self._viewer.add_labels(result.labels, name=unique_name(self._viewer, f"{what} labels{tail}"),
                                             opacity=0.8, metadata=meta)
            labels.contour = 1  # outlines: the patch stays visible under its objects
        self.layer.value = image  # not the (hidden) probability napari just selected
        n_obj = "" if result.labels is None else \
            f", {sum(len(np.unique(lab)) - 1 for lab in result.labels)} objects"
        self.status.value = f"added '{image.name}' ({len(result.images)} patches{n_obj})"

    def _add_roundtrip(self, source: Image, image: np.ndarray, rec: np.ndarray, figures: dict, name: str,
                       model: str, norm: Normalisation | None, prov: dict) -> None:
        """The reconstruction in the source's intensity range (the percentiles the model's normalisation
        mapped to 0 and 1; [0, 1] for a layer of ours) with the source's contrast limits, and the
        difference from the source clipped to that range (what the model sees), just above the source."""
        if norm is None:
            lo, hi = 0.0, 1.0
        else:
            lo, hi = (float(v) for v in np.percentile(np.asarray(image, np.float32), [norm.low, norm.high]))
            hi = hi if hi > lo else lo + 1.0
        back = rec.astype(np.float32) * (hi - lo) + lo
        diff = back - np.clip(np.asarray(image, np.float32), lo, hi)
        place = {"scale": source.scale[-2:], "translate": source.translate[-2:], "units": tuple(source.units)[-2:]}
        limits = tuple(source.contrast_limits) if source in self._viewer.layers else data_limits(back)
        prov = dict(prov, intensity_range=[lo, hi])
        layer = self._viewer.add_image(back, name=unique_name(self._viewer, f"{name} (autoencoded, {model})"),
                                       contrast_limits=limits, colormap="gray", metadata={PROVENANCE_KEY: prov},
                                       **place)
        span = float(np.percentile(np.abs(diff), 99.5)) or 1.0
        delta = self._viewer.add_image(diff, name=unique_name(self._viewer, f"{name} (difference, {model})"),
                                       contrast_limits=(-span, span), colormap="PiYG", visible=False,
                                       metadata={PROVENANCE_KEY: dict(prov, operation="roundtrip difference")},
                                       **place)
        layers = self._viewer.layers
        if source in layers:  # next to (just above) its source in the layer list, the reconstruction on top
            layers.move(layers.index(delta), layers.index(source) + 1)
            layers.move(layers.index(layer), layers.index(source) + 2)
            self.layer.value = source  # a second press encodes the source again, not its reconstruction
        self.last_figures = figures
        self.status.value = (f"added '{layer.name}' and its difference: MSE {figures['mse']:.4f}, PSNR "
                             f"{figures['psnr']:.1f} dB, SSIM {figures['ssim']:.3f} "
                             f"(latent {'x'.join(map(str, figures['latent_shape']))})")


__all__ = ["GenerateEMWidget", "model_choices"]
