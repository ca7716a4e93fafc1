"""The slide reader's base: :class:`Slide` (a multi-resolution RGB image addressed in level-0
``(row, col)`` pixels), its value types and the rules every reader keeps.

Every read returns RGB ``uint8`` arrays of shape ``(rows, cols, 3)``. Coordinates are always
``(row, col)`` = ``(y, x)``; level-0 coordinates unless a method says otherwise.

**Pixels without data read as** :data:`NO_DATA` (0, black) in every reader: a region past the
slide's edge (how the tiler's zero padding is expressed), the missing tiles of a sparse TIFF,
what OpenSlide reports as transparent (between MRXS fields) and the tiles a DICOM WSI leaves
out. The tissue filters treat it as background.

**Every reader reads column strips**: :meth:`Slide.iter_strips` with ``cols`` decodes only the
storage chunks of those columns, and :meth:`Slide.chunk_cols` says how wide a chunk is, so the
tiler can read a wide slide in column panels whatever the reader (its memory stays flat in the
slide's width).

Anything that is not a readable 8-bit RGB (or grayscale/RGBA) slide raises :class:`SlideError`
with a message that names the file.
"""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator, List, Optional, Tuple

import cv2
import numpy as np

from config.choices import SAME_SCALE_TOLERANCE

__all__ = ["SlideError", "PixelSize", "LevelInfo", "Slide", "NO_DATA", "SLIDE_EXTENSIONS", "OPENSLIDE_ONLY",
           "OPENSLIDE_INSTALL", "to_rgb", "same_scale"]

# What a pixel without data reads as, in every reader.
NO_DATA = 0
# A DICOM WSI is also a folder of ``.dcm`` instances (data.readers.dicom.is_dicom_folder).
SLIDE_EXTENSIONS = (".tiff", ".tif", ".svs", ".ome.tif", ".ome.tiff", ".btf", ".tf8", ".ndpi", ".scn", ".bif",
                    ".mrxs", ".vms", ".vmu", ".svslide", ".dcm")
# Formats tifffile cannot read: OpenSlide reads them (auto backend).
OPENSLIDE_ONLY = (".mrxs", ".vms", ".vmu", ".svslide")
OPENSLIDE_INSTALL = "python -m pip install openslide-python openslide-bin"


class SlideError(ValueError):
    """A slide or image that cannot be read; the message starts with the file path."""


def same_scale(a: float, b: float) -> bool:
    """Whether two scales (downsamples, factors, pixel sizes) are the same, within
    :data:`config.choices.SAME_SCALE_TOLERANCE` of the larger: the one rule for it."""
    return abs(a - b) <= SAME_SCALE_TOLERANCE * max(abs(a), abs(b))


@dataclass(frozen=True)
class PixelSize:
    """A pixel size in µm/px (the mean of the x and y sizes) and where it was read."""

    mpp: float
    source: str


@dataclass(frozen=True)
class LevelInfo:
    """One pyramid level: its ``(height, width)`` and downsample relative to level 0."""

    shape: Tuple[int, int]
    downsample: float


def to_rgb(region: np.ndarray, channels: int) -> np.ndarray:
    """``(h, w, channels)`` -> ``(h, w, 3)``: grayscale is repeated, alpha is dropped."""
    if channels == 3:
        return np.ascontiguousarray(region)
    if channels == 1:
        return np.ascontiguousarray(np.repeat(region[..., :1], 3, axis=2))
    return np.ascontiguousarray(region[..., :3])



class Slide:
    """Base class: a multi-resolution RGB image addressed in level-0 ``(row, col)`` pixels."""

    path: str = "<memory>"
    levels: List[LevelInfo]
    # Level 0's pixel size from the file's metadata (None when it has none); ``mpp_note`` says
    # why it is missing.
    pixel_size: Optional[PixelSize] = None
    mpp_note: str = "no pixel size in its metadata"

    # --- to implement -------------------------------------------------------------------
    def _read_raw(self, level: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Rows ``y0:y1``, cols ``x0:x1`` of ``level`` (inside the level) as ``(h, w, 3)``."""
        raise NotImplementedError

    def chunk_rows(self, level: int) -> int:
        """Rows of one storage chunk (tile or strip) of ``level``: reads aligned to this
        decode each chunk once."""
        return 512

    def chunk_cols(self, level: int) -> int:
        """Columns of one storage chunk of ``level``: a read of some columns decodes this many
        (a tile's width; the level's width for a TIFF stored in full-width strips). Readers that
        read any columns without decoding others (in memory, OpenSlide's region reads) say 1."""
        return 1

    # --- public API ----------------------------------------------------------------------
    @property
    def shape(self) -> Tuple[int, int]:
        """``(height, width)`` of level 0."""
        return self.levels[0].shape

    def best_level(self, downscale: float) -> int:
        """The pyramid level with the largest downsample that is not above ``downscale``."""
        best = 0
        for index, level in enumerate(self.levels):
            if level.downsample <= downscale or same_scale(level.downsample, downscale):
                if level.downsample > self.levels[best].downsample:
                    best = index
        return best

    def read_level(self, level: int, y: int, x: int, h: int, w: int) -> np.ndarray:
        """A ``(h, w, 3)`` region of ``level`` in that level's pixels; outside reads as :data:`NO_DATA`."""
        lh, lw = self.levels[level].shape
        out_of_bounds = y < 0 or x < 0 or y + h > lh or x + w > lw
        y0, y1 = max(y, 0), min(y + h, lh)
        x0, x1 = max(x, 0), min(x + w, lw)
        if not out_of_bounds:
            return self._checked_read(level, y0, y1, x0, x1)
        out = np.full((max(h, 0), max(w, 0), 3), NO_DATA, dtype=np.uint8)
        if y1 > y0 and x1 > x0:
            out[y0 - y:y1 - y, x0 - x:x1 - x] = self._checked_read(level, y0, y1, x0, x1)
        return out

    def read(self, y: int, x: int, h: int, w: int, downscale: float = 1.0) -> np.ndarray:
        """Read the level-0 region ``(y, x, h, w)`` downscaled by ``downscale``.

        Uses the pyramid level nearest below ``downscale``, then resizes the rest with
        ``cv2.INTER_AREA``. Returns ``(round(h / downscale), round(w / downscale), 3)``.
        On level 0 with an integer ``downscale`` dividing ``h`` and ``w`` this equals
        ``cv2.resize(zero_padded_slide[y:y+h, x:x+w], ..., INTER_AREA)`` exactly.
        """
        if downscale <= 0:
            raise ValueError(f"downscale must be > 0, got {downscale}")
        out_h, out_w = max(1, round(h / downscale)), max(1, round(w / downscale))
        level = self.best_level(downscale)
        lh, lw = self.levels[level].shape
        fy, fx = self.shape[0] / lh, self.shape[1] / lw
        ly0, ly1 = round(y / fy), round((y + h) / fy)
        lx0, lx1 = round(x / fx), round((x + w) / fx)
        region = self.read_level(level, ly0, lx0, max(1, ly1 - ly0), max(1, lx1 - lx0))
        if region.shape[:2] != (out_h, out_w):
            region = cv2.resize(region, (out_w, out_h), interpolation=cv2.INTER_AREA)
        return region

    def iter_strips(
        self, level: int = 0, min_rows: int = 512, reuse_buffer: bool = False, cols: Optional[Tuple[int, int]] = None
    ) -> Iterator[Tuple[int, np.ndarray]]:
        """Yield ``(y0, strip)`` strips of ``level`` from top to bottom: full width, or the
        columns ``cols = (x0, x1)`` (inside the level).

        Strip heights are a multiple of the storage chunk height, so each chunk is decoded
        once; the next strip is decoded in a background thread while the caller works.
        ``reuse_buffer=True`` lets a reader fill the same array again for the next strip
        (no page faults for every strip): the caller must be done with a strip before it
        asks for the next one.
        """
        lh, lw = self.levels[level].shape
        x0, x1 = cols if cols is not None else (0, lw)
        chunk = max(1, int(self.chunk_rows(level)))
        step = chunk * max(1, math.ceil(min_rows / chunk))
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="strip") as pool:
            future = pool.submit(self._checked_read, level, 0, min(step, lh), x0, x1)
            for y0 in range(0, lh, step):
                strip = future.result()
                nxt = y0 + step
                if nxt < lh:
                    future = pool.submit(self._checked_read, level, nxt, min(nxt + step, lh), x0, x1)
                yield y0, strip

    def describe(self) -> str:
        h, w = self.shape
        downs = ", ".join(f"{lv.downsample:g}" for lv in self.levels)
        size = (f"{self.pixel_size.mpp:.4g} um/px ({self.pixel_size.source})" if self.pixel_size
                else f"pixel size unknown ({self.mpp_note})")
        return f"{w} x {h} px (W x H), {len(self.levels)} level(s) at downsample {downs}, {size}"

    def close(self) -> None:
        pass

    def __enter__(self) -> "Slide":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- internals -----------------------------------------------------------------------
    def _checked_read(self, level: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        try:
            region = self._read_raw(level, y0, y1, x0, x1)
        except SlideError:
            raise
        except Exception as exc:
            raise SlideError(
                f"{self.path}: cannot decode rows {y0}:{y1}, cols {x0}:{x1} of level {level} "
                f"(corrupt or truncated file?): {type(exc).__name__}: {exc}"
            ) from exc
        return region

