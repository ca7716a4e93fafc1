"""Tile grids, the background test and streamed downscaling: the tiler's pure core.

The convention is the original toolkit's (see ``../shared/data/README.md``):

1. the full-resolution slide (and mask) is zero-padded to a multiple of ``reduce * size`` in
   each axis, ``pad // 2`` before and the rest after;
2. it is downscaled by ``reduce`` (image ``cv2.INTER_AREA``, mask ``cv2.INTER_NEAREST``);
3. ``size x size`` tiles are cut in row-major order: tile ``i`` is at tile row ``i // n_cols``,
   tile column ``i % n_cols``;
4. a tile is dropped when ``(S > saturation_threshold).sum() <= limit`` or
   ``tile.sum() <= limit``, with ``limit = pixel_threshold * size // 256`` and S the HSV
   saturation (0..255, OpenCV).

:func:`iter_tile_rows` produces the downscaled slide one tile row at a time from full-width
strips, so neither the slide nor the padded image is ever held whole; on level 0 with an
integer factor it equals the whole-image computation exactly (INTER_AREA by an integer factor
is a block mean, so it can be computed block row by block row).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence, Tuple

import cv2
import numpy as np

from data.readers import Slide, same_scale
from utils.rle import check_shape

__all__ = [
    "centered_padding",
    "TileGrid",
    "pixel_limit",
    "slide_box",
    "is_tissue",
    "tissue_columns",
    "tissue_windows",
    "iter_tile_rows",
    "tile_panels",
    "mask_band",
]


def centered_padding(length: int, multiple: int) -> Tuple[int, int]:
    """Zero padding ``(before, after)`` that brings ``length`` to a multiple of ``multiple``.

    >>> centered_padding(31278, 4096)
    (745, 745)
    """
    if length <= 0 or multiple <= 0:
        raise ValueError(f"length and multiple must be > 0, got {length} and {multiple}")
    pad = (multiple - length % multiple) % multiple
    return pad // 2, pad - pad // 2


@dataclass(frozen=True)
class TileGrid:
    """The tile grid of a ``(height, width)`` slide at ``size`` px tiles and ``reduce`` x.

    ``pad_top``/``pad_left`` are in level-0 pixels; tile ``(row, col)`` covers level-0 rows
    ``row * reduce * size - pad_top`` ... (negative = padding).
    """

    height: int
    width: int
    size: int
    reduce: int

    def __post_init__(self):
        check_shape((self.height, self.width), "slide")
        if self.size <= 0:
            raise ValueError(f"tile size must be > 0, got {self.size}")
        if self.reduce < 1 or int(self.reduce) != self.reduce:
            raise ValueError(f"reduction must be an integer >= 1, got {self.reduce}")

    @property
    def span(self) -> int:
        """Side of one tile in level-0 pixels."""
        return self.size * self.reduce

    @property
    def pad_top(self) -> int:
        return centered_padding(self.height, self.span)[0]

    @property
    def pad_left(self) -> int:
        return centered_padding(self.width, self.span)[0]

    @property
    def n_rows(self) -> int:
        return -(-self.height // self.span)

    @property
    def n_cols(self) -> int:
        return -(-self.width // self.span)

    @property
    def n_tiles(self) -> int:
        return self.n_rows * self.n_cols

    def tile_origin(self, index: int) -> Tuple[int, int]:
        """Level-0 ``(row, col)`` of the top-left pixel of tile ``index`` (may be negative)."""
        row, col = divmod(int(index), self.n_cols)
        return row * self.span - self.pad_top, col * self.span - self.pad_left


def slide_box(grid: TileGrid, whole: bool = True) -> Tuple[int, int, int, int]:
    """``(y0, y1, x0, x1)``: the low-res pixels of the padded grid that lie wholly on the slide
    (``whole``), or that touch it at all."""
    r = grid.reduce
    top, left = grid.pad_top, grid.pad_left
    bottom, right = top + grid.height, left + grid.width
    if not whole:
        return top // r, -(-bottom // r), left // r, -(-right // r)
    y0, x0 = -(-top // r), -(-left // r)
    return y0, max(y0 + 1, bottom // r), x0, max(x0 + 1, right // r)


def pixel_limit(pixel_threshold: int, size: int) -> int:
    """The original's per-tile pixel threshold, scaled by tile size: ``p * size // 256``."""
    return pixel_threshold * size // 256


def is_tissue(tile: np.ndarray, saturation_threshold: int, limit: int) -> bool:
    """The original background test on an RGB uint8 tile: True means keep the tile."""
    saturation = cv2.cvtColor(np.ascontiguousarray(tile), cv2.COLOR_RGB2HSV)[..., 1]
    if int((saturation > saturation_threshold).sum()) <= limit:
        return False
    return int(tile.sum(dtype=np.int64)) > limit


def _keep_windows(band: np.ndarray, starts_x: np.ndarray, size: int, saturation_threshold: int,
                  limit: int) -> np.ndarray:
    """:func:`is_tissue` for the ``size`` px windows starting at ``starts_x`` of a ``(size, W, 3)``
    band (overlapping or not): the band is converted to HSV once and each window's counts come
    from per-column sums and their cumulative sums, exactly (integers)."""
    band = np.ascontiguousarray(band)
    saturated = (cv2.cvtColor(band, cv2.COLOR_RGB2HSV)[..., 1] > saturation_threshold).view(np.uint8)
    # column sums with cv2.reduce (int32 is plenty for one column; numpy's axis-0 sums are slow)
    per_column = cv2.reduce(saturated, 0, cv2.REDUCE_SUM, dtype=cv2.CV_32S)[0]
    counts = np.concatenate(([0], np.cumsum(per_column, dtype=np.int64)))
    per_value = cv2.reduce(band.reshape(band.shape[0], -1), 0, cv2.REDUCE_SUM, dtype=cv2.CV_32S)[0]
    sums = np.concatenate(([0], np.cumsum(per_value.reshape(-1, 3).sum(axis=1), dtype=np.int64)))
    return ((counts[starts_x + size] - counts[starts_x]) > limit) & ((sums[starts_x + size] - sums[starts_x]) > limit)


def tissue_columns(band: np.ndarray, size: int, saturation_threshold: int, limit: int) -> np.ndarray:
    """:func:`is_tissue` for every tile of a ``(size, n_cols * size, 3)`` band at once.

    Returns a boolean array of ``n_cols``: True where the tile is kept.
    """
    n_cols = band.shape[1] // size
    return _keep_windows(band, np.arange(n_cols, dtype=np.int64) * size, size, saturation_threshold, limit)


def tissue_windows(image: np.ndarray, starts_y: Sequence[int], starts_x: Sequence[int], size: int,
                   saturation_threshold: int, limit: int) -> List[Tuple[int, int]]:
    """The ``(y, x)`` of the ``size`` px windows of ``image`` (starts ``starts_y`` x ``starts_x``,
    overlapping or not) that :func:`is_tissue` keeps, row by row, left to right. A window row's
    pixels are converted to HSV once, not once per window that holds them."""
    xs = np.asarray(starts_x, dtype=np.int64)
    kept = []
    for y in starts_y:
        keep = _keep_windows(image[y:y + size], xs, size, saturation_threshold, limit)
        kept.extend((int(y), int(x)) for x in xs[keep])
    return kept


class _RowDownscaler:
    """INTER_AREA by an integer ``factor`` of whole blocks of rows of a zero-padded level.

    Output column ``j`` averages padded columns ``[j * factor, (j + 1) * factor)``, i.e. level
    columns ``[j * factor - pad_left, ...)``. Blocks fully inside the level are resized
    straight from the caller's rows (a view, no copy); only the one block that straddles each
    edge is assembled with its zero padding. Block-local, so exactly equal to resizing the
    whole padded image.
    """

    def __init__(self, width: int, factor: int, pad_left: int, out_cols: int):
        self.width, self.factor, self.pad_left, self.out_cols = width, factor, pad_left, out_cols
        self.j_lo = -(-pad_left // factor)  # first output column made only of level pixels
        self.j_hi = min(out_cols, (width + pad_left) // factor)  # one past the last such

    def _resize(self, rows: np.ndarray, n_cols: int) -> np.ndarray:
        if self.factor == 1:
            return rows
        return cv2.resize(rows, (n_cols, rows.shape[0] // self.factor), interpolation=cv2.INTER_AREA)

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        """``rows``: ``(n * factor, width, 3)`` level rows -> ``(n, out_cols, 3)``."""
        r, pad_left = self.factor, self.pad_left
        j_lo, j_hi = self.j_lo, self.j_hi
        if j_hi <= j_lo:  # narrower than two blocks: pad the whole thing
            padded = np.zeros((rows.shape[0], self.out_cols * r, 3), dtype=np.uint8)
            count = max(0, min(self.width, self.out_cols * r - pad_left))
            padded[:, pad_left:pad_left + count] = rows[:, :count]
            return self._resize(padded, self.out_cols)
        out = np.zeros((rows.shape[0] // r, self.out_cols, 3), dtype=np.uint8)
        out[:, j_lo:j_hi] = self._resize(rows[:, j_lo * r - pad_left:j_hi * r - pad_left], j_hi - j_lo)
        if j_lo > 0:  # the block straddling the left edge
            inside = j_lo * r - pad_left
            if inside:
                block = np.zeros((rows.shape[0], r, 3), dtype=np.uint8)
                block[:, r - inside:] = rows[:, :inside]
                out[:, j_lo - 1:j_lo] = self._resize(block, 1)
        if j_hi < self.out_cols:  # the block straddling the right edge
            start = j_hi * r - pad_left
            inside = min(self.width - start, r)
            if inside > 0:
                block = np.zeros((rows.shape[0], r, 3), dtype=np.uint8)
                block[:, :inside] = rows[:, start:start + inside]
                out[:, j_hi:j_hi + 1] = self._resize(block, 1)
        return out


def _streamed_rows(
    slide: Slide, level: int, factor: int, pad_top: int, pad_left: int, out_rows: int, out_cols: int,
    first_col: int = 0,
) -> Iterator[np.ndarray]:
    """Consecutive rows of ``cv2.resize(padded_level, INTER_AREA)`` by the integer ``factor``.

    ``padded_level`` is ``level`` of the slide with ``pad_top`` zero rows above and
    ``pad_left`` zero columns on the left, cropped or zero-extended to
    ``(out_rows * factor, out_cols * factor)``; with ``first_col``, the output columns
    ``first_col ... first_col + out_cols`` of it (a column panel: only the level columns under
    it are read). Yields arrays of ``(n, out_cols, 3)``.
    """
    lh, lw = slide.levels[level].shape
    r = factor
    p0 = first_col * r  # the panel's first padded column
    a, b = max(0, p0 - pad_left), min(lw, p0 + out_cols * r - pad_left)  # the level columns under it
    emitted = 0

    def emit(rows: np.ndarray):
        nonlocal emitted
        take = min(rows.shape[0], out_rows - emitted)
        emitted += take
        return rows[:take]

    if b <= a:  # the panel lies in the padding
        yield emit(np.zeros((out_rows, out_cols, 3), dtype=np.uint8))
        return
    downscale = _RowDownscaler(b - a, r, max(0, pad_left - p0), out_cols)
    zero_blocks, carry_rows = divmod(pad_top, r)
    if zero_blocks:
        yield emit(np.zeros((zero_blocks, out_cols, 3), dtype=np.uint8))
    carry = np.zeros((carry_rows, b - a, 3), dtype=np.uint8)  # rows waiting to fill a block
    cols = None if (a, b) == (0, lw) else (a, b)
    for _, strip in slide.iter_strips(level, reuse_buffer=True, cols=cols):
        if emitted >= out_rows:
            break
        if carry.shape[0]:
            need = r - carry.shape[0]
            if strip.shape[0] < need:
                carry = np.concatenate((carry, strip))
                continue
            yield emit(downscale(np.concatenate((carry, strip[:need]))))
            strip = strip[need:]
        usable = (strip.shape[0] // r) * r
        if usable:
            yield emit(downscale(strip[:usable]))
        carry = strip[usable:].copy()
    if carry.shape[0] and emitted < out_rows:
        block = np.zeros((r, b - a, 3), dtype=np.uint8)
        block[: carry.shape[0]] = carry
        yield emit(downscale(block))
    if emitted < out_rows:
        yield emit(np.zeros((out_rows - emitted, out_cols, 3), dtype=np.uint8))


# Tiling reads a wide slide in column panels of about this many level pixels, so its memory does
# not grow with the slide's width (tiles do not overlap: a panel's tiles need only its columns).
PANEL_PIXELS = 16384


def tile_panels(slide: Slide, grid: TileGrid) -> List[Tuple[int, int]]:
    """The tile-column ranges ``(c0, c1)`` to tile ``grid`` in: one for a slide narrower than
    two panels or stored in full-width strips (reading part of a strip decodes all of it), else
    panels of ``PANEL_PIXELS`` level pixels (a whole number of tiles)."""
    level = slide.best_level(grid.reduce)
    downsample = slide.levels[level].downsample if level else 1.0
    lw = slide.levels[level].shape[1]
    span = grid.span / downsample  # level pixels per tile
    if lw < 2 * PANEL_PIXELS or slide.chunk_cols(level) >= lw:
        return [(0, grid.n_cols)]
    per_panel = max(1, int(PANEL_PIXELS // span))
    return [(c, min(grid.n_cols, c + per_panel)) for c in range(0, grid.n_cols, per_panel)]


def iter_tile_rows(slide: Slide, grid: TileGrid, cols: Optional[Tuple[int, int]] = None
                   ) -> Iterator[Tuple[int, np.ndarray]]:
    """Yield ``(tile_row, band)`` for every tile row of ``grid``, top to bottom.

    ``band`` is ``(size, n_cols * size, 3)`` uint8: the padded slide downscaled by
    ``grid.reduce``, rows ``tile_row * size`` to ``(tile_row + 1) * size`` (with ``cols = (c0,
    c1)``, only tile columns ``c0:c1``: ``(size, (c1 - c0) * size, 3)``, the same pixels). The slide is read
    from the pyramid level nearest below ``grid.reduce``; when the rest of the downscale is an
    integer (always on level 0) the level is streamed once in strips, else each band is read
    as a region and resized with ``cv2.INTER_AREA``.
    """
    if tuple(slide.shape) != (grid.height, grid.width):
        raise ValueError(f"grid is for a {grid.height} x {grid.width} slide, got {slide.shape}")
    c0, c1 = cols if cols is not None else (0, grid.n_cols)
    size, out_cols = grid.size, (c1 - c0) * grid.size
    level = slide.best_level(grid.reduce)
    downsample = slide.levels[level].downsample if level else 1.0
    rest = grid.reduce / downsample
    if same_scale(rest, round(rest)):
        factor = int(round(rest))
        rows = _streamed_rows(
            slide,
            level,
            factor,
            int(round(grid.pad_top / downsample)),
            int(round(grid.pad_left / downsample)),
            grid.n_rows * size,
            out_cols,
            c0 * size,
        )
        band = np.empty((size, out_cols, 3), dtype=np.uint8)
        filled, tile_row = 0, 0
        for chunk in rows:
            start = 0
            while start < chunk.shape[0]:
                take = min(size - filled, chunk.shape[0] - start)
                band[filled:filled + take] = chunk[start:start + take]
                filled += take
                start += take
                if filled == size:
                    yield tile_row, band
                    band = np.empty((size, out_cols, 3), dtype=np.uint8)
                    filled, tile_row = 0, tile_row + 1
        return
    for tile_row in range(grid.n_rows):
        y = tile_row * grid.span - grid.pad_top
        yield tile_row, slide.read(y, c0 * grid.span - grid.pad_left, grid.span, (c1 - c0) * grid.span, grid.reduce)


def mask_band(mask, grid: TileGrid, tile_row: int, cols: Optional[Tuple[int, int]] = None) -> np.ndarray:
    """The ``(size, n_cols * size)`` mask rows of ``tile_row`` (tile columns ``cols = (c0, c1)``
    only, when given): INTER_NEAREST by ``reduce`` of the zero-padded mask, i.e. padded pixel
    ``(reduce * i, reduce * j)``."""
    y = tile_row * grid.span - grid.pad_top
    c0, c1 = cols if cols is not None else (0, grid.n_cols)
    return mask.window(
        (y, y + grid.span), (c0 * grid.span - grid.pad_left, c1 * grid.span - grid.pad_left), grid.reduce
    )
