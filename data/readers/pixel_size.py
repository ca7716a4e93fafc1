"""A slide's pixel size (µm/px) from its metadata, and the rule that picks between the metadata
and a config key: SVS ``MPP``, OME-XML ``PhysicalSize``, Philips ``DICOM_PIXEL_SPACING``,
TIFF/NDPI resolution tags, an ordinary image's header."""
from __future__ import annotations

import re
from typing import Optional, Tuple

from config.choices import MAX_MPP
from data.readers.base import PixelSize, Slide, SlideError

__all__ = ["check_mpp", "tiff_pixel_size", "image_pixel_size", "choose_mpp", "resolve_mpp"]


def check_mpp(value: float, where: str) -> float:
    """``value`` when it is a possible pixel size (0 < value <= :data:`MAX_MPP` µm/px), else a
    :class:`SlideError` naming ``where`` (a slide and its metadata, or a config key)."""
    if not (value > 0 and value <= MAX_MPP):  # also rejects NaN
        raise SlideError(f"{where}: pixel size {value:g} um/px is impossible (expected > 0 and <= {MAX_MPP:g})")
    return float(value)


_OME_UNITS_UM = {"pm": 1e-6, "nm": 1e-3, "µm": 1.0, "um": 1.0, "mm": 1e3, "cm": 1e4, "m": 1e6,
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
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            dpi = image.info.get("dpi")
    except (OSError, UnidentifiedImageError, ValueError) as exc:  # read whole by OpenCV; Pillow may not know it
        return None, f"no pixel size in its header (Pillow cannot read the header: {type(exc).__name__})"
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

