"""Slides held in memory: an image as a one-level slide (:class:`ArraySlide`), and any slide
resampled to another scale, read region by region (:class:`ResampledSlide`)."""
from __future__ import annotations

import math

import cv2
import numpy as np

from data.readers.base import LevelInfo, PixelSize, Slide, SlideError, to_rgb

__all__ = ["ArraySlide", "ResampledSlide"]


class ArraySlide(Slide):
    """An in-memory image as a one-level slide (pairs mode, tests)."""

    def __init__(self, image: np.ndarray, path: str = "<memory>"):
        self.path = path
        image = np.asarray(image)
        if image.ndim == 2:
            image = image[:, :, None]
        if image.ndim != 3 or image.shape[2] not in (1, 3, 4):
            raise SlideError(f"{path}: expected an (H, W), (H, W, 3) or (H, W, 4) image, got {image.shape}")
        if image.dtype != np.uint8:
            raise SlideError(f"{path}: unsupported bit depth {image.dtype} (only 8-bit images are supported)")
        self._image = image
        self.levels = [LevelInfo((image.shape[0], image.shape[1]), 1.0)]

    def _read_raw(self, level, y0, y1, x0, x1):
        return to_rgb(self._image[y0:y1, x0:x1], self._image.shape[2])


class ResampledSlide(Slide):
    """``base`` resampled by ``scale`` (base level-0 px per new px; > 1 shrinks): one level,
    read region by region from the base's nearest pyramid level below the scale, resized
    (``INTER_AREA`` shrinking, ``INTER_LINEAR`` enlarging). Regions are aligned to within one
    base pixel (each read rounds its source box outward). Used to bring slides of different
    pixel sizes to one physical scale."""

    def __init__(self, base: Slide, scale: float):
        if not scale > 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        self.base, self.scale, self.path = base, float(scale), base.path
        h, w = base.shape
        self.levels = [LevelInfo((max(1, round(h / scale)), max(1, round(w / scale))), 1.0)]
        if base.pixel_size is not None:
            self.pixel_size = PixelSize(base.pixel_size.mpp * scale, base.pixel_size.source + f", resampled x{1 / scale:.4g}")
        self.mpp_note = base.mpp_note

    def _read_raw(self, level, y0, y1, x0, x1):
        g = self.scale
        src = self.base.best_level(g)
        d = self.base.levels[src].downsample
        lh, lw = self.base.levels[src].shape
        sy0, sy1 = max(0, math.floor(y0 * g / d)), min(lh, max(math.floor(y0 * g / d) + 1, math.ceil(y1 * g / d)))
        sx0, sx1 = max(0, math.floor(x0 * g / d)), min(lw, max(math.floor(x0 * g / d) + 1, math.ceil(x1 * g / d)))
        region = self.base.read_level(src, sy0, sx0, sy1 - sy0, sx1 - sx0)
        shrink = (sy1 - sy0) > (y1 - y0)
        return cv2.resize(region, (x1 - x0, y1 - y0), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)

    def chunk_cols(self, level: int) -> int:
        """The base's chunk width in this slide's pixels (a read of some columns decodes the
        base chunks they touch)."""
        src = self.base.best_level(self.scale)
        return max(1, math.ceil(self.base.chunk_cols(src) * self.base.levels[src].downsample / self.scale))

    def close(self) -> None:
        self.base.close()

