"""Run-length encoding (RLE) of binary masks in the Kaggle HuBMAP format.

Format: space-separated ``start length`` pairs. Starts are **1-based** and pixels are numbered
**column by column** (top to bottom, then the next column to the right), i.e. the flat index
of pixel ``(row, col)`` in an ``H x W`` mask is ``col * H + row``; ``flat = mask.T.ravel()``.
An empty mask is the empty string.

Internally a parsed RLE is an ``(N, 2)`` int64 array of half-open, 0-based flat intervals
``[start, end)`` sorted by start ("runs"). Everything here is pure numpy: no I/O.
"""
from __future__ import annotations

import math
import re
from typing import Tuple

import numpy as np

__all__ = [
    "check_shape",
    "parse_rle",
    "runs_to_rle",
    "rle_decode",
    "decode_window",
    "rle_encode",
    "RLEStripEncoder",
    "rle_area",
    "runs_intersection",
    "intersect_runs",
    "rle_dice",
    "dice_from_counts",
]

# Largest mask accepted (pixels). Guards against absurd claimed sizes before any allocation.
MAX_PIXELS = 1 << 40
_EMPTY_RUNS = np.zeros((0, 2), dtype=np.int64)


def check_shape(shape, name: str = "mask") -> Tuple[int, int]:
    """Validate a ``(height, width)`` mask shape and return it as two Python ints."""
    try:
        height, width = (int(v) for v in shape)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: mask shape must be (height, width), got {shape!r}") from None
    if height <= 0 or width <= 0:
        raise ValueError(f"{name}: mask shape must be positive, got {height} x {width}")
    if height * width > MAX_PIXELS:
        raise ValueError(f"{name}: mask shape {height} x {width} is too large")
    return height, width


def _is_missing(rle) -> bool:
    return rle is None or (isinstance(rle, float) and math.isnan(rle))


def parse_rle(rle, shape, name: str = "mask") -> np.ndarray:
    """Parse and validate an RLE string for a mask of ``shape = (height, width)``.

    Returns the runs as an ``(N, 2)`` int64 array of 0-based half-open ``[start, end)`` flat
    intervals. ``None``, NaN (an empty pandas cell) and ``""`` mean an empty mask.

    Raises ``ValueError`` naming ``name`` for: a non-string value, an odd number of values,
    non-integer values, starts below 1, zero or negative lengths, runs past the end of the
    image, and runs that overlap or are out of order.
    """
    height, width = check_shape(shape, name)
    if _is_missing(rle):
        return _EMPTY_RUNS.copy()
    if not isinstance(rle, str):
        raise ValueError(f"RLE of {name!r}: expected a string, got {type(rle).__name__}")
    values = _fast_values(rle)
    if values is not None:
        return _runs_from_values(values, height, width, name)
    tokens = rle.split()  # the slow path, for its precise error messages
    if not tokens:
        return _EMPTY_RUNS.copy()
    if len(tokens) % 2:
        raise ValueError(
            f"RLE of {name!r}: odd number of values ({len(tokens)}); expected 'start length' pairs"
        )
    joined = "".join(tokens)
    if not (joined.isascii() and joined.isdigit()):
        bad = next(t for t in tokens if not (t.isascii() and t.isdigit()))
        position = tokens.index(bad)
        what = "start" if position % 2 == 0 else "length"
        if bad.startswith("-") and bad[1:].isascii() and bad[1:].isdigit():
            raise ValueError(
                f"RLE of {name!r}: negative {what} {bad} in pair {position // 2 + 1}"
            )
        raise ValueError(
            f"RLE of {name!r}: {what} {bad[:40]!r} in pair {position // 2 + 1} is not an integer"
        )
    # Digits only, so an overflow is the only failure left; 19 digits always fit int64.
    if max(len(t) for t in tokens) > 18:
        raise ValueError(
            f"RLE of {name!r}: value too large for a {height} x {width} image"
        )
    return _runs_from_values(np.array(tokens, dtype=np.int64), height, width, name)


_NOT_DIGITS = re.compile(r"[^0-9 ]|\d{19,}")


def _fast_values(rle: str):
    """The integers of a well-formed RLE (digits and single spaces, the Kaggle format), parsed
    without a Python object per number (a 50 MB RLE would otherwise take ~0.5 GB); None when
    anything else is in the string (the slow path then names the problem)."""
    if _NOT_DIGITS.search(rle) or "  " in rle or rle.startswith(" ") or rle.endswith(" "):
        return None
    values = np.fromstring(rle, dtype=np.int64, sep=" ")
    if values.size != rle.count(" ") + 1 or values.size % 2:
        return None
    return values


def _runs_from_values(values: np.ndarray, height: int, width: int, name: str) -> np.ndarray:
    """Check ``start length`` pairs (1-based) and return the ``[start, end)`` runs."""
    n_pixels = height * width
    starts = values[0::2] - 1
    lengths = values[1::2]
    bad = np.flatnonzero(starts < 0)
    if bad.size:
        raise ValueError(
            f"RLE of {name!r}: start 0 in pair {bad[0] + 1}; starts are 1-based"
        )
    bad = np.flatnonzero(lengths <= 0)
    if bad.size:
        raise ValueError(
            f"RLE of {name!r}: zero length in pair {bad[0] + 1} (start {starts[bad[0]] + 1})"
        )
    ends = starts + lengths
    bad = np.flatnonzero(ends > n_pixels)
    if bad.size:
        i = bad[0]
        raise ValueError(
            f"RLE of {name!r}: run {i + 1} (start {starts[i] + 1}, length {lengths[i]}) runs "
            f"past the end of the {height} x {width} image ({n_pixels} pixels)"
        )
    bad = np.flatnonzero(starts[1:] < ends[:-1])
    if bad.size:
        i = bad[0] + 1
        raise ValueError(
            f"RLE of {name!r}: run {i + 1} (start {starts[i] + 1}) overlaps or comes before "
            f"run {i} (start {starts[i - 1] + 1}, length {lengths[i - 1]}); runs must be "
            "sorted and disjoint"
        )
    return np.stack([starts, ends], axis=1)


def runs_to_rle(runs: np.ndarray) -> str:
    """Format ``(N, 2)`` 0-based ``[start, end)`` runs as a Kaggle RLE string."""
    runs = np.asarray(runs, dtype=np.int64).reshape(-1, 2)
    if runs.shape[0] == 0:
        return ""
    pairs = np.empty(runs.size, dtype=np.int64)
    pairs[0::2] = runs[:, 0] + 1
    pairs[1::2] = runs[:, 1] - runs[:, 0]
    chunk = 1 << 20  # bounded temporaries: one Python int and str per number of a chunk only
    return " ".join(" ".join(map(str, pairs[i:i + chunk].tolist())) for i in range(0, pairs.size, chunk))


def rle_decode(rle, shape, name: str = "mask") -> np.ndarray:
    """Decode a whole mask: ``(height, width)`` uint8 of 0/1.

    The result is a transposed view (Fortran order) of a column-major buffer, which avoids a
    second full-size copy; use ``np.ascontiguousarray`` where C order is needed.
    Allocates the whole mask: use :func:`decode_window` for large slides.
    """
    height, width = check_shape(shape, name)
    runs = rle if isinstance(rle, np.ndarray) else parse_rle(rle, shape, name)
    flat = np.zeros(height * width, dtype=np.uint8)
    for start, end in runs.tolist():
        flat[start:end] = 1
    return flat.reshape(width, height).T


def decode_window(
    runs: np.ndarray,
    shape,
    rows: Tuple[int, int],
    cols: Tuple[int, int],
    step: int = 1,
) -> np.ndarray:
    """Decode one window of a mask without allocating the whole mask.

    Args:
        runs: parsed runs from :func:`parse_rle`.
        shape: ``(height, width)`` of the whole mask.
        rows: ``(row0, row1)``, half-open; the window samples rows ``row0, row0 + step, ...``
            below ``row1``. Rows outside the mask (negative, or past the end) read as 0, which
            is how zero padding of a slide is expressed.
        cols: ``(col0, col1)``, likewise for columns.
        step: sampling stride in both axes (1 = every pixel). ``step = r`` gives exactly
            ``cv2.resize(mask, ..., interpolation=cv2.INTER_NEAREST)`` by an integer factor r.

    Returns:
        ``(ceil((row1 - row0) / step), ceil((col1 - col0) / step))`` uint8 array of 0/1.
    """
    height, width = check_shape(shape)
    row0, row1 = (int(v) for v in rows)
    col0, col1 = (int(v) for v in cols)
    step = int(step)
    if step < 1:
        raise ValueError(f"step must be >= 1, got {step}")
    n_rows = max(0, -(-(row1 - row0) // step))
    n_cols = max(0, -(-(col1 - col0) // step))
    out = np.zeros((n_rows, n_cols), dtype=np.uint8)
    if n_rows == 0 or n_cols == 0 or len(runs) == 0:
        return out
    # Window columns that exist in the mask.
    j_first = max(0, -(-(0 - col0) // step))
    j_last = min(n_cols - 1, (width - 1 - col0) // step)
    # Window rows that exist in the mask.
    i_first = max(0, -(-(0 - row0) // step))
    i_last = min(n_rows - 1, (height - 1 - row0) // step)
    if j_first > j_last or i_first > i_last:
        return out
    c_min = col0 + j_first * step
    c_max = col0 + j_last * step
    starts, ends = runs[:, 0], runs[:, 1]
    # Runs that touch columns c_min..c_max (runs are sorted and disjoint).
    lo = np.searchsorted(ends, c_min * height, side="right")
    hi = np.searchsorted(starts, (c_max + 1) * height, side="left")
    if hi <= lo:
        return out
    s = np.maximum(starts[lo:hi], c_min * height)
    e = np.minimum(ends[lo:hi], (c_max + 1) * height)
    # Split each run into one piece per column it covers.
    c_a = s // height
    c_b = (e - 1) // height
    counts = c_b - c_a + 1
    piece_run = np.repeat(np.arange(len(s)), counts)
    offsets = np.arange(len(piece_run)) - np.repeat(np.cumsum(counts) - counts, counts)
    col = c_a[piece_run] + offsets
    r_start = np.where(col == c_a[piece_run], s[piece_run] - col * height, 0)
    r_end = np.where(col == c_b[piece_run], e[piece_run] - col * height, height)
    # Keep sampled columns, convert rows to sampled row indices.
    keep = (col - col0) % step == 0
    col, r_start, r_end = col[keep], r_start[keep], r_end[keep]
    j = (col - col0) // step
    i_s = np.clip(-(-(r_start - row0) // step), 0, n_rows)
    i_e = np.clip(-(-(r_end - row0) // step), 0, n_rows)
    keep = i_e > i_s
    j, i_s, i_e = j[keep], i_s[keep], i_e[keep]
    if j.size == 0:
        return out
    # Paint each piece as a slice of the column-major output; pieces are few compared with
    # pixels (one per run and column), so this beats a cumulative sum over the window.
    out_t = np.zeros((n_cols, n_rows), dtype=np.uint8)
    for jj, a, b in zip(j.tolist(), i_s.tolist(), i_e.tolist()):
        out_t[jj, a:b] = 1
    out = np.ascontiguousarray(out_t.T)
    return out


class RLEStripEncoder:
    """Encode a mask that arrives as successive column strips, left to right.

    Because pixels are numbered column by column, successive column strips are successive
    pieces of the flat mask, and a run may continue from one strip into the next::

        enc = RLEStripEncoder(height)
        for strip in strips:          # each (height, w_i), any dtype, non-zero = 1
            enc.add(strip)
        rle = enc.encode()            # == rle_encode(np.hstack(strips))

    Memory is one strip plus the run boundaries found so far.
    """

    def __init__(self, height: int):
        self.height = int(height)
        if self.height <= 0:
            raise ValueError(f"height must be positive, got {height}")
        self.width = 0
        self._last = False  # value of the last pixel added so far
        self._transitions = []  # flat indices where the value changes

    def add(self, strip: np.ndarray) -> None:
        """Append a ``(height, w)`` strip of columns (non-zero = foreground)."""
        strip = np.asarray(strip)
        if strip.ndim != 2 or strip.shape[0] != self.height:
            raise ValueError(
                f"strip must have shape ({self.height}, w), got {tuple(strip.shape)}"
            )
        # Work in blocks of columns of about 16 M pixels: bounded temporaries, cache-friendly.
        block = max(1, (1 << 24) // self.height)
        for c0 in range(0, strip.shape[1], block):
            self._add_block(strip[:, c0:c0 + block])

    def add_empty(self, width: int) -> None:
        """Append ``width`` all-background columns (no array needed)."""
        self._add_constant(width, False)

    def add_full(self, width: int) -> None:
        """Append ``width`` all-foreground columns (no array needed)."""
        self._add_constant(width, True)

    def _add_constant(self, width: int, value: bool) -> None:
        if width <= 0:
            return
        if self._last != value:  # a run starts or ends where these columns begin
            self._transitions.append(np.array([self.width * self.height], dtype=np.int64))
            self._last = value
        self.width += int(width)

    def _add_block(self, strip: np.ndarray) -> None:
        height, width = strip.shape
        fg = strip if strip.dtype == np.bool_ else strip != 0
        if fg.flags.f_contiguous and not fg.flags.c_contiguous:
            # Column-major already (e.g. a transposed view): the flat order is free.
            flat = fg.T.ravel()
            changes = np.flatnonzero(flat[1:] != flat[:-1]).astype(np.int64) + 1
            if flat[0] != self._last:
                changes = np.concatenate(([0], changes))
        else:
            # Changes inside each column (row r differs from row r - 1), then between columns
            # (a column's top pixel against the previous column's bottom pixel). This avoids
            # transposing a C-ordered mask.
            r, c = np.nonzero(fg[1:] != fg[:-1])
            previous_last = np.concatenate(([self._last], fg[-1, :-1]))
            c_top = np.flatnonzero(fg[0] != previous_last)
            changes = np.concatenate(
                (c.astype(np.int64) * height + r + 1, c_top.astype(np.int64) * height)
            )
            changes.sort()
        if changes.size:
            self._transitions.append(changes + self.width * self.height)
        self._last = bool(fg[-1, -1])
        self.width += width

    def runs(self) -> np.ndarray:
        """The runs so far as an ``(N, 2)`` array of 0-based ``[start, end)`` flat intervals."""
        if self._transitions:
            t = np.concatenate(self._transitions)
        else:
            t = np.zeros(0, dtype=np.int64)
        if self._last:
            t = np.concatenate((t, [self.width * self.height]))
        return t.reshape(-1, 2)

    def encode(self) -> str:
        """The RLE string of everything added so far."""
        return runs_to_rle(self.runs())


def rle_encode(mask: np.ndarray) -> str:
    """Encode a whole ``(height, width)`` mask (non-zero = 1) as a Kaggle RLE string."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D (height, width), got shape {mask.shape}")
    encoder = RLEStripEncoder(mask.shape[0])
    encoder.add(mask)
    return encoder.encode()


def rle_area(runs: np.ndarray) -> int:
    """Number of foreground pixels of parsed runs."""
    runs = np.asarray(runs).reshape(-1, 2)
    return int((runs[:, 1] - runs[:, 0]).sum())


def runs_intersection(a: np.ndarray, b: np.ndarray) -> int:
    """Pixels in both of two parsed RLE masks (sorted, disjoint runs), without any mask.

    For each run of ``b`` the runs of ``a`` it overlaps are a contiguous range (binary search);
    their total length comes from a prefix sum, minus what sticks out at both ends. Memory is
    O(runs), vectorised.
    """
    a = np.asarray(a, dtype=np.int64).reshape(-1, 2)
    b = np.asarray(b, dtype=np.int64).reshape(-1, 2)
    if not len(a) or not len(b):
        return 0
    a_start, a_end = a[:, 0], a[:, 1]
    cumulative = np.concatenate(([0], np.cumsum(a_end - a_start)))
    first = np.searchsorted(a_end, b[:, 0], side="right")  # first run of a ending after b's start
    stop = np.searchsorted(a_start, b[:, 1], side="left")  # first run of a starting at/after b's end
    hit = stop > first
    first, stop, start, end = first[hit], stop[hit], b[hit, 0], b[hit, 1]
    total = cumulative[stop] - cumulative[first]
    total -= np.maximum(0, start - a_start[first])
    total -= np.maximum(0, a_end[stop - 1] - end)
    return int(total.sum())


def intersect_runs(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The runs of the pixels in both of two parsed RLE masks (sorted, disjoint runs): each run
    of ``b`` cut to the runs of ``a`` it overlaps (binary search), vectorised."""
    a = np.asarray(a, dtype=np.int64).reshape(-1, 2)
    b = np.asarray(b, dtype=np.int64).reshape(-1, 2)
    if not len(a) or not len(b):
        return _EMPTY_RUNS.copy()
    first = np.searchsorted(a[:, 1], b[:, 0], side="right")
    counts = np.maximum(0, np.searchsorted(a[:, 0], b[:, 1], side="left") - first)
    owner = np.repeat(np.arange(len(b)), counts)
    which = first[owner] + (np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts))
    start = np.maximum(a[which, 0], b[owner, 0])
    end = np.minimum(a[which, 1], b[owner, 1])
    keep = end > start
    return np.stack((start[keep], end[keep]), axis=1)


def dice_from_counts(intersection: float, total: float) -> float:
    """``2 |P n G| / (|P| + |G|)``; two empty masks score 1."""
    return 1.0 if total == 0 else 2.0 * intersection / total


def rle_dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two parsed RLE masks; two empty masks score 1."""
    return dice_from_counts(runs_intersection(a, b), rle_area(a) + rle_area(b))
