"""DICOM whole-slide images (VL Whole Slide Microscopy Image, SOP class ...77.1.6), read with
``wsidicom``: a folder holding one slide's ``.dcm`` instances (one per pyramid level, plus
label / overview images, which are ignored) or a single ``.dcm`` file.

:class:`DicomSlide` gives the same levels, region reads and pixel size (``PixelSpacing``) as
the TIFF and OpenSlide readers. Other DICOM objects (CT, a Segmentation, a secondary capture...)
and fluorescence slides (greyscale optical paths) are refused with one line naming the file.

The tiles a sparse DICOM (``TILED_SPARSE``) leaves out read as wsidicom's blank tile (white),
the one exception to :data:`data.readers.base.NO_DATA`; full tiling (``TILED_FULL``, what
converters write) has no missing tiles.
"""
from __future__ import annotations

import os
from typing import List, Optional

import numpy as np

from data.readers.base import LevelInfo, PixelSize, Slide, SlideError

__all__ = ["DicomSlide", "DICOM_INSTALL", "WSI_SOP_CLASS", "is_dicom_file", "is_dicom_slide", "is_dicom_folder",
           "dicom_files", "source_of"]

DICOM_INSTALL = "python -m pip install wsidicom"
# VL Whole Slide Microscopy Image Storage
WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"


def is_dicom_file(path: str) -> bool:
    """A file with the DICOM preamble ("DICM" at byte 128) or the ``.dcm`` extension."""
    if not os.path.isfile(path):
        return False
    if path.lower().endswith(".dcm"):
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"


def is_dicom_slide(path: str) -> bool:
    """What ``open_slide``'s ``auto`` reader sends to wsidicom: a folder, or a DICOM file."""
    return os.path.isdir(path) or is_dicom_file(path)


def _folder_files(folder: str) -> List[str]:
    try:
        return [os.path.join(folder, n) for n in sorted(os.listdir(folder))]
    except OSError:
        return []


def dicom_files(folder: str) -> List[str]:
    """The DICOM files directly inside ``folder`` (sorted)."""
    return [p for p in _folder_files(folder) if is_dicom_file(p)]


def is_dicom_folder(path: str) -> bool:
    """A folder that holds DICOM files: one DICOM slide (its id is the folder's name)."""
    return os.path.isdir(path) and any(is_dicom_file(p) for p in _folder_files(path))


def _describe_dataset(ds) -> str:
    from pydicom.uid import UID

    sop = str(ds.get("SOPClassUID", ""))
    return f"modality {ds.get('Modality', '') or '?'}, {UID(sop).name if sop else 'no SOP class'}"


class DicomSlide(Slide):
    """A DICOM WSI (folder of instances or one file) read with wsidicom."""

    def __init__(self, path: str, workers: int = 0):
        self.path = str(path)
        self._wsi = None
        try:
            import pydicom
            import wsidicom
        except ImportError:
            raise SlideError(f"{self.path}: reading DICOM WSI needs wsidicom: {DICOM_INSTALL}") from None
        if not os.path.exists(self.path):
            raise SlideError(f"{self.path}: file not found")
        files = dicom_files(self.path) if os.path.isdir(self.path) else [self.path]
        if not files:
            raise SlideError(f"{self.path}: a folder without DICOM files")
        volumes, others = [], []
        for file in files:
            try:
                ds = pydicom.dcmread(file, stop_before_pixels=True)
            except Exception as exc:  # whatever pydicom raises on a broken file: one error naming it
                raise SlideError(f"{file}: not a readable DICOM file ({type(exc).__name__}: {exc})") from None
            image_type = [str(v).upper() for v in ds.get("ImageType", [])]
            if str(ds.get("SOPClassUID", "")) != WSI_SOP_CLASS:
                others.append((file, ds))
            elif len(image_type) < 3 or image_type[2] == "VOLUME":  # not LABEL / OVERVIEW / THUMBNAIL
                volumes.append((file, ds))
        if not volumes:
            if others and len(others) == len(files):
                file, ds = others[0]
                raise SlideError(f"{file}: a DICOM file but not a whole-slide image ({_describe_dataset(ds)}); "
                                 "only VL Whole Slide Microscopy Image instances are read")
            raise SlideError(f"{self.path}: DICOM WSI without a VOLUME (pyramid) image: only label/overview "
                             "images, nothing to tile")
        self._check_photometric(volumes)
        # level 0: the largest VOLUME image; the SEG output references it
        self.volume_file, _ = max(volumes, key=lambda v: int(v[1].get("TotalPixelMatrixRows", v[1].Rows))
                                     * int(v[1].get("TotalPixelMatrixColumns", v[1].Columns)))
        try:
            self._wsi = wsidicom.WsiDicom.open([v[0] for v in volumes])
            pyramid = list(self._wsi.levels)
            if not pyramid:
                raise ValueError("no pyramid levels")
        except Exception as exc:
            self.close()
            raise SlideError(f"{self.path}: wsidicom cannot open it ({type(exc).__name__}: {exc})") from None
        self._levels = pyramid
        self._threads = max(1, int(workers or os.cpu_count() or 1))
        h0, w0 = pyramid[0].size.height, pyramid[0].size.width
        self.levels = [LevelInfo((int(lv.size.height), int(lv.size.width)),
                                 (w0 / lv.size.width + h0 / lv.size.height) / 2) for lv in pyramid]
        spacing = pyramid[0].pixel_spacing
        if spacing is not None and spacing.width and spacing.height:
            self.pixel_size = PixelSize(500.0 * (float(spacing.width) + float(spacing.height)), "DICOM PixelSpacing")
        else:
            self.mpp_note = "no PixelSpacing in its DICOM headers"

    def _check_photometric(self, volumes) -> None:
        grey = [(f, ds) for f, ds in volumes if int(ds.get("SamplesPerPixel", 3)) == 1
                or str(ds.get("PhotometricInterpretation", "")).startswith("MONOCHROME")]
        if not grey:
            return
        paths = []
        for _, ds in grey:
            for item in ds.get("OpticalPathSequence", []):
                label = item.get("OpticalPathDescription", "") or item.get("OpticalPathIdentifier", "")
                if label and label not in paths:
                    paths.append(str(label))
        named = f" ({', '.join(paths)})" if paths else ""
        raise SlideError(f"{self.path}: DICOM WSI with greyscale optical paths{named}: a fluorescence slide; "
                         "only brightfield RGB slides are read")

    def chunk_rows(self, level: int) -> int:
        return int(self._levels[level].tile_size.height)

    def chunk_cols(self, level: int) -> int:
        return int(self._levels[level].tile_size.width)

    def _read_raw(self, level, y0, y1, x0, x1):
        region = self._wsi.read_region((x0, y0), self._levels[level].level, (x1 - x0, y1 - y0), threads=self._threads)
        if region.mode != "RGB":
            region = region.convert("RGB")
        return np.asarray(region)

    def describe(self) -> str:
        return super().describe() + " (DICOM, wsidicom)"

    def close(self) -> None:
        wsi = getattr(self, "_wsi", None)
        if wsi is not None:
            wsi.close()
            self._wsi = None


def source_of(slide: Slide) -> Optional[str]:
    """The level-0 instance file of a DICOM slide, else None."""
    return slide.volume_file if isinstance(slide, DicomSlide) else None
