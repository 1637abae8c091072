"""Progress of long jobs: one :class:`Progress` record per step (or tile, or item), sent to a callback.

A callback stops the job within one step by raising :class:`.errors.Cancelled`. A job made of equal
parts (batches of samples, groups of planes) reports each part's steps on one scale for the whole
job through :func:`rescaled`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Progress:
    """One step of one stage of a job. ``fraction`` is the share of the whole job that is done."""

    stage: str
    step: int
    total: int
    stage_index: int = 0
    n_stages: int = 1

    @property
    def fraction(self) -> float:
        return (self.stage_index + self.step / max(self.total, 1)) / max(self.n_stages, 1)

    def __str__(self) -> str:
        return f"{self.stage} {self.step}/{self.total} (stage {self.stage_index + 1}/{self.n_stages})"


ProgressCallback = Callable[[Progress], None]


def rescaled(callback: ProgressCallback | None, start: int, count: int, total: int, *, stage: str | None = None,
             stage_index: int | None = None, n_stages: int | None = None) -> ProgressCallback | None:
    """The callback for one part of a job: the part covers items ``start`` to ``start + count`` of
    ``total`` items that cost the same (batches, planes). Its steps are counted on the whole job's
    scale, so a progress bar runs once from 0 to the end instead of once per part.

    ``stage``, ``stage_index`` and ``n_stages`` replace the part's own (None: keep them).
    """
    if callback is None:
        return None

    def cb(p: Progress) -> None:
        callback(Progress(stage if stage is not None else p.stage, p.total * start // count + p.step,
                          p.total * total // count, p.stage_index if stage_index is None else stage_index,
                          p.n_stages if n_stages is None else n_stages))

    return cb


__all__ = ["Progress", "ProgressCallback", "rescaled"]
