"""Progress in plain words: what a job is doing now ("upscaling to 256 px") and an estimate of the
time left, measured from the job's own steps.

:class:`TimeLeft` weighs the stages of a job by what they cost (a 512 px denoising step costs about
16 times a 128 px one), measures the seconds per unit of work on the stage running now (from its
first two steps on; before that, on the stage before it) and extrapolates to the rest. Loading the
model is not counted: the clock starts at the first step. No estimate is given before two steps.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence

from ..core.progress import Progress

_CASCADE = re.compile(r"^(?:plane (\d+)/(\d+) )?(base|sr(\d+))$")
_WORDS = {"sample": "generating in latent space", "decode": "decoding patches", "tiles": "segmenting tiles",
          "items": "making items", "train unet": "fine-tuning"}


def plain_stage(stage: str, base_resolution: int = 64) -> str:
    """A stage name from the core in plain words: "sr256" -> "upscaling to 256 px", "base" -> "drafting
    at 64 px", "plane 2/5 sr128" -> "plane 2 of 5: upscaling to 128 px", "tiles" -> "segmenting tiles"."""
    m = _CASCADE.match(stage)
    if m is None:
        return _WORDS.get(stage, stage)
    plane, planes, name, res = m.groups()
    words = f"upscaling to {res} px" if name != "base" else f"drafting at {base_resolution} px"
    return f"plane {plane} of {planes}: {words}" if plane else words


def stage_resolution(stage: str, base_resolution: int = 64) -> int | None:
    """The resolution a cascade stage works at ("sr256" -> 256, "base" -> the base's), else None."""
    m = _CASCADE.match(stage)
    if m is None:
        return None
    return int(m.group(4)) if m.group(4) else base_resolution


def step_cost(resolution: int) -> float:
    """The relative cost of one denoising step at ``resolution`` px. Measured on a CPU with the demo
    cascade: 64 px 0.08 s, 128 px 0.12 s, 256 px 0.52 s, 512 px 2.0 s per step; small images cost more
    than their pixels (overhead), hence the floor. Only the ratios of future stages rest on this: the
    stage running now is measured."""
    return float(max(resolution, 96)) ** 2


def cascade_costs(resolutions: Sequence[int], steps: int, sr_steps: int, planes: int = 1) -> list[float]:
    """The relative cost of each stage of a cascade job (``planes`` times the stages ``resolutions``,
    the first of them the base): the weights for :class:`TimeLeft`."""
    one = [(steps if i == 0 else sr_steps) * step_cost(r) for i, r in enumerate(resolutions)]
    return one * planes


def format_seconds(seconds: float) -> str:
    """Seconds as a person says them: "5 s", "40 s", "2 min 10 s", "1 h 5 min"."""
    s = max(0, round(seconds))
    if s < 10:
        return f"{max(s, 1)} s"
    if s < 60:
        return f"{round(s / 5.0) * 5} s"
    if s < 600:
        m, r = divmod(round(s / 10.0) * 10, 60)
        return f"{m} min {r} s" if r else f"{m} min"
    if s < 3600:
        return f"{round(s / 60.0)} min"
    h, r = divmod(s, 3600)
    return f"{h} h {r // 60} min" if r >= 60 else f"{h} h"


class TimeLeft:
    """The share of a job that is done and the seconds it has left, from its :class:`Progress` records.

    ``costs``: the relative cost of each stage (by ``stage_index``), e.g. :func:`cascade_costs`; None:
    the stages cost the same. ``clock``: seconds (tests pass a fake one).
    """

    def __init__(self, costs: Sequence[float] | None = None, clock: Callable[[], float] = time.monotonic):
        self.costs = list(costs) if costs else None
        self.clock = clock
        self._first: dict[int, tuple[float, float]] = {}  # stage index -> (time, work) at its first report
        self._rate: float | None = None  # seconds per unit of work (the whole job is 1)
        self.fraction = 0.0
        self.seconds_left: float | None = None

    def _work(self, p: Progress) -> float:
        within = min(max(p.step / max(p.total, 1), 0.0), 1.0)
        if not self.costs or p.n_stages != len(self.costs) or not 0 <= p.stage_index < len(self.costs):
            return p.fraction
        total = sum(self.costs) or 1.0
        return (sum(self.costs[: p.stage_index]) + self.costs[p.stage_index] * within) / total

    def update(self, p: Progress, now: float | None = None) -> float | None:
        """Record one step (done at ``now``, default: the clock's now); the estimated seconds left
        (None until two steps are measured)."""
        now, work = self.clock() if now is None else now, self._work(p)
        self.fraction = min(max(work, self.fraction), 1.0)
        first = self._first.setdefault(p.stage_index, (now, work))
        if work > first[1] and now > first[0]:  # two reports of this stage: measure it
            self._rate = (now - first[0]) / (work - first[1])
        self.seconds_left = None if self._rate is None else max(0.0, (1.0 - self.fraction) * self._rate)
        return self.seconds_left

    def text(self) -> str:
        """" - about 40 s left", or "" before there is an estimate."""
        return "" if self.seconds_left is None else f" - about {format_seconds(self.seconds_left)} left"


__all__ = ["TimeLeft", "cascade_costs", "format_seconds", "plain_stage", "stage_resolution", "step_cost"]
