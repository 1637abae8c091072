"""Depth classes: which planes each class holds, what it means (for the model card and the depth
slider), and how users name them on the command line ("0-4", "1,3,5", "all")."""

from __future__ import annotations

import math

from ..errors import UserInputError


def depth_bins(n_planes: int, n_classes: int | None) -> list[int]:
    """The depth class of each plane: one class per plane, or ``n_classes`` equal bins."""
    if n_classes is None or n_classes == n_planes:
        return list(range(n_planes))
    if n_classes < 1 or n_classes > n_planes:
        raise UserInputError(f"--depth-classes must be between 1 and the number of planes ({n_planes}), got {n_classes}.")
    return [min(n_classes - 1, math.floor(z * n_classes / n_planes)) for z in range(n_planes)]


def depth_class_cards(n_planes: int, n_classes: int, z_step_um: float | None) -> list[dict]:
    """What each depth class means, for ``cascade.json``: its planes, a label, and z in um if known."""
    bins = depth_bins(n_planes, n_classes if n_classes != n_planes else None)
    out = []
    for c in range(n_classes):
        planes = [z for z, b in enumerate(bins) if b == c]
        where = "top" if c == 0 else "bottom" if c == n_classes - 1 else "middle"
        label = f"planes {planes[0]}-{planes[-1]}" if len(planes) > 1 else f"plane {planes[0]}"
        if z_step_um:
            label += f", z = {planes[0] * z_step_um:g}-{planes[-1] * z_step_um:g} um" if len(planes) > 1 \
                else f", z = {planes[0] * z_step_um:g} um"
        out.append({"index": c, "planes": planes, "label": f"{label} ({where})"})
    return out


def depth_bins_um(n_planes: int, z_step_um: float, bin_um: float) -> list[int]:
    """The depth class of each plane of a stack whose planes are ``z_step_um`` apart, in bins of
    ``bin_um`` micrometres from the top plane: stacks with other numbers of planes or other z-steps
    share the classes by physical depth."""
    return [int(math.floor(z * z_step_um / bin_um + 1e-9)) for z in range(n_planes)]


def depth_class_cards_um(n_classes: int, bin_um: float) -> list[dict]:
    """What each physical depth class means, for ``cascade.json`` and the depth slider."""
    out = []
    for c in range(n_classes):
        where = "top" if c == 0 else "bottom" if c == n_classes - 1 else "middle"
        out.append({"index": c, "z_um": [c * bin_um, (c + 1) * bin_um],
                    "label": f"z = {c * bin_um:g}-{(c + 1) * bin_um:g} um ({where})"})
    return out


def parse_depths(text, n_classes: int, *, consecutive: bool = False) -> tuple[int, ...]:
    """Depth classes from '0-4', '1,3,5', '2' or 'all', checked against the model's ``n_classes``.

    ``consecutive``: a volume's depths, which must follow each other top to bottom (a volume model
    learned each plane from the one above it).
    """
    t = str(text).strip()
    if t == "all":
        return tuple(range(n_classes))
    out: list[int] = []
    try:
        for part in t.split(","):
            part = part.strip()
            if "-" in part[1:]:
                a, b = (int(v) for v in part.split("-", 1))
                if b < a:
                    raise UserInputError(f"depths '{text}': a range must go down the stack, top to bottom "
                                         f"(e.g. {b}-{a}).")
                out.extend(range(a, b + 1))
            else:
                out.append(int(part))
    except UserInputError:
        raise
    except ValueError:
        raise UserInputError(f"depths '{text}': give a range of depth classes like 0-4"
                             f"{'' if consecutive else ', a list like 1,3,5'} (or all).") from None
    bad = [d for d in out if not 0 <= d < n_classes]
    if bad or not out:
        raise UserInputError(f"depths '{text}' are outside this model: it has depth classes 0-{n_classes - 1}.")
    out = list(dict.fromkeys(out))
    if consecutive and any(b != a + 1 for a, b in zip(out, out[1:])):
        raise UserInputError(f"depths '{text}': a volume needs consecutive depth classes, top to bottom, like 0-4.")
    return tuple(out)


__all__ = ["depth_bins", "depth_bins_um", "depth_class_cards", "depth_class_cards_um", "parse_depths"]
