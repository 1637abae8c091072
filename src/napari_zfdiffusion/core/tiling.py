"""Tiled prediction for images and stacks of any size (the segmentation U-Net runs through it).

A network that maps (B, C_in, t, t) -> (B, C_out, t, t) is run on overlapping tiles; the outputs are
blended with a smooth weight that falls to zero towards each side shared with another tile (so seams
are invisible and pixels that saw the tile's padding do not count), and accumulated into the output plane by
plane. Memory beyond the output is one batch of tiles; the output itself may be a NumPy memmap.

:func:`predict_tiled_rows` gives the same result for one plane a band of rows at a time, reading the
plane a band at a time too: memory for a few hundred rows instead of the plane (big single planes).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import torch

from .errors import UserInputError
from .progress import Progress, ProgressCallback


def tile_starts(length: int, tile: int, overlap: int, align: int = 1) -> list[int]:
    """Start offsets of tiles of ``tile`` pixels covering ``length`` with at least ``overlap`` shared.

    The last tile ends at ``length`` rounded up to a multiple of ``align``. With ``align`` > 1 (and
    ``tile`` a multiple of it) every start is a multiple of ``align``: a network that downsamples by
    ``align`` then sees each tile on the same grid as the whole image, and the plane is padded by
    reflection to that multiple exactly as :class:`.segment.net.ResUNet` pads a whole image.
    A length up to one tile gives [0].
    """
    if tile <= overlap:
        raise UserInputError(f"the tile ({tile}) must be larger than the overlap ({overlap}).")
    padded = -(-length // align) * align
    if padded <= tile:
        return [0]
    step = max(align, (tile - overlap) // align * align)
    starts = list(range(0, padded - tile, step))
    starts.append(padded - tile)
    return starts


def _ramp(tile: int, overlap: int, open_start: bool, open_end: bool) -> np.ndarray:
    r = np.ones(tile, np.float32)
    if overlap <= 0:
        return r
    margin = overlap // 4  # the outermost pixels saw the tile's padding: they get no weight at all
    n = overlap - 2 * margin
    rise = np.concatenate([np.zeros(margin, np.float32),
                           0.5 - 0.5 * np.cos(np.pi * (np.arange(n, dtype=np.float32) + 0.5) / n),
                           np.ones(margin, np.float32)])
    if not open_start:
        r[:overlap] = rise
    if not open_end:
        r[tile - overlap:] = rise[::-1]
    return r


def blend_weight(tile: int, overlap: int, edges: tuple[bool, bool, bool, bool] = (False,) * 4) -> np.ndarray:
    """A (tile, tile) weight: 1 in the middle; towards a side shared with another tile, a raised-cosine
    ramp over ``overlap`` pixels whose outer quarter is 0. ``edges`` (top, bottom, left, right) marks
    the sides on the image border, which keep weight 1 (no other tile covers them).

    With zero weight on the outer ``overlap // 4`` pixels, a network whose receptive field reaches at
    most that far gives exactly the whole-image result.
    """
    top, bottom, left, right = edges
    return np.outer(_ramp(tile, overlap, top, bottom), _ramp(tile, overlap, left, right))


def _inverse_weight_sums(h: int, w: int, ys: list[int], xs: list[int], tile: int,
                         overlap: int) -> tuple[np.ndarray, np.ndarray]:
    """1 / the sum of the tiles' blend weights, by row (h,) and by column (w,): the sum over a plane
    is their outer product, as each tile's weight is."""
    hp, wp = ys[-1] + tile, xs[-1] + tile
    norm_y = np.zeros(hp, np.float32)
    norm_x = np.zeros(wp, np.float32)
    for y in ys:
        norm_y[y:y + tile] += _ramp(tile, overlap, y == 0, y + tile >= h)
    for x0 in xs:
        norm_x[x0:x0 + tile] += _ramp(tile, overlap, x0 == 0, x0 + tile >= w)
    return 1.0 / norm_y[:h], 1.0 / norm_x[:w]


def predict_tiled(
    fn: Callable[[torch.Tensor], torch.Tensor],
    image: np.ndarray,
    *,
    tile: int = 256,
    overlap: int = 32,
    out_channels: int = 1,
    batch: int = 4,
    out: np.ndarray | None = None,
    callback: ProgressCallback | None = None,
    align: int = 1,
) -> np.ndarray:
    """Run ``fn`` over a 2D image (Y, X) or a stack (N, Y, X) of float32 planes, tile by tile.

    ``fn`` takes a (B, 1, tile, tile) float32 tensor and returns (B, out_channels, tile, tile).
    Returns float32 of shape (N, out_channels, Y, X) (no N for a 2D input; no channel axis when
    ``out_channels`` is 1). Planes are padded by reflection where tiles reach past them (planes
    smaller than a tile; aligned tiles, see :func:`tile_starts`).
    ``out``: an array (e.g. ``np.lib.format.open_memmap``) of that shape to write into; it is also
    the accumulator, so memory beyond it is one batch of tiles and one padded plane.
    ``callback`` gets one :class:`Progress` per batch of tiles; raising from it stops the job.
    """
    arr = np.asarray(image)
    two_d = arr.ndim == 2
    if two_d:
        arr = arr[None]
    if arr.ndim != 3:
        raise UserInputError(f"give a 2D image or a (N, Y, X) stack; this array has shape {np.asarray(image).shape}.")
    if overlap < 0 or tile < 16:
        raise UserInputError(f"tile must be at least 16 and overlap at least 0, got {tile} and {overlap}.")
    n, h, w = arr.shape
    shape = (n, out_channels, h, w)
    result = np.zeros(shape, np.float32) if out is None else out
    if tuple(result.shape) != shape:
        raise ValueError(f"out has shape {tuple(result.shape)}, expected {shape}")
    ys, xs = tile_starts(h, tile, overlap, align), tile_starts(w, tile, overlap, align)
    hp, wp = ys[-1] + tile, xs[-1] + tile  # the padded plane the tiles cover
    boxes = [(y, x) for y in ys for x in xs]
    total = n * len(boxes)
    done = 0
    # The blend weight of a tile is an outer product of a row ramp and a column ramp that depend only
    # on the tile's row and column: so the sum of the weights is an outer product too, and the output
    # itself is the accumulator.
    inv_y, inv_x = _inverse_weight_sums(h, w, ys, xs, tile, overlap)
    # Tiles are taken plane by plane, and a batch may span planes (small planes of a stack then share
    # one forward pass). A plane is padded when its first tile is taken and divided by the weight sums
    # when its last tile is added; at most the planes of one batch are open at a time.
    jobs = [(k, y, x0) for k in range(n) for y, x0 in boxes]
    padded: dict[int, np.ndarray] = {}

    def plane_of(k: int) -> np.ndarray:
        if k not in padded:
            plane = arr[k].astype(np.float32, copy=False)
            if hp > h or wp > w:
                plane = np.pad(plane, ((0, hp - h), (0, wp - w)), mode="reflect" if min(h, w) > 1 else "edge")
            padded[k] = plane
            result[k] = 0.0
        return padded[k]

    for i in range(0, len(jobs), batch):
        chunk = jobs[i:i + batch]
        x = torch.from_numpy(np.stack([plane_of(k)[y:y + tile, x0:x0 + tile] for k, y, x0 in chunk]))[:, None]
        with torch.no_grad():
            pred = fn(x).float().cpu().numpy()
        for (k, y, x0), p in zip(chunk, pred):
            weight = blend_weight(tile, overlap, (y == 0, y + tile >= h, x0 == 0, x0 + tile >= w))
            y1, x1 = min(y + tile, h), min(x0 + tile, w)
            result[k, :, y:y1, x0:x1] += (p * weight)[:, : y1 - y, : x1 - x0]
            if (y, x0) == boxes[-1]:  # the plane's last tile: normalise it, a band of rows at a time
                for r in range(0, h, 256):
                    result[k, :, r:r + 256] *= inv_y[r:r + 256, None] * inv_x[None, :]
                del padded[k]
        done += len(chunk)
        if callback is not None:
            callback(Progress("tiles", done, total))
    if out_channels == 1:
        result = result[:, 0]
    return result[0] if two_d else result


def _padded_rows(read_rows: Callable[[int, int], np.ndarray], a: int, b: int, h: int, w: int, hp: int,
                 wp: int) -> np.ndarray:
    """Rows ``a`` to ``b`` of an (h, w) plane padded as :func:`predict_tiled` pads it (by reflection,
    at the bottom and on the right, to (hp, wp)): float32 (b - a, wp)."""
    if b <= h:
        rows = np.asarray(read_rows(a, b), np.float32)
    elif b - h < h:  # one reflection at the bottom: padded row r >= h is row 2 (h - 1) - r
        src = np.arange(a, b)
        src = np.where(src < h, src, 2 * (h - 1) - src)
        lo = int(src.min())
        rows = np.asarray(read_rows(lo, int(src.max()) + 1), np.float32)[src - lo]
    else:  # a plane shorter than the padding: small, pad it whole as predict_tiled does
        rows = np.pad(np.asarray(read_rows(0, h), np.float32), ((0, hp - h), (0, 0)),
                      mode="reflect" if min(h, w) > 1 else "edge")[a:b]
    if wp > w:
        rows = np.pad(rows, ((0, 0), (0, wp - w)), mode="reflect" if min(h, w) > 1 else "edge")
    return rows


def predict_tiled_rows(
    fn: Callable[[torch.Tensor], torch.Tensor],
    read_rows: Callable[[int, int], np.ndarray],
    shape: tuple[int, int],
    *,
    tile: int = 256,
    overlap: int = 32,
    out_channels: int = 1,
    batch: int = 4,
    band_rows: int = 256,
    callback: ProgressCallback | None = None,
    align: int = 1,
) -> Iterator[tuple[int, int, np.ndarray]]:
    """:func:`predict_tiled` of one (Y, X) plane, top to bottom, a band of rows at a time.

    ``read_rows(a, b)`` gives rows ``a`` to ``b`` of the plane as float32 (b - a, X) (e.g. a slice of
    a memory map, normalised); each row is asked for about once. Yields ``(r0, r1, block)``: rows
    ``r0`` to ``r1`` of the result as float32 (out_channels, r1 - r0, X), the next band starting at
    ``r1``, the last ending at Y; a band has at least ``band_rows`` rows (except the last) and ends
    where a row of tiles starts. ``block`` is valid until the next band is asked for.

    The result equals :func:`predict_tiled`'s on the whole plane bit for bit: the same tiles (same
    starts, same padding), in the same batches, each pixel's weighted sum added in the same order
    and divided by the same weight sums. Memory: about ``band_rows + tile`` rows of the input and of
    the output, and one batch of tiles. ``callback`` as in :func:`predict_tiled` (tiles of this plane).
    """
    h, w = shape
    if overlap < 0 or tile < 16:
        raise UserInputError(f"tile must be at least 16 and overlap at least 0, got {tile} and {overlap}.")
    band_rows = max(1, int(band_rows))
    ys, xs = tile_starts(h, tile, overlap, align), tile_starts(w, tile, overlap, align)
    hp, wp = ys[-1] + tile, xs[-1] + tile
    inv_y, inv_x = _inverse_weight_sums(h, w, ys, xs, tile, overlap)
    jobs = [(y, x0) for y in ys for x0 in xs]  # the order predict_tiled takes them in
    total = len(jobs)
    inp, in0 = np.zeros((0, wp), np.float32), 0  # padded input rows in0 .. in0 + len(inp)
    acc, a0 = np.zeros((out_channels, 0, w), np.float32), 0  # output rows a0 .. a0 + acc.shape[1], not yet given
    done = 0
    for i in range(0, total, batch):
        chunk = jobs[i:i + batch]
        need0, need1 = chunk[0][0], chunk[-1][0] + tile
        in1 = in0 + len(inp)
        if need1 > in1:  # read on, a band at a time; drop the rows no tile needs any more
            end = min(hp, max(need1, need0 + band_rows + tile))
            if need0 < in1:
                inp = np.concatenate([inp[need0 - in0:], _padded_rows(read_rows, in1, end, h, w, hp, wp)])
            else:
                inp = _padded_rows(read_rows, need0, end, h, w, hp, wp)
            in0 = need0
        a1 = min(h, need1)
        if a1 > a0 + acc.shape[1]:
            acc = np.concatenate([acc, np.zeros((out_channels, a1 - a0 - acc.shape[1], w), np.float32)], axis=1)
        x = torch.from_numpy(np.stack([inp[y - in0:y - in0 + tile, x0:x0 + tile] for y, x0 in chunk]))[:, None]
        with torch.no_grad():
            pred = fn(x).float().cpu().numpy()
        for (y, x0), p in zip(chunk, pred):
            weight = blend_weight(tile, overlap, (y == 0, y + tile >= h, x0 == 0, x0 + tile >= w))
            y1, x1 = min(y + tile, h), min(x0 + tile, w)
            acc[:, y - a0:y1 - a0, x0:x1] += (p * weight)[:, : y1 - y, : x1 - x0]
        done += len(chunk)
        if callback is not None:
            callback(Progress("tiles", done, total))
        # rows above the next tile's first row are complete: no later tile reaches them
        ready = h if done == total else min(h, jobs[done][0])
        if ready >= h or ready - a0 >= band_rows:
            block = acc[:, :ready - a0]
            block *= inv_y[a0:ready, None] * inv_x[None, :]
            yield a0, ready, block
            acc, a0 = acc[:, ready - a0:].copy(), ready
