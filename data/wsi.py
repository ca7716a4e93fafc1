"""The one seam that reads slides and images.

``open_slide(path)`` returns a :class:`Slide` for TIFF, BigTIFF, tiled or stripped, pyramidal
(SubIFDs, reduced pages, SVS levels) and OME-TIFF files, read lazily with tifffile + zarr (or a
memory map for uncompressed contiguous data): only the tiles or strips a region touches are
decoded. MRXS, VMS and other formats tifffile cannot read go to OpenSlide
(:class:`OpenSlideSlide`), DICOM WSI to wsidicom (:class:`data.dicom.DicomSlide`). Every read returns RGB ``uint8`` arrays of shape ``(rows, cols, 3)``.

Coordinates are always ``(row, col)`` = ``(y, x)``; level-0 coordinates unless a method says
otherwise. Regions may extend past the slide: the outside reads as 0 (black), which is how
the tiler's zero padding is expressed.

Anything that is not a readable 8-bit RGB (or grayscale/RGBA) slide raises :class:`SlideError`
with a message that names the file.

Each slide also reports its pixel size (``Slide.pixel_size``: µm/px of level 0 and where it was
read: SVS ``MPP``, OME-XML ``PhysicalSize``, Philips ``DICOM_PIXEL_SPACING``, TIFF/NDPI resolution
tags), or None with ``Slide.mpp_note`` saying why; :func:`resolve_mpp` applies a config key over it.
"""
from __future__ import annotations

import logging
import math
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator, List, Optional, Tuple

import cv2
import numpy as np

__all__ = [
    "SlideError",
    "LevelInfo",
    "Slide",
    "ArraySlide",
    "ResampledSlide",
    "TiffSlide",
    "OpenSlideSlide",
    "SLIDE_READERS",
    "open_slide",
    "open_image_slide",
    "decode_image",
    "read_image",
    "SLIDE_EXTENSIONS",
    "MAX_MPP",
    "PixelSize",
    "check_mpp",
    "choose_mpp",
    "resolve_mpp",
    "tiff_pixel_size",
    "image_pixel_size",
]

logger = logging.getLogger(__name__)

# A DICOM WSI is also a folder of ``.dcm`` instances (data.dicom.is_dicom_folder).
SLIDE_EXTENSIONS = (".tiff", ".tif", ".svs", ".ome.tif", ".ome.tiff", ".btf", ".tf8", ".ndpi", ".scn", ".bif",
                    ".mrxs", ".vms", ".vmu", ".svslide", ".dcm")
# Formats tifffile cannot read: OpenSlide reads them (auto backend).
OPENSLIDE_ONLY = (".mrxs", ".vms", ".vmu", ".svslide")
SLIDE_READERS = ("auto", "tifffile", "openslide", "wsidicom")
OPENSLIDE_INSTALL = "python -m pip install openslide-python openslide-bin"
# A pyramid level counts as "below" a requested downscale within this relative tolerance
# (SVS levels are often 4.0003x rather than 4x).
LEVEL_TOLERANCE = 0.01


class SlideError(ValueError):
    """A slide or image that cannot be read; the message starts with the file path."""


# Largest plausible pixel size (µm/px): a 100 µm pixel is already coarser than a glomerulus.
MAX_MPP = 100.0


@dataclass(frozen=True)
class PixelSize:
    """A pixel size in µm/px (the mean of the x and y sizes) and where it was read."""

    mpp: float
    source: str


def check_mpp(value: float, where: str) -> float:
    """``value`` when it is a possible pixel size (0 < value <= :data:`MAX_MPP` µm/px), else a
    :class:`SlideError` naming ``where`` (a slide and its metadata, or a config key)."""
    if not (value > 0 and value <= MAX_MPP):  # also rejects NaN
        raise SlideError(f"{where}: pixel size {value:g} um/px is impossible (expected > 0 and <= {MAX_MPP:g})")
    return float(value)


_OME_UNITS_UM = {"pm": 1e-6, "nm": 1e-3, "µm": 1.0, "um": 1.0, "\u00b5m": 1.0, "mm": 1e3, "cm": 1e4, "m": 1e6,
                 "Å": 1e-4, "angstrom": 1e-4}


def _ome_pixel_size(xml: str):
    """``(x, y, description)`` µm/px from OME-XML ``Pixels PhysicalSizeX/Y`` (+ units), or None."""
    found = {}
    for axis in "XY":
        match = re.search(rf'<(?:\w+:)?Pixels\b[^>]*?\bPhysicalSize{axis}="([^"]+)"', xml)
        if not match:
            return None
        unit = re.search(rf'<(?:\w+:)?Pixels\b[^>]*?\bPhysicalSize{axis}Unit="([^"]+)"', xml)
        unit_name = unit.group(1) if unit else "µm"  # OME's default unit
        if unit_name not in _OME_UNITS_UM:
            return None
        found[axis] = float(match.group(1)) * _OME_UNITS_UM[unit_name]
    return found["X"], found["Y"], "OME-XML PhysicalSizeX/Y"


def tiff_pixel_size(tif, page) -> Tuple[Optional[PixelSize], str]:
    """Level 0's pixel size from a tifffile ``TiffFile`` and its first page: SVS ``MPP =``,
    OME-XML ``PhysicalSizeX/Y``, Philips ``DICOM_PIXEL_SPACING``, then the TIFF X/YResolution
    tags with their ResolutionUnit (NDPI stores its size there, in centimetres).

    Returns ``(PixelSize or None, note)``: the note says why nothing was taken. A metadata value
    that is there but impossible is returned as is (checked by :func:`resolve_mpp`, so that a
    config key can still replace it). Resolution tags in inches that give more than
    :data:`MAX_MPP` µm/px (72, 96, 150 dpi...) are a display resolution, not a pixel size."""
    description = page.description or ""
    if getattr(tif, "is_svs", False):
        match = re.search(r"\bMPP\s*=\s*([-+0-9.eE]+)", description)
        if match:
            return PixelSize(float(match.group(1)), "SVS MPP in ImageDescription"), ""
    xml = getattr(tif, "ome_metadata", None) if getattr(tif, "is_ome", False) else None
    if xml:
        found = _ome_pixel_size(xml)
        if found:
            return PixelSize((found[0] + found[1]) / 2, found[2]), ""
    match = re.search(r'DICOM_PIXEL_SPACING"[^>]*>\s*"?([0-9.eE+-]+)"?\s+"?([0-9.eE+-]+)', description)
    if match:  # Philips TIFF: row and column spacing in mm
        return PixelSize(500.0 * (float(match.group(1)) + float(match.group(2))), "Philips DICOM_PIXEL_SPACING"), ""
    tags = page.tags
    if "XResolution" not in tags or "YResolution" not in tags:
        return None, "no pixel size in its metadata"
    unit = int(tags["ResolutionUnit"].value) if "ResolutionUnit" in tags else 2  # TIFF's default: inch
    unit_um = {2: 25400.0, 3: 10000.0}.get(unit)
    if unit_um is None:
        return None, "resolution tags without a unit"
    sizes = []
    for name in ("XResolution", "YResolution"):
        value = tags[name].value
        per_unit = value[0] / value[1] if isinstance(value, tuple) and value[1] else float(value if not isinstance(value, tuple) else 0)
        if per_unit <= 0:
            return PixelSize(0.0, f"TIFF {name}"), ""
        sizes.append(unit_um / per_unit)
    mpp = (sizes[0] + sizes[1]) / 2
    name = "NDPI resolution tags" if getattr(tif, "is_ndpi", False) else "TIFF X/YResolution"
    if unit == 2 and mpp > MAX_MPP:
        return None, f"resolution tags of {25400.0 / mpp:g} dpi: a display resolution, not a pixel size"
    return PixelSize(mpp, f"{name} ({'inch' if unit == 2 else 'cm'})"), ""


def image_pixel_size(path: str) -> Tuple[Optional[PixelSize], str]:
    """The pixel size in an ordinary image's header (PNG pHYs, JPEG JFIF / EXIF density), read
    with Pillow without decoding; display resolutions (<= 254 dpi) are not pixel sizes."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            dpi = image.info.get("dpi")
    except Exception:
        return None, "no pixel size in its header"
    if not dpi or not all(float(v) > 0 for v in dpi[:2]):
        return None, "no pixel size in its header"
    mpp = 25400.0 / ((float(dpi[0]) + float(dpi[1])) / 2)
    if mpp > MAX_MPP:
        return None, f"a header resolution of {float(dpi[0]):g} dpi: a display resolution, not a pixel size"
    return PixelSize(mpp, "image header resolution"), ""


def choose_mpp(found: Optional[PixelSize], path: str, override: float, key: str) -> Optional[PixelSize]:
    """The pixel size to use for the file ``path`` whose metadata says ``found``: the config key
    ``key`` (``override`` > 0) wins over the metadata; an impossible value from either raises
    :class:`SlideError` naming its source; None when neither knows it."""
    if override:
        return PixelSize(check_mpp(override, key), key)
    if found is None:
        return None
    check_mpp(found.mpp, f"{path} ({found.source}; set {key} to override)")
    return found


def resolve_mpp(slide: "Slide", override: float, key: str) -> Optional[PixelSize]:
    """:func:`choose_mpp` for an open slide."""
    return choose_mpp(slide.pixel_size, slide.path, override, key)


@dataclass(frozen=True)
class LevelInfo:
    """One pyramid level: its ``(height, width)`` and downsample relative to level 0."""

    shape: Tuple[int, int]
    downsample: float


def _to_rgb(region: np.ndarray, channels: int) -> np.ndarray:
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
        """Columns of one storage chunk of ``level``: the level's width for strips (a read of
        some columns then decodes whole rows); a tile's width for tiled levels."""
        return self.levels[level].shape[1]

    # --- public API ----------------------------------------------------------------------
    @property
    def shape(self) -> Tuple[int, int]:
        """``(height, width)`` of level 0."""
        return self.levels[0].shape

    def best_level(self, downscale: float) -> int:
        """The pyramid level with the largest downsample that is not above ``downscale``."""
        best = 0
        for index, level in enumerate(self.levels):
            if level.downsample <= downscale * (1 + LEVEL_TOLERANCE):
                if level.downsample > self.levels[best].downsample:
                    best = index
        return best

    def read_level(self, level: int, y: int, x: int, h: int, w: int) -> np.ndarray:
        """A ``(h, w, 3)`` region of ``level`` in that level's pixels; outside reads as 0."""
        lh, lw = self.levels[level].shape
        out_of_bounds = y < 0 or x < 0 or y + h > lh or x + w > lw
        y0, y1 = max(y, 0), min(y + h, lh)
        x0, x1 = max(x, 0), min(x + w, lw)
        if not out_of_bounds:
            return self._checked_read(level, y0, y1, x0, x1)
        out = np.zeros((max(h, 0), max(w, 0), 3), dtype=np.uint8)
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
        return _to_rgb(self._image[y0:y1, x0:x1], self._image.shape[2])


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

    def close(self) -> None:
        self.base.close()


class _LogCapture(logging.Handler):
    """Collects the errors a library logs (tifffile reports bad IFDs by logging them)."""

    def __init__(self, name: str):
        super().__init__(level=logging.ERROR)
        self.messages: List[str] = []
        self._logger = logging.getLogger(name)

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def __enter__(self) -> "_LogCapture":
        self._propagate = self._logger.propagate
        self._logger.addHandler(self)
        self._logger.propagate = False
        return self

    def __exit__(self, *exc) -> None:
        self._logger.removeHandler(self)
        self._logger.propagate = self._propagate


class TiffSlide(Slide):
    """A TIFF-family slide read lazily with tifffile (+ zarr, or a memory map)."""

    def __init__(self, path: str, workers: int = 0, channels: Tuple[int, ...] = ()):
        import tifffile
        import zarr

        self.path = str(path)
        self._select = tuple(int(c) for c in channels)
        if not os.path.exists(self.path):
            raise SlideError(f"{self.path}: file not found")
        if not os.path.isfile(self.path):
            raise SlideError(f"{self.path}: not a file")
        workers = workers or os.cpu_count() or 1
        problems = _LogCapture("tifffile")
        with problems:
            try:
                self._tif = tifffile.TiffFile(self.path)
            except Exception as exc:
                raise SlideError(f"{self.path}: not a TIFF/SVS slide or corrupt ({exc})") from None
            try:
                len(self._tif.pages)  # walks every IFD: a truncated file shows here
                self._tif.series
            except Exception:
                pass  # reported below, or by _setup
        try:
            if problems.messages:
                raise SlideError(
                    f"{self.path}: corrupt or truncated TIFF ({problems.messages[0]})"
                )
            self._setup(tifffile, zarr, workers)
        except SlideError:
            self.close()
            raise
        except Exception as exc:
            self.close()
            raise SlideError(f"{self.path}: unreadable slide ({type(exc).__name__}: {exc})") from None

    def _setup(self, tifffile, zarr, workers: int) -> None:
        if not self._tif.series:
            raise SlideError(f"{self.path}: TIFF without any image")
        series = self._tif.series[0]
        file_size = os.path.getsize(self.path)
        self._workers = workers
        self._arrays = []
        self._direct = []  # per level: the page whose tiles/strips can be decoded directly
        self._index = []
        self._chunk_rows = []
        self.levels = []
        for k, level in enumerate(series.levels):
            axes, shape = level.axes, tuple(level.shape)
            if "Y" not in axes or "X" not in axes:
                raise SlideError(f"{self.path}: not a 2-D image (axes {axes}, shape {shape})")
            # Channels are the S or C axis; failing that (HuBMAP's (1, 1, 3, H, W) pages), the
            # one other non-singleton axis when it has 3 or 4 entries.
            extra = [i for i, (a, n) in enumerate(zip(axes, shape)) if a not in "YX" and n > 1]
            named = [i for i in extra if axes[i] in "SC"]
            if len(named) > 1 or (len(extra) > 1 and not named):
                raise SlideError(
                    f"{self.path}: shape {shape} (axes {axes}): more than one non-spatial axis; "
                    "expected a single 2-D RGB image"
                )
            channel_axis = named[0] if named else (extra[0] if extra and shape[extra[0]] in (3, 4) else None)
            for i in extra:
                if i != channel_axis:
                    raise SlideError(
                        f"{self.path}: {shape[i]} planes along axis {axes[i]!r} (shape {shape}, "
                        f"axes {axes}); expected a single 2-D RGB image"
                    )
            index, kept = [], []
            for i, axis in enumerate(axes):
                if axis in "YX":
                    index.append(None)
                    kept.append(axis)
                elif i == channel_axis:
                    index.append(slice(None))
                    kept.append("C")
                else:
                    index.append(0)
            channels = shape[channel_axis] if channel_axis is not None else 1
            if k == 0:
                self._check_channels(series, level, channels, axes[channel_axis] if channel_axis is not None else "",
                                     tifffile)
                if not self._select:
                    self._check_pixels(level, channels, tifffile)
            add_axis = "C" not in kept
            if add_axis:
                kept.append("C")
            self._channels = channels
            perm = tuple(kept.index(a) for a in "YXC")
            page = level.keyframe
            self._check_truncation(level, file_size)
            offset = level.dataoffset
            if offset is not None and page.compression == 1:
                array = np.memmap(self.path, dtype=np.uint8, mode="r", offset=offset, shape=shape)
                rows = 512
            else:
                array = zarr.open(series.aszarr(level=k, maxworkers=workers), mode="r")
                rows = int(array.chunks[axes.index("Y")])
            chunked = tuple(getattr(page, "chunked", (0, 0, 0)))
            self._direct.append(
                page if not self._select and level.dataoffset is None and len(level.pages) == 1
                and axes in ("YXS", "YX") and len(chunked) == 3 and chunked[-1] == 1
                and len(page.dataoffsets) == len(page.databytecounts) == chunked[0] * chunked[1]
                else None
            )
            self._arrays.append(array)
            self._index.append((tuple(index), perm, axes.index("Y"), axes.index("X"), add_axis))
            self._chunk_rows.append(rows)
            lh, lw = shape[axes.index("Y")], shape[axes.index("X")]
            if k == 0:
                h0, w0 = lh, lw
                self.pixel_size, self.mpp_note = tiff_pixel_size(self._tif, page)
            self.levels.append(LevelInfo((lh, lw), (h0 / lh + w0 / lw) / 2.0))

    def _named_channels(self, n: int) -> Optional[List[str]]:
        """The channels' names when the file gives them (OME-XML ``Channel Name``, PerkinElmer
        QPTIFF ``<Name>`` per page), else None."""
        xml = getattr(self._tif, "ome_metadata", None) if getattr(self._tif, "is_ome", False) else None
        if xml:
            names = re.findall(r'<(?:\w+:)?Channel\b[^>]*?\bName="([^"]*)"', xml)
            if len(names) == n and any(names):
                return names
        names = []
        for page in list(self._tif.pages)[:n]:
            match = re.search(r"<Name>([^<]*)</Name>", getattr(page, "description", "") or "")
            names.append(match.group(1) if match else "")
        return names if any(names) else None

    def _check_channels(self, series, level, channels: int, axis: str, tifffile) -> None:
        """Separate greyscale channels (fluorescence: QPTIFF, OME with named channels, channel
        pages, anything but 3 unnamed planes) are not RGB brightfield: refused, naming them, unless
        ``channels`` picks three to read as R, G, B. RGB(A), planar or interleaved, passes; so do
        3 unnamed greyscale planes (the ``(1, 1, 3, H, W)`` layout of HuBMAP slides), with a warning."""
        photometric = level.keyframe.photometric
        grey = photometric in (tifffile.PHOTOMETRIC.MINISBLACK, tifffile.PHOTOMETRIC.MINISWHITE)
        separate_series = [s for s in self._tif.series[1:] if tuple(s.shape) == tuple(series.shape)
                           and s.keyframe.photometric == photometric and s.dtype == series.dtype]
        if grey and channels == 1 and separate_series:  # one greyscale series per channel
            n = 1 + len(separate_series)
            names = self._named_channels(n) or [f"channel {i}" for i in range(n)]
            raise SlideError(
                f"{self.path}: {n} channels stored as separate greyscale images ({', '.join(names)}): a fluorescence "
                "slide, not RGB brightfield; convert it to one multi-channel OME-TIFF to pick three channels with "
                "INPUT.CHANNELS")
        if self._select and channels <= 1:
            raise SlideError(f"{self.path}: INPUT.CHANNELS {list(self._select)} set, but the slide has one channel")
        named = self._named_channels(channels) if channels > 1 else None
        rgb_names = named is not None and [n.strip().lower()[:1] for n in named] == ["r", "g", "b"]
        fluorescence = (grey and channels > 1 and (channels != 3 or (named is not None and not rgb_names)
                                                    or getattr(self._tif, "is_qpi", False))) \
            or (channels > 4 and photometric != tifffile.PHOTOMETRIC.RGB)
        if not fluorescence and not self._select:
            if grey and channels == 3:
                logger.warning("%s: 3 unnamed greyscale planes read as R, G, B (the HuBMAP layout); if it is a "
                               "fluorescence slide, INPUT.CHANNELS says which channel is which", self.path)
            return
        names = named or [f"channel {i}" for i in range(channels)]
        listed = ", ".join(f"{i}: {name}" for i, name in enumerate(names))
        if not self._select:
            raise SlideError(
                f"{self.path}: {channels} channels, each greyscale ({listed}): a fluorescence (multi-channel) slide, "
                "not RGB brightfield; set INPUT.CHANNELS to the three channel indices to read as R, G, B "
                "(e.g. [0, 1, 2]) to use it anyway")
        if len(self._select) != 3 or not all(0 <= c < channels for c in self._select):
            raise SlideError(f"{self.path}: INPUT.CHANNELS {list(self._select)}: expected three indices among "
                             f"{listed}")
        if series.dtype != np.uint8:
            raise SlideError(f"{self.path}: unsupported bit depth {series.dtype} (only 8-bit channels are "
                             "supported; convert it to 8 bits per channel)")
        logger.warning("%s: channels %s read as R, G, B (INPUT.CHANNELS)", self.path,
                       ", ".join(names[c] for c in self._select))

    def _check_pixels(self, level, channels: int, tifffile) -> None:
        page = level.keyframe
        photometric = page.photometric
        if photometric == tifffile.PHOTOMETRIC.PALETTE:
            raise SlideError(f"{self.path}: palette (indexed-colour) images are not supported; save as RGB")
        if photometric == tifffile.PHOTOMETRIC.SEPARATED:
            raise SlideError(f"{self.path}: CMYK images are not supported; save as RGB")
        if channels == 4 and photometric != tifffile.PHOTOMETRIC.RGB:
            raise SlideError(
                f"{self.path}: 4 channels that are not RGB + alpha: multi-channel "
                "(fluorescence) images are not supported (expected RGB brightfield)"
            )
        if channels not in (1, 3, 4):
            raise SlideError(
                f"{self.path}: {channels} channels: multi-channel (fluorescence) images are not "
                "supported (expected RGB brightfield)"
            )
        if level.dtype != np.uint8:
            raise SlideError(
                f"{self.path}: unsupported bit depth {level.dtype} (only 8-bit RGB slides are "
                "supported; convert it to 8 bits per channel)"
            )
        if channels == 4:
            logger.warning("%s: RGBA slide; the alpha channel is ignored", self.path)
        elif channels == 1:
            logger.warning("%s: grayscale slide; it is read as RGB with equal channels", self.path)

    def _check_truncation(self, level, file_size: int) -> None:
        for page in level.pages:
            if page is None:
                continue
            offsets = getattr(page, "dataoffsets", ()) or ()
            counts = getattr(page, "databytecounts", ()) or ()
            ends = [o + c for o, c in zip(offsets, counts) if c]
            if ends and max(ends) > file_size:
                raise SlideError(
                    f"{self.path}: truncated file: image data ends at byte {max(ends)} but the "
                    f"file has {file_size} bytes"
                )

    def chunk_rows(self, level: int) -> int:
        return self._chunk_rows[level]

    def chunk_cols(self, level: int) -> int:
        page = self._direct[level]
        if page is not None:
            return int(page.chunks[1])
        array = self._arrays[level]
        if isinstance(array, np.memmap):
            return 1  # any columns of a memory map are read without decoding anything else
        return int(array.chunks[self._index[level][3]])

    def iter_strips(
        self, level: int = 0, min_rows: int = 512, reuse_buffer: bool = False, cols: Optional[Tuple[int, int]] = None
    ) -> Iterator[Tuple[int, np.ndarray]]:
        """As :meth:`Slide.iter_strips`; for a tiled or stripped page, its tiles are decoded
        directly with tifffile on a thread pool (faster than going through zarr), the next
        strip's tiles while the caller works on this one; with ``cols``, only the tiles of those
        columns."""
        page = self._direct[level]
        if page is None:
            yield from super().iter_strips(level, min_rows, cols=cols)
            return
        try:
            yield from self._iter_direct(page, level, min_rows, reuse_buffer, cols)
        except SlideError:
            raise
        except Exception as exc:  # a corrupt tile table, a short read...
            raise SlideError(
                f"{self.path}: cannot read level {level} (corrupt or truncated file?): "
                f"{type(exc).__name__}: {exc}"
            ) from exc

    def _iter_direct(self, page, level: int, min_rows: int, reuse_buffer: bool, cols=None):
        lh, lw = self.levels[level].shape
        seg_h, seg_w = int(page.chunks[0]), int(page.chunks[1])
        n_down, n_across = int(page.chunked[0]), int(page.chunked[1])
        x0, x1 = cols if cols is not None else (0, lw)
        j0, j1 = x0 // seg_w, min(n_across, -(-x1 // seg_w))  # the tile columns the strips need
        width = x1 - x0  # the buffer holds just the columns asked for: a contiguous strip, no copy
        samples = int(page.samplesperpixel)
        per_strip = max(1, math.ceil(min_rows / seg_h))
        kwargs = {"_fullsize": True}
        if page.jpegtables is not None:
            kwargs["jpegtables"] = page.jpegtables
        if getattr(page, "jpegheader", None) is not None:
            kwargs["jpegheader"] = page.jpegheader
        decode, fh = page.decode, self._tif.filehandle
        offsets, counts = page.dataoffsets, page.databytecounts

        def decode_one(index: int, data: bytes):
            try:
                return decode(data, index, **kwargs)[0]
            except Exception as exc:
                raise SlideError(
                    f"{self.path}: cannot decode tile {index} of level {level} (corrupt or "
                    f"truncated file?): {type(exc).__name__}: {exc}"
                ) from exc

        with ThreadPoolExecutor(max_workers=self._workers, thread_name_prefix="decode") as pool:

            def submit(first: int):
                last = min(first + per_strip, n_down)
                futures = []
                for row in range(first, last):
                    for index in range(row * n_across + j0, row * n_across + j1):
                        if counts[index]:
                            fh.seek(offsets[index])
                            futures.append((index, pool.submit(decode_one, index, fh.read(counts[index]))))
                return first, last, futures

            pending = submit(0)
            buffer = None
            while pending is not None:
                first, last, futures = pending
                pending = submit(last) if last < n_down else None
                y0, y1 = first * seg_h, min(last * seg_h, lh)
                if buffer is None or not reuse_buffer:
                    buffer = np.empty((per_strip * seg_h, width, samples), dtype=np.uint8)
                strip = buffer[: y1 - y0]
                if len(futures) < (last - first) * (j1 - j0):
                    strip[:] = 0  # sparse file: tiles without data read as 0
                for i, (index, future) in enumerate(futures):
                    futures[i] = None  # the decoded tile is freed once copied
                    segment = future.result()
                    row, col = divmod(index, n_across)
                    top = row * seg_h - y0
                    h = min(seg_h, y1 - y0 - top)
                    c0, c1 = max(x0, col * seg_w), min(x1, (col + 1) * seg_w)  # level columns kept
                    strip[top:top + h, c0 - x0:c1 - x0] = segment.reshape(
                        seg_h, seg_w, samples
                    )[:h, c0 - col * seg_w:c1 - col * seg_w]
                yield y0, _to_rgb(strip, samples)

    def _read_raw(self, level, y0, y1, x0, x1):
        index, perm, y_axis, x_axis, add_axis = self._index[level]
        index = list(index)
        index[y_axis] = slice(y0, y1)
        index[x_axis] = slice(x0, x1)
        region = np.asarray(self._arrays[level][tuple(index)])
        if add_axis:
            region = region[..., None]
        region = np.transpose(region, perm)
        if self._select:
            return np.ascontiguousarray(region[..., list(self._select)])
        return _to_rgb(region, self._channels)

    def close(self) -> None:
        tif = getattr(self, "_tif", None)
        if tif is not None:
            tif.close()
            self._tif = None


class OpenSlideSlide(Slide):
    """A slide read with OpenSlide (MRXS, VMS/VMU, and every format it knows): levels, region
    reads and pixel size as :class:`TiffSlide`'s. Pixels OpenSlide reports as transparent (no
    scanned data, e.g. between MRXS fields) read as white glass."""

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
        except Exception as exc:  # OpenSlideError: a known format, broken (an MRXS without its data folder...)
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

    def chunk_rows(self, level: int) -> int:
        return self._tile_rows[level]

    def _read_raw(self, level, y0, y1, x0, x1):
        d = self.levels[level].downsample
        # level-0 origin of level pixel (y0, x0): the smallest whose level position is >= it, so
        # a non-integer downsample (2.0005) does not land one pixel short
        region = np.asarray(self._osr.read_region((math.ceil(x0 * d - 1e-6), math.ceil(y0 * d - 1e-6)), level,
                                                  (x1 - x0, y1 - y0)))
        rgb = np.ascontiguousarray(region[..., :3])
        rgb[region[..., 3] == 0] = 255
        return rgb

    def describe(self) -> str:
        return super().describe() + f" (OpenSlide, {self._osr.properties.get('openslide.vendor', '?')})"

    def close(self) -> None:
        osr = getattr(self, "_osr", None)
        if osr is not None:
            osr.close()
            self._osr = None


def _openslide_knows(path: str) -> bool:
    try:
        import openslide
    except ImportError:
        return False
    try:
        return openslide.OpenSlide.detect_format(path) is not None
    except Exception:
        return False


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
    from data.dicom import DicomSlide, is_dicom_slide

    dicom = backend == "wsidicom" or (backend == "auto" and is_dicom_slide(path))
    if dicom or backend == "openslide" or (backend == "auto" and path.lower().endswith(OPENSLIDE_ONLY)):
        if channels:
            raise SlideError(f"{path}: INPUT.CHANNELS is for multi-channel TIFF slides, not "
                             f"{'DICOM' if dicom else 'OpenSlide'}'s RGB ones")
        return DicomSlide(path, workers=workers) if dicom else OpenSlideSlide(path)
    try:
        return TiffSlide(path, workers=workers, channels=channels)
    except SlideError as exc:
        if backend == "auto" and not channels and os.path.isfile(path) and _openslide_knows(path):
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
