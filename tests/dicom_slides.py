"""DICOM test inputs built at test time: real TIFF/SVS slides converted to DICOM WSI with
wsidicomizer (a converter labs use), a DICOM object that is not a slide (a CT image) and a
fluorescence WSI header."""
from __future__ import annotations

import copy
import os
from typing import List, Optional

import numpy as np

__all__ = ["dicomize", "write_ct", "write_fluorescence"]


def dicomize(source: str, out_dir: str, mpp: Optional[float] = None, add_levels: bool = False,
             lossless: bool = False) -> List[str]:
    """Convert ``source`` to DICOM WSI instances in ``out_dir`` (pyramid levels only; a slide
    without a pixel size in its metadata gets ``mpp``): JPEG tiles (wsidicomizer's default,
    quality 90), or JPEG-LS lossless ones; returns the files written.

    Read through wsidicomizer's tiffslide source: its opentile source (native JPEG tiles copied)
    needs the libturbojpeg system library, which a plain ``pip install`` does not bring."""
    from wsidicomizer import WsiDicomizer
    from wsidicomizer.wsidicomizer import SourceIdentifier

    kwargs = {"preferred_source": SourceIdentifier.TIFFSLIDE}
    if lossless:
        from wsidicom.codec import JpegLsSettings

        kwargs["encoding"] = JpegLsSettings(level=0)
    if mpp is not None:
        from wsidicom.geometry import SizeMm
        from wsidicom.metadata import Equipment, Image, Label, Patient, Pyramid, Series, Study, WsiMetadata
        from wsidicom.metadata import Slide as SlideMetadata

        kwargs["default_metadata"] = WsiMetadata(
            study=Study(), series=Series(), patient=Patient(), equipment=Equipment(), slide=SlideMetadata(),
            label=Label(), pyramid=Pyramid(image=Image(pixel_spacing=SizeMm(mpp / 1000, mpp / 1000)), optical_paths=[]))
    os.makedirs(out_dir, exist_ok=True)
    return WsiDicomizer.convert(source, out_dir, add_missing_levels=add_levels, include_label=False,
                                include_overview=False, include_thumbnail=False, workers=1, **kwargs)


def write_ct(path: str) -> str:
    """A small valid CT image: a DICOM file that is not a whole-slide image."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientName = "CT", "Test^CT"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Rows = ds.Columns = 8
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = np.arange(64, dtype=np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def write_fluorescence(source_file: str, path: str, channel: str = "DAPI") -> str:
    """``source_file`` (a WSI instance) relabelled as one greyscale optical path ``channel``: the
    header of a fluorescence DICOM WSI."""
    import pydicom

    ds = pydicom.dcmread(source_file)
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    path_item = copy.deepcopy(ds.OpticalPathSequence[0])
    path_item.OpticalPathDescription = channel
    ds.OpticalPathSequence = [path_item]
    ds.save_as(path, enforce_file_format=True)
    return path
