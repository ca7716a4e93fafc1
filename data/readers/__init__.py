"""The one package that reads slides and images.

``open_slide(path)`` returns a :class:`Slide`, picking the backend by the path (or
``INPUT.SLIDE_READER``):

* :mod:`data.readers.tiff`: TIFF, BigTIFF, tiled or stripped, pyramidal, OME-TIFF, SVS, NDPI,
  SCN, BIF, with tifffile (lazy: only the tiles a region touches are decoded);
* :mod:`data.readers.openslide_reader`: MRXS, VMS/VMU and whatever tifffile cannot read;
* :mod:`data.readers.dicom`: DICOM WSI (a folder of ``.dcm`` instances, or one file);
* :mod:`data.readers.memory`: in-memory images (pairs mode, PNG/JPEG) and resampled slides.

:mod:`data.readers.base` holds the :class:`Slide` contract (RGB uint8 reads, column strips,
:data:`NO_DATA` for pixels without data) and :mod:`data.readers.pixel_size` the pixel size
from metadata. Backends import only the base, never each other or this module.
"""
from __future__ import annotations

import logging
import os
from typing import Tuple

import cv2
import numpy as np

from config.choices import MAX_MPP, SLIDE_READERS
from data.readers.base import (NO_DATA, OPENSLIDE_ONLY, SLIDE_EXTENSIONS, LevelInfo, PixelSize, Slide, SlideError,
                                same_scale)
from data.readers.dicom import DicomSlide, is_dicom_slide
from data.readers.memory import ArraySlide, ResampledSlide
from data.readers.openslide_reader import OpenSlideSlide, openslide_knows
from data.readers.pixel_size import check_mpp, choose_mpp, image_pixel_size, resolve_mpp, tiff_pixel_size
from data.readers.tiff import TiffSlide

__all__ = ["SlideError", "LevelInfo", "PixelSize", "Slide", "NO_DATA", "ArraySlide", "ResampledSlide", "TiffSlide",
           "OpenSlideSlide", "DicomSlide", "SLIDE_READERS", "SLIDE_EXTENSIONS", "MAX_MPP", "open_slide",
           "open_image_slide", "decode_image", "read_image", "check_mpp", "choose_mpp", "resolve_mpp",
           "tiff_pixel_size", "image_pixel_size", "same_scale"]

logger = logging.getLogger(__name__)


def open_slide(path: str, workers: int = 0, channels: Tuple[int, ...] = (), backend: str = "auto") -> Slide:
    """Open a slide: TIFF family (``.tif``, ``.tiff``, ``.svs``, OME-TIFF, BigTIFF, NDPI, SCN, BIF)
    with tifffile; MRXS, VMS/VMU with OpenSlide; DICOM WSI (a folder of ``.dcm`` instances or one
    ``.dcm`` file) with wsidicom. ``backend`` ``auto`` (the default) picks by the path and also
    tries OpenSlide on a file tifffile cannot read; ``tifffile`` / ``openslide`` / ``wsidicom``
    force one. ``channels`` (three indices) reads a multi-channel (fluorescence) TIFF slide's
    channels as R, G, B; without it such a slide is refused."""
    if backend not in SLIDE_READERS:
        raise SlideError(f"{path}: unknown slide reader {backend!r} (INPUT.SLIDE_READER: {', '.join(SLIDE_READERS)})")
    path = str(path)
    dicom = backend == "wsidicom" or (backend == "auto" and is_dicom_slide(path))
    if dicom or backend == "openslide" or (backend == "auto" and path.lower().endswith(OPENSLIDE_ONLY)):
        if channels:
            raise SlideError(f"{path}: INPUT.CHANNELS is for multi-channel TIFF slides, not "
                             f"{'DICOM' if dicom else 'OpenSlide'}'s RGB ones")
        return DicomSlide(path, workers=workers) if dicom else OpenSlideSlide(path)
    try:
        return TiffSlide(path, workers=workers, channels=channels)
    except SlideError as exc:
        if backend == "auto" and not channels and os.path.isfile(path) and openslide_knows(path):
            logger.info("%s: tifffile cannot read it (%s); reading it with OpenSlide", path, exc)
            return OpenSlideSlide(path)
        raise


def read_image(path: str) -> np.ndarray:
    """Read a whole image file (PNG, JPEG, TIFF, ...) as ``(H, W, 3)`` RGB uint8.

    Grayscale and RGBA are converted to RGB (with a logged warning); other bit depths and
    channel counts raise :class:`SlideError`.
    """
    path = str(path)
    if not os.path.isfile(path):
        raise SlideError(f"{path}: file not found")
    if path.lower().endswith(SLIDE_EXTENSIONS):
        with open_slide(path) as slide:
            h, w = slide.shape
            return slide.read_level(0, 0, 0, h, w)
    image = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    if image is None:
        raise SlideError(f"{path}: not a readable image or corrupt")
    if image.dtype != np.uint8:
        raise SlideError(f"{path}: unsupported bit depth {image.dtype} (only 8-bit images are supported)")
    if image.ndim == 2:
        logger.warning("%s: grayscale image; read as RGB with equal channels", path)
        return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    if image.shape[2] == 4:
        logger.warning("%s: RGBA image; the alpha channel is ignored", path)
        return cv2.cvtColor(image, cv2.COLOR_BGRA2RGB)
    if image.shape[2] == 3:
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    raise SlideError(f"{path}: {image.shape[2]} channels; expected RGB")


def open_image_slide(path: str, channels: Tuple[int, ...] = (), backend: str = "auto") -> Slide:
    """A slide or a plain image as a :class:`Slide`: TIFF-family files and DICOM through
    :func:`open_slide` (lazy, with their metadata), other images (PNG, JPEG, BMP) read whole,
    with the pixel size of their header."""
    if path.lower().endswith(SLIDE_EXTENSIONS) or os.path.isdir(path):
        return open_slide(path, channels=channels, backend=backend)
    slide = ArraySlide(read_image(path), path)
    slide.pixel_size, slide.mpp_note = image_pixel_size(path)
    return slide


def decode_image(data: bytes, name: str) -> np.ndarray:
    """An image file's bytes (PNG, JPEG, ...) as ``(H, W, 3)`` RGB uint8; ``name`` is given in
    errors (e.g. the annotation file that embeds the image)."""
    image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise SlideError(f"{name}: the embedded image is not a readable PNG/JPEG or is corrupt")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
