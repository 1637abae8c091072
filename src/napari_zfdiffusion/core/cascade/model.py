"""The depth cascade: a 64x64 depth-conditioned base model and super-resolution stages to 512.

Each super-resolution stage sees the previous stage's image, bilinearly upsampled and
concatenated as a channel, noised to a known level (noise conditioning augmentation) with that
level given to the model, and the depth class. All stages sample through :func:`sampling.denoise`.

**Volumes** (:meth:`Cascade.generate_volume`): a cascade trained with ``--continuity`` also takes
the previous plane of the same volume at every stage. Planes are made top to bottom, each through
the whole cascade, conditioned on the plane above at the same resolution. Guidance is a chain::

    eps = e(no depth, no prev) + w (e(depth, no prev) - e(no depth, no prev))
                               + c (e(depth, prev)    - e(depth, no prev))

so ``c = 0`` makes each plane independently (a slice per depth) and ``c = 1`` follows the plane
above as trained; ``w`` is the depth guidance of :meth:`Cascade.generate`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..device import autocast_dtype, maybe_compile, resolve_device
from ..diffusion.objective import alphas, noise_to_level
from ..diffusion.sampling import DEFAULT_SAMPLER, check_guidance, check_steps, denoise, generators, randn
from ..diffusion.unet import ZfUNet
from ..errors import UserInputError
from ..images import Normalisation, resize, to_model, to_unit
from ..progress import ProgressCallback
from ..provenance import stamp
from ..store import CASCADE_FILE, STAGE_FILE, check_fields, load_model, read_json, resolve_model
from .depths import parse_depths
from .volume import first_plane_tensor

STAGE_ORDER = ("base", "sr128", "sr256", "sr512")
DEFAULT_NOISE_AUG = 0.1


def noise_augment(lowres: torch.Tensor, level: float, schedule_alphas: torch.Tensor,
                  gens: list[torch.Generator]) -> torch.Tensor:
    """Noise ``lowres`` (model space) to ``level`` in [0, 1] of the diffusion schedule, as the stage
    saw its low-res input in training; the noise comes from the samples' own generators."""
    if level <= 0:
        return lowres
    return noise_to_level(lowres, level, schedule_alphas, randn(lowres.shape, gens, lowres.device))


def check_noise_aug(level: float) -> float:
    lv = float(level)
    if not 0.0 <= lv <= 1.0:  # also refuses NaN
        raise UserInputError(
            f"noise augmentation must be between 0 and 1 (default {DEFAULT_NOISE_AUG}), got {level!r}.")
    return lv


@dataclass
class Stage:
    name: str
    folder: Path
    info: dict
    model: torch.nn.Module | None = None

    @property
    def resolution(self) -> int:
        return int(self.info["resolution"])

    @property
    def input_resolution(self) -> int | None:
        return self.info.get("input_resolution")

    @property
    def schedule(self) -> dict:
        return self.info.get("schedule", {})


@dataclass
class Result:
    """Generated images in [0, 1], (N, R, R) float32, with their provenance."""

    images: np.ndarray
    provenance: dict
    intermediates: dict[int, np.ndarray] = field(default_factory=dict)


class Cascade:
    """A loaded cascade model folder. Stages load lazily, on first use."""

    def __init__(self, path: Path, card: dict, stages: dict[str, Stage], device: torch.device):
        self.path = path
        self.card = card
        self.stages = stages
        self.device = device
        self.dtype = autocast_dtype(device)

    # ---------------------------------------------------------------- loading
    @classmethod
    def load(cls, model: str | Path, device: str | torch.device = "auto") -> Cascade:
        path = resolve_model(model)
        dev = resolve_device(device)
        if not (path / CASCADE_FILE).is_file():
            raise UserInputError(
                f"'{path}' is not a cascade model folder (no {CASCADE_FILE}). "
                "Give a folder made by `zfdiffusion train cascade`."
            )
        card = check_fields(read_json(path / CASCADE_FILE), "cascade", f"'{path / CASCADE_FILE}'")
        if card.get("kind", "cascade") != "cascade":
            raise UserInputError(f"'{path}' holds a '{card.get('kind')}' model, not a depth cascade.")
        stages = {}
        for name in STAGE_ORDER:
            folder = path / name
            if (folder / STAGE_FILE).is_file():
                stages[name] = Stage(name, folder, check_fields(read_json(folder / STAGE_FILE), "stage",
                                                                f"'{folder / STAGE_FILE}'", ("resolution",)))
        if "base" not in stages:
            raise UserInputError(f"cascade '{path}' has no trained base stage (base/{STAGE_FILE} is missing).")
        # Stages must chain: sr256 only with sr128, and so on.
        chain = {}
        for name in STAGE_ORDER:
            if name not in stages:
                break
            chain[name] = stages[name]
        return cls(path, card, chain, dev)

    def _model(self, stage: Stage) -> torch.nn.Module:
        if stage.model is None:
            stage.model = maybe_compile(load_model(stage.folder, ZfUNet).to(self.device), self.device)
        return stage.model

    # ---------------------------------------------------------------- facts
    @property
    def name(self) -> str:
        return self.card.get("name", self.path.name)

    @property
    def depth_classes(self) -> list[dict]:
        return self.card.get("depth_classes", [])

    @property
    def n_classes(self) -> int:
        return len(self.depth_classes)

    @property
    def resolutions(self) -> list[int]:
        return [s.resolution for s in self.stages.values()]

    @property
    def normalisation(self) -> Normalisation:
        return Normalisation.from_dict(self.card.get("normalisation"))

    def pixel_size_um(self, resolution: int, *, volume: bool = False) -> dict | None:
        """The physical pixel size of a generated image at ``resolution`` (micrometres; and the z-step
        for a volume): the training field (``field_um`` in the card) over the pixels that show it.
        None when the training data carried no pixel size."""
        field_um = self.card.get("field_um")
        if not field_um:
            return None
        px = float(field_um) / int(resolution)
        out = {"y": px, "x": px}
        if volume and self.card.get("z_step_um"):
            out = {"z": float(self.card["z_step_um"]), **out}
        return out

    def depth_label(self, depth: int) -> str:
        return self.depth_classes[depth].get("label", f"depth {depth}")

    def check_depth(self, depth) -> int:
        if isinstance(depth, bool) or not isinstance(depth, (int, np.integer)):
            raise UserInputError(f"depth must be a whole number (a depth class index), got {depth!r}.")
        if not 0 <= int(depth) < self.n_classes:
            raise UserInputError(
                f"depth {depth} is out of range: this model knows depth classes 0 to {self.n_classes - 1}."
            )
        return int(depth)

    def check_resolution(self, resolution: int | None) -> int:
        if resolution is None:
            return self.resolutions[-1]
        if resolution not in self.resolutions:
            raise UserInputError(
                f"resolution {resolution} is not available: this model reaches {', '.join(map(str, self.resolutions))}."
            )
        return int(resolution)

    # ---------------------------------------------------------------- sampling
    def _stage_conditions(self, stage: Stage, depth: int, n: int, lowres: torch.Tensor | None, level: float,
                          prev: torch.Tensor | None = None) -> list[dict]:
        """Least to most conditioned: [no depth, depth] or, with ``prev``, [.., depth + previous plane]."""
        model = self._model(stage)
        dev = self.device
        cond = {"class_labels": torch.full((n,), depth, dtype=torch.long, device=dev)}
        uncond = {"class_labels": torch.full((n,), model.null_class, dtype=torch.long, device=dev)}
        if lowres is not None:
            lvl = torch.full((n,), float(level), device=dev)
            for c in (cond, uncond):
                c["cond"] = lowres
                c["noise_level"] = lvl
        if prev is None:
            return [uncond, cond]
        none = torch.zeros(n, dtype=torch.long, device=dev)
        for c in (cond, uncond):
            c.update(prev=torch.zeros_like(prev), has_prev=none)
        return [uncond, cond, {**cond, "prev": prev, "has_prev": torch.ones_like(none)}]

    def _run(self, names: list[str], depth: int, n: int, gens, *, lowres: torch.Tensor | None,
             guidance: float, sr_guidance: float, sampler: str, steps: int, sr_steps: int,
             noise_aug: float, callback: ProgressCallback | None, prev: dict[int, torch.Tensor] | None = None,
             continuity: float = 0.0, label: str = "", first_stage: int = 0,
             n_stages: int | None = None) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Take ``n`` samples through the stages ``names``; returns the last output and every stage's
        output by resolution (model space). ``prev``: the plane above, by resolution (volumes)."""
        x = lowres
        outs = {}
        for k, name in enumerate(names):
            stage = self.stages[name]
            model = self._model(stage)
            res = stage.resolution
            up = None
            if x is not None:
                up = resize(x, res).clamp(-1, 1)
                up = noise_augment(up, noise_aug, alphas(stage.schedule), gens)
            above = prev.get(res) if prev is not None else None
            weights = [guidance if name == "base" else sr_guidance] + ([continuity] if above is not None else [])
            x = denoise(
                model, (n, 1, res, res), conditions=self._stage_conditions(stage, depth, n, up, noise_aug, above),
                guidance=weights, sampler=sampler,
                steps=steps if name == "base" else sr_steps, schedule=stage.schedule, gens=gens,
                device=self.device, dtype=self.dtype, callback=callback, stage=f"{label}{name}",
                stage_index=first_stage + k, n_stages=n_stages or len(names),
            ).clamp(-1, 1)
            outs[res] = x
        return x, outs

    def _provenance(self, **kw) -> dict:
        return stamp("zfdiffusion.cascade", model=self, device=self.device, **kw)

    def generate(self, depth: int, *, guidance: float = 3.0, resolution: int | None = None, n: int = 1,
                 seed: int = 0, sampler: str = DEFAULT_SAMPLER, steps: int = 25, sr_steps: int | None = None,
                 sr_guidance: float = 1.0, noise_aug: float = DEFAULT_NOISE_AUG,
                 callback: ProgressCallback | None = None, keep_intermediates: bool = False) -> Result:
        """Generate ``n`` slices at ``depth``, stopping after the stage that reaches ``resolution``."""
        depth = self.check_depth(depth)
        guidance = check_guidance(guidance)
        sr_guidance = check_guidance(sr_guidance, "super-resolution guidance")
        steps = check_steps(steps)
        sr_steps = check_steps(sr_steps if sr_steps is not None else steps)
        noise_aug = check_noise_aug(noise_aug)
        resolution = self.check_resolution(resolution)
        if not isinstance(n, int) or n < 1:
            raise UserInputError(f"the number of samples must be at least 1, got {n!r}.")
        names = [s.name for s in self.stages.values() if s.resolution <= resolution]
        gens = generators(seed, n)
        x, outs = self._run(names, depth, n, gens, lowres=None, guidance=guidance, sr_guidance=sr_guidance,
                            sampler=sampler, steps=steps, sr_steps=sr_steps, noise_aug=noise_aug, callback=callback)
        inter = {r: to_unit(o[:, 0]) for r, o in outs.items()} if keep_intermediates else {}
        prov = self._provenance(
            depth=depth, depth_label=self.depth_label(depth), guidance=guidance, sr_guidance=sr_guidance,
            seed=seed, seeds=[seed + i for i in range(n)], sampler=sampler, steps=steps, sr_steps=sr_steps,
            noise_aug=noise_aug, resolution=resolution, stages=names,
            pixel_size_um=self.pixel_size_um(resolution),
        )
        return Result(to_unit(x[:, 0]), prov, inter)

    @property
    def continuity(self) -> bool:
        """Whether every stage takes the previous plane (trained with ``--continuity``): a volume model."""
        return all(int(st.info.get("prev_channels", 0)) > 0 for st in self.stages.values())

    def generate_volume(self, depths, *, guidance: float = 3.0, continuity_guidance: float = 1.0,
                        resolution: int | None = None, seed: int = 0, first_plane=None,
                        first_plane_normalised: bool = False, sampler: str = DEFAULT_SAMPLER, steps: int = 25,
                        sr_steps: int | None = None, sr_guidance: float = 1.0,
                        noise_aug: float = DEFAULT_NOISE_AUG, callback: ProgressCallback | None = None,
                        on_plane=None) -> Result:
        """A (Z, R, R) volume over ``depths`` (consecutive, e.g. ``"0-4"`` or a tuple), top to bottom.

        Each plane goes through the whole cascade, every stage conditioned on the plane above at
        that stage's resolution (``continuity_guidance`` weighs it; 0 = planes made independently).
        ``first_plane``: a user's 2D plane for the first depth (square, at least R on a side); the
        rest of the volume continues from it. ``on_plane(k, image)`` is called as each plane is done.
        All randomness comes from one generator seeded with ``seed``.
        """
        if isinstance(depths, str):
            depths = parse_depths(depths, self.n_classes, consecutive=True)
        depths = tuple(self.check_depth(d) for d in depths)
        if not depths or any(b != a + 1 for a, b in zip(depths, depths[1:])):
            raise UserInputError(f"depths {list(depths)} must be consecutive depth classes, top to bottom.")
        guidance = check_guidance(guidance)
        continuity_guidance = check_guidance(continuity_guidance, "continuity guidance")
        sr_guidance = check_guidance(sr_guidance, "super-resolution guidance")
        steps = check_steps(steps)
        sr_steps = check_steps(sr_steps if sr_steps is not None else steps)
        noise_aug = check_noise_aug(noise_aug)
        resolution = self.check_resolution(resolution)
        if continuity_guidance != 0 and not self.continuity:
            raise UserInputError(
                f"'{self.name}' is not a volume model (its stages do not take the previous plane): use continuity "
                "guidance 0 for independent planes, or train one with `zfdiffusion train cascade --continuity`.")
        names = [s.name for s in self.stages.values() if s.resolution <= resolution]
        above: dict[int, torch.Tensor] | None = None
        planes: list[np.ndarray] = []
        todo = list(depths)
        if first_plane is not None:
            top = first_plane_tensor(first_plane, resolution, self.normalisation,
                                     normalise=not first_plane_normalised).to(self.device)
            above = {self.stages[n].resolution: resize(top, self.stages[n].resolution) for n in names}
            planes.append(to_unit(above[resolution][0, 0]))
            if on_plane is not None:
                on_plane(0, planes[0])
            todo = todo[1:]
        gens = generators(seed, 1)
        n_total = len(todo) * len(names)
        for k, depth in enumerate(todo):
            z = len(planes)
            _, outs = self._run(
                names, depth, 1, gens, lowres=None, guidance=guidance, sr_guidance=sr_guidance, sampler=sampler,
                steps=steps, sr_steps=sr_steps, noise_aug=noise_aug, callback=callback,
                prev=above if continuity_guidance != 0 else None, continuity=continuity_guidance,
                label=f"plane {z + 1}/{len(depths)} ", first_stage=k * len(names), n_stages=n_total)
            above = outs
            planes.append(to_unit(outs[resolution][0, 0]))
            if on_plane is not None:
                on_plane(z, planes[-1])
        prov = self._provenance(
            operation="volume", depths=list(depths), depth_labels=[self.depth_label(d) for d in depths],
            guidance=guidance, continuity_guidance=continuity_guidance, sr_guidance=sr_guidance, seed=seed,
            sampler=sampler, steps=steps, sr_steps=sr_steps, noise_aug=noise_aug, resolution=resolution,
            stages=names, first_plane_given=first_plane is not None, z_step_um=self.card.get("z_step_um"),
            pixel_size_um=self.pixel_size_um(resolution, volume=True),
        )
        return Result(np.stack(planes), prov)

    def upsample(self, image: np.ndarray, depth: int, *, resolution: int | None = None, seed: int = 0,
                 sampler: str = DEFAULT_SAMPLER, steps: int = 25, sr_guidance: float = 1.0,
                 noise_aug: float = DEFAULT_NOISE_AUG, normalise: bool = True,
                 callback: ProgressCallback | None = None) -> Result:
        """Take a 2D image (or a stack of N images) through the remaining stages up to ``resolution``.

        The image must be square. Its side picks the first stage: the largest stage input that is
        not larger than the image (it is resized down to that if needed).
        ``normalise=False`` takes values as already in [0, 1] (e.g. a generated layer).
        """
        depth = self.check_depth(depth)
        sr_guidance = check_guidance(sr_guidance, "super-resolution guidance")
        check_steps(steps)
        noise_aug = check_noise_aug(noise_aug)
        resolution = self.check_resolution(resolution)
        arr = np.asarray(image)
        if arr.ndim == 3 and arr.shape[-1] in (3, 4) and arr.shape[0] > 4:
            raise UserInputError(f"the image looks like RGB(A) {arr.shape}: upsampling takes one grayscale channel.")
        if arr.ndim == 2:
            arr = arr[None]
        if arr.ndim != 3:
            raise UserInputError(f"upsampling takes a 2D image (Y, X), got an array of shape {np.asarray(image).shape}.")
        h, w = arr.shape[-2:]
        if h != w:
            raise UserInputError(f"the image is {h}x{w}: upsampling needs a square image (crop it to a square first).")
        starts = [s for s in self.stages.values() if s.input_resolution and s.input_resolution <= h]
        if not starts:
            smallest = min((s.input_resolution for s in self.stages.values() if s.input_resolution), default=None)
            if smallest is None:
                raise UserInputError("this cascade has no super-resolution stage: train one with --stage sr128.")
            raise UserInputError(f"the image is {h}x{w}: it must be at least {smallest}x{smallest} to upsample.")
        first = starts[-1]
        if first.resolution > resolution:
            raise UserInputError(
                f"the image ({h}x{w}) is already at or above the target resolution {resolution}: choose a larger one."
            )
        names = [s.name for s in self.stages.values() if first.resolution <= s.resolution <= resolution]
        lows = torch.cat([to_model(a, self.normalisation, normalise=normalise) for a in arr])
        lows = resize(lows, first.input_resolution).to(self.device)
        n = lows.shape[0]
        gens = generators(seed, n)
        x, _ = self._run(names, depth, n, gens, lowres=lows, guidance=1.0, sr_guidance=sr_guidance,
                         sampler=sampler, steps=steps, sr_steps=steps, noise_aug=noise_aug, callback=callback)
        prov = self._provenance(
            operation="upsample", depth=depth, depth_label=self.depth_label(depth), sr_guidance=sr_guidance,
            seed=seed, sampler=sampler, steps=steps, noise_aug=noise_aug, resolution=resolution,
            stages=names, input_shape=[int(h), int(w)],
            pixel_size_um=None if normalise else self.pixel_size_um(resolution),
        )
        return Result(to_unit(x[:, 0]), prov)


def describe(cascade: Cascade) -> str:
    lines = [f"{cascade.name}: resolutions {', '.join(map(str, cascade.resolutions))}"
             + ("; volumes (every stage takes the plane above)" if cascade.continuity else "")]
    for i, d in enumerate(cascade.depth_classes):
        lines.append(f"  depth {i}: {d.get('label', '')}")
    return "\n".join(lines)


__all__ = ["Cascade", "Result", "STAGE_ORDER", "describe", "noise_augment"]
