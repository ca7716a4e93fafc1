"""Slides read with OpenSlide: MRXS, VMS/VMU, and every format it knows (the ``auto`` reader's
fallback for a file tifffile cannot read)."""
from __future__ import annotations

import logging
import math
import os

import numpy as np

from data.readers.base import NO_DATA, OPENSLIDE_INSTALL, LevelInfo, PixelSize, Slide, SlideError

__all__ = ["OpenSlideSlide", "openslide_knows"]

logger = logging.getLogger(__name__)


class OpenSlideSlide(Slide):
    """A slide read with OpenSlide (MRXS, VMS/VMU, and every format it knows): levels, region
    reads and pixel size as the TIFF reader's. Pixels OpenSlide reports as transparent (no
    scanned data, e.g. between MRXS fields) read as :data:`NO_DATA`, as in every reader."""

    def __init__(self, path: str):
        self.path = str(path)
        try:
            import openslide
        except ImportError:
            raise SlideError(f"{self.path}: reading this format needs OpenSlide: {OPENSLIDE_INSTALL}") from None
        if not os.path.exists(self.path):
            raise SlideError(f"{self.path}: file not found")
        data = os.path.join(os.path.splitext(self.path)[0], "Slidedat.ini")
        if self.path.lower().endswith(".mrxs") and not os.path.isfile(data):
            raise SlideError(f"{self.path}: MRXS without its data folder ({data} not found; copy the folder "
                             "of the same name with the .mrxs file)")
        try:
            self._osr = openslide.OpenSlide(self.path)
        except openslide.OpenSlideUnsupportedFormatError:
            raise SlideError(f"{self.path}: not a slide format OpenSlide knows") from None
        except (openslide.OpenSlideError, OSError) as exc:  # a known format, broken (an MRXS without its data...)
            hint = (f"; an MRXS slide needs its data folder ({os.path.splitext(self.path)[0]}/ with Slidedat.ini) "
                    "beside it" if self.path.lower().endswith(".mrxs") else "")
            raise SlideError(f"{self.path}: OpenSlide cannot read it ({exc}){hint}") from None
        osr = self._osr
        self.levels = [LevelInfo((int(h), int(w)), float(d)) for (w, h), d in zip(osr.level_dimensions,
                                                                                   osr.level_downsamples)]
        props = osr.properties
        try:
            mpp = (float(props["openslide.mpp-x"]) + float(props["openslide.mpp-y"])) / 2
            self.pixel_size = PixelSize(mpp, f"OpenSlide ({props.get('openslide.vendor', '?')}) mpp-x/y")
        except (KeyError, ValueError):
            self.mpp_note = "no pixel size in its metadata (OpenSlide)"
        self._tile_rows = [int(props.get(f"openslide.level[{k}].tile-height", 256) or 256)
                           for k in range(len(self.levels))]
        self._tile_cols = [int(props.get(f"openslide.level[{k}].tile-width", 256) or 256)
                           for k in range(len(self.levels))]

    def chunk_rows(self, level: int) -> int:
        return self._tile_rows[level]

    def chunk_cols(self, level: int) -> int:
        return self._tile_cols[level]

    def _read_raw(self, level, y0, y1, x0, x1):
        d = self.levels[level].downsample
        # level-0 origin of level pixel (y0, x0): the smallest whose level position is >= it, so
        # a non-integer downsample (2.0005) does not land one pixel short
        region = np.asarray(self._osr.read_region((math.ceil(x0 * d - 1e-6), math.ceil(y0 * d - 1e-6)), level,
                                                  (x1 - x0, y1 - y0)))
        rgb = np.ascontiguousarray(region[..., :3])
        rgb[region[..., 3] == 0] = NO_DATA
        return rgb

    def describe(self) -> str:
        return super().describe() + f" (OpenSlide, {self._osr.properties.get('openslide.vendor', '?')})"

    def close(self) -> None:
        osr = getattr(self, "_osr", None)
        if osr is not None:
            osr.close()
            self._osr = None


def openslide_knows(path: str) -> bool:
    """Whether OpenSlide is installed and recognises the file's format."""
    try:
        import openslide
    except ImportError:
        return False
    try:
        return openslide.OpenSlide.detect_format(path) is not None
    except (openslide.OpenSlideError, OSError, ValueError) as exc:
        logger.info("%s: OpenSlide cannot tell its format (%s: %s)", path, type(exc).__name__, exc)
        return False

